"""The node agent's last word on its way out: the node NotReady, tried again while it may help."""

from __future__ import annotations

import asyncio
import types

import aiohttp
import pytest

from dsjobs.devcluster.node.agent import Agent
from dsjobs.devcluster.node.kubeapi import ApiError


def _tries(failures: list[BaseException | None], within: float) -> tuple[int, float]:
    """How many PATCHes `_mark_not_ready` made, and how long it took, against answers `failures`
    (None: accepted; the last one repeats)."""
    calls: list[None] = []

    async def patch_node_status(ready: bool, message: str) -> None:
        assert not ready and message == "node agent stopped"
        calls.append(None)
        failure = failures[min(len(calls), len(failures)) - 1]
        if failure is not None:
            raise failure

    async def main() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await Agent._mark_not_ready(types.SimpleNamespace(patch_node_status=patch_node_status), within)  # type: ignore[arg-type]
        return loop.time() - began

    took = asyncio.run(main())
    return len(calls), took


def test_an_api_server_that_does_not_answer_at_first_is_tried_again() -> None:
    refused = aiohttp.ClientConnectionError("connection refused")
    assert _tries([refused, refused, None], within=6.0)[0] == 3


@pytest.mark.parametrize(("status", "tries_at_least"), [(403, 1), (503, 3), (429, 3)])
def test_a_refusal_is_not_tried_again_an_outage_is_until_the_time_is_up(
    status: int, tries_at_least: int
) -> None:
    error = ApiError(status, {"message": "no"}, "PATCH", "/api/v1/nodes/n/status")
    tries, took = _tries([error], within=1.5)
    assert tries >= tries_at_least and took < 2.5
    if status == 403:
        assert tries == 1 and took < 0.5
