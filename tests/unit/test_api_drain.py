"""Shutdown of an API replica: new calls are still served while the load balancers let go of it
(a real grpc.aio server on localhost), and the cleanups of failed Creates finish before the cluster
client closes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsjobs.api import server as server_module
from dsjobs.api.core import Core
from dsjobs.api.kube import Kube
from dsjobs.api.server import ApiServer, CallInterceptor
from dsjobs.api.servicer import ProjectJobService
from dsjobs.api.settings import Settings

REPO = Path(__file__).resolve().parents[2]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


@asynccontextmanager
async def serving(api: ApiServer) -> AsyncIterator[str]:
    """A grpc.aio server on localhost as ApiServer.start makes it (interceptor, its health service),
    with one unary method `/t.T/Echo` in place of the DataSphere services; yields its address."""
    server = grpc.aio.server(interceptors=[CallInterceptor()])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),)
    )
    health_pb2_grpc.add_HealthServicer_to_server(api.health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await api.health.set(health.OVERALL_HEALTH, SERVING)
    api.server = server
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def new_call(address: str) -> bytes:
    """A unary call on a new connection: what a client sent here by the load balancer makes."""
    async with grpc.aio.insecure_channel(address) as channel:
        return cast(bytes, await channel.unary_unary("/t.T/Echo")(cast(Any, b"hi"), timeout=10))


async def health_status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return int(answer.status)


async def until_not_serving(address: str) -> None:
    for _ in range(1000):  # a hang guard, not a time limit of the drain
        if await health_status(address) == NOT_SERVING:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the health service never said NOT_SERVING")


def test_new_calls_are_served_during_the_drain_delay_while_health_says_not_serving() -> None:
    async def run() -> tuple[bytes, int, bool, grpc.StatusCode]:
        # A delay no test outlasts: the drain goes on when told to (a second signal), so the call
        # below is made during the delay whatever the machine's speed.
        api = ApiServer(Settings(drain_delay=3600, drain_timeout=5))
        draining = asyncio.Event()
        api.core = cast(Core, SimpleNamespace(draining=draining))
        async with serving(api) as address:
            assert await new_call(address) == b"hi"
            drain = asyncio.create_task(api.drain())
            await until_not_serving(address)
            during = await new_call(address)
            status = await health_status(address)
            streams_told = draining.is_set()  # following log streams end at once, as before
            api.hurry()
            await drain
            with pytest.raises(grpc.aio.AioRpcError) as after:
                await new_call(address)
            return during, status, streams_told, after.value.code()

    during, status, streams_told, after = asyncio.run(run())
    assert during == b"hi"
    assert status == NOT_SERVING
    assert streams_told
    assert after == grpc.StatusCode.UNAVAILABLE  # stopped listening once the delay was over


def test_without_a_drain_delay_the_server_stops_listening_at_once() -> None:
    async def run() -> grpc.StatusCode:
        api = ApiServer(Settings(drain_delay=0, drain_timeout=5))
        async with serving(api) as address:
            assert await new_call(address) == b"hi"
            await api.drain()
            with pytest.raises(grpc.aio.AioRpcError) as after:
                await new_call(address)
            return after.value.code()

    assert asyncio.run(run()) == grpc.StatusCode.UNAVAILABLE


class ClosingKube:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def close(self) -> None:
        self.events.append("kube closed")


async def orphaned_cleanup(service: ProjectJobService, cleanup: Any) -> None:
    """Start `cleanup` as a Create does (ProjectJobService._shielded), then cancel the call, as the
    end of the drain timeout does: the cleanup goes on without it."""
    call = asyncio.ensure_future(service._shielded(cleanup))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


def test_close_waits_for_a_pending_cleanup_before_closing_the_cluster_client() -> None:
    async def run() -> tuple[list[str], list[str]]:
        events: list[str] = []
        gate = asyncio.Event()

        async def remove_unanswered_job() -> None:
            await gate.wait()  # e.g. its DELETE is under way
            events.append("cleanup done")

        api = ApiServer(Settings(drain_delay=0))
        api._kube = cast(Kube, ClosingKube(events))
        service = api._jobs_service = ProjectJobService(cast(Core, None))
        await orphaned_cleanup(service, remove_unanswered_job())
        closing = asyncio.create_task(api.close())
        for _ in range(20):
            await asyncio.sleep(0)
        while_pending = list(events)
        gate.set()
        await closing
        return while_pending, events

    while_pending, events = asyncio.run(run())
    assert while_pending == []
    assert events == ["cleanup done", "kube closed"]


def test_close_cancels_a_cleanup_that_outlasts_its_grace_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server_module, "CLEANUP_GRACE_SECONDS", 0.01)

    async def run() -> tuple[list[str], bool]:
        events: list[str] = []

        async def stuck() -> None:
            await asyncio.Event().wait()

        api = ApiServer(Settings(drain_delay=0))
        api._kube = cast(Kube, ClosingKube(events))
        service = api._jobs_service = ProjectJobService(cast(Core, None))
        await orphaned_cleanup(service, stuck())
        [task] = service.cleanups
        with caplog.at_level(logging.INFO, logger="dsjobs.api"):
            await api.close()
        return events, task.cancelled()

    events, cancelled = asyncio.run(run())
    assert events == ["kube closed"]
    assert cancelled
    assert any("cleanups unfinished at shutdown" in r.getMessage() for r in caplog.records)


def test_a_cleanup_that_fails_after_its_call_ended_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    # shield() drops what the cleanup raises once its call is cancelled: nobody else would tell.
    async def run() -> None:
        gate = asyncio.Event()

        async def failing() -> None:
            await gate.wait()
            raise RuntimeError("the cluster client is closed")

        service = ProjectJobService(cast(Core, None))
        await orphaned_cleanup(service, failing())
        [task] = service.cleanups
        gate.set()
        with contextlib.suppress(RuntimeError):
            await task
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="dsjobs.api"):
        asyncio.run(run())
    failed = [r for r in caplog.records if r.getMessage() == "a cleanup failed after its call ended"]
    assert len(failed) == 1 and "the cluster client is closed" in str(failed[0].exc_info)


def test_the_deployments_grace_covers_the_drain_delay_timeout_and_cleanups() -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy/base/api-deployment.yaml").read_text()))
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    defaults = Settings()
    assert grace > defaults.drain_delay + defaults.drain_timeout + server_module.CLEANUP_GRACE_SECONDS


async def service_status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int((await health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)).status)


def test_a_replica_is_ready_once_its_job_index_is_in_sync(caplog: pytest.LogCaptureFixture) -> None:
    """Before, each job id asked for was a cluster-wide LIST: a new replica took its share of a
    rollout's traffic at once. The readiness probe asks ProjectJobService's health, the liveness
    probe the overall health."""
    job_service = server_module.SERVICE_NAMES[0]
    docs = yaml.safe_load_all((REPO / "deploy/base/api-deployment.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["service"] == job_service
    assert "service" not in container["livenessProbe"]["grpc"]

    async def run() -> None:
        api = ApiServer(Settings(drain_delay=0, drain_timeout=1))
        async with serving(api) as address:
            synced = asyncio.Event()
            ready = asyncio.create_task(api.ready_when_indexed(synced, wait=3600))
            for _ in range(1000):  # a hang guard
                with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND until the task set it
                    if await service_status(address, job_service) == NOT_SERVING:
                        break
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"{job_service} was never NOT_SERVING while the job index was not in sync")
            assert await health_status(address) == SERVING  # the liveness probe's
            synced.set()
            await ready
            for name in server_module.SERVICE_NAMES:
                assert await service_status(address, name) == SERVING
            # The index never in sync: ready anyway after the wait, said at WARNING.
            with caplog.at_level(logging.WARNING, logger="dsjobs.api"):
                await api.ready_when_indexed(asyncio.Event(), wait=0)
            assert await service_status(address, job_service) == SERVING
            assert "not in sync after 0s; serving anyway" in caplog.text
            # A drain wins over a readiness that comes after it.
            await api.health.enter_graceful_shutdown()
            await api.ready_when_indexed(synced, wait=1)
            assert await service_status(address, job_service) == NOT_SERVING

    asyncio.run(run())


def test_a_token_as_long_as_auth_takes_reaches_it() -> None:
    # gRPC's default soft limit on request headers (8 KiB) refused calls carrying an OIDC token
    # of 9..16 KiB at random (RESOURCE_EXHAUSTED, which the CLI does not retry): auth takes 16 KiB.
    from dsjobs.api.auth import MAX_TOKEN_LENGTH
    from dsjobs.api.server import SERVER_OPTIONS

    async def run() -> list[bytes]:
        server = grpc.aio.server(options=list(SERVER_OPTIONS))
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        token = "Bearer " + "t" * (MAX_TOKEN_LENGTH - len("Bearer "))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/t.T/Echo")
                return [
                    cast(
                        bytes, await call(cast(Any, b"hi"), metadata=(("authorization", token),), timeout=10)
                    )
                    for _ in range(20)
                ]
        finally:
            await server.stop(None)

    assert asyncio.run(run()) == [b"hi"] * 20
