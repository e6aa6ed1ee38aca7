"""The local dsjobs stack behind `make up`, `make down` and `make demo`.

    python -m dsjobs.localstack up   [--dir .dev]   # cluster + S3 + dsjobs (deploy/overlays/local)
    python -m dsjobs.localstack down [--dir .dev]   # stop everything `up` started
    python -m dsjobs.localstack demo [--dir .dev]   # `up`, then examples/demo through the official CLI

(`hack/up.sh`, `hack/down.sh`, `hack/demo.sh` run these; `make up`, `make down`, `make demo` run those.)

`up` is idempotent. It starts the dev cluster (`python -m dsjobs.devcluster up`, which builds the
control plane on first use), deploys dsjobs from the same kustomize overlay a user would apply
(`kubectl kustomize deploy/overlays/local`, plus the storage Secret made from the cluster's S3
settings), waits for the operator and the API, creates a bearer token for the demo project and
writes `<dir>/env`:

    export KUBECONFIG=...          # admin kubeconfig of the dev cluster
    export DSJOBS_ENDPOINT=...     # host:port of the gRPC API
    export DSJOBS_TOKEN=...        # a ServiceAccount token the API accepts for the demo project
    export DSJOBS_PROJECT_ID=...

Pods of the local cluster are host processes on the host network, so the overlay gives the API
and the operator loopback ports. `up` keeps them when they are free and no other live stack of
this user has chosen them, and otherwise gives this cluster others (recorded in the cluster's
directory until `down`, and the cluster listed in `~/.cache/dsjobs/stack-clusters.json`), so
stacks of two checkouts on one machine (a CI clone beside a working copy) never share a port. Everything else (names,
namespaces, the project id) is read from the rendered overlay, which stays the single source of
truth.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dsjobs.api.settings import derived_page_token_key
from dsjobs.controller.names import (
    PROJECT_LABEL,
    PROJECT_STORAGE_ACCESS_KEY,
    PROJECT_STORAGE_SECRET_KEY,
    PROJECT_STORAGE_SECRET_NAME,
)
from dsjobs.controller.settings import PROJECT_CREDENTIALS, STORAGE_CREDENTIALS_ENV
from dsjobs.devcluster import ClusterPaths, S3Config, bins
from dsjobs.devcluster.files import write_private
from dsjobs.devcluster.procs import Record, is_running, reserve_ports
from dsjobs.devcluster.s3 import ScopedKey, scoped_key
from dsjobs.storage import project_prefix

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_OVERLAY = REPO_ROOT / "deploy" / "overlays" / "local"
DEMO_DIR = REPO_ROOT / "examples" / "demo"
PACKAGE_DIR = Path(__file__).resolve().parent

STORAGE_SECRET = "dsjobs-storage"
API_SECRET = "dsjobs-api"
PAGE_TOKEN_KEY_ENV = "DSJOBS_API_PAGE_TOKEN_KEY"
SETTINGS_CONFIGMAP = "dsjobs-settings"
#: Marks the ServiceAccount of the overlay's demo project that `up` makes a token for.
LOCAL_USER_LABEL = "dsjobs.dev/local-user"
#: Pod template annotation: a digest of settings, storage credentials and the dsjobs sources, so a
#: change rolls the pods (settings reach the processes as environment variables, which a running
#: pod never re-reads; the sources are the "image" of the local nodes).
CONFIG_HASH_ANNOTATION = "dsjobs.dev/config-hash"
TOKEN_DURATION = "24h"
API_ENV = "DSJOBS_API_LISTEN"
LIVENESS_ENV = "DSJOBS_LIVENESS_PORT"
#: Settings that hold a loopback port of the stack's processes ("host:port" or a port number).
PORT_SETTINGS = (API_ENV, "DSJOBS_API_METRICS_LISTEN", "DSJOBS_METRICS_PORT", LIVENESS_ENV)
PROMETHEUS_PORT_ANNOTATION = "prometheus.io/port"
#: In port_registry_dir(): the roots of the dev clusters whose stacks chose ports, and its lock.
PORTS_REGISTRY = "stack-clusters.json"
PORTS_LOCK = "stack-ports.lock"

Obj = dict[str, Any]


class StackError(RuntimeError):
    """`up` cannot go on; the message says what to look at."""


# ------------------------------------------------------------------ progress


class Progress:
    """One line when a step starts, one when it ends, with its duration: nothing pretends."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream or sys.stderr
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self._stream, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.say(f"{what} ...")
        t = time.monotonic()
        yield
        self.say(f"{what}: done in {time.monotonic() - t:.1f}s")


