"""Kubernetes Events about ProjectJobs: built by a pure function, posted one at a time in the
background.

Why not `kopf.event`: Kopf retries a refused Event for about a minute and logs an ERROR for every
attempt. A namespace being deleted refuses every new object (403, "being terminated"), so deleting
a project with running jobs filled the operator's log with errors about Events nobody could ever
read. Here that refusal is expected and dropped quietly; other failures (a 5xx, a 429 throttle, no
answer) are retried for about 30 s and then dropped with one warning (Events are helpful, never
needed).

Names follow client-go's `<object>.<unix nanoseconds, hex>`: a job's Events list in the order they
happened. `kubectl describe` sorts them by lastTimestamp, which has whole seconds, and keeps the
list order within a second (Go's sort is an insertion sort up to 12 items), so "Cancelling" no
longer shows after "Cancelled".
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiohttp

from dsjobs.controller import metrics
from dsjobs.controller.kube import (
    APIError,
    ClientError,
    Conflict,
    Forbidden,
    Kube,
    NotFound,
    core_path,
    message_of,
)
from dsjobs.controller.status import JobEvent

log = logging.getLogger("dsjobs.controller.events")

#: Seconds between attempts at an Event the API server failed to take (5xx, timeout, no connection):
#: about 30 s in all, an API server's restart. The Events queued meanwhile wait their turn.
RETRY_DELAYS: Final = (1.0, 2.0, 4.0, 8.0, 16.0)
#: The longest Retry-After of a 429 obeyed: the poster is serial, every Event waits behind it.
MAX_RETRY_AFTER: Final = 60.0
#: Events waiting to be posted; beyond it new ones are dropped (an API server down for long).
MAX_PENDING: Final = 10_000
MAX_MESSAGE_LENGTH: Final = 1024


def clip_message(message: str, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """At most `limit` characters: the head and the tail, joined by '...'."""
    if len(message) <= limit:
        return message
    head = (limit - 3) // 2
    return f"{message[:head]}...{message[len(message) - (limit - 3 - head) :]}"


def event_body(
    obj: Mapping[str, Any], event: JobEvent, *, component: str, now: datetime, instance: str = ""
) -> dict[str, Any]:
    """The core/v1 Event for `event` about the object `obj` (a ProjectJob body)."""
    meta = obj.get("metadata") or {}
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
    stamp = now.astimezone(UTC)
    nanos = int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000
    seconds = stamp.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{nanos:x}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": str(obj.get("apiVersion", "")),
            "kind": str(obj.get("kind", "")),
            "name": name,
            "namespace": namespace,
            "uid": str(meta.get("uid", "")),
        },
        "type": event.type,
        "reason": event.reason,
        "message": clip_message(event.message),
        "source": {"component": component},  # the From column of `kubectl describe`
        "reportingComponent": component,
        # Which replica: after a leader change both have written the job's Events.
        "reportingInstance": instance or component,
        "action": event.reason,
        "firstTimestamp": seconds,
        "lastTimestamp": seconds,
        "count": 1,
        "eventTime": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
    }


def namespace_terminating(exc: APIError) -> bool:
    """The API server's refusal of any new object in a namespace being deleted."""
    return isinstance(exc, Forbidden) and "being terminated" in message_of(exc)


def throttled(exc: APIError) -> bool:
    """A 429: the API server (its priority and fairness) asks to come back later, not a refusal."""
    return exc.status == 429


def retry_after(exc: APIError) -> float:
    """Seconds a 429 asks to wait (its Retry-After header, or the Status's retryAfterSeconds), at
    most MAX_RETRY_AFTER; 0 when it says none (or an HTTP date: not worth parsing here)."""
    headers = {str(k).lower(): v for k, v in (exc.headers or {}).items()}
    details = exc.details
    wanted: object = headers.get("retry-after") or (
        details.get("retryAfterSeconds") if details is not None else None
    )
    try:
        seconds = float(str(wanted)) if wanted is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
    if seconds != seconds:  # NaN
        return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class _Pending:
    body: dict[str, Any]
    job: str  # namespace/name, for the log


