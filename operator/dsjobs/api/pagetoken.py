"""Opaque, signed page tokens for ListProjectJob.

A token wraps the Kubernetes `continue` value together with what it is valid for (the project and
the filter), signed with an HMAC key that all replicas share. A client can neither forge a token
nor replay one against another project or filter. The token is signed, not encrypted: its holder
can read the Kubernetes continue token inside (base64 JSON naming the last job listed, which the
page showed anyway). A token that does not verify is the client's fault: INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

# What a token of this version carries. A change of either means a new version: replicas of two
# versions meet during a rollout, and one that misread the other's token (v1 carried a skip count
# under "s", then "a" without a new version) gave the same page again and again.
_VERSION = 2
_KEYS = frozenset({"v", "p", "f", "c", "a"})
_MAC_BYTES = 16  # 128-bit tags: forging one is out of reach, and tokens stay short
MAX_TOKEN_LENGTH = 8192


class PageTokenError(ValueError):
    """The page token was not issued by this service for this listing."""


@dataclass(frozen=True)
class PageState:
    """What a page token carries."""

    project_id: str
    filter_digest: str
    continue_token: str
    #: The name of the last job an earlier page gave when its byte budget cut it short inside the
    #: Kubernetes page `continue_token` starts: this page gives only the jobs after it (names are
    #: the listing's order). Empty when the page starts where `continue_token` does.
    after: str = ""


def filter_digest(filter_expr: str) -> str:
    """A short digest of the normalized filter; a token is only valid for the filter it was issued for."""
    return hashlib.sha256(" ".join(filter_expr.split()).encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    # validate=True: characters outside the alphabet are an error, not silently skipped.
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, b"dsjobs-page-token\0" + payload, hashlib.sha256).digest()[:_MAC_BYTES]


def encode(state: PageState, key: bytes) -> str:
    payload = json.dumps(
        {
            "v": _VERSION,
            "p": state.project_id,
            "f": state.filter_digest,
            "c": state.continue_token,
            **({"a": state.after} if state.after else {}),
        },
        separators=(",", ":"),
    ).encode()
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def decode(token: str, key: bytes, *, project_id: str, filter_expr: str) -> PageState:
    """The state of a token issued for this project and filter, or PageTokenError."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise PageTokenError("too long")
    body, sep, tag = token.partition(".")
    try:
        payload = _unb64(body)
        mac = _unb64(tag)
    except (ValueError, TypeError) as exc:
        raise PageTokenError("malformed") from exc
    if not sep or not hmac.compare_digest(mac, _mac(key, payload)):
        raise PageTokenError("not issued by this service (or altered)")
    try:
        data = json.loads(payload)
        state = PageState(
            project_id=str(data["p"]),
            filter_digest=str(data["f"]),
            continue_token=str(data["c"]),
            after=str(data.get("a", "")),
        )
        version = data["v"]
        unknown = set(data) - _KEYS
    except (ValueError, KeyError, TypeError) as exc:  # pragma: no cover - signed payloads are ours
        raise PageTokenError("malformed") from exc
    if version != _VERSION or unknown:
        raise PageTokenError("from an incompatible server version; start the listing again")
    if state.project_id != project_id:
        raise PageTokenError("belongs to a listing of another project")
    if state.filter_digest != filter_digest(filter_expr):
        raise PageTokenError("belongs to a listing with another filter")
    return state
