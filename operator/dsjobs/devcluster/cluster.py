"""Bring a local Kubernetes control plane (+ S3 + node agents) up and down.

Layout under the cluster directory (default `.dev`)::

    kubeconfig            admin kubeconfig (client cert; context dsjobs-dev-token uses a token)
    s3.env, s3.json       S3 endpoint, bucket and keys
    cluster/pids.json     every child process (pid, process group, start time, ports)
    cluster/logs/*.log    one log per component
    cluster/pki/          CA, certs, keys, static token file
    cluster/kubeconfigs/  per-component and per-node kubeconfigs
    cluster/etcd, cluster/s3   data
    nodes/<node>/         node agent state
    last-logs/            the logs of the previous cluster, kept by `down`
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsjobs.devcluster import bins, health, kubeconfig, procs
from dsjobs.devcluster.files import write_private
from dsjobs.devcluster.node.leftovers import end_leftovers
from dsjobs.devcluster.paths import ClusterPaths
from dsjobs.devcluster.pki import (
    APISERVER_DNS_NAMES,
    CertificateAuthority,
    CertPair,
    write_service_account_keys,
)
from dsjobs.devcluster.procs import Component, Record
from dsjobs.devcluster.s3 import DEFAULT_BUCKET, S3Config
from dsjobs.devcluster.topology import NodeSpec, default_topology

log = logging.getLogger(__name__)

# Only ever configuration: nothing routes to these addresses on a dev machine.
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Short so that a killed node agent shows up as NotReady within ~20s.
NODE_MONITOR_GRACE_PERIOD = "20s"
ADMIN_USER = "dsjobs-admin"
NODE_AGENT_MODULE = "dsjobs.devcluster.node"
# Dynamic provisioning for the process nodes: the controller-manager's built-in hostPath
# provisioner (--enable-hostpath-provisioner) makes a directory under /tmp/hostpath_pv per claim and
# removes it with the claim. Every node shares the host's filesystem, so any node can mount it.
# Not the default class: claims without a class keep binding to pre-made PVs without one.
LOCAL_STORAGE_CLASS = "local-hostpath"
HOSTPATH_PV_DIR = "/tmp/hostpath_pv"  # fixed by the provisioner (k8s.io/kubernetes pkg/volume/hostpath)
LOCAL_STORAGE_CLASS_MANIFEST: dict[str, Any] = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": LOCAL_STORAGE_CLASS},
    "provisioner": "kubernetes.io/host-path",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}

# pids.json is saved after every spawn so that `down` finds everything, so a record by itself does
# not say that `up` finished; this info key does: False from the first spawn, True at the end.
COMPLETE_KEY = "complete"
CONTROL_PLANE = ("s3", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

# Stop order for `down`: node agents first (they may still talk to the
# apiserver while cleaning up), then the controllers, the apiserver, etcd.
STOP_WAVES = (
    ("node",),
    ("kube-scheduler", "kube-controller-manager", "s3"),
    ("kube-apiserver",),
    ("etcd",),
)


class ClusterError(RuntimeError):
    pass


def node_agent_available() -> bool:
    try:
        return importlib.util.find_spec(f"{NODE_AGENT_MODULE}.__main__") is not None
    except ModuleNotFoundError:
        return False


# ---------------------------------------------------------------- state


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """A teardown under way is finished first: a SIGTERM (a CI timeout) raising in the middle of it
    would leave the rest running in sessions of their own. Delivered once the teardown is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pending:
            signal.raise_signal(signal.SIGTERM)


def record_complete(record: Record) -> bool:
    """`up` got through its start sequence; otherwise the record is what an interrupted `up` left."""
    mark = record.info.get(COMPLETE_KEY)
    if mark is not None:
        return mark is True
    # Records from before the mark: complete when every process `up` starts is listed, so that a
    # cluster started by an older checkout is not torn down for nothing.
    names = {c.name for c in record.components}
    return {*CONTROL_PLANE, *(f"node-{n}" for n in record.info.get("nodes", []))} <= names


