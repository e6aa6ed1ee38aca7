"""Following a job's logs: when the stream ends, offsets, draining (fake store and job, no cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest

from dsjobs import logrecords
from dsjobs.api import errors, servicer
from dsjobs.api.auth import Identity, Verb
from dsjobs.api.cluster import JobIndex
from dsjobs.api.core import Core
from dsjobs.api.errors import ApiError
from dsjobs.api.kube import Kube
from dsjobs.api.operations import JobSnapshot
from dsjobs.api.servicer import ProjectJobService, follow_logs
from dsjobs.api.settings import Settings, SettingsError
from dsjobs.api.settings import from_args as settings_from_args
from dsjobs.api.streams import LogBudget, StreamSlots
from dsjobs.logrecords import FinalMarker, LogChunk, LogRecord, Stream
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.storage import ObjectInfo

PROJECT, JOB = "p1", "j1"


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "", if_none_match: bool = False
    ) -> None:
        self.objects[key] = data

    def get_bytes(self, key: str) -> bytes | None:
        return self.objects.get(key)

    def head(self, key: str) -> ObjectInfo | None:
        data = self.objects.get(key)
        return None if data is None else ObjectInfo(key, len(data), "")

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def job_object(phase: str | None, uid: str = "u1", version: int = 1) -> dict[str, Any]:
    return {
        "metadata": {
            "name": JOB,
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": str(version),
            "creationTimestamp": "2025-01-01T00:00:00Z",
        },
        "spec": {"projectId": PROJECT, "jobParameters": {"cmd": "x"}, "execute": True},
        "status": {"phase": phase} if phase else {},
    }


def snapshot(phase: str | None, uid: str = "u1") -> JobSnapshot:
    return JobSnapshot.from_cr(job_object(phase, uid))


class FakeCore:
    def __init__(self, job: JobSnapshot | None) -> None:
        self.settings = Settings(log_poll_interval=0.01, max_response_bytes=64 * 1024)
        self.store = MemoryStore()
        self.draining = asyncio.Event()
        self.job = job
        # The real index (its watch is not started: tests feed it what a watch would deliver).
        self.jobs = JobIndex(cast(Kube, None))
        self.log_budget = LogBudget(8)

    async def io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    log_io = io

    async def read_job(self, namespace: str, job_id: str, *, fresh: bool = False) -> JobSnapshot | None:
        return self.job


def count_gets(core: FakeCore) -> list[str]:
    """The keys of the store's GETs from now on, as they happen."""
    gets: list[str] = []
    read = core.store.get_bytes

    def counting(key: str) -> bytes | None:
        gets.append(key)
        return read(key)

    core.store.get_bytes = counting  # type: ignore[method-assign]
    return gets


def write(core: FakeCore, seq: int, *texts: str) -> None:
    records = tuple(LogRecord(Stream.OUT, t.encode(), time.time_ns()) for t in texts)
    logrecords.write_chunk(core.store, PROJECT, JOB, LogChunk(seq, records))


async def collect(
    core: FakeCore, job: JobSnapshot, offset: int = 0, limit: float = 10
) -> list[tuple[list[bytes], int]]:
    out: list[tuple[list[bytes], int]] = []

    async def run() -> None:
        async for records, next_offset in follow_logs(cast(Core, core), job, offset, None):
            out.append(([r.content for r in records], next_offset))

    await asyncio.wait_for(run(), limit)
    return out


def test_finished_job_streams_everything_then_ends() -> None:
    core = FakeCore(snapshot("SUCCESS"))
    write(core, 0, "a\n", "b\n")
    write(core, 1, "c\n")
    logrecords.write_final(core.store, PROJECT, JOB, FinalMarker(2))
    got = asyncio.run(collect(core, snapshot("SUCCESS")))
    assert [c for batch, _ in got for c in batch] == [b"a\n", b"b\n", b"c\n"]
    assert got[-1][1] == logrecords.make_offset(2, 0)


