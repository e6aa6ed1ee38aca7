"""The grpc.aio server: services, health, reflection, TLS, metrics, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dsjobs import storage as st
from dsjobs.api import auth as authmod
from dsjobs.api import errors, metrics
from dsjobs.api.cluster import InstanceTypeCatalog, JobIndex, ProjectIndex
from dsjobs.api.core import STORAGE_ATTEMPTS, STORAGE_TIMEOUT_SECONDS, Core
from dsjobs.api.errors import ApiError, KubeError
from dsjobs.api.kube import Kube
from dsjobs.api.servicer import OperationService, ProjectJobService, ProjectService
from dsjobs.api.settings import Settings, derived_page_token_key
from dsjobs.api.tlsfiles import ReloadingCertificate
from dsjobs.kubeconfig import load_config
from dsjobs.logformat import JsonFormatter, LogThrottle, TextFormatter
from dsjobs.pb.yandex.cloud.datasphere.v2 import project_service_pb2, project_service_pb2_grpc
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2, project_job_service_pb2_grpc
from dsjobs.pb.yandex.cloud.operation import operation_service_pb2, operation_service_pb2_grpc

log = logging.getLogger("dsjobs.api")

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:  # the stubs make it generic; the runtime class is not
    Handler = grpc.RpcMethodHandler

SERVICE_NAMES = (
    project_job_service_pb2.DESCRIPTOR.services_by_name["ProjectJobService"].full_name,
    operation_service_pb2.DESCRIPTOR.services_by_name["OperationService"].full_name,
    project_service_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name,
)


# --- errors, metrics and logging for every call ------------------------------------------------


def _trailers(err: ApiError) -> tuple[tuple[str, bytes], ...]:
    if not err.violations:
        return ()
    return (("grpc-status-details-bin", err.status_proto().SerializeToString()),)


def _as_api_error(exc: BaseException, method: str) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, KubeError):
        return errors.from_kube(exc, "the cluster")
    if isinstance(exc, st.StorageError):
        return errors.unavailable(f"object storage failed: {exc}")
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s (incident %s)", method, incident, exc_info=exc)
    return errors.internal(f"internal error (incident {incident}); see the server log")


@dataclass(frozen=True)
class _Undecodable:
    """A request whose bytes are no message of its type (invalid UTF-8 in a string field, a cut
    message): grpc would answer UNKNOWN naming a Python exception; the handler says what it is."""

    why: str


def _decoding(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return parse


def _ended_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """How a call the server saw cancelled ended for its client: its deadline passed
    (DEADLINE_EXCEEDED, what the client got), or it went away (CANCELLED)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        kind = method.rsplit("/", 1)[-1]
        raise errors.invalid_argument(f"the request is not a valid {kind} request: {request.why}")