@dataclass
class ComponentState:
    name: str
    kind: str
    pid: int
    running: bool
    ports: dict[str, int]


@dataclass
class NodeState:
    name: str
    ready: bool
    reason: str


@dataclass
class ClusterState:
    """What `status` reports; `recorded` is False when no cluster exists."""

    recorded: bool
    components: list[ComponentState] = field(default_factory=list)
    apiserver_ready: bool = False
    version: str = ""
    nodes: list[NodeState] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    complete: bool = False  # see record_complete

    @property
    def all_running(self) -> bool:
        return self.complete and all(c.running for c in self.components)

    @property
    def healthy(self) -> bool:
        expected = set(self.info.get("nodes", []))
        ready = {n.name for n in self.nodes if n.ready}
        return self.all_running and self.apiserver_ready and expected <= ready


def _admin_ctx(paths: ClusterPaths) -> ssl.SSLContext:
    return health.client_context(
        paths.pki / "ca.crt", CertPair(paths.pki / "admin.crt", paths.pki / "admin.key")
    )


def _node_states(api: str, paths: ClusterPaths) -> list[NodeState]:
    code, body = health.get(f"{api}/api/v1/nodes", _admin_ctx(paths))
    if code != 200:
        return []
    out = []
    for item in json.loads(body).get("items", []):
        cond: dict[str, Any] = next(
            (c for c in item.get("status", {}).get("conditions", []) if c.get("type") == "Ready"),
            {},
        )
        out.append(
            NodeState(
                name=item["metadata"]["name"],
                ready=cond.get("status") == "True",
                reason=str(cond.get("reason", "NoReadyCondition")),
            )
        )
    return out


def status(paths: ClusterPaths) -> ClusterState:
    rec = Record.load(paths.pids)
    if rec is None:
        return ClusterState(recorded=False)
    state = ClusterState(recorded=True, info=rec.info, complete=record_complete(rec))
    for c in rec.components:
        state.components.append(ComponentState(c.name, c.kind, c.pid, procs.is_running(c), c.ports))
    api = rec.info.get("apiserver")
    if api and (paths.pki / "admin.crt").exists():
        ctx = _admin_ctx(paths)
        state.apiserver_ready = health.get(f"{api}/readyz", ctx)[0] == 200
        if state.apiserver_ready:
            try:
                state.version = str(health.get_json(f"{api}/version", ctx).get("gitVersion", ""))
            except (RuntimeError, ValueError):
                state.version = ""
            state.nodes = _node_states(api, paths)
    return state


# ---------------------------------------------------------------- up


@contextlib.contextmanager
def _dir_lock(paths: ClusterPaths) -> Iterator[None]:
    """Serialise up/down on one directory (e.g. a test session and a user).

    Children never inherit the descriptor (close_fds), so the lock ends with
    the command, not with the cluster.
    """
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another devcluster command on %s", paths.root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class _Pki:
    ca: CertificateAuthority
    apiserver: CertPair
    admin: CertPair
    kcm: CertPair
    scheduler: CertPair
    kubelet_client: CertPair
    front_proxy_ca: CertificateAuthority
    front_proxy_client: CertPair
    service_account: CertPair
    nodes_client: dict[str, CertPair]
    nodes_serving: dict[str, CertPair]
    admin_token: str


