"""Who is calling, and may they do this?

Kubernetes mode (default): the `authorization: Bearer <token>` metadata is checked with a
TokenReview; the identity it returns is then checked with a SubjectAccessReview for the RPC's verb
on `projectjobs.dsjobs.dev` in the project's namespace. So cluster RBAC decides who may do what:
a RoleBinding in a project namespace grants access to that project.

Static mode (local development only): `DSJOBS_API_STATIC_TOKENS` names a YAML/JSON file

    tokens:
      - token: dev-token            # the bearer token
        user: alice                 # becomes created_by_id
        projects: ["*"]             # project ids, or "*" for all
        verbs: ["*"]                # optional: get, list, create, update, delete

Decisions are cached briefly (positive and negative separately) and concurrent identical reviews
are coalesced, so a burst of calls with one token costs one review. The decision logic takes the
reviewers as plain async functions, so it is tested without a cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from dsjobs.api import errors
from dsjobs.api.kube import SUBJECT_ACCESS_REVIEWS, TOKEN_REVIEWS, Kube
from dsjobs.models import GROUP, PROJECTJOB_PLURAL

MAX_TOKEN_LENGTH = 16 * 1024


class Verb(StrEnum):
    """Kubernetes verbs on projectjobs that RPCs need."""

    GET = "get"
    LIST = "list"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller (the TokenReview's user)."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Static mode: the projects ("*" = all) and verbs this token may use.
    static_projects: frozenset[str] | None = None
    static_verbs: frozenset[str] | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


TokenReviewFn = Callable[[str], Awaitable[Identity | None]]
AccessReviewFn = Callable[[Identity, Verb, str, str], Awaitable[Decision]]

K = TypeVar("K")
V = TypeVar("V")


class _Interrupted(Exception):
    pass


class TTLCache(Generic[K, V]):
    """A small LRU with per-entry expiry and single-flight loading."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._pending: dict[K, asyncio.Future[V]] = {}
        self._max = max_entries
        self._clock = clock

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            return
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def load(self, key: K, loader: Callable[[], Awaitable[V]], ttl_of: Callable[[V], float]) -> V:
        cached = self.get(key)
        if cached is not None:
            return cached
        pending = self._pending.get(key)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except _Interrupted:
                # The call that was loading went away (client cancelled): load for ourselves.
                return await self.load(key, loader, ttl_of)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await loader()
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        except BaseException:
            future.set_exception(_Interrupted())
            future.exception()
            raise
        finally:
            self._pending.pop(key, None)
        future.set_result(value)
        self.put(key, value, ttl_of(value))
        return value

    def __len__(self) -> int:
        return len(self._data)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the `authorization: Bearer <token>` metadata, or UNAUTHENTICATED."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise errors.unauthenticated("no credentials: send the metadata `authorization: Bearer <token>`")
    value = values[0]
    if any(other != value for other in values[1:]):
        # Which one would be the caller's? A proxy that adds its own: not for this server to guess.
        raise errors.unauthenticated(
            f"{len(values)} different `authorization` metadata values: send one, `Bearer <token>`"
        )
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise errors.unauthenticated("the authorization metadata must be `Bearer <token>`")
    if len(token) > MAX_TOKEN_LENGTH:
        raise errors.unauthenticated("the bearer token is too long")
    return token


@dataclass
class Authenticator:
    """Caches and combines a token reviewer and an access reviewer."""

    review_token: TokenReviewFn
    review_access: AccessReviewFn
    ttl: float = 10.0
    negative_ttl: float = 2.0
    max_entries: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _tokens: TTLCache[str, tuple[Identity | None]] = field(init=False)
    _access: TTLCache[tuple[Identity, Verb, str, str], Decision] = field(init=False)

    def __post_init__(self) -> None:
        self._tokens = TTLCache(self.max_entries, self.clock)
        self._access = TTLCache(self.max_entries, self.clock)

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity:
        token = bearer_token(metadata)
        key = hashlib.sha256(token.encode()).hexdigest()  # never keep raw tokens around

        async def load() -> tuple[Identity | None]:
            return (await self.review_token(token),)

        (identity,) = await self._tokens.load(key, load, lambda r: self.ttl if r[0] else self.negative_ttl)
        if identity is None:
            raise errors.unauthenticated("the bearer token is invalid or expired")
        return identity

    async def decide(self, identity: Identity, verb: Verb, namespace: str, project_id: str) -> Decision:
        async def load() -> Decision:
            return await self.review_access(identity, verb, namespace, project_id)

        return await self._access.load(
            (identity, verb, namespace, project_id),
            load,
            lambda d: self.ttl if d.allowed else self.negative_ttl,
        )

    async def allows(self, identity: Identity, verb: Verb, namespace: str, project_id: str) -> bool:
        return (await self.decide(identity, verb, namespace, project_id)).allowed

    async def authorize(self, identity: Identity, verb: Verb, namespace: str, project_id: str) -> None:
        decision = await self.decide(identity, verb, namespace, project_id)
        if not decision.allowed:
            why = f": {decision.reason}" if decision.reason else ""
            raise errors.permission_denied(
                f"{identity.username} may not {verb.value} jobs of project {project_id!r}{why}"
            )


# --- Kubernetes reviewers -----------------------------------------------------------------------


