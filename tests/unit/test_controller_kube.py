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
from kopf._cogs.clients import auth
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.structs import credentials

from dsjobs.controller import kube as kube_module
from dsjobs.controller import metrics


def test_a_400_is_an_invalid_for_the_operator_as_a_422_is() -> None:
    # Some admission webhooks deny with 400; Kopf has no class of its own for it.
    body = {"message": 'admission webhook "policy" denied the request: no', "code": 400}
    denied = kopf_errors.APIClientError(body, status=400, headers={})
    better = kube_module.translated(denied)
    assert isinstance(better, kube_module.Invalid) and better.status == 400
    assert better.message == 'admission webhook "policy" denied the request: no'
    as_text = kube_module.translated(kopf_errors.APIClientError("plain text", status=400, headers={}))
    assert isinstance(as_text, kube_module.Invalid) and str(as_text) == "plain text"
    for other in (
        kopf_errors.APIForbiddenError(body, status=403, headers={}),
        kopf_errors.APIClientError(body, status=418, headers={}),
    ):
        assert kube_module.translated(other) is other


# --- retries and timing, against a local HTTP server playing the API server --------------------

Answer = tuple[int, dict[str, Any] | None]


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}


def _observed(verb: str, resource: str) -> Counter[str]:
    """Observations of dsjobs_api_request_seconds so far, by code."""
    counts: Counter[str] = Counter()
    for family in metrics.API_LATENCY.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_count") and (labels["verb"], labels["resource"]) == (verb, resource):
                counts[labels["code"]] += int(sample.value)
    return counts


async def _serving(answers: list[Answer], hits: list[str]) -> tuple[aiohttp.web.AppRunner, str]:
    async def answer(request: aiohttp.web.Request) -> aiohttp.web.Response:
        hits.append(request.method)
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


def _create_pod(answers: list[Answer]) -> tuple[object, list[str], Counter[str], float]:
    """POST a pod against `answers` (the last one repeats): what create gave (or raised), the
    requests made, the observations by code and the seconds taken."""

    async def scenario() -> tuple[object, list[str], Counter[str], float]:
        hits: list[str] = []
        runner, server = await _serving(list(answers), hits)
        try:
            kube = await _kube(server)
            before = _observed("post", "pods")
            started = time.perf_counter()
            outcome: object
            try:
                outcome = await kube.create("pods", "/api/v1/namespaces/p/pods", {"metadata": {"name": "a"}})
            except kube_module.APIError as exc:
                outcome = exc
            took = time.perf_counter() - started
            return outcome, hits, _observed("post", "pods") - before, took
        finally:
            await runner.cleanup()

    return asyncio.run(scenario())


QUOTA = 'pods "a" is forbidden: exceeded quota: q, requested: cpu=4, used: cpu=8, limited: cpu=8'


def test_a_refusal_is_one_request_and_one_observation() -> None:
    # Kopf's loop retried a 403 three times (1.7 s) before the caller, which has its own backoff
    # for refusals, heard of it; a quota's answer does not change in a second.
    refused, hits, seen, took = _create_pod([(403, _status(403, QUOTA))])
    assert isinstance(refused, kube_module.Forbidden) and kube_module.message_of(refused) == QUOTA
    assert hits == ["POST"] and seen == Counter({"403": 1}) and took < 0.5
    invalid, hits, seen, _ = _create_pod([(422, _status(422, "Pod is invalid"))])
    assert isinstance(invalid, kube_module.Invalid) and hits == ["POST"] and seen == Counter({"422": 1})
    denied, hits, seen, _ = _create_pod([(400, _status(400, "denied by webhook"))])
    assert isinstance(denied, kube_module.BadRequest) and hits == ["POST"] and seen == Counter({"400": 1})
    exists, hits, seen, _ = _create_pod([(409, _status(409, "already exists"))])
    assert exists is None and hits == ["POST"] and seen == Counter({"409": 1})


def test_a_transient_failure_is_retried_and_each_attempt_observed() -> None:
    created, hits, seen, took = _create_pod(
        [(503, _status(503, "etcd leader changed")), (500, None), (201, {"metadata": {"name": "a"}})]
    )
    assert created == {"metadata": {"name": "a"}}
    assert hits == ["POST"] * 3 and seen == Counter({"503": 1, "500": 1, "ok": 1})
    assert 0.7 <= took < 1.5  # the backoffs 0.2 s and 0.5 s

    failed, hits, seen, _ = _create_pod([(503, None)])
    assert isinstance(failed, kube_module.APIError) and failed.status == 503
    assert hits == ["POST"] * 4 and seen == Counter({"503": 4})


def test_an_observation_is_one_attempt_not_its_backoff() -> None:
    total = _latency_sum("post", "pods")
    _create_pod([(500, None), (201, {})])
    assert _latency_sum("post", "pods") - total < 0.15  # the 0.2 s backoff is in none


def _latency_sum(verb: str, resource: str) -> float:
    return sum(
        sample.value
        for family in metrics.API_LATENCY.collect()
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
        before = _observed("get", "gone")
        try:
            await kube._timed("get", "gone", "/api/v1/pods", None, None, backoffs=(0.01, 0.01))
        except Exception as exc:
            return exc, _observed("get", "gone") - before
        return None, _observed("get", "gone") - before

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