def _make_pki(paths: ClusterPaths, nodes: Sequence[NodeSpec]) -> _Pki:
    ca = CertificateAuthority.create(paths.pki)
    # A separate CA for the aggregation layer's request-header auth, as
    # kubeadm does: a cert from the cluster CA must not be able to assert
    # identities through X-Remote-User headers.
    front_proxy_ca = CertificateAuthority.create(
        paths.pki / "front-proxy", "dsjobs-devcluster-front-proxy-ca"
    )
    pki = _Pki(
        ca=ca,
        apiserver=ca.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns_names=APISERVER_DNS_NAMES,
            ips=("127.0.0.1", SERVICE_IP),
        ),
        admin=ca.issue("admin", ADMIN_USER, orgs=("system:masters",), client=True),
        kcm=ca.issue("kube-controller-manager", "system:kube-controller-manager", client=True),
        scheduler=ca.issue("kube-scheduler", "system:kube-scheduler", client=True),
        # The apiserver's identity towards node agents (logs, exec, port-forward).
        kubelet_client=ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", orgs=("system:masters",), client=True
        ),
        front_proxy_ca=front_proxy_ca,
        front_proxy_client=front_proxy_ca.issue("front-proxy-client", "front-proxy-client", client=True),
        service_account=write_service_account_keys(paths.pki),
        nodes_client={},
        nodes_serving={},
        admin_token=secrets.token_hex(24),
    )
    for n in nodes:
        pki.nodes_client[n.name] = ca.issue(
            f"node-{n.name}-client", f"system:node:{n.name}", orgs=("system:nodes",), client=True
        )
        pki.nodes_serving[n.name] = ca.issue(
            f"node-{n.name}-serving",
            f"system:node:{n.name}",
            server=True,
            dns_names=(n.name, "localhost"),
            ips=("127.0.0.1",),
        )
    # Static token file: token,user,uid,"groups"
    write_private(paths.token_file, f'{pki.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    return pki


class _Launch:
    """State of one `up` in progress; every spawn is recorded immediately."""

    def __init__(self, paths: ClusterPaths, record: Record) -> None:
        self.paths = paths
        self.record = record

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ports: dict[str, int],
        kind: str = "control-plane",
        env: dict[str, str] | None = None,
    ) -> Component:
        comp = procs.spawn(
            name, argv, self.paths.log(name), ports=ports, kind=kind, env=env, cwd=self.paths.cluster
        )
        self.record.components.append(comp)
        self.record.save(self.paths.pids)
        return comp

    def wait(self, comp: Component, what: str, check: Any, timeout: float) -> None:
        t0 = time.monotonic()
        try:
            health.wait_until(what, check, timeout, alive=lambda: procs.is_running(comp))
        except health.ProbeTimeout as e:
            ended = procs.exit_status(comp)
            how = f" ({ended})" if ended else ""
            raise ClusterError(f"{e}{how}; last lines of {comp.log}:\n{procs.tail(comp.log)}") from e
        log.info("%s ready in %.1fs", what, time.monotonic() - t0)


def up(
    paths: ClusterPaths,
    *,
    nodes: Sequence[NodeSpec] | None = None,
    with_nodes: bool = True,
    timeout: float = 180.0,
    build: bool = True,
) -> tuple[Record, bool]:
    """Start the cluster. Returns (record, started): `started` is False when a
    complete cluster was already running in `paths` (then nothing is done)."""
    with _dir_lock(paths):
        return _up_locked(paths, nodes, with_nodes, timeout, build)