# ------------------------------------------------------------------ kubectl


def find_kubectl(paths: ClusterPaths | None = None) -> str:
    """The kubectl built with the cluster (same version as its API server), else the one on PATH."""
    dirs: list[Path] = []
    record = Record.load(paths.pids) if paths is not None else None
    if record is not None and (bin_dir := record.info.get("bin_dir")):
        dirs.append(Path(bin_dir))
    with suppress(bins.BinariesError):  # not built (yet): PATH is next
        dirs.append(bins.ensure_bin_dir(build=False))
    for d in dirs:
        if os.access(d / "kubectl", os.X_OK):
            return str(d / "kubectl")
    found = shutil.which("kubectl")
    if not found:
        raise StackError("kubectl not found: build it with `bash hack/k8s-bins.sh` or put one on PATH")
    return found


@dataclass(frozen=True)
class Kubectl:
    binary: str
    kubeconfig: Path

    def argv(self, *args: str) -> list[str]:
        return [self.binary, f"--kubeconfig={self.kubeconfig}", *args]

    def run(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            self.argv(*args), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise StackError(
                f"kubectl {shlex.join(args)} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
            )
        return proc.stdout

    def apply(self, objects: Sequence[Obj]) -> str:
        return self.run("apply", "-f", "-", stdin=dump_yaml(objects))


def _established(kubectl: Kubectl, name: str) -> bool:
    """Whether the CRD `name` is Established. Read as JSON: a jsonpath filter on its conditions
    (as `kubectl wait` uses) fails outright, exit 1, while a just-created CRD has none yet."""
    crd = json.loads(kubectl.run("get", name, "-o", "json"))
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def _wait_established(kubectl: Kubectl, names: Sequence[str], timeout: float = 60) -> None:
    """Poll until every CRD is Established."""
    deadline = time.monotonic() + timeout
    while True:
        if all(_established(kubectl, name) for name in names):
            return
        if time.monotonic() > deadline:
            raise StackError(f"CRDs not Established after {timeout:.0f}s: {', '.join(names)}")
        time.sleep(0.2)


def dump_yaml(objects: Sequence[Obj]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def render(kubectl: Kubectl, overlay: Path) -> list[Obj]:
    """The overlay as kustomize builds it (`kubectl kustomize`, no cluster needed)."""
    text = kubectl.run("kustomize", str(overlay))
    return [o for o in yaml.safe_load_all(text) if o]


# ------------------------------------------------------------------ the overlay


@dataclass(frozen=True)
class OverlayFacts:
    """What `up` needs to know about a rendered overlay."""

    system_namespace: str
    deployments: tuple[str, ...]
    api_endpoint: str
    project_id: str
    project_namespace: str
    user_service_account: str
    settings: Mapping[str, str]


def _named(objects: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o.get("kind") == kind]


def client_endpoint(listen: str) -> str:
    """Where a client on this host reaches a server listening on `listen` (host:port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise StackError(f"{API_ENV}={listen!r} is not host:port")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def overlay_facts(objects: Sequence[Obj]) -> OverlayFacts:
    settings_cm = [o for o in _named(objects, "ConfigMap") if o["metadata"]["name"] == SETTINGS_CONFIGMAP]
    if len(settings_cm) != 1:
        raise StackError(f"the overlay must hold exactly one ConfigMap {SETTINGS_CONFIGMAP}")
    settings = {str(k): str(v) for k, v in (settings_cm[0].get("data") or {}).items()}
    system_ns = str(settings_cm[0]["metadata"]["namespace"])
    deployments = tuple(
        sorted(
            o["metadata"]["name"]
            for o in _named(objects, "Deployment")
            if o["metadata"].get("namespace") == system_ns
        )
    )
    if not deployments:
        raise StackError(f"the overlay has no Deployment in {system_ns}")
    projects = [
        o for o in _named(objects, "Namespace") if PROJECT_LABEL in (o["metadata"].get("labels") or {})
    ]
    if len(projects) != 1:
        raise StackError(f"the overlay must hold exactly one Namespace labelled {PROJECT_LABEL}")
    project_ns = str(projects[0]["metadata"]["name"])
    users = [
        o
        for o in _named(objects, "ServiceAccount")
        if o["metadata"].get("namespace") == project_ns
        and LOCAL_USER_LABEL in (o["metadata"].get("labels") or {})
    ]
    if len(users) != 1:
        raise StackError(
            f"the overlay must hold one ServiceAccount in {project_ns} labelled {LOCAL_USER_LABEL}"
        )
    return OverlayFacts(
        system_namespace=system_ns,
        deployments=deployments,
        api_endpoint=client_endpoint(settings.get(API_ENV, "0.0.0.0:9090")),
        project_id=str(projects[0]["metadata"]["labels"][PROJECT_LABEL]),
        project_namespace=project_ns,
        user_service_account=str(users[0]["metadata"]["name"]),
        settings=settings,
    )


# ------------------------------------------------------------------ ports


def setting_port(value: str) -> int:
    """The port of a "host:port" or "port" setting."""
    port = value.rpartition(":")[2]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise StackError(f"{value!r} is not a port or host:port")
    return int(port)


def overlay_ports(settings: Mapping[str, str]) -> dict[str, int]:
    """The ports the overlay's settings ask for, by setting name."""
    return {name: setting_port(settings[name]) for name in PORT_SETTINGS if settings.get(name)}


def choose_ports(
    wanted: Mapping[str, int],
    recorded: Mapping[str, int] | None,
    is_free: Callable[[int], bool],
    any_free: Callable[[], int],
    held: Collection[int] = (),
) -> dict[str, int]:
    """This cluster's ports: those recorded by an earlier `up` of it, but for any that another live
    cluster holds (`held`); else each wanted port that is free and not held, and otherwise a port
    reserve_ports gives (never one wanted, held or chosen already)."""
    chosen: dict[str, int] = {}
    if recorded is not None and set(recorded) == set(wanted):
        # Not probed: our own stack may be listening on them, which must not move them.
        chosen = {name: port for name, port in recorded.items() if port not in held}
    for name, port in wanted.items():
        if name in chosen:
            continue
        if port not in held and port not in chosen.values() and is_free(port):
            chosen[name] = port
            continue
        other = any_free()
        while other in chosen.values() or other in wanted.values() or other in held:
            other = any_free()
        chosen[name] = other
    return {name: chosen[name] for name in wanted}


def loopback_port_free(port: int) -> bool:
    # No SO_REUSEADDR/SO_REUSEPORT: a port any listener holds counts as taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def any_loopback_port() -> int:
    with reserve_ports(1) as (port,):
        return port


def port_registry_dir() -> Path:
    """Where the stacks of every checkout of this user note their ports (beside the binaries)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsjobs"


def recorded_ports(path: Path) -> dict[str, int] | None:
    with suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
            return {str(k): v for k, v in data.items()}
    return None


def cluster_alive(paths: ClusterPaths) -> bool:
    """A process of the dev cluster in `paths` still runs: a cluster that is down, deleted or
    crashed (even with its directory left behind) holds no ports."""
    try:
        record = Record.load(paths.pids)  # an unreadable one is None already
    except OSError:
        return False
    return record is not None and any(is_running(c) for c in record.components)


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if we die holding it
        yield
    finally:
        os.close(fd)


def recorded_roots(path: Path) -> list[str]:
    with suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, list):
            return sorted(str(r) for r in data)
    return []


def held_ports(roots: Sequence[str]) -> dict[str, set[int]]:
    """The ports each listed cluster that is alive recorded for its stack."""
    held: dict[str, set[int]] = {}
    for root in roots:
        other = ClusterPaths.at(root)
        if cluster_alive(other) and (theirs := recorded_ports(other.stack_ports)) is not None:
            held[root] = set(theirs.values())
    return held


def stack_ports(
    paths: ClusterPaths, settings: Mapping[str, str], registry: Path | None = None
) -> dict[str, int]:
    """The ports of this cluster's stack, chosen on its first `up` and kept until `down`.

    The pods bind them minutes after the choice, so "free now" does not keep another checkout's
    stack (CI beside a developer's `make demo`) off them. So every stack lists its cluster in
    `registry`, and the choice is made under a lock there, avoiding the ports of the listed
    clusters that are alive; one that is down or gone is dropped from the list.
    """
    registry = registry or port_registry_dir()
    try:
        return _stack_ports_locked(paths, settings, registry)
    except OSError as exc:
        if exc.filename is None or not str(exc.filename).startswith(str(registry)):
            raise
        raise StackError(
            f"cannot use the stacks' port registry in {registry} ({exc.strerror}: {exc.filename}): every "
            "checkout's stack notes its ports there so that two never take the same; make it writable, "
            "or point XDG_CACHE_HOME at a writable directory"
        ) from exc


def _stack_ports_locked(paths: ClusterPaths, settings: Mapping[str, str], registry: Path) -> dict[str, int]:
    me = os.path.realpath(paths.root)
    wanted = overlay_ports(settings)
    with _exclusive(registry / PORTS_LOCK):
        listed = recorded_roots(registry / PORTS_REGISTRY)
        others = held_ports([root for root in listed if root != me])
        recorded = recorded_ports(paths.stack_ports)
        held = set().union(*others.values())
        ports = choose_ports(wanted, recorded, loopback_port_free, any_loopback_port, held)
        if ports != recorded:
            write_private(paths.stack_ports, json.dumps(ports, sort_keys=True) + "\n")
        if (now := sorted([me, *others])) != listed:
            tmp = registry / f"{PORTS_REGISTRY}.tmp"
            tmp.write_text(json.dumps(now, indent=1) + "\n")
            os.replace(tmp, registry / PORTS_REGISTRY)
    return ports


def with_ports(objects: Sequence[Obj], ports: Mapping[str, int]) -> list[Obj]:
    """The overlay with its loopback ports replaced (pure): the settings' values (their host kept)
    and, in the Deployments of the settings' namespace, every containerPort, probe port and
    prometheus.io/port annotation that named the old port."""
    (cm,) = [o for o in _named(objects, "ConfigMap") if o["metadata"]["name"] == SETTINGS_CONFIGMAP]
    data = dict(cm.get("data") or {})
    moved = {old: ports[name] for name, old in overlay_ports(data).items() if name in ports}
    for name, port in ports.items():
        host, sep, _ = str(data[name]).rpartition(":")
        data[name] = f"{host}{sep}{port}"
    namespace = cm["metadata"]["namespace"]

    def swap(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: swap(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v, key) for v in node]
        if key in ("containerPort", "port") and isinstance(node, int) and node in moved:
            return moved[node]
        if key == PROMETHEUS_PORT_ANNOTATION and isinstance(node, str) and node.isdigit():
            return str(moved.get(int(node), node))
        return node

    out: list[Obj] = []
    for o in objects:
        if o is cm:
            o = {**o, "data": data}
        elif o.get("kind") == "Deployment" and o["metadata"].get("namespace") == namespace:
            o = swap(o)
        out.append(o)
    return out


def _secret(name: str, namespace: str, string_data: Mapping[str, str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "dsjobs"}},
        "type": "Opaque",
        "stringData": dict(string_data),
    }


def storage_secret(s3: S3Config, namespace: str) -> Obj:
    """The storage credentials Secret (keys as in deploy/base/storage-credentials.yaml)."""
    return _secret(
        STORAGE_SECRET, namespace, {k: v for k, v in s3.env().items() if k.startswith("DSJOBS_S3_")}
    )


def api_secret(s3: S3Config, namespace: str) -> Obj:
    """The API's optional Secret (deploy/base/api-deployment.yaml) with a page-token key, as an
    admin would create it. Derived from the cluster's S3 secret: the same on every `make up` of a
    cluster (no restart of the API for nothing), another for the next cluster."""
    key = derived_page_token_key(s3.secret_key).decode()
    return _secret(API_SECRET, namespace, {PAGE_TOKEN_KEY_ENV: key})


def project_storage_secret(key: ScopedKey, namespace: str) -> Obj:
    """The project's own storage key pair, for an operator with DSJOBS_STORAGE_CREDENTIALS=project
    (what an admin provisions per project namespace; docs/admin.md)."""
    data = {PROJECT_STORAGE_ACCESS_KEY: key.access_key, PROJECT_STORAGE_SECRET_KEY: key.secret_key}
    return _secret(PROJECT_STORAGE_SECRET_NAME, namespace, data)


def code_digest(package: Path = PACKAGE_DIR) -> str:
    """A digest of the dsjobs sources: on the local cluster the host filesystem is the image, so
    changed code needs new pods just as a new image would."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def config_hash(facts: OverlayFacts, secret: Obj, code: str = "") -> str:
    blob = json.dumps([dict(facts.settings), secret["stringData"], code], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def with_config_hash(objects: Sequence[Obj], namespace: str, digest: str) -> list[Obj]:
    out = []
    for o in objects:
        if o.get("kind") == "Deployment" and o["metadata"].get("namespace") == namespace:
            o = json.loads(json.dumps(o))
            meta = o["spec"]["template"].setdefault("metadata", {})
            meta.setdefault("annotations", {})[CONFIG_HASH_ANNOTATION] = digest
        out.append(o)
    return out


def env_file_text(values: Mapping[str, str], path_first: str | None = None) -> str:
    """The `.dev/env` file; `path_first`: a directory put before $PATH (the cluster's kubectl)."""
    lines = ["# written by `make up` (python -m dsjobs.localstack up); source it: . .dev/env"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    if path_first:
        lines.append(f'export PATH={shlex.quote(path_first)}:"$PATH"')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ up


@dataclass(frozen=True)
class Stack:
    root: Path
    kubectl: Kubectl
    facts: OverlayFacts
    env: dict[str, str]

    @property
    def env_file(self) -> Path:
        return self.root / "env"


def _devcluster(root: Path, *args: str) -> None:
    """Runs the dev cluster CLI with our stdout/stderr, so a cold build shows its own progress."""
    argv = [sys.executable, "-m", "dsjobs.devcluster", "--dir", str(root), *args]
    proc = subprocess.run(argv, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        raise StackError(f"`{shlex.join(argv[1:])}` failed (exit {proc.returncode}); see its messages above")


def _wait_grpc(endpoint: str, timeout: float) -> None:
    """Until the API answers the standard gRPC health check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return  # no health service, but a gRPC server answered
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.5)
    raise StackError(f"the dsjobs API at {endpoint} is not serving after {timeout:.0f}s ({last})")


def _wait_http(url: str, timeout: float) -> None:
    """Until `url` answers 200 (the operator's liveness endpoint: it answers once Kopf runs)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise StackError(f"{url} did not answer 200 within {timeout:.0f}s ({last})")


def diagnose(kubectl: Kubectl, namespace: str) -> str:
    """Pods, recent events and log tails of `namespace`, for an error message."""
    parts = [kubectl.run("get", "pods", "-n", namespace, "-o", "wide", check=False)]
    parts.append(
        kubectl.run("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)[-3000:]
    )
    pods = kubectl.run("get", "pods", "-n", namespace, "-o", "name", check=False).split()
    for pod in pods[:6]:
        logs = kubectl.run("logs", "-n", namespace, pod, "--all-containers", "--tail=25", check=False)
        parts.append(f"--- {pod}\n{logs}")
    return "\n".join(parts)


def up(
    root: Path,
    *,
    overlay: Path = LOCAL_OVERLAY,
    progress: Progress | None = None,
    start_cluster: bool = True,
    timeout: float = 300.0,
) -> Stack:
    """Brings the local stack up (idempotent) and writes `<root>/env`."""
    progress = progress or Progress()
    paths = ClusterPaths.at(root)
    if start_cluster:
        with progress.step("local cluster (python -m dsjobs.devcluster up; the first run builds Kubernetes)"):
            _devcluster(paths.root, "up")
    if not paths.kubeconfig.exists() or not paths.s3_json.exists():
        raise StackError(f"no dev cluster in {paths.root} (missing kubeconfig or s3.json)")
    kubectl = Kubectl(find_kubectl(paths), paths.kubeconfig)

    objects = render(kubectl, overlay)
    objects = with_ports(objects, stack_ports(paths, overlay_facts(objects).settings))
    facts = overlay_facts(objects)
    crds = _named(objects, "CustomResourceDefinition")
    with progress.step(f"CRDs ({', '.join(c['metadata']['name'] for c in crds)})"):
        kubectl.apply(crds)
        _wait_established(kubectl, [f"crd/{c['metadata']['name']}" for c in crds])

    s3 = S3Config.read(paths.s3_json)
    secret = storage_secret(s3, facts.system_namespace)
    extra_secrets: list[Obj] = [api_secret(s3, facts.system_namespace)]
    if facts.settings.get(STORAGE_CREDENTIALS_ENV) == PROJECT_CREDENTIALS:
        # The dev S3 server accepts this pair for the project's prefix only, as an admin's own
        # object store would after they scoped a user to it.
        key = scoped_key(paths.s3_scoped_keys, project_prefix(facts.project_id))
        extra_secrets.append(project_storage_secret(key, facts.project_namespace))
    digest = config_hash(facts, secret, code_digest())
    rest = [o for o in objects if o.get("kind") != "CustomResourceDefinition"]
    # Namespaces first, then the Secrets the Deployments load, then everything else.
    namespaces = _named(rest, "Namespace")
    others = with_config_hash(
        [o for o in rest if o.get("kind") != "Namespace"], facts.system_namespace, digest
    )
    with progress.step(
        f"dsjobs from {overlay.relative_to(REPO_ROOT) if overlay.is_relative_to(REPO_ROOT) else overlay}"
    ):
        kubectl.apply([*namespaces, secret, *extra_secrets, *others])

    with progress.step(f"waiting for {', '.join(facts.deployments)} to be ready"):
        for name in facts.deployments:
            try:
                kubectl.run(
                    "rollout", "status", f"deployment/{name}", "-n", facts.system_namespace,
                    f"--timeout={int(timeout)}s", timeout=timeout + 30,
                )  # fmt: skip
            except (StackError, subprocess.TimeoutExpired) as exc:
                raise StackError(f"{exc}\n{diagnose(kubectl, facts.system_namespace)}") from exc
        try:
            _wait_grpc(facts.api_endpoint, timeout=min(timeout, 120))
            # Pods share the host network here, so the operator's liveness endpoint is on loopback.
            if (port := facts.settings.get(LIVENESS_ENV, "0")).isdigit() and int(port):
                _wait_http(f"http://127.0.0.1:{port}/healthz", timeout=min(timeout, 120))
        except StackError as exc:
            raise StackError(f"{exc}\n{diagnose(kubectl, facts.system_namespace)}") from exc

    with progress.step(
        f"token for project {facts.project_id!r} (ServiceAccount {facts.user_service_account})"
    ):
        token = kubectl.run(
            "create", "token", facts.user_service_account, "-n", facts.project_namespace,
            f"--duration={TOKEN_DURATION}",
        ).strip()  # fmt: skip
    env = {
        "KUBECONFIG": str(paths.kubeconfig),
        "DSJOBS_ENDPOINT": facts.api_endpoint,
        "DSJOBS_TOKEN": token,
        "DSJOBS_PROJECT_ID": facts.project_id,
    }
    stack = Stack(paths.root, kubectl, facts, env)
    # The kubectl built with the cluster, when that is the one used: a machine may have none.
    built = Path(kubectl.binary)
    on_path = shutil.which("kubectl")
    path_first = str(built.parent) if on_path is None or Path(on_path).resolve() != built.resolve() else None
    write_private(stack.env_file, env_file_text(env, path_first if built.is_absolute() else None))
    return stack


def shown_path(path: Path) -> str:
    """`path` relative to the cwd when it is below it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def print_summary(stack: Stack, progress: Progress) -> None:
    rel = shown_path(stack.env_file)
    progress.say("dsjobs is up")
    print(
        f"""
  API            {stack.facts.api_endpoint} (plaintext gRPC; bearer token of ServiceAccount
                 {stack.facts.project_namespace}/{stack.facts.user_service_account}, valid {TOKEN_DURATION})
  project        {stack.facts.project_id} (namespace {stack.facts.project_namespace})
  settings       {rel}  (KUBECONFIG, DSJOBS_ENDPOINT, DSJOBS_TOKEN, DSJOBS_PROJECT_ID; the
                 cluster's kubectl first on PATH)

  try:  . {rel}
        dsjobs datasphere project job list -p $DSJOBS_PROJECT_ID
        kubectl get pj -A
""",
        flush=True,
    )


# ------------------------------------------------------------------ down


def down(root: Path) -> None:
    paths = ClusterPaths.at(root)
    (paths.root / "env").unlink(missing_ok=True)
    _devcluster(paths.root, "down")


# ------------------------------------------------------------------ demo


def _dsjobs_command() -> list[str]:
    script = Path(sys.executable).with_name("dsjobs")
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "dsjobs.cli"]


def config_outputs(config: Path) -> list[str]:
    """The output paths a DataSphere config.yaml declares (`- path` or `- path: VAR` entries)."""
    data = yaml.safe_load(config.read_text()) or {}
    paths: list[str] = []
    for entry in data.get("outputs") or []:
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, dict):
            paths.extend(str(k) for k in entry)
    return paths


def demo(root: Path, *, example: Path = DEMO_DIR, progress: Progress | None = None) -> int:
    """`up`, then runs the example job with the official CLI in a fresh copy of `example`."""
    progress = progress or Progress()
    stack = up(root, progress=progress)
    workdir = stack.root / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(example, workdir)
    project = stack.env["DSJOBS_PROJECT_ID"]
    shown = f"dsjobs datasphere project job execute -p {project} -c config.yaml"
    progress.say(f"running the example job: (cd {shown_path(workdir)} && {shown})")
    print(flush=True)
    env = {**os.environ, **stack.env}
    t = time.monotonic()
    proc = subprocess.run(
        [*_dsjobs_command(), "datasphere", "project", "job", "execute", "-p", project, "-c", "config.yaml"],
        cwd=workdir,
        env=env,
        check=False,
    )
    took = time.monotonic() - t
    print(flush=True)
    progress.say(f"the official CLI exited with {proc.returncode} after {took:.1f}s")
    ns = stack.facts.project_namespace
    print(f"\n$ kubectl get pj -n {ns}", flush=True)
    print(stack.kubectl.run("get", "pj", "-n", ns, check=False), flush=True)
    outputs = [workdir / rel for rel in config_outputs(workdir / "config.yaml") if (workdir / rel).is_file()]
    if proc.returncode == 0 and outputs:
        print("What happened: the CLI uploaded main.py, the input file and the zipped local module to the")
        print("object store, the operator ran the job as a pod on the local cluster (installing its one")
        print("requirement with pip), its logs streamed back live, and its output was downloaded here:\n")
        for p in outputs:
            print(f"  {shown_path(p)}")
        first = outputs[0]
        print(f"\n$ cat {shown_path(first)}")
        print(first.read_text(errors="replace")[:2000], flush=True)
        progress.say("demo finished")
        return 0
    print(
        f"The demo job did not produce its output (CLI exit {proc.returncode}). Look at the CLI output above,\n"
        f"`kubectl describe pj -n {ns}` and the operator's logs: kubectl logs -n {stack.facts.system_namespace} "
        f"deploy/{stack.facts.deployments[0]}",
        file=sys.stderr,
    )
    return proc.returncode or 1


# ------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=str(REPO_ROOT / ".dev"), help="cluster directory (default: .dev)")
    parser = argparse.ArgumentParser(prog="python -m dsjobs.localstack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "up", parents=[common], help="start the cluster, deploy dsjobs (idempotent); writes <dir>/env"
    )
    sub.add_parser("down", parents=[common], help="stop everything `up` started")
    sub.add_parser("demo", parents=[common], help="`up`, then run examples/demo with the official CLI")
    args = parser.parse_args(argv)
    root = Path(args.dir).absolute()
    progress = Progress()
    try:
        if args.command == "up":
            stack = up(root, progress=progress)
            print_summary(stack, progress)
            return 0
        if args.command == "down":
            down(root)
            return 0
        if args.command == "demo":
            return demo(root, progress=progress)
    except StackError as exc:
        print(f"localstack: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("localstack: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
