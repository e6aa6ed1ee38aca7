"""A small asyncio client for the few Kubernetes REST calls the API makes.

Why not the `kubernetes` package: its client is synchronous, and running every call through
`asyncio.to_thread` costs a thread hop plus model (de)serialization per call, which is most of
the latency budget of Get (p99 <= 10 ms at 500 rps); importing it also costs ~40 MB of RSS.
Credentials come from dsjobs.kubeconfig. Objects are plain JSON dicts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast
from urllib.parse import quote

import aiohttp

from dsjobs import ndjson
from dsjobs.api.errors import KubeError
from dsjobs.kubeconfig import KubeConfig, Refresh
from dsjobs.kubemetrics import KUBE_REQUESTS, call_kind
from dsjobs.models import GROUP, PROJECTJOB_PLURAL, VERSION

log = logging.getLogger(__name__)

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
_CREDENTIAL_REFRESH_SECONDS = 60.0
#: The longest Retry-After of a 429 waited for before asking once more (the caller waits meanwhile).
MAX_RETRY_AFTER = 2.0


class Kube:
    """Async Kubernetes REST calls (JSON in, JSON out). Raises KubeError on non-2xx answers."""

    def __init__(
        self, config: KubeConfig, refresh: Refresh = None, *, timeout: float = 30.0, pool: int = 64
    ) -> None:
        self._config = config
        self._refresh = refresh
        self._timeout = timeout
        self._pool = pool
        self._session: aiohttp.ClientSession | None = None
        self._refreshed = time.monotonic()
        self._refreshing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ctx: ssl.SSLContext | bool
        if self._config.host.startswith("https"):
            ctx = ssl.create_default_context(cafile=self._config.ca_file)
            if not self._config.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if self._config.cert_file:
                ctx.load_cert_chain(self._config.cert_file, self._config.key_file)
        else:
            ctx = False
        connector = aiohttp.TCPConnector(ssl=ctx, limit=self._pool, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector, json_serialize=json.dumps, timeout=aiohttp.ClientTimeout(total=None)
        )

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, accept: str, content_type: str | None) -> dict[str, str]:
        self._refresh_credentials()
        headers = {"Accept": accept}
        if self._config.token:
            headers["Authorization"] = f"Bearer {self._config.token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _refresh_credentials(self) -> None:
        """Rotated credentials (projected service account tokens, exec plugins) are re-read now
        and then, in a thread: an exec plugin may run for seconds, and every call of the replica
        would wait for it on the event loop. One read at a time; calls meanwhile use the
        credentials read before (a token is refreshed well before it expires)."""
        if self._refresh is None or self._refreshing is not None:
            return
        if time.monotonic() - self._refreshed <= _CREDENTIAL_REFRESH_SECONDS:
            return
        self._refreshed = time.monotonic()
        refresh, config = self._refresh, self._config

        async def read() -> None:
            try:
                self._config = await asyncio.to_thread(refresh, config)
            except Exception:  # keep the old credentials
                log.warning("could not refresh cluster credentials", exc_info=True)
            finally:
                self._refreshing = None

        self._refreshing = asyncio.get_running_loop().create_task(read(), name="dsjobs-kube-credentials")

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str | None = None,
        accept: str = "application/json",
        timeout: float | None = None,
    ) -> JSON:
        if self._session is None:
            raise RuntimeError("Kube.start() was not called")
        data = None if body is None else json.dumps(body).encode()
        if data is not None and content_type is None:
            content_type = "application/json"
        try:
            return await self._request_once(method, path, params, data, content_type, accept, timeout)
        except KubeError as exc:
            if exc.status == 429 and 0 < exc.retry_after <= MAX_RETRY_AFTER:
                # Throttled (API Priority and Fairness): not processed, so any call may be asked
                # again after the wait it names (as client-go does), when that wait is short; a
                # longer one is the caller's (UNAVAILABLE: the official CLI retries).
                await asyncio.sleep(exc.retry_after)
            elif not (
                method == "POST"
                and path in _REVIEWS
                and isinstance(exc.__cause__, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
            ):
                # (A pooled connection the server had closed, an API server restarted or a load
                # balancer's idle timeout: aiohttp retries GETs itself, not POSTs. A review changes
                # nothing: asked once more, the caller is not told UNAVAILABLE for it.)
                raise
        return await self._request_once(method, path, params, data, content_type, accept, timeout)

    async def _request_once(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int] | None,
        data: bytes | None,
        content_type: str | None,
        accept: str,
        timeout: float | None,
    ) -> JSON:
        assert self._session is not None
        verb, resource = call_kind(method, path)
        started, code = time.perf_counter(), "error"
        try:
            async with self._session.request(
                method,
                self._config.host + path,
                params={k: str(v) for k, v in (params or {}).items()},
                data=data,
                headers=self._headers(accept, content_type),
                timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
                server_hostname=self._config.server_name,
            ) as resp:
                raw = await resp.read()
                code = "ok" if resp.status < 300 else str(resp.status)
                if resp.status >= 300:
                    raise KubeError.from_body(resp.status, raw, resp.headers.get("Retry-After"))
                return cast(JSON, json.loads(raw)) if raw else {}
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _no_answer(exc) from exc
        finally:
            KUBE_REQUESTS.labels(verb=verb, resource=resource, code=code).observe(
                time.perf_counter() - started
            )

    async def watch(
        self,
        path: str,
        *,
        params: Mapping[str, str | int],
        accept: str = "application/json",
        idle_seconds: float | None = None,
    ) -> AsyncIterator[JSON]:
        """Watch events (`{"type": ..., "object": ...}`) until the server ends the stream.
        `idle_seconds`: WatchIdle when nothing came for that long (default: the stream's
        timeoutSeconds and 30 more)."""
        if self._session is None:
            raise RuntimeError("Kube.start() was not called")
        query = {k: str(v) for k, v in params.items()} | {"watch": "true"}
        try:
            async with self._session.get(
                self._config.host + path,
                params=query,
                headers=self._headers(accept, None),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    # An address that answers nothing (a vanished API server instance) is given up
                    # as a request is, not after the kernel's SYN retries (~2 min of a stale cache).
                    sock_connect=self._timeout,
                    sock_read=idle_seconds or int(params.get("timeoutSeconds", 300)) + 30,
                ),
                server_hostname=self._config.server_name,
            ) as resp:
                if resp.status >= 300:
                    raise KubeError.from_body(resp.status, await resp.read())
                try:
                    async for line in ndjson.lines(resp.content.iter_any()):
                        yield cast(JSON, json.loads(line))
                except TimeoutError as exc:
                    # Silent once the stream began; a server that never answers is no answer.
                    raise WatchIdle(0, "Unavailable", "no answer in time: the watch went silent") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _no_answer(exc) from exc


class WatchIdle(KubeError):
    """A watch that brought nothing, not even a BOOKMARK, for longer than the server sends them."""


def _no_answer(exc: BaseException) -> KubeError:
    # A timeout's text is empty: its type is then all there is to tell.
    text = str(exc).strip()
    what = "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
    return KubeError(0, "Unavailable", f"{what}: {text}" if text else what)


# --- paths --------------------------------------------------------------------------------------


def _q(name: str) -> str:
    return quote(name, safe="")


def jobs_path(namespace: str | None = None, name: str | None = None) -> str:
    base = f"/apis/{GROUP}/{VERSION}"
    path = (
        f"{base}/namespaces/{_q(namespace)}/{PROJECTJOB_PLURAL}"
        if namespace
        else f"{base}/{PROJECTJOB_PLURAL}"
    )
    return f"{path}/{_q(name)}" if name else path


def secrets_path(namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{_q(namespace)}/secrets"
    return f"{path}/{_q(name)}" if name else path


def namespaces_path(name: str | None = None) -> str:
    return f"/api/v1/namespaces/{_q(name)}" if name else "/api/v1/namespaces"


TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
SUBJECT_ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
_REVIEWS = frozenset({TOKEN_REVIEWS, SUBJECT_ACCESS_REVIEWS})
