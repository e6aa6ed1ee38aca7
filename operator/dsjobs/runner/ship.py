"""The ship sidecar: logs to storage while the job runs, then outputs, result and final marker.

While the job container runs, every ``flush_interval`` (<= 1 s; small chunks less often once the
job has printed for a minute, `CHUNK_PACE`) the shipper appends what is new in the shared volume's
files as log records (chunk objects, see dsjobs.logrecords):

    logs/stdout.log  -> OUT            logs/system.log        -> FILE ".system.log"
    logs/stderr.log  -> ERR            logs/job_progress.jsonl -> FILE "job_progress.jsonl"
    logs/docker_stats.tsv -> FILE ".docker_stats.tsv"   logs/gpu_stats.tsv -> FILE ".gpu_stats.tsv"

Memory stays constant whatever the volume: a tick reads at most one chunk's worth per pass and
the source files are the buffer (a read cut off there never flushes its unterminated tail: the
next pass continues from it). A chunk is built once and retried with the same bytes until stored.
Each chunk header records the file positions it covers, so a restarted shipper (or stage-in,
which ships its own messages first) continues exactly where the last chunk ended: no record
lost, none repeated. A storage outage only delays shipping (with a backoff that never keeps the
job's end from being noticed); storage that refuses the writes (access denied: not transient) is
given up after `PERMANENT_ERROR_TRIES`, and the result then records the logs as incomplete.

The job is over when the entry script's status file appears (written after its output is fully
in the files), or when its heartbeat stops for ``heartbeat_timeout`` (the container was killed
outright: status LOST). Then: drain the logs, upload outputs (missing -> NOT_FOUND, failing
after retries -> UPLOAD_FAILED, directories zipped, each entry a zip lacks -> UPLOAD_FAILED, as one count of the symlinks
in it leading outside the working dir),
upload the raw log files, ship the last records, write the final marker, store ``result.json``
and write the termination message.

If this sidecar itself dies midway, the chunks already written stay valid and readable, but no
final marker or result is written: the operator sees the ship container terminated without a
parsable termination message and must report the job failed with a log error (docs/runner.md).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Final

from dsjobs.backoff import jittered
from dsjobs.logrecords import (
    DOCKER_STATS_LOG_PATH,
    GPU_STATS_LOG_PATH,
    MAX_RECORD_CONTENT,
    PROGRESS_LOG_PATH,
    SYSTEM_LOG_PATH,
    FinalMarker,
    LogChunk,
    LogRecord,
    Progress,
    Stream,
    final_key,
    find_next_seq,
    log_file_key,
    make_offset,
    parse_progress_line,
    progress_key,
    read_chunk,
    read_final,
    read_progress,
    split_records,
    write_chunk,
    write_final,
    write_progress,
)
from dsjobs.runner.config import Compression, OutputFile, RunnerConfig
from dsjobs.runner.memlimit import memory_limit
from dsjobs.runner.result import (
    LOG_FILE_NAMES,
    FileError,
    FileErrorType,
    LogFileResult,
    OutputResult,
    ProgressResult,
    RunnerResult,
    RunnerStatus,
    store_result,
    termination_message,
)
from dsjobs.runner.safeio import RefusedFile, open_beneath, open_dir_beneath, read_beneath
from dsjobs.runner.syslog import SystemLog
from dsjobs.runner.zipsafe import LINK_OUTSIDE, LinkRoot, zip_directory
from dsjobs.storage import (
    ObjectStore,
    PreconditionFailedError,
    Storage,
    forced_cancel_key,
    is_transient,
    output_key,
    part_buffers_bytes,
    result_key,
    single_try,
)

log = logging.getLogger(__name__)

ENV_TERMINATION_LOG = "DSJOBS_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
#: Longest a chunk of nothing but resource-usage samples waits for other output (`_Source.lazy`).
SAMPLES_FLUSH_SECONDS = 60.0
#: The least time between two chunks that are not half full, by how long the shipper has been
#: storing chunks: every flush while users watch a job start, then batched, as a chatty program (a
#: progress bar, a line per step) made a chunk per flush: 7,200 objects an hour, each a PUT to pay
#: for and a GET for whoever reads the logs from the start.
CHUNK_PACE: Final = ((60.0, 0.0), (600.0, 2.0), (math.inf, 5.0))
#: How long the final flush keeps retrying storage before reporting the logs incomplete.
FINAL_FLUSH_SECONDS = 300.0
#: Tries of a log write that storage refuses (not a transient error: access denied, no such
#: bucket) before the logs are reported incomplete instead of retried forever.
PERMANENT_ERROR_TRIES = 3
#: How many of the last bytes shipped from the progress file are compared with the file before
#: each read (`_Source.rewritable`): a one-line snapshot rewritten in place is all in it.
REWRITE_CHECK_BYTES = 4096
#: How often, once the pod is being deleted, ship asks the store whether the cancel is forced.
FORCED_CANCEL_POLL_SECONDS: Final = 1.0
#: Bytes of one log file one runner container ships at most; past it the file is not shipped (told
#: once in the system log). An append-only file is bounded by the shared volume's size, but the
#: job may cut its files (they are writable by all) and write them again, each time shipped anew:
#: without a bound, one job could fill the object store all projects share.
MAX_SHIPPED_BYTES: Final = 10 << 30


_STAMP_LEN = len("2025-06-01T11:00:12Z")


def stamped_lines(content: bytes, default_ns: int) -> list[tuple[bytes, int]]:
    """System log content (lines that begin with their UTC time, `2025-06-01T11:00:12Z entry: ...`)
    as runs of consecutive lines of one time, with that time in ns (`default_ns` for lines without
    one). The pieces join back to `content`."""
    out: list[tuple[bytes, int]] = []
    for line in content.splitlines(keepends=True):
        stamp = default_ns
        head = line[:_STAMP_LEN]
        if len(head) == _STAMP_LEN and head.endswith(b"Z"):
            try:
                when = datetime.strptime(head.decode("ascii"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            except (UnicodeDecodeError, ValueError):
                pass
            else:
                ns = int(when.timestamp()) * 1_000_000_000
                # A record's time is unsigned ns since 1970 (< year 2554): a line the job wrote
                # there (system.log is the job's to write to, pip's output goes there) saying
                # 1960 or 9999 made every record of the chunk unbuildable, stalling all its logs.
                if 0 <= ns < 1 << 64:
                    stamp = ns
        if out and out[-1][1] == stamp:
            out[-1] = (out[-1][0] + line, stamp)
        else:
            out.append((line, stamp))
    return out


@dataclass
class _Source:
    key: str
    path: Path
    stream: Stream
    file_path: str | None
    #: Ship an unterminated line after ``partial_line_seconds`` (progress lines wait for "\n").
    timed_partial: bool
    #: The job's own file, which users also rewrite instead of appending to (one snapshot per
    #: update, in place or by an atomic rename): `tail` tells a rewrite from an append.
    rewritable: bool = False
    pos: int = 0
    partial_since: float | None = None
    #: The file `pos` is a position in (None: not known yet, e.g. after `LogShipper.resume`).
    ino: int | None = None
    #: The last bytes shipped before `pos` (up to REWRITE_CHECK_BYTES; rewritable sources only).
    tail: bytes | None = None
    #: Bytes shipped by this writer (MAX_SHIPPED_BYTES bounds it).
    shipped: int = 0
    #: MAX_SHIPPED_BYTES was reached (told once).
    capped: bool = False
    #: The file cannot be read (a symlink or special file the job put there, or a mode that
    #: keeps ship's uid out): it is not shipped, and that is told once.
    refused: bool = False
    #: A rewrite was told (ship's own log, once: a snapshot writer rewrites on every update).
    rewrite_told: bool = False
    #: Resource-usage samples: alone, they wait up to SAMPLES_FLUSH_SECONDS for a chunk (a silent
    #: program's job otherwise wrote one per sample, 360 an hour, each a GET for a reader later).
    lazy: bool = False


@dataclass
class _Pending:
    records: list[LogRecord] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    progress: Progress | None = None
    partial: dict[str, float | None] = field(default_factory=dict)
    inodes: dict[str, int | None] = field(default_factory=dict)
    tails: dict[str, bytes | None] = field(default_factory=dict)
    #: Bytes each source adds to the chunk.
    shipped: dict[str, int] = field(default_factory=dict)
    #: Index (in `LogShipper.sources`) of the source the next chunk reads first.
    next_first: int = 0


@dataclass(frozen=True)
class _Read:
    """What `LogShipper._read` got from a source: ``data`` from ``start`` (the source's position,
    or 0 when the file was rewritten), and the file's state there."""

    data: bytes
    at_end: bool
    start: int
    ino: int | None
    tail: bytes | None
    rewritten: bool = False

    @classmethod
    def nothing(cls, src: _Source) -> _Read:
        return cls(b"", True, src.pos, src.ino, src.tail)


