"""Stored log format: encode/decode, line splitting, resumable reading from any offset."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runner_fakes import MemoryStore

from dsjobs.logrecords import (
    CHUNK_SLOT,
    MAX_PIECES,
    MAX_RECORD_CONTENT,
    FinalMarker,
    LogChunk,
    LogFormatError,
    LogRecord,
    Progress,
    Stream,
    chunk_key,
    decode_chunk,
    encode_chunk,
    end_offset,
    find_next_seq,
    make_offset,
    parse_progress_line,
    read_records,
    split_offset,
    split_records,
    utf8_pieces,
    write_chunk,
    write_final,
)
from dsjobs.storage import PreconditionFailedError

P, J = "proj", "job"

records_st = st.builds(
    lambda kind, content, ns, path: LogRecord(kind, content, ns, path if kind == Stream.FILE else None),
    st.sampled_from(list(Stream)),
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=2**63),
    st.sampled_from([".system.log", "job_progress.jsonl", "dir/файл.txt"]),
)


@given(st.lists(records_st, min_size=1, max_size=30), st.integers(0, 10**6), st.integers(0, 3))
def test_chunk_encoding_round_trips(records: list[LogRecord], seq: int, attempt: int) -> None:
    chunk = LogChunk(seq=seq, records=tuple(records), attempt=attempt, resume={"out": 5, "err": 0})
    assert decode_chunk(encode_chunk(chunk)) == chunk


@given(st.lists(records_st, min_size=1, max_size=5), st.data())
def test_corrupt_chunks_are_rejected(records: list[LogRecord], data: st.DataObject) -> None:
    blob = encode_chunk(LogChunk(seq=1, records=tuple(records)))
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(LogFormatError):
        decode_chunk(blob[:cut])
    with pytest.raises(LogFormatError):
        decode_chunk(blob + b"x")


def test_record_invariants() -> None:
    with pytest.raises(ValueError):
        LogRecord(Stream.FILE, b"x", 0)  # FILE needs a path
    with pytest.raises(ValueError):
        LogRecord(Stream.OUT, b"x", 0, "a.txt")
    with pytest.raises(ValueError):
        encode_chunk(LogChunk(seq=0, records=()))


@given(st.integers(0, 2**40), st.integers(0, CHUNK_SLOT - 1))
def test_offsets_are_ordered_and_invertible(seq: int, index: int) -> None:
    off = make_offset(seq, index)
    assert split_offset(off) == (seq, index)
    assert off < make_offset(seq + 1, 0)
    if index + 1 < CHUNK_SLOT:
        assert off < make_offset(seq, index + 1)


# --- splitting a byte stream into records -------------------------------------------------------


stream_bytes = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=800).map(lambda s: s.encode()),
    st.lists(
        st.sampled_from([b"\n", b"abc", "привет".encode(), b"\xf0\x9f\x98\x80", b"x" * 70]), max_size=80
    ).map(b"".join),
)


def _split_as_it_arrives(
    data: bytes, reads: list[tuple[int, bool]], max_content: int
) -> tuple[list[bytes], int]:
    """Records of a stream that arrives in reads of these sizes, each with or without a flush of
    the unterminated tail (a timed partial line), then the final flush at its end."""
    pos = 0  # consumed
    avail = 0  # written so far
    out: list[bytes] = []
    for r, flush in [*reads, (len(data), False)]:
        avail = min(len(data), avail + r)
        contents, consumed = split_records(data[pos:avail], flush_partial=flush, max_content=max_content)
        assert b"".join(contents) == data[pos : pos + consumed]
        out.extend(contents)
        pos += consumed
    contents, consumed = split_records(data[pos:], flush_partial=True, eof=True, max_content=max_content)
    assert b"".join(contents) == data[pos:]
    out.extend(contents)
    return out, pos + consumed


reads_st = st.lists(st.tuples(st.integers(1, 500), st.booleans()), max_size=40)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(stream_bytes, reads_st, st.integers(8, 100))
def test_splitting_arbitrary_reads_loses_and_repeats_nothing(
    data: bytes, reads: list[tuple[int, bool]], max_content: int
) -> None:
    """However the stream arrives (arbitrary read sizes, partial flushes between), the records
    concatenate to the stream."""
    out, consumed = _split_as_it_arrives(data, reads, max_content)
    assert consumed == len(data)
    assert b"".join(out) == data
    assert all(0 < len(c) <= max_content for c in out)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=800),
        st.lists(st.sampled_from(["\n", "a", "я", "日", "😀"]), max_size=300).map("".join),
    ),
    st.lists(st.tuples(st.integers(1, 50), st.booleans()), max_size=60),
    st.integers(4, 40),
)
def test_partial_flushes_never_cut_a_utf8_character(
    text: str, reads: list[tuple[int, bool]], max_content: int
) -> None:
    """A read (or a flushed partial line) ending inside a character ships no half of it."""
    data = text.encode()
    out, consumed = _split_as_it_arrives(data, reads, max_content)
    assert consumed == len(data) and b"".join(out) == data
    assert all(0 < len(c) <= max_content for c in out)
    for c in out:
        c.decode()  # raises if a character was split


@given(st.text(max_size=600), st.integers(8, 64))
def test_utf8_text_is_never_cut_inside_a_character(text: str, max_content: int) -> None:
    data = text.encode()
    contents, consumed = split_records(data, flush_partial=True, max_content=max_content)
    assert consumed == len(data)
    for c in contents:
        c.decode()  # raises if a character was split


def test_a_flushed_partial_line_holds_back_an_incomplete_character() -> None:
    data = "обучение\n".encode()
    # A block-buffered write that ends inside a 2-byte character: its first byte waits for the second.
    assert split_records(data[:9], flush_partial=True) == (["обуч".encode()], 8)
    assert split_records(data[8:9], flush_partial=True) == ([], 0)
    # At the stream's end it is what the program wrote: shipped as is.
    assert split_records(data[8:9], flush_partial=True, eof=True) == ([b"\xd0"], 1)
    # Up to 3 bytes wait; bytes that cannot start a character do not.
    smile = "😀".encode()
    for n in (1, 2, 3):
        assert split_records(b"ab" + smile[:n], flush_partial=True) == ([b"ab"], 2)
    assert split_records(b"ab\x80", flush_partial=True) == ([b"ab\x80"], 3)
    assert split_records(b"ab\xff", flush_partial=True) == ([b"ab\xff"], 3)


def test_a_tail_that_fills_a_record_is_cut_at_a_character_boundary() -> None:
    # Exactly max_content bytes read, the last one starting a 2-byte character.
    data = b"a" * 7 + "я".encode()[:1]
    assert split_records(data, flush_partial=False, max_content=8) == ([b"a" * 7], 7)
    assert split_records(data, flush_partial=True, max_content=8) == ([b"a" * 7], 7)
    assert split_records(data, flush_partial=True, eof=True, max_content=8) == ([data], 8)
    tail = "日本語".encode()[:8]  # two characters and 2 bytes of the third
    assert split_records(tail, flush_partial=False, max_content=8) == ([tail[:6]], 6)


def test_whole_lines_are_grouped_and_partial_lines_wait() -> None:
    contents, consumed = split_records(b"a\nbb\nccc", flush_partial=False)
    assert contents == [b"a\nbb\n"] and consumed == 5
    contents, consumed = split_records(b"ccc", flush_partial=True)
    assert contents == [b"ccc"] and consumed == 3
    long = b"y" * (MAX_RECORD_CONTENT + 10)
    contents, consumed = split_records(long, flush_partial=False)
    assert contents == [b"y" * MAX_RECORD_CONTENT] and consumed == MAX_RECORD_CONTENT


# --- reading back from storage ------------------------------------------------------------------


def _store_stream(records: list[LogRecord], sizes: list[int], *, final: bool) -> tuple[MemoryStore, int]:
    store = MemoryStore()
    seq = 0
    i = 0
    for n in [*sizes, len(records)]:
        if i >= len(records):
            break
        part = records[i : i + max(1, n)]
        write_chunk(store, P, J, LogChunk(seq=seq, records=tuple(part)))
        i += len(part)
        seq += 1
    if final:
        write_final(store, P, J, FinalMarker(next_seq=seq))
    return store, seq


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(records_st, max_size=60),
    st.lists(st.integers(1, 12), max_size=20),
    st.lists(st.integers(1, 9), min_size=1, max_size=30),
    st.booleans(),
)
def test_reading_in_arbitrary_steps_returns_each_record_once_in_order(
    records: list[LogRecord], chunk_sizes: list[int], limits: list[int], final: bool
) -> None:
    store, nchunks = _store_stream(records, chunk_sizes, final=final)
    got: list[LogRecord] = []
    offsets = [0]
    offset = 0
    complete = False
    for step in range(len(records) + nchunks + 5):
        res = read_records(store, P, J, offset, max_records=limits[step % len(limits)])
        assert res.next_offset >= offset
        got.extend(res.records)
        offset = res.next_offset
        offsets.append(offset)
        complete = res.complete
        if complete or (not res.records and res.next_offset == offsets[-2] and not final):
            break
    assert got == records
    assert complete == final
    assert offset == make_offset(nchunks, 0)
    # Every offset handed out is a valid resume point: it yields exactly the remaining suffix.
    for off in offsets:
        rest = read_records(store, P, J, off, max_records=10**6).records
        assert got[len(got) - len(rest) :] == rest


def test_stream_filter_skips_but_advances() -> None:
    recs = [
        LogRecord(Stream.OUT, b"o1\n", 1),
        LogRecord(Stream.FILE, b"sys\n", 2, ".system.log"),
        LogRecord(Stream.ERR, b"e1\n", 3),
    ]
    store, n = _store_stream(recs, [2], final=True)
    res = read_records(store, P, J, 0, streams={Stream.OUT, Stream.ERR})
    assert [r.content for r in res.records] == [b"o1\n", b"e1\n"]
    assert res.next_offset == make_offset(n, 0) and res.complete


def test_a_filtered_read_scans_a_bounded_number_of_chunks_and_goes_on_from_there() -> None:
    # A job writing gigabytes to a log file and one line to stdout: ReadStdLogs must not walk
    # the whole stream in one call (an I/O thread it cannot give back, a drain it cannot see).
    recs = [LogRecord(Stream.FILE, b"f%d\n" % i, i, "train.log") for i in range(40)]
    recs.append(LogRecord(Stream.OUT, b"done\n", 40))
    store, n = _store_stream(recs, [1] * 40, final=True)
    res = read_records(store, P, J, 0, streams={Stream.OUT, Stream.ERR}, max_chunks=16)
    assert not res.records and not res.complete and res.next_offset == make_offset(16, 0)
    offset, calls = res.next_offset, 1
    while not res.complete:
        res = read_records(store, P, J, offset, streams={Stream.OUT, Stream.ERR}, max_chunks=16)
        offset, calls = res.next_offset, calls + 1
        if res.records:
            assert [r.content for r in res.records] == [b"done\n"]
    assert calls == 3 and offset == make_offset(n, 0)


def test_complete_only_after_the_final_marker_and_the_last_record() -> None:
    recs = [LogRecord(Stream.OUT, b"%d\n" % i, i) for i in range(5)]
    store, n = _store_stream(recs, [2, 2], final=False)
    res = read_records(store, P, J, 0)
    assert len(res.records) == 5 and not res.complete
    write_final(store, P, J, FinalMarker(next_seq=n))
    assert read_records(store, P, J, 0, max_records=2).complete is False
    again = read_records(store, P, J, res.next_offset)
    assert again.records == [] and again.complete and again.next_offset == res.next_offset


def test_negative_offset_means_from_now() -> None:
    recs = [LogRecord(Stream.OUT, b"old\n", 1)] * 3
    store, n = _store_stream(recs, [1], final=False)
    res = read_records(store, P, J, -1)
    assert res.records == [] and res.next_offset == make_offset(n, 0) and not res.complete
    write_chunk(store, P, J, LogChunk(seq=n, records=(LogRecord(Stream.OUT, b"new\n", 9),)))
    assert [r.content for r in read_records(store, P, J, res.next_offset).records] == [b"new\n"]


def test_chunks_are_immutable() -> None:
    store = MemoryStore()
    write_chunk(store, P, J, LogChunk(seq=0, records=(LogRecord(Stream.OUT, b"a", 1),)))
    write_chunk(
        store, P, J, LogChunk(seq=0, records=(LogRecord(Stream.OUT, b"a", 1),))
    )  # retried: same bytes
    with pytest.raises(PreconditionFailedError):
        write_chunk(store, P, J, LogChunk(seq=0, records=(LogRecord(Stream.OUT, b"b", 1),)))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 100, 1000])
def test_find_next_seq_uses_logarithmic_probes(n: int) -> None:
    store = MemoryStore()
    for seq in range(n):
        store.objects[chunk_key(P, J, seq)] = b"x"
    store.requests = 0
    assert find_next_seq(store, P, J) == n
    assert store.requests <= 2 * max(1, n).bit_length() + 3
    assert find_next_seq(store, P, J, hint=n // 2) == n
    assert end_offset(store, P, J) == make_offset(n, 0)


def test_progress_lines() -> None:
    p = parse_progress_line(b'{"progress": 21, "message": "m", "create_time": "2025-06-01T11:00:12+00:00"}')
    assert p is not None and p.progress == 21 and p.message == "m" and p.create_time is not None
    assert p.create_time.isoformat() == "2025-06-01T11:00:12+00:00"
    assert parse_progress_line(b'{"progress": 101}') is None
    assert parse_progress_line(b'{"progress": true}') is None
    assert parse_progress_line(b"not json") is None
    assert parse_progress_line(b"[1]") is None
    assert Progress.from_json({"progress": 5}) == Progress(5, "", None)


def test_a_progress_message_with_a_lone_surrogate_is_kept_escaped() -> None:
    # Python's json.dumps of a file name that is not UTF-8: "\udcff" reads back as a lone
    # surrogate, which no UTF-8 encoder takes (result.json, the termination message, the API).
    p = parse_progress_line(b'{"progress": 5, "message": "processing \\udcffile"}')
    assert p is not None and p.message == "processing \\udcffile"
    assert json.dumps(p.to_json(), ensure_ascii=False).encode("utf-8")


def test_a_progress_line_nested_too_deep_for_the_parser_is_no_progress() -> None:
    assert parse_progress_line(b"[" * 100_000 + b"]" * 100_000) is None
    assert parse_progress_line(b'{"progress": 5, "message": ' + b"[" * 100_000 + b"}") is None


DEFAULT_TIME = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-06-01T14:00:12+03:00", datetime(2025, 6, 1, 11, 0, 12, tzinfo=UTC)),
        ("2025-06-01T11:00:12Z", datetime(2025, 6, 1, 11, 0, 12, tzinfo=UTC)),
        ("2025-06-01T11:00:12", datetime(2025, 6, 1, 11, 0, 12, tzinfo=UTC)),  # naive: UTC
        ("0001-01-01T05:00:00+05:00", datetime(1, 1, 1, tzinfo=UTC)),
        # Valid ISO, but before year 1 / after 9999 in UTC: no Timestamp holds them.
        ("0001-01-01T00:00:00+05:00", DEFAULT_TIME),
        ("9999-12-31T23:00:00-05:00", DEFAULT_TIME),
        ("yesterday", DEFAULT_TIME),
    ],
)
def test_a_progress_time_is_kept_in_utc_or_replaced_when_it_has_none(raw: str, expected: datetime) -> None:
    line = f'{{"progress": 50, "message": "m", "create_time": "{raw}"}}'.encode()
    p = parse_progress_line(line, default_time=DEFAULT_TIME)
    assert p is not None and p.create_time == expected
    assert p.create_time.utcoffset() is not None and not p.create_time.utcoffset()


def test_finalize_stream_closes_an_abandoned_stream() -> None:
    from dsjobs.logrecords import finalize_stream, read_final

    recs = [LogRecord(Stream.OUT, b"x\n", 1)] * 3
    store, n = _store_stream(recs, [1], final=False)
    marker = finalize_stream(store, P, J, reason="ship sidecar died")
    assert marker.next_seq == n and read_final(store, P, J) == marker
    res = read_records(store, P, J, 0)
    assert len(res.records) == 3 and read_records(store, P, J, res.next_offset).complete


# --- records for clients that decode each message whole ------------------------------------------


def _cli_lines(pieces: list[bytes]) -> list[str]:
    """What the official CLI 0.10.0 prints for messages of these contents (Client._write_log)."""
    out: list[str] = []
    for content in pieces:
        try:
            out += content.decode("utf8").strip().split("\n")
        except UnicodeError:
            out.append(f"[non-utf8 sequence] {content!r}")
    return out


def test_one_stray_byte_garbles_only_its_own_line() -> None:
    out = b"epoch 1 loss 0.9\nbad byte here: \xff\nepoch 2 loss 0.5\nepoch 3 loss 0.2\n"
    (record,), _ = split_records(out, flush_partial=False)
    assert record == out  # one record: what the CLI got as one message
    pieces = utf8_pieces(record)
    assert pieces == [
        b"epoch 1 loss 0.9\n",
        b"bad byte here: \xff\n",
        b"epoch 2 loss 0.5\nepoch 3 loss 0.2\n",
    ]
    assert _cli_lines(pieces) == [
        "epoch 1 loss 0.9",
        "[non-utf8 sequence] b'bad byte here: \\xff\\n'",
        "epoch 2 loss 0.5",
        "epoch 3 loss 0.2",
    ]
    assert utf8_pieces("ünïcode\nlines\n".encode()) == ["ünïcode\nlines\n".encode()]
    assert utf8_pieces(b"") == [b""]


def test_a_record_makes_at_most_max_pieces_messages() -> None:
    record = b"ok\n\xff\n" * 1000
    pieces = utf8_pieces(record)
    assert len(pieces) == MAX_PIECES and b"".join(pieces) == record
    assert pieces[: MAX_PIECES - 1] == [b"ok\n", b"\xff\n"] * 15 + [b"ok\n"]


@given(st.lists(st.sampled_from([b"a", b"\n", b"\xff", "é".encode(), b"\xc3", b"\r"]), max_size=200))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_pieces_join_back_and_each_decodes_or_holds_no_valid_line(parts: list[bytes]) -> None:
    content = b"".join(parts)
    pieces = utf8_pieces(content)
    assert b"".join(pieces) == content and all(pieces[:-1]) and len(pieces) <= MAX_PIECES
    for piece in pieces:
        lines = [line for line in piece.split(b"\n") if line]
        valid = [_decodes(line) for line in lines]
        assert all(valid) or not any(valid) or len(pieces) == MAX_PIECES


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
