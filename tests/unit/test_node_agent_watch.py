"""The node agent's pod watch against an API server (a proxy in the way) that answers each watch
and ends it at once, or answers each with 410: it backs off instead of spinning."""

from __future__ import annotations

import asyncio
import json
import time
import types
from typing import Any

import pytest
from aiohttp import web

from dsjobs import backoff as backoff_module
from dsjobs.devcluster.node.agent import Agent
from dsjobs.devcluster.node.kubeapi import KubeClient, KubeConfig


def _watch_against(answer: str, until: int) -> tuple[list[tuple[str, float]], float]:
    """Runs Agent.watch_pods until the server saw `until` watches (a hang guard of 20 s): the
    requests it saw (LIST or WATCH, when), and when the loop began."""
    seen: list[tuple[str, float]] = []
    enough = asyncio.Event()

    async def pods(request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("true", "1")
        seen.append(("WATCH" if watch else "LIST", time.monotonic()))
        if sum(1 for kind, _ in seen if kind == "WATCH") >= until:
            enough.set()
        if not watch:
            return web.json_response({"kind": "PodList", "metadata": {"resourceVersion": "100"}, "items": []})
        resp = web.StreamResponse()
        await resp.prepare(request)
        if answer == "gone":
            gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
            await resp.write(json.dumps(gone).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def scenario() -> float:
        app = web.Application()
        app.router.add_get("/api/v1/pods", pods)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        api = KubeClient(KubeConfig(f"http://127.0.0.1:{port}", None, None, None, "t", True))
        agent: Any = types.SimpleNamespace(
            api=api,
            cfg=types.SimpleNamespace(name="n1"),
            stopping=asyncio.Event(),
            ready_event=asyncio.Event(),
            _sync=lambda items: None,
            on_pod=lambda pod: None,
            on_pod_deleted=lambda pod: None,
            _cleanup_orphan_dirs=lambda uids: None,
        )
        began = time.monotonic()
        task = asyncio.create_task(Agent.watch_pods(agent))
        try:
            await asyncio.wait_for(enough.wait(), 20)
        finally:
            agent.stopping.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.close()
            await runner.cleanup()
        return began

    began = asyncio.run(scenario())
    return seen, began


@pytest.mark.parametrize(
    ("answer", "least"),
    [
        # Ended at once, no event: waits of 0.25, 0.5 and 1 s before the 2nd, 3rd and 4th watch.
        ("empty", 1.75),
        # 410 each time: the first relisted at once, then waits of 0.5 and 1 s.
        ("gone", 1.5),
    ],
)
def test_a_watch_that_ends_at_once_or_with_410_each_time_backs_off(
    monkeypatch: pytest.MonkeyPatch, answer: str, least: float
) -> None:
    # It watched (or listed and watched) again at once: some 3,000 requests a second, a full core.
    monkeypatch.setattr(backoff_module.random, "random", lambda: 0.0)  # the shortest waits
    seen, began = _watch_against(answer, until=4)
    watches = [at for kind, at in seen if kind == "WATCH"]
    assert watches[3] - began >= least, seen  # (a sleep never ends early)
    assert len(watches) == 4
