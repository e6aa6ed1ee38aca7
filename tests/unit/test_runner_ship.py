"""The ship sidecar's log shipping and program tracking, against an in-memory store."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from runner_fakes import FileStore, MemoryStore, config, deny

from dsjobs.logrecords import (
    DOCKER_STATS_LOG_PATH,
    SYSTEM_LOG_PATH,
    LogChunk,
    LogRecord,
    Stream,
    chunk_key,
    decode_chunk,
    log_file_key,
    progress_key,
    read_final,
    read_progress,
    read_records,
    write_chunk,
)
from dsjobs.runner import safeio
from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.result import FileErrorType, RunnerResult, RunnerStatus, parse_termination_message
from dsjobs.runner.ship import (
    FINAL_FLUSH_SECONDS,
    MAX_ENTRY_ERRORS,
    MAX_NAMED_ENTRIES,
    MAX_SHIPPED_BYTES,
    PERMANENT_ERROR_TRIES,
    LogShipper,
    Ship,
    StoreTrouble,
    read_status_file,
    upload_diagnostic_files,
    upload_log_files,
    upload_outputs,
)
from dsjobs.runner.syslog import SystemLog
from dsjobs.s3http import S3HttpError
from dsjobs.storage import ObjectInfo, PreconditionFailedError, forced_cancel_key


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


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


class ProgressOutage(MemoryStore):
    """Refuses the job's progress.json its next `failures` times (transient)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> None:
        if key == progress_key("p", "j") and self.failures > 0:
            self.failures -= 1
            raise ConnectionError("injected progress failure")
        super().put_bytes(key, data, **kw)


