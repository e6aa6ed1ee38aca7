"""The operator's Kubernetes API calls: one client (Kopf's own authenticated aiohttp session).

Why Kopf's client and not the `kubernetes` package: Kopf already holds an authenticated,
re-authenticating session for its watches; a second client would mean a second connection pool,
a second credential loader and ~40 MB more RSS (the generated models). The functions below are
the only place that touches Kopf's (internal, version-pinned) client API, so a Kopf upgrade that
moves it changes this file only. Every HTTP attempt is timed into `dsjobs_kube_request_duration_seconds`
(the retries are ours: `Kube._timed`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import aiohttp
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.configs.configuration import OperatorSettings as KopfSettings

from dsjobs.controller import fastjson, metrics
from dsjobs.kubemetrics import call_kind
from dsjobs.models import GROUP, PROJECTJOB_PLURAL, VERSION

log = logging.getLogger("dsjobs.controller.kube")

APIError = kopf_errors.APIError
NotFound = kopf_errors.APINotFoundError
Forbidden = kopf_errors.APIForbiddenError
Conflict = kopf_errors.APIConflictError
Invalid = kopf_errors.APIUnprocessableEntityError


class BadRequest(kopf_errors.APIUnprocessableEntityError):
    """A 400: some admission webhooks deny with it. It is an Invalid for the callers: the object as
    sent will never be accepted (a 422 says the same)."""


class WebhookDenied(kopf_errors.APIForbiddenError):
    """A 400 that is an admission webhook's denial: the API server answers 400 for a webhook that
    sets no code (Kyverno), 403 for one that does (Gatekeeper). A policy's refusal either way, for
    now, as a quota's: the callers wait and try again, whichever engine the cluster runs."""


#: The API server's words for a webhook's denial (admission/plugin/webhook/errors).
_WEBHOOK_DENIAL = re.compile(r'^admission webhook "[^"]*" denied the request')


def translated(exc: APIError) -> APIError:
    """The error the callers catch: Kopf raises a plain APIClientError for a 400."""
    if type(exc) is kopf_errors.APIClientError and exc.status == 400:
        # APIError keeps a Status body as (message, body) in args, a text as (text,).
        payload = exc.args[-1] if exc.args else None
        if _WEBHOOK_DENIAL.match(exc.message or ""):
            return WebhookDenied(payload, status=400, headers=exc.headers)
        return BadRequest(payload, status=400, headers=exc.headers)
    return exc


ClientError = kopf_errors.APIClientError


def message_of(exc: APIError) -> str:
    """What the API server said: its Status message, else the error as text."""
    return exc.message or str(exc)


# Our calls fail fast and let the reconcile retry with its own backoff (the per-job lock must
# not be held for Kopf's default ~1 minute of retries).
_BACKOFFS: Final = (0.2, 0.5, 1.0)
MERGE_PATCH: Final = {"Content-Type": "application/merge-patch+json"}
#: What is tried again: an API server restarting or overloaded, a connection lost or timed out.
#: A 403 (a quota, an admission webhook, RBAC), 409 or 422 is an answer: the caller decides.
_TRANSIENT_API_ERRORS: Final = (kopf_errors.APIServerError, kopf_errors.APITooManyRequestsError)
_TRANSIENT_ERRORS: Final = (aiohttp.ClientConnectionError, TimeoutError)
#: The longest Retry-After of a 429 obeyed (the per-job lock is held meanwhile).
MAX_RETRY_AFTER: Final = 5.0


def retry_after(exc: APIError) -> float:
    """Seconds a 429 asks to wait (its Retry-After header, or the Status's retryAfterSeconds), at
    most MAX_RETRY_AFTER; 0 for any other error."""
    if not isinstance(exc, kopf_errors.APITooManyRequestsError):
        return 0.0
    details = exc.details
    wanted: object = (exc.headers or {}).get("Retry-After") or (
        details.get("retryAfterSeconds") if details is not None else None
    )
    try:
        seconds = float(str(wanted)) if wanted is not None else 0.0
    except (TypeError, ValueError):  # an HTTP date: not worth parsing for a short retry
        return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _escalating(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    attempt: int,
    attempts: int,
    verb: str,
    path: str,
    exc: Exception,
) -> None:
    logger.error(
        "Request attempt #%d/%d failed; escalating: %s %s -> %r", attempt, attempts, verb.upper(), path, exc
    )


