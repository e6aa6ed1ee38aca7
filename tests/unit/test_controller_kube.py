"""How the operator's Kubernetes client reports API errors (dsjobs.controller.kube)."""

from __future__ import annotations

from kopf._cogs.clients import errors as kopf_errors

from dsjobs.controller import kube as kube_module


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
