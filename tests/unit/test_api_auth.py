"""Authentication and authorization decisions, with fake reviewers (no cluster)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
import pytest

from dsjobs.api import auth, errors
from dsjobs.api.core import Core
from dsjobs.api.errors import ApiError, KubeError

ALICE = auth.Identity("alice", uid="u1", groups=("devs",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reviewers:
    """Counts calls; alice's token is `good`; alice may get/list in ns `p1` only."""

    def __init__(self) -> None:
        self.token_calls = 0
        self.access_calls = 0
        self.fail_token: Exception | None = None

    async def review_token(self, token: str) -> auth.Identity | None:
        self.token_calls += 1
        await asyncio.sleep(0)
        if self.fail_token is not None:
            raise self.fail_token
        return ALICE if token == "good" else None

    async def review_access(
        self, ident: auth.Identity, verb: auth.Verb, ns: str, project: str
    ) -> auth.Decision:
        self.access_calls += 1
        await asyncio.sleep(0)
        ok = ns == "p1" and verb in (auth.Verb.GET, auth.Verb.LIST)
        return auth.Decision(ok, "" if ok else "RBAC: no rule")


def _auth(r: Reviewers, clock: Clock) -> auth.Authenticator:
    return auth.Authenticator(r.review_token, r.review_access, ttl=10, negative_ttl=2, clock=clock)


def _md(value: str) -> list[tuple[str, str]]:
    return [("x-client-version", "datasphere=0.10.0"), ("authorization", value)]


def _code(exc: pytest.ExceptionInfo[ApiError]) -> grpc.StatusCode:
    return exc.value.code


@pytest.mark.parametrize(
    "metadata",
    [None, [], [("x", "y")], _md("Basic abc"), _md("Bearer"), _md("Bearer   "), _md("Bearer " + "x" * 20000)],
)
def test_missing_or_malformed_credentials_are_unauthenticated(metadata: list[tuple[str, str]] | None) -> None:
    r = Reviewers()
    with pytest.raises(ApiError) as exc:
        asyncio.run(_auth(r, Clock()).authenticate(metadata))
    assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
    assert r.token_calls == 0  # rejected before any review


def test_two_different_authorization_values_are_refused_not_the_first_taken() -> None:
    r = Reviewers()
    with pytest.raises(ApiError) as exc:
        asyncio.run(_auth(r, Clock()).authenticate([*_md("Bearer good"), ("authorization", "Bearer other")]))
    assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
    assert exc.value.message == "2 different `authorization` metadata values: send one, `Bearer <token>`"
    assert r.token_calls == 0
    # The same one twice is one.
    assert asyncio.run(_auth(r, Clock()).authenticate([*_md("Bearer good"), *_md("Bearer good")])) == ALICE


def test_valid_token_yields_identity_and_is_cached() -> None:
    r, clock = Reviewers(), Clock()
    a = _auth(r, clock)

    async def run() -> None:
        assert await a.authenticate(_md("Bearer good")) == ALICE
        assert await a.authenticate(_md("bearer good")) == ALICE
        assert r.token_calls == 1
        clock.now += 11
        assert await a.authenticate(_md("Bearer good")) == ALICE
        assert r.token_calls == 2

    asyncio.run(run())


def test_invalid_token_is_unauthenticated_and_negative_cache_is_short() -> None:
    r, clock = Reviewers(), Clock()
    a = _auth(r, clock)

    async def run() -> None:
        for _ in range(3):
            with pytest.raises(ApiError) as exc:
                await a.authenticate(_md("Bearer bad"))
            assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert r.token_calls == 1
        clock.now += 3
        with pytest.raises(ApiError):
            await a.authenticate(_md("Bearer bad"))
        assert r.token_calls == 2

    asyncio.run(run())


def test_concurrent_reviews_of_one_token_are_coalesced() -> None:
    r = Reviewers()
    a = _auth(r, Clock())

    async def run() -> None:
        results = await asyncio.gather(*(a.authenticate(_md("Bearer good")) for _ in range(50)))
        assert all(x == ALICE for x in results)

    asyncio.run(run())
    assert r.token_calls == 1