def test_follows_a_running_job_until_it_ends() -> None:
    core = FakeCore(snapshot("EXECUTING"))
    write(core, 0, "first\n")

    async def scenario() -> list[tuple[list[bytes], int]]:
        async def job_runs() -> None:
            await asyncio.sleep(0.1)
            write(core, 1, "second\n")
            await asyncio.sleep(0.1)
            logrecords.write_final(core.store, PROJECT, JOB, FinalMarker(2))
            core.job = snapshot("SUCCESS")

        runner = asyncio.create_task(job_runs())
        got = await collect(core, snapshot("EXECUTING"))
        await runner
        return got

    got = asyncio.run(scenario())
    assert [c for batch, _ in got for c in batch] == [b"first\n", b"second\n"]


def test_a_stream_reads_the_final_marker_only_once_the_job_has_ended() -> None:
    # Every idle poll of a running job's stream read final.json too: two GETs instead of one.
    core = FakeCore(snapshot("EXECUTING"))
    gets = count_gets(core)
    write(core, 0, "first\n")
    final = logrecords.final_key(PROJECT, JOB)

    async def scenario() -> list[tuple[list[bytes], int]]:
        async def job_runs() -> None:
            await asyncio.sleep(0.3)  # ~30 idle polls
            assert final not in gets
            logrecords.write_final(core.store, PROJECT, JOB, FinalMarker(1))
            core.job = snapshot("SUCCESS")
            core.jobs.remember(job_object("SUCCESS", version=2))  # the watch tells: wakes the stream

        runner = asyncio.create_task(job_runs())
        got = await collect(core, snapshot("EXECUTING"))
        await runner
        return got

    got = asyncio.run(scenario())
    assert [c for batch, _ in got for c in batch] == [b"first\n"]
    assert gets.count(final) >= 1


def test_a_job_that_ended_without_a_final_marker_still_ends_the_stream() -> None:
    core = FakeCore(snapshot("ERROR"))
    write(core, 0, "partial\n")
    got = asyncio.run(collect(core, snapshot("EXECUTING")))  # the stream saw it running at first
    assert [c for batch, _ in got for c in batch] == [b"partial\n"]


def test_resuming_from_an_offset_repeats_nothing() -> None:
    core = FakeCore(snapshot("SUCCESS"))
    write(core, 0, "a\n", "b\n", "c\n")
    logrecords.write_final(core.store, PROJECT, JOB, FinalMarker(1))
    got = asyncio.run(collect(core, snapshot("SUCCESS"), offset=logrecords.make_offset(0, 2)))
    assert [c for batch, _ in got for c in batch] == [b"c\n"]


def test_from_now_answers_the_current_offset_first() -> None:
    core = FakeCore(snapshot("SUCCESS"))
    write(core, 0, "old\n")
    logrecords.write_final(core.store, PROJECT, JOB, FinalMarker(1))
    got = asyncio.run(collect(core, snapshot("SUCCESS"), offset=-1))
    assert got == [([], logrecords.make_offset(1, 0))]


def test_draining_ends_the_stream_with_unavailable_and_the_offset() -> None:
    core = FakeCore(snapshot("EXECUTING"))
    write(core, 0, "a\n")
    core.draining.set()
    with pytest.raises(ApiError) as exc:
        asyncio.run(collect(core, snapshot("EXECUTING"), offset=logrecords.make_offset(1, 0)))
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE and exc.value.expected
    assert f"offset {logrecords.make_offset(1, 0)}" in exc.value.message


def test_a_deleted_job_ends_the_stream_with_not_found() -> None:
    core = FakeCore(None)
    with pytest.raises(ApiError) as exc:
        asyncio.run(collect(core, snapshot("EXECUTING")))
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_negative_offsets_other_than_minus_one_are_rejected() -> None:
    with pytest.raises(ApiError) as exc:
        asyncio.run(collect(FakeCore(snapshot("SUCCESS")), snapshot("SUCCESS"), offset=-2))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_change_of_the_job_wakes_an_idle_stream_at_once() -> None:
    """The last records are read when the job ends, not a poll interval later (the CLI stops then)."""
    core = FakeCore(snapshot("EXECUTING"))
    core.settings = Settings(log_poll_interval=60.0, max_response_bytes=64 * 1024)
    write(core, 0, "first\n")

    async def scenario() -> list[tuple[list[bytes], int]]:
        async def job_ends() -> None:
            await asyncio.sleep(0.2)  # the stream has read "first" and waits for up to 60 s
            write(core, 1, "last\n")
            logrecords.write_final(core.store, PROJECT, JOB, FinalMarker(2))
            core.job = snapshot("SUCCESS")
            core.jobs.remember(job_object("SUCCESS", version=2))  # what the job watch delivers

        ender = asyncio.create_task(job_ends())
        got = await collect(core, snapshot("EXECUTING"), limit=20)
        await ender
        return got

    got = asyncio.run(scenario())
    assert [c for batch, _ in got for c in batch] == [b"first\n", b"last\n"]