def test_a_failed_progress_write_waits_for_the_next_pump_but_the_last_is_retried(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = ProgressOutage(failures=1)
    clock = Clock()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    append(cfg.layout.progress, b'{"progress": 40, "message": "a"}\n')
    assert s.pump(deadline=clock.t)  # the program runs: no waiting on the progress
    assert read_progress(store, "p", "j") is None and clock.slept == []
    store.failures = 2
    assert s.pump(final=True, deadline=clock.t + 60)  # the last pump: retried with backoff
    saved = read_progress(store, "p", "j")
    assert saved is not None and saved.progress == 40
    assert len(clock.slept) == 2


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


@pytest.mark.parametrize("final", [True, False])
def test_a_read_cut_off_by_the_chunk_budget_ships_no_cut_line(tmp_path: Path, final: bool) -> None:
    """Catching up on a backlog reads one chunk's worth at a time: the read's tail is no partial
    line, whether the flush is the final one or a timed one."""
    cfg = config(tmp_path, ship={"chunk_bytes": 1024, "partial_line_seconds": 1.0})
    clock = Clock()
    s = LogShipper(MemoryStore(), cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    line = ("日本語のログ " * 10 + "\n").encode()  # 191 bytes: 64 KiB reads end inside characters
    if not final:
        append(cfg.layout.stdout, b"Epoch 1 ")  # an unterminated line, waiting long enough
        assert s.pump()
        clock.t += 1.5
    append(cfg.layout.stdout, b"done\n" + line * 1500)
    assert s.pump(final=final)
    outs = [c for k, _, c in all_records(s.store) if k == Stream.OUT]
    assert len(outs) > 4
    assert b"".join(outs) == cfg.layout.stdout.read_bytes()
    for c in outs:
        assert c.endswith(b"\n")
        c.decode()


def test_a_flood_on_stdout_does_not_hold_back_stderr_and_progress(tmp_path: Path) -> None:
    """Each chunk took the sources in one order until its budget was used: a program flooding
    stdout held a traceback on stderr (and its progress) back until the flood was shipped."""
    cfg = config(tmp_path, ship={"chunk_bytes": 64 * 1024})
    clock = Clock()
    s = LogShipper(MemoryStore(), cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    # A progress bar redrawn with \r (tqdm): no newline, every read's bytes all go into records.
    append(cfg.layout.stdout, b"\r 42%|####      | 420/1000 [00:10<00:14, 41.3it/s]" * 40_000)  # 2 MB
    append(cfg.layout.stderr, b"Traceback (most recent call last):\n")
    append(cfg.layout.progress, b'{"progress": 40}\n')
    assert s.pump()
    records = all_records(s.store)
    first_err = next(i for i, r in enumerate(records) if r[0] == Stream.ERR)
    first_progress = next(i for i, r in enumerate(records) if r[1] == "job_progress.jsonl")
    shipped_before = sum(len(c) for k, _, c in records[: max(first_err, first_progress)] if k == Stream.OUT)
    assert shipped_before <= 2 * 64 * 1024  # within the next chunk or so, not after 2 MB
    # All shipped but the bar's last redraw, a partial line that waits for its end.
    assert {src.key: src.pos for src in s.sources}["out"] > cfg.layout.stdout.stat().st_size - 64 * 1024


def test_samples_alone_wait_for_other_output_or_a_minute(tmp_path: Path) -> None:
    """A silent program's job wrote a chunk per resource sample (every 10 s: 360 objects an hour,
    each a GET for whoever reads the logs from the start later)."""
    cfg = config(tmp_path)
    clock = Clock()
    store = MemoryStore()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    append(cfg.layout.stdout, b"started\n")
    assert s.pump() and s.next_seq == 1
    for i in range(5):  # 50 s of samples and nothing else
        clock.t += 10
        append(cfg.layout.docker_stats, f"sample {i}\n".encode())
        assert s.pump()
    assert s.next_seq == 1  # waiting
    clock.t += 11  # a minute since the last chunk
    assert s.pump() and s.next_seq == 2
    clock.t += 10
    append(cfg.layout.docker_stats, b"sample 5\n")
    append(cfg.layout.stderr, b"warning\n")  # other output takes the samples along
    assert s.pump() and s.next_seq == 3
    clock.t += 10
    append(cfg.layout.docker_stats, b"sample 6\n")
    assert s.pump(final=True) and s.next_seq == 4  # the final flush ships everything
    stats = b"".join(c for _, p, c in all_records(store) if p == DOCKER_STATS_LOG_PATH)
    assert stats == b"".join(f"sample {i}\n".encode() for i in range(7))


def test_a_partial_line_ending_inside_a_character_waits_for_the_rest(tmp_path: Path) -> None:
    cfg = config(tmp_path, ship={"partial_line_seconds": 1.0})
    clock = Clock()
    s = LogShipper(MemoryStore(), cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    data = "обучение: эпоха 1\n".encode()
    append(cfg.layout.stdout, data[:9])  # a block-buffered write ends inside a character
    s.pump()
    clock.t += 1.1
    s.pump()
    append(cfg.layout.stdout, data[9:])
    s.pump()
    assert [c for _, _, c in all_records(s.store)] == ["обуч".encode(), "ение: эпоха 1\n".encode()]
    # At the end, what the program wrote is shipped as is.
    append(cfg.layout.stdout, data[:1])
    assert s.pump(final=True)
    assert all_records(s.store)[-1] == (Stream.OUT, None, data[:1])


class LostResponseStore(MemoryStore):
    """Stores the next chunk but reports a timeout, as when the PUT's response is lost."""

    lose = 1

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> None:
        super().put_bytes(key, data, **kw)
        if self.lose and "/chunks/" in key:
            self.lose -= 1
            raise TimeoutError("read timed out")


def test_a_chunk_stored_despite_a_failed_put_is_not_rebuilt_differently(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    clock = Clock()
    store = LostResponseStore()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    append(cfg.layout.stdout, b"line 1\n")
    assert not s.pump(deadline=clock.t)  # stored, but reported failed; the retry is not due yet
    clock.t += 2
    append(cfg.layout.stdout, b"line 2\n")
    assert s.pump(deadline=clock.t)  # sends chunk 0's very bytes again, then the new line
    assert s.pump(final=True) and s.finalize("done")
    assert [c for _, _, c in all_records(store)] == [b"line 1\n", b"line 2\n"]
    assert s.next_seq == 2


def test_another_writers_chunk_is_never_overwritten(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryStore()
    s = LogShipper(store, cfg)
    s.resume()
    theirs = LogChunk(seq=0, records=(LogRecord(Stream.OUT, b"theirs\n", 1),))
    write_chunk(store, "p", "j", theirs)
    append(cfg.layout.stdout, b"mine\n")
    with pytest.raises(PreconditionFailedError):
        s.pump()
    assert decode_chunk(store.objects[chunk_key("p", "j", 0)]) == theirs


def attempt_files(store: FileStore) -> dict[str, bytes]:
    prefix = log_file_key("p", "j", "x")[: -len("x")]
    return {k[len(prefix) :]: v for k, v in store.objects.items() if k.startswith(prefix)}


@pytest.mark.parametrize("finalized", [True, False])
def test_a_new_attempt_starts_without_the_last_attempts_log_files_and_progress(
    tmp_path: Path, finalized: bool
) -> None:
    store = FileStore()
    cfg1 = config(tmp_path / "a1", attempt=1)
    s1 = LogShipper(store, cfg1)
    s1.resume()
    append(cfg1.layout.stdout, b"attempt1 out\n")
    append(cfg1.layout.stderr, b"attempt1: CUDA error\n")
    append(cfg1.layout.progress, b'{"progress": 90, "message": "epoch 9/10"}\n')
    append(cfg1.layout.docker_stats, b"time\tcpu_percent\n")
    assert s1.pump(final=True)
    upload_log_files(cfg1, store)  # type: ignore[arg-type]
    upload_diagnostic_files(cfg1, store)  # type: ignore[arg-type]
    if finalized:  # else its ship died before the final marker
        assert s1.finalize("exit code 75")
    assert set(attempt_files(store)) == {"stdout.txt", "stderr.txt", "docker_stats.tsv"}
    # A restarted ship of the same attempt keeps them.
    LogShipper(store, cfg1).resume()
    assert set(attempt_files(store)) == {"stdout.txt", "stderr.txt", "docker_stats.tsv"}

    cfg2 = config(tmp_path / "a2", attempt=2)
    s2 = LogShipper(store, cfg2)
    s2.resume()
    assert attempt_files(store) == {}
    assert progress_key("p", "j") not in store.objects
    assert read_final(store, "p", "j") is None
    append(cfg2.layout.stdout, b"attempt2 out\n")  # succeeds, nothing on stderr
    assert s2.pump(final=True)
    files, errors = upload_log_files(cfg2, store)  # type: ignore[arg-type]
    assert errors == [] and [f.name for f in files] == ["stdout.txt"]
    assert attempt_files(store) == {"stdout.txt": b"attempt2 out\n"}


def test_a_raw_log_file_bigger_than_a_log_may_be_is_not_uploaded(tmp_path: Path) -> None:
    # `truncate -s 4T logs/stdout.log` costs the job no disk (a sparse file), and its upload would
    # take hours of the pod and terabytes of the store.
    store = FileStore()
    cfg = config(tmp_path)
    cfg.layout.logs_dir.mkdir(parents=True, exist_ok=True)
    append(cfg.layout.stderr, b"real\n")
    with open(cfg.layout.stdout, "wb") as f:
        f.truncate(MAX_SHIPPED_BYTES + 1)
    files, errors = upload_log_files(cfg, store)  # type: ignore[arg-type]
    assert [f.name for f in files] == ["stderr.txt"]
    assert [(e.log_file_name, e.description) for e in errors] == [
        ("stdout.txt", f"not uploaded: {MAX_SHIPPED_BYTES + 1} bytes, over the 10 GiB a log file may have")
    ]


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


def test_a_stalled_heartbeat_of_a_living_entry_script_is_waited_for(tmp_path: Path) -> None:
    """A job container can stall (thrashing near its memory limit) for longer than the heartbeat
    timeout: while its entry script holds the liveness FIFO, ship must not take its outputs, end
    the logs and let a later exit 0 pass for SUCCESS with what it had at the stall."""
    cfg = config(tmp_path, ship={"heartbeat_timeout_seconds": 10})
    cfg.layout.create()
    os.mkfifo(cfg.layout.alive, 0o666)
    writer = os.open(cfg.layout.alive, os.O_RDWR)  # the entry script's end
    clock = Clock()
    told: list[str] = []
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    ship.syslog = told.append  # type: ignore[assignment]
    cfg.layout.started.write_text("1")
    cfg.layout.heartbeat.write_text("7")
    beats = iter(range(10**6))

    def sleep(s: float) -> None:
        clock.sleep(s)
        if clock.t - 1000 > 120:
            cfg.layout.heartbeat.write_text(str(next(beats)))  # back after two minutes
        if clock.t - 1000 > 150:
            cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=0\nreason=\nend=1\n")

    ship.sleep = sleep
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.EXITED and st.return_code == 0
    assert sum(clock.slept) > 150
    assert any("heartbeat has not moved" in m for m in told)
    assert "the job container's heartbeat is back" in told
    os.close(writer)


@pytest.mark.parametrize(
    ("graceful", "word", "told"),
    [
        (True, {"attempt": 1}, True),
        (True, {"attempt": 2}, False),  # another attempt's: not this one's cancel
        (True, None, False),  # a graceful cancel: the timer's timeout stands
        (False, {"attempt": 1}, False),  # no timeout to cut short: not even asked
    ],
)
def test_ship_tells_the_entry_script_that_a_cancel_is_forced(
    tmp_path: Path, graceful: bool, word: dict[str, int] | None, told: bool
) -> None:
    # The pod's deletion gives a forced cancel the graceful grace (time to store the logs); the
    # operator's word in the store is what makes the program's SIGKILL come at once.
    grace = {"signal": int(signal.SIGUSR1), "timeout_seconds": 300} if graceful else None
    cfg = config(tmp_path, graceful_shutdown=grace, attempt=1)
    store = MemoryStore()
    if word is not None:
        store.objects[forced_cancel_key("p", "j")] = json.dumps(word).encode()
    clock = Clock()
    ship = Ship(cfg, store, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    messages: list[str] = []
    ship.syslog = messages.append  # type: ignore[assignment]
    cfg.layout.started.write_text("1")
    cfg.layout.heartbeat.write_text("7")
    seen: list[bool] = []

    def sleep(s: float) -> None:
        clock.sleep(s)
        cfg.layout.heartbeat.write_text(str(clock.t))
        seen.append(cfg.layout.kill_now.exists())
        if len(seen) == 1:
            ship.request_stop()  # SIGTERM: the pod is being deleted
        if len(seen) == 3:  # the program is gone
            cfg.layout.status.write_text("rc=137\nphase=run\ncancelled=1\nreason=\nend=1\n")

    ship.sleep = sleep
    assert ship.wait_for_program().cancelled
    assert seen == [False, told, told]  # nothing asked before the pod's deletion
    assert any("the cancel is forced" in m for m in messages) == told


def test_an_entry_script_gone_is_lost_at_once_without_waiting_for_the_heartbeat(tmp_path: Path) -> None:
    cfg = config(tmp_path, ship={"heartbeat_timeout_seconds": 10})
    cfg.layout.create()
    os.mkfifo(cfg.layout.alive, 0o666)
    writer = os.open(cfg.layout.alive, os.O_RDWR)
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    cfg.layout.started.write_text("1")

    def sleep(s: float) -> None:
        clock.sleep(s)
        cfg.layout.heartbeat.write_text(str(clock.t))  # its last beat was just now
        if clock.t - 1000 > 4:
            os.close(writer)  # then SIGKILLed with its container

    ship.sleep = sleep
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.LOST
    assert sum(clock.slept) < 10


def test_a_liveness_fifo_never_held_leaves_the_heartbeat_to_judge(tmp_path: Path) -> None:
    """An entry script that could not open the FIFO (or a runtime whose containers do not share
    FIFOs) must not make a running job LOST at ship's first look."""
    cfg = config(tmp_path, ship={"heartbeat_timeout_seconds": 10})
    cfg.layout.create()
    os.mkfifo(cfg.layout.alive, 0o666)  # no writer ever
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    cfg.layout.started.write_text("1")

    def sleep(s: float) -> None:
        clock.sleep(s)
        cfg.layout.heartbeat.write_text(str(clock.t))
        if clock.t - 1000 > 20:
            cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=0\nreason=\nend=1\n")

    ship.sleep = sleep
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.EXITED and sum(clock.slept) > 20


def test_status_and_heartbeat_the_job_made_unreadable_end_lost_instead_of_crashing_the_ship(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for ship's uid after the job chmods the entry script's files (they are written 0666).
    cfg = config(tmp_path, ship={"heartbeat_timeout_seconds": 10})
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    cfg.layout.started.write_text("1")
    cfg.layout.heartbeat.write_text("7")
    cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=0\nend=1\n")
    real_open = safeio.open_beneath
    locked = {str(cfg.layout.status), str(cfg.layout.heartbeat)}

    def open_beneath(root: Any, path: Any) -> int:
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(root, path)

    monkeypatch.setattr(safeio, "open_beneath", open_beneath)
    assert read_status_file(cfg.layout.status, cfg.paths.shared_dir) is None
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.LOST and st.return_code is None


def test_a_start_once_seen_stays_seen_whatever_the_job_does_to_the_file(tmp_path: Path) -> None:
    # `rm -rf run/` by the job: ship waited for a start for good, and on the pod's deletion said
    # "stopped before the job started" with no outputs, though the program ran.
    cfg = config(tmp_path, ship={"heartbeat_timeout_seconds": 10})
    cfg.layout.create()
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    cfg.layout.started.write_text("1")
    cfg.layout.heartbeat.write_text("1")

    def sleep(s: float) -> None:
        clock.sleep(s)
        if cfg.layout.started.exists():
            cfg.layout.started.unlink()  # seen once, then gone; the heartbeat stops with it
        assert clock.t - 1000 < 600, "it waited for a start for good"

    ship.sleep = sleep
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.LOST  # judged by the silent heartbeat, as a started job
    assert 10 < sum(clock.slept) < 60


def test_a_start_never_seen_is_told_by_the_liveness_fifo(tmp_path: Path) -> None:
    # The program deleted run/ (its `started` and heartbeat with it) before ship's first look:
    # ship waited for a start for good, the job stayed UPLOADING_OUTPUT and a cancel did nothing.
    cfg = config(tmp_path, ship={"heartbeat_timeout_seconds": 10})
    cfg.layout.create()
    os.mkfifo(cfg.layout.alive, 0o666)
    clock = Clock()
    ship = Ship(cfg, MemoryStore(), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    writer: list[int] = []

    def sleep(s: float) -> None:
        clock.sleep(s)
        if not writer:
            writer.append(os.open(cfg.layout.alive, os.O_RDWR))  # the entry script starts
        if clock.t - 1000 > 5 and writer[-1] >= 0:
            os.close(writer.pop())  # and is gone, no status written
            writer.append(-1)
        assert clock.t - 1000 < 600, "it waited for a start for good"

    ship.sleep = sleep
    st = ship.wait_for_program()
    assert st.status == RunnerStatus.LOST
    assert sum(clock.slept) < 10  # at once, by the FIFO, not after the heartbeat's timeout


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


def zip_names(store: FileStore, key: str) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(store.objects[key])) as zf:
        return sorted(zf.namelist())


def test_entries_a_directory_output_lacks_are_file_errors_of_that_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, outputs=[{"path": "results", "var": "RES", "desc_path": "/home/u/results"}])
    res = cfg.work_dir / "results"
    (res / "locked").mkdir(parents=True)
    (res / "a.txt").write_text("a")
    (res / "locked" / "b.txt").write_text("b")
    deny(monkeypatch, res / "locked")  # as for ship's uid on a directory the job made 0700
    store = FileStore()
    lines: list[str] = []
    outputs, errors = upload_outputs(cfg, store, lines.append)  # type: ignore[arg-type]
    [out] = outputs
    assert zip_names(store, out.key) == ["results/a.txt"]
    [err] = errors
    assert (err.type, err.path, err.var, err.index) == (
        FileErrorType.UPLOAD_FAILED,
        "/home/u/results",
        "RES",
        0,
    )
    assert "results/locked" in err.description and "Permission denied" in err.description
    assert any("results/locked not uploaded" in line for line in lines)


def test_an_unreadable_output_directory_fails_instead_of_uploading_an_empty_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, outputs=[{"path": "ckpt"}])
    (cfg.work_dir / "ckpt").mkdir()
    (cfg.work_dir / "ckpt" / "c.txt").write_text("c")
    deny(monkeypatch, cfg.work_dir / "ckpt")
    store = FileStore()
    outputs, errors = upload_outputs(cfg, store, lambda m: None)  # type: ignore[arg-type]
    assert outputs == []
    [err] = errors
    assert (
        err.type == FileErrorType.UPLOAD_FAILED
        and err.path == "ckpt"
        and "Permission denied" in err.description
    )
    assert store.objects == {}


def test_many_lost_entries_are_named_up_to_a_cap_then_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, outputs=[{"path": "results"}])
    res = cfg.work_dir / "results"
    res.mkdir()
    for i in range(MAX_ENTRY_ERRORS + 5):
        (res / f"f{i:02}.txt").write_text("x")
    deny(monkeypatch, prefix=res / "f")
    outputs, errors = upload_outputs(cfg, FileStore(), lambda m: None)  # type: ignore[arg-type]
    assert len(outputs) == 1
    assert len(errors) == MAX_ENTRY_ERRORS + 1
    assert errors[-1].description.startswith("5 more entries")


def test_lost_entries_are_named_up_to_a_cap_over_all_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many directory outputs each losing many entries (0600 files of atomic writes) must not name
    them all: each named one is a file error in the job's status, which etcd bounds."""
    n_outputs = MAX_NAMED_ENTRIES // MAX_ENTRY_ERRORS + 3
    cfg = config(tmp_path, outputs=[{"path": f"out{k}"} for k in range(n_outputs)])
    unreadable = []
    for k in range(n_outputs):
        d = cfg.work_dir / f"out{k}"
        d.mkdir()
        for i in range(MAX_ENTRY_ERRORS + 2):
            (d / f"f{i:02}.txt").write_text("x")
            unreadable.append(d / f"f{i:02}.txt")
    deny(monkeypatch, *unreadable)
    told: list[str] = []
    outputs, errors = upload_outputs(cfg, FileStore(), told.append)  # type: ignore[arg-type]
    assert len(outputs) == n_outputs
    named = [e for e in errors if "is not in the uploaded zip" in e.description]
    counted = [e for e in errors if "more entries are not in the uploaded zip" in e.description]
    assert len(named) == MAX_NAMED_ENTRIES
    assert len(counted) == n_outputs  # every output still says how many it lost
    lost = sum(int(e.description.split()[0]) for e in counted) + len(named)
    assert lost == n_outputs * (MAX_ENTRY_ERRORS + 2)
    assert sum("not uploaded" in m for m in told) == lost  # the system log names every one


def test_a_symlinked_output_directory_is_zipped_under_its_declared_name(tmp_path: Path) -> None:
    cfg = config(tmp_path, outputs=[{"path": "results"}])
    run = cfg.work_dir / "runs" / "run-7"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (cfg.work_dir / "results").symlink_to("runs/run-7")  # the job: ln -s runs/run-7 results
    store = FileStore()
    outputs, errors = upload_outputs(cfg, store, lambda m: None)  # type: ignore[arg-type]
    assert errors == []
    assert zip_names(store, outputs[0].key) == ["results/metrics.json"]


def test_links_in_a_directory_output_ship_their_files_from_the_working_dir_only(tmp_path: Path) -> None:
    """A Hugging Face cache as an output: its snapshot links arrive as the blobs they point to, as
    the output itself would be followed; a link out of the working dir is skipped, told in the
    system log and counted in a file error, its target's bytes nowhere in storage."""
    cfg = config(tmp_path, outputs=[{"path": "cache"}])
    snap = cfg.work_dir / "cache" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (cfg.work_dir / "cache" / "blobs").mkdir()
    (cfg.work_dir / "cache" / "blobs" / "9f").write_bytes(b"weights" * 1000)
    (snap / "model.bin").symlink_to("../../blobs/9f")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the job's")
    (snap / "leak").symlink_to(os.path.relpath(outside, snap))
    store = FileStore()
    (snap / "dangling").symlink_to("../../blobs/gone")
    (snap / "also-out").symlink_to("/etc/hostname")
    outputs, errors = upload_outputs(cfg, store, SystemLog(cfg.layout.system_log, "ship"))  # type: ignore[arg-type]
    # The user is told, once for the output, that files it links to outside are not in it (a
    # dangling link is nothing lost); the system log names each.
    assert [(e.type, e.path, e.description) for e in errors] == [
        (
            FileErrorType.UPLOAD_FAILED,
            "cache",
            "2 symlinks leading outside the working directory not followed, e.g. "
            "cache/snapshots/abc/also-out (copy the files into the output to ship them; see .system.log)",
        )
    ]
    assert zip_names(store, outputs[0].key) == ["cache/blobs/9f", "cache/snapshots/abc/model.bin"]
    assert all(b"not the job's" not in data for data in store.objects.values())
    log = cfg.layout.system_log.read_text()
    assert "skipped cache/snapshots/abc/leak (symlink resolving outside the working directory)" in log
    assert "directory of 2 files uploaded as zip" in log


def test_an_absolute_link_into_the_working_dir_ships_its_file(tmp_path: Path) -> None:
    """`ln -s "$PWD/ckpt/best.pt" outputs/best.pt`: the job names its working dir by its absolute
    path; the file arrives in the zip (it was skipped as "resolving outside the working
    directory", and the job said SUCCESS without it), while an absolute link elsewhere is not."""
    cfg = config(tmp_path, outputs=[{"path": "outputs"}])
    (cfg.work_dir / "ckpt").mkdir(parents=True)
    (cfg.work_dir / "outputs").mkdir()
    (cfg.work_dir / "ckpt" / "best.pt").write_bytes(b"weights")
    (cfg.work_dir / "outputs" / "best.pt").symlink_to(f"{cfg.work_dir}/ckpt/best.pt")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the job's")
    (cfg.work_dir / "outputs" / "leak").symlink_to(outside)
    store = FileStore()
    outputs, errors = upload_outputs(cfg, store, SystemLog(cfg.layout.system_log, "ship"))  # type: ignore[arg-type]
    assert [e.description.split(" not followed")[0] for e in errors] == [
        "1 symlink leading outside the working directory"
    ]
    assert zip_names(store, outputs[0].key) == ["outputs/best.pt"]
    assert all(b"not the job's" not in data for data in store.objects.values())
    assert "skipped outputs/leak (symlink resolving outside" in cfg.layout.system_log.read_text()


def test_a_zipped_output_s_size_bound_counts_only_links_it_will_store(tmp_path: Path) -> None:
    # The bound sizes the upload's parts (and their buffers): links out of the working dir, which
    # are skipped, must not count (three links to a 2 TB file outside made 630 MiB parts).
    from dsjobs.runner.ship import _zip_bound

    work = tmp_path / "work"
    out = work / "out"
    out.mkdir(parents=True)
    (work / "big-inside").write_bytes(b"x" * 100_000)
    huge = tmp_path / "huge-outside"
    with open(huge, "wb") as f:
        f.truncate(2 * 10**12)  # sparse
    (out / "in").symlink_to("../big-inside")
    for i in range(3):
        (out / f"away{i}").symlink_to(huge)
    bound = _zip_bound(str(out), str(work))
    assert 100_000 < bound.size < 200_000 and bound.entries == 4


def test_a_directory_output_with_more_entries_than_the_runner_can_zip_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The central directory of a zip is kept until its end (~600 bytes an entry): 700k files
    made the ship container run out of its 512 MiB, losing every output's record with it."""
    from dsjobs.runner import ship as ship_module

    cfg = config(tmp_path, outputs=[{"path": "frames"}, {"path": "model.pt"}])
    frames = cfg.work_dir / "frames"
    frames.mkdir()
    for i in range(30):
        (frames / f"{i}.png").write_bytes(b"p")
    (cfg.work_dir / "model.pt").write_bytes(b"w")
    monkeypatch.setattr(ship_module, "MIN_ZIP_ENTRIES", 10)  # as if the 30 were 300,000
    bound = ship_module._zip_bound(str(frames), str(cfg.work_dir))
    assert bound.memory > 30 * (ship_module.ZIP_BYTES_PER_ENTRY + 2 * len(str(frames)))  # names count
    limit = ship_module.SHIP_BASE_BYTES + ship_module.part_buffers_bytes(bound.size) + bound.memory - 1
    monkeypatch.setattr(ship_module, "memory_limit", lambda: limit)
    store = FileStore()
    outputs, errors = upload_outputs(cfg, store, lambda m: None)  # type: ignore[arg-type]
    assert [o.path for o in outputs] == ["model.pt"]
    [err] = errors
    assert err.path == "frames" and err.type == FileErrorType.UPLOAD_FAILED
    assert err.description.startswith(
        "not uploaded: the directory has 30 entries, more than the runner can zip"
    )
    monkeypatch.setattr(ship_module, "memory_limit", lambda: None)  # none known: zipped
    outputs, errors = upload_outputs(cfg, FileStore(), lambda m: None)  # type: ignore[arg-type]
    assert [o.path for o in outputs] == ["frames", "model.pt"] and errors == []
    monkeypatch.setattr(ship_module, "memory_limit", lambda: limit)
    monkeypatch.setattr(ship_module, "MIN_ZIP_ENTRIES", 10_000)  # a few files always fit
    outputs, errors = upload_outputs(cfg, FileStore(), lambda m: None)  # type: ignore[arg-type]
    assert [o.path for o in outputs] == ["frames", "model.pt"] and errors == []


def test_a_directory_output_with_paths_longer_than_path_max_is_refused_not_mismeasured(
    tmp_path: Path,
) -> None:
    # The bound walked by name and skipped what it could not list, while the zipper walks by
    # descriptor: millions of files below such a path passed the memory check, and ship was
    # OOM-killed with every output's record.
    cfg = config(tmp_path, outputs=[{"path": "deep"}, {"path": "model.pt"}])
    (cfg.work_dir / "model.pt").write_bytes(b"w")
    fd = os.open(cfg.work_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ["deep", *(["d" * 240] * 18)]:  # past PATH_MAX (4096 bytes)
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        for i in range(3):
            os.close(os.open(f"{i}.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    outputs, errors = upload_outputs(cfg, FileStore(), lambda m: None)  # type: ignore[arg-type]
    assert [o.path for o in outputs] == ["model.pt"]
    [err] = errors
    assert err.path == "deep" and err.type == FileErrorType.UPLOAD_FAILED
    assert "longer than the system lets the runner measure" in err.description
    assert "shorten its names or its nesting" in err.description


def test_a_file_named_in_another_encoding_does_not_fail_its_directory(tmp_path: Path) -> None:
    cfg = config(tmp_path, outputs=[{"path": "results"}])
    res = cfg.work_dir / "results"
    res.mkdir()
    (res / "good.txt").write_text("ok")
    with open(os.fsencode(res) + b"/caf\xe9.txt", "wb") as f:
        f.write(b"latin-1 name")
    store = FileStore()
    outputs, errors = upload_outputs(cfg, store, SystemLog(cfg.layout.system_log, "ship"))  # type: ignore[arg-type]
    assert zip_names(store, outputs[0].key) == ["results/good.txt"]
    [err] = errors
    assert "results/caf\\xe9.txt" in err.description and "UTF-8" in err.description
    # The result still serializes (a raw surrogate would not), and the system log got the line.
    result = RunnerResult(
        project_id="p", job_id="j", status=RunnerStatus.EXITED, outputs=outputs, file_errors=errors
    )
    assert "caf" in result.to_json()
    assert "results/caf\\xe9.txt not uploaded" in cfg.layout.system_log.read_text()


class DeniedStore(FileStore):
    """Storage that refuses every write for good (403: revoked key, quota)."""

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> None:
        self.requests += 1
        raise S3HttpError(403, "AccessDenied", "Access Denied", key)


class Stuck(Exception):
    """The simulated clock ran past any sensible end: what used to be an endless retry."""


def ended_program(tmp: Path) -> RunnerConfig:
    cfg = config(tmp)
    cfg.layout.stdout.write_text("hello\n")
    cfg.layout.started.write_text("1")
    cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=0\nreason=\nend=1\n")
    return cfg


def bounded(clock: Clock, limit: float) -> Callable[[float], None]:
    def sleep(s: float) -> None:
        clock.sleep(s)
        if clock.t > 1000.0 + limit:
            raise Stuck(f"still going after {limit}s")

    return sleep


def test_storage_refusing_the_logs_for_good_ends_the_ship_with_the_failure_recorded(tmp_path: Path) -> None:
    cfg = ended_program(tmp_path)
    store = DeniedStore()
    clock = Clock()
    term = tmp_path / "term"
    ship = Ship(cfg, store, termination_log=str(term), clock=clock, sleep=bounded(clock, 3600))  # type: ignore[arg-type]
    result = ship.run()
    assert result.status == RunnerStatus.EXITED and result.return_code == 0
    assert not result.logs_complete
    [log_error] = [e for e in result.file_errors if e.log_file_name == SYSTEM_LOG_PATH]
    assert "AccessDenied" in log_error.description
    assert term.exists()
    # A few tries of the chunk, then the raw log files and result.json once each: no endless loop.
    assert store.requests <= PERMANENT_ERROR_TRIES + 5
    assert clock.t - 1000.0 < 60


def test_the_program_end_is_noticed_while_storage_is_down(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.layout.stdout.write_text("hello\n")
    cfg.layout.started.write_text("1")
    store = FileStore()
    store.fail_puts = 10**9  # a transient outage that outlasts the job
    clock = Clock()
    ticks = iter(range(10**6))

    def sleep(s: float) -> None:
        bounded(clock, 3 * FINAL_FLUSH_SECONDS)(s)
        n = next(ticks)
        cfg.layout.heartbeat.write_text(str(n))
        if n == 200:
            cfg.layout.status.write_text("rc=4\nphase=run\ncancelled=0\nreason=\nend=1\n")

    ship = Ship(cfg, store, termination_log=str(tmp_path / "term"), clock=clock, sleep=sleep)  # type: ignore[arg-type]
    status = ship.wait_for_program()
    assert status.status == RunnerStatus.EXITED and status.return_code == 4
    # Backoff spans the polls: a storage that is down is not asked every flush interval.
    assert store.requests < 20
    ended = clock.t
    result = ship.run()  # the final flush keeps trying up to its deadline, not past it
    assert not result.logs_complete
    assert FINAL_FLUSH_SECONDS - 30 <= clock.t - ended <= FINAL_FLUSH_SECONDS


def progress_records(store: MemoryStore) -> list[bytes]:
    return [c for _, fp, c in all_records(store) if fp == "job_progress.jsonl"]


def finish_after(cfg: RunnerConfig, clock: Clock, ticks: int) -> Callable[[float], None]:
    """A sleep for Ship: the job beats, and ends (rc 0) after ``ticks`` polls."""
    beats = iter(range(10**6))

    def sleep(s: float) -> None:
        bounded(clock, 3600)(s)
        n = next(beats)
        cfg.layout.heartbeat.write_text(str(n))
        if n == ticks:
            cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=0\nreason=\nend=1\n")

    return sleep


class OutageStore(FileStore):
    """The object store goes down once the program has ended: every file upload fails as it does
    past the storage client's retries (connection refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.tried: list[str] = []

    def upload_file(self, path: Any, key: str, **kw: Any) -> Any:
        self.tried.append(key)
        raise ConnectionRefusedError(111, "Connection refused")

    def upload_stream(self, key: str, produce: Any, **kw: Any) -> Any:
        self.tried.append(key)
        raise ConnectionRefusedError(111, "Connection refused")

    def head(self, key: str) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")


def test_an_object_store_down_at_stage_out_fails_the_rest_fast_and_says_so(tmp_path: Path) -> None:
    """Each upload would wait out the store's patience (minutes; 100 outputs: hours) and the
    result would not say that the store, not the job, lost the files."""
    cfg = config(tmp_path, outputs=[{"path": "a.txt"}, {"path": "b.txt"}, {"path": "dir"}])
    (cfg.work_dir / "a.txt").write_text("a")
    (cfg.work_dir / "b.txt").write_text("b")
    (cfg.work_dir / "dir").mkdir()
    cfg.layout.stdout.write_bytes(b"out\n")
    store = OutageStore()
    clock = Clock()
    term = tmp_path / "term"
    ship = Ship(cfg, store, termination_log=str(term), clock=clock, sleep=finish_after(cfg, clock, 2))  # type: ignore[arg-type]
    result = ship.run()
    assert result.status == RunnerStatus.EXITED and result.return_code == 0
    assert result.storage_unavailable is True
    assert len(store.tried) == 1  # the first output; nothing after it
    by_path = {e.path or e.log_file_name: e for e in result.file_errors}
    assert by_path["a.txt"].description.startswith("upload failed: ConnectionRefusedError")
    for later in ("b.txt", "dir", "stdout.txt"):
        assert by_path[later].description == (
            "not uploaded: the object store kept failing (on output a.txt: ConnectionRefusedError: "
            "[Errno 111] Connection refused)"
        )
    assert "the object store kept failing past the retries" in cfg.layout.system_log.read_text()


def test_one_upload_s_transient_failure_with_the_store_answering_fails_only_that_output(
    tmp_path: Path,
) -> None:
    """A timeout reading the job's own file (a network file system) or one object's throttling is
    no outage: the outputs after it are still uploaded."""
    cfg = config(tmp_path, outputs=[{"path": "a.txt"}, {"path": "b.txt"}])
    for name in ("a.txt", "b.txt"):
        (cfg.work_dir / name).write_text(name)

    class OneBad(FileStore):
        def upload_file(self, path: Any, key: str, **kw: Any) -> Any:
            if key.endswith("/a.txt"):
                raise TimeoutError("timed out reading a.txt")
            return super().upload_file(path, key, **kw)

    trouble = StoreTrouble.of(OneBad(), cfg)  # type: ignore[arg-type]
    outputs, errors = upload_outputs(cfg, OneBad(), lambda m: None, trouble)  # type: ignore[arg-type]
    assert [o.path for o in outputs] == ["b.txt"] and [e.path for e in errors] == ["a.txt"]
    assert trouble.first is None


def test_outputs_are_told_before_the_raw_logs_are_uploaded(tmp_path: Path) -> None:
    """The raw log files of a long chatty job may take longer than the pod's grace (a cancel
    gives 15 s): killed while uploading them, ship must already have told the outputs it stored."""
    cfg = config(tmp_path, outputs=[{"path": "model.pt"}])
    (cfg.work_dir / "model.pt").write_bytes(b"weights")
    cfg.layout.stdout.write_bytes(b"epoch 1\n")
    term = tmp_path / "term"
    seen: list[str] = []

    class Store(FileStore):
        def upload_file(self, path: Any, key: str, **kw: Any) -> Any:
            if "/logs/files/" in key:
                seen.append(term.read_text())  # what the kubelet would report if killed now
            return super().upload_file(path, key, **kw)

    clock = Clock()
    ship = Ship(cfg, Store(), termination_log=str(term), clock=clock, sleep=finish_after(cfg, clock, 2))  # type: ignore[arg-type]
    final = ship.run()
    told = parse_termination_message(seen[0])
    assert isinstance(told, RunnerResult) and told.status == RunnerStatus.EXITED and told.return_code == 0
    assert [o.path for o in told.outputs] == ["model.pt"] and not told.logs_complete and told.provisional
    assert final.logs_complete and not final.provisional
    assert parse_termination_message(term.read_text()) == final


def test_a_log_file_ship_may_not_read_is_skipped_and_told_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job ran with umask 077, or wrote its progress via mkstemp + rename (0600), and ship
    # runs as another uid: the progress file cannot be opened. (Simulated: the tests may run as
    # root, which reads any mode.)
    cfg = config(tmp_path)
    cfg.layout.started.write_text("1")
    cfg.layout.stdout.write_bytes(b"hello\n")
    cfg.layout.progress.write_bytes(b'{"progress": 5}\n')
    real_open = os.open

    def open_(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if os.path.basename(os.fspath(path)) == "job_progress.jsonl":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", open_)
    store = FileStore()
    clock = Clock()
    term = tmp_path / "term"
    ship = Ship(cfg, store, termination_log=str(term), clock=clock, sleep=finish_after(cfg, clock, 5))  # type: ignore[arg-type]
    result = ship.run()
    assert result.status == RunnerStatus.EXITED and result.logs_complete and term.exists()
    assert (Stream.OUT, None, b"hello\n") in all_records(store)
    assert progress_records(store) == [] and result.progress is None
    told = [line for line in cfg.layout.system_log.read_text().splitlines() if "not shipped" in line]
    assert len(told) == 1
    assert "logs/job_progress.jsonl is not shipped: Permission denied" in told[0]


class Flaky:
    """Makes a LogShipper's `collect` raise its first ``times`` calls (an unforeseen bug)."""

    def __init__(self, shipper: LogShipper, times: int) -> None:
        self.collect = shipper.collect
        self.times = times
        self.calls = 0

    def __call__(self, *, final: bool) -> Any:
        self.calls += 1
        if self.calls <= self.times:
            raise RuntimeError("unforeseen")
        return self.collect(final=final)


@pytest.mark.parametrize("times", [3, 10**9])
def test_an_unexpected_error_in_the_log_shipping_never_costs_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int
) -> None:
    cfg = config(tmp_path)
    cfg.layout.started.write_text("1")
    cfg.layout.stdout.write_bytes(b"hello\n")
    store = FileStore()
    clock = Clock()
    term = tmp_path / "term"
    ship = Ship(cfg, store, termination_log=str(term), clock=clock, sleep=finish_after(cfg, clock, 10))  # type: ignore[arg-type]
    flaky = Flaky(ship.shipper, times)
    monkeypatch.setattr(ship.shipper, "collect", flaky)
    result = ship.run()
    assert term.exists() and result.status == RunnerStatus.EXITED and result.return_code == 0
    told = [line for line in cfg.layout.system_log.read_text().splitlines() if "log shipping failed" in line]
    assert len(told) == 1 and "RuntimeError: unforeseen" in told[0]
    if times == 3:  # a passing failure: retried, nothing lost
        assert result.logs_complete and (Stream.OUT, None, b"hello\n") in all_records(store)
    else:
        assert not result.logs_complete
        [log_error] = [e for e in result.file_errors if e.log_file_name == SYSTEM_LOG_PATH]
        assert "RuntimeError: unforeseen" in log_error.description


def test_a_deeply_nested_progress_line_is_shipped_as_a_record_only(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    append(cfg.layout.progress, b'{"progress": 7}\n' + deep)
    s = LogShipper(MemoryStore(), cfg)
    s.resume()
    assert s.pump(final=True)
    assert b"".join(progress_records(s.store)) == cfg.layout.progress.read_bytes()
    assert s.latest_progress is not None and s.latest_progress.progress == 7


class SlowOutputs(FileStore):
    """Uploading an output takes ``seconds`` of the clock (a big checkpoint); the next log chunk
    PUT after it fails once (a transient blip)."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        super().__init__()
        self.clock = clock
        self.seconds = seconds
        self.blip = False

    def upload_file(self, path: Any, key: str, **kw: Any) -> Any:
        res = super().upload_file(path, key, **kw)
        if "/outputs/" in key:
            self.clock.t += self.seconds
            self.blip = True
        return res

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> None:
        if self.blip and "/logs/chunks/" in key:
            self.blip = False
            raise ConnectionError("one transient blip")
        super().put_bytes(key, data, **kw)


def test_a_long_output_upload_leaves_the_final_flush_its_window(tmp_path: Path) -> None:
    cfg = config(tmp_path, outputs=[{"path": "model.pt"}])
    (cfg.work_dir / "model.pt").write_bytes(b"weights")
    cfg.layout.started.write_text("1")
    cfg.layout.stdout.write_bytes(b"training done\n")
    cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=0\nreason=\nend=1\n")
    clock = Clock()
    store = SlowOutputs(clock, FINAL_FLUSH_SECONDS + 100)
    ship = Ship(cfg, store, termination_log=str(tmp_path / "term"), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    result = ship.run()
    assert result.logs_complete and result.file_errors == [] and len(result.outputs) == 1
    final = read_final(store, "p", "j")
    assert final is not None and final.next_seq == ship.shipper.next_seq


def write_snapshot(path: Path, progress: int, message: str) -> None:
    """What a job that keeps only its latest progress does: the file rewritten in place."""
    with open(path, "w") as f:
        f.write(json.dumps({"progress": progress, "message": message}) + "\n")


def test_a_progress_file_rewritten_in_place_is_shipped_snapshot_by_snapshot(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryStore()
    s = LogShipper(store, cfg)
    s.resume()
    # As long as the last, longer, shorter: each a whole new snapshot.
    snapshots = [(10, "epoch 1"), (20, "epoch 2"), (30, "finishing up the run"), (99, "done")]
    for progress, message in snapshots:
        write_snapshot(cfg.layout.progress, progress, message)
        assert s.pump()
        saved = read_progress(store, "p", "j")
        assert saved is not None and (saved.progress, saved.message) == (progress, message)
    assert s.pump(final=True)
    assert [json.loads(c) for c in progress_records(store)] == [
        {"progress": p, "message": m} for p, m in snapshots
    ]


def test_a_progress_file_appended_to_via_renames_is_not_shipped_twice(tmp_path: Path) -> None:
    # An atomic appender: each update writes the old lines plus a new one to a temp file and
    # renames it over the progress file (a new inode that continues the old content).
    cfg = config(tmp_path)
    s = LogShipper(MemoryStore(), cfg)
    s.resume()
    lines = [json.dumps({"progress": p}).encode() + b"\n" for p in (10, 20, 30)]
    for n in range(1, len(lines) + 1):
        tmp = cfg.layout.progress.with_suffix(".tmp")
        tmp.write_bytes(b"".join(lines[:n]))
        os.replace(tmp, cfg.layout.progress)
        assert s.pump()
    os.utime(cfg.layout.progress, (0, 0))  # a touch changes no byte: nothing to ship again
    assert s.pump(final=True)
    assert progress_records(s.store) == lines
    assert s.latest_progress is not None and s.latest_progress.progress == 30


@pytest.mark.parametrize("replace", [False, True])
def test_a_log_file_cut_short_or_replaced_is_shipped_again_from_its_start(
    tmp_path: Path, replace: bool
) -> None:
    cfg = config(tmp_path)
    s = LogShipper(MemoryStore(), cfg)
    s.resume()
    append(cfg.layout.stdout, b"first\nsecond\n")
    assert s.pump()
    if replace:  # another file of more bytes takes the name: the position is not one in it
        new = cfg.layout.stdout.with_suffix(".new")
        new.write_bytes(b"a new file, longer\n")
        os.replace(new, cfg.layout.stdout)
    else:
        cfg.layout.stdout.write_bytes(b"cut\n")
    assert s.pump(final=True)
    outs = [c for k, _, c in all_records(s.store) if k == Stream.OUT]
    assert outs == [b"first\nsecond\n", cfg.layout.stdout.read_bytes()]


def test_a_log_file_cut_and_written_again_is_not_shipped_past_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each cut ships the file anew: without a bound a job could fill the store all projects share.
    from dsjobs.runner import ship as ship_module

    monkeypatch.setattr(ship_module, "MAX_SHIPPED_BYTES", 100)
    cfg = config(tmp_path)
    s = LogShipper(MemoryStore(), cfg)
    told: list[str] = []
    s.syslog = told.append
    s.resume()
    lines = [b"x" * (n - 1) + b"\n" for n in (50, 40, 30, 20, 10)]
    for line in lines:
        cfg.layout.stdout.write_bytes(line)  # cut, and written again: shorter than shipped
        append(cfg.layout.stderr, b"err\n")
        assert s.pump()
    assert s.pump(final=True)
    outs = [c for k, _, c in all_records(s.store) if k == Stream.OUT]
    assert outs == lines[:3]  # 120 bytes: the third passed the bound, the rest went unshipped
    assert [c for k, _, c in all_records(s.store) if k == Stream.ERR] == [b"err\n"] * 5
    (message,) = told
    assert message.startswith("logs/stdout.log is not shipped any further: 120 bytes of it were"), message
    # Not a promise: a file over the bound at the end is not uploaded either.
    assert "the whole file is uploaded at the end if it is" in message, message


class DownAtStart(FileStore):
    """Storage whose HEADs fail (the ship's resume) ``failures`` times, with ``exc``."""

    def __init__(self, failures: int, exc: Exception) -> None:
        super().__init__()
        self.failures = failures
        self.exc = exc

    def head(self, key: str) -> ObjectInfo | None:
        if self.failures > 0:
            self.failures -= 1
            raise self.exc
        return super().head(key)


def test_storage_refusing_the_ships_resume_ends_it_with_the_failure_recorded(tmp_path: Path) -> None:
    cfg = ended_program(tmp_path)
    store = DownAtStart(10**9, S3HttpError(403, "AccessDenied", "Access Denied", "k"))
    clock = Clock()
    term = tmp_path / "term"
    ship = Ship(cfg, store, termination_log=str(term), clock=clock, sleep=bounded(clock, 3600))  # type: ignore[arg-type]
    result = ship.run()
    assert result.status == RunnerStatus.EXITED and result.return_code == 0 and term.exists()
    assert not result.logs_complete
    [log_error] = [e for e in result.file_errors if e.log_file_name == SYSTEM_LOG_PATH]
    assert "AccessDenied" in log_error.description
    assert not any("/chunks/" in k for k in store.objects)  # nothing written blind
    assert clock.t - 1000.0 < 60


def test_a_storage_outage_at_the_ships_start_only_delays_the_logs(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = DownAtStart(4, ConnectionError("connection refused"))
    # Stage-in shipped first: the ship must continue after its chunk, never write over it.
    write_chunk(store, "p", "j", LogChunk(0, (LogRecord(Stream.FILE, b"staged\n", 1, SYSTEM_LOG_PATH),)))
    cfg.layout.started.write_text("1")
    cfg.layout.stdout.write_bytes(b"hello\n")
    clock = Clock()
    sleep = finish_after(cfg, clock, 60)
    ship = Ship(cfg, store, termination_log=str(tmp_path / "term"), clock=clock, sleep=sleep)  # type: ignore[arg-type]
    result = ship.run()
    assert result.logs_complete and result.file_errors == []
    records = all_records(store)
    assert records[0] == (Stream.FILE, SYSTEM_LOG_PATH, b"staged\n")
    assert (Stream.OUT, None, b"hello\n") in records


def test_system_log_lines_keep_the_time_they_were_written(tmp_path: Path) -> None:
    # The official CLI prints each system-log line with its record's time: every line of a job
    # was shown at the one time the ship read them all.
    cfg = config(tmp_path)
    store = MemoryStore()
    clock = Clock()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    lines = (
        b"2026-11-30T15:29:20Z entry: program started\n"
        b"2026-11-30T15:29:20Z entry: cancel: sending SIGTERM\n"
        b"  a continuation without a time\n"
        b"2026-11-30T15:29:24Z entry: program exited with code 143\n"
    )
    append(cfg.layout.system_log, lines)
    assert s.pump(final=True)
    records = [r for r in read_records(store, "p", "j", 0).records if r.file_path == ".system.log"]
    assert b"".join(r.content for r in records) == lines
    t20 = int(datetime(2026, 11, 30, 15, 29, 20, tzinfo=UTC).timestamp()) * 10**9
    t24 = t20 + 4 * 10**9
    shipped = records[1].created_ns
    assert [(r.content.count(b"\n"), r.created_ns) for r in records] == [(2, t20), (1, shipped), (1, t24)]
    assert shipped not in (t20, t24)


def test_a_system_log_line_with_a_time_no_record_can_hold_does_not_stop_the_logs(tmp_path: Path) -> None:
    # The job may write to the system log (pip's output goes there): a line beginning with a time
    # before 1970 or after 2554 made the chunk's records fail to build, and no stream was shipped
    # again for the rest of the job.
    cfg = config(tmp_path)
    store = MemoryStore()
    clock = Clock()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    append(cfg.layout.stdout, b"o1\n")
    assert s.pump()
    odd = b"1960-01-01T00:00:00Z notAfter\n9999-12-31T23:59:59Z notAfter\n"
    append(cfg.layout.system_log, odd)
    append(cfg.layout.stdout, b"o2\n")
    assert s.pump(final=True)
    records = all_records(store)
    assert (Stream.OUT, None, b"o2\n") in records
    assert b"".join(c for stream, path, c in records if path == SYSTEM_LOG_PATH) == odd


_SWAP = """
import os, sys
real, link_to = sys.argv[1], sys.argv[2]
parked, link = real + ".parked", real + ".link"
while True:
    try:
        os.symlink(link_to, link)
        os.rename(real, parked)
        os.rename(link, real)  # now a symlink
        os.rename(real, link)
        os.rename(parked, real)  # a directory again
        os.unlink(link)
    except OSError:
        pass
"""


def _swapper(real_dir: Path, link_to: Path) -> subprocess.Popen[bytes]:
    """A job's leftover process swapping `real_dir` between a directory and a symlink to
    `link_to` (the runner's Secret, say) as fast as it can: a process of its own, as in a pod."""
    return subprocess.Popen([sys.executable, "-c", _SWAP, str(real_dir), str(link_to)])


@pytest.mark.parametrize("swapped", ["out", "out/sub"])
def test_a_directory_output_swapped_for_a_symlink_never_uploads_what_it_points_to(
    tmp_path: Path, swapped: str
) -> None:
    # The ship container mounts the storage credentials: a job racing the check of its output
    # against the zip (a symlink put in place in between) must not get them into its outputs.
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "credentials").write_text("DSJOBS_S3_SECRET_KEY=stolen\n")
    cfg = config(tmp_path, outputs=[{"path": "out"}])
    (cfg.work_dir / "out" / "sub").mkdir(parents=True)
    (cfg.work_dir / "out" / "sub" / "result.txt").write_text("ok")
    swapper = _swapper(cfg.work_dir / swapped, secret)
    store = FileStore()
    zipped = 0
    try:
        for _ in range(1000):
            outputs, errors = upload_outputs(cfg, store, lambda m: None)  # type: ignore[arg-type]
            assert len(outputs) + len(errors) >= 1  # uploaded, or a file error saying why not
            for out in outputs:
                with zipfile.ZipFile(io.BytesIO(store.objects[out.key])) as zf:
                    for name in zf.namelist():
                        assert b"stolen" not in zf.read(name), name
                zipped += 1
    finally:
        swapper.kill()
        swapper.wait()
    assert zipped  # the race was run against real uploads


def test_an_output_whose_resolution_fails_is_its_own_file_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # realpath raises when a symlink changes while it is resolved (a job rotating `latest`).
    cfg = config(tmp_path, outputs=[{"path": "latest"}, {"path": "b.txt"}])
    (cfg.work_dir / "latest").write_text("a")
    (cfg.work_dir / "b.txt").write_text("b")
    real = os.path.realpath

    def realpath(path: Any, **kw: Any) -> str:
        if os.fspath(path).endswith("/latest"):
            raise OSError(22, "Invalid argument", os.fspath(path))
        return real(path, **kw)

    monkeypatch.setattr(os.path, "realpath", realpath)
    outputs, errors = upload_outputs(cfg, FileStore(), lambda m: None)  # type: ignore[arg-type]
    assert [o.path for o in outputs] == ["b.txt"]
    [err] = errors
    assert err.path == "latest" and err.type == FileErrorType.UPLOAD_FAILED
    assert "Invalid argument" in err.description


def test_outputs_the_runner_may_not_read_say_so_rather_than_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for ship's uid: a file the job made 0600, a file in a directory the job made 0700.
    cfg = config(tmp_path, outputs=[{"path": "private.txt"}, {"path": "locked/in.txt"}])
    (cfg.work_dir / "private.txt").write_text("p")
    (cfg.work_dir / "locked").mkdir()
    (cfg.work_dir / "locked" / "in.txt").write_text("i")
    deny(monkeypatch, cfg.work_dir / "private.txt")
    real_lstat = os.lstat

    def lstat(path: Any, **kw: Any) -> os.stat_result:
        if os.fspath(path).startswith(str(cfg.work_dir / "locked") + "/"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_lstat(path, **kw)

    monkeypatch.setattr(os, "lstat", lstat)
    outputs, errors = upload_outputs(cfg, FileStore(), lambda m: None)  # type: ignore[arg-type]
    assert outputs == []
    assert [(e.path, e.type, e.description) for e in errors] == [
        (
            "private.txt",
            FileErrorType.UPLOAD_FAILED,
            "upload failed: Permission denied (it is read by another user than the job's: it must be "
            "readable by all)",
        ),
        (
            "locked/in.txt",
            FileErrorType.UPLOAD_FAILED,
            "refused: Permission denied (it is read by another user than the job's: it must be readable by all)",
        ),
    ]


def test_a_chatty_program_s_chunks_are_batched_the_longer_it_prints(tmp_path: Path) -> None:
    """A line every 0.2 s (a progress bar, a line per training step) made a chunk per flush: 7,200
    objects an hour. Every flush ships for the first minute (users watch a job start), then at
    most one chunk per 2 s until 10 minutes, then one per 5 s; a flood still ships at once."""
    cfg = config(tmp_path, ship={"chunk_bytes": 4096})
    clock = Clock()
    store = MemoryStore()
    s = LogShipper(store, cfg, clock=clock, sleep=clock.sleep)
    s.resume()
    seqs: list[int] = []
    lines = 0
    for _ in range(int(15 * 60 / 0.5)):  # 15 minutes of flushes every 0.5 s
        for _ in range(2):
            append(cfg.layout.stdout, f"step {lines}\n".encode())
            lines += 1
        clock.t += 0.5
        assert s.pump()
        seqs.append(s.next_seq)
    first_minute, to_ten, after = seqs[119], seqs[1199] - seqs[119], seqs[-1] - seqs[1199]
    assert first_minute == 120  # every flush
    assert 250 <= to_ten <= 271  # 540 s at most one per 2 s
    assert 55 <= after <= 61  # 300 s at most one per 5 s
    # Nothing is lost, nothing repeated, in order.
    assert s.pump(final=True)
    res = read_records(store, "p", "j", 0, max_records=10**6, max_chunks=10**6)
    out = b"".join(r.content for r in res.records if r.stream == Stream.OUT)
    assert out == b"".join(f"step {i}\n".encode() for i in range(lines))
    # A flood (half a chunk or more) is not held back.
    before = s.next_seq
    append(cfg.layout.stdout, b"x" * 3000 + b"\n")
    clock.t += 0.5
    assert s.pump() and s.next_seq == before + 1


def test_a_log_file_the_entry_script_could_not_write_to_the_end_is_a_file_error(tmp_path: Path) -> None:
    # The job's disk filled up: stdout.txt ends early, and the job's result says so.
    cfg = config(tmp_path)
    cfg.layout.started.write_text("1")
    cfg.layout.stdout.write_bytes(b"epoch 1\n")
    cfg.layout.status.write_text("rc=1\nphase=run\ncancelled=0\nreason=\ncut=out\nend=1\n")
    clock = Clock()
    store = FileStore()
    ship = Ship(cfg, store, termination_log=str(tmp_path / "term"), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    result = ship.run()
    assert result.return_code == 1 and result.logs_complete
    assert [(e.log_file_name, e.type.value) for e in result.file_errors] == [("stdout.txt", "UPLOAD_FAILED")]
    assert [f.name for f in result.log_files] == ["stdout.txt", "system.log"]  # what there is