def test_reviewer_outage_is_not_cached() -> None:
    r = Reviewers()
    a = _auth(r, Clock())
    r.fail_token = ApiError(grpc.StatusCode.UNAVAILABLE, "down")

    async def run() -> None:
        with pytest.raises(ApiError) as exc:
            await a.authenticate(_md("Bearer good"))
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        r.fail_token = None
        assert await a.authenticate(_md("Bearer good")) == ALICE

    asyncio.run(run())


def test_authorization_allows_denies_and_caches_per_verb_and_namespace() -> None:
    r, clock = Reviewers(), Clock()
    a = _auth(r, clock)

    async def run() -> None:
        await a.authorize(ALICE, auth.Verb.GET, "p1", "p1")
        await a.authorize(ALICE, auth.Verb.GET, "p1", "p1")
        assert r.access_calls == 1
        with pytest.raises(ApiError) as exc:
            await a.authorize(ALICE, auth.Verb.CREATE, "p1", "p1")
        assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "alice may not create jobs of project 'p1'" in exc.value.message
        with pytest.raises(ApiError) as exc:
            await a.authorize(ALICE, auth.Verb.GET, "p2", "p2")
        assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert r.access_calls == 3
        clock.now += 11
        await a.authorize(ALICE, auth.Verb.GET, "p1", "p1")
        assert r.access_calls == 4

    asyncio.run(run())


def test_cancelled_loader_lets_waiters_load_themselves() -> None:
    started = asyncio.Event()
    calls = 0

    async def slow(token: str) -> auth.Identity | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await asyncio.sleep(10)
        return ALICE

    async def deny(*_: object) -> auth.Decision:
        return auth.Decision(False)

    a = auth.Authenticator(slow, deny)

    async def run() -> None:
        first = asyncio.create_task(a.authenticate(_md("Bearer t")))
        await started.wait()
        second = asyncio.create_task(a.authenticate(_md("Bearer t")))
        await asyncio.sleep(0)
        first.cancel()
        assert await second == ALICE

    asyncio.run(run())


def test_identity_from_token_review_status() -> None:
    assert auth.identity_from_review({"authenticated": False}) is None
    assert auth.identity_from_review({"authenticated": True, "user": {}}) is None
    ident = auth.identity_from_review(
        {
            "authenticated": True,
            "user": {
                "username": "system:serviceaccount:p1:ci",
                "uid": "abc",
                "groups": ["system:serviceaccounts"],
                "extra": {"authentication.kubernetes.io/pod-name": ["x"]},
            },
        }
    )
    assert ident is not None
    assert ident.username == "system:serviceaccount:p1:ci"
    assert ident.groups == ("system:serviceaccounts",)
    assert ident.extra == (("authentication.kubernetes.io/pod-name", ("x",)),)


@pytest.mark.parametrize(
    ("error", "code", "says"),
    [
        (
            KubeError(0, "Unavailable", "no answer in time"),
            grpc.StatusCode.UNAVAILABLE,
            "cannot verify the token (TokenReview) now: the cluster does not answer (no answer in time); retry",
        ),
        (
            KubeError(503, "ServiceUnavailable", "etcd is down"),
            grpc.StatusCode.UNAVAILABLE,
            "cannot verify the token (TokenReview) now: the cluster does not answer (etcd is down); retry",
        ),
        (
            KubeError(429, "TooManyRequests", ""),
            grpc.StatusCode.UNAVAILABLE,
            "cannot verify the token (TokenReview) now: the cluster does not answer (TooManyRequests); retry",
        ),
        (
            KubeError(403, "Forbidden", 'cannot create resource "tokenreviews"'),
            grpc.StatusCode.INTERNAL,
            "cannot verify the token (TokenReview): the cluster refused the API's request "
            '(403 Forbidden: cannot create resource "tokenreviews"); check the API\'s RBAC',
        ),
        (
            KubeError(401, "Unauthorized", "Unauthorized"),
            grpc.StatusCode.INTERNAL,
            "cannot verify the token (TokenReview): the cluster does not accept the API's own credentials "
            "(401 Unauthorized: Unauthorized): its ServiceAccount deleted or made again since its token "
            "was issued (restart the API's pods), or its kubeconfig's credentials expired",
        ),
    ],
)
def test_a_review_the_cluster_does_not_answer_says_so(
    error: KubeError, code: grpc.StatusCode, says: str
) -> None:
    err = auth.review_failed(error, "verify the token (TokenReview)")
    assert (err.code, err.message) == (code, says)


