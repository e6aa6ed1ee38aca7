"""Newline-delimited JSON lines from a byte stream cut anywhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dsjobs import ndjson


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _lines(*parts: bytes, limit: int = ndjson.MAX_LINE_BYTES) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [line async for line in ndjson.lines(_chunks(*parts), limit)]

    return asyncio.run(collect())


def test_lines_cut_anywhere_come_whole_and_blank_ones_are_skipped() -> None:
    stream = b'{"a":1}\n\n{"b":2}\n  \n{"c":3}\n'
    expected = [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    for size in range(1, len(stream) + 1):
        parts = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert _lines(*parts) == expected, size


def test_a_last_line_the_stream_ended_in_is_left_out() -> None:
    assert _lines(b'{"a":1}\n{"b":', b"2") == [b'{"a":1}']


def test_lines_past_half_a_mebibyte_and_the_limit() -> None:
    big = b'"' + b"x" * (3 * 2**20) + b'"'
    assert _lines(*[big[i : i + 65536] for i in range(0, len(big), 65536)], b"\n") == [big]
    assert _lines(b"12345\n", limit=5) == [b"12345"]
    with pytest.raises(ndjson.LineTooLong, match="longer than 5 bytes"):
        _lines(b"123", b"456", limit=5)