# Served whatever the load: the kubelet's probes, and tools asking what the server offers.
UNLIMITED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Turns ApiError (and anything unexpected) into statuses; records metrics; logs failures;
    refuses calls beyond `max_calls` at once (0: no limit) with RESOURCE_EXHAUSTED.

    The limit is here rather than grpc's `maximum_concurrent_rpcs`, which counts the health checks
    too: a replica holding that many log streams failed its probes and was restarted, cutting them.
    """

    def __init__(self, max_calls: int = 0) -> None:
        self._wrapped: dict[str, Handler] = {}
        self.max_calls = max_calls
        self.inflight = 0

    @contextlib.contextmanager
    def _slot(self, method: str) -> Iterator[None]:
        if not self.max_calls or method.startswith(UNLIMITED_PREFIXES):
            yield
            return
        if self.inflight >= self.max_calls:
            raise errors.resource_exhausted(
                f"the server serves {self.inflight} calls at once, its most; retry later"
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            # The stubs type handlers as synchronous; on an aio server they are coroutine functions.
            inner_unary: Any = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                metrics.INFLIGHT_UNARY.inc()
                try:
                    with self._slot(method):
                        _check_decoded(request, method)
                        return await inner_unary(request, context)
                except asyncio.CancelledError:
                    code = _ended_code(context)
                    raise
                except grpc.aio.AbortError:  # the handler aborted by itself
                    code = _code_of(context)
                    raise
                except BaseException as exc:
                    err = _as_api_error(exc, method)
                    # Known before aborting: abort raises, and context.code() is not reliable then.
                    code = err.code
                    await _abort(context, method, err)
                finally:
                    metrics.INFLIGHT_UNARY.dec()
                    _record(method, code, start)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=_decoding(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                gauge = metrics.INFLIGHT_STREAMS.labels(method)
                gauge.inc()
                try:
                    with self._slot(method):
                        _check_decoded(request, method)
                        # Closed as soon as this one is (not when it is collected): its waits and
                        # reads end.
                        async with contextlib.aclosing(inner_stream(request, context)) as responses:
                            async for response in responses:
                                yield response
                except (asyncio.CancelledError, GeneratorExit):
                    # GeneratorExit: the client went away while a response was being sent, and the
                    # call is closed; nothing can be sent on it any more.
                    code = _ended_code(context)
                    raise
                except grpc.aio.AbortError:
                    code = _code_of(context)
                    raise
                except BaseException as exc:
                    err = _as_api_error(exc, method)
                    code = err.code
                    await _abort(context, method, err)
                finally:
                    gauge.dec()
                    _record(method, code, start)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=_decoding(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # client/bidi streaming: none of ours


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    actual = context.code()
    return actual if isinstance(actual, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


#: Failed calls of one method and code are logged once per this many seconds (with a count of
#: those held back): an outage fails every call, and the metrics count each of them.
FAILURE_LOG_INTERVAL = 10.0
_FAILURES = LogThrottle(FAILURE_LOG_INTERVAL)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], method: str, err: ApiError) -> None:
    loud = err.code == grpc.StatusCode.INTERNAL or (
        err.code == grpc.StatusCode.UNAVAILABLE and not err.expected
    )
    held = _FAILURES.admit((method, err.code)) if loud else None
    if held is not None:
        more = f" ({held} more like it in the last {FAILURE_LOG_INTERVAL:.0f}s)" if held else ""
        if err.code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s%s", method, err.message, more)
        else:
            log.warning("%s unavailable: %s%s", method, err.message, more)
    else:
        log.debug("%s: %s %s", method, err.code.name, err.message)
    await context.abort(err.code, err.message, trailing_metadata=_trailers(err))


def _record(method: str, code: grpc.StatusCode, start: float) -> None:
    metrics.REQUESTS.labels(method, code.name).inc()
    metrics.LATENCY.labels(method).observe(time.perf_counter() - start)


# --- logging ------------------------------------------------------------------------------------


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("dsjobs").setLevel(settings.log_level)


# --- the server ---------------------------------------------------------------------------------


async def _check_store(store: st.Storage) -> None:
    """Log at once when the object store refuses or does not answer the API's settings: every
    Create (its upload URLs, deduplication) and download needs it."""
    problem = await asyncio.to_thread(
        store.with_timeout(STORAGE_TIMEOUT_SECONDS).with_attempts(1).access_problem
    )
    if problem is not None:
        log.error("%s; Creates and downloads fail until it does (the dsjobs-storage Secret)", problem)


async def _freeze_after(synced: asyncio.Event) -> None:
    """Exempt what start-up made (modules, the first LIST of every job) from garbage collection.

    Otherwise the first full collection comes with the first burst of calls and walks all of it:
    a pause of 100-300 ms with 10k jobs, which every call waiting meanwhile sees.
    """
    await synced.wait()
    gc.freeze()


#: How long shutdown waits for the cleanups of failed Creates that outlived their calls (deleting a
#: job whose POST got no answer) before it closes the cluster client under them: each is a GET and a
#: DELETE, or a few on conflicts. One still running then is cancelled, and its job may stay CREATING.
CLEANUP_GRACE_SECONDS = 10.0
#: Longest wait for the job index before a new replica says it is ready anyway (its LIST of every
#: job takes seconds for ten thousand).
READY_WAIT_SECONDS = 60.0


async def _finish_cleanups(cleanups: Collection[asyncio.Task[None]], grace: float) -> None:
    """Wait up to `grace` for `cleanups`, then cancel those still running (and say so)."""
    pending = set(cleanups)
    if not pending:
        return
    log.info("waiting for cleanups", extra={"cleanups": len(pending), "grace": grace})
    _, unfinished = await asyncio.wait(pending, timeout=grace)
    if unfinished:
        log.warning(
            "cleanups unfinished at shutdown, cancelled: a job whose creation got no answer may stay "
            "CREATING until deleted",
            extra={"cleanups": sorted(t.get_name() for t in unfinished)},
        )
        for task in unfinished:
            task.cancel()
        await asyncio.wait(unfinished)


#: Request headers a call may carry: a bearer token at its longest, with room for the rest.
METADATA_BYTES: Final = authmod.MAX_TOKEN_LENGTH + 8 * 1024
#: The gRPC server's options besides the request size.
SERVER_OPTIONS: Final = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Request headers: bearer tokens up to auth.MAX_TOKEN_LENGTH (16 KiB), OIDC ones among them.
    # gRPC's default soft limit (8 KiB) refused some calls with larger ones at random.
    ("grpc.max_metadata_size", METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", METADATA_BYTES),
    ("grpc.so_reuseport", 0),
)


class ApiServer:
    """Owns the gRPC server and the process-wide clients."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: grpc.aio.Server | None = None
        self.port: int = 0
        self.core: Core | None = None
        self.health = health.aio.HealthServicer()
        self._kube: Kube | None = None
        self._jobs: JobIndex | None = None
        self._jobs_service: ProjectJobService | None = None
        self._freezer: asyncio.Task[None] | None = None
        self._store_check: asyncio.Task[None] | None = None
        self._ready: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        # First: settings that cannot work (StorageConfigError) end the start before anything opens.
        store = await asyncio.to_thread(
            lambda: (
                st.Storage.from_env()
                .with_timeout(STORAGE_TIMEOUT_SECONDS)
                .with_attempts(STORAGE_ATTEMPTS)
                .connect()
            )
        )
        kube_config, refresh = await asyncio.to_thread(load_config, s.kubeconfig or None)
        kube = Kube(kube_config, refresh, timeout=s.kube_timeout)
        await kube.start()
        self._kube = kube
        if s.page_token_key_is_random:
            s = self.settings = replace(
                s,
                page_token_key=derived_page_token_key(store.settings.secret_key),
                page_token_key_is_random=False,
            )
        if s.auth_mode == "static":
            review_token, review_access = authmod.static_reviewers(
                authmod.load_static_tokens(s.static_tokens)
            )
        else:
            review_token, review_access = authmod.kubernetes_reviewers(kube, s.token_audiences)
        authenticator = authmod.Authenticator(
            review_token, review_access, ttl=s.auth_cache_ttl, negative_ttl=s.auth_negative_ttl
        )
        jobs = JobIndex(kube)
        jobs.start()
        self._jobs = jobs
        core = Core(s, kube, store, authenticator, ProjectIndex(kube), jobs, InstanceTypeCatalog(kube))
        self.core = core
        try:
            # Loaded before serving, so that the first calls do not wait for it.
            await core.projects.all()
        except KubeError as exc:
            log.warning("cannot list projects yet (the first calls will retry): %s", exc)
        self._freezer = asyncio.create_task(_freeze_after(jobs.synced), name="gc-freeze")
        self._store_check = asyncio.create_task(_check_store(store), name="store-check")
        gc.freeze()

        options = [("grpc.max_receive_message_length", s.max_message_bytes), *SERVER_OPTIONS]
        server = grpc.aio.server(interceptors=[CallInterceptor(s.max_concurrent_rpcs)], options=options)
        jobs_service = self._jobs_service = ProjectJobService(core)
        project_job_service_pb2_grpc.add_ProjectJobServiceServicer_to_server(jobs_service, server)
        operation_service_pb2_grpc.add_OperationServiceServicer_to_server(
            OperationService(core, jobs_service), server
        )
        project_service_pb2_grpc.add_ProjectServiceServicer_to_server(ProjectService(core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

        if s.tls_cert:
            creds = ReloadingCertificate(Path(s.tls_cert), Path(s.tls_key)).credentials()
            self.port = server.add_secure_port(s.listen, creds)
        else:
            self.port = server.add_insecure_port(s.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {s.listen}")
        await server.start()
        self.server = server
        await self.health.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        self._ready = asyncio.create_task(self.ready_when_indexed(jobs.synced), name="readiness")
        metrics.serve(s.metrics_listen)
        log.info(
            "serving",
            extra={
                "listen": s.listen,
                "port": self.port,
                "tls": bool(s.tls_cert),
                "auth": s.auth_mode,
                "metrics": s.metrics_listen,
            },
        )

    async def ready_when_indexed(self, synced: asyncio.Event, wait: float = READY_WAIT_SECONDS) -> None:
        """Say the services are SERVING (what the readiness probe asks) once the job index has
        listed every job, or after `wait`. Before, each job id asked for is one cluster-wide LIST
        (`JobIndex.locate`): a new replica taking its share of a rollout's traffic at once would
        send the API server many of them. The overall health (the liveness probe's) says SERVING
        from the start; a drain (graceful shutdown) wins over this."""
        for name in SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await asyncio.wait_for(synced.wait(), wait)
        except TimeoutError:
            log.warning("the job index is not in sync after %.0fs; serving anyway", wait)
        for name in SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def hurry(self) -> None:
        """Cut the drain delay short (a second SIGTERM/SIGINT: a developer pressing Ctrl-C again)."""
        self._hurry.set()

    async def drain(self) -> None:
        """Say NOT_SERVING and end log streams (clients reconnect elsewhere), keep serving new calls
        for the drain delay, then stop listening and give in-flight calls the drain timeout.

        grpc's stop() closes the listening socket at once, and for a few seconds after SIGTERM the
        Service's endpoints, kube-proxy and load balancers still send new connections here: each
        would be refused (UNAVAILABLE), and the official CLI gives up after a few quick retries.
        """
        if self.server is None:
            return
        s = self.settings
        log.info("draining", extra={"delay": s.drain_delay, "grace": s.drain_timeout})
        await self.health.enter_graceful_shutdown()
        if self.core is not None:
            self.core.draining.set()
        if s.drain_delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), s.drain_delay)
        await self.server.stop(s.drain_timeout)
        self.server = None

    async def close(self) -> None:
        await self.drain()
        if self._jobs_service is not None:
            # Before the cluster client closes: they delete jobs their calls may have left behind.
            self._jobs_service.hurrying.set()
            await _finish_cleanups(self._jobs_service.cleanups, CLEANUP_GRACE_SECONDS)
        for task in (self._freezer, self._store_check, self._ready):
            if task is not None:
                task.cancel()
        if self._jobs is not None:
            await self._jobs.stop()
        if self.core is not None:
            self.core.close()
        if self._kube is not None:
            await self._kube.close()


async def serve(settings: Settings) -> None:
    api = ApiServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            api.hurry()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await api.start()
    try:
        await stop.wait()
    finally:
        await api.close()
        log.info("stopped")
