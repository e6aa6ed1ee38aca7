"""Prometheus metrics of the operator (served on DSJOBS_METRICS_PORT, path /metrics)."""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dsjobs.controller.podview import parse_time
from dsjobs.controller.status import COND_SCHEDULED
from dsjobs.kubemetrics import KUBE_REQUESTS as KUBE_REQUESTS
from dsjobs.models import JobPhase

#: Every phase's series is exported (0 where no job is in it): a fixed set, the model's.
_PHASES: Final = tuple(phase.value for phase in JobPhase)

JOBS = Gauge("dsjobs_jobs", "ProjectJobs the operator sees, by phase.", ["phase"])
LEADER = Gauge(
    "dsjobs_leader",
    "1 while this replica runs the operator (holds the leader Lease, or elects none), 0 standing by.",
)
TRANSITIONS = Counter(
    "dsjobs_job_transitions_total",
    "Phase changes of jobs, every hop their Events tell (from_phase NONE: a new job's first), those "
    "passed between two paced status writes included.",
    ["from_phase", "to_phase"],
)
#: How a job's wait for its first start ended: it started, or the job ended before it did
#: (cancelled, or failed: never scheduled, image never pulled...). A fixed set.
QUEUE_OUTCOMES: Final = ("started", "cancelled", "failed")
QUEUE_TIME = Histogram(
    "dsjobs_job_queue_seconds",
    "From the job's execute request (the API's Execute; the ProjectJob's creation when no request "
    "time is recorded) to the first start of its job container (outcome started), or to the job's "
    "end when it never started (cancelled, failed), once per job: a retried job's later attempts are "
    "not counted, nor is a job whose first attempt failed before starting and was retried.",
    ["outcome"],
    # Up to days: a cluster short of GPUs queues jobs for that long, and a wait past the last
    # bucket only shows as +Inf.
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600),
)
#: The `outcome` of a run: how the attempt ended. RETRIED is an attempt that failed and was given
#: another by the retry policy; the others are the job's final phase. A fixed set: the label's
#: cardinality must not follow the data.
RUN_OUTCOMES: Final = (JobPhase.SUCCESS.value, JobPhase.ERROR.value, JobPhase.CANCELLED.value, "RETRIED")
RUN_TIME = Histogram(
    "dsjobs_job_run_seconds",
    "From the job container's start (the environment's setup, then the program) to the end of its "
    "attempt, by outcome: the job's final phase (SUCCESS, "
    "ERROR, CANCELLED), or RETRIED for an attempt that failed and was retried (observed when the retry "
    "is decided).",
    ["outcome"],
    buckets=(
        1,
        5,
        10,
        30,
        60,
        300,
        900,
        1800,
        3600,
        2 * 3600,
        4 * 3600,
        6 * 3600,
        12 * 3600,
        24 * 3600,
        72 * 3600,
    ),
)
for _outcome in RUN_OUTCOMES:  # every series from the start: a rate() over none is no 0
    RUN_TIME.labels(outcome=_outcome)
for _outcome in QUEUE_OUTCOMES:
    QUEUE_TIME.labels(outcome=_outcome)
POD_CREATE_LATENCY = Histogram(
    "dsjobs_pod_create_seconds",
    "From the operator seeing a job's execute request to the job's first pod being created.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "dsjobs_reconcile_errors_total",
    "Reconciles that failed and were retried, by exception class; NotSettled: a reconcile whose plan "
    "did not settle within its steps (tried again in 5 s).",
    ["kind"],
)
RECONCILES = Counter("dsjobs_reconciles_total", "Reconcile steps run.")
EVENTS_PENDING = Gauge("dsjobs_events_pending", "Kubernetes Events queued and not posted yet.")
#: Why an Event was not posted: the queue was full, the API server refused it for good, or it kept
#: failing (no answer, 5xx, throttled) through the retries. A fixed set.
EVENT_DROPS: Final = ("queue_full", "refused", "failed")
EVENTS_DROPPED = Counter(
    "dsjobs_events_dropped_total",
    "Kubernetes Events given up (they are an aid: the job's status holds the facts), by why: "
    "queue_full, refused (a 4xx other than throttling), failed (no answer, 5xx or throttled through "
    "about 30 s of retries).",
    ["why"],
)
for _why in EVENT_DROPS:
    EVENTS_DROPPED.labels(why=_why)
STATUS_WRITES = Counter(
    "dsjobs_status_writes_total", "Status patches written (only when the status changed)."
)
STATUS_WRITES_PACED = Counter(
    "dsjobs_status_writes_paced_total",
    "Status changes held back because the job's status was written less than the pacing interval ago.",
)
OBJECT_STORE_UP = Gauge(
    "dsjobs_object_store_up",
    "1 when the operator's last check of the object store got an answer, 0 when it did not "
    "(connection trouble, a timeout, a 5xx). Checked only while a job's runner has been moving files "
    "for 10 s, at most every 10 s: absent until the first check.",
    registry=None,  # registered at the first check (`object_store_checked`): a 0 before it is no answer
)


_store_checked = False


def object_store_checked(answered: bool) -> None:
    """Record a check of the object store (the series appears with the first)."""
    global _store_checked
    if not _store_checked:
        REGISTRY.register(OBJECT_STORE_UP)
        _store_checked = True
    OBJECT_STORE_UP.set(1 if answered else 0)


