"""Errors the API answers with, and how other failures map onto gRPC status codes.

Servicer code raises `ApiError`; the interceptor turns it into the call's status (with a
`google.rpc.Status` in the `grpc-status-details-bin` trailer when there are field violations),
bounded so that it always fits in the trailers (MAX_STATUS_BYTES). Every message names what the
client can fix: the field and the rule, or the object. INTERNAL is reserved for our own bugs and
misconfiguration; nothing a client sends can produce it.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from dsjobs.validation.problems import Problem

# A status travels in the HTTP/2 trailers, twice when it has field violations: `grpc-message`
# (percent-encoded UTF-8) and `grpc-status-details-bin` (base64 of a google.rpc.Status repeating the
# message). Clients refuse trailers over 8 KiB (RESOURCE_EXHAUSTED "received metadata size exceeds",
# hiding the real answer), so both together stay within this, well under it.
MAX_STATUS_BYTES = 4 * 1024
# One INVALID_ARGUMENT lists the problems that fit in MAX_STATUS_BYTES, this many at most.
MAX_LISTED_PROBLEMS = 50
# Per violation, so that one long path or message cannot crowd out all the others.
MAX_FIELD_BYTES = 256
MAX_DESCRIPTION_BYTES = 512
_TRUNCATED = " ... (truncated)"
# Room for the "... and N more problems" line, whose N grows when a listing stops early.
_TAIL_RESERVE = 64


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
        # Every status is bounded where it is made, whoever made it: see MAX_STATUS_BYTES.
        self.message, self.violations = _fit(self.code, self.message, self.violations)
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def status_proto(self) -> status_pb2.Status:
        """The `google.rpc.Status` equivalent (also used for an operation's `error`)."""
        return _status_proto(self.code, self.message, self.violations)

    def wire_bytes(self) -> int:
        """What this status takes in the trailers (values only; see MAX_STATUS_BYTES)."""
        return _status_wire_bytes(self.code, self.message, self.violations)


def _status_proto(
    code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation]
) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in violations
            ]
        )
        status.details.add().Pack(bad)
    return status


def _message_wire_bytes(text: str) -> int:
    """Length of `text` as a grpc-message: UTF-8, every byte outside printable ASCII (and %) as %XX."""
    data = text.encode(errors="replace")
    return len(data) + 2 * sum(1 for b in data if b < 0x20 or b > 0x7E or b == 0x25)


def _status_wire_bytes(code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation]) -> int:
    size = _message_wire_bytes(message)
    if violations:
        details = len(_status_proto(code, message, violations).SerializeToString())
        size += 4 * -(-details // 3)  # base64, padded
    return size


def _clip(text: str, limit: int) -> str:
    """`text`, cut so that it takes at most `limit` bytes as a grpc-message."""
    if len(text) * 12 <= limit or _message_wire_bytes(text) <= limit:  # 12: a 4-byte character
        return text
    budget = limit - len(_TRUNCATED)
    end = used = 0
    for ch in text:
        used += _message_wire_bytes(ch)
        if used > budget:
            break
        end += 1
    return text[:end] + _TRUNCATED


def _fit(
    code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation]
) -> tuple[str, list[FieldViolation]]:
    """The message clipped and as many violations as fit in MAX_STATUS_BYTES (the message first:
    it is what clients show; it names the fields too)."""
    message = _clip(message, MAX_STATUS_BYTES)
    kept = [
        FieldViolation(_clip(v.field, MAX_FIELD_BYTES), _clip(v.description, MAX_DESCRIPTION_BYTES))
        for v in violations[:MAX_LISTED_PROBLEMS]
    ]
    while kept and _status_wire_bytes(code, message, kept) > MAX_STATUS_BYTES:
        kept.pop()
    return message, kept


