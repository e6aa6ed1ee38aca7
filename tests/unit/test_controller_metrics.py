"""The operator's job metrics: what `_after_write` observes for a job's writes, and what its Events
tell (dsjobs.controller.handlers, metrics, events)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from test_job_status import CREATED, NOW, SETTINGS, job, pod, started, step, terminated, ts

from dsjobs.controller import metrics
from dsjobs.controller.handlers import Operator
from dsjobs.controller.plan import CreatePod
from dsjobs.controller.status import JobEvent, phase_hops
from dsjobs.models import JobPhase

KEY = ("project-a", "job-1")


class Events:
    def __init__(self) -> None:
        self.posted: list[JobEvent] = []

    def post(self, body: Any, event: JobEvent) -> str:
        self.posted.append(event)
        return "x"


def _operator() -> tuple[Operator, Events]:
    op = Operator(SETTINGS, environ={})
    events = Events()
    op.events = events  # type: ignore[assignment]
    return op, events


def _written(status: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": "job-1", "namespace": "project-a", "uid": "uid-1", "resourceVersion": "101"}
    return {"apiVersion": "dsjobs.dev/v1alpha1", "kind": "ProjectJob", "metadata": meta, "status": status}


def _queue_time(outcome: str = "started") -> tuple[float, float]:
    samples = {
        s.name: s.value
        for m in metrics.QUEUE_TIME.collect()
        for s in m.samples
        if "le" not in s.labels and s.labels.get("outcome") == outcome
    }
    return samples["dsjobs_job_queue_seconds_count"], samples["dsjobs_job_queue_seconds_sum"]


def _run_time(outcome: str) -> tuple[float, float]:
    samples = {
        s.name: s.value
        for m in metrics.RUN_TIME.collect()
        for s in m.samples
        if "le" not in s.labels and s.labels.get("outcome") == outcome
    }
    return samples["dsjobs_job_run_seconds_count"], samples["dsjobs_job_run_seconds_sum"]


def _run_times() -> dict[str, tuple[float, float]]:
    return {outcome: _run_time(outcome) for outcome in metrics.RUN_OUTCOMES}


def _transitions() -> Counter[tuple[str, str]]:
    return Counter(
        {
            (s.labels["from_phase"], s.labels["to_phase"]): int(s.value)
            for m in metrics.TRANSITIONS.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
    )


def test_queue_time_is_observed_once_per_job_at_its_first_start() -> None:
    op, _ = _operator()
    count, total = _queue_time()
    runs = _run_times()
    first, second = NOW - timedelta(seconds=30), NOW + timedelta(minutes=30)
    policy = {"maxAttempts": 2, "backoffSeconds": 30}

    # Attempt 1's container starts 60 s after the job's creation.
    preparing = job(status=started("PREPARING"), retryPolicy=policy)
    op._after_write(KEY, preparing, _written(started("EXECUTING", startedAt=ts(first))), [])
    # It is evicted and retried: attempt 2 is created (startedAt reset) and starts 30 min later.
    running = job(status=started("EXECUTING", startedAt=ts(first)), retryPolicy=policy)
    retried = step(running, [pod(phase="Failed", node="cpu-0", reason="Evicted")])
    assert (retried.status.attempt, retried.status.retried_failures) == (2, 1)
    op._after_write(KEY, running, _written(retried.status.to_cr()), list(retried.events))
    backoff = job(status=retried.status.to_cr(), retryPolicy=policy)
    created = step(backoff, [pod(gone=True)], now=NOW + timedelta(minutes=1))
    assert created.actions == (CreatePod(2, 0, "c1.4"),) and created.status.started_at is None
    op._after_write(KEY, backoff, _written(created.status.to_cr()), list(created.events))
    attempt_2 = job(status=created.status.to_cr(), retryPolicy=policy)
    again = {**created.status.to_cr(), "phase": "EXECUTING", "startedAt": ts(second)}
    op._after_write(KEY, attempt_2, _written(again), [])
    done = {**again, "phase": "SUCCESS", "finishedAt": ts(second + timedelta(minutes=5)), "returnCode": 0}
    op._after_write(KEY, job(status=again, retryPolicy=policy), _written(done), [])

    after_count, after_total = _queue_time()
    assert after_count - count == 1  # one job, one wait: attempt 1's run and backoff are no queue
    assert after_total - total == (first - CREATED).total_seconds()
    # Each attempt's run, by how it ended: attempt 1 from its start until the retry was decided
    # (the plan's NOW), attempt 2 until the job's end.
    ran = {o: (c - runs[o][0], t - runs[o][1]) for o, (c, t) in _run_times().items()}
    assert ran == {"RETRIED": (1, 30.0), "SUCCESS": (1, 300.0), "ERROR": (0, 0), "CANCELLED": (0, 0)}


def test_a_job_that_started_and_failed_between_two_writes_counts_its_wait_and_its_run() -> None:
    # The pod started and was evicted within one write interval: the write that decides the
    # retry is the first to hold startedAt.
    op, _ = _operator()
    count, total = _queue_time()
    runs = _run_times()
    policy = {"maxAttempts": 2, "backoffSeconds": 30}
    preparing = job(status=started("PREPARING"), retryPolicy=policy)
    retried = step(
        preparing,
        [pod(phase="Failed", node="cpu-0", reason="Evicted", containers=[terminated("job", 137)])],
    )
    assert retried.status.retried_failures == 1 and retried.status.started_at is not None
    op._after_write(KEY, preparing, _written(retried.status.to_cr()), list(retried.events))
    after_count, after_total = _queue_time()
    assert after_count - count == 1
    assert after_total - total == (retried.status.started_at - CREATED).total_seconds()
    assert _run_time("RETRIED")[0] - runs["RETRIED"][0] == 1


def test_a_final_phase_is_the_outcome_of_the_run() -> None:
    op, _ = _operator()
    runs = _run_times()
    running = started("EXECUTING", startedAt=ts(NOW))
    for phase in ("ERROR", "CANCELLED"):
        ended = {**running, "phase": phase, "finishedAt": ts(NOW + timedelta(seconds=10))}
        op._after_write(KEY, job(status=running), _written(ended), [])
        op._after_write(KEY, job(status=ended), _written(ended), [])  # no second observation
    ran = {o: (c - runs[o][0], t - runs[o][1]) for o, (c, t) in _run_times().items()}
    assert ran == {"ERROR": (1, 10.0), "CANCELLED": (1, 10.0), "SUCCESS": (0, 0), "RETRIED": (0, 0)}
    # The label's values are a fixed set, exported from the start.
    exported = {s.labels["outcome"] for m in metrics.RUN_TIME.collect() for s in m.samples}
    assert exported == set(metrics.RUN_OUTCOMES)


def test_queue_time_counts_from_the_execute_request() -> None:
    # The API creates a job not executed, uploads its inputs, then Execute: the wait for a pod
    # begins at the request (the annotation dsjobs.dev/execute-requested-at), not the creation.
    op, _ = _operator()
    count, total = _queue_time()
    requested = CREATED + timedelta(hours=3)
    preparing = dataclasses.replace(job(status=started("PREPARING")), execute_requested_at=requested)
    start = requested + timedelta(seconds=45)
    op._after_write(KEY, preparing, _written(started("EXECUTING", startedAt=ts(start))), [])
    # A request time before the job existed (an annotation copied with a manifest) is no wait.
    early = dataclasses.replace(
        job(status=started("PREPARING")), execute_requested_at=CREATED - timedelta(days=1)
    )
    op._after_write(
        KEY, early, _written(started("EXECUTING", startedAt=ts(CREATED + timedelta(seconds=5)))), []
    )
    after_count, after_total = _queue_time()
    assert (after_count - count, after_total - total) == (2, 45.0 + 5.0)


def test_the_wait_of_a_job_that_never_started_is_observed_at_its_end() -> None:
    # Cancelled while queued, or failed before its start (no capacity, an image never pulled): left
    # out, the queue time looked best exactly when the queue was worst.
    op, _ = _operator()
    before = {o: _queue_time(o) for o in metrics.QUEUE_OUTCOMES}
    preparing = started("PREPARING")
    for phase, after in (("CANCELLED", 600), ("ERROR", 7200)):
        ended = {**preparing, "phase": phase, "finishedAt": ts(CREATED + timedelta(seconds=after))}
        op._after_write(KEY, job(status=preparing), _written(ended), [])
        op._after_write(KEY, job(status=ended), _written(ended), [])  # once
    # Never executed (no request, no creation-time execute): no wait to tell.
    creating = {"phase": "CREATING", "createdAt": ts(CREATED)}
    never = {**creating, "phase": "CANCELLED", "finishedAt": ts(NOW)}
    op._after_write(KEY, job(status=creating, execute=False), _written(never), [])
    # Refused before it queued (an instance type that does not exist): it waited for no pod.
    refused = {**creating, "phase": "ERROR", "finishedAt": ts(CREATED + timedelta(seconds=1))}
    op._after_write(KEY, job(status=creating), _written(refused), [])
    seen = {
        o: tuple(a - b for a, b in zip(_queue_time(o), before[o], strict=True))
        for o in metrics.QUEUE_OUTCOMES
    }
    assert seen == {"started": (0, 0), "cancelled": (1, 600.0), "failed": (1, 7200.0)}
    exported = {s.labels["outcome"] for m in metrics.QUEUE_TIME.collect() for s in m.samples}
    assert exported == set(metrics.QUEUE_OUTCOMES)


def test_queue_time_buckets_reach_days() -> None:
    # A cluster short of GPUs queues jobs for hours or days; beyond the last bucket is only +Inf.
    bounds = {b for b in metrics.QUEUE_TIME._upper_bounds}  # type: ignore[attr-defined]
    assert {4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600} <= bounds


def test_a_standby_exports_no_job_counts() -> None:
    # A standby sees no jobs: its zeros beside the leader's counts made sum(dsjobs_jobs) wrong.
    metrics.JOBS.clear()
    book = metrics.PhaseBook()
    assert not [s for m in metrics.JOBS.collect() for s in m.samples]
    book.publish()  # leading: every phase, 0 where no job is
    counts = {s.labels["phase"]: s.value for m in metrics.JOBS.collect() for s in m.samples}
    assert counts == dict.fromkeys(counts, 0.0) and set(counts) == {phase.value for phase in JobPhase}
    other = metrics.PhaseBook()
    other.set(("ns", "a"), "PREPARING")  # its first job publishes the rest too
    counts = {s.labels["phase"]: s.value for m in metrics.JOBS.collect() for s in m.samples}
    assert counts["PREPARING"] == 1 and counts["SUCCESS"] == 0


def test_the_transitions_counter_counts_every_hop_the_events_tell() -> None:
    op, events = _operator()
    before = _transitions()
    # A new job's first step passes CREATING on its way to PREPARING (and creates the pod).
    new = job()
    first = step(new)
    assert first.status.phase == JobPhase.PREPARING
    op._after_write(KEY, new, _written(first.status.to_cr()), list(first.events))
    # The write pacing held back EXECUTING and UPLOADING_OUTPUT; SUCCESS is written.
    op._passed[KEY] = ["EXECUTING", "UPLOADING_OUTPUT"]
    done = started("SUCCESS", startedAt=ts(NOW), finishedAt=ts(NOW))
    told = [JobEvent("Normal", "Succeeded", "PREPARING -> SUCCESS: done")]
    op._after_write(KEY, job(status=started("PREPARING")), _written(done), told)

    counted = _transitions() - before
    assert counted == Counter(
        {
            ("NONE", "CREATING"): 1,
            ("CREATING", "PREPARING"): 1,
            ("PREPARING", "EXECUTING"): 1,
            ("EXECUTING", "UPLOADING_OUTPUT"): 1,
            ("UPLOADING_OUTPUT", "SUCCESS"): 1,
        }
    )
    # What `kubectl describe` shows, hop for hop.
    assert [e.message.partition(":")[0] for e in events.posted if e.reason in ("Preparing", "Succeeded")] == [
        "new -> CREATING -> PREPARING",
        "PREPARING -> EXECUTING -> UPLOADING_OUTPUT -> SUCCESS",
    ]
    assert Counter(phase_hops(events.posted)) == counted


def test_phase_hops_reads_only_phase_chains() -> None:
    assert phase_hops(
        [
            JobEvent("Normal", "Created", "new -> CREATING"),
            JobEvent("Warning", "FailedCreate", 'pods "a" is forbidden: exceeded quota: q'),
            JobEvent("Warning", "FallingBack", "no capacity for instance type a -> b: falling back"),
            JobEvent("Warning", "Failed", "EXECUTING -> ERROR: the program said A -> B: no"),
            JobEvent("Normal", "Preparing", "EXECUTING -> PREPARING"),
        ]
    ) == [("NONE", "CREATING"), ("EXECUTING", "ERROR"), ("EXECUTING", "PREPARING")]


def test_a_retry_taken_back_is_not_observed_twice() -> None:
    # The failed attempt was observed as RETRIED when the retry was decided; its policy then
    # changed during the backoff and the job ended with that failure: no second observation.
    op, _ = _operator()
    runs = _run_times()
    waiting = started("PREPARING", startedAt=ts(NOW), retriedFailures=1, attempt=2)
    ended = {
        **waiting,
        "phase": "ERROR",
        "finishedAt": ts(NOW + timedelta(seconds=10)),
        "retriedFailures": 0,
        "attempt": 1,
    }
    op._after_write(KEY, job(status=waiting), _written(ended), [])
    assert _run_times() == runs


def _series(book: metrics.WaitBook) -> dict[tuple[str, str], float]:
    return {(m.name, s.labels["instance_type"]): s.value for m in book.collect() for s in m.samples}


def test_a_scrape_reads_the_wait_book_while_the_event_loop_changes_it() -> None:
    """prometheus_client scrapes in its own thread while reconciles update the book: a change in
    the middle of a scrape (here made deterministic: while the scrape works out a wait) must not
    fail the whole scrape ("dictionary changed size during iteration")."""
    book = metrics.WaitBook(clock=lambda: 100.0)

    class ChangesTheBook(float):
        def __rsub__(self, other: float) -> float:
            book._waits[("p", f"new-{len(book._waits)}")] = ("g2.1", 99.0)
            book._types.add("g2.1")
            return other - float(self)

    book._types.add("g1.1")
    book._waits[("p", "a")] = ("g1.1", ChangesTheBook(40.0))
    book._waits[("p", "b")] = ("g1.1", 70.0)
    assert _series(book) == {
        ("dsjobs_jobs_waiting", "g1.1"): 2,
        ("dsjobs_job_oldest_wait_seconds", "g1.1"): 60,
    }
    # A type whose first waiter came in between the two copies is told at the next scrape.
    assert _series(book)[("dsjobs_jobs_waiting", "g2.1")] >= 1


def test_jobs_waiting_for_a_node_or_admission_are_told_by_instance_type_with_the_longest_wait() -> None:
    # "Which jobs are queued behind GPUs, and for how long?": the queue histogram is observed only
    # when a job starts or ends, and a queue where nothing starts shows nothing there.
    from test_job_status import QUOTA, unschedulable

    from dsjobs.controller.plan import waiting_to_create

    book = metrics.WaitBook(clock=lambda: NOW.timestamp())
    assert _series(book) == {}  # nothing before the first waiter (a standby has no series)
    no_node = step(
        job(status=started(type_name="g1.1"), params={"cloudInstanceTypes": [{"name": "g1.1"}]}),
        [unschedulable(NOW - timedelta(seconds=10), type_name="g1.1")],
    )
    book.update(("p", "gpu-1"), no_node.status.to_cr())
    gpu_quota = (
        'pods "job-1-a1" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, '
        "used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4"
    )
    names, budget = ["g1.1", "c1.4"], timedelta(hours=1)

    def refused(since: timedelta) -> dict[str, Any]:
        pod_of_g1 = CreatePod(1, 0, "g1.1")
        w = waiting_to_create(job(), gpu_quota, NOW - since, pod_of_g1, names, budget, "g1.1")
        return w.status.to_cr()

    book.update(("p", "gpu-2"), refused(timedelta(minutes=5)))
    book.update(("p", "gpu-3"), refused(timedelta(0)))
    # A quota on the project's pod count is no type's: its job waits, but in no type's queue.
    book.update(("p", "cpu-1"), waiting_to_create(job(), QUOTA, NOW, instance_type="c1.4").status.to_cr())
    book.update(("p", "running"), started("EXECUTING"))
    assert _series(book) == {
        ("dsjobs_jobs_waiting", "g1.1"): 3,
        ("dsjobs_job_oldest_wait_seconds", "g1.1"): 300,
    }
    # Scheduled, deleted: the series stay, at 0.
    book.update(("p", "gpu-1"), started("EXECUTING", type_name="g1.1"))
    book.forget(("p", "gpu-2"))
    book.forget(("p", "gpu-3"))
    assert _series(book) == {
        ("dsjobs_jobs_waiting", "g1.1"): 0,
        ("dsjobs_job_oldest_wait_seconds", "g1.1"): 0,
    }


def test_the_registry_serves_the_operator_s_waits() -> None:
    from prometheus_client import REGISTRY, generate_latest

    op, _ = _operator()
    assert metrics.WAITS.book is op.waits
    op.waits.update(("p", "j"), {"phase": "PREPARING", "actualCloudInstanceType": "g2.8", "conditions": [
        {"type": "Scheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": ts(NOW)}
    ]})  # fmt: skip
    text = generate_latest(REGISTRY).decode()
    assert 'dsjobs_jobs_waiting{instance_type="g2.8"} 1.0' in text


@pytest.mark.parametrize("phase", [None, *JobPhase])
def test_only_jobs_no_pod_event_concerns_are_dropped_from_memory(phase: JobPhase | None) -> None:
    # Jobs waiting for execute and ended jobs without pods keep no body (memory at 10k jobs); the
    # others are needed by their pods' events and timers.
    op, _ = _operator()
    body = _written({} if phase is None else {"phase": phase.value})
    key = ("project-a", "job-1")
    op._jobs[key] = body
    op._seen[key] = 1.0
    op._evict(key, body, [])
    idle = phase is None or phase == JobPhase.CREATING or phase.is_final
    assert (key in op._jobs) is not idle
    # The pod creation latency's start is kept while the job may still get its first pod.
    assert (key in op._seen) is (not idle or phase == JobPhase.CREATING)
