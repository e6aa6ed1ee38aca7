"""Lines of newline-delimited JSON from a byte stream: Kubernetes watch events, one per line.

aiohttp's line reader refuses a line longer than its buffer (512 KiB): a watch event carries the
whole object, and a ProjectJob may be up to etcd's 1.5 MiB (more once JSON-escaped).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

#: Far above any object etcd stores; a guard against a stream that never ends its line.
MAX_LINE_BYTES: Final = 64 * 2**20


class LineTooLong(ValueError):
    """A line past MAX_LINE_BYTES: not a watch event."""


async def lines(chunks: AsyncIterable[bytes], limit: int = MAX_LINE_BYTES) -> AsyncIterator[bytes]:
    """The non-blank lines of `chunks`, without their newline. A last line with no newline is
    left out: the stream ended in the middle of it."""
    buf = bytearray()
    async for chunk in chunks:
        scanned = len(buf)
        buf += chunk
        begin = 0
        end = buf.find(b"\n", scanned)
        while end != -1:
            line = bytes(buf[begin:end])
            if line.strip():
                yield line
            begin = end + 1
            end = buf.find(b"\n", begin)
        if begin:
            del buf[:begin]
        if len(buf) > limit:
            raise LineTooLong(f"a line longer than {limit} bytes")
