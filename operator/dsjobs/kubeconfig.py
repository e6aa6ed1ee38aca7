"""Cluster credentials for the project's own Kubernetes clients (the API's, the operator's Kopf
login and its leader election): a kubeconfig, or the pod's service account.

In controller-runtime's order: a path given, else $KUBECONFIG, else the pod's service account,
else ~/.kube/config. A kubeconfig may be several files (os.pathsep-separated, as $KUBECONFIG):
they are merged, the first file to name a context, cluster or user (or the current context) wins,
missing ones are skipped (all missing is an error), and relative paths are read from the
directory of the file that holds them. Users with `exec` or `auth-provider` plugins (EKS, GKE, OIDC) go to the `kubernetes`
package's loader, imported only then (it costs ~40 MB of RSS).
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(RuntimeError):
    pass


@dataclass(frozen=True)
class KubeConfig:
    host: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool
    token: str | None
    server_name: str | None = None
    #: The cluster's `proxy-url` (Kopf's requests take it; the API's and the Lease's do not).
    proxy_url: str | None = None


#: Re-reads rotating credentials (projected service account tokens, token files, exec plugins);
#: None if they are static.
Refresh = Callable[[KubeConfig], KubeConfig] | None


def load_config(kubeconfig: str | None) -> tuple[KubeConfig, Refresh]:
    """Credentials from `kubeconfig` (a path, or paths as $KUBECONFIG), else $KUBECONFIG, else
    the pod's service account, else ~/.kube/config. Returns the config and how to refresh it."""
    paths = kubeconfig or os.environ.get("KUBECONFIG")
    if paths:
        return from_kubeconfig(paths)
    in_cluster = service_account()
    if in_cluster is not None:
        return in_cluster
    return from_kubeconfig(str(Path.home() / ".kube" / "config"))


def service_account() -> tuple[KubeConfig, Refresh] | None:
    """The pod's service account, when there is one (KUBERNETES_SERVICE_HOST/PORT and a token)."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token_file = SERVICE_ACCOUNT_DIR / "token"
    if not (host and port and token_file.exists()):
        return None
    netloc = f"[{host}]" if ":" in host else host
    cfg = KubeConfig(
        host=f"https://{netloc}:{port}",
        ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        cert_file=None,
        key_file=None,
        verify=True,
        token=token_file.read_text().strip(),
    )
    # Projected tokens rotate: re-read the file now and then.
    return cfg, lambda c: replace(c, token=token_file.read_text().strip())


@dataclass(frozen=True)
class _Entry:
    """A context, cluster or user of a kubeconfig, and the directory of the file it is in."""

    value: dict[str, Any]
    base: Path


def from_kubeconfig(paths: str) -> tuple[KubeConfig, Refresh]:
    """The current context of the kubeconfig at `paths` (one path, or several as $KUBECONFIG)."""
    files = [Path(p).expanduser() for p in paths.split(os.pathsep) if p.strip()]
    current = ""
    entries: dict[str, dict[str, _Entry]] = {"contexts": {}, "clusters": {}, "users": {}}
    unreadable: list[str] = []
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            unreadable.append(f"{path}: {exc}")
            continue  # as kubectl: a file of the list that is not there is skipped
        except yaml.YAMLError as exc:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise KubeConfigError(f"cannot read kubeconfig {path}: not a mapping")
        current = current or str(doc.get("current-context") or "")
        for kind, found in entries.items():
            for entry in doc.get(kind) or []:
                name = str((entry or {}).get("name", ""))
                if name not in found:
                    found[name] = _Entry(dict(entry.get(kind[:-1]) or {}), path.parent)
    if len(unreadable) == len(files):
        raise KubeConfigError(f"cannot read kubeconfig {'; '.join(unreadable) or repr(paths)}")
    where = files[0] if len(files) == 1 else paths

    def named(kind: str, name: str) -> _Entry:
        entry = entries[kind].get(name)
        if entry is None:
            raise KubeConfigError(f"kubeconfig {where}: no {kind[:-1]} named {name!r}")
        return entry

    context = named("contexts", current).value
    cluster = named("clusters", str(context.get("cluster") or ""))
    user = named("users", str(context.get("user") or "")) if context.get("user") else _Entry({}, Path())
    if "exec" in user.value or "auth-provider" in user.value:
        return _from_kubernetes_package(paths)

    def file_of(key: str, data_key: str, source: _Entry) -> str | None:
        if source.value.get(data_key):
            return _temp_file(base64.b64decode(source.value[data_key]))
        if source.value.get(key):
            return str((source.base / str(source.value[key])).expanduser().resolve())
        return None

    token = user.value.get("token")
    token_file = user.value.get("tokenFile")
    token_path = (user.base / str(token_file)).expanduser() if token_file else None
    if not token and token_path is not None:
        token = token_path.read_text().strip()
    cfg = KubeConfig(
        host=str(cluster.value.get("server", "")).rstrip("/"),
        ca_file=file_of("certificate-authority", "certificate-authority-data", cluster),
        cert_file=file_of("client-certificate", "client-certificate-data", user),
        key_file=file_of("client-key", "client-key-data", user),
        verify=not cluster.value.get("insecure-skip-tls-verify", False),
        token=str(token) if token else None,
        server_name=cluster.value.get("tls-server-name"),
        proxy_url=cluster.value.get("proxy-url"),
    )
    if not cfg.host:
        raise KubeConfigError(f"kubeconfig {where}: the cluster has no server")
    if token_path is not None and not user.value.get("token"):
        path = token_path
        return cfg, lambda c: replace(c, token=path.read_text().strip())
    return cfg, None


def _from_kubernetes_package(paths: str) -> tuple[KubeConfig, Refresh]:
    """Exec and auth-provider plugins: let the `kubernetes` package run them (imported only here)."""
    # The operator keeps the package out of its memory (`sys.modules` entries of None, set before
    # Kopf is imported); a kubeconfig that needs it lets it in.
    for name in [n for n, m in sys.modules.items() if m is None and n.split(".")[0] == "kubernetes"]:
        del sys.modules[name]
    from kubernetes import config as kconfig
    from kubernetes.client import Configuration

    source = Configuration()
    # A pathsep-separated list is merged by the package as $KUBECONFIG is.
    kconfig.load_kube_config(config_file=paths, client_configuration=source)

    def convert(_: KubeConfig | None = None) -> KubeConfig:
        if source.refresh_api_key_hook is not None:
            source.refresh_api_key_hook(source)
        auth = source.api_key.get("authorization") or source.api_key.get("BearerToken") or ""
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
        return KubeConfig(
            host=str(source.host).rstrip("/"),
            ca_file=source.ssl_ca_cert,
            cert_file=source.cert_file,
            key_file=source.key_file,
            verify=bool(source.verify_ssl),
            token=token or None,
            server_name=getattr(source, "tls_server_name", None),
        )

    return convert(), convert


_temp_dir: str | None = None


def _temp_file(data: bytes) -> str:
    """Inline kubeconfig certificates and keys as a path the ssl module can open (it loads files
    only), private to this process: an in-memory file of it (Linux), gone with the process even
    when it is killed, never on a disk; elsewhere a private temporary file removed at exit."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("dsjobs-kubeconfig", os.MFD_CLOEXEC)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return f"/proc/self/fd/{fd}"
    global _temp_dir
    if _temp_dir is None:
        _temp_dir = tempfile.mkdtemp(prefix="dsjobs-kube-")
        atexit.register(shutil.rmtree, _temp_dir, True)
    fd, name = tempfile.mkstemp(dir=_temp_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return name
