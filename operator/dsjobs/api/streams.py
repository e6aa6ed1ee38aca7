"""How many log streams a replica follows at once, in all and per caller, and the log bytes they
hold (LogBudget).

Open streams count against the server's DSJOBS_API_MAX_CONCURRENT_RPCS like every call; left
alone they could fill it, and then every other call (Create, OperationService.Get, the readiness
check) would be refused. Streams have a lower limit of their own, and one caller cannot take all
of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Final

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


#: How long a stream waits for a permit before it is told to come back: streams whose clients do
#: not read keep theirs, and a waiting one must neither hang silently nor miss a drain.
PERMIT_PATIENCE: Final = 30.0


class LogBudget:
    """The log bytes a replica's streams hold at once: read from the store and not yet taken by
    their clients. gRPC's flow control stops a stream whose client does not read, but the response
    it was sending stays (its records, the message, the bytes, gRPC's own copy: about 5 times its
    size) for as long as the client keeps the stream open: 200 such streams of one user took a
    replica past its memory limit. A stream holds one permit (`max_response_bytes`) from its read
    until its client asked for more; one caller's streams at most a quarter of them, so that one
    user's stalled streams leave the others theirs. Streams wait their turn, at most `patience`
    seconds (RESOURCE_EXHAUSTED: the official CLI reconnects with its offset after 5 s), and a
    drain (`stop`) ends the wait at once (UNAVAILABLE, as for the streams that read)."""

    def __init__(self, permits: int, patience: float = PERMIT_PATIENCE) -> None:
        self.permits = max(1, permits)
        self.per_caller = max(1, self.permits // 4)
        self.patience = patience
        self._all = asyncio.Semaphore(self.permits)
        self._callers: dict[str, tuple[int, asyncio.Semaphore]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, caller: str, offset: int, stop: asyncio.Event) -> AsyncIterator[None]:
        users, mine = self._callers.get(caller) or (0, asyncio.Semaphore(self.per_caller))
        self._callers[caller] = (users + 1, mine)
        try:
            await self._acquire(mine, offset, stop)
            try:
                yield
            finally:
                self._all.release()
                mine.release()
        finally:
            users, mine = self._callers[caller]
            if users > 1:
                self._callers[caller] = (users - 1, mine)
            else:
                del self._callers[caller]

    async def _acquire(self, mine: asyncio.Semaphore, offset: int, stop: asyncio.Event) -> None:
        """Both permits (the caller's, then one of all), or an ApiError (and neither)."""

        got_mine = False

        async def both() -> None:
            nonlocal got_mine
            await mine.acquire()
            got_mine = True
            try:
                await self._all.acquire()
            except BaseException:
                mine.release()
                raise

        if not mine.locked() and not self._all.locked():
            await both()  # free now: no task, no timer
            return
        acquiring = asyncio.ensure_future(both())
        stopping = asyncio.ensure_future(stop.wait())

        async def settled() -> bool:
            """Whether the permits were got; the waits are over either way."""
            stopping.cancel()
            if not acquiring.done():
                acquiring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquiring
            return not acquiring.cancelled() and acquiring.exception() is None

        try:
            await asyncio.wait(
                {acquiring, stopping}, timeout=self.patience, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # the stream was cancelled meanwhile: nothing may stay held
            if await settled():
                self._all.release()
                mine.release()
            raise
        if not await settled():
            if stop.is_set():
                raise errors.server_restarting(offset)
            if not got_mine:  # the caller's own share was what ran out
                raise errors.resource_exhausted(
                    f"your log streams on this server hold their share of the log bytes ({self.per_caller} "
                    f"responses of {self.permits}) for clients that have not taken them (streams opened and "
                    f"not read?); reconnect later with offset {offset}"
                )
            raise errors.resource_exhausted(
                f"this server's log streams hold all the log bytes they may ({self.permits} responses) "
                f"for clients that have not taken them; reconnect later with offset {offset}"
            )
        if stop.is_set():  # got them, but the server is restarting: as for a stream that read
            self._all.release()
            mine.release()
            raise errors.server_restarting(offset)