STATIC = """
tokens:
  - token: dev-all
    user: alice
  - token: dev-p1-read
    user: bob
    projects: [p1]
    verbs: [get, list]
"""


def test_static_tokens() -> None:
    review_token, review_access = auth.static_reviewers(auth.parse_static_tokens(STATIC))

    async def run() -> None:
        alice = await review_token("dev-all")
        bob = await review_token("dev-p1-read")
        assert alice is not None and alice.username == "alice"
        assert bob is not None and bob.username == "bob"
        assert await review_token("nope") is None
        assert (await review_access(alice, auth.Verb.DELETE, "any", "any")).allowed
        assert (await review_access(bob, auth.Verb.GET, "ns", "p1")).allowed
        assert not (await review_access(bob, auth.Verb.CREATE, "ns", "p1")).allowed
        assert not (await review_access(bob, auth.Verb.GET, "ns", "p2")).allowed

    asyncio.run(run())


@pytest.mark.parametrize(
    "text",
    ["", "tokens: 3", "tokens: [{user: a}]", "tokens: [{token: t, user: a, verbs: [fly]}]"],
)
def test_bad_static_token_files(text: str) -> None:
    with pytest.raises(ValueError, match="static token file"):
        auth.parse_static_tokens(text)


def test_an_answer_for_other_audiences_is_not_an_identity() -> None:
    # An authenticator that ignores spec.audiences answers with others: a token issued for another
    # service (the API server, say) would do here.
    status = {
        "authenticated": True,
        "user": {"username": "u"},
        "audiences": ["https://kubernetes.default.svc"],
    }
    assert auth.identity_from_review(status) is not None  # none asked for
    assert auth.identity_from_review(status, ["dsjobs"]) is None
    assert auth.identity_from_review({**status, "audiences": ["x", "dsjobs"]}, ["dsjobs"]) is not None
    assert auth.identity_from_review({"authenticated": True, "user": {"username": "u"}}, ["dsjobs"]) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tokens: [{token: 0123, user: a}]", "must be a string"),  # YAML: 83
        ("tokens: [{token: on, user: a}]", "must be a string"),  # YAML: True
        ("tokens: [{token: t, user: a, projects: [p1]}, {token: t, user: admin}]", "repeats the token"),
    ],
)
def test_static_tokens_that_would_not_be_what_is_written(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        auth.parse_static_tokens(text)


class _JobStub:
    """Core's collaborators for authorized_job: one job `j1` in project acme-merger-2025 (the caller
    may use the verbs in `may`), none other."""

    def __init__(self, may: set[auth.Verb]) -> None:
        self.auth = self
        self.may = may

    async def identity(self, context: Any) -> auth.Identity:
        return auth.Identity("mallory")

    async def locate(self, job_id: str, field: str) -> list[tuple[str, str]]:
        if job_id != "j1":
            raise errors.not_found(f"job {job_id!r} not found")
        return [("ns-secret", "acme-merger-2025")]

    async def allows(self, identity: Any, verb: auth.Verb, namespace: str, project_id: str) -> bool:
        return verb in self.may

    async def authorize(self, identity: Any, verb: auth.Verb, namespace: str, project_id: str) -> None:
        if verb not in self.may:
            raise errors.permission_denied(f"mallory may not {verb.value} jobs of project {project_id!r}")


def _refusal(may: set[auth.Verb], job_id: str, verb: auth.Verb) -> ApiError:
    with pytest.raises(ApiError) as exc:
        asyncio.run(Core.authorized_job(cast(Core, _JobStub(may)), None, job_id, verb))
    return exc.value


def test_a_job_the_caller_may_not_read_is_answered_as_no_job_at_all() -> None:
    # Else anyone could learn that another project ran a job of an id (an Idempotency-Key's id can
    # be computed from the key), and the project's name (it may say much).
    for verb in auth.Verb:
        hidden = _refusal(set(), "j1", verb)
        absent = _refusal(set(), "j2", verb)
        assert (hidden.code, absent.code) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND)
        assert hidden.message == "job 'j1' not found, or mallory may not get it"
        assert absent.message == "job 'j2' not found, or mallory may not get it"


def test_a_job_the_caller_may_read_but_not_change_is_permission_denied_without_its_project() -> None:
    refused = _refusal({auth.Verb.GET}, "j1", auth.Verb.UPDATE)
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.message == "mallory may not update job 'j1'"
