"""CRI log files: writing entries and reading them back as `kubectl logs` wants."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from dsjobs.devcluster.node.logs import (
    MAX_LINE,
    LineSplitter,
    LogCursor,
    LogOptions,
    encode_entry,
    format_timestamp,
    last_lines_text,
    parse_entry,
    parse_timestamp,
    read_entries,
    render,
    select_entries,
)

NS = 1_767_323_045_123_456_789  # 2026-01-02T03:04:05.123456789Z


def test_timestamp_format_roundtrip() -> None:
    assert format_timestamp(NS) == "2026-01-02T03:04:05.123456789Z"
    assert parse_timestamp("2026-01-02T03:04:05.123456789Z") == datetime(
        2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC
    )
    assert parse_timestamp("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_entry_roundtrip() -> None:
    raw = encode_entry(NS, "stderr", False, b"boom: with spaces")
    assert raw == b"2026-01-02T03:04:05.123456789Z stderr F boom: with spaces\n"
    e = parse_entry(raw.rstrip(b"\n"))
    assert e is not None
    assert (e.stream, e.partial, e.content) == ("stderr", False, b"boom: with spaces")
    empty = parse_entry(encode_entry(NS, "stdout", False, b"").rstrip(b"\n"))
    assert empty is not None and empty.content == b""


def test_splitter_lines_partials_and_eof() -> None:
    s = LineSplitter()
    assert s.feed(b"a\nb") == [(False, b"a")]
    assert s.feed(b"c\n\n") == [(False, b"bc"), (False, b"")]
    long = b"x" * (MAX_LINE + 10)
    out = s.feed(long)
    assert out == [(True, b"x" * MAX_LINE)]
    assert s.feed(b"\n") == [(False, b"x" * 10)]
    s.feed(b"tail without newline")
    assert s.flush() == [(False, b"tail without newline")]
    assert s.flush() == []


def _write(path: Path, entries: list[tuple[int, str, bool, bytes]]) -> None:
    path.write_bytes(b"".join(encode_entry(*e) for e in entries))


def test_select_tail_since_and_render(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    s = 1_000_000_000
    _write(
        log,
        [
            (NS, "stdout", False, b"one"),
            (NS + s, "stdout", True, b"two-a"),
            (NS + s, "stdout", False, b"two-b"),
            (NS + 2 * s, "stderr", False, b"three"),
        ],
    )
    entries = read_entries(str(log))
    assert b"".join(render(entries, False)) == b"one\ntwo-atwo-b\nthree\n"
    tail = select_entries(entries, LogOptions(tail_lines=2))
    assert b"".join(render(tail, False)) == b"two-atwo-b\nthree\n"
    assert select_entries(entries, LogOptions(tail_lines=0)) == []
    since = select_entries(entries, LogOptions(since=parse_timestamp("2026-01-02T03:04:07Z")))
    assert [e.content for e in since] == [b"three"]
    stamped = b"".join(render(entries[:1], True))
    assert stamped == b"2026-01-02T03:04:05.123456789Z one\n"
    assert last_lines_text(str(log), 2) == ["two-atwo-b\n", "three\n"]


def test_cursor_reads_only_complete_new_lines(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    cur = LogCursor(str(log))
    assert cur.read_entries() == []  # not created yet
    line = encode_entry(NS, "stdout", False, b"hello")
    log.write_bytes(line[:10])
    assert cur.read_entries() == []
    with open(log, "ab") as fh:
        fh.write(line[10:] + encode_entry(NS, "stdout", False, b"world"))
    assert [e.content for e in cur.read_entries()] == [b"hello", b"world"]
    assert cur.read_entries() == []
    cur.close()


def test_the_agent_s_log_lines_name_the_node_once() -> None:
    import logging

    from dsjobs.devcluster.node.logfmt import LogfmtFormatter

    record = logging.LogRecord("dsjobs.node", logging.INFO, __file__, 1, "node registered", None, None)
    record.kv = {"node": "cpu-0", "pods": 2}
    line = LogfmtFormatter("cpu-0").format(record)
    assert line.endswith('level=INFO node=cpu-0 msg="node registered" pods=2'), line