def _up_locked(
    paths: ClusterPaths, nodes: Sequence[NodeSpec] | None, with_nodes: bool, timeout: float, build: bool
) -> tuple[Record, bool]:
    existing = Record.load(paths.pids)
    if existing is not None and not record_complete(existing):
        # An `up` killed half-way (SIGKILL, OOM, a timeout) left these: reusing them would give a
        # cluster without a scheduler or nodes for good, so they go and the cluster starts anew.
        log.warning("the last `up` in %s did not finish; stopping what it started", paths.root)
        _teardown(paths, existing)
        existing = None
    if existing is not None:
        dead = [c.name for c in existing.components if not procs.is_running(c)]
        if not dead:
            return existing, False
        if len(dead) == len(existing.components):
            # Nothing of it runs (a reboot, `kill -9` of the whole stack): nothing to keep, and
            # refusing made every `make up` and e2e run fail until someone ran `down` by hand.
            log.warning("no process of the cluster recorded in %s runs; starting a new one", paths.root)
            _teardown(paths, existing)
            existing = None
        else:
            raise ClusterError(
                f"a cluster is recorded in {paths.root} but {', '.join(dead)} not running; "
                f"run `make down` (python -m dsjobs.devcluster --dir {paths.root} down) first"
            )
    topology = list(nodes) if nodes is not None else default_topology()
    if with_nodes and topology and not node_agent_available():
        raise ClusterError(
            f"the node agent module {NODE_AGENT_MODULE} is not available; "
            "pass --no-nodes to start only the control plane and S3"
        )
    if not with_nodes:
        topology = []
    try:
        bin_dir = bins.ensure_bin_dir(build=build)
    except bins.BinariesError as e:
        raise ClusterError(str(e)) from e

    # No record means no process of ours: whatever is left is stale data (and maybe the containers
    # of agents that were killed).
    _end_node_leftovers(paths)
    for stale in (paths.cluster, paths.nodes):
        shutil.rmtree(stale, ignore_errors=True)
    for d in (paths.cluster, paths.logs, paths.pki, paths.kubeconfigs):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.cluster, 0o700)

    record = Record(
        info={
            "root": str(paths.root),
            "bin_dir": str(bin_dir),
            "nodes": [n.name for n in topology],
            COMPLETE_KEY: False,
        }
    )
    launch = _Launch(paths, record)
    t0 = time.monotonic()
    try:
        _start_all(launch, bin_dir, topology, timeout)
        record.info[COMPLETE_KEY] = True
        record.save(paths.pids)
    except BaseException as e:
        # Leave nothing half-started behind; keep the logs for the post-mortem.
        log.info("up failed; stopping what was started")
        with _sigterm_deferred():
            _teardown(paths, record)
        # SystemExit (SIGTERM) and KeyboardInterrupt keep their meaning for the caller.
        if isinstance(e, ClusterError) or not isinstance(e, Exception):
            raise
        raise ClusterError(f"up failed: {e}") from e
    log.info("cluster up in %.1fs", time.monotonic() - t0)
    return record, True


