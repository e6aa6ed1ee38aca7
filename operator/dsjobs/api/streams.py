"""How many log streams a replica follows at once, in all and per caller.

Open streams count against the server's DSJOBS_API_MAX_CONCURRENT_RPCS like every call; left
alone they could fill it, and then every other call (Create, OperationService.Get, the readiness
check) would be refused. Streams have a lower limit of their own, and one caller cannot take all
of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dsjobs.api import errors


class StreamSlots:
    def __init__(self, total: int, per_caller: int) -> None:
        self.total = total  # 0: no limit
        self.per_caller = per_caller  # 0: no limit
        self.open = 0
        self._by_caller: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, caller: str, offset: int) -> Iterator[None]:
        """A slot for one stream of `caller` while the block runs; RESOURCE_EXHAUSTED when none is
        free (the official CLI reconnects with its offset after 5 s)."""
        mine = self._by_caller.get(caller, 0)
        again = f"reconnect later with offset {offset}"
        if self.per_caller and mine >= self.per_caller:
            raise errors.resource_exhausted(
                f"{caller} follows {mine} log streams on this server, the most one caller may; {again}"
            )
        if self.total and self.open >= self.total:
            raise errors.resource_exhausted(f"this server follows {self.open} log streams, its most; {again}")
        self.open += 1
        self._by_caller[caller] = mine + 1
        try:
            yield
        finally:
            self.open -= 1
            left = self._by_caller[caller] - 1
            if left:
                self._by_caller[caller] = left
            else:
                del self._by_caller[caller]
