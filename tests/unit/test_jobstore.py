"""The operator's own reads of the object store (dsjobs.controller.jobstore) against a store that
accepts connections and never answers: they give up after STORE_CALL_TIMEOUT, tried once, so a
job's reconcile (and a cancel queued behind it) is not held for the client's minute per try."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from dsjobs.controller import jobstore
from dsjobs.controller.jobstore import JobStore, ResultUnavailable
from dsjobs.controller.plan import JobView
from dsjobs.controller.podview import PodView

NOW = datetime.now(UTC)
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`, failing after 30 s rather than hanging: a regression to the client's minute per
    try must fail the test, not wait for the store's reads (asyncio.run would join their threads)."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(2)
    loop.set_default_executor(executor)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 30))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        loop.close()


@pytest.fixture
def silent_store() -> Iterator[tuple[str, list[socket.socket]]]:
    """An endpoint that accepts connections and never answers (a hung store)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for conn in accepted:
        conn.close()


def _store(endpoint: str) -> JobStore:
    return JobStore(
        {
            "DSJOBS_S3_ENDPOINT": endpoint,
            "DSJOBS_S3_BUCKET": "b",
            "DSJOBS_S3_ACCESS_KEY": "AK",
            "DSJOBS_S3_SECRET_KEY": "SK",
        }
    )


