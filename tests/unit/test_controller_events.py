"""Events about ProjectJobs: the body (pure) and the poster's order, retries and quiet drops."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kopf._cogs.clients import errors as kopf_errors

from dsjobs.controller import metrics
from dsjobs.controller.events import MAX_PENDING, EventPoster, clip_message, event_body, namespace_terminating
from dsjobs.controller.status import JobEvent

JOB = {
    "apiVersion": "dsjobs.dev/v1alpha1",
    "kind": "ProjectJob",
    "metadata": {"name": "j1", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7"},
    "spec": {"projectId": "team-a"},
}
T0 = datetime(2026, 11, 29, 12, 0, 1, 250000, tzinfo=UTC)


def test_an_event_names_the_replica_that_reported_it() -> None:
    body = event_body(JOB, JobEvent("Normal", "R", "m"), component="ops", now=T0, instance="ops-7d9f-x2")
    assert (body["reportingComponent"], body["reportingInstance"]) == ("ops", "ops-7d9f-x2")


def test_event_body() -> None:
    body = event_body(JOB, JobEvent("Normal", "Executing", "PREPARING -> EXECUTING"), component="ops", now=T0)
    assert body == {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"j1.{1795953601250000000:x}", "namespace": "team-a"},
        "involvedObject": {
            "apiVersion": "dsjobs.dev/v1alpha1",
            "kind": "ProjectJob",
            "name": "j1",
            "namespace": "team-a",
            "uid": "u-1",
        },
        "type": "Normal",
        "reason": "Executing",
        "message": "PREPARING -> EXECUTING",
        "source": {"component": "ops"},
        "reportingComponent": "ops",
        "reportingInstance": "ops",
        "action": "Executing",
        "firstTimestamp": "2026-11-29T12:00:01Z",
        "lastTimestamp": "2026-11-29T12:00:01Z",
        "count": 1,
        "eventTime": "2026-11-29T12:00:01.250000Z",
    }


def test_names_sort_in_the_order_of_time() -> None:
    # Fixed-width hex of nanoseconds: the list order (by name) is the order of events.
    names = [
        event_body(JOB, JobEvent("Normal", "R", "m"), component="c", now=T0 + timedelta(microseconds=us))[
            "metadata"
        ]["name"]
        for us in (0, 1, 999_999, 10**7)
    ]
    assert names == sorted(names) and len(set(names)) == 4


def test_clip_message_keeps_head_and_tail() -> None:
    assert clip_message("x" * 1024) == "x" * 1024
    clipped = clip_message("a" * 600 + "b" * 600)
    assert len(clipped) == 1024 and clipped.startswith("a" * 510) and clipped.endswith("b" * 511)
    assert "..." in clipped


def _forbidden(message: str) -> kopf_errors.APIForbiddenError:
    payload: Any = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": message}
    return kopf_errors.APIForbiddenError(payload, status=403, headers={})


def test_namespace_terminating() -> None:
    terminating = (
        'events "j1.1" is forbidden: unable to create new content in namespace team-a because it is '
        "being terminated"
    )
    assert namespace_terminating(_forbidden(terminating))
    assert not namespace_terminating(_forbidden('events is forbidden: User "x" cannot create'))


class RecordingKube:
    """Stands in for Kube.create_event: records what reaches it, raising the scripted errors first."""

    def __init__(self, failures: dict[str, list[BaseException]]) -> None:
        self.failures = failures
        self.posted: list[str] = []
        self.attempts: list[str] = []

    async def create_event(self, path: str, body: dict[str, Any]) -> None:
        reason = body["reason"]
        self.attempts.append(reason)
        pending = self.failures.get(reason) or []
        if pending:
            raise pending.pop(0)
        self.posted.append(reason)


def _server_error() -> kopf_errors.APIServerError:
    return kopf_errors.APIServerError({"message": "etcd leader changed"}, status=500, headers={})  # type: ignore[typeddict-item]


def _dropped(why: str) -> float:
    return metrics.EVENTS_DROPPED.labels(why=why)._value.get()


def test_poster_keeps_order_retries_server_errors_and_drops_refusals_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    terminating = _forbidden(
        "unable to create new content in namespace team-a because it is being terminated"
    )
    kube = RecordingKube(
        {
            "Retried": [_server_error(), TimeoutError()],
            "Terminating": [terminating],
            "Refused": [_forbidden('events is forbidden: User "x" cannot create')],
            "Lost": [_server_error()] * 3,
            "Twice": [
                kopf_errors.APIConflictError({"message": "already exists"}, status=409, headers={})  # type: ignore[typeddict-item]
            ],
        }
    )
    reasons = ["First", "Retried", "Terminating", "Refused", "Lost", "Twice", "Last"]
    clock = iter([T0] * len(reasons))  # one clock value for all: names must still differ

    async def no_sleep(_: float) -> None:
        return None

    async def run() -> list[str]:
        poster = EventPoster(
            kube,  # type: ignore[arg-type]
            "ops",
            clock=lambda: next(clock),
            sleep=no_sleep,
            retry_delays=(0.1, 0.1),
        )
        names = [poster.post(JOB, JobEvent("Normal", reason, "m")) for reason in reasons]
        await poster.drain(timeout=5)
        return names

    before = {why: _dropped(why) for why in metrics.EVENT_DROPS}
    with caplog.at_level("DEBUG", logger="dsjobs.controller.events"):
        names = asyncio.run(run())
    assert names == sorted(names) and len(set(names)) == len(names)
    assert kube.posted == ["First", "Retried", "Last"]  # Twice: the 409 means an earlier try landed
    # Dropped as counted (the namespace going away is no loss); none left pending.
    assert {why: _dropped(why) - before[why] for why in metrics.EVENT_DROPS} == {
        "queue_full": 0,
        "refused": 1,
        "failed": 1,
    }
    assert metrics.EVENTS_PENDING._value.get() == 0
    assert kube.attempts.count("Retried") == 3 and kube.attempts.count("Lost") == 3
    assert kube.attempts.count("Terminating") == 1 and kube.attempts.count("Refused") == 1
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2, warned
    assert "Refused" in warned[0] and "403" in warned[0]
    assert "Lost" in warned[1] and "500" in warned[1]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_kube_create_event_quiets_kopf_s_attempt_log() -> None:
    # Kopf's request loop logs each failed attempt at ERROR through the logger it is given.
    from dsjobs.controller import kube as kube_module

    adapter = kube_module._DEBUG_ONLY
    records: list[int] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.levelno)

    handler = Catch(level=logging.DEBUG)
    base = logging.getLogger("dsjobs.controller.kube")
    base.addHandler(handler)
    old = base.level
    base.setLevel(logging.DEBUG)
    try:
        adapter.error("Request attempt #1/1 failed; escalating")
    finally:
        base.removeHandler(handler)
        base.setLevel(old)
    assert records == [logging.DEBUG]


@pytest.mark.parametrize(
    ("message", "level"),
    [
        (
            "Request attempt #1/9 failed; will retry: GET https://x/watch -> APITooManyRequestsError(...)",
            "WARNING",
        ),
        ("Request attempt 2 failed; will retry: GET https://x -> ClientConnectorError(...)", "WARNING"),
        ("Request attempt #3/9 failed; TCP closed; will re-authenticate: GET https://x", "WARNING"),
        ("Request attempt #9/9 failed; escalating: GET https://x -> ClientConnectorError(...)", "ERROR"),
        ("Handler 'job_event' failed with an exception. Will ignore.", "ERROR"),
    ],
)
def test_an_attempt_kopf_retries_is_logged_as_a_warning(message: str, level: str) -> None:
    from dsjobs.controller.kube import RetriedAttemptsAreWarnings

    record = logging.LogRecord("kopf._cogs.clients.watching", logging.ERROR, __file__, 1, message, (), None)
    assert RetriedAttemptsAreWarnings().filter(record)
    assert record.levelname == level and record.levelno == logging.getLevelName(level)


def _quota(used: str, quota: str = "q") -> str:
    return (
        f'pods "job-1-a1" is forbidden: exceeded quota: {quota}, requested: cpu=4,memory=1Gi, '
        f"used: cpu={used},memory=512Mi, limited: cpu=8,memory=8Gi"
    )


def test_a_quota_refusal_is_one_failedcreate_event_whatever_the_usage_does() -> None:
    # Other jobs' pods come and go between the retries: the quota's usage in the message changes
    # (~60 times an hour), the refusal does not.
    from test_job_status import NOW, job, started

    from dsjobs.controller.plan import waiting_to_create

    status = started("PREPARING", attempt=0, podName="")
    told: list[str] = []
    for why in (_quota("8"), _quota("6"), _quota("7500m"), _quota("6")):
        update = waiting_to_create(job(status=status), why, NOW)
        told += [e.message for e in update.events if e.reason == "FailedCreate"]
        status = update.status.to_cr()
        # The details show the latest usage.
        assert update.status.status_details == f"waiting to create the job's pod: {why}"
    assert told == [_quota("8")]  # the first, with its numbers
    # Another quota, or another reason, is a new refusal.
    for why in (_quota("6", quota="gpus"), 'pods "job-1-a1" is forbidden: violates PodSecurity "baseline"'):
        update = waiting_to_create(job(status=status), why, NOW)
        assert [e.message for e in update.events if e.reason == "FailedCreate"] == [why]
        status = update.status.to_cr()


def _throttled(headers: dict[str, str] | None = None, retry_after: int | None = None) -> kopf_errors.APIError:
    payload: Any = {
        "kind": "Status",
        "code": 429,
        "reason": "TooManyRequests",
        "message": "too many requests",
    }
    if retry_after is not None:
        payload["details"] = {"retryAfterSeconds": retry_after}
    return kopf_errors.APITooManyRequestsError(payload, status=429, headers=headers or {})


def test_a_throttled_event_is_retried_after_the_server_s_retry_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A 429 (API priority and fairness shedding load, e.g. while 1000 jobs start) is a "later",
    # not a refusal: the Event was dropped after one try. It is tried again, no sooner than the
    # server asks (header or Status detail) and no later than the poster's own backoff.
    kube = RecordingKube(
        {
            "Header": [_throttled({"Retry-After": "3"})],
            "Detail": [_throttled(retry_after=7)],
            "Plain": [_throttled()],
            "Huge": [_throttled({"retry-after": "86400"})],
            "Always": [_throttled({"Retry-After": "1"})] * 3,
        }
    )
    slept: list[float] = []

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> None:
        poster = EventPoster(kube, "ops", sleep=record_sleep, retry_delays=(0.5, 2.0))  # type: ignore[arg-type]
        for reason in ("Header", "Detail", "Plain", "Huge", "Always"):
            poster.post(JOB, JobEvent("Warning", reason, "m"))
        await poster.drain(timeout=5)

    with caplog.at_level("DEBUG", logger="dsjobs.controller.events"):
        asyncio.run(run())
    assert kube.posted == ["Header", "Detail", "Plain", "Huge"]
    assert kube.attempts.count("Always") == 3  # then dropped, as a 5xx would be
    assert slept == [3.0, 7.0, 0.5, 60.0, 1.0, 2.0]  # a Retry-After of a day waits at most a minute
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "Always" in warned[0] and "429" in warned[0]


def test_queued_events_are_posted_from_another_thread_within_a_bound() -> None:
    # The lease watchdog (a thread) ends the process on a lost leadership: the Events queued on
    # Kopf's loop get a bounded moment first, whatever that loop does.
    import threading

    kube = RecordingKube({})
    release = threading.Event()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:

        async def queue(poster: EventPoster, *reasons: str) -> None:
            for reason in reasons:
                poster.post(JOB, JobEvent("Normal", reason, "m"))

        poster = EventPoster(kube, "ops")  # type: ignore[arg-type]
        asyncio.run_coroutine_threadsafe(queue(poster, "Cancelled", "Finalized"), loop).result(5)
        assert poster.drain_from_thread(1.0)
        assert kube.posted == ["Cancelled", "Finalized"]

        # A loop that is stuck (a handler blocking it) cannot post: the wait still ends.
        other = EventPoster(kube, "ops")  # type: ignore[arg-type]
        asyncio.run_coroutine_threadsafe(queue(other, "Lost"), loop).result(5)
        loop.call_soon_threadsafe(release.wait, 60)
        drained: list[bool] = []
        waiter = threading.Thread(target=lambda: drained.append(other.drain_from_thread(0.3)))
        waiter.start()
        waiter.join(30)  # a hang guard only: the loop stays blocked until `release`
        assert drained == [False]  # it gave up while the loop was blocked
        release.set()
        assert other.drain_from_thread(1.0) and kube.posted[-1] == "Lost"
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    # Nothing ever queued: nothing to wait for.
    assert EventPoster(kube, "ops").drain_from_thread(0.1)  # type: ignore[arg-type]


def test_events_beyond_the_queue_are_counted_as_dropped(caplog: pytest.LogCaptureFixture) -> None:
    kube = RecordingKube({})
    before = _dropped("queue_full")

    async def run() -> None:
        poster = EventPoster(kube, "ops")  # type: ignore[arg-type]
        # Queued without a pause: the poster runs only once this coroutine waits.
        for i in range(MAX_PENDING + 2):
            poster.post(JOB, JobEvent("Normal", f"R{i}", "m"))
        assert metrics.EVENTS_PENDING._value.get() == MAX_PENDING
        await poster.drain(timeout=30)

    with caplog.at_level("WARNING", logger="dsjobs.controller.events"):
        asyncio.run(run())
    assert _dropped("queue_full") - before == 2
    assert len(kube.posted) == MAX_PENDING and metrics.EVENTS_PENDING._value.get() == 0