def test_a_stream_of_a_job_waiting_for_a_node_reads_the_store_only_now_and_then() -> None:
    # 300 queued jobs with the CLI following each: ~1 GET a second per stream while no record
    # could come (only the pod's ship stores them). The job's change (its pod placed) wakes it.
    core = FakeCore(snapshot("PREPARING"))
    gets = count_gets(core)
    placed = job_object("PREPARING", version=2)
    placed["status"]["conditions"] = [
        {"type": "Scheduled", "status": "True", "reason": "Scheduled", "message": "on node gpu-0"}
    ]
    assert not snapshot("PREPARING").logs_may_flow and JobSnapshot.from_cr(placed).logs_may_flow
    assert snapshot("EXECUTING").logs_may_flow and snapshot("CANCELLING").logs_may_flow

    async def scenario() -> tuple[list[tuple[list[bytes], int]], int]:
        seen_waiting = 0

        async def job_runs() -> None:
            nonlocal seen_waiting
            await asyncio.sleep(0.5)  # 50 poll intervals of 10 ms
            seen_waiting = len(gets)
            core.job = JobSnapshot.from_cr(placed)
            core.jobs.remember(placed)
            write(core, 0, "staged\n")
            await asyncio.sleep(0.2)
            logrecords.write_final(core.store, PROJECT, JOB, FinalMarker(1))
            core.job = snapshot("SUCCESS")
            core.jobs.remember(job_object("SUCCESS", version=3))

        runner = asyncio.create_task(job_runs())
        got = await collect(core, snapshot("PREPARING"), limit=5)
        await runner
        return got, seen_waiting

    got, seen_waiting = asyncio.run(scenario())
    assert [c for batch, _ in got for c in batch] == [b"staged\n"]
    assert seen_waiting <= 2, seen_waiting


def test_job_index_change_events() -> None:
    async def scenario() -> None:
        index = JobIndex(cast(Kube, None))
        index.remember(job_object("EXECUTING", version=5))
        changed = index.next_change("ns", JOB)
        assert index.next_change("ns", JOB) is changed  # streams of one job share it
        index.remember(job_object("EXECUTING", version=5))  # the same version again: no change
        index.remember(job_object("EXECUTING", version=4))  # an older one: no change
        assert not changed.is_set()
        index.remember(job_object("SUCCESS", version=6))
        assert changed.is_set()
        again = index.next_change("ns", JOB)
        assert again is not changed and not again.is_set()
        index.forget(JOB, "ns")
        assert again.is_set()
        index.next_change("ns", "other")
        assert len(index._changes) == 0  # nobody holds it: no entry stays behind

    asyncio.run(scenario())


def test_a_read_older_than_the_deletion_does_not_bring_a_job_back() -> None:
    async def scenario() -> None:
        index = JobIndex(cast(Kube, None))
        index.synced.set()
        index.remember(job_object("EXECUTING", version=5))
        index.forget(JOB, "ns", deleted_version=7)  # the watch's DELETED event
        index.remember(job_object("EXECUTING", version=6))  # a GET answered after it
        assert index.cached("ns", JOB) is None
        index.remember(job_object("CREATING", version=9))  # a new job of the same name
        cached = index.cached("ns", JOB)
        assert cached is not None and cached["metadata"]["resourceVersion"] == "9"

    asyncio.run(scenario())


def test_a_stream_ends_once_its_caller_may_no_longer_read_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stream may follow a job for days: a RoleBinding removed, a token expired, must end it,
    # also while records keep coming (a busy stream never idles into the job re-check).
    monkeypatch.setattr(servicer, "JOB_RECHECK_SECONDS", 0.0)
    core = FakeCore(snapshot("EXECUTING"))
    allowed = {"yes": True, "asked": 0}

    async def still_allowed() -> None:
        allowed["asked"] += 1
        if not allowed["yes"]:
            raise errors.permission_denied("may not get jobs of project 'p1'")

    async def scenario() -> int:
        got = 0
        write(core, 0, "line 0\n")
        with pytest.raises(ApiError) as caught:
            async for records, _ in follow_logs(cast(Core, core), core.job, 0, None, still_allowed):  # type: ignore[arg-type]
                got += len(records)
                allowed["yes"] = False  # revoked after the first batch, while the job writes on
                write(core, got, f"line {got}\n")
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        return got

    assert asyncio.run(scenario()) == 1