def _staging_pod() -> PodView:
    started = (NOW - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return PodView.from_pod(
        {
            "metadata": {"name": "job-1-a1", "labels": {"dsjobs.dev/attempt": "1"}},
            "status": {
                "phase": "Pending",
                "initContainerStatuses": [{"name": "stage-in", "state": {"running": {"startedAt": started}}}],
            },
        }
    )


JOB = JobView.from_body(
    {
        "metadata": {"name": "job-1", "namespace": "ns", "uid": "u", "resourceVersion": "1"},
        "spec": {"projectId": "p1", "jobParameters": {"cmd": "true"}},
    }
)


def test_the_store_check_reports_a_hung_store_after_one_short_try(
    silent_store: tuple[str, list[socket.socket]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(jobstore, "STORE_CALL_TIMEOUT", 0.5)
    endpoint, accepted = silent_store
    with caplog.at_level(logging.WARNING, logger="dsjobs"):
        problem = _run(_store(endpoint).problem(_staging_pod(), NOW))
    assert problem is not None and "timed out" in problem.lower(), problem
    assert len(accepted) == 1  # one try
    assert f"the object store {endpoint} (bucket " in caplog.text  # which store, as at start-up
    # The platform team sees it too, not only the waiting job's details.

    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("dsjobs_object_store_up") == 0


def test_a_result_json_read_from_a_hung_store_gives_up_after_a_few_short_tries(
    silent_store: tuple[str, list[socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A few tries, not one: a pod gone before the operator saw it end has nothing else to tell its
    # outputs and return code, and one slow answer must not lose them.
    monkeypatch.setattr(jobstore, "RESULT_READ_TIMEOUT", 0.3)
    endpoint, accepted = silent_store
    store = _store(endpoint)
    # The ship ended a moment ago: the reconcile is retried (with backoff) for RESULT_PATIENCE.
    with pytest.raises(ResultUnavailable):
        _run(store.stored_result(JOB, 1, NOW))
    assert len(accepted) == jobstore.RESULT_READ_ATTEMPTS
    # A pod gone without a known end: nothing to wait for.
    assert _run(store.stored_result(JOB, 1, None)) is None
    assert len(accepted) == 2 * jobstore.RESULT_READ_ATTEMPTS


def test_result_json_patience_counts_on_the_operator_s_clock_not_the_node_s(
    silent_store: tuple[str, list[socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ship's end is the node's clock: a node 20 minutes behind once left no patience at all,
    # and a blip of the store lost every output the result.json recorded.
    monkeypatch.setattr(jobstore, "RESULT_READ_TIMEOUT", 0.2)
    monkeypatch.setattr(jobstore, "RESULT_READ_ATTEMPTS", 1)
    endpoint, _accepted = silent_store
    store = _store(endpoint)
    clock = [1000.0]
    store.clock = lambda: clock[0]
    node_behind = NOW - timedelta(minutes=20)
    with pytest.raises(ResultUnavailable):
        _run(store.stored_result(JOB, 1, node_behind))
    clock[0] += jobstore.RESULT_PATIENCE.total_seconds() - 1
    with pytest.raises(ResultUnavailable):
        _run(store.stored_result(JOB, 1, node_behind))
    clock[0] += 1
    assert _run(store.stored_result(JOB, 1, node_behind)) is None
    # Another attempt waits from its own first failure.
    with pytest.raises(ResultUnavailable):
        _run(store.stored_result(JOB, 2, node_behind))


class _Prefixes:
    """Stands in for the store's client: a prefix holding keys, and the deletions asked for."""

    def __init__(self, keys: tuple[str, ...] = ("logs/chunks/000000000000",)) -> None:
        self.keys = keys
        self.deleted: list[str] = []
        self.checked = threading.Event()

    def first_keys(self, prefix: str) -> list[str]:
        self.checked.set()
        return [f"{prefix}{k}" for k in self.keys][:1]

    def exists(self, key: str) -> bool:
        return any(key.endswith("/" + k) for k in self.keys)

    def delete_prefix(self, prefix: str) -> int:
        self.deleted.append(prefix)
        return 1


@pytest.mark.parametrize("made_here", [True, False])
def test_leftovers_are_deleted_only_by_the_maker_of_the_attempt_s_runner_secret(made_here: bool) -> None:
    # A replica stalled past its lease resumed its first pod's creation after another had made the
    # pod: its runner's logs under the prefix were taken for an earlier job's leftovers and deleted.
    # The Secret was there before (409): someone else got this far first; nothing is deleted.
    store = _store("http://127.0.0.1:9")
    stub = _Prefixes()
    store.client = lambda: stub  # type: ignore[method-assign,assignment,return-value]
    store._client_with = lambda timeout, attempts: stub  # type: ignore[method-assign,assignment,return-value]

    async def scenario() -> None:
        first: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        clearing = asyncio.ensure_future(store.clear_leftovers(JOB, "p1", first))
        assert await asyncio.to_thread(stub.checked.wait, 10)  # a hang guard
        await asyncio.sleep(0)
        assert stub.deleted == []  # the check ran; the deletion waits for the Secret's answer
        first.set_result(made_here)
        await clearing

    _run(scenario())
    assert stub.deleted == (["projects/p1/jobs/job-1/"] if made_here else [])


@pytest.mark.parametrize(
    ("keys", "hold", "held"),
    [
        (("logs/chunks/000000000000", "result.json"), True, True),  # a run's result: kept
        (("logs/chunks/000000000000",), True, False),  # logs of a pod that never ended: cleared
        (("logs/chunks/000000000000", "result.json"), False, False),  # not a new job: cleared
        ((), True, False),  # nothing there
    ],
)
def test_a_stored_run_is_kept_for_a_job_that_may_be_its_restored_projectjob(
    keys: tuple[str, ...], hold: bool, held: bool
) -> None:
    # A ProjectJob restored from a backup is created without its status: the run its status
    # names is under its prefix, with the result.json every run ends with.
    store = _store("http://127.0.0.1:9")
    stub = _Prefixes(keys)
    store.client = lambda: stub  # type: ignore[method-assign,assignment,return-value]
    store._client_with = lambda timeout, attempts: stub  # type: ignore[method-assign,assignment,return-value]

    async def scenario() -> bool:
        first: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        first.set_result(True)
        return await store.clear_leftovers(JOB, "p1", first, hold_for_restore=hold)

    assert _run(scenario()) is held
    cleared = bool(keys) and not held
    assert stub.deleted == (["projects/p1/jobs/job-1/"] if cleared else [])
