"""The operator's login (Kopf's credentials and its leader election's) from a kubeconfig: read as
the API reads it. Kopf's own reader took only a static token: with a token file or an exec plugin
(EKS, GKE) the operator was anonymous, and a relative CA path was read from the working directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsjobs.controller import handlers


def _kubeconfig(path: Path, user: dict[str, Any]) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": "https://10.0.0.1:6443", "certificate-authority": "ca.crt"}}
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(doc))


def _exec_kubeconfig(tmp_path: Path) -> None:
    """A kubeconfig whose user runs an exec plugin answering the token `from-the-plugin`."""
    (tmp_path / "ca.crt").write_bytes(b"CA")
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": "from-the-plugin"},
    }
    plugin = tmp_path / "plugin.py"
    plugin.write_text(f"import json\nprint(json.dumps({credential!r}))\n")
    exec_user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": [str(plugin)],
            "interactiveMode": "Never",
        }
    }
    _kubeconfig(tmp_path / "config", exec_user)


@pytest.fixture(autouse=True)
def _no_logins_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "_KUBECONFIG_LOGINS", {})


def test_a_token_file_is_read_and_read_again_at_each_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA")
    (tmp_path / "token").write_text("one\n")
    _kubeconfig(tmp_path / "config", {"tokenFile": "token"})
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.chdir("/")  # relative paths are the kubeconfig's, not the working directory's
    info = handlers.login_info({})
    assert info is not None and info.token == "one" and info.server == "https://10.0.0.1:6443"
    assert info.ca_path == str((tmp_path / "ca.crt").resolve())
    # No expiration: Kopf logs in again after a 401 (each expiry would cut every watch).
    assert info.expiration is None
    (tmp_path / "token").write_text("two\n")
    again = handlers.login_info({})
    assert again is not None and again.token == "two" and again.ca_path == info.ca_path
    # A token the API server refused, read again unchanged, is the same credentials to Kopf: it
    # then gives up instead of logging in again and again (it compares them whole).
    assert handlers.login_info({}) == again


def test_an_exec_plugin_gives_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _exec_kubeconfig(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    info = handlers.login_info({})
    assert info is not None and info.token == "from-the-plugin" and info.server == "https://10.0.0.1:6443"
    assert handlers.login_info({}) == info  # (the token has not expired: the plugin's is reused)


def test_a_static_token_never_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA")
    _kubeconfig(tmp_path / "config", {"token": "static"})
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    info = handlers.login_info({})
    assert info is not None and info.token == "static" and info.expiration is None


def test_an_exec_plugin_works_in_the_operator_s_process_too(tmp_path: Path) -> None:
    # The operator keeps the kubernetes package out of its memory (before Kopf is imported); a
    # kubeconfig that needs it for its plugin lets it in rather than failing the login.
    import subprocess

    _exec_kubeconfig(tmp_path)
    script = (
        "from dsjobs.controller.__main__ import _keep_kubernetes_client_out\n"
        "_keep_kubernetes_client_out()\n"
        "import kopf\n"
        "from dsjobs.controller.handlers import login_info\n"
        "print(login_info({}).token)\n"
    )
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "config")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "from-the-plugin", out.stderr
