"""An extra node agent of a test module's own: started, stopped and restarted at will, so that
tests that take a node down leave the shared nodes up.

    from node_fixtures import OwnNode, node_ready, own_node  # noqa: F401

`small_disk_node` is another such node, with its state on a disk small enough for a job to fill.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from cluster_fixtures import REPO_ROOT, ClusterHandle, free_ports, poll
from kubernetes.client.rest import ApiException

from dsjobs.devcluster import ClusterPaths

#: The taint of an own node: nothing lands there but pods that tolerate it.
E2E_ONLY_TAINT = {"key": "dsjobs.dev/e2e-only", "operator": "Equal", "value": "true", "effect": "NoSchedule"}


@dataclass
class OwnNode:
    """An extra node agent this module starts, stops and restarts at will."""

    name: str
    argv: list[str]
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "operator")}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def own_node(dev_cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnNode]:
    work = tmp_path_factory.mktemp("own-node")
    with running_node(dev_cluster, work, work / "state") as node:
        yield node


@pytest.fixture(scope="module")
def small_disk_node(
    dev_cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OwnNode]:
    """An own node whose state dir (its pods' volumes, container logs, termination messages) is
    a 48 MiB tmpfs: a disk a job can fill."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    work = tmp_path_factory.mktemp("small-disk-node")
    disk = work / "state"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        with running_node(dev_cluster, work, disk) as node:
            yield node
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@contextlib.contextmanager
def running_node(dev_cluster: ClusterHandle, work: Path, state_dir: Path) -> Iterator[OwnNode]:
    """A node agent with its certificates in `work` and its state in `state_dir`, Ready; stopped
    and its Node deleted afterwards."""
    if dev_cluster.root is None:
        pytest.skip("needs the local dev cluster's CA to make a node certificate")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import load_pem_x509_certificate

    from dsjobs.devcluster import kubeconfig as kc
    from dsjobs.devcluster.node.leftovers import end_leftovers
    from dsjobs.devcluster.pki import CertificateAuthority

    pki = ClusterPaths.at(dev_cluster.root).pki
    ca_cert = load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca = CertificateAuthority(work, ca_cert, cast(ec.EllipticCurvePrivateKey, ca_key))
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    client = ca.issue("client", f"system:node:{name}", orgs=("system:nodes",), client=True)
    serving = ca.issue("serving", f"system:node:{name}", server=True, dns_names=(name,), ips=("127.0.0.1",))
    server = yaml.safe_load(dev_cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    kubeconfig = work / "node.kubeconfig"
    kc.write(kubeconfig, kc.render(server, (pki / "ca.crt").read_bytes(), f"system:node:{name}", client))
    node = OwnNode(
        name=name,
        argv=[
            sys.executable,
            "-m",
            "dsjobs.devcluster.node",
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            name,
            "--state-dir",
            str(state_dir),
            "--port",
            str(free_ports(1)[0]),
            "--tls-cert",
            str(serving.cert),
            "--tls-key",
            str(serving.key),
            "--cpu",
            "2",
            "--memory",
            "4Gi",
            # Nothing else lands here: the tests bind their pods with spec.nodeName.
            "--taint",
            "{key}={value}:{effect}".format(**E2E_ONLY_TAINT),
            "--shutdown-grace",
            "3",
        ],
        state_dir=state_dir,
        log_path=work / "agent.log",
    )
    node.start()
    core = dev_cluster.core()
    try:
        poll(f"node {name} Ready", lambda: node_ready(core, name) is True, 60)
        yield node
    finally:
        if node.proc is not None:
            node.signal(signal.SIGTERM)
        # A test that killed the agent outright left its containers' processes and memory cgroups
        # (no later agent of this name cleans them, as `devcluster down` does for its nodes).
        end_leftovers(name, str(state_dir))
        with contextlib.suppress(ApiException):
            core.delete_node(name)


def node_ready(core: Any, name: str) -> bool | None:
    try:
        node = core.read_node(name)
    except ApiException:
        return None
    ready = next((c for c in node.status.conditions or [] if c.type == "Ready"), None)
    return None if ready is None else ready.status == "True"
