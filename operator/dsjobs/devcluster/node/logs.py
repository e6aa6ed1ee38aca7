"""Container log files in the kubelet's CRI format, and reading them back for `kubectl logs`.

One line per entry: `<RFC3339Nano UTC> <stdout|stderr> <F|P> <content>`; `P` marks a
partial line (longer than 16 KiB, or split by the reader), `F` the end of a line.
Anything that reads CRI logs can read these files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

MAX_LINE = 16 * 1024


def format_timestamp(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def parse_timestamp(text: str) -> datetime:
    # "2024-01-02T03:04:05.123456789Z": datetime keeps microseconds.
    main, _, frac = text.rstrip("Z").partition(".")
    dt = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    if frac:
        dt = dt.replace(microsecond=int(frac[:6].ljust(6, "0")))
    return dt


def encode_entry(ts_ns: int, stream: str, partial: bool, content: bytes) -> bytes:
    return b"%s %s %s %s\n" % (
        format_timestamp(ts_ns).encode(),
        stream.encode(),
        b"P" if partial else b"F",
        content,
    )


class LineSplitter:
    """Cuts a byte stream into log entries: complete lines, or 16 KiB partial pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bool, bytes]]:
        self._buf += data
        out: list[tuple[bool, bytes]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl == -1:
                break
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            while len(line) > MAX_LINE:
                out.append((True, line[:MAX_LINE]))
                line = line[MAX_LINE:]
            out.append((False, line))
        while len(self._buf) > MAX_LINE:
            out.append((True, bytes(self._buf[:MAX_LINE])))
            del self._buf[:MAX_LINE]
        return out

    def flush(self) -> list[tuple[bool, bytes]]:
        """At EOF: an unterminated last line still ends the stream, so it is a full line."""
        if not self._buf:
            return []
        rest = bytes(self._buf)
        self._buf.clear()
        return [(False, rest)]


@dataclass(frozen=True)
class Entry:
    timestamp: str
    stream: str
    partial: bool
    content: bytes

    def when(self) -> datetime:
        return parse_timestamp(self.timestamp)


def parse_entry(line: bytes) -> Entry | None:
    """One CRI line (without its trailing newline)."""
    parts = line.split(b" ", 3)
    if len(parts) < 3:
        return None
    ts, stream, tag = parts[0], parts[1], parts[2]
    content = parts[3] if len(parts) == 4 else b""
    return Entry(ts.decode(), stream.decode(), tag == b"P", content)


class LogCursor:
    """Reads entries appended to a CRI log file since the last call (for follow)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh: BinaryIO | None = None
        self._pending = b""

    def read_entries(self) -> list[Entry]:
        if self._fh is None:
            try:
                # Kept open across calls: a restart renames the file, and a follower must
                # keep reading the instance it started with.
                self._fh = open(self.path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                return []
        data = self._pending + self._fh.read()
        lines = data.split(b"\n")
        self._pending = lines.pop()  # an incomplete last line waits for the rest
        return [e for e in (parse_entry(x) for x in lines) if e is not None]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None


def read_entries(path: str) -> list[Entry]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    return [e for e in (parse_entry(x) for x in data.split(b"\n") if x) if e is not None]


@dataclass
class LogOptions:
    timestamps: bool = False
    tail_lines: int | None = None
    since: datetime | None = None
    limit_bytes: int | None = None


def select_entries(entries: list[Entry], opts: LogOptions) -> list[Entry]:
    """Apply sinceSeconds/sinceTime and tailLines (counted in complete lines)."""
    if opts.since is not None:
        since = opts.since
        entries = [e for e in entries if e.when() >= since]
    if opts.tail_lines is not None:
        if opts.tail_lines <= 0:
            return []
        count = 0
        start = len(entries)
        for i in range(len(entries) - 1, -1, -1):
            if not entries[i].partial:
                count += 1
                if count > opts.tail_lines:
                    break
            start = i
        entries = entries[start:]
    return entries


def render(entries: list[Entry], timestamps: bool) -> Iterator[bytes]:
    for e in entries:
        prefix = (e.timestamp + " ").encode() if timestamps else b""
        yield prefix + e.content + (b"" if e.partial else b"\n")


def last_lines_text(path: str, n: int) -> list[str]:
    """The last n complete lines' text (for FallbackToLogsOnError)."""
    entries = read_entries(path)
    out: list[str] = []
    for chunk in render(entries, False):
        out.append(chunk.decode("utf-8", errors="replace"))
    joined = "".join(out)
    lines = joined.splitlines(keepends=True)
    return lines[-n:]


def now_ns() -> int:
    return time.time_ns()


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