class LogShipper:
    """Turns the shared volume's log files into chunks, strictly in order, one writer at a time."""

    def __init__(
        self,
        store: ObjectStore,
        config: RunnerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall_ns: Callable[[], int] = time.time_ns,
        syslog: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        #: For the writes `_write` retries with its own backoff, and the progress (retried on the
        #: next pump): one request per try, so that a try due now never waits on storage.
        self._once = single_try(store)
        self.config = config
        self.project = config.project_id
        self.job = config.job_id
        self.clock = clock
        self.sleep = sleep
        self.wall_ns = wall_ns
        #: Where a file that is not shipped is told to the user (the job's system log).
        self.syslog = syslog
        layout = config.layout
        self.sources = [
            _Source("sys", layout.system_log, Stream.FILE, SYSTEM_LOG_PATH, True),
            _Source("out", layout.stdout, Stream.OUT, None, True),
            _Source("err", layout.stderr, Stream.ERR, None, True),
            _Source("progress", layout.progress, Stream.FILE, PROGRESS_LOG_PATH, False, rewritable=True),
            _Source(
                "docker_stats", layout.docker_stats, Stream.FILE, DOCKER_STATS_LOG_PATH, False, lazy=True
            ),
            _Source("gpu_stats", layout.gpu_stats, Stream.FILE, GPU_STATS_LOG_PATH, False, lazy=True),
        ]
        #: The source the next chunk reads first (`_Pending.next_first`).
        self._first = 0
        #: When the last chunk was stored (`clock`), and the first (None: none yet).
        self._last_chunk_at = -math.inf
        self._first_chunk_at: float | None = None
        self._lazy_paths = {src.file_path for src in self.sources if src.lazy}
        self.next_seq = 0
        #: `resume` succeeded: chunks may be written from `next_seq` on.
        self.resumed = False
        self.latest_progress: Progress | None = None
        self._progress_unsaved = False
        self.last_error: str = ""
        #: Consecutive failed writes, and when the next may be tried (backoff).
        self._failures = 0
        self._retry_at = -math.inf
        #: Consecutive writes storage refused (not transient); at PERMANENT_ERROR_TRIES it gives up.
        self._refusals = 0
        self.gave_up = False
        #: The chunk being written and what it commits: until it is stored, every try sends these
        #: very bytes (a PUT that landed but reported failure then counts as stored).
        self._unsent: tuple[LogChunk, _Pending] | None = None

    @property
    def end_offset(self) -> int:
        return make_offset(self.next_seq, 0)

    def resume(self) -> None:
        """Continue after whatever this job's earlier writers stored.

        The first writer of a new attempt (its stage-in, else its ship) removes what describes the
        previous attempt alone: its raw log files, progress.json and the final marker. The final
        marker goes last and this attempt's first chunk comes after, so a writer that dies midway
        leaves the sign of an earlier attempt in place and the next try clears again.
        """
        self._resume(self.store)

    def _resume(self, store: ObjectStore) -> None:
        attempt = self.config.attempt
        self.next_seq = find_next_seq(store, self.project, self.job)
        last = read_chunk(store, self.project, self.job, self.next_seq - 1) if self.next_seq else None
        if last is not None and last.attempt == attempt:
            # Same pod attempt (stage-in before us, or a restarted ship): same files.
            for s in self.sources:
                s.pos = last.resume.get(s.key, 0)
            self.latest_progress = read_progress(store, self.project, self.job)
        final = read_final(store, self.project, self.job)
        if (last is not None and last.attempt < attempt) or (final is not None and final.attempt < attempt):
            # DownloadStdLogs and the API's progress would otherwise show the last attempt's.
            for name in (*LOG_FILE_NAMES, *(f.name for f in self.config.layout.diagnostic_files)):
                store.delete(log_file_key(self.project, self.job, name))
            store.delete(progress_key(self.project, self.job))
            if final is not None:
                # A new attempt extends the job's stream: readers must not see it as complete.
                store.delete(final_key(self.project, self.job))
        self.resumed = True

    def ship(self, *, final: bool = False, deadline: float | None = None) -> bool:
        """`pump`, once `resume` has succeeded. Storage that is down when the ship starts, or
        refuses its reads (403), must not cost the job its result: `resume` is retried like a
        chunk write (one try per call when due, backoff between calls; refused for good ->
        `gave_up`), and nothing is written before it succeeds."""
        if not self.resumed and not self._write(lambda: self._resume(self._once), "resume", deadline):
            return False
        return self.pump(final=final, deadline=deadline)

    def _read(self, src: _Source, limit: int) -> _Read:
        """Up to ``limit`` bytes from the source's position (from 0 when the file was rewritten).

        A file ship cannot read is skipped, told once: a symlink or special file the job put
        there (RefusedFile), or a mode that keeps ship's uid out (PermissionError: the job's
        umask 077, or a progress file written via mkstemp + rename, which is 0600).
        """
        try:
            fd = open_beneath(self.config.paths.shared_dir, src.path)
        except FileNotFoundError:
            return _Read.nothing(src)
        except OSError as exc:
            self._unreadable(src, exc)
            return _Read.nothing(src)
        try:
            with os.fdopen(fd, "rb") as f:
                return self._read_open(src, f, limit)
        except OSError as exc:
            self._unreadable(src, exc)
            return _Read.nothing(src)

    def _read_open(self, src: _Source, f: BinaryIO, limit: int) -> _Read:
        st = os.fstat(f.fileno())
        start = src.pos
        # An unknown tail (after `resume`) is not checked, but grows into a known one.
        tail = (src.tail or b"") if src.rewritable else None
        rewritten = self._rewritten(src, f, st)
        if rewritten:
            start, tail = 0, (b"" if src.rewritable else None)
            if not src.rewrite_told:
                src.rewrite_told = True
                log.info("log file rewritten, shipped again from its start path=%s", src.path)
        f.seek(start)
        data = f.read(limit)
        at_end = len(data) < limit or f.tell() >= os.fstat(f.fileno()).st_size
        return _Read(data, at_end, start, st.st_ino, tail, rewritten)

    def _rewritten(self, src: _Source, f: BinaryIO, st: os.stat_result) -> bool:
        """Whether the file's bytes before the source's position are no longer those shipped.

        The runner's own files (stdout, stderr, system log, samples) are only appended to: this
        is a file cut shorter or replaced (another inode) by the job, and never happens otherwise.
        The progress file is the job's, and users rewrite it: in place with each update's
        snapshot (same inode; as long as, longer or shorter than before) or via a rename. Neither
        its size nor its inode nor its mtime tells that from an append (an atomic appender's new
        inode continues the old content; a touch changes no byte), so the last bytes shipped are
        compared: changed -> the whole file is shipped again; unchanged -> what follows them is
        new, whoever wrote it. A change only before the last REWRITE_CHECK_BYTES goes unseen.
        """
        if st.st_size < src.pos:
            return True
        if not src.rewritable:
            return src.ino is not None and st.st_ino != src.ino
        if not src.tail:
            return False  # nothing shipped, or not known since `resume`
        f.seek(src.pos - len(src.tail))
        return f.read(len(src.tail)) != src.tail

    def _capped(self, src: _Source) -> bool:
        """Whether `src` has shipped MAX_SHIPPED_BYTES (told once)."""
        if src.shipped < MAX_SHIPPED_BYTES:
            return False
        if not src.capped:
            src.capped = True
            log.warning("log file not shipped any further path=%s shipped=%d", src.path, src.shipped)
            if self.syslog is not None and src.key != "sys":
                name = os.path.relpath(src.path, self.config.paths.shared_dir)
                # Cut and written again, the file may still be small enough to upload at the end;
                # one that grew past the cap will not be (upload_log_files refuses it).
                whole = (
                    f"; the whole file is uploaded at the end if it is {MAX_SHIPPED_BYTES >> 30} GiB or "
                    "less by then"
                    if src.key in ("out", "err")
                    else ""
                )
                self.syslog(
                    f"{name} is not shipped any further: {src.shipped} bytes of it were, the most "
                    f"one log file ships ({MAX_SHIPPED_BYTES >> 30} GiB; a file cut and written again "
                    f"counts each time){whole}"
                )
        return True

    def _unreadable(self, src: _Source, exc: OSError) -> None:
        if src.refused:
            return
        src.refused = True
        log.warning("log file not shipped path=%s error=%s", src.path, exc)
        if self.syslog is not None:
            why = exc.strerror or str(exc)
            if isinstance(exc, PermissionError):
                why += _READABLE_BY_ALL
            name = os.path.relpath(src.path, self.config.paths.shared_dir)
            self.syslog(f"{name} is not shipped: {why}")

    def collect(self, *, final: bool) -> _Pending:
        """Records for the next chunk (not yet committed: positions advance only once stored)."""
        budget = self.config.ship.chunk_bytes
        now = self.clock()
        created = self.wall_ns()
        pending = _Pending()
        n = len(self.sources)
        for i in range(n):
            # From the source after the one that used up the last chunk's budget: a flood on
            # stdout must not hold back a traceback on stderr or the progress until it ends.
            at = (self._first + i) % n
            src = self.sources[at]
            pending.positions[src.key] = src.pos
            pending.partial[src.key] = src.partial_since
            pending.inodes[src.key] = src.ino
            pending.tails[src.key] = src.tail
            if budget <= 0 or self._capped(src):
                continue
            read = self._read(src, max(budget, MAX_RECORD_CONTENT))
            data = read.data
            pending.positions[src.key] = read.start
            pending.inodes[src.key] = read.ino
            pending.tails[src.key] = read.tail
            if not data:
                pending.partial[src.key] = None
                continue
            since = None if read.rewritten else src.partial_since
            waited = since is not None and now - since >= self.config.ship.partial_line_seconds
            # A read cut off by the budget ends wherever: its tail is no partial line, the next
            # pass goes on from it.
            flush = read.at_end and (final or (src.timed_partial and waited))
            contents, consumed = split_records(data, flush_partial=flush, eof=read.at_end and final)
            if consumed < len(data):
                # An unterminated line waits; its clock restarts when it is a new line.
                pending.partial[src.key] = now if consumed > 0 or since is None else since
            else:
                pending.partial[src.key] = None
            if read.tail is not None:
                pending.tails[src.key] = (read.tail + data[:consumed])[-REWRITE_CHECK_BYTES:]
            for c in contents:
                if src.key == "sys":
                    # Each line carries the time it was written: the official CLI shows a system
                    # log record's time on each of its lines (all of a job's were one time).
                    for piece, stamp in stamped_lines(c, created):
                        pending.records.append(LogRecord(src.stream, piece, stamp, src.file_path))
                    continue
                pending.records.append(LogRecord(src.stream, c, created, src.file_path))
                if src.key == "progress":
                    for line in c.splitlines():
                        p = parse_progress_line(line, default_time=datetime.fromtimestamp(created / 1e9, UTC))
                        if p is not None:
                            pending.progress = p
            pending.positions[src.key] = read.start + consumed
            pending.shipped[src.key] = consumed
            budget -= consumed
            if budget <= 0:
                pending.next_first = (at + 1) % n
        return pending

    def _commit(self, pending: _Pending) -> None:
        self._first = pending.next_first
        for src in self.sources:
            src.pos = pending.positions[src.key]
            src.partial_since = pending.partial[src.key]
            src.ino = pending.inodes[src.key]
            src.tail = pending.tails[src.key]
            src.shipped += pending.shipped.get(src.key, 0)
        if pending.progress is not None:
            self.latest_progress = pending.progress
            self._progress_unsaved = True

    def _put_chunk(self, chunk: LogChunk, deadline: float | None) -> bool:
        return self._write(
            lambda: write_chunk(self._once, self.project, self.job, chunk), f"log chunk {chunk.seq}", deadline
        )

    def _write(self, write: Callable[[], None], what: str, deadline: float | None) -> bool:
        """Retry ``write`` until it succeeds; False as soon as the next try would come after
        ``deadline`` (None: no deadline), or once storage has refused the job's writes for good.

        The backoff carries over between calls: a caller polling with a short deadline (the
        program still runs) neither hammers a storage that is down nor waits on it.
        """
        while not self.gave_up:
            if not self._wait_for_retry(deadline):
                return False
            try:
                write()
            except PreconditionFailedError:
                raise  # someone else writes this job's logs: never overwrite their chunks
            except Exception as exc:
                self._failed(what, exc)
                continue
            self._failures = self._refusals = 0
            return True
        return False

    def _wait_for_retry(self, deadline: float | None) -> bool:
        wait = self._retry_at - self.clock()
        if wait <= 0:
            return True
        if deadline is not None and self._retry_at > deadline:
            return False
        self.sleep(wait)
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        self._failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if not is_transient(exc):
            # Access denied, no such bucket, quota: waiting does not fix it, and retrying
            # forever would keep the pod from ever ending.
            self._refusals += 1
            if self._refusals >= PERMANENT_ERROR_TRIES:
                self.gave_up = True
                log.error("storage refuses the job's logs, giving up what=%s error=%s", what, exc)
                return
        delay = jittered(min(30.0, 0.5 * 2 ** min(self._failures, 6)))
        self._retry_at = self.clock() + delay
        log.warning(
            "log write failed what=%s attempt=%d retry_in=%.1fs error=%s", what, self._failures, delay, exc
        )

    def pump(self, *, final: bool = False, deadline: float | None = None) -> bool:
        """Store everything that can be shipped now. False if storage failed past ``deadline`` or
        refused the writes for good (`gave_up`)."""
        while True:
            if self._unsent is None:
                pending = self.collect(final=final)
                if not pending.records or (
                    not final and (self._samples_wait(pending) or self._paced(pending))
                ):
                    # Partial-line clocks still need to start even when nothing is shipped.
                    for src in self.sources:
                        src.partial_since = pending.partial[src.key]
                    break
                chunk = LogChunk(
                    seq=self.next_seq,
                    records=tuple(pending.records),
                    attempt=self.config.attempt,
                    resume=pending.positions,
                )
                self._unsent = (chunk, pending)
            chunk, pending = self._unsent
            if not self._put_chunk(chunk, deadline):
                return False
            self._unsent = None
            self.next_seq += 1
            self._last_chunk_at = self.clock()
            if self._first_chunk_at is None:
                self._first_chunk_at = self._last_chunk_at
            self._commit(pending)
        self._save_progress(final=final, deadline=deadline)
        return True

    def _paced(self, pending: _Pending) -> bool:
        """Whether a chunk that is not half full waits for more (`CHUNK_PACE`; read again then)."""
        if self._first_chunk_at is None:
            return False
        now = self.clock()
        shipping = now - self._first_chunk_at
        interval = next(gap for until, gap in CHUNK_PACE if shipping < until)
        if interval <= 0 or now - self._last_chunk_at >= interval:
            return False
        return sum(len(r.content) for r in pending.records) < self.config.ship.chunk_bytes // 2

    def _samples_wait(self, pending: _Pending) -> bool:
        """Whether a chunk of nothing but resource-usage samples waits for more (read again then)."""
        return (
            all(r.file_path in self._lazy_paths for r in pending.records)
            and self.clock() - self._last_chunk_at < SAMPLES_FLUSH_SECONDS
        )

    def _save_progress(self, *, final: bool, deadline: float | None) -> None:
        """The latest progress; one try while more pumps follow, else retried until ``deadline``
        (the logs are shipped whether or not it is saved)."""
        progress = self.latest_progress
        if not self._progress_unsaved or progress is None:
            return
        if final:
            saved = self._write(
                lambda: write_progress(self._once, self.project, self.job, progress), "progress", deadline
            )
            self._progress_unsaved = not saved
            return
        try:
            write_progress(self._once, self.project, self.job, progress)
            self._progress_unsaved = False
        except Exception as exc:  # retried on the next pump
            log.warning("progress write failed error=%s", exc)

    def finalize(self, reason: str, deadline: float | None = None) -> bool:
        """Write the final marker; without a deadline, one try."""
        marker = FinalMarker(next_seq=self.next_seq, attempt=self.config.attempt, reason=reason)
        return self._write(
            lambda: write_final(self._once, self.project, self.job, marker),
            "final marker",
            self.clock() if deadline is None else deadline,
        )


@dataclass(frozen=True)
class ProgramStatus:
    status: RunnerStatus
    return_code: int | None = None
    cancelled: bool = False
    reason: str = ""
    #: The program's streams (`out`, `err`) whose log file could not be written to the end.
    logs_cut: tuple[str, ...] = ()


#: The entry script's names of the program's streams, and their log files' names.
_STREAM_LOG_FILES: Final = {"out": LOG_FILE_NAMES[0], "err": LOG_FILE_NAMES[1]}


def read_status_file(path: Path, root: str | None = None) -> ProgramStatus | None:
    """The entry script's status, or None while it is absent or still being written. Read below
    `root` (the shared dir; default: the file's directory) without following symlinks."""
    text = read_beneath(root or str(path.parent), path)
    if text is None:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            fields[k] = v
    if fields.get("end") != "1":
        return None
    phase = fields.get("phase", "")
    cancelled = fields.get("cancelled") == "1"
    reason = fields.get("reason", "")
    cut = tuple(s for s in fields.get("cut", "").split(",") if s in _STREAM_LOG_FILES)
    if phase == "run":
        try:
            rc: int | None = int(fields.get("rc", ""))
        except ValueError:
            rc = None
        return ProgramStatus(RunnerStatus.EXITED, rc, cancelled, reason, cut)
    if phase == "cancelled":
        return ProgramStatus(RunnerStatus.CANCELLED, None, True, reason or "cancelled")
    return ProgramStatus(RunnerStatus.SETUP_FAILED, None, cancelled, reason or "setup failed")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


#: Entries of one directory output that the result names one by one; beyond them it counts (the
#: system log names them all): a termination message is 4 KiB.
MAX_ENTRY_ERRORS = 20
#: Entries named over all of a job's directory outputs: each named one becomes a file error in the
#: job's status, which must stay far below etcd's object size (100 outputs x 20 would not).
MAX_NAMED_ENTRIES = 100


@dataclass
class _NamingBudget:
    left: int = MAX_NAMED_ENTRIES


@dataclass
class _LostEntries:
    """Entries of a directory output that its zip lacks (unreadable, name not UTF-8): data the
    job wrote and the user does not get, so each is a file error of that output. Entries left out
    on purpose (`skipped`) go to the system log; the links leading outside are counted in one."""

    declared: str
    var: str | None
    index: int
    syslog: Callable[[str], None]
    budget: _NamingBudget
    named: list[str] = field(default_factory=list)
    more: int = 0
    #: Symlinks leading out of the working directory, not followed: one file error counts them
    #: (a dataset file linked into the output is missing from it; a virtualenv's links are many).
    links_outside: int = 0
    first_link_outside: str = ""

    def skipped(self, entry: str, why: str) -> None:
        """An entry deliberately left out (dangling or directory links, sockets): the system log
        tells it; links leading outside are also counted for the user."""
        self.syslog(f"output {self.declared}: skipped {entry} ({why})")
        if why == LINK_OUTSIDE:
            self.links_outside += 1
            self.first_link_outside = self.first_link_outside or entry

    def __call__(self, entry: str, why: str) -> None:
        self.syslog(f"output {self.declared}: {entry} not uploaded ({why})")
        if len(self.named) < MAX_ENTRY_ERRORS and self.budget.left > 0:
            self.budget.left -= 1
            self.named.append(f"{entry} is not in the uploaded zip ({why})")
        else:
            self.more += 1

    @property
    def count(self) -> int:
        return len(self.named) + self.more

    def file_errors(self) -> list[FileError]:
        texts = list(self.named)
        if self.more:
            texts.append(f"{self.more} more entries are not in the uploaded zip (see .system.log)")
        if self.links_outside:
            n = self.links_outside
            texts.append(
                f"{n} symlink{'s' if n > 1 else ''} leading outside the working directory not followed, "
                f"e.g. {self.first_link_outside} (copy the files into the output to ship them; see .system.log)"
            )
        return [
            FileError(
                type=FileErrorType.UPLOAD_FAILED,
                description=text[:1000],
                path=self.declared,
                var=self.var,
                index=self.index,
            )
            for text in texts
        ]


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


@dataclass(frozen=True)
class ZipBound:
    """What `_zip_bound` finds of a directory before it is zipped."""

    #: More than the zip can take: the streamed upload's part size comes from it.
    size: int
    entries: int
    #: What zipping it holds in memory to the end: a central directory record per entry.
    memory: int
    #: A directory below it whose path is too long to list by name (ENAMETOOLONG): what lies
    #: below is not counted, so the bound holds only without it.
    too_long: str = ""


#: Memory an entry of a zip holds until the end (Python's ZipInfo and its name: ~580 bytes
#: measured with short names), plus twice its name's length (~1 KB with 350-byte paths).
ZIP_BYTES_PER_ENTRY = 600
#: The ship container's memory besides the zip's entries and the part buffers: the interpreter,
#: the storage client, the log shipper.
SHIP_BASE_BYTES = 128 * 1024 * 1024
#: Entries any directory output may have whatever the memory limit says (a tight limit must not
#: refuse a directory of a few files).
MIN_ZIP_ENTRIES = 10_000


def _zip_bound(directory: str, work: str) -> ZipBound:
    """How big a zip of ``directory`` can get (its files' sizes, the files its symlinks lead to
    inside the working dir ``work`` included, plus headers; deflate grows nothing by more than a
    little), its entries, and the memory they take. Only sizes are read, without recursion
    (nesting of any depth is counted), and without holding a listing (a directory may have
    millions of files)."""
    total = entries = memory = 0
    too_long = ""
    pending = [directory]
    while pending:
        path = pending.pop()
        try:
            it = os.scandir(path)
        except OSError as exc:
            # The zipper walks by descriptor and would store what this walk cannot see.
            if exc.errno == errno.ENAMETOOLONG and not too_long:
                too_long = path
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif (
                        entry.is_symlink() and entry.is_file() and _inside(work, os.path.realpath(entry.path))
                    ):
                        st = entry.stat()  # stored as its file (a link elsewhere is skipped)
                except OSError as exc:
                    if exc.errno == errno.ENAMETOOLONG and not too_long:
                        too_long = entry.path
                    continue
                # Headers: local, data descriptor and central directory entries with zip64 extras.
                total += st.st_size + st.st_size // 1024 + 2 * len(entry.path) + 200
                entries += 1
                memory += ZIP_BYTES_PER_ENTRY + 2 * len(entry.path)
    return ZipBound(total + 1024, entries, memory, too_long)


def zip_fits(bound: ZipBound, memory_limit: int | None) -> bool:
    """Whether zipping a directory of `bound` stays within the ship container's memory limit
    (None: no limit known), its upload's part buffers counted."""
    if memory_limit is None or bound.entries <= MIN_ZIP_ENTRIES:
        return True
    return SHIP_BASE_BYTES + part_buffers_bytes(bound.size) + bound.memory <= memory_limit


#: Why a file the job wrote may be unreadable to the runner, told with such a refusal.
_READABLE_BY_ALL = " (it is read by another user than the job's: it must be readable by all)"


@dataclass
class StoreTrouble:
    """The first upload the object store failed past the storage client's retries (connection
    trouble, 5xx, timeouts): the uploads after it are not tried (each would wait out the same
    patience), and the job's result says the store, not the job, lost its files."""

    #: One request to the store, tried once (None: none asked): the failure may have been the
    #: job's own file (a network file system's timeout) or one object's, not the store's.
    probe: Callable[[], object] | None = None
    first: str | None = None

    @classmethod
    def of(cls, store: ObjectStore, config: RunnerConfig) -> StoreTrouble:
        once = single_try(store)
        return cls(lambda: once.head(result_key(config.project_id, config.job_id)))

    def note(self, what: str, exc: BaseException) -> None:
        if self.first is not None or not is_transient(exc):
            return
        if self.probe is not None:
            try:
                self.probe()
            except Exception as probe_exc:
                if not is_transient(probe_exc):
                    return
            else:
                return  # the store answers: this upload's own trouble
        self.first = f"{what}: {type(exc).__name__}: {exc}"[:500]

    def skipped(self) -> str | None:
        """Why an upload is not tried, or None when it should be."""
        if self.first is None:
            return None
        return f"not uploaded: the object store kept failing (on {self.first})"


def _upload_output(
    config: RunnerConfig,
    store: Storage,
    index: int,
    out: OutputFile,
    syslog: Callable[[str], None],
    lost: _LostEntries,
    trouble: StoreTrouble,
) -> OutputResult | FileError:
    declared = lost.declared

    def fail(kind: FileErrorType, description: str) -> FileError:
        syslog(f"output {declared}: {description}")
        return FileError(type=kind, description=description, path=declared, var=out.var, index=index)

    skipped = trouble.skipped()
    if skipped is not None:
        return fail(FileErrorType.UPLOAD_FAILED, skipped)

    local = config.work_dir / out.path
    key = output_key(config.project_id, config.job_id, out.path)
    # Inside the try: the job's leftovers may change a symlink while it is resolved (realpath
    # then raises), which is this output's failure, not the runner's.
    try:
        try:
            os.lstat(local)
        except (FileNotFoundError, NotADirectoryError):
            return fail(FileErrorType.NOT_FOUND, f"output file {declared} was not created by the job")
        except PermissionError as exc:  # a directory on its way the job made 0700
            return fail(FileErrorType.UPLOAD_FAILED, f"refused: {exc.strerror}{_READABLE_BY_ALL}")
        real = os.path.realpath(local)
        work = os.path.realpath(config.work_dir)
        if not _inside(work, real):
            # A symlink out of the working dir could expose the runner's own files.
            return fail(FileErrorType.UPLOAD_FAILED, "refused: it resolves outside the working directory")
        if os.path.isdir(real):
            # Opened below the working dir without following links, and zipped from that fd: a
            # directory swapped for a symlink (to the runner's Secret) since the check is refused.
            try:
                dir_fd = open_dir_beneath(work, real)
            except RefusedFile as exc:
                return fail(FileErrorType.UPLOAD_FAILED, f"refused: {exc.strerror or exc}")
            try:
                work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except BaseException:
                os.close(dir_fd)
                raise
            zipped: list[int] = []

            def produce(dest: BinaryIO) -> None:
                # Entries are named after the declared path, not after what a symlink points to:
                # the client extracts them where it expects <basename>/.
                zipped.append(
                    zip_directory(
                        dir_fd,
                        dest,
                        arcname=PurePosixPath(out.path).name,
                        on_skip=lost.skipped,
                        on_error=lost,
                        # Links inside it are followed as the output itself is: when they
                        # resolve inside the working dir.
                        links=LinkRoot(
                            work_fd,
                            os.path.relpath(real, work),
                            # Absolute links name it as the job sees it.
                            tuple(dict.fromkeys((os.path.abspath(config.work_dir), work))),
                        ),
                    )
                )

            try:
                bound = _zip_bound(real, work)
                if bound.too_long:
                    return fail(
                        FileErrorType.UPLOAD_FAILED,
                        f"not uploaded: it holds paths longer than the system lets the runner measure "
                        f"({len(bound.too_long.encode(errors='surrogateescape'))} bytes and more, "
                        "over PATH_MAX): shorten its names or its nesting",
                    )
                if not zip_fits(bound, memory_limit()):
                    # Told, instead of the ship container's OOM kill losing every output's record.
                    return fail(
                        FileErrorType.UPLOAD_FAILED,
                        f"not uploaded: the directory has {bound.entries} entries, more than the runner "
                        "can zip within its memory limit; archive them into fewer files (e.g. tar), or "
                        "ask the admin for a larger DSJOBS_RUNNER_MEMORY_LIMIT",
                    )
                # Zipped straight into the upload: a directory as big as the working dir's limit
                # needs no second copy on the node's disk.
                res = store.upload_stream(key, produce, content_type="application/zip", size_hint=bound.size)
            finally:
                os.close(dir_fd)
                os.close(work_fd)
            n = zipped[0]
            compression = Compression.ZIP
            left_out = f"; left out: {lost.count}" if lost.count else ""
            syslog(
                f"output {declared}: directory of {n} files uploaded as zip ({human_size(res.size)}){left_out}"
            )
        elif os.path.isfile(real) and real != work:
            # Opened again below the working dir without following links: the check above and
            # the read are then of one file, whatever the job's leftovers do in between.
            try:
                fd = open_beneath(work, real)
            except RefusedFile as exc:
                return fail(FileErrorType.UPLOAD_FAILED, f"refused: {exc.strerror or exc}")
            with os.fdopen(fd, "rb") as f:
                res = store.upload_file(f, key)
            compression = Compression.NONE
            syslog(f"output {declared}: uploaded ({human_size(res.size)})")
        else:
            return fail(FileErrorType.UPLOAD_FAILED, "not a regular file or directory")
    except PermissionError as exc:
        return fail(FileErrorType.UPLOAD_FAILED, f"upload failed: {exc.strerror}{_READABLE_BY_ALL}")
    except Exception as exc:
        trouble.note(f"output {declared}", exc)
        return fail(FileErrorType.UPLOAD_FAILED, f"upload failed: {type(exc).__name__}: {exc}"[:1000])
    return OutputResult(
        path=declared,
        var=out.var,
        index=index,
        key=key,
        sha256=res.sha256,
        size_bytes=res.size,
        compression=compression,
    )


def upload_outputs(
    config: RunnerConfig,
    store: Storage,
    syslog: Callable[[str], None],
    trouble: StoreTrouble | None = None,
) -> tuple[list[OutputResult], list[FileError]]:
    """Upload each declared output; missing ones are NOT_FOUND, failures UPLOAD_FAILED, as are the
    entries a directory's zip lacks (the rest of the directory is uploaded)."""
    outputs: list[OutputResult] = []
    errors: list[FileError] = []
    budget = _NamingBudget()
    trouble = trouble if trouble is not None else StoreTrouble.of(store, config)
    for i, out in enumerate(config.outputs):
        lost = _LostEntries(out.desc_path or out.path, out.var, i, syslog, budget)
        r = _upload_output(config, store, i, out, syslog, lost, trouble)
        if isinstance(r, OutputResult):
            outputs.append(r)
            errors.extend(lost.file_errors())
        else:
            errors.append(r)
    return outputs, errors


def upload_log_files(
    config: RunnerConfig, store: Storage, trouble: StoreTrouble | None = None
) -> tuple[list[LogFileResult], list[FileError]]:
    """Upload the non-empty raw log files. An empty one gets no object (DownloadStdLogs leaves its
    URL out; NOT_FOUND when both are empty); an earlier attempt's is gone (`LogShipper.resume`)."""
    layout = config.layout
    return _upload_raw_files(
        config,
        store,
        zip(LOG_FILE_NAMES, (layout.stdout, layout.stderr, layout.system_log), strict=True),
        trouble,
    )


def cut_log_errors(status: ProgramStatus) -> list[FileError]:
    """A file error for each log file the entry script could not write all of the program's
    output to: what is stored of it ends early, which nothing else would tell."""
    return [
        FileError(
            type=FileErrorType.UPLOAD_FAILED,
            log_file_name=_STREAM_LOG_FILES[stream],
            description=(
                f"{_STREAM_LOG_FILES[stream]} is incomplete: the program's std{stream} could not all be "
                "written to it on the job's disk (full?); the pod's container log has the rest"
            ),
        )
        for stream in status.logs_cut
    ]


def upload_diagnostic_files(
    config: RunnerConfig, store: Storage, trouble: StoreTrouble | None = None
) -> tuple[list[LogFileResult], list[FileError]]:
    """Upload the resource-usage samples the entry script wrote (docker_stats.tsv, gpu_stats.tsv)."""
    return _upload_raw_files(config, store, ((f.name, f) for f in config.layout.diagnostic_files), trouble)


def _upload_raw_files(
    config: RunnerConfig,
    store: Storage,
    files: Iterable[tuple[str, Path]],
    trouble: StoreTrouble | None = None,
) -> tuple[list[LogFileResult], list[FileError]]:
    """Each non-empty file under the job's `logs/files/<name>`; the job may have replaced one by
    a symlink or a special file, which is not read (an UPLOAD_FAILED error)."""
    stored: list[LogFileResult] = []
    errors: list[FileError] = []
    shared = config.paths.shared_dir
    trouble = trouble if trouble is not None else StoreTrouble.of(store, config)
    for name, path in files:
        key = log_file_key(config.project_id, config.job_id, name)
        try:
            fd = open_beneath(shared, path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(
                FileError(
                    type=FileErrorType.UPLOAD_FAILED,
                    log_file_name=name,
                    description=f"not uploaded: {exc.strerror or exc}",
                )
            )
            continue
        try:
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    continue
                if size > MAX_SHIPPED_BYTES:
                    # As much as its records ship: a bigger one (a sparse file costs the job no
                    # disk) would take hours of the pod and that much of the store.
                    errors.append(
                        FileError(
                            type=FileErrorType.UPLOAD_FAILED,
                            log_file_name=name,
                            description=f"not uploaded: {size} bytes, over the {MAX_SHIPPED_BYTES >> 30} GiB "
                            "a log file may have",
                        )
                    )
                    continue
                skipped = trouble.skipped()
                if skipped is not None:
                    errors.append(
                        FileError(type=FileErrorType.UPLOAD_FAILED, log_file_name=name, description=skipped)
                    )
                    continue
                res = store.upload_file(f, key, content_type="text/plain")
        except Exception as exc:
            trouble.note(f"log file {name}", exc)
            errors.append(
                FileError(
                    type=FileErrorType.UPLOAD_FAILED,
                    log_file_name=name,
                    description=f"upload failed: {type(exc).__name__}: {exc}"[:1000],
                )
            )
            continue
        stored.append(LogFileResult(name=name, key=key, sha256=res.sha256, size_bytes=res.size))
    return stored, errors


def _present(path: Path) -> bool:
    """Whether something is at `path`, whatever it is; a path the job made unreadable (`chmod 0`
    on its directory: EACCES) counts as there, where Path.exists raised."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def write_termination_message(text: str, path: str | None = None) -> None:
    target = path or os.environ.get(ENV_TERMINATION_LOG) or DEFAULT_TERMINATION_LOG
    try:
        with open(target, "w") as f:
            f.write(text)
    except OSError as exc:
        log.warning("cannot write termination message path=%s error=%s", target, exc)


class Ship:
    """The sidecar's main loop. `request_stop` is what SIGTERM calls."""

    def __init__(
        self,
        config: RunnerConfig,
        store: Storage,
        *,
        termination_log: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.store = store
        self.termination_log = termination_log
        self.clock = clock
        self.sleep = sleep
        self.layout = config.layout
        self.syslog = SystemLog(self.layout.system_log, "ship")
        self.shipper = LogShipper(store, config, clock=clock, sleep=sleep, syslog=self.syslog)
        self.stop_requested = False
        #: The kind of the last unexpected error of the log shipping (told once per kind).
        self._ship_error: str | None = None
        #: Read end of the entry script's liveness FIFO, once opened.
        self._alive_fd: int | None = None
        #: The FIFO has had a writer (the entry script) at some read.
        self._alive_seen = False
        #: When to look for the operator's word that the cancel is forced next, and whether it came.
        self._forced_check_at = -math.inf
        self._forced = False
        #: One try per look: a store that is down must not hold up the wait for the program.
        self._store_once = single_try(store)

    def request_stop(self) -> None:
        # Pod deletion: if the job runs, its entry script got SIGTERM too and will finish (within
        # its graceful timeout); we keep shipping until then. Before it starts, we stop now.
        self.stop_requested = True

    def ship_logs(self, *, final: bool, deadline: float) -> bool:
        """`LogShipper.ship`; False also when it fails unexpectedly (a bug, a file it trips
        over): that may cost logs, which the result then reports, but never the job's result
        and termination message. The positions advance only with stored chunks, so the next
        call tries again from where the stored logs end."""
        try:
            return self.shipper.ship(final=final, deadline=deadline)
        except PreconditionFailedError:
            raise  # someone else writes this job's logs: stop before touching them
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.shipper.last_error = error
            if type(exc).__name__ != self._ship_error:
                # Once per kind (not per message, which may vary): while the program runs this
                # is tried every flush interval, and the system log is shipped too.
                log.exception("log shipping failed")
                self.syslog(f"log shipping failed: {error}"[:1000])
            self._ship_error = type(exc).__name__
            return False

    def _watch_for_forced_cancel(self) -> None:
        """Once the pod is being deleted, look every FORCED_CANCEL_POLL_SECONDS for the operator's
        word that the cancel is forced (`forced_cancel_key`), and pass it on to the entry script's
        graceful timer (`SharedLayout.kill_now`): the pod's grace is the graceful one either way,
        for this container to store the logs after the program. Only a job with graceful-shutdown
        parameters waits for anything: without them its program is SIGKILLed at the first signal."""
        if not self.stop_requested or self._forced or self.config.graceful_shutdown is None:
            return
        now = self.clock()
        if now < self._forced_check_at:
            return
        self._forced_check_at = now + FORCED_CANCEL_POLL_SECONDS
        try:
            data = self._store_once.get_bytes(forced_cancel_key(self.config.project_id, self.config.job_id))
            told = data is not None and json.loads(data).get("attempt") == self.config.attempt
        except Exception as exc:  # the store down: the timer's timeout still ends the program
            log.warning("cannot read the forced-cancel word: %s", exc)
            return
        if not told:
            return
        self._forced = True
        try:
            run = open_dir_beneath(self.config.paths.shared_dir, self.layout.run_dir)
            try:
                fd = os.open(
                    self.layout.kill_now.name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=run,
                )
                os.close(fd)
            finally:
                os.close(run)
        except FileExistsError:
            pass
        except (OSError, RefusedFile) as exc:
            log.warning("cannot tell the entry script the cancel is forced: %s", exc)
            return
        self.syslog("the cancel is forced: the program is killed now, without its graceful-shutdown timeout")

    def _entry_alive(self) -> bool | None:
        """Whether the entry script still holds its liveness FIFO open (`SharedLayout.alive`):
        False once it is gone, None when there is no FIFO to tell (then the heartbeat judges)."""
        if self._alive_fd is None:
            try:
                run = open_dir_beneath(self.config.paths.shared_dir, self.layout.run_dir)
            except (OSError, RefusedFile):
                return None
            try:
                fd = os.open(
                    self.layout.alive.name,
                    os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=run,
                )
            except OSError:
                return None
            finally:
                os.close(run)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
                return None
            self._alive_fd = fd
        try:
            # Nothing is written to it (what a job writes is dropped): EOF means no writer is left.
            while os.read(self._alive_fd, 65536):
                pass
        except BlockingIOError:
            self._alive_seen = True
            return True
        except OSError:
            return None
        # EOF tells only once a writer was seen: a script that could not open it (its `|| :`), or
        # a runtime that does not share FIFOs between containers, leaves the heartbeat to judge.
        return False if self._alive_seen else None

    def wait_for_program(self) -> ProgramStatus:
        settings = self.config.ship
        beat: str | None = None
        beat_changed: float | None = None
        stalled_told = False
        # Remembered: the job may delete the file afterwards (or the run dir), and the program's
        # end must still be judged by the liveness FIFO and the heartbeat.
        started = False
        try:
            while True:
                # Only the writes due now: while storage fails, the program's end must still be seen.
                self.ship_logs(final=False, deadline=self.clock())
                self._watch_for_forced_cancel()
                status = read_status_file(self.layout.status, self.config.paths.shared_dir)
                if status is not None:
                    return status
                now = self.clock()
                alive = self._entry_alive()
                # A writer seen on the FIFO is the entry script running, too: a job that deletes
                # `started` (or the run dir) before this loop saw it, left nothing else to tell.
                started = started or self._alive_seen or _present(self.layout.started)
                if started:
                    current = read_beneath(self.config.paths.shared_dir, self.layout.heartbeat)
                    if current != beat or beat_changed is None:
                        if stalled_told and current != beat:
                            self.syslog("the job container's heartbeat is back")
                            stalled_told = False
                        beat, beat_changed = current, now
                    stalled = now - beat_changed > settings.heartbeat_timeout_seconds
                    if alive is False or (alive is None and stalled):
                        # One last look: the status may have landed just now.
                        status = read_status_file(self.layout.status, self.config.paths.shared_dir)
                        return status or ProgramStatus(
                            RunnerStatus.LOST,
                            None,
                            self.stop_requested,
                            "the job container stopped without recording an exit status "
                            "(killed, e.g. out of memory?)",
                        )
                    if stalled and not stalled_told:
                        # Alive but stalled (thrashing, a hung disk): its outputs are not final,
                        # so nothing is uploaded until it ends.
                        self.syslog(
                            f"the job container's heartbeat has not moved for {now - beat_changed:.0f}s; "
                            "its entry script still runs: waiting for it"
                        )
                        stalled_told = True
                elif self.stop_requested:
                    return ProgramStatus(
                        RunnerStatus.NOT_STARTED, None, True, "stopped before the job started"
                    )
                self.sleep(settings.flush_interval_seconds)
        finally:
            if self._alive_fd is not None:
                os.close(self._alive_fd)
                self._alive_fd = None

    def _result(
        self,
        status: ProgramStatus,
        outputs: list[OutputResult],
        errors: list[FileError],
        trouble: StoreTrouble,
        **more: Any,
    ) -> RunnerResult:
        cfg = self.config
        return RunnerResult(
            project_id=cfg.project_id,
            job_id=cfg.job_id,
            attempt=cfg.attempt,
            status=status.status,
            return_code=status.return_code,
            cancelled=status.cancelled,
            reason=status.reason,
            outputs=outputs,
            file_errors=errors,
            storage_unavailable=trouble.first is not None or None,
            log_end_offset=self.shipper.end_offset,
            finished_at=datetime.now(UTC),
            **more,
        )

    def run(self) -> RunnerResult:
        cfg = self.config
        # The shipper resumes (after stage-in's chunks) on its first call, in the wait below.
        self.syslog("shipping logs")
        status = self.wait_for_program()
        if status.status == RunnerStatus.EXITED:
            what = f"exit code {status.return_code}" + (" (cancelled)" if status.cancelled else "")
        else:
            what = f"{status.status.value}: {status.reason}"
        self.syslog(f"job finished: {what}")
        drain_deadline = self.clock() + FINAL_FLUSH_SECONDS
        self.ship_logs(final=True, deadline=drain_deadline)
        uploads_started = self.clock()

        outputs: list[OutputResult] = []
        errors: list[FileError] = []
        trouble = StoreTrouble.of(self.store, cfg)
        if status.status in (RunnerStatus.EXITED, RunnerStatus.LOST):
            outputs, errors = upload_outputs(cfg, self.store, self.syslog, trouble)
            # Told now, rewritten at the end: the raw log files (gigabytes after days of chatty
            # output) may outlast the pod's grace (a cancel gives 15 s), and a SIGKILL then must
            # not cost the outputs already stored their record.
            so_far = self._result(status, outputs, errors, trouble, provisional=True)
            message = termination_message(so_far)
            if message != so_far.to_json() and trouble.first is None:
                try:  # a pointer: to this result, not an earlier attempt's
                    store_result(self.store, so_far)
                except Exception as exc:
                    log.warning("cannot store result.json error=%s", exc)
            write_termination_message(message, self.termination_log)
        log_files, log_errors = upload_log_files(cfg, self.store, trouble)
        errors.extend(log_errors)
        errors.extend(cut_log_errors(status))
        diagnostic_files, diagnostic_errors = upload_diagnostic_files(cfg, self.store, trouble)
        errors.extend(diagnostic_errors)
        self.syslog(f"{len(outputs)} outputs uploaded, {len(errors)} file errors")
        if trouble.first is not None:
            self.syslog(f"the object store kept failing past the retries, first on {trouble.first}")

        # The uploads' own time (a checkpoint of many GiB takes longer than the whole window, with
        # storage working all along) is no time waited for the logs: the last flush and the final
        # marker get what the drain left of the window, from now. Not a whole new window: when
        # storage was down for the drain, the pod's end must not wait for it twice.
        deadline = self.clock() + (drain_deadline - uploads_started)
        shipped = self.ship_logs(final=True, deadline=deadline)
        finalized = shipped and self.shipper.finalize(what, deadline=deadline)
        if not finalized:
            errors.append(
                FileError(
                    type=FileErrorType.UPLOAD_FAILED,
                    log_file_name=SYSTEM_LOG_PATH,
                    description=f"job logs could not be stored completely: {self.shipper.last_error}"[:1000],
                )
            )
        result = self._result(
            status,
            outputs,
            errors,
            trouble,
            log_files=log_files,
            diagnostic_files=diagnostic_files,
            progress=ProgressResult.of(self.shipper.latest_progress),
            logs_complete=finalized,
        )
        try:
            store_result(self.store, result)
        except Exception as exc:
            log.warning("cannot store result.json error=%s", exc)
            if is_transient(exc):
                # The operator may get only the termination message's pointer to it.
                result = replace(result, storage_unavailable=True)
        write_termination_message(termination_message(result), self.termination_log)
        log.info(
            "ship done status=%s rc=%s outputs=%d file_errors=%d log_end=%d",
            result.status.value,
            result.return_code,
            len(outputs),
            len(errors),
            self.shipper.end_offset,
        )
        return result
