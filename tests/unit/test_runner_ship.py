"""The ship sidecar's log shipping and program tracking, against an in-memory store."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from runner_fakes import MemoryStore

from dsjobs.logrecords import Stream, read_final, read_progress, read_records
from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.result import RunnerStatus
from dsjobs.runner.ship import LogShipper, Ship, read_status_file
from dsjobs.storage import ObjectInfo


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def config(tmp: Path, **kw: object) -> RunnerConfig:
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="x",
        paths={"work_dir": str(tmp / "work"), "shared_dir": str(tmp / "shared")},
        **kw,  # type: ignore[arg-type]
    )
    cfg.layout.create()
    cfg.work_dir.mkdir(exist_ok=True)
    return cfg


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def all_records(store: MemoryStore) -> list[tuple[Stream, str | None, bytes]]:
    res = read_records(store, "p", "j", 0, max_records=10**6)
    return [(r.stream, r.file_path, r.content) for r in res.records]


def test_streams_are_shipped_in_order_and_a_restarted_shipper_resumes_exactly(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    lay = cfg.layout
    store = MemoryStore()
    clock = Clock()
    s1 = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s1.resume()
    append(lay.stdout, b"o1\no2\n")
    append(lay.stderr, b"e1\n")
    append(lay.system_log, b"sys1\n")
    assert s1.pump()
    append(lay.stdout, b"o3\npartial")
    assert s1.pump()
    assert all_records(store) == [
        (Stream.FILE, ".system.log", b"sys1\n"),
        (Stream.OUT, None, b"o1\no2\n"),
        (Stream.ERR, None, b"e1\n"),
        (Stream.OUT, None, b"o3\n"),
    ]
    # A new shipper (the sidecar restarted) continues after the last chunk: no loss, no repeat.
    s2 = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s2.resume()
    assert s2.next_seq == s1.next_seq
    append(lay.stdout, b"-done\n")
    append(lay.stderr, b"e2\n")
    assert s2.pump(final=True)
    outs = b"".join(c for k, _, c in all_records(store) if k == Stream.OUT)
    assert outs == lay.stdout.read_bytes() == b"o1\no2\no3\npartial-done\n"
    errs = b"".join(c for k, _, c in all_records(store) if k == Stream.ERR)
    assert errs == b"e1\ne2\n"


def test_unterminated_lines_are_shipped_after_a_while(tmp_path: Path) -> None:
    cfg = config(tmp_path, ship={"partial_line_seconds": 1.0})
    store = MemoryStore()
    clock = Clock()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    append(cfg.layout.stdout, b"Epoch 1/10 ...")
    s.pump()
    assert all_records(store) == []
    clock.t += 0.5
    s.pump()
    assert all_records(store) == []
    clock.t += 0.6
    s.pump()
    assert all_records(store) == [(Stream.OUT, None, b"Epoch 1/10 ...")]


def test_progress_lines_become_records_and_the_latest_progress(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryStore()
    s = LogShipper(store, cfg)
    s.resume()
    lines = [
        {"progress": 10, "message": "a"},
        {"progress": 55, "message": "b", "create_time": "2025-06-01T11:00:12+00:00"},
    ]
    append(cfg.layout.progress, b"".join(json.dumps(x).encode() + b"\n" for x in lines) + b"garbage\n")
    s.pump()
    assert [c for k, fp, c in all_records(store) if fp == "job_progress.jsonl"] != []
    p = read_progress(store, "p", "j")
    assert p is not None and p.progress == 55 and p.message == "b"
    assert s.latest_progress == p


def test_storage_outages_delay_but_do_not_lose_or_repeat(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryStore()
    clock = Clock()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    append(cfg.layout.stdout, b"a\n")
    store.fail_puts = 3
    assert s.pump()
    assert len(clock.slept) == 3
    append(cfg.layout.stdout, b"b\n")
    assert s.pump()
    assert [c for _, _, c in all_records(store)] == [b"a\n", b"b\n"]
    # With a deadline, a storage that stays down is reported instead of waited for forever.
    append(cfg.layout.stdout, b"c\n")
    store.fail_puts = 10**9
    assert not s.pump(final=True, deadline=clock.t + 60)
    assert "injected failure" in s.last_error
    store.fail_puts = 0
    assert s.pump(final=True) and s.finalize("done")
    final = read_final(store, "p", "j")
    assert final is not None and final.next_seq == s.next_seq
    assert [c for _, _, c in all_records(store)] == [b"a\n", b"b\n", b"c\n"]


def test_a_new_attempt_reopens_a_finalized_stream(tmp_path: Path) -> None:
    store = MemoryStore()
    cfg0 = config(tmp_path / "a0")
    s0 = LogShipper(store, cfg0)
    s0.resume()
    append(cfg0.layout.stdout, b"attempt0\n")
    s0.pump(final=True)
    s0.finalize("x")
    cfg1 = config(tmp_path / "a1", attempt=1)
    s1 = LogShipper(store, cfg1)
    s1.resume()
    assert read_final(store, "p", "j") is None
    append(cfg1.layout.stdout, b"attempt1\n")
    s1.pump(final=True)
    assert [c for _, _, c in all_records(store)] == [b"attempt0\n", b"attempt1\n"]


class CountingStore(MemoryStore):
    """Keeps only sizes: for the memory test, stored bytes must not count as the shipper's."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}

    def put_bytes(self, key: str, data: bytes, **kw: object) -> None:
        self.sizes[key] = len(data)

    def head(self, key: str) -> ObjectInfo | None:
        return ObjectInfo(key, self.sizes[key], "") if key in self.sizes else None


