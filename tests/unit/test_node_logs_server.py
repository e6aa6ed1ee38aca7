"""The kubelet-style log endpoint over HTTP, with a pod worker that runs nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dsjobs.devcluster.node.logs import encode_entry
from dsjobs.devcluster.node.logs_server import make_app, parse_options
from dsjobs.devcluster.node.podspec import NodeContext
from dsjobs.devcluster.node.status import Terminated
from dsjobs.devcluster.node.worker import PodWorker

NS = 1_767_323_045_000_000_000  # 2026-01-02T03:04:05Z
POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
    "spec": {"containers": [{"name": "main", "image": "img"}, {"name": "idle", "image": "img"}]},
}


def make_worker(tmp_path: Path) -> PodWorker:
    node = NodeContext("n", "127.0.0.1", {"cpu": Fraction(1)}, "127.0.0.1", 6443, "/venv/bin")
    ctx: Any = SimpleNamespace(state_dir=str(tmp_path), node=node)
    worker = PodWorker(ctx, POD)
    Path(worker.dir).mkdir(parents=True)
    main = worker.snap.get("main")
    assert main is not None
    main.state = "terminated"
    main.terminated = Terminated(exit_code=0, reason="Completed", finished_at=datetime.now(UTC))
    main.restart_count = 1
    main.last_terminated = main.terminated
    lines = [encode_entry(NS + i * 10**9, "stdout", False, f"line {i}".encode()) for i in range(5)]
    Path(worker.log_path("main")).write_bytes(b"".join(lines))
    Path(worker.log_path("main", previous=True)).write_bytes(encode_entry(NS, "stderr", False, b"old"))
    return worker


async def fetch(app: web.Application, path: str) -> tuple[int, str]:
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(path)
        return resp.status, await resp.text()


def test_container_logs_query_parameters(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    app = make_app(lambda ns, name: worker if (ns, name) == ("ns", "p") else None, lambda: [POD])
    base = "/containerLogs/ns/p/main"

    async def main() -> None:
        assert await fetch(app, base) == (200, "".join(f"line {i}\n" for i in range(5)))
        assert await fetch(app, base + "?tailLines=2") == (200, "line 3\nline 4\n")
        assert await fetch(app, base + "?limitBytes=8") == (200, "line 0\nl")
        assert await fetch(app, base + "?previous=true") == (200, "old\n")
        status, text = await fetch(app, base + "?tailLines=1&timestamps=true")
        assert text == "2026-01-02T03:04:09.000000000Z line 4\n"
        status, text = await fetch(app, base + "?sinceTime=2026-01-02T03:04:08Z")
        assert text == "line 3\nline 4\n"
        # Follow on a terminated container returns what there is and ends.
        assert await fetch(app, base + "?follow=true") == (200, "".join(f"line {i}\n" for i in range(5)))
        status, text = await fetch(app, "/containerLogs/ns/p/idle")
        assert status == 400 and "is waiting to start" in text
        status, text = await fetch(app, "/containerLogs/ns/p/nope")
        assert status == 400 and "not valid" in text
        assert (await fetch(app, "/containerLogs/ns/other/main"))[0] == 404
        assert await fetch(app, "/healthz") == (200, "ok")
        status, text = await fetch(app, "/pods")
        assert status == 200 and '"PodList"' in text

    asyncio.run(main())


def test_parse_options_rejects_garbage() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    opts = parse_options({"sinceSeconds": "60", "tailLines": "3", "timestamps": "1"}, now)
    assert opts.since == datetime(2026, 1, 1, 23, 59, tzinfo=UTC)
    assert (opts.tail_lines, opts.timestamps) == (3, True)
    with pytest.raises(web.HTTPBadRequest):
        parse_options({"tailLines": "many"}, now)