def _start_all(launch: _Launch, bin_dir: Path, topology: Sequence[NodeSpec], timeout: float) -> None:
    paths, record = launch.paths, launch.record
    pki = _make_pki(paths, topology)
    with procs.reserve_ports(6 + len(topology)) as ports:
        etcd_port, peer_port, api_port, kcm_port, sched_port, s3_port = ports[:6]
        node_ports = dict(zip((n.name for n in topology), ports[6:], strict=True))
    api = f"https://127.0.0.1:{api_port}"
    s3 = S3Config.generate(s3_port, DEFAULT_BUCKET)
    record.info.update({"apiserver": api, "kubeconfig": str(paths.kubeconfig), "s3": s3.endpoint})

    ca_pem = pki.ca.cert_path.read_bytes()
    kubeconfig.write(
        paths.kubeconfig, kubeconfig.render(api, ca_pem, ADMIN_USER, pki.admin, token=pki.admin_token)
    )
    kcm_kc = paths.component_kubeconfig("kube-controller-manager")
    sched_kc = paths.component_kubeconfig("kube-scheduler")
    kubeconfig.write(kcm_kc, kubeconfig.render(api, ca_pem, "system:kube-controller-manager", pki.kcm))
    kubeconfig.write(sched_kc, kubeconfig.render(api, ca_pem, "system:kube-scheduler", pki.scheduler))
    for n in topology:
        kubeconfig.write(
            paths.node_kubeconfig(n.name),
            kubeconfig.render(api, ca_pem, f"system:node:{n.name}", pki.nodes_client[n.name]),
        )
    s3.write(paths.s3_env, paths.s3_json)

    # S3 first: it does not depend on anything and starts in milliseconds.
    s3_proc = launch.spawn(
        "s3",
        [
            str(bin_dir / "dsjobs-s3server"),
            f"-addr=127.0.0.1:{s3_port}",
            f"-root={paths.s3_data}",
            f"-bucket={s3.bucket}",
        ],
        ports={"http": s3_port},
        kind="s3",
        env=_s3_env(paths, s3),
    )

    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = launch.spawn(
        "etcd",
        [
            str(bin_dir / "etcd"),
            "--name=default",
            f"--data-dir={paths.etcd_data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--initial-cluster-state=new",
            # Disposable data: skipping fsync makes apiserver writes several
            # times faster on slow CI disks.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        ports={"client": etcd_port, "peer": peer_port},
    )

    pki_dir = paths.pki
    apiserver = launch.spawn(
        "kube-apiserver",
        [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert_path}",
            f"--token-auth-file={paths.token_file}",
            "--authorization-mode=Node,RBAC",
            # Defaults plus NodeRestriction, as kubeadm does: a node may only
            # touch its own Node, Lease and the pods bound to it.
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account.cert}",
            f"--service-account-signing-key-file={pki.service_account.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--kubelet-client-certificate={pki.kubelet_client.cert}",
            f"--kubelet-client-key={pki.kubelet_client.key}",
            f"--kubelet-certificate-authority={pki.ca.cert_path}",
            # Node agents listen on 127.0.0.1; their hostnames do not resolve.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            # The `kubernetes` endpoint would be 127.0.0.1, which Endpoints
            # validation rejects (an error every 10s otherwise).
            "--endpoint-reconciler-type=none",
            # Front-proxy (aggregation layer) settings; without them the
            # controllers log an error about a missing request-header CA.
            f"--requestheader-client-ca-file={pki.front_proxy_ca.cert_path}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-uid-headers=X-Remote-Uid",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
            f"--proxy-client-key-file={pki.front_proxy_client.key}",
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={pki_dir / 'apiserver-generated'}",
        ],
        ports={"https": api_port},
    )
    launch.wait(etcd, "etcd /health", health.url_ok(f"{etcd_url}/health"), 30)
    admin_ctx = _admin_ctx(paths)
    launch.wait(apiserver, "kube-apiserver /readyz", health.url_ok(f"{api}/readyz", admin_ctx), timeout)
    health.create(f"{api}/apis/storage.k8s.io/v1/storageclasses", LOCAL_STORAGE_CLASS_MANIFEST, admin_ctx)

    common = ["--bind-address=127.0.0.1", "--leader-elect=false", "--profiling=false"]
    kcm = launch.spawn(
        "kube-controller-manager",
        [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kcm_kc}",
            f"--authentication-kubeconfig={kcm_kc}",
            f"--authorization-kubeconfig={kcm_kc}",
            f"--secure-port={kcm_port}",
            f"--cert-dir={paths.cluster / 'kcm-certs'}",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.service_account.key}",
            f"--root-ca-file={pki.ca.cert_path}",
            f"--cluster-signing-cert-file={pki.ca.cert_path}",
            f"--cluster-signing-key-file={pki_dir / 'ca.key'}",
            f"--node-monitor-grace-period={NODE_MONITOR_GRACE_PERIOD}",
            "--node-monitor-period=2s",
            # A quota made before its resource's monitor existed (a CRD discovered within 30 s of
            # start) is counted at the next full resync: 5 min by default, 15 s here.
            "--resource-quota-sync-period=15s",
            "--cluster-name=dsjobs-dev",
            "--enable-hostpath-provisioner",
            *common,
        ],
        ports={"https": kcm_port},
    )
    scheduler = launch.spawn(
        "kube-scheduler",
        [
            str(bin_dir / "kube-scheduler"),
            f"--kubeconfig={sched_kc}",
            f"--authentication-kubeconfig={sched_kc}",
            f"--authorization-kubeconfig={sched_kc}",
            f"--secure-port={sched_port}",
            *common,
        ],
        ports={"https": sched_port},
    )
    insecure = health.client_context(None)  # their serving certs are self-signed
    launch.wait(s3_proc, "s3 /-/ready", health.url_ok(f"{s3.endpoint}/-/ready"), 30)
    launch.wait(
        kcm,
        "kube-controller-manager /healthz",
        health.url_ok(f"https://127.0.0.1:{kcm_port}/healthz", insecure),
        timeout,
    )
    launch.wait(
        scheduler,
        "kube-scheduler /healthz",
        health.url_ok(f"https://127.0.0.1:{sched_port}/healthz", insecure),
        timeout,
    )

    node_procs = [_spawn_node(launch, n, node_ports[n.name], pki) for n in topology]
    if node_procs:
        _wait_nodes_ready(launch, api, node_procs, timeout)
    # Pods are rejected until the serviceaccount controller has created the
    # namespace's `default` ServiceAccount; callers should not race it.
    sa_url = f"{api}/api/v1/namespaces/default/serviceaccounts/default"
    launch.wait(kcm, "default ServiceAccount", health.url_ok(sa_url, admin_ctx), timeout)


