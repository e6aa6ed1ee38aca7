"""The Secrets `make up` creates as an admin would: the API's page-token key."""

from __future__ import annotations

from pathlib import Path

import yaml

from dsjobs.api.settings import from_args
from dsjobs.devcluster.s3 import S3Config
from dsjobs.localstack import API_SECRET, PAGE_TOKEN_KEY_ENV, api_secret

REPO = Path(__file__).resolve().parents[2]


def _s3(secret_key: str) -> S3Config:
    return S3Config(endpoint="http://127.0.0.1:9000", bucket="b", access_key="A", secret_key=secret_key)


def test_the_api_secret_is_the_one_the_deployment_loads() -> None:
    docs = yaml.safe_load_all((REPO / "deploy/base/api-deployment.yaml").read_text())
    [deployment] = [d for d in docs if d and d.get("kind") == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    optional = [
        e["secretRef"]["name"] for e in container["envFrom"] if e.get("secretRef", {}).get("optional")
    ]
    assert optional == [API_SECRET]
    secret = api_secret(_s3("s1"), "dsjobs-system")
    assert secret["metadata"] == {
        "name": API_SECRET,
        "namespace": "dsjobs-system",
        "labels": {"app.kubernetes.io/part-of": "dsjobs"},
    }
    settings = from_args([], environ=dict(secret["stringData"]))
    assert not settings.page_token_key_is_random


def test_the_page_token_key_is_stable_per_cluster() -> None:
    key = api_secret(_s3("s1"), "ns")["stringData"][PAGE_TOKEN_KEY_ENV]
    assert api_secret(_s3("s1"), "ns")["stringData"][PAGE_TOKEN_KEY_ENV] == key  # `make up` again
    assert api_secret(_s3("s2"), "ns")["stringData"][PAGE_TOKEN_KEY_ENV] != key  # another cluster
    assert len(key) >= 16 and "s1" not in key