def test_memory_stays_bounded_whatever_the_log_volume(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    line = b"x" * 99 + b"\n"
    with open(cfg.layout.stdout, "wb") as f:
        for _ in range(32):
            f.write(line * 10_486)  # ~1 MiB each, 32 MiB total
    store = CountingStore()
    s = LogShipper(store, cfg)
    tracemalloc.start()
    try:
        assert s.pump(final=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(store.sizes.values()) > 32 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"


@pytest.mark.parametrize(
    ("text", "status", "rc", "cancelled"),
    [
        ("rc=3\nphase=run\ncancelled=0\nreason=\nend=1\n", RunnerStatus.EXITED, 3, False),
        ("rc=137\nphase=run\ncancelled=1\nreason=\nend=1\n", RunnerStatus.EXITED, 137, True),
        ("rc=\nphase=setup\ncancelled=0\nreason=pip failed\nend=1\n", RunnerStatus.SETUP_FAILED, None, False),
        ("rc=\nphase=cancelled\ncancelled=1\nreason=x\nend=1\n", RunnerStatus.CANCELLED, None, True),
    ],
)
def test_status_file(
    tmp_path: Path, text: str, status: RunnerStatus, rc: int | None, cancelled: bool
) -> None:
    p = tmp_path / "status"
    p.write_text(text)
    st = read_status_file(p)
    assert st is not None and (st.status, st.return_code, st.cancelled) == (status, rc, cancelled)
    p.write_text(text.replace("end=1\n", ""))
    assert read_status_file(p) is None  # still being written


def test_a_silent_heartbeat_means_the_job_container_was_lost(tmp_path: Path) -> None:
    cfg = config(tmp_path, ship={"heartbeat_timeout_seconds": 10})
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    cfg.layout.started.write_text("1")
    cfg.layout.heartbeat.write_text("7")
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.LOST and st.return_code is None
    assert 10 <= sum(clock.slept) <= 12


def test_stop_before_the_job_started(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    ship.request_stop()
    assert ship.wait_for_program().status == RunnerStatus.NOT_STARTED


def test_a_running_job_is_waited_for_even_after_stop(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    cfg.layout.started.write_text("1")
    ship.request_stop()
    beats = iter(range(100))

    def sleep(s: float) -> None:
        clock.sleep(s)
        n = next(beats)
        cfg.layout.heartbeat.write_text(str(n))
        if n == 20:
            cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=1\nreason=\nend=1\n")

    ship.sleep = sleep
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.EXITED and st.return_code == 0 and st.cancelled