def _spawn_node(launch: _Launch, node: NodeSpec, port: int, pki: _Pki) -> Component:
    paths = launch.paths
    state = paths.node_state(node.name)
    state.mkdir(parents=True, exist_ok=True)
    serving = pki.nodes_serving[node.name]
    # The agent must import this very dsjobs even when it is not installed.
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    argv = [
        sys.executable,
        "-m",
        NODE_AGENT_MODULE,
        "--kubeconfig",
        str(paths.node_kubeconfig(node.name)),
        "--name",
        node.name,
        "--state-dir",
        str(state),
        "--port",
        str(port),
        "--tls-cert",
        str(serving.cert),
        "--tls-key",
        str(serving.key),
        *node.agent_args(),
    ]
    return launch.spawn(f"node-{node.name}", argv, ports={"https": port}, kind="node", env=env)


def _wait_nodes_ready(launch: _Launch, api: str, node_procs: Sequence[Component], timeout: float) -> None:
    expected = {c.name.removeprefix("node-") for c in node_procs}
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        ready = {n.name for n in _node_states(api, launch.paths) if n.ready}
        if expected <= ready:
            log.info("nodes %s Ready in %.1fs", ", ".join(sorted(expected)), time.monotonic() - t0)
            return
        for c in node_procs:
            if not procs.is_running(c):
                raise ClusterError(f"node agent {c.name} exited; last lines of {c.log}:\n{procs.tail(c.log)}")
        if time.monotonic() > deadline:
            waiting = sorted(expected - ready)
            logs = "\n".join(f"--- {c.log}\n{procs.tail(c.log, 15)}" for c in node_procs)
            raise ClusterError(f"nodes not Ready after {timeout:.0f}s: {', '.join(waiting)}\n{logs}")
        time.sleep(0.5)


# ---------------------------------------------------------------- down


def provisioned_dirs(persistent_volumes: Sequence[dict[str, Any]]) -> list[str]:
    """Directories the hostPath provisioner made for PVs of the local class (what `down` removes
    along with the cluster: nothing else deletes them once the controller-manager is gone)."""
    dirs = []
    for pv in persistent_volumes:
        spec = pv.get("spec") or {}
        path = str((spec.get("hostPath") or {}).get("path") or "")
        # Only what the provisioner makes: one level below its directory, nothing like `..`.
        ours = spec.get("storageClassName") == LOCAL_STORAGE_CLASS
        if ours and os.path.normpath(path) == path and os.path.dirname(path) == HOSTPATH_PV_DIR:
            dirs.append(path)
    return dirs


def _live_provisioned_dirs(paths: ClusterPaths, record: Record) -> list[str]:
    api = record.info.get("apiserver")
    if not api or not (paths.pki / "admin.crt").exists():
        return []
    code, body = health.get(f"{api}/api/v1/persistentvolumes", _admin_ctx(paths))
    if code != 200:
        return []
    try:
        return provisioned_dirs(json.loads(body).get("items") or [])
    except ValueError:
        return []


