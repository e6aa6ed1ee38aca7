"""Errors the API answers with, and how other failures map onto gRPC status codes.

Servicer code raises `ApiError`; the interceptor turns it into the call's status (with a
`google.rpc.Status` in the `grpc-status-details-bin` trailer when there are field violations).
Every message names what the client can fix: the field and the rule, or the object. INTERNAL is
reserved for our own bugs and misconfiguration; nothing a client sends can produce it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from dsjobs.validation.problems import Problem

# One INVALID_ARGUMENT message lists every problem; this many at most, so that a request with
# thousands of broken entries still gets an answer that fits in the trailers.
MAX_LISTED_PROBLEMS = 50
MAX_MESSAGE_LENGTH = 16 * 1024


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class ApiError(Exception):
    """A status for the current call."""

    code: grpc.StatusCode
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    # Part of normal operation (e.g. log streams ended by a draining server): not worth a warning.
    expected: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def status_proto(self) -> status_pb2.Status:
        """The `google.rpc.Status` equivalent (also used for an operation's `error`)."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            status.details.add().Pack(bad)
        return status


def _truncate(message: str) -> str:
    if len(message) <= MAX_MESSAGE_LENGTH:
        return message
    return message[: MAX_MESSAGE_LENGTH - 20] + " ... (truncated)"


def invalid_argument(message: str, field_name: str = "") -> ApiError:
    violations = [FieldViolation(field_name, message)] if field_name else []
    text = f"{field_name}: {message}" if field_name else message
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, _truncate(text), violations)


def not_found(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, _truncate(message))


def failed_precondition(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, _truncate(message))


def unauthenticated(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, _truncate(message))


def permission_denied(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, _truncate(message))


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, _truncate(message))


def internal(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INTERNAL, _truncate(message))


def from_problems(problems: Iterable[Problem], prefix: str = "") -> ApiError:
    """All validation problems in one INVALID_ARGUMENT: `field: message [rule]`, one per line.

    `prefix` places spec-relative paths in the request (e.g. `job_parameters` -> `job_parameters`
    stays as is for Create; Clone reports `job_parameters_overrides...`).
    """
    listed = list(problems)
    violations: list[FieldViolation] = []
    lines: list[str] = []
    for p in listed[:MAX_LISTED_PROBLEMS]:
        path = _request_path(prefix, p.path)
        violations.append(FieldViolation(path, f"{p.message} [{p.rule}]"))
        lines.append(f"{path}: {p.message} [{p.rule}]" if path else f"{p.message} [{p.rule}]")
    if len(listed) > MAX_LISTED_PROBLEMS:
        lines.append(f"... and {len(listed) - MAX_LISTED_PROBLEMS} more problems")
    count = len(listed)
    head = f"invalid request: {count} problem{'s' if count != 1 else ''}:"
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, _truncate("\n".join([head, *lines])), violations)


def _request_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if path == "job_parameters" or path.startswith(("job_parameters.", "job_parameters[")):
        return prefix + path[len("job_parameters") :]
    return path


# --- Kubernetes API errors --------------------------------------------------------------------


@dataclass
class KubeError(Exception):
    """A failed Kubernetes API call: HTTP status plus the `Status` object's reason and message."""

    status: int
    reason: str = ""
    message: str = ""
    causes: list[Mapping[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(f"{self.status} {self.reason}: {self.message}")

    @classmethod
    def from_body(cls, status: int, body: bytes | str) -> KubeError:
        try:
            data = json.loads(body)
        except (ValueError, TypeError):
            text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
            return cls(status, "", text[:1000])
        if not isinstance(data, dict):
            return cls(status, "", str(data)[:1000])
        details = data.get("details") or {}
        causes = details.get("causes") if isinstance(details, dict) else None
        return cls(status, str(data.get("reason", "")), str(data.get("message", "")), list(causes or []))


def from_kube(error: KubeError, what: str) -> ApiError:
    """The gRPC status for a Kubernetes API failure while acting on `what` (e.g. `job "abc"`).

    4xx caused by the request map to the client codes; our own credentials being refused or an
    unexpected answer is INTERNAL (a deployment problem, logged); overload and outages UNAVAILABLE
    (the official CLI retries those).
    """
    s, reason = error.status, error.reason
    if s == 404:
        return not_found(f"{what} not found")
    if s == 409 and reason == "AlreadyExists":
        return ApiError(grpc.StatusCode.ALREADY_EXISTS, f"{what} already exists")
    if s == 409:
        return ApiError(grpc.StatusCode.ABORTED, f"{what} was changed concurrently; retry the call")
    if s == 410:
        return invalid_argument(
            f"the listing of {what} expired (its snapshot is gone); start again without a page token",
            "page_token",
        )
    if s == 422 or s == 400:
        violations = [
            FieldViolation(str(c.get("field", "")), str(c.get("message", "")))
            for c in error.causes
            if isinstance(c, Mapping)
        ]
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            _truncate(f"{what} rejected by the cluster: {error.message}"),
            violations,
        )
    if s == 403 and "being terminated" in error.message:
        return failed_precondition(f"{what}: the project is being deleted")
    if s == 413:
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what} is too large to store")
    if s == 429:
        return unavailable(f"the cluster is overloaded ({what}); retry later")
    if s == 504 or reason == "Timeout":
        return unavailable(f"the cluster timed out ({what}); retry the call")
    if s in (0, 500, 502, 503):
        return unavailable(f"the cluster is unavailable ({what}): {error.message or error.reason}")
    # 401/403 for our own service account, or anything unexpected: our problem, not the client's.
    return internal(f"cluster call failed ({what}): {s} {reason}".rstrip())
