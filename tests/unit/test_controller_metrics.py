"""The operator's job metrics: what `_after_write` observes for a job's writes, and what its Events
tell (dsjobs.controller.handlers, metrics, events)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from test_job_status import CREATED, NOW, SETTINGS, job, pod, started, step, ts

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


def _queue_time() -> tuple[float, float]:
    samples = {
        s.name: s.value for m in metrics.QUEUE_TIME.collect() for s in m.samples if "le" not in s.labels
    }
    return samples["dsjobs_job_queue_seconds_count"], samples["dsjobs_job_queue_seconds_sum"]


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
    first, second = NOW, NOW + timedelta(minutes=30)
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

    after_count, after_total = _queue_time()
    assert after_count - count == 1  # one job, one wait: attempt 1's run and backoff are no queue
    assert after_total - total == (first - CREATED).total_seconds()


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
