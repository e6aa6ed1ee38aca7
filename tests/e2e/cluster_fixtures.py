"""Session fixtures for end-to-end tests: one cluster (+ S3) for the whole run.

Import the fixtures into tests/e2e/conftest.py::

    from cluster_fixtures import dev_cluster, dev_s3  # noqa: F401

Modes:
- default: the dev cluster in `$DSJOBS_E2E_DIR` (default `<repo>/.dev`, the one
  `make cluster-up` starts). Brought up once per session when it is not
  running, torn down at the end only if this session started it.
- `DSJOBS_E2E_KUBECONFIG=<file>`: an existing cluster; nothing is started or
  stopped. S3 then comes from `DSJOBS_E2E_S3_JSON=<s3.json>` or from the
  `DSJOBS_S3_*` variables (see dsjobs.devcluster.s3); without either, S3 tests skip.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from dsjobs import localstack
from dsjobs.devcluster import ClusterPaths, S3Config, node_agent_available, status
from dsjobs.devcluster.cluster import LOCAL_STORAGE_CLASS
from dsjobs.devcluster.node.cgroup import MemoryCgroups
from dsjobs.devcluster.procs import reserve_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The admission policies that hold dsjobs' own identities (the API and operator fixtures apply it).
ADMISSION = REPO_ROOT / "deploy" / "base" / "admission.yaml"
UP_TIMEOUT_S = 3600  # a cold binary build alone can take most of this
CLI_STOP_TIMEOUT_S = 120  # an interrupted `up` stops its processes in waves of up to 15 s each
HEALTHY_TIMEOUT_S = 60
NO_NODE_AGENT_REASON = "the node agent (dsjobs.devcluster.node) does not exist yet"


@dataclass
class ClusterHandle:
    kubeconfig: Path
    api_client: Any  # kubernetes.client.ApiClient
    s3: S3Config | None
    root: Path | None  # the dev cluster directory; None for an external cluster
    started_here: bool  # this session brought it up (and will take it down)

    @property
    def local(self) -> bool:
        return self.root is not None

    def core(self) -> Any:
        return k8s_client.CoreV1Api(self.api_client)


def devcluster_cli(root: Path, *args: str, timeout: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run `python -m dsjobs.devcluster --dir root ...` as a separate process,
    as a user would: the cluster's children then belong to nobody here."""
    argv = [sys.executable, "-m", "dsjobs.devcluster", "--dir", str(root), *args]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            # SIGTERM, not subprocess.run's SIGKILL: an interrupted `up` then stops the processes it
            # started (in sessions of their own) instead of leaving half a cluster running.
            proc.terminate()
            try:
                proc.communicate(timeout=CLI_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _s3_from_env() -> S3Config | None:
    if path := os.environ.get("DSJOBS_E2E_S3_JSON"):
        return S3Config.read(Path(path))
    keys = ("DSJOBS_S3_ENDPOINT", "DSJOBS_S3_BUCKET", "DSJOBS_S3_ACCESS_KEY", "DSJOBS_S3_SECRET_KEY")
    if all(os.environ.get(k) for k in keys):
        return S3Config(
            endpoint=os.environ["DSJOBS_S3_ENDPOINT"],
            bucket=os.environ["DSJOBS_S3_BUCKET"],
            access_key=os.environ["DSJOBS_S3_ACCESS_KEY"],
            secret_key=os.environ["DSJOBS_S3_SECRET_KEY"],
            region=os.environ.get("DSJOBS_S3_REGION", "us-east-1"),
        )
    return None


@pytest.fixture(scope="session")
def dev_cluster() -> Iterator[ClusterHandle]:
    if external := os.environ.get("DSJOBS_E2E_KUBECONFIG"):
        kc = Path(external)
        yield ClusterHandle(
            kc, k8s_config.new_client_from_config(config_file=str(kc)), _s3_from_env(), None, False
        )
        return

    root = Path(os.environ.get("DSJOBS_E2E_DIR", REPO_ROOT / ".dev")).absolute()
    paths = ClusterPaths.at(root)
    # Only a cluster whose `up` finished counts: what a killed `up` left is replaced by `up`.
    was_running = status(paths).all_running
    if not was_running:
        args = ["up"] if node_agent_available() else ["up", "--no-nodes"]
        proc = devcluster_cli(root, *args)
        if proc.returncode != 0:
            pytest.fail(
                f"dev cluster did not come up (exit {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False
            )
    api = k8s_config.new_client_from_config(config_file=str(paths.kubeconfig))
    handle = ClusterHandle(paths.kubeconfig, api, S3Config.read(paths.s3_json), root, not was_running)
    try:
        _require_healthy(paths)
        yield handle
    finally:
        api.close()
        if handle.started_here:
            proc = devcluster_cli(root, "down", timeout=120)
            if proc.returncode != 0:
                print(f"dev cluster teardown failed:\n{proc.stderr}", file=sys.stderr)


def _require_healthy(paths: ClusterPaths) -> None:
    """Every process of a complete cluster runs, the API server is ready and its nodes are Ready:
    a cluster short of any of these would fail tests far from the cause."""
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while not (st := status(paths)).healthy:
        if time.monotonic() > deadline:
            dead = [c.name for c in st.components if not c.running]
            ready = {n.name for n in st.nodes if n.ready}
            waiting = sorted(set(st.info.get("nodes", [])) - ready)
            pytest.fail(
                f"the dev cluster in {paths.root} is not healthy after {HEALTHY_TIMEOUT_S}s (complete: "
                f"{st.complete}, not running: {dead}, apiserver ready: {st.apiserver_ready}, nodes not "
                f"Ready: {waiting}); see `python -m dsjobs.devcluster --dir {paths.root} status`, "
                "and `down` it to let the next run start a fresh one",
                pytrace=False,
            )
        time.sleep(1)


@pytest.fixture(scope="session")
def dev_s3(dev_cluster: ClusterHandle) -> S3Config:
    if dev_cluster.s3 is None:
        pytest.skip("no S3 endpoint configured for the external cluster (set DSJOBS_E2E_S3_JSON)")
    return dev_cluster.s3


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed orphan waits to be reaped as one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def daemon_script(pid_file: str, *, then_sleep: bool) -> str:
    """A pod's Python program that starts `sleep 600` in a session of its own (setsid, as the
    runner starts a job's program, out of the container's process group), writes its pid to
    `pid_file`, then sleeps too or exits."""
    script = (
        "import subprocess, time\n"
        "p = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        f"open({pid_file!r}, 'w').write(str(p.pid))"
    )
    return script + ("\ntime.sleep(600)" if then_sleep else "")


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports for a child to bind: below the ephemeral range (as
    the local stack takes its own), where no outgoing connection can be holding one when a
    restarted child binds it again minutes later."""
    with reserve_ports(count) as ports:
        return ports


def poll(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Return check()'s first truthy result; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # transient API errors while the system converges
            last_exc = e
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc})", pytrace=False)


def claim_directory(core: Any, namespace: str, claim: str, timeout: float = 60) -> Path:
    """The host directory behind a claim once it is bound (a hostPath or local PV)."""

    def bound_volume() -> str | None:
        pvc = core.read_namespaced_persistent_volume_claim(claim, namespace)
        return str(pvc.spec.volume_name) if pvc.status.phase == "Bound" else None

    spec = core.read_persistent_volume(poll(f"PVC {claim} bound", bound_volume, timeout)).spec
    return Path((spec.host_path or spec.local).path)


def local_claim(
    core: Any, namespace: str, name: str, labels: dict[str, str] | None = None, access: str = "ReadWriteOnce"
) -> Path:
    """A claim of the local cluster's hostPath class, bound: its directory on this machine."""
    body = {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "accessModes": [access],
            "storageClassName": LOCAL_STORAGE_CLASS,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    core.create_namespaced_persistent_volume_claim(namespace, body)
    return claim_directory(core, namespace, name)


def _node_cgroups(cluster: ClusterHandle) -> MemoryCgroups | None:
    """What cgroups the local nodes can give containers on this host (node/cgroup.py): a probe
    made and removed again."""
    if cluster.root is None:
        return None
    probe = MemoryCgroups.discover("probe", str(cluster.root))
    if probe is not None:
        probe.close()
    return probe


def memory_limits_enforced(cluster: ClusterHandle) -> bool:
    """Containers get their memory limits: always from a real kubelet (an external cluster); the
    local nodes put containers in memory cgroups where this host allows."""
    return cluster.root is None or _node_cgroups(cluster) is not None


def cpu_accounted(cluster: ClusterHandle) -> bool:
    """The local nodes also give each container a cpuacct cgroup where this host allows (not
    claimed of an external cluster: its cgroup layout is its runtime's)."""
    probe = _node_cgroups(cluster)
    return probe is not None and probe.cpu_root is not None


SYSTEM_NAMESPACE = os.environ.get("DSJOBS_E2E_SYSTEM_NAMESPACE", "dsjobs-system")
DEPLOYED_OPERATOR = "dsjobs-operator"


@contextlib.contextmanager
def deployed_operator_paused(cluster: ClusterHandle) -> Iterator[None]:
    """Scale a deployed operator (left by `make up` or `make demo`) to zero meanwhile, and back.

    Tests that play the operator's part, or run an operator of their own, must not share their
    jobs with it: it serves every namespace. Nothing to do when none is deployed.
    """
    apps = k8s_client.AppsV1Api(cluster.api_client)
    try:
        replicas = int(
            apps.read_namespaced_deployment(DEPLOYED_OPERATOR, SYSTEM_NAMESPACE).spec.replicas or 0
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
        replicas = 0
    if replicas:
        apps.patch_namespaced_deployment_scale(DEPLOYED_OPERATOR, SYSTEM_NAMESPACE, {"spec": {"replicas": 0}})
        selector = "app.kubernetes.io/name=dsjobs-operator"
        core = k8s_client.CoreV1Api(cluster.api_client)
        poll(
            "the deployed operator to stop",
            lambda: not core.list_namespaced_pod(SYSTEM_NAMESPACE, label_selector=selector).items,
            120,
        )
    try:
        yield
    finally:
        if replicas:
            apps.patch_namespaced_deployment_scale(
                DEPLOYED_OPERATOR, SYSTEM_NAMESPACE, {"spec": {"replicas": replicas}}
            )


#: Tokens of the test identities outlive any run of a module or session.
TOKEN_SECONDS = 3 * 3600


def service_account_token(api_client: Any, namespace: str, sa: str) -> str:
    """A TokenRequest token of ServiceAccount `sa`, valid TOKEN_SECONDS."""
    request = k8s_client.AuthenticationV1TokenRequest(
        spec=k8s_client.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_SECONDS)
    )
    result = k8s_client.CoreV1Api(api_client).create_namespaced_service_account_token(sa, namespace, request)
    return str(result.status.token)


def token_kubeconfig(handle: ClusterHandle, token: str, path: Path) -> Path:
    """A kubeconfig of `token`: the admin kubeconfig's server and CA (inlined), mode 0600."""
    admin = yaml.safe_load(handle.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    if "certificate-authority" in cluster:
        ca_data = base64.b64encode(Path(cluster["certificate-authority"]).read_bytes()).decode()
    else:
        ca_data = cluster["certificate-authority-data"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": cluster["server"], "certificate-authority-data": ca_data},
                    }
                ],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "u", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "u",
            }
        )
    )
    path.chmod(0o600)
    return path


def apply_cluster_role(api_client: Any, doc: dict[str, Any]) -> None:
    """Create the ClusterRole `doc`, or replace the one of its name."""
    rbac = k8s_client.RbacAuthorizationV1Api(api_client)
    try:
        rbac.create_cluster_role(doc)
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac.replace_cluster_role(doc["metadata"]["name"], doc)


def apply_admission(handle: ClusterHandle) -> None:
    """deploy/base/admission.yaml, as deployed: dsjobs' identities are held to it."""
    kubectl = localstack.Kubectl(localstack.find_kubectl(), handle.kubeconfig)
    kubectl.apply([d for d in yaml.safe_load_all(ADMISSION.read_text()) if d])
