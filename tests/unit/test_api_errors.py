"""Error mapping: validation problems and Kubernetes failures -> gRPC status codes."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from botocore.exceptions import ClientError
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from prometheus_client import REGISTRY

from dsjobs import storage as st
from dsjobs.api import errors, metrics
from dsjobs.api.core import storage_error
from dsjobs.api.errors import KubeError
from dsjobs.api.server import CallInterceptor
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.s3http import S3HttpError
from dsjobs.validation import Problem


def test_all_problems_in_one_invalid_argument() -> None:
    problems = [
        Problem("job_parameters.cmd", "required", "is required"),
        Problem("job_parameters.input_files[1].sha256", "sha256", '"xyz" is not a sha256'),
        Problem("data_ttl", "data-ttl", "must be between 1h and 365d, or infinity"),
    ]
    err = errors.from_problems(problems)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    lines = err.message.splitlines()
    assert lines[0] == "invalid request: 3 problems:"
    assert lines[1] == "job_parameters.cmd: is required [required]"
    assert "job_parameters.input_files[1].sha256" in lines[2] and "[sha256]" in lines[2]
    assert "data_ttl" in lines[3]
    status = err.status_proto()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == [p.path for p in problems]


def test_clone_problems_say_they_are_the_merged_jobs() -> None:
    err = errors.from_problems(
        [Problem("job_parameters.input_files[1].sha256", "x", "bad")], errors.CLONE_SUBJECT
    )
    head, line = err.message.splitlines()
    assert head == f"invalid request: 1 problem in {errors.CLONE_SUBJECT}:"
    assert line == "job_parameters.input_files[1].sha256: bad [x]"
    assert [v.field for v in err.violations] == ["job_parameters.input_files[1].sha256"]


def test_many_problems_are_capped() -> None:
    err = errors.from_problems([Problem(f"f{i}", "r", "m") for i in range(500)])
    assert "and 450 more problems" in err.message
    assert len(err.violations) == errors.MAX_LISTED_PROBLEMS


@pytest.mark.parametrize(
    ("status", "reason", "message", "code"),
    [
        (404, "NotFound", "", grpc.StatusCode.NOT_FOUND),
        (409, "AlreadyExists", "", grpc.StatusCode.ALREADY_EXISTS),
        (409, "Conflict", "the object has been modified", grpc.StatusCode.ABORTED),
        (410, "Expired", "continue expired", grpc.StatusCode.INVALID_ARGUMENT),
        (422, "Invalid", "spec.x: Invalid value", grpc.StatusCode.INVALID_ARGUMENT),
        (400, "BadRequest", "bad", grpc.StatusCode.INVALID_ARGUMENT),
        (
            403,
            "Forbidden",
            "unable to create new content in namespace p1 because it is being terminated",
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (413, "RequestEntityTooLarge", "", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            403,
            "Forbidden",
            'projectjobs.dsjobs.dev "x" is forbidden: exceeded quota: jobs, requested: '
            "count/projectjobs.dsjobs.dev=1, used: count/projectjobs.dsjobs.dev=10, limited: count/projectjobs.dsjobs.dev=10",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            403,
            "Forbidden",
            'projectjobs.dsjobs.dev "x" is forbidden: status unknown for quota: jobs, resource: count/x',
            grpc.StatusCode.UNAVAILABLE,
        ),
        (
            403,
            "Forbidden",
            'admission webhook "validate.kyverno.svc" denied the request: jobs need a cost-center label',
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (429, "TooManyRequests", "", grpc.StatusCode.UNAVAILABLE),
        (500, "InternalError", "etcd", grpc.StatusCode.UNAVAILABLE),
        (503, "ServiceUnavailable", "", grpc.StatusCode.UNAVAILABLE),
        (504, "Timeout", "", grpc.StatusCode.UNAVAILABLE),
        (0, "Unavailable", "connection refused", grpc.StatusCode.UNAVAILABLE),
        # Our own service account refused: a deployment problem, never blamed on the client.
        (403, "Forbidden", "cannot create projectjobs", grpc.StatusCode.INTERNAL),
        (401, "Unauthorized", "", grpc.StatusCode.INTERNAL),
    ],
)
def test_kubernetes_errors(status: int, reason: str, message: str, code: grpc.StatusCode) -> None:
    err = errors.from_kube(KubeError(status, reason, message), 'job "abc"')
    assert err.code == code
    assert 'job "abc"' in err.message


def test_kube_error_from_status_body() -> None:
    body = (
        b'{"kind":"Status","reason":"Invalid","message":"ProjectJob \\"x\\" is invalid",'
        b'"details":{"causes":[{"field":"spec.jobParameters.cmd","message":"Required value"}]}}'
    )
    e = KubeError.from_body(422, body)
    assert e.reason == "Invalid" and "is invalid" in e.message
    api = errors.from_kube(e, "job x")
    assert api.violations == [errors.FieldViolation("spec.jobParameters.cmd", "Required value")]
    # A proxy's page reached the user whole (an nginx page in an UNAVAILABLE message); an empty
    # 503 ended in "unavailable (job 'x'): " and nothing.
    page = KubeError.from_body(502, b"<html><head><title>502 Bad Gateway</title></head>" + b"x" * 5000)
    assert page.message == "HTTP 502 with an HTML page (a proxy's or load balancer's answer)"
    assert errors.from_kube(page, "job 'x'").message == (
        "the cluster is unavailable (job 'x'): HTTP 502 with an HTML page (a proxy's or load balancer's answer)"
    )
    assert errors.from_kube(KubeError.from_body(503, b""), "job 'x'").message.endswith(
        ": HTTP 503 without a body"
    )
    assert KubeError.from_body(503, b"upstream connect error").message == "upstream connect error"
    # JSON, but not a Status (a proxy's own error document): its status and a bit of it.
    assert KubeError.from_body(502, b'{"error":"upstream timeout"}').message == (
        'HTTP 502: {"error": "upstream timeout"}'
    )
    # A 429's wait: its header, else the Status's retryAfterSeconds; nothing unusable.
    throttled = b'{"kind":"Status","reason":"TooManyRequests","details":{"retryAfterSeconds":3}}'
    assert KubeError.from_body(429, throttled).retry_after == 3.0
    assert KubeError.from_body(429, throttled, "1").retry_after == 1.0
    for header in ("nan", "inf", "-1", "Wed, 21 Oct 2015 07:28:00 GMT"):
        assert KubeError.from_body(429, b"", header).retry_after == 0.0


# --- the status fits in the trailers -------------------------------------------------------------


def long_problems(count: int, text: str) -> list[Problem]:
    return [
        Problem(f"job_parameters.input_files[{i}].desc.path", "path", f"{text!r} is taken")
        for i in range(count)
    ]


@pytest.mark.parametrize("text", ["data/part.csv", "ü" * 40, "😀" * 300, "%\n" * 200])
def test_problem_listings_fit_in_the_trailers(text: str) -> None:
    err = errors.from_problems(long_problems(500, text))
    assert err.wire_bytes() <= errors.MAX_STATUS_BYTES
    lines = err.message.splitlines()
    listed = len(lines) - 2  # the head and the "... and N more" line
    assert listed >= 1 and len(err.violations) == listed
    assert lines[-1] == f"... and {500 - listed} more problems"
    bad = error_details_pb2.BadRequest()
    assert err.status_proto().details[0].Unpack(bad) and len(bad.field_violations) == listed


@pytest.mark.parametrize(
    "err",
    [
        errors.invalid_argument("ü" * 100_000, "f"),
        errors.failed_precondition("x\n" * 100_000),
        errors.from_kube(
            KubeError(
                422,
                "Invalid",
                "😀" * 5000,
                [{"field": f"spec.f{i}", "message": "é" * 300} for i in range(999)],
            ),
            "job x",
        ),
        errors.from_problems([Problem("p" * 10_000, "rule", "ü" * 10_000)]),
    ],
)
def test_every_status_is_bounded(err: errors.ApiError) -> None:
    assert err.wire_bytes() <= errors.MAX_STATUS_BYTES
    assert err.message.endswith("(truncated)") or err.violations


async def _serving(name: str, method: grpc.RpcMethodHandler) -> tuple[grpc.aio.Server, int]:
    """A started server of one method `/t.T/<name>` behind the API's CallInterceptor; its port."""
    server = grpc.aio.server(interceptors=[CallInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {name: method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_a_client_gets_the_listing_not_resource_exhausted() -> None:
    """Through a real server and channel: clients refuse trailers over 8 KiB."""
    problems = long_problems(100, "ü" * 40)

    async def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise errors.from_problems(problems)

    async def run() -> grpc.aio.AioRpcError:
        server, port = await _serving("M", grpc.unary_unary_rpc_method_handler(handler))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/t.T/M")(cast(Any, b""))
                return info.value
        finally:
            await server.stop(None)

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert (err.details() or "").startswith("invalid request: 100 problems:")
    details = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(details).details[0].Unpack(bad) and bad.field_violations


def test_a_request_that_is_no_message_of_its_type_is_invalid_argument() -> None:
    """Invalid UTF-8 in a string field: grpc answered UNKNOWN naming a Python exception."""

    async def handler(
        request: svc.GetProjectJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        return b""

    async def run() -> grpc.aio.AioRpcError:
        method = grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=svc.GetProjectJobRequest.FromString, response_serializer=bytes
        )
        server, port = await _serving("Get", method)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/t.T/Get")(cast(Any, bytes.fromhex("0a02c328")))
                return info.value
        finally:
            await server.stop(None)

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert (err.details() or "").startswith("the request is not a valid Get request")


@pytest.mark.parametrize(
    ("exc", "told"),
    [
        # What the store raises once its retries gave up on an outage: clients retry UNAVAILABLE.
        (
            ConnectionRefusedError(111, "Connection refused"),
            "ConnectionRefusedError: [Errno 111] Connection refused",
        ),
        (TimeoutError("timed out"), "TimeoutError: timed out"),
        # The API out of file descriptors for a connection: passes as streams close.
        (OSError(24, "Too many open files"), "OSError: [Errno 24] Too many open files"),
        (S3HttpError(503, "SlowDown", "reduce your request rate", "projects/p/k"), "S3HttpError"),
        (st.StorageError("download started over 5 times"), "object storage failed: download started over"),
    ],
    ids=repr,
)
def test_an_object_store_outage_is_unavailable_not_internal(exc: Exception, told: str) -> None:
    err = storage_error(exc)
    assert err is not None and err.code == grpc.StatusCode.UNAVAILABLE
    assert told in err.message and "object storage" in err.message


def test_other_failures_are_not_taken_for_storage_outages() -> None:
    assert storage_error(ValueError("a bug")) is None


@pytest.mark.parametrize(
    "exc",
    [
        S3HttpError(403, "403", "access denied, reason not given", "projects/p/inputs/x"),
        ClientError(
            {"Error": {"Code": "SignatureDoesNotMatch"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
            "HeadObject",
        ),
    ],
    ids=["s3http", "botocore"],
)
def test_the_store_refusing_the_api_s_keys_is_internal_in_words(exc: Exception) -> None:
    # Wrong keys after a rotation: every Create failed with "internal error (incident ...)" and a
    # traceback in the log; the admin's problem, so INTERNAL, but saying which.
    err = storage_error(exc)
    assert err is not None and err.code == grpc.StatusCode.INTERNAL
    assert err.message.startswith("object storage refused the API's request")
    if isinstance(exc, S3HttpError):  # which request, for a policy that denies some prefixes
        assert err.message.startswith("object storage refused the API's request for projects/p/inputs/x: ")
    assert "(403): the API's storage keys are wrong" in err.message and "DSJOBS_S3_SECRET_KEY" in err.message
    assert "incident" not in err.message


def test_a_store_s_other_refusal_names_its_code() -> None:
    err = storage_error(S3HttpError(400, "InvalidBucketName", "", "projects/p/k"))
    assert err is not None and err.code == grpc.StatusCode.INTERNAL
    assert err.message == "object storage refused the API's request for projects/p/k: InvalidBucketName (400)"


def _requests(method: str, code: str) -> float:
    """dsjobs_api_requests_total of one method and code."""
    return sum(
        s.value
        for m in metrics.REQUESTS.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels == {"method": method, "code": code}
    )


def test_a_client_gone_while_a_stream_writes_is_cancelled_not_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stream was suspended sending a response when the client went away: the wrapper got
    GeneratorExit, took it for a failure (an ERROR with an incident, INTERNAL in the metrics) and
    aborted a call that was gone. The handler's own generator is closed at once."""
    closed: list[str] = []

    async def handler(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * (1 << 20)  # more than flow control lets through unread
        finally:
            closed.append("closed")

    def requests(code: str) -> float:
        return _requests("/t.T/S", code)

    async def run() -> None:
        server, port = await _serving("S", grpc.unary_stream_rpc_method_handler(handler))
        try:
            for _ in range(3):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    call = channel.unary_stream("/t.T/S")(cast(Any, b""))
                    await call.read()
                    await asyncio.sleep(0.2)  # the server is now waiting to send
                    call.cancel()
            # The server side's ends come after the clients': wait for them (a hang guard only).
            deadline = asyncio.get_running_loop().time() + 30
            while requests("CANCELLED") - before[0] < 3 or len(closed) < 3:
                assert asyncio.get_running_loop().time() < deadline, (closed, requests("CANCELLED"))
                gc.collect()
                await asyncio.sleep(0.05)
        finally:
            await server.stop(None)

    before = requests("CANCELLED"), requests("INTERNAL")
    with caplog.at_level(logging.INFO, logger="dsjobs"):
        asyncio.run(run())
    assert (requests("CANCELLED") - before[0], requests("INTERNAL") - before[1]) == (3, 0)
    assert closed == ["closed"] * 3
    assert not [r for r in caplog.records if r.name.startswith("dsjobs") and r.levelno >= logging.WARNING]


def test_calls_beyond_the_limit_are_refused_but_health_checks_never_are() -> None:
    """grpc's maximum_concurrent_rpcs counted the kubelet's health checks too: a replica holding
    that many log streams failed its probes and was restarted, cutting every stream."""
    hold = asyncio.Event()

    async def follow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield b"first"
        await hold.wait()

    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"ok"

    def streams() -> float | None:
        return REGISTRY.get_sample_value("dsjobs_api_inflight_streams", {"method": "/t.T/Follow"})

    def unary() -> float | None:
        return REGISTRY.get_sample_value("dsjobs_api_inflight_requests")

    async def run() -> tuple[grpc.StatusCode, str, bytes, bytes]:
        interceptor = CallInterceptor(max_calls=1)
        server = grpc.aio.server(interceptors=[interceptor])
        methods = {
            "t.T": {
                "Follow": grpc.unary_stream_rpc_method_handler(follow),
                "Get": grpc.unary_unary_rpc_method_handler(answer),
            },
            "grpc.health.v1.Health": {"Check": grpc.unary_unary_rpc_method_handler(answer)},
        }
        server.add_generic_rpc_handlers(
            tuple(grpc.method_handlers_generic_handler(s, m) for s, m in methods.items())
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = channel.unary_stream("/t.T/Follow")(cast(Any, b""))
                await stream.read()  # holds the one slot
                assert (streams(), unary()) == (1, 0)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary("/t.T/Get")(cast(Any, b""))
                health = await channel.unary_unary("/grpc.health.v1.Health/Check")(cast(Any, b""))
                hold.set()
                while await stream.read() != grpc.aio.EOF:
                    pass
                again = await channel.unary_unary("/t.T/Get")(cast(Any, b""))  # the slot is free
                assert interceptor.inflight == 0
                assert (streams(), unary()) == (0, 0)  # the refused call too gave its count back
                return refused.value.code(), refused.value.details() or "", health, again
        finally:
            await server.stop(None)

    code, details, health, again = asyncio.run(run())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "serves 1 calls at once, its most" in details
    assert health == b"ok" and again == b"ok"


def test_a_failure_every_call_shares_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    # An outage of the cluster fails every call: one line per call was hundreds a second.
    from dsjobs.api import server

    class Context:
        async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
            return None

    now = [1000.0]
    throttle = server.LogThrottle(server.FAILURE_LOG_INTERVAL, clock=lambda: now[0])
    original, server._FAILURES = server._FAILURES, throttle
    try:
        down = errors.unavailable("the cluster does not answer: no answer in time")
        with caplog.at_level(logging.DEBUG, logger="dsjobs.api"):
            for at in (0.0, 1.0, 2.0, 9.0, 10.5, 11.0):
                now[0] = 1000.0 + at
                asyncio.run(server._abort(Context(), "/M/Get", down))  # type: ignore[arg-type]
            asyncio.run(server._abort(Context(), "/M/List", down))  # type: ignore[arg-type]
    finally:
        server._FAILURES = original
    told = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert told == [
        ("WARNING", "/M/Get unavailable: the cluster does not answer: no answer in time"),
        (
            "WARNING",
            "/M/Get unavailable: the cluster does not answer: no answer in time (3 more like it in the last 10s)",
        ),
        ("WARNING", "/M/List unavailable: the cluster does not answer: no answer in time"),
    ]
    # The ones held back are still there at DEBUG.
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 4


def test_a_call_past_its_deadline_is_counted_as_deadline_exceeded_not_cancelled() -> None:
    # The client got DEADLINE_EXCEEDED; the metrics said CANCELLED (what the server saw), so a
    # too short client timeout looked like users giving up.
    async def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.sleep(30)
        return b""

    def requests(code: str) -> float:
        return _requests("/t.T/Slow", code)

    async def run() -> None:
        server, port = await _serving("Slow", grpc.unary_unary_rpc_method_handler(handler))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/t.T/Slow")(cast(Any, b""), timeout=0.3)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                call = channel.unary_unary("/t.T/Slow")(cast(Any, b""))
                await asyncio.sleep(0.3)
                call.cancel()
            deadline = asyncio.get_running_loop().time() + 30
            while requests("DEADLINE_EXCEEDED") - before[0] < 1 or requests("CANCELLED") - before[1] < 1:
                assert asyncio.get_running_loop().time() < deadline  # a hang guard only
                await asyncio.sleep(0.05)
        finally:
            await server.stop(None)

    before = requests("DEADLINE_EXCEEDED"), requests("CANCELLED")
    asyncio.run(run())
    assert (requests("DEADLINE_EXCEEDED") - before[0], requests("CANCELLED") - before[1]) == (1, 1)