def waiting_since(status: Mapping[str, Any]) -> tuple[str, float] | None:
    """(instance type, since when as a POSIX time) of a job whose pod waits for a node or for
    admission: PREPARING with its Scheduled condition False (no node has room, a quota or a
    policy refuses the pod), since that condition's last transition; None otherwise."""
    if status.get("phase") != JobPhase.PREPARING:
        return None
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == COND_SCHEDULED:
            if cond.get("status") != "False":
                return None
            since = parse_time(cond.get("lastTransitionTime"))
            if since is None:
                return None
            return str(status.get("actualCloudInstanceType") or ""), since.timestamp()
    return None


class WaitBook(Collector):
    """The jobs waiting for a node or admission, by instance type: how many, and for how long
    the longest has waited (`dsjobs_jobs_waiting`, `dsjobs_job_oldest_wait_seconds`), worked out
    at each scrape. A type's series stay, at 0, once its last waiter is gone; none before the
    first (a standby has none)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._waits: dict[tuple[str, str], tuple[str, float]] = {}
        self._types: set[str] = set()
        self.clock = clock

    def update(self, key: tuple[str, str], status: Mapping[str, Any]) -> None:
        wait = waiting_since(status)
        if wait is None:
            self._waits.pop(key, None)
            return
        self._types.add(wait[0])
        self._waits[key] = wait

    def forget(self, key: tuple[str, str]) -> None:
        self._waits.pop(key, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # A scrape runs in prometheus_client's thread while the event loop updates the book: copy
        # first (one C-level step each under the GIL), then read the copies.
        waits = list(self._waits.values())
        types = tuple(self._types)
        now = self.clock()
        count: Tally[str] = Tally()
        oldest = dict.fromkeys(types, 0.0)
        for instance_type, since in waits:
            count[instance_type] += 1
            oldest[instance_type] = max(oldest.get(instance_type, 0.0), now - since)
        waiting = GaugeMetricFamily(
            "dsjobs_jobs_waiting",
            "Jobs whose pod waits for a node or for admission (PREPARING, Scheduled condition False: "
            "no node has room, a quota or a policy refuses the pod), by the instance type it waits for.",
            labels=["instance_type"],
        )
        longest = GaugeMetricFamily(
            "dsjobs_job_oldest_wait_seconds",
            "How long the longest waiting job of the instance type has waited, since its Scheduled "
            "condition became False (0 when none waits).",
            labels=["instance_type"],
        )
        for instance_type in sorted(oldest):
            waiting.add_metric([instance_type], count[instance_type])
            longest.add_metric([instance_type], max(0.0, oldest[instance_type]))
        yield waiting
        yield longest


class _CurrentWaits(Collector):
    """The registry's way to the operator's WaitBook (tests make several operators)."""

    book: WaitBook | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self.book.collect() if self.book is not None else iter(())

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # the series are known at collection only


WAITS: Final = _CurrentWaits()
REGISTRY.register(WAITS)


INSTANCE_TYPES_INVALID = Gauge(
    "dsjobs_instance_types_invalid",
    "InstanceTypes left out of the catalog because they are invalid (the operator's log names each "
    "and what is wrong): no job gets them, jobs listing them fall back or fail naming them.",
)
STATUS_CONFLICTS = Counter(
    "dsjobs_status_conflicts_total",
    "Status patches refused because the job changed meanwhile (then re-planned).",
)


class PhaseBook:
    """The phase of every job the operator has seen, for the `dsjobs_jobs` gauge (O(1) updates).

    The gauge's series appear only once this replica leads (`publish`, or its first job): a standby
    sees no jobs, and its zeros read as an empty cluster on any panel that picks a replica or
    averages them."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._counts: Tally[str] = Tally()
        self._published = False

    def publish(self) -> None:
        """Export every phase's series (0 where no job is in it): called when this replica leads."""
        if self._published:
            return
        self._published = True
        for phase in _PHASES:
            JOBS.labels(phase=phase).set(self._counts[phase])

    def set(self, key: tuple[str, str], phase: str) -> None:
        self.publish()
        old = self._phases.get(key)
        if old == phase:
            return
        if old is not None:
            self._counts[old] -= 1
            JOBS.labels(phase=old).set(self._counts[old])
        self._phases[key] = phase
        self._counts[phase] += 1
        JOBS.labels(phase=phase).set(self._counts[phase])

    def forget(self, key: tuple[str, str]) -> None:
        self.publish()
        old = self._phases.pop(key, None)
        if old is not None:
            self._counts[old] -= 1
            JOBS.labels(phase=old).set(self._counts[old])

    def keys(self) -> Iterable[tuple[str, str]]:
        return self._phases.keys()


_serving = False


def serve(port: int, host: str = "0.0.0.0") -> bool:
    """Start the /metrics endpoint (one small daemon thread of prometheus_client) on `host`
    (DSJOBS_BIND_ADDRESS).

    A port that cannot be bound is logged, not fatal: jobs matter more than their metrics.
    """
    global _serving
    if not port:
        return False
    if _serving:  # a standby started it before it led
        return True
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        logging.getLogger("dsjobs.controller").error(
            "metrics endpoint on %s port %d not started: %s", host, port, exc
        )
        return False
    _serving = True
    return True