def kubernetes_reviewers(kube: Kube, audiences: Sequence[str] = ()) -> tuple[TokenReviewFn, AccessReviewFn]:
    async def review_token(token: str) -> Identity | None:
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            result = await kube.request("POST", TOKEN_REVIEWS, body=body)
        except errors.KubeError as exc:
            raise review_failed(exc, "verify the token (TokenReview)") from exc
        return identity_from_review(result.get("status") or {}, audiences)

    async def review_access(identity: Identity, verb: Verb, namespace: str, project_id: str) -> Decision:
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": identity.username,
                "uid": identity.uid or None,
                "groups": list(identity.groups),
                "extra": {k: list(v) for k, v in identity.extra},
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb.value,
                    "group": GROUP,
                    "resource": PROJECTJOB_PLURAL,
                },
            },
        }
        try:
            result = await kube.request("POST", SUBJECT_ACCESS_REVIEWS, body=body)
        except errors.KubeError as exc:
            raise review_failed(exc, "check permissions (SubjectAccessReview)") from exc
        status = result.get("status") or {}
        allowed = bool(status.get("allowed")) and not status.get("denied")
        return Decision(allowed, "" if allowed else str(status.get("reason") or "no RBAC rule allows it"))

    return review_token, review_access


def review_failed(error: errors.KubeError, doing: str) -> errors.ApiError:
    """The gRPC error for a token or access review the cluster did not answer.

    An outage or overload heals by itself (UNAVAILABLE: the official CLI retries it); the cluster
    refusing the API's own review is a deployment problem (its RBAC), which no retry mends.
    """
    detail = error.message or error.reason or f"HTTP {error.status}"
    if error.status in (0, 429, 500, 502, 503, 504) or error.reason == "Timeout":
        return errors.unavailable(f"cannot {doing} now: the cluster does not answer ({detail}); retry")
    if error.status == 401:
        # Not a permission: the API's own credentials are not taken at all, which RBAC cannot mend.
        return errors.internal(
            f"cannot {doing}: the cluster does not accept the API's own credentials ({error.status} "
            f"{error.reason}: {detail}): its ServiceAccount deleted or made again since its token was "
            "issued (restart the API's pods), or its kubeconfig's credentials expired"
        )
    return errors.internal(
        f"cannot {doing}: the cluster refused the API's request ({error.status} {error.reason}: {detail}); "
        "check the API's RBAC"
    )


def identity_from_review(status: Mapping[str, Any], audiences: Sequence[str] = ()) -> Identity | None:
    """The identity of a TokenReview status, or None when not authenticated. With `audiences`
    asked for, one of them must come back in `status.audiences` (an authenticator that ignores
    audiences answers others, and a token issued for another service would do here)."""
    if not status.get("authenticated"):
        return None
    if audiences and not set(audiences) & {str(a) for a in status.get("audiences") or ()}:
        return None
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username:
        return None
    extra = tuple(sorted((str(k), tuple(str(x) for x in v)) for k, v in (user.get("extra") or {}).items()))
    return Identity(
        username=username,
        uid=str(user.get("uid") or ""),
        groups=tuple(str(g) for g in user.get("groups") or ()),
        extra=extra,
    )


# --- static tokens (local development) ----------------------------------------------------------


@dataclass(frozen=True)
class StaticToken:
    token: str
    identity: Identity


def parse_static_tokens(text: str) -> list[StaticToken]:
    """Entries of a static token file (YAML or JSON, see the module docs)."""
    data = yaml.safe_load(text) if text.strip() else {}
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("static token file: expected a top-level `tokens:` list")
    result: list[StaticToken] = []
    all_verbs = {v.value for v in Verb}
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("token") or not entry.get("user"):
            raise ValueError(f"static token file: tokens[{i}] needs `token` and `user`")
        if not isinstance(entry["token"], str):
            # YAML reads `0123` as 83 and `on` as True: the token that works would not be the one
            # written down.
            raise ValueError(f"static token file: tokens[{i}].token must be a string (quote it)")
        if entry["token"] in seen:
            raise ValueError(f"static token file: tokens[{i}] repeats the token of an earlier entry")
        seen.add(entry["token"])
        projects = entry.get("projects", ["*"])
        verbs = entry.get("verbs", ["*"])
        if not isinstance(projects, list) or not isinstance(verbs, list):
            raise ValueError(f"static token file: tokens[{i}].projects/verbs must be lists")
        verb_set = all_verbs if "*" in verbs else {str(v) for v in verbs}
        if unknown := verb_set - all_verbs:
            raise ValueError(f"static token file: tokens[{i}] has unknown verbs {sorted(unknown)}")
        identity = Identity(
            username=str(entry["user"]),
            uid=f"static:{entry['user']}",
            groups=tuple(str(g) for g in entry.get("groups", ())),
            static_projects=frozenset(str(p) for p in projects),
            static_verbs=frozenset(verb_set),
        )
        result.append(StaticToken(str(entry["token"]), identity))
    return result


def static_reviewers(tokens: Sequence[StaticToken]) -> tuple[TokenReviewFn, AccessReviewFn]:
    by_digest = {hashlib.sha256(t.token.encode()).digest(): t.identity for t in tokens}

    async def review_token(token: str) -> Identity | None:
        digest = hashlib.sha256(token.encode()).digest()
        for known, identity in by_digest.items():
            if hmac.compare_digest(known, digest):
                return identity
        return None

    async def review_access(identity: Identity, verb: Verb, namespace: str, project_id: str) -> Decision:
        projects = identity.static_projects or frozenset()
        if "*" not in projects and project_id not in projects:
            return Decision(False, "the token is not valid for this project")
        if verb.value not in (identity.static_verbs or frozenset()):
            return Decision(False, f"the token does not allow {verb.value}")
        return Decision(True)

    return review_token, review_access


def load_static_tokens(path: str) -> list[StaticToken]:
    return parse_static_tokens(Path(path).read_text())