JOBS_PATH: Final = f"/apis/{GROUP}/{VERSION}"
#: Bytes asyncio reads per TLS connection at a time (its default: 256 KiB).
TLS_READ_BUFFER: Final = 64 * 1024


def shrink_tls_read_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Every TLS connection of asyncio holds a zero-filled read buffer of
    `SSLProtocol.max_size` bytes for its whole life. Kopf's connection pool is unbounded (its
    watches must never wait for a slot), and a burst of 10k new jobs left ~400 connections open:
    52 MiB of read buffers by tracemalloc, a third of the operator's RSS (docs/benchmarks.md). A
    smaller read size only means more reads of a large response (a TLS record is 16 KiB anyway)."""
    import asyncio.sslproto

    protocol = asyncio.sslproto.SSLProtocol
    if isinstance(getattr(protocol, "max_size", None), int):
        protocol.max_size = size


def job_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"{JOBS_PATH}/namespaces/{namespace}/{PROJECTJOB_PLURAL}"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


def core_path(namespace: str, plural: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name is not None else path


def with_query(path: str, **params: str) -> str:
    present = {k: v for k, v in params.items() if v}
    return f"{path}?{urllib.parse.urlencode(present)}" if present else path


class _DebugOnlyAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Every record at DEBUG, whatever level the caller (Kopf's request loop) chose."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


_DEBUG_ONLY: Final = _DebugOnlyAdapter(log, {})

# Kopf's request loop logs at ERROR an attempt it is about to make again: an API server restart
# (its watches reconnect) or a 429 right after its start meant a handful of ERROR lines for what
# healed itself. Its last attempt ("escalating") stays an ERROR.
_RETRIED_ATTEMPT: Final = re.compile(
    r"^Request attempt #?\d+(/\d+)? failed; (will retry|TCP closed; will re-authenticate|SSL closed; will re-authenticate)"
)


class RetriedAttemptsAreWarnings(logging.Filter):
    """For log handlers: an attempt of Kopf's request loop that it retries is a WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and _RETRIED_ATTEMPT.match(record.getMessage()):
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