class EventPoster:
    """Posts Events in the order they were queued, one at a time: a burst of new jobs must not turn
    into a burst of Event writes competing with their pods (Kopf's poster is serial too)."""

    def __init__(
        self,
        kube: Kube,
        component: str,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.kube = kube
        self.component = component
        self.instance = socket.gethostname()
        self._clock = clock
        self._sleep = sleep
        self._retry_delays = tuple(retry_delays)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(MAX_PENDING)
        self._task: asyncio.Task[None] | None = None
        self._last = datetime.min.replace(tzinfo=UTC)

    def post(self, obj: Mapping[str, Any], event: JobEvent) -> str:
        """Queue the Event; its name."""
        # Strictly increasing: the time names the Event, and a step may post several at once.
        now = max(self._clock(), self._last + timedelta(microseconds=1))
        self._last = now
        body = event_body(obj, event, component=self.component, now=now, instance=self.instance)
        meta = body["metadata"]
        pending = _Pending(body, f"{meta['namespace']}/{body['involvedObject']['name']}")
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            metrics.EVENTS_DROPPED.labels(why="queue_full").inc()
            log.warning("event dropped, %d waiting: %s %s", MAX_PENDING, pending.job, event.reason)
            return str(meta["name"])
        metrics.EVENTS_PENDING.inc()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dsjobs-events")
        return str(meta["name"])

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) for the queued Events to be posted, then stop."""
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.info("%d events not posted at shutdown", self._queue.qsize())
        task.cancel()

    def drain_from_thread(self, timeout: float) -> bool:
        """`drain` for another thread than the poster's loop (the lease watchdog's, which ends the
        process on a lost leadership): waits at most about `timeout` seconds, whatever the loop
        does (it may be stuck). True when every queued Event was posted (or none was queued)."""
        task = self._task
        if task is None or task.done():
            return True
        draining = self.drain(timeout)
        try:
            future = asyncio.run_coroutine_threadsafe(draining, task.get_loop())
        except RuntimeError:  # the loop is closed: nothing will post them
            draining.close()
            return False
        try:
            future.result(timeout + 0.25)
        except Exception:  # a stuck loop (concurrent.futures.TimeoutError), a cancelled drain
            future.cancel()
            return False
        return self._queue.empty()

    async def _run(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                await self._post_one(pending)
            except Exception:  # never let one Event stop the poster
                log.exception("event not posted: %s", pending.job)
            finally:
                self._queue.task_done()
                metrics.EVENTS_PENDING.dec()

    async def _post_one(self, pending: _Pending) -> None:
        body = pending.body
        path = core_path(body["metadata"]["namespace"], "events")
        for attempt, delay in enumerate((*self._retry_delays, None), start=1):
            try:
                await self.kube.create_event(path, body)
                return
            except Conflict:  # an earlier attempt did get through (its answer was lost)
                return
            except APIError as exc:
                if namespace_terminating(exc) or isinstance(exc, NotFound):
                    # The namespace is going (or gone): nobody will ever read it.
                    log.debug("event dropped, namespace going: %s %s", pending.job, body["reason"])
                    return
                why = f"{exc.status} {exc.message or exc!r}"
                final = isinstance(exc, ClientError) and not throttled(exc)
                if final or delay is None:
                    metrics.EVENTS_DROPPED.labels(why="refused" if final else "failed").inc()
                    log.warning("event not posted: %s %s: %s", pending.job, body["reason"], why)
                    return
                failure = why
                delay = max(delay, retry_after(exc))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if delay is None:
                    metrics.EVENTS_DROPPED.labels(why="failed").inc()
                    log.warning("event not posted: %s %s: %r", pending.job, body["reason"], exc)
                    return
                failure = repr(exc)
            log.debug("event attempt %d failed, retrying in %ss: %s", attempt, delay, failure)
            await self._sleep(delay)