# --- how many streams a replica follows -----------------------------------------------------------


class StreamingCore(FakeCore):
    """What ReadLogs needs besides follow_logs': the caller and the job."""

    def __init__(self, job: JobSnapshot, slots: StreamSlots) -> None:
        super().__init__(job)
        self.streams = slots

    async def authorized_job(self, context: Any, job_id: str, verb: Verb) -> tuple[Identity, JobSnapshot]:
        assert self.job is not None
        return Identity(context), self.job


def test_log_streams_have_a_limit_of_their_own_and_per_caller() -> None:
    """Open streams counted only against DSJOBS_API_MAX_CONCURRENT_RPCS could fill it, and then
    every other call (Create, OperationService.Get, the readiness check) was refused."""
    core = StreamingCore(snapshot("EXECUTING"), StreamSlots(total=3, per_caller=2))
    service = ProjectJobService(cast(Core, core))
    write(core, 0, "line\n")

    async def scenario() -> list[str]:
        async def follow(user: str) -> None:
            request = svc.ReadProjectJobLogsRequest(job_id=JOB, offset=0)
            async for _ in service.ReadLogs(request, cast(Any, user)):
                pass

        held = [asyncio.create_task(follow(u)) for u in ("alice", "alice", "bob")]
        await asyncio.sleep(0.1)  # all three follow the running job
        refused = []
        for user in ("alice", "carol"):
            try:
                await follow(user)
            except ApiError as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused.append(exc.message)
        assert core.streams.open == 3
        held[0].cancel()  # one of alice's ends: its slot is free again
        await asyncio.sleep(0.05)
        assert core.streams.open == 2
        late = asyncio.create_task(follow("carol"))
        await asyncio.sleep(0.05)
        assert core.streams.open == 3 and not late.done()
        for task in [*held, late]:
            task.cancel()
        await asyncio.gather(*held, late, return_exceptions=True)
        assert core.streams.open == 0
        return refused

    refused = asyncio.run(scenario())
    assert refused == [
        "alice follows 2 log streams on this server, the most one caller may; reconnect later with offset 0",
        "this server follows 3 log streams, its most; reconnect later with offset 0",
    ]


@pytest.mark.parametrize(
    ("rpcs", "streams", "expected"),
    [
        ("", "", 500),
        ("1000", "", 500),
        ("400", "", 320),
        ("0", "", 500),
        ("1000", "0", 0),
        ("1000", "999", 999),
    ],
)
def test_log_streams_leave_room_for_other_calls(rpcs: str, streams: str, expected: int) -> None:
    env = {
        k: v
        for k, v in (("DSJOBS_API_MAX_CONCURRENT_RPCS", rpcs), ("DSJOBS_API_MAX_LOG_STREAMS", streams))
        if v
    }
    assert settings_from_args([], environ=env).max_log_streams == expected


@pytest.mark.parametrize("streams", ["5000", "6000"])
def test_log_streams_may_not_take_all_calls(streams: str) -> None:
    with pytest.raises(
        SettingsError, match="DSJOBS_API_MAX_LOG_STREAMS: must be below DSJOBS_API_MAX_CONCURRENT_RPCS"
    ):
        settings_from_args([], environ={"DSJOBS_API_MAX_LOG_STREAMS": streams})