class Kube:
    """Thin async verbs over Kopf's session; needs Kopf's settings (timeouts, auth vault).

    The verbs' `resource` argument says what the call is about to the tests' stand-ins of this
    class; a request's metric labels come from its path (`call_kind`), as the API server's do."""

    def __init__(self, settings: KopfSettings, concurrency: int = 64) -> None:
        self.settings = settings
        # A burst (500 new jobs, a project's 10k jobs deleted at once) must not become thousands
        # of requests in flight: the API server would answer 429 and the memory would spike.
        self._slots = asyncio.Semaphore(concurrency)
        # Creations (the pod of a new job and its Secrets) have their own slots: a burst of
        # status writes must not delay the next job's pod.
        self._create_slots = asyncio.Semaphore(concurrency)

    async def _call(
        self,
        verb: str,
        path: str,
        payload: object | None = None,
        headers: Mapping[str, str] | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> Any:
        async with self._create_slots if verb == "post" else self._slots:
            return await self._timed(verb, path, payload, headers, logger=logger)

    async def _timed(
        self,
        verb: str,
        path: str,
        payload: object | None,
        headers: Mapping[str, str] | None,
        *,
        backoffs: tuple[float, ...] = _BACKOFFS,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> Any:
        """The call, tried again after each of `backoffs` when the failure was transient.

        The retries are ours, not Kopf's: Kopf's loop retries a 403 too (a quota's refusal of a pod
        was four POSTs and 1.7 s before the caller heard of it), and timed as one call its sleeps
        made `dsjobs_kube_request_duration_seconds` a measure of the backoffs. Each attempt is one observation
        with its own code."""
        attempts = len(backoffs) + 1
        for attempt, backoff in enumerate((*backoffs, None), start=1):
            started = time.perf_counter()
            code = "error"
            try:
                try:
                    # One attempt in Kopf (which still re-authenticates on a 401); its lines are
                    # debug lines, ours below tell the retries at the caller's level.
                    response = await kopf_api.request(
                        verb,
                        path,
                        payload=payload,
                        headers=dict(headers) if headers else None,
                        settings=self.settings,
                        backoffs=(),
                        logger=_DEBUG_ONLY,
                    )
                except APIError as exc:
                    code = str(exc.status)
                    if backoff is None or not isinstance(exc, _TRANSIENT_API_ERRORS):
                        if isinstance(exc, _TRANSIENT_API_ERRORS):
                            _escalating(logger, attempt, attempts, verb, path, exc)
                        better = translated(exc)
                        if better is not exc:
                            raise better from exc
                        raise
                    failure: Exception = exc
                    delay = max(backoff, retry_after(exc))
                except _TRANSIENT_ERRORS as exc:
                    if backoff is None:
                        _escalating(logger, attempt, attempts, verb, path, exc)
                        raise
                    failure, delay = exc, backoff
                else:
                    # A failure while reading the answer is not retried: the request was taken.
                    async with response:
                        body = await response.read()
                    code = "ok"
                    return None if not body or body.isspace() else fastjson.loads(body)
            finally:
                metrics.KUBE_REQUESTS.labels(verb=verb, resource=call_kind(verb, path)[1], code=code).observe(
                    time.perf_counter() - started
                )
            logger.warning(
                "Request attempt #%d/%d failed; will retry in %ss: %s %s -> %r",
                attempt,
                attempts,
                delay,
                verb.upper(),
                path,
                failure,
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get(self, resource: str, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self._call("get", path)
        except NotFound:
            return None
        return result

    async def pages(
        self,
        resource: str,
        path: str,
        label_selector: str = "",
        page_size: int = 500,
        *,
        background: bool = False,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """A LIST page by page (constant memory for big lists). `background`: a periodic LIST
        whose caller tells its failure itself (the pod resync, at WARNING, and tries again next
        period): the attempts are debug lines, not an ERROR per API server outage."""
        token = ""
        while True:
            query = with_query(
                path, labelSelector=label_selector, limit=str(page_size), **{"continue": token}
            )
            page = await self._call("get", query, logger=_DEBUG_ONLY if background else log)
            yield list(page.get("items") or ())
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return

    async def list(
        self, resource: str, path: str, label_selector: str = "", *, background: bool = False
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        async for page in self.pages(resource, path, label_selector, background=background):
            items.extend(page)
        return items

    async def create(self, resource: str, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create-if-absent: None when it already exists (409 is success for a deterministic name).

        The per-attempt lines are debug lines here: a refusal (a quota's 403) is the caller's to
        tell, once, and a failure after the retries comes back as the reconcile's own warning."""
        try:
            result: dict[str, Any] = await self._call("post", path, payload=body, logger=_DEBUG_ONLY)
        except Conflict:
            return None
        return result

    async def delete(
        self,
        resource: str,
        path: str,
        *,
        grace_seconds: int | None = None,
        uid: str = "",
    ) -> bool:
        """Delete; False when it was already gone (or replaced by an object with another uid)."""
        options: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
        }
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self._call("delete", path, payload=options)
        except NotFound:
            return False
        except Conflict:  # uid precondition failed: a different object now has that name
            return False
        return True

    async def delete_collection(
        self, resource: str, path: str, label_selector: str, field_selector: str = ""
    ) -> None:
        query = {"labelSelector": label_selector}
        if field_selector:
            query["fieldSelector"] = field_selector
        await self._call("delete", with_query(path, **query))

    async def create_event(self, path: str, body: Mapping[str, Any]) -> None:
        """POST an Event once: the caller (events.EventPoster) decides about retries and logging,
        so the attempt's lines are debug lines here."""
        async with self._slots:
            await self._timed("post", path, body, None, backoffs=(), logger=_DEBUG_ONLY)

    async def merge_patch(self, resource: str, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """RFC 7386 merge patch; include metadata.resourceVersion for optimistic concurrency."""
        result: dict[str, Any] = await self._call("patch", path, payload=patch, headers=MERGE_PATCH)
        return result


def merge_diff(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch that turns `old` into `new` (None/null removes a key).

    Lists are replaced as a whole (that is what merge patch does with them).
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = (
                merge_diff(old[key], value)
                if isinstance(value, dict) and isinstance(old[key], dict)
                else value
            )
    return patch
