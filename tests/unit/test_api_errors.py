"""Error mapping: validation problems and Kubernetes failures -> gRPC status codes."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from dsjobs.api import errors
from dsjobs.api.errors import KubeError
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


def test_clone_problems_name_the_override_field() -> None:
    err = errors.from_problems(
        [Problem("job_parameters.env.vars", "x", "bad")], prefix="job_parameters_overrides"
    )
    assert "job_parameters_overrides.env.vars: bad [x]" in err.message


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
    assert KubeError.from_body(502, b"<html>bad gateway</html>").message.startswith("<html>")


def test_messages_are_bounded() -> None:
    assert len(errors.invalid_argument("x" * 100_000).message) <= errors.MAX_MESSAGE_LENGTH