def test_the_log_budget_bounds_what_streams_hold_in_all_and_per_caller() -> None:
    # 200 streams of one user that never read held ~5 MB each (records, message, bytes, gRPC's
    # copy) past a replica's memory limit: a batch holds a permit until its client takes it.
    async def scenario() -> None:
        budget = LogBudget(8)
        assert (budget.permits, budget.per_caller) == (8, 2)
        held: list[str] = []
        release = asyncio.Event()

        async def stream(caller: str) -> None:
            async with budget.hold(caller, 0, asyncio.Event()):
                held.append(caller)
                await release.wait()

        tasks = [asyncio.ensure_future(stream("mallory")) for _ in range(5)]
        tasks += [asyncio.ensure_future(stream(f"user{i}")) for i in range(7)]
        await asyncio.sleep(0.05)
        # One caller's stalled streams take a quarter; the others get theirs, up to the total.
        assert held.count("mallory") == 2 and len(held) == 8
        release.set()
        await asyncio.gather(*tasks)
        assert len(held) == 12 and not budget._callers

    asyncio.run(scenario())


def test_a_stream_holds_its_permit_until_its_batch_is_taken() -> None:
    async def scenario() -> None:
        core = FakeCore(snapshot("EXECUTING"))
        core.log_budget = LogBudget(1)
        write(core, 0, "a", "b")
        job = snapshot("EXECUTING")
        first = follow_logs(cast(Core, core), job, 0, None, caller="u")
        second = follow_logs(cast(Core, core), job, 0, None, caller="u")
        assert [r.content for r in (await anext(first))[0]] == [b"a", b"b"]  # not yet taken on
        waiting = asyncio.ensure_future(anext(second))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the one permit is the first stream's while its batch is out
        await first.aclose()  # its client went: the permit is free
        assert [r.content for r in (await asyncio.wait_for(waiting, 5))[0]] == [b"a", b"b"]
        await second.aclose()

    asyncio.run(scenario())


def test_a_stream_waiting_for_a_permit_is_told_to_come_back_and_ends_at_a_drain() -> None:
    # Streams whose clients do not read keep their permits: one waiting must neither hang
    # silently (RESOURCE_EXHAUSTED after its patience: the CLI reconnects with its offset) nor
    # outlast a drain (UNAVAILABLE at once, as a stream that reads is told).
    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        budget = LogBudget(1, patience=0.05)
        stop = asyncio.Event()
        told: list[tuple[grpc.StatusCode, str]] = []
        async with budget.hold("stalled", 7, stop):
            for drain in (False, True):
                if drain:
                    budget.patience = 3600.0  # the drain ends it, not the patience
                    asyncio.get_running_loop().call_soon(stop.set)
                try:
                    async with budget.hold("other", 42, stop):
                        raise AssertionError("the one permit is the stalled stream's")
                except ApiError as exc:
                    told.append((exc.code, exc.message))
        assert not budget._callers  # nothing is left of the streams that went
        # The permits are all back: a new stream gets one at once.
        async with budget.hold("later", 0, asyncio.Event()):
            pass
        return told

    told = asyncio.run(scenario())
    assert told[0][0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "reconnect later with offset 42" in told[0][1]
    assert told[1] == (grpc.StatusCode.UNAVAILABLE, "the server is restarting; reconnect with offset 42")


def test_a_stream_refused_for_its_caller_s_share_is_told_so_not_that_the_server_is_full() -> None:
    async def scenario() -> str:
        budget = LogBudget(8, patience=0.05)  # 2 per caller
        stop = asyncio.Event()
        async with budget.hold("u", 0, stop), budget.hold("u", 0, stop):
            try:
                async with budget.hold("u", 5, stop):
                    raise AssertionError("the caller's share is taken")
            except ApiError as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                return exc.message
        raise AssertionError("not refused")

    message = asyncio.run(scenario())
    assert message.startswith(
        "your log streams on this server hold their share of the log bytes (2 responses of 8)"
    )
    assert "reconnect later with offset 5" in message


def test_a_stream_cancelled_while_it_waits_for_a_permit_keeps_none() -> None:
    async def scenario() -> None:
        budget = LogBudget(2)  # 2 in all, 1 per caller
        stop = asyncio.Event()
        entered = asyncio.Event()

        async def waiter() -> None:
            async with budget.hold("u", 0, stop):
                entered.set()

        async with budget.hold("u", 0, stop):
            waiting = asyncio.ensure_future(waiter())
            await asyncio.sleep(0)
            waiting.cancel()  # its client went while it waited
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        assert not entered.is_set() and not budget._callers
        # Both permits are free: two callers get one each at once, with no wait to be cut short.
        budget.patience = 0.0
        async with budget.hold("u", 0, stop), budget.hold("v", 0, stop):
            pass

    asyncio.run(scenario())
