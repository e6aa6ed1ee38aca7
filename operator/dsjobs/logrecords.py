"""The stored log format: ordered, resumable, loss-free records of a job's output.

Layout under ``projects/<project>/jobs/<job>/logs/``::

    chunks/<seq:012d>     immutable chunk objects, seq = 0, 1, 2, ... without gaps
    final.json            final marker: the writer is done, ``next_seq`` chunks exist
    progress.json         latest job progress (overwritten; convenience for the API)
    files/<name>          raw log files uploaded at the end (stdout.txt, stderr.txt, system.log)

``progress.json`` and ``files/`` are the current attempt's: a new attempt's first writer deletes
the previous attempt's (and its final marker) before it writes (dsjobs.runner.ship).

A record is one piece of one stream: program stdout (OUT), stderr (ERR) or a named file
(FILE, ``file_path`` e.g. ``.system.log`` or ``job_progress.jsonl``), with its creation time and
raw bytes. Records hold whole lines when possible (several lines may share one record); a line
longer than `MAX_RECORD_CONTENT`, or a partial line that stayed unterminated for a while, is cut
(never inside a UTF-8 character, but at the stream's very end) - so the concatenated contents of
a stream's records are exactly the bytes the program wrote.

Offsets (the int64 of the API's ReadLogs/ReadStdLogs) address records directly::

    offset = seq * CHUNK_SLOT + index_in_chunk          CHUNK_SLOT = 2**20

They are sparse but strictly increasing along the stream, so a reader can resume from any offset
it was handed and never sees a record twice or out of order: the chunk is one GET away and the
index skips what was already read. Chunks are written strictly in sequence by a single writer,
each PUT completing before the next starts (conditional PUT: never replaced), so there is no
read-modify-write anywhere and S3's read-after-write consistency is all that is needed.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, NamedTuple

from dsjobs.storage import ObjectStore, log_prefix

CHUNK_SLOT_BITS = 20
#: Records per chunk are capped by this; offsets reserve this many slots per chunk.
CHUNK_SLOT = 1 << CHUNK_SLOT_BITS
#: Largest content of one record; longer lines are cut (at a UTF-8 character boundary).
MAX_RECORD_CONTENT = 64 * 1024
#: File paths of the system files DataSphere clients know.
SYSTEM_LOG_PATH = ".system.log"
PROGRESS_LOG_PATH = "job_progress.jsonl"
DOCKER_STATS_LOG_PATH = ".docker_stats.tsv"
GPU_STATS_LOG_PATH = ".gpu_stats.tsv"

_MAGIC = b"DSJLOG\x01\n"
_REC = struct.Struct(">BQHI")  # stream, created_ns, len(file_path), len(content)
_HDR_LEN = struct.Struct(">I")
_MAX_SEQ = (1 << (63 - CHUNK_SLOT_BITS)) - 1


class LogFormatError(ValueError):
    """Bytes that are not a valid chunk."""


class Stream(IntEnum):
    OUT = 1
    ERR = 2
    FILE = 3


@dataclass(frozen=True, slots=True)
class LogRecord:
    stream: Stream
    content: bytes
    created_ns: int
    file_path: str | None = None

    def __post_init__(self) -> None:
        if (self.stream == Stream.FILE) != (self.file_path is not None):
            raise ValueError("FILE records need a file_path; OUT/ERR records must not have one")
        if self.file_path is not None and not (0 < len(self.file_path.encode()) <= 1024):
            raise ValueError("file_path must be 1..1024 bytes")
        if not 0 <= self.created_ns < 1 << 64:
            raise ValueError("created_ns out of range")

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created_ns / 1e9, tz=UTC)


@dataclass(frozen=True)
class LogChunk:
    seq: int
    records: tuple[LogRecord, ...]
    attempt: int = 0
    #: Opaque writer state (e.g. source file positions) so a restarted writer resumes exactly.
    resume: Mapping[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Pure encode / decode
# ---------------------------------------------------------------------------------------------


def make_offset(seq: int, index: int) -> int:
    if not 0 <= seq <= _MAX_SEQ or not 0 <= index < CHUNK_SLOT:
        raise ValueError(f"no offset for chunk {seq} index {index}")
    return (seq << CHUNK_SLOT_BITS) | index


def split_offset(offset: int) -> tuple[int, int]:
    if offset < 0:
        raise ValueError("negative offsets mean 'from now' and must be resolved first")
    return offset >> CHUNK_SLOT_BITS, offset & (CHUNK_SLOT - 1)


def encode_chunk(chunk: LogChunk) -> bytes:
    if not chunk.records:
        raise ValueError("a chunk holds at least one record")
    if len(chunk.records) > CHUNK_SLOT:
        raise ValueError(f"a chunk holds at most {CHUNK_SLOT} records")
    header = json.dumps(
        {
            "seq": chunk.seq,
            "count": len(chunk.records),
            "attempt": chunk.attempt,
            "resume": dict(chunk.resume),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    out = [_MAGIC, _HDR_LEN.pack(len(header)), header]
    for r in chunk.records:
        path = r.file_path.encode() if r.file_path is not None else b""
        out.append(_REC.pack(int(r.stream), r.created_ns, len(path), len(r.content)))
        out.append(path)
        out.append(r.content)
    return b"".join(out)


def decode_chunk(data: bytes) -> LogChunk:
    if not data.startswith(_MAGIC):
        raise LogFormatError("not a dsjobs log chunk (bad magic)")
    pos = len(_MAGIC)
    try:
        (hlen,) = _HDR_LEN.unpack_from(data, pos)
        pos += _HDR_LEN.size
        header = json.loads(data[pos : pos + hlen])
        pos += hlen
        count = int(header["count"])
        records: list[LogRecord] = []
        for _ in range(count):
            kind, created, plen, clen = _REC.unpack_from(data, pos)
            pos += _REC.size
            if pos + plen + clen > len(data):
                raise LogFormatError("truncated record")
            path = data[pos : pos + plen].decode() if plen else None
            pos += plen
            content = data[pos : pos + clen]
            pos += clen
            records.append(LogRecord(Stream(kind), content, created, path))
    except (struct.error, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LogFormatError(f"corrupt chunk: {exc}") from exc
    except ValueError as exc:
        raise LogFormatError(f"corrupt chunk: {exc}") from exc
    if pos != len(data):
        raise LogFormatError("trailing bytes after the last record")
    resume = header.get("resume") or {}
    return LogChunk(
        seq=int(header["seq"]),
        records=tuple(records),
        attempt=int(header.get("attempt", 0)),
        resume={str(k): int(v) for k, v in resume.items()},
    )


def _utf8_cut(data: bytes, limit: int) -> int:
    """A cut position <= limit that does not split a UTF-8 character (when the data is UTF-8).

    Clients decode each record on its own; a character cut in half would make both records
    undecodable.
    """
    if limit >= len(data):
        return len(data)
    cut = limit
    # Back off over at most 3 continuation bytes (10xxxxxx) to the start of the character.
    while cut > limit - 3 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 and (data[cut] & 0xC0) != 0x80 else limit


def _incomplete_utf8_tail(data: bytes) -> int:
    """How many trailing bytes (0-3) begin a UTF-8 character whose other bytes are not there (yet).

    Bytes that are not UTF-8 (a stray continuation byte, 0xF8-0xFF) count as complete: only the
    start of a valid multi-byte sequence is worth waiting for.
    """
    n = len(data)
    i = n - 1
    while i >= 0 and n - i <= 3 and (data[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0:
        return 0
    lead = data[i]
    if lead & 0xE0 == 0xC0:
        need = 2
    elif lead & 0xF0 == 0xE0:
        need = 3
    elif lead & 0xF8 == 0xF0:
        need = 4
    else:
        return 0
    have = n - i
    return have if have < need else 0


def split_records(
    data: bytes, *, flush_partial: bool, eof: bool = False, max_content: int = MAX_RECORD_CONTENT
) -> tuple[list[bytes], int]:
    """Cut a stream's unread bytes into record contents. Returns (contents, bytes consumed).

    Complete lines are grouped into records of at most ``max_content`` bytes; a longer line is
    cut at a UTF-8 character boundary. An unterminated tail is kept back (consumed = less than
    len(data)) unless ``flush_partial`` is set or it alone fills a record; even then a character
    whose bytes are not all there yet (1-3 bytes at the very end) waits for the rest, as the
    next read continues from it. ``eof`` says ``data`` ends where the stream ends for good (the
    program is done): everything is consumed, an incomplete last character as written.
    Concatenating the contents always gives ``data[:consumed]``.
    """
    if max_content < 4:
        raise ValueError("max_content too small")
    flush = flush_partial or eof
    out: list[bytes] = []
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    pos = 0
    while pos < end:
        if end - pos <= max_content:
            out.append(data[pos:end])
            pos = end
            break
        window_end = pos + max_content
        nl = data.rfind(b"\n", pos, window_end)
        # As many whole lines as fit, else cut the overlong line.
        cut = nl + 1 if nl >= 0 else pos + _utf8_cut(data[pos : window_end + 1], max_content)
        out.append(data[pos:cut])
        pos = cut
    # Unterminated tail.
    while pos < len(data):
        rest = len(data) - pos
        if rest < max_content and not flush:
            break
        if rest > max_content:
            cut = pos + _utf8_cut(data[pos : pos + max_content + 1], max_content)
        elif eof:
            cut = len(data)
        else:
            # The tail ends where the bytes read so far do: a character may go on past them.
            cut = len(data) - _incomplete_utf8_tail(data[max(pos, len(data) - 4) :])
            if cut == pos:
                break
        out.append(data[pos:cut])
        pos = cut
    return out, pos


# At most this many messages are made of one record that is not all UTF-8 (`utf8_pieces`).
MAX_PIECES = 32


def utf8_pieces(content: bytes) -> list[bytes]:
    """A record's content cut where UTF-8 lines meet lines that are not, for clients that decode
    each message whole: the official CLI prints a message it cannot decode as one
    `[non-utf8 sequence] b'...'` line, so one stray byte would garble every line that shares its
    record (up to 64 KiB of output). Runs of valid lines stay together, as do runs of invalid ones;
    past `MAX_PIECES` the rest is one piece. The pieces join back to `content` exactly."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return [content]
    pieces: list[bytes] = []
    run: list[bytes] = []
    run_valid: bool | None = None
    lines = [line for line in re.split(rb"(?<=\n)", content) if line]
    for n, line in enumerate(lines):
        if len(pieces) == MAX_PIECES - 1:
            run.extend(lines[n:])
            break
        try:
            line.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        if run and valid != run_valid:
            pieces.append(b"".join(run))
            run = []
        run.append(line)
        run_valid = valid
    if run:
        pieces.append(b"".join(run))
    return pieces


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    progress: int
    message: str
    create_time: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"progress": self.progress, "message": self.message}
        if self.create_time is not None:
            d["create_time"] = self.create_time.isoformat()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, default_time: datetime | None = None) -> Progress | None:
        """Validate one progress object; None when it is not one (user files may hold anything)."""
        p = d.get("progress")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            return None
        msg = d.get("message", "")
        if not isinstance(msg, str):
            return None
        raw = d.get("create_time")
        when = _utc_time(raw) if isinstance(raw, str) else None
        # A lone surrogate (Python's json.dumps of a file name that is not UTF-8 writes "\udcff")
        # cannot be encoded anywhere later: result.json, the termination message, the API.
        text = msg[:1024].encode("utf-8", "backslashreplace").decode("utf-8")
        return cls(progress=int(p), message=text, create_time=when or default_time)


