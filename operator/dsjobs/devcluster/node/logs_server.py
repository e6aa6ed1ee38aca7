"""The kubelet-style HTTPS endpoint the API server proxies `kubectl logs` to.

`GET /containerLogs/{namespace}/{pod}/{container}` with the kubelet's query parameters
(follow, tailLines, timestamps, sinceSeconds, sinceTime, limitBytes, previous), `/healthz`
and `/pods`. With a client CA configured, callers must present a certificate it signed
(the API server's kubelet client certificate); anything else is refused during the TLS
handshake.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from .logs import LogCursor, LogOptions, render, select_entries
from .status import parse_rfc3339
from .worker import PodWorker

Lookup = Callable[[str, str], PodWorker | None]
PodList = Callable[[], list[dict[str, Any]]]


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"invalid {name}: {value!r}\n") from exc


def parse_options(query: dict[str, str], now: datetime) -> LogOptions:
    opts = LogOptions(timestamps=_flag(query.get("timestamps")))
    opts.tail_lines = _int(query.get("tailLines"), "tailLines")
    opts.limit_bytes = _int(query.get("limitBytes"), "limitBytes")
    since_s = _int(query.get("sinceSeconds"), "sinceSeconds")
    if since_s is not None:
        opts.since = now - timedelta(seconds=since_s)
    elif query.get("sinceTime"):
        try:
            opts.since = parse_rfc3339(query["sinceTime"])
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"invalid sinceTime: {query['sinceTime']!r}\n") from exc
    return opts


class _Limited:
    """Writes to the response until limitBytes is reached."""

    def __init__(self, resp: web.StreamResponse, limit: int | None) -> None:
        self.resp = resp
        self.left = limit

    @property
    def full(self) -> bool:
        return self.left is not None and self.left <= 0

    async def write(self, chunks: list[bytes]) -> None:
        data = b"".join(chunks)
        if not data:
            return
        if self.left is not None:
            data = data[: self.left]
            self.left -= len(data)
        await self.resp.write(data)


def make_app(lookup: Lookup, pods: PodList) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def list_pods(_: web.Request) -> web.Response:
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods()})

    async def container_logs(request: web.Request) -> web.StreamResponse:
        ns = request.match_info["namespace"]
        pod_name = request.match_info["pod"]
        container = request.match_info["container"]
        query = dict(request.query)
        opts = parse_options(query, datetime.now(UTC))
        follow = _flag(query.get("follow"))
        previous = _flag(query.get("previous"))
        worker = lookup(ns, pod_name)
        if worker is None:
            raise web.HTTPNotFound(text=f'pod "{pod_name}" not found in namespace "{ns}" on this node\n')
        snap = worker.snap.get(container)
        if snap is None:
            raise web.HTTPBadRequest(text=f'container "{container}" is not valid for pod "{pod_name}"\n')
        path = worker.log_path(container, previous=previous)
        if previous:
            if snap.last_terminated is None and snap.restart_count == 0:
                raise web.HTTPBadRequest(
                    text=f'previous terminated container "{container}" in pod "{pod_name}" not found\n'
                )
        elif not snap.ever_ran():
            raise web.HTTPBadRequest(
                text=f'container "{container}" in pod "{pod_name}" is waiting to start: {snap.waiting_reason or "ContainerCreating"}\n'
            )
        instance = None if previous else worker.container_running_instance(container)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        out = _Limited(resp, opts.limit_bytes)
        cursor = LogCursor(path)
        try:
            await out.write(list(render(select_entries(cursor.read_entries(), opts), opts.timestamps)))
            if follow and instance is not None:
                since_only = LogOptions(since=opts.since)
                notifier = worker.log_notifiers[container]
                while not out.full:
                    await notifier.wait(1.0)
                    more = select_entries(cursor.read_entries(), since_only)
                    await out.write(list(render(more, opts.timestamps)))
                    if worker.container_running_instance(container) != instance:
                        # The instance ended and its logs were drained before it was marked so.
                        await out.write(
                            list(render(select_entries(cursor.read_entries(), since_only), opts.timestamps))
                        )
                        break
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            cursor.close()
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/pods", list_pods)
    app.router.add_get("/pods/", list_pods)
    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", container_logs)
    return app


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_server(app: web.Application, host: str, port: int, ctx: ssl.SSLContext) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True)
    await site.start()
    return runner