def quoted(text: str, limit: int = 80) -> str:
    """A value the caller sent, quoted for a message: a long one cut, and said to be (cut at 80
    characters without a word, a 10000-character id read as an 80-character one)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def invalid_argument(message: str, field_name: str = "") -> ApiError:
    violations = [FieldViolation(field_name, message)] if field_name else []
    text = f"{field_name}: {message}" if field_name else message
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, text, violations)


def not_found(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unauthenticated(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, message)


def permission_denied(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, message)


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, message)


def server_restarting(offset: int) -> ApiError:
    """What a log stream ended by a drain is told: the official CLI reconnects from `offset`."""
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        f"the server is restarting; reconnect with offset {offset}",
        expected=True,
    )


def resource_exhausted(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, expected=True)


def internal(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INTERNAL, message)


# What Clone's problems are about: it validates the job it would create, whose lists (inputs,
# outputs, arguments, ...) are the source job's with the overrides merged in, so their indices are
# not those of the request's job_parameters_overrides.
CLONE_SUBJECT = (
    "the cloned job (the source job's spec with job_parameters_overrides merged in; "
    "job_parameters... names its merged parameters)"
)


def from_problems(problems: Iterable[Problem], subject: str = "") -> ApiError:
    """All validation problems in one INVALID_ARGUMENT: `field: message [rule]`, one per line.

    As many as fit in MAX_STATUS_BYTES are listed, in the message and as field violations alike;
    a last line counts the others. Fields are spec paths (`job_parameters...`, as in Create's
    request); `subject` says what they belong to when that is not the request itself (Clone:
    CLONE_SUBJECT).
    """
    listed = list(problems)
    count = len(listed)
    about = f" in {subject}" if subject else ""
    head = f"invalid request: {count} problem{'s' if count != 1 else ''}{about}:"
    lines: list[str] = []
    violations: list[FieldViolation] = []
    for p in listed[:MAX_LISTED_PROBLEMS]:
        path = _clip(p.path, MAX_FIELD_BYTES)
        violation = FieldViolation(path, _clip(p.description, MAX_DESCRIPTION_BYTES))
        line = f"{path}: {violation.description}" if path else violation.description
        message = _listing(head, [*lines, line], count)
        size = _status_wire_bytes(grpc.StatusCode.INVALID_ARGUMENT, message, [*violations, violation])
        if lines and size > MAX_STATUS_BYTES - _TAIL_RESERVE:
            break  # the first one always goes in: clipped, it fits
        lines.append(line)
        violations.append(violation)
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, _listing(head, lines, count), violations)


def _listing(head: str, lines: Sequence[str], count: int) -> str:
    rest = count - len(lines)
    tail = [f"... and {rest} more problem{'s' if rest != 1 else ''}"] if rest else []
    return "\n".join([head, *lines, *tail])


# --- Kubernetes API errors --------------------------------------------------------------------


@dataclass
class KubeError(Exception):
    """A failed Kubernetes API call: HTTP status plus the `Status` object's reason and message."""

    status: int
    reason: str = ""
    message: str = ""
    causes: list[Mapping[str, Any]] = field(default_factory=list)
    #: Seconds a 429 asks to wait before asking again (its Retry-After), 0 when none.
    retry_after: float = 0.0

    def __post_init__(self) -> None:
        # Status 0 is no HTTP answer at all (a connection or timeout error): no number to show.
        head = f"{self.status} {self.reason}" if self.status else self.reason
        super().__init__(f"{head}: {self.message}")

    @classmethod
    def from_body(cls, status: int, body: bytes | str, retry_after: str | None = None) -> KubeError:
        """The error of an answer: its status, its body (a Status), and a 429's Retry-After
        header (else the Status's retryAfterSeconds)."""
        error = cls._from_body(status, body)
        if status == 429 and retry_after:
            with contextlib.suppress(ValueError):  # an HTTP date: not worth parsing for a short wait
                seconds = float(retry_after)
                error.retry_after = seconds if math.isfinite(seconds) and seconds > 0 else 0.0
        return error

    @classmethod
    def _from_body(cls, status: int, body: bytes | str) -> KubeError:
        try:
            data = json.loads(body)
        except (ValueError, TypeError):
            # Not the API server's Status: a proxy or load balancer answered. Its HTML page is no
            # message for a user (it reached them whole); its status is what tells.
            text = (body.decode(errors="replace") if isinstance(body, bytes) else str(body)).strip()
            if not text:
                text = f"HTTP {status} without a body"
            elif text.startswith("<"):
                text = f"HTTP {status} with an HTML page (a proxy's or load balancer's answer)"
            return cls(status, "", text[:300])
        if not isinstance(data, dict):
            return cls(status, "", str(data)[:1000])
        details = data.get("details") or {}
        causes = details.get("causes") if isinstance(details, dict) else None
        wait = details.get("retryAfterSeconds") if isinstance(details, dict) else None
        reason, message = str(data.get("reason", "")), str(data.get("message", ""))
        if not reason and not message:  # JSON, but no Status (a proxy's own error document)
            message = f"HTTP {status}: {json.dumps(data)[:200]}"
        return cls(
            status,
            reason,
            message,
            list(causes or []),
            float(wait) if isinstance(wait, int | float) and math.isfinite(wait) and wait > 0 else 0.0,
        )


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
            f"{what} rejected by the cluster: {error.message}",
            violations,
        )
    if s == 403 and "being terminated" in error.message:
        return failed_precondition(f"{what}: the project is being deleted")
    if s == 403 and "status unknown for quota" in error.message:
        # A quota just created: admission refuses until its controller has counted (seconds).
        return unavailable(f"{what}: the project's quota is being counted; retry ({error.message})")
    if s == 403 and "exceeded quota" in error.message:
        # A ResourceQuota of the project (e.g. count/projectjobs.dsjobs.dev): the user's to know.
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what} refused by the project's quota: {error.message}"
        )
    if s == 403 and "denied the request" in error.message:
        # An admission webhook's policy (Gatekeeper, Kyverno...): its message says what to change.
        return failed_precondition(f"{what} refused by the cluster's policy: {error.message}")
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