def _utc_time(text: str) -> datetime | None:
    """The ISO time ``text`` in UTC (naive = UTC); None when it is no time or has no UTC value.

    A time whose offset takes it past year 1 or 9999 in UTC ("0001-01-01T00:00:00+05:00") is
    valid ISO but outside what a protobuf Timestamp (and datetime) holds: kept as written, it
    would break every API answer that carries the job's progress.
    """
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def parse_progress_line(line: bytes, *, default_time: datetime | None = None) -> Progress | None:
    """The progress of one line of the job's progress file; None when it holds none."""
    try:
        d = json.loads(line)
        return Progress.from_json(d, default_time=default_time) if isinstance(d, dict) else None
    except Exception:
        # The job writes these lines: whatever they hold (nesting deep enough for a
        # RecursionError, numbers too long to convert) is "no progress", never a stopped shipper.
        return None


# ---------------------------------------------------------------------------------------------
# Keys and storage access
# ---------------------------------------------------------------------------------------------


def chunk_key(project: str, job: str, seq: int) -> str:
    return f"{log_prefix(project, job)}chunks/{seq:012d}"


def final_key(project: str, job: str) -> str:
    return f"{log_prefix(project, job)}final.json"


def progress_key(project: str, job: str) -> str:
    return f"{log_prefix(project, job)}progress.json"


