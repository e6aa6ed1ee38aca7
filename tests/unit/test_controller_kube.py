"""How the operator's Kubernetes client reports API errors (dsjobs.controller.kube)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import aiohttp.web
import kopf
import pytest
from kopf._cogs.clients import auth
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.structs import credentials

from dsjobs.controller import kube as kube_module
from dsjobs.controller import metrics


def test_a_400_is_an_invalid_for_the_operator_as_a_422_is() -> None:
    # Kopf has no class of its own for a 400.
    body = {"message": "the body of the request was in an unknown format", "code": 400}
    bad = kopf_errors.APIClientError(body, status=400, headers={})
    better = kube_module.translated(bad)
    assert isinstance(better, kube_module.Invalid) and better.status == 400
    assert better.message == "the body of the request was in an unknown format"
    as_text = kube_module.translated(kopf_errors.APIClientError("plain text", status=400, headers={}))
    assert isinstance(as_text, kube_module.Invalid) and str(as_text) == "plain text"
    for other in (
        kopf_errors.APIForbiddenError(body, status=403, headers={}),
        kopf_errors.APIClientError(body, status=418, headers={}),
    ):
        assert kube_module.translated(other) is other


def test_a_webhook_s_denial_is_a_refusal_whatever_its_code() -> None:
    # The API server answers 400 for a webhook that sets no code (Kyverno), 403 for one that does
    # (Gatekeeper): the job ended PodRejected under one engine and waited under the other.
    message = 'admission webhook "validate.kyverno.svc-fail" denied the request: require-limits'
    denied = kopf_errors.APIClientError({"message": message, "code": 400}, status=400, headers={})
    better = kube_module.translated(denied)
    assert isinstance(better, kube_module.Forbidden) and not isinstance(better, kube_module.Invalid)
    assert better.status == 400 and kube_module.message_of(better) == message


# --- retries and timing, against a local HTTP server playing the API server --------------------

Answer = tuple[int, dict[str, Any] | None]


_real_sleep = asyncio.sleep


class _Clock:
    """The time of dsjobs.controller.kube, faked: `perf_counter()` reads `now`, which moves only by
    the backoff sleeps (recorded in `slept`, at once) and by each answer of the server (`per_answer`
    seconds). What the tests show is the sequence of delays, never how long a run took."""

    def __init__(self, per_answer: float = 0.0) -> None:
        self.now = 0.0
        self.per_answer = per_answer
        self.slept: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.now += delay
        await _real_sleep(0)


class _Patched:
    """A module with some of its attributes replaced (for `kube_module.time` and `.asyncio` only:
    the asyncio module itself stays as it is for aiohttp and the server)."""

    def __init__(self, module: object, **replaced: object) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}


def _observed(verb: str, resource: str) -> Counter[str]:
    """Observations of dsjobs_kube_request_duration_seconds so far, by code."""
    counts: Counter[str] = Counter()
    for family in metrics.KUBE_REQUESTS.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_count") and (labels["verb"], labels["resource"]) == (verb, resource):
                counts[labels["code"]] += int(sample.value)
    return counts


async def _serving(
    answers: list[Answer], hits: list[str], clock: _Clock | None = None
) -> tuple[aiohttp.web.AppRunner, str]:
    async def answer(request: aiohttp.web.Request) -> aiohttp.web.Response:
        hits.append(request.method)
        if clock is not None:
            clock.now += clock.per_answer
        code, body = answers.pop(0) if len(answers) > 1 else answers[0]
        return aiohttp.web.json_response(body, status=code)

    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def _kube(server: str) -> kube_module.Kube:
    vault = credentials.Vault()
    await vault.populate({"local": credentials.ConnectionInfo(server=server)})
    auth.vault_var.set(vault)
    return kube_module.Kube(kopf.OperatorSettings())


def _create_pod(
    answers: list[Answer], clock: _Clock | None = None
) -> tuple[object, list[str], Counter[str], list[float]]:
    """POST a pod against `answers` (the last one repeats) on `clock` (a fresh one if not given):
    what create gave (or raised), the requests made, the observations by code and the backoff
    sleeps, in order."""
    clock = clock or _Clock()

    async def scenario() -> tuple[object, list[str], Counter[str], list[float]]:
        hits: list[str] = []
        runner, server = await _serving(list(answers), hits, clock)
        try:
            kube = await _kube(server)
            before = _observed("post", "pods")
            outcome: object
            try:
                outcome = await kube.create("pods", "/api/v1/namespaces/p/pods", {"metadata": {"name": "a"}})
            except kube_module.APIError as exc:
                outcome = exc
            return outcome, hits, _observed("post", "pods") - before, clock.slept
        finally:
            await runner.cleanup()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kube_module, "time", _Patched(time, perf_counter=clock.perf_counter))
        mp.setattr(kube_module, "asyncio", _Patched(asyncio, sleep=clock.sleep))
        return asyncio.run(scenario())


QUOTA = 'pods "a" is forbidden: exceeded quota: q, requested: cpu=4, used: cpu=8, limited: cpu=8'


def test_a_refusal_is_one_request_and_one_observation() -> None:
    # Kopf's loop retried a 403 three times (1.7 s) before the caller, which has its own backoff
    # for refusals, heard of it; a quota's answer does not change in a second. One request and no
    # backoff: the caller hears of it at once.
    refused, hits, seen, slept = _create_pod([(403, _status(403, QUOTA))])
    assert isinstance(refused, kube_module.Forbidden) and kube_module.message_of(refused) == QUOTA
    assert hits == ["POST"] and seen == Counter({"403": 1}) and slept == []
    invalid, hits, seen, slept = _create_pod([(422, _status(422, "Pod is invalid"))])
    assert isinstance(invalid, kube_module.Invalid) and hits == ["POST"] and seen == Counter({"422": 1})
    assert slept == []
    denied, hits, seen, slept = _create_pod([(400, _status(400, "denied by webhook"))])
    assert isinstance(denied, kube_module.BadRequest) and hits == ["POST"] and seen == Counter({"400": 1})
    assert slept == []
    exists, hits, seen, slept = _create_pod([(409, _status(409, "already exists"))])
    assert exists is None and hits == ["POST"] and seen == Counter({"409": 1}) and slept == []


def test_a_transient_failure_is_retried_and_each_attempt_observed() -> None:
    created, hits, seen, slept = _create_pod(
        [(503, _status(503, "etcd leader changed")), (500, None), (201, {"metadata": {"name": "a"}})]
    )
    assert created == {"metadata": {"name": "a"}}
    assert hits == ["POST"] * 3 and seen == Counter({"503": 1, "500": 1, "ok": 1})
    assert slept == [0.2, 0.5]  # the backoffs, before the 2nd and the 3rd attempt

    failed, hits, seen, slept = _create_pod([(503, None)])
    assert isinstance(failed, kube_module.APIError) and failed.status == 503
    assert hits == ["POST"] * 4 and seen == Counter({"503": 4})
    assert slept == [0.2, 0.5, 1.0]  # and none after the last attempt


def test_an_observation_is_one_attempt_not_its_backoff() -> None:
    # Each answer takes 0.25 s on the fake clock, the backoff between the two attempts 0.2 s: two
    # observations of 0.25 s; a backoff counted in either would make the sum 0.7.
    clock = _Clock(per_answer=0.25)
    total = _latency_sum("post", "pods")
    _, hits, seen, slept = _create_pod([(500, None), (201, {})], clock)
    assert hits == ["POST"] * 2 and seen == Counter({"500": 1, "ok": 1}) and slept == [0.2]
    assert _latency_sum("post", "pods") - total == pytest.approx(0.5)


def _latency_sum(verb: str, resource: str) -> float:
    return sum(
        sample.value
        for family in metrics.KUBE_REQUESTS.collect()
        for sample in family.samples
        if sample.name.endswith("_sum")
        and (sample.labels["verb"], sample.labels["resource"]) == (verb, resource)
    )


def test_a_connection_refused_is_retried_with_the_given_backoffs() -> None:
    async def scenario() -> tuple[BaseException | None, Counter[str]]:
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        kube = await _kube(f"http://127.0.0.1:{port}")
        # Labelled with the resource its path names (as the API server's requests are).
        before = _observed("get", "pods")
        try:
            await kube._timed("get", "/api/v1/namespaces/p/pods", None, None, backoffs=(0.01, 0.01))
        except Exception as exc:
            return exc, _observed("get", "pods") - before
        return None, _observed("get", "pods") - before

    failure, seen = asyncio.run(scenario())
    assert isinstance(failure, aiohttp.ClientConnectionError) and seen == Counter({"error": 3})


def test_a_429_waits_what_it_asks_within_a_bound() -> None:
    def too_many(headers: dict[str, str], details: dict[str, Any] | None = None) -> kopf_errors.APIError:
        body = {**_status(429, "slow down"), **({"details": details} if details else {})}
        return kopf_errors.APITooManyRequestsError(body, status=429, headers=headers)

    assert kube_module.retry_after(too_many({"Retry-After": "1"})) == 1.0
    assert kube_module.retry_after(too_many({}, {"retryAfterSeconds": 2})) == 2.0
    assert kube_module.retry_after(too_many({"Retry-After": "3600"})) == kube_module.MAX_RETRY_AFTER
    assert kube_module.retry_after(too_many({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert kube_module.retry_after(kopf_errors.APIServerError(None, status=503, headers={})) == 0.0
