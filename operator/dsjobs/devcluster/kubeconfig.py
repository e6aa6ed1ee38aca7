"""Kubeconfig files for the dev cluster's users (admin, components, nodes)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from dsjobs.devcluster.files import write_private
from dsjobs.devcluster.pki import CertPair

CLUSTER_NAME = "dsjobs-dev"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render(
    server: str,
    ca_cert: bytes,
    user: str,
    client: CertPair,
    *,
    token: str | None = None,
) -> dict[str, Any]:
    """A self-contained kubeconfig (certs embedded, so the file can be copied).

    With `token`, a second context `<cluster>-token` authenticates by bearer
    token, for tools that cannot present client certificates.
    """
    users: list[dict[str, Any]] = [
        {
            "name": user,
            "user": {
                "client-certificate-data": _b64(client.read_cert()),
                "client-key-data": _b64(client.read_key()),
            },
        }
    ]
    contexts: list[dict[str, Any]] = [
        {"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user, "namespace": "default"}}
    ]
    if token is not None:
        users.append({"name": f"{user}-token", "user": {"token": token}})
        contexts.append(
            {
                "name": f"{CLUSTER_NAME}-token",
                "context": {"cluster": CLUSTER_NAME, "user": f"{user}-token", "namespace": "default"},
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CLUSTER_NAME,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)},
            }
        ],
        "users": users,
        "contexts": contexts,
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }


def write(path: Path, config: dict[str, Any]) -> None:
    """Write atomically and private (it holds a client key)."""
    write_private(path, yaml.safe_dump(config, sort_keys=False))