def log_file_key(project: str, job: str, name: str) -> str:
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"invalid log file name {name!r}")
    return f"{log_prefix(project, job)}files/{name}"


@dataclass(frozen=True)
class FinalMarker:
    next_seq: int
    attempt: int = 0
    reason: str = ""

    @property
    def end_offset(self) -> int:
        return make_offset(self.next_seq, 0)


def write_final(store: ObjectStore, project: str, job: str, marker: FinalMarker) -> None:
    body = json.dumps(
        {
            "v": 1,
            "next_seq": marker.next_seq,
            "attempt": marker.attempt,
            "reason": marker.reason,
            "written_at": datetime.now(UTC).isoformat(),
        },
        separators=(",", ":"),
    ).encode()
    # Overwritable on purpose: a later attempt of the same job extends the stream and re-finalizes.
    store.put_bytes(final_key(project, job), body, content_type="application/json")


def read_final(store: ObjectStore, project: str, job: str) -> FinalMarker | None:
    data = store.get_bytes(final_key(project, job))
    if data is None:
        return None
    try:
        d = json.loads(data)
        return FinalMarker(int(d["next_seq"]), int(d.get("attempt", 0)), str(d.get("reason", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise LogFormatError(f"corrupt final marker: {exc}") from exc


def write_progress(store: ObjectStore, project: str, job: str, progress: Progress) -> None:
    body = json.dumps(progress.to_json(), separators=(",", ":")).encode()
    store.put_bytes(progress_key(project, job), body, content_type="application/json")


def read_progress(store: ObjectStore, project: str, job: str) -> Progress | None:
    """The latest progress the runner saw (None before any)."""
    data = store.get_bytes(progress_key(project, job))
    if data is None:
        return None
    return parse_progress_line(data)


def write_chunk(store: ObjectStore, project: str, job: str, chunk: LogChunk) -> None:
    store.put_bytes(
        chunk_key(project, job, chunk.seq),
        encode_chunk(chunk),
        content_type="application/x-dsjobs-log",
        if_none_match=True,
    )


def read_chunk(store: ObjectStore, project: str, job: str, seq: int) -> LogChunk | None:
    data = store.get_bytes(chunk_key(project, job, seq))
    if data is None:
        return None
    chunk = decode_chunk(data)
    if chunk.seq != seq:
        raise LogFormatError(f"chunk {seq} claims to be chunk {chunk.seq}")
    return chunk


def find_next_seq(store: ObjectStore, project: str, job: str, *, hint: int = 0) -> int:
    """The first chunk seq not yet written (chunks are gapless). O(log n) HEAD requests."""

    def exists(seq: int) -> bool:
        return store.head(chunk_key(project, job, seq)) is not None

    lo = hint if hint > 0 and exists(hint) else 0
    if lo == 0 and not exists(0):
        return 0
    # lo exists: gallop forward to a missing seq, then bisect.
    step = 1
    hi = lo + step
    while exists(hi):
        lo = hi
        step *= 2
        hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if exists(mid):
            lo = mid
        else:
            hi = mid
    return hi


def finalize_stream(
    store: ObjectStore, project: str, job: str, *, attempt: int = 0, reason: str
) -> FinalMarker:
    """Close a job's log stream whose writer is gone (the operator, after the ship sidecar died).

    Only call this once no runner of the job can still write: a chunk written after the marker
    would make readers that already finished miss it.
    """
    marker = FinalMarker(next_seq=find_next_seq(store, project, job), attempt=attempt, reason=reason)
    write_final(store, project, job, marker)
    return marker


def end_offset(store: ObjectStore, project: str, job: str) -> int:
    """The offset just past everything written so far (what ``offset = -1`` means: "from now")."""
    return make_offset(find_next_seq(store, project, job), 0)


class ReadResult(NamedTuple):
    records: list[LogRecord]
    next_offset: int
    complete: bool


def read_records(
    store: ObjectStore,
    project: str,
    job: str,
    offset: int,
    *,
    max_records: int = 1000,
    max_bytes: int = 1024 * 1024,
    streams: Collection[Stream] | None = None,
    max_chunks: int = 16,
    check_complete: bool = True,
) -> ReadResult:
    """Records from ``offset`` on, at most ``max_records`` / about ``max_bytes`` of content, from
    at most ``max_chunks`` chunks (a filter may skip whole chunks: the caller gets a turn, e.g.
    to notice a drain, and continues from ``next_offset``).

    ``next_offset`` is where to continue; ``complete`` is True once the writer's final marker says
    nothing more will come and everything up to it was returned. A negative offset means "from
    now": no records, ``next_offset`` = the current end. ``streams`` filters (ReadStdLogs passes
    OUT and ERR); skipped records still advance ``next_offset``. Without ``check_complete`` the
    final marker is not read (``complete`` is False): a reader following a job that has not ended
    saves a GET per poll.
    """
    if offset < 0:
        end = end_offset(store, project, job)
        final = read_final(store, project, job)
        return ReadResult([], end, final is not None and final.end_offset <= end)
    seq, index = split_offset(offset)
    out: list[LogRecord] = []
    size = 0
    for _ in range(max_chunks):
        chunk = read_chunk(store, project, job, seq)
        if chunk is None:
            final = read_final(store, project, job) if check_complete else None
            complete = final is not None and seq >= final.next_seq
            return ReadResult(out, make_offset(seq, index), complete)
        recs = chunk.records
        while index < len(recs):
            if len(out) >= max_records or (out and size >= max_bytes):
                return ReadResult(out, make_offset(seq, index), False)
            r = recs[index]
            index += 1
            if streams is not None and r.stream not in streams:
                continue
            out.append(r)
            size += len(r.content)
        seq, index = seq + 1, 0
        if len(out) >= max_records or size >= max_bytes:
            return ReadResult(out, make_offset(seq, 0), False)
    return ReadResult(out, make_offset(seq, 0), False)