def _teardown(paths: ClusterPaths, record: Record, timeout: float = 15.0) -> list[str]:
    volumes = _live_provisioned_dirs(paths, record)
    stopped: list[str] = []
    remaining = list(record.components)
    for wave in STOP_WAVES:
        batch = [c for c in remaining if c.kind in wave or c.name in wave]
        remaining = [c for c in remaining if c not in batch]
        stopped += procs.stop(batch, timeout)
    stopped += procs.stop(remaining, timeout)  # anything a future version adds
    _end_node_leftovers(paths)
    if paths.logs.is_dir():
        shutil.rmtree(paths.last_logs, ignore_errors=True)
        shutil.move(str(paths.logs), str(paths.last_logs))
    shutil.rmtree(paths.cluster, ignore_errors=True)
    shutil.rmtree(paths.nodes, ignore_errors=True)
    for volume in volumes:
        shutil.rmtree(volume, ignore_errors=True)
    for f in (paths.kubeconfig, paths.s3_env, paths.s3_json):
        f.unlink(missing_ok=True)
    return stopped


def _end_node_leftovers(paths: ClusterPaths) -> None:
    """Containers of node agents that died before `down` (a SIGKILLed agent leaves them running,
    as a dead kubelet does): kill them and remove their memory cgroups."""
    with contextlib.suppress(OSError):
        for state in paths.nodes.iterdir():
            if state.is_dir():
                end_leftovers(state.name, str(state))


def _s3_env(paths: ClusterPaths, s3: S3Config) -> dict[str, str]:
    return {
        **os.environ,
        "DSJOBS_S3_ACCESS_KEY": s3.access_key,
        "DSJOBS_S3_SECRET_KEY": s3.secret_key,
        "DSJOBS_S3_SCOPED_KEYS_FILE": str(paths.s3_scoped_keys),
    }


RESTARTABLE_KINDS = ("control-plane", "s3")


def restart(paths: ClusterPaths, name: str, timeout: float = 120.0) -> Component:
    """Stop one control-plane process (or the S3 server) and start it again as it was (same argv
    and ports), then wait until the API server (or S3) is ready: an outage to test clients and
    controllers against."""
    with _dir_lock(paths):
        record = Record.load(paths.pids)
        if record is None:
            raise ClusterError(f"no cluster in {paths.root}")
        old = record.find(name)
        if old is None or old.kind not in RESTARTABLE_KINDS:
            names = ", ".join(c.name for c in record.components if c.kind in RESTARTABLE_KINDS)
            raise ClusterError(f"{name!r} cannot be restarted here (one of: {names})")
        procs.stop([old], timeout=5.0)  # the API server drains its watches for longer
        record.components.remove(old)
        launch = _Launch(paths, record)
        env: dict[str, str] | None = None
        if old.kind == "s3":
            s3 = S3Config.read(paths.s3_json)
            env, what, ready = _s3_env(paths, s3), "s3 /-/ready", health.url_ok(f"{s3.endpoint}/-/ready")
        else:
            api = str(record.info.get("apiserver", ""))
            what, ready = "kube-apiserver /readyz", health.url_ok(f"{api}/readyz", _admin_ctx(paths))
        new = launch.spawn(old.name, old.argv, ports=dict(old.ports), kind=old.kind, env=env)
        launch.wait(new, what, ready, timeout)
        return new


def down(paths: ClusterPaths, timeout: float = 15.0) -> list[str] | None:
    """Stop every recorded process and delete the cluster's data.

    Returns the names of the processes that were running, or None when no
    cluster was recorded in `paths`.
    """
    if not paths.root.is_dir():
        return None
    with _dir_lock(paths):
        record = Record.load(paths.pids)
        if record is None:
            # Leftovers of a crashed `up` (before its first record) are still removed.
            shutil.rmtree(paths.cluster, ignore_errors=True)
            return None
        return _teardown(paths, record, timeout)
