"""Pure translation of a Pod (as the API returns it, a JSON dict) into what the node runs.

Nothing here talks to Kubernetes or touches the filesystem. The agent first asks
`requirements(pod)` which objects it must fetch (ConfigMaps, Secrets, PVCs, service
account tokens), fetches them into a `Fetched`, and then:

* `plan_volumes` turns the pod's volumes into host directories (and the file contents
  the agent must write for configMap/secret/downwardAPI/projected volumes);
* `plan_container` turns one container into a `ContainerPlan`: argv, environment,
  working directory, bind mounts, GPU count.

Semantics follow the kubelet where it matters to programs: `$(VAR)` expansion,
envFrom-then-env precedence, optional references, downward API formatting, and
`resourceFieldRef` defaulting limits to the node's allocatable.

There is no image: a container's argv is `command + args`; with no `command`, `args`
alone is the argv (an image without ENTRYPOINT behaves the same); with neither, the
container cannot start and the plan carries a `start_error`.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from .quantity import QuantityError, ceil_div, parse_quantity

Obj = dict[str, Any]

ContainerKind = Literal["init", "sidecar", "main"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
GPU_RESOURCE = "nvidia.com/gpu"
# The kubelet's defaults for file modes in generated volumes (0644).
DEFAULT_FILE_MODE = 0o644
DEFAULT_TOKEN_EXPIRATION = 3600


class SetupError(Exception):
    """The pod cannot be set up yet (missing ConfigMap, unbound PVC...). Retried."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ConfigError(SetupError):
    """A container's configuration cannot be resolved (kubelet: CreateContainerConfigError)."""

    def __init__(self, message: str) -> None:
        super().__init__("CreateContainerConfigError", message)


def pull_failure(image: str) -> str | None:
    """What containerd says when pulling `image` fails, for the images this node cannot pull.

    Nothing is ever pulled here (the host filesystem is the image), but a registry under the
    reserved `.invalid` top-level domain (RFC 6761: it never resolves) fails as it would on any
    kubelet: so a job's image that cannot be pulled can be seen on the local cluster too."""
    registry, sep, path = image.partition("/")
    if not sep or not ("." in registry or ":" in registry or registry == "localhost"):
        return None  # Docker Hub: "python:3.11", "library/python"
    host = registry.rsplit(":", 1)[0].lower() if not registry.startswith("[") else registry
    if host != "invalid" and not host.endswith(".invalid"):
        return None
    name, at, digest = path.partition("@")
    repo, colon, tag = name.rpartition(":") if ":" in name else (name, "", "")
    reference = digest if at else (tag if colon else "latest")
    full = image if at or colon else f"{image}:latest"
    return (
        f'failed to pull and unpack image "{full}": failed to resolve reference "{full}": '
        f'failed to do request: Head "https://{registry}/v2/{repo}/manifests/{reference}": '
        f"dial tcp: lookup {host}: no such host"
    )


@dataclass(frozen=True)
class NodeContext:
    """What the pure functions need to know about the node they run on."""

    name: str
    host_ip: str
    allocatable: Mapping[str, Fraction]
    # The API server as pods should reach it (KUBERNETES_SERVICE_HOST/PORT): there is no
    # kube-proxy, so the ClusterIP of the `kubernetes` Service would not route.
    api_host: str
    api_port: int
    # Directory of the agent's interpreter: first on every container's PATH.
    python_bin_dir: str
    # runAsUser/runAsGroup are recorded but not applied unless this is set: the host's
    # Python environment is often readable only by its owner.
    enforce_run_as_user: bool = False


@dataclass(frozen=True)
class TokenRequirement:
    key: str
    service_account: str
    audience: str | None
    expiration_seconds: int


@dataclass
class Requirements:
    configmaps: set[str] = field(default_factory=set)
    secrets: set[str] = field(default_factory=set)
    pvcs: set[str] = field(default_factory=set)
    #: Claims of generic ephemeral volumes: each must be controlled by the pod (as the kubelet checks).
    ephemeral_pvcs: set[str] = field(default_factory=set)
    tokens: list[TokenRequirement] = field(default_factory=list)


@dataclass
class Fetched:
    """Objects fetched for a pod. A name mapped to None was not found (404)."""

    configmaps: dict[str, Obj | None] = field(default_factory=dict)
    secrets: dict[str, Obj | None] = field(default_factory=dict)
    pvc_paths: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FileContent:
    path: str
    data: bytes
    mode: int


@dataclass(frozen=True)
class VolumePlan:
    name: str
    kind: str
    host_path: str
    # configMap/secret/downwardAPI/projected are always mounted read-only, as by the kubelet.
    read_only: bool = False
    # Generated content: the agent (re)writes exactly these files into host_path.
    files: tuple[FileContent, ...] | None = None
    # hostPath `type` to check/create before mounting.
    host_path_type: str | None = None


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    kind: ContainerKind
    image: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    working_dir: str | None
    mounts: tuple[Mount, ...]
    gpus: int
    termination_message_path: str
    termination_message_policy: str
    run_as_user: int | None
    run_as_group: int | None
    resources: Obj
    start_error: str | None = None

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


# ---------------------------------------------------------------------------
# containers of a pod


def init_containers(pod: Obj) -> list[Obj]:
    return list(pod.get("spec", {}).get("initContainers") or [])


def main_containers(pod: Obj) -> list[Obj]:
    return list(pod.get("spec", {}).get("containers") or [])


def is_sidecar(container: Obj) -> bool:
    """A native sidecar: an init container with restartPolicy Always."""
    return container.get("restartPolicy") == "Always"


def container_kind(pod: Obj, name: str) -> ContainerKind:
    for c in init_containers(pod):
        if c["name"] == name:
            return "sidecar" if is_sidecar(c) else "init"
    return "main"


def find_container(pod: Obj, name: str) -> Obj | None:
    for c in init_containers(pod) + main_containers(pod):
        if c.get("name") == name:
            return c
    return None


def restart_policy(pod: Obj) -> str:
    return str(pod.get("spec", {}).get("restartPolicy") or "Always")


def gpu_limit(container: Obj) -> int:
    resources = container.get("resources") or {}
    raw = (resources.get("limits") or {}).get(GPU_RESOURCE)
    if raw is None:
        raw = (resources.get("requests") or {}).get(GPU_RESOURCE)
    if raw is None:
        return 0
    try:
        value = parse_quantity(raw)
    except QuantityError:
        return 0
    return max(0, int(value))


def termination_grace_seconds(pod: Obj) -> int:
    """The grace period to use now: the deletion's if the pod is being deleted."""
    meta = pod.get("metadata", {})
    if meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds") is not None:
        return max(0, int(meta["deletionGracePeriodSeconds"]))
    value = pod.get("spec", {}).get("terminationGracePeriodSeconds")
    return 30 if value is None else max(0, int(value))


# ---------------------------------------------------------------------------
# requirements


def requirements(pod: Obj) -> Requirements:
    """Objects the agent must fetch before the pod can be set up."""
    req = Requirements()
    spec = pod.get("spec", {})
    sa = spec.get("serviceAccountName") or "default"
    for vol in spec.get("volumes") or []:
        name = vol.get("name", "")
        if "configMap" in vol:
            req.configmaps.add(vol["configMap"].get("name", ""))
        elif "secret" in vol:
            req.secrets.add(vol["secret"].get("secretName", ""))
        elif "persistentVolumeClaim" in vol:
            req.pvcs.add(vol["persistentVolumeClaim"].get("claimName", ""))
        elif "ephemeral" in vol:
            claim = ephemeral_claim_name(pod, name)
            req.pvcs.add(claim)
            req.ephemeral_pvcs.add(claim)
        elif "projected" in vol:
            for idx, src in enumerate(vol["projected"].get("sources") or []):
                if "configMap" in src:
                    req.configmaps.add(src["configMap"].get("name", ""))
                elif "secret" in src:
                    req.secrets.add(src["secret"].get("name", ""))
                elif "serviceAccountToken" in src:
                    tok = src["serviceAccountToken"]
                    req.tokens.append(
                        TokenRequirement(
                            key=token_key(name, idx),
                            service_account=sa,
                            audience=tok.get("audience") or None,
                            expiration_seconds=int(tok.get("expirationSeconds") or DEFAULT_TOKEN_EXPIRATION),
                        )
                    )
    for c in init_containers(pod) + main_containers(pod):
        for ef in c.get("envFrom") or []:
            if "configMapRef" in ef:
                req.configmaps.add(ef["configMapRef"].get("name", ""))
            elif "secretRef" in ef:
                req.secrets.add(ef["secretRef"].get("name", ""))
        for ev in c.get("env") or []:
            vf = ev.get("valueFrom") or {}
            if "configMapKeyRef" in vf:
                req.configmaps.add(vf["configMapKeyRef"].get("name", ""))
            elif "secretKeyRef" in vf:
                req.secrets.add(vf["secretKeyRef"].get("name", ""))
    req.configmaps.discard("")
    req.secrets.discard("")
    req.pvcs.discard("")
    return req


def token_key(volume: str, source_index: int) -> str:
    return f"{volume}/{source_index}"


def ephemeral_claim_name(pod: Obj, volume: str) -> str:
    """The PVC the ephemeral volume controller makes for a pod's generic ephemeral volume."""
    return f"{pod.get('metadata', {}).get('name', '')}-{volume}"


def ephemeral_claim_problem(pvc: Obj, pod_namespace: str, pod_name: str, pod_uid: str) -> str | None:
    """Why a generic ephemeral volume's claim may not be used by the pod (the kubelet's check: the
    claim must be controlled by this very pod, not a same-named claim made by someone else)."""
    for ref in pvc.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Pod" and ref.get("uid") == pod_uid:
            return None
    claim = pvc.get("metadata", {}).get("name", "")
    return (
        f"PVC {pod_namespace}/{claim} was not created for pod {pod_namespace}/{pod_name} (pod is not owner)"
    )


def pv_host_path(pv: Obj) -> str | None:
    """The host directory behind a PersistentVolume this node can mount (local or hostPath)."""
    spec = pv.get("spec", {})
    for kind in ("local", "hostPath"):
        path = (spec.get(kind) or {}).get("path")
        if path:
            return str(path)
    return None


# ---------------------------------------------------------------------------
# $(VAR) expansion, as k8s.io/kubernetes/third_party/forked/golang/expansion


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Expand `$(NAME)` references; `$$` is a literal `$`; unknown names stay as written."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                close = text.find(")", i + 2)
                if close != -1:
                    name = text[i + 2 : close]
                    value = lookup(name)
                    out.append(value if value is not None else f"$({name})")
                    i = close + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------
# downward API


def _go_quote(value: str) -> str:
    # strconv.Quote for the printable-ASCII common case; json escaping is close enough for the rest.
    return json.dumps(value, ensure_ascii=False)


def format_map(values: Mapping[str, str]) -> str:
    """The downward API's rendering of labels/annotations: sorted `key="value"` lines."""
    return "\n".join(f"{k}={_go_quote(values[k])}" for k in sorted(values))


def _split_subscript(path: str) -> tuple[str, str | None]:
    if path.endswith("']") and "['" in path:
        base, _, rest = path.partition("['")
        if base:
            return base, rest[:-2]
    return path, None


def field_ref_value(pod: Obj, field_path: str, host_ip: str, *, allow_maps: bool = False) -> str:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    base, key = _split_subscript(field_path)
    if key is not None:
        if base == "metadata.labels":
            return str((meta.get("labels") or {}).get(key, ""))
        if base == "metadata.annotations":
            return str((meta.get("annotations") or {}).get(key, ""))
        raise ConfigError(f"fieldPath {field_path!r} does not support subscript")
    simple: dict[str, str] = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        # Every pod shares the host's network: its IP is the node's.
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
        "status.podIP": host_ip,
        "status.podIPs": host_ip,
    }
    if field_path in simple:
        return str(simple[field_path])
    if allow_maps and field_path == "metadata.labels":
        return format_map(meta.get("labels") or {})
    if allow_maps and field_path == "metadata.annotations":
        return format_map(meta.get("annotations") or {})
    raise ConfigError(f"unsupported fieldPath: {field_path}")


def resource_field_value(container: Obj, ref: Obj, allocatable: Mapping[str, Fraction]) -> str:
    """`resourceFieldRef`: limits default to node allocatable; rounded up by the divisor."""
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or not name:
        raise ConfigError(f"unsupported container resource: {resource!r}")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name)
    try:
        if raw is not None:
            value = parse_quantity(raw)
        elif kind == "limits":
            value = allocatable.get(name, Fraction(0))
        else:
            # The API server defaults requests to limits; with neither, the request is zero.
            lim = (resources.get("limits") or {}).get(name)
            value = parse_quantity(lim) if lim is not None else Fraction(0)
        divisor = parse_quantity(ref.get("divisor") or "1")
    except QuantityError as exc:
        raise ConfigError(str(exc)) from exc
    if divisor == 0:
        divisor = Fraction(1)
    if name == "cpu":
        # The kubelet computes in milli-units: ceil(milli(value) / milli(divisor)).
        return str(ceil_div(Fraction(_ceil(value * 1000)), Fraction(_ceil(divisor * 1000)) or Fraction(1)))
    return str(ceil_div(Fraction(_ceil(value)), Fraction(_ceil(divisor)) or Fraction(1)))


def _ceil(value: Fraction) -> int:
    return -((-value.numerator) // value.denominator)


# ---------------------------------------------------------------------------
# environment


def service_env(node: NodeContext) -> dict[str, str]:
    """The `kubernetes` Service variables every pod gets, pointing at the real API server."""
    host, port = node.api_host, str(node.api_port)
    url = f"tcp://{host}:{port}"
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
        "KUBERNETES_PORT": url,
        f"KUBERNETES_PORT_{port}_TCP": url,
        f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
        f"KUBERNETES_PORT_{port}_TCP_PORT": port,
        f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
    }


def _decode_secret(secret: Obj) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (secret.get("data") or {}).items():
        out[k] = _b64(v).decode("utf-8", errors="replace")
    return out


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b""


def resolve_env(pod: Obj, container: Obj, fetched: Fetched, node: NodeContext) -> dict[str, str]:
    """The container's environment as the kubelet computes it (envFrom, then env, then service vars)."""
    ns = pod.get("metadata", {}).get("namespace", "")
    svc = service_env(node)
    tmp: dict[str, str] = {}

    def get_cm(name: str, optional: bool) -> Obj | None:
        obj = fetched.configmaps.get(name)
        if obj is None and not optional:
            raise ConfigError(f'configmap "{name}" not found')
        return obj

    def get_secret(name: str, optional: bool) -> Obj | None:
        obj = fetched.secrets.get(name)
        if obj is None and not optional:
            raise ConfigError(f'secret "{name}" not found')
        return obj

    for ef in container.get("envFrom") or []:
        prefix = ef.get("prefix") or ""
        if "configMapRef" in ef:
            ref = ef["configMapRef"]
            cm = get_cm(ref.get("name", ""), bool(ref.get("optional")))
            if cm is not None:
                for k, v in (cm.get("data") or {}).items():
                    tmp[prefix + k] = str(v)
        elif "secretRef" in ef:
            ref = ef["secretRef"]
            sec = get_secret(ref.get("name", ""), bool(ref.get("optional")))
            if sec is not None:
                for k, v in _decode_secret(sec).items():
                    tmp[prefix + k] = v

    def lookup(name: str) -> str | None:
        if name in tmp:
            return tmp[name]
        return svc.get(name)

    for ev in container.get("env") or []:
        name = ev.get("name", "")
        value = ev.get("value") or ""
        vf = ev.get("valueFrom")
        if value:
            value = expand(value, lookup)
        elif vf:
            if "fieldRef" in vf:
                value = field_ref_value(pod, vf["fieldRef"].get("fieldPath", ""), node.host_ip)
            elif "resourceFieldRef" in vf:
                value = resource_field_value(container, vf["resourceFieldRef"], node.allocatable)
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                optional = bool(ref.get("optional"))
                cm = get_cm(ref.get("name", ""), optional)
                if cm is None:
                    continue
                data = cm.get("data") or {}
                if ref.get("key") not in data:
                    if optional:
                        continue
                    raise ConfigError(
                        f"couldn't find key {ref.get('key')} in ConfigMap {ns}/{ref.get('name')}"
                    )
                value = str(data[ref["key"]])
            elif "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                optional = bool(ref.get("optional"))
                sec = get_secret(ref.get("name", ""), optional)
                if sec is None:
                    continue
                sdata = _decode_secret(sec)
                if ref.get("key") not in sdata:
                    if optional:
                        continue
                    raise ConfigError(f"couldn't find key {ref.get('key')} in Secret {ns}/{ref.get('name')}")
                value = sdata[ref["key"]]
            else:
                raise ConfigError(f"env {name}: unsupported valueFrom {sorted(vf)}")
        tmp[name] = value

    env = dict(svc)
    env.update(tmp)
    return env


def finish_env(
    env: Mapping[str, str], pod: Obj, node: NodeContext, run_as_user: int | None
) -> dict[str, str]:
    """Add what a container runtime adds (PATH, HOSTNAME, HOME) and put our interpreter first."""
    out = dict(env)
    path = out.get("PATH") or DEFAULT_PATH
    out["PATH"] = node.python_bin_dir + ":" + path if path else node.python_bin_dir
    spec = pod.get("spec", {})
    out.setdefault("HOSTNAME", spec.get("hostname") or pod.get("metadata", {}).get("name", ""))
    out.setdefault("HOME", "/root" if not run_as_user else "/")
    return out


# ---------------------------------------------------------------------------
# volumes


def _items_files(
    data: Mapping[str, bytes], items: list[Obj] | None, default_mode: int, what: str, optional: bool
) -> tuple[FileContent, ...]:
    files: list[FileContent] = []
    if items:
        for it in items:
            key = it.get("key", "")
            if key not in data:
                if optional:
                    continue
                raise SetupError("FailedMount", f"{what}: configured key {key!r} not found")
            mode = it.get("mode")
            files.append(
                FileContent(
                    _safe_rel(it.get("path") or key),
                    data[key],
                    int(mode if mode is not None else default_mode),
                )
            )
    else:
        for key in sorted(data):
            files.append(FileContent(_safe_rel(key), data[key], default_mode))
    return tuple(files)


def _safe_rel(path: str) -> str:
    norm = posixpath.normpath(path)
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise SetupError("FailedMount", f"invalid volume file path {path!r}")
    return norm


def _configmap_data(cm: Obj) -> dict[str, bytes]:
    data = {k: str(v).encode() for k, v in (cm.get("data") or {}).items()}
    for k, v in (cm.get("binaryData") or {}).items():
        data[k] = _b64(v)
    return data


def _secret_data(sec: Obj) -> dict[str, bytes]:
    return {k: _b64(v) for k, v in (sec.get("data") or {}).items()}


def _downward_files(pod: Obj, items: list[Obj], default_mode: int, node: NodeContext) -> list[FileContent]:
    files: list[FileContent] = []
    for it in items:
        if "fieldRef" in it:
            value = field_ref_value(pod, it["fieldRef"].get("fieldPath", ""), node.host_ip, allow_maps=True)
        elif "resourceFieldRef" in it:
            ref = it["resourceFieldRef"]
            container = find_container(pod, ref.get("containerName", "")) or {}
            value = resource_field_value(container, ref, node.allocatable)
        else:
            raise SetupError("FailedMount", "downwardAPI item needs fieldRef or resourceFieldRef")
        mode = it.get("mode")
        files.append(
            FileContent(
                _safe_rel(it.get("path", "")), value.encode(), int(mode if mode is not None else default_mode)
            )
        )
    return files


#: The kubelet's message for a pod evicted because an emptyDir outgrew its sizeLimit.
EMPTY_DIR_EVICTION_MESSAGE = 'Usage of EmptyDir volume "{name}" exceeds the limit "{limit}". '


def empty_dir_limits(pod: Obj) -> dict[str, tuple[Fraction, str]]:
    """The disk-backed emptyDir volumes with a positive sizeLimit: name -> (bytes, the limit as
    written). A memory-backed one is a tmpfs of that size under a kubelet, which a write past it
    fails (ENOSPC) and no eviction looks at; here it is a directory, left unbounded."""
    limits: dict[str, tuple[Fraction, str]] = {}
    for vol in pod.get("spec", {}).get("volumes") or []:
        empty_dir = vol.get("emptyDir") or {}
        size = empty_dir.get("sizeLimit")
        if size is None or empty_dir.get("medium") == "Memory":
            continue
        try:
            value = parse_quantity(size)
        except QuantityError:
            continue  # the API server validates it; nothing to enforce otherwise
        if value > 0:
            limits[str(vol.get("name", ""))] = (value, str(size))
    return limits


def volume_dir(pod_dir: str, name: str) -> str:
    return posixpath.join(pod_dir, "volumes", name)


def plan_volumes(pod: Obj, fetched: Fetched, pod_dir: str, node: NodeContext) -> list[VolumePlan]:
    """Host directories for every pod volume. Raises SetupError while something is missing."""
    plans: list[VolumePlan] = []
    for vol in pod.get("spec", {}).get("volumes") or []:
        name = vol.get("name", "")
        vdir = volume_dir(pod_dir, name)
        if "emptyDir" in vol:
            plans.append(VolumePlan(name, "emptyDir", vdir))
        elif "hostPath" in vol:
            hp = vol["hostPath"]
            plans.append(
                VolumePlan(name, "hostPath", str(hp.get("path", "")), host_path_type=hp.get("type") or "")
            )
        elif "configMap" in vol:
            src = vol["configMap"]
            cm_name = src.get("name", "")
            optional = bool(src.get("optional"))
            cm = fetched.configmaps.get(cm_name)
            if cm is None and not optional:
                raise SetupError(
                    "FailedMount",
                    f'MountVolume.SetUp failed for volume "{name}" : configmap "{cm_name}" not found',
                )
            mode = int(src.get("defaultMode", DEFAULT_FILE_MODE))
            files = _items_files(
                _configmap_data(cm or {}), src.get("items"), mode, f'configmap "{cm_name}"', optional
            )
            plans.append(VolumePlan(name, "configMap", vdir, read_only=True, files=files))
        elif "secret" in vol:
            src = vol["secret"]
            s_name = src.get("secretName", "")
            optional = bool(src.get("optional"))
            sec = fetched.secrets.get(s_name)
            if sec is None and not optional:
                raise SetupError(
                    "FailedMount",
                    f'MountVolume.SetUp failed for volume "{name}" : secret "{s_name}" not found',
                )
            mode = int(src.get("defaultMode", DEFAULT_FILE_MODE))
            files = _items_files(
                _secret_data(sec or {}), src.get("items"), mode, f'secret "{s_name}"', optional
            )
            plans.append(VolumePlan(name, "secret", vdir, read_only=True, files=files))
        elif "downwardAPI" in vol:
            src = vol["downwardAPI"]
            mode = int(src.get("defaultMode", DEFAULT_FILE_MODE))
            dfiles = _downward_files(pod, src.get("items") or [], mode, node)
            plans.append(VolumePlan(name, "downwardAPI", vdir, read_only=True, files=tuple(dfiles)))
        elif "projected" in vol:
            plans.append(_plan_projected(pod, name, vol["projected"], vdir, fetched, node))
        elif "persistentVolumeClaim" in vol or "ephemeral" in vol:
            # A generic ephemeral volume is its claim <pod>-<volume>, mounted like any other.
            src = vol.get("persistentVolumeClaim") or {}
            ephemeral = "ephemeral" in vol
            claim = ephemeral_claim_name(pod, name) if ephemeral else src.get("claimName", "")
            path = fetched.pvc_paths.get(claim)
            if not path:
                which = f'ephemeral volume "{name}": ' if ephemeral else ""
                raise SetupError(
                    "FailedMount",
                    f'{which}persistentvolumeclaim "{claim}" is not bound to a local or hostPath volume',
                )
            plans.append(VolumePlan(name, "persistentVolumeClaim", path, read_only=bool(src.get("readOnly"))))
        else:
            kinds = sorted(k for k in vol if k != "name")
            raise SetupError(
                "FailedMount", f'volume "{name}": unsupported volume type {kinds} on the process node'
            )
    return plans


def _plan_projected(
    pod: Obj, name: str, src: Obj, vdir: str, fetched: Fetched, node: NodeContext
) -> VolumePlan:
    mode = int(src.get("defaultMode", DEFAULT_FILE_MODE))
    files: list[FileContent] = []
    for idx, s in enumerate(src.get("sources") or []):
        if "configMap" in s:
            ref = s["configMap"]
            cm_name = ref.get("name", "")
            optional = bool(ref.get("optional"))
            cm = fetched.configmaps.get(cm_name)
            if cm is None and not optional:
                raise SetupError(
                    "FailedMount",
                    f'MountVolume.SetUp failed for volume "{name}" : configmap "{cm_name}" not found',
                )
            files.extend(
                _items_files(
                    _configmap_data(cm or {}), ref.get("items"), mode, f'configmap "{cm_name}"', optional
                )
            )
        elif "secret" in s:
            ref = s["secret"]
            s_name = ref.get("name", "")
            optional = bool(ref.get("optional"))
            sec = fetched.secrets.get(s_name)
            if sec is None and not optional:
                raise SetupError(
                    "FailedMount",
                    f'MountVolume.SetUp failed for volume "{name}" : secret "{s_name}" not found',
                )
            files.extend(
                _items_files(_secret_data(sec or {}), ref.get("items"), mode, f'secret "{s_name}"', optional)
            )
        elif "downwardAPI" in s:
            files.extend(_downward_files(pod, s["downwardAPI"].get("items") or [], mode, node))
        elif "serviceAccountToken" in s:
            tok = fetched.tokens.get(token_key(name, idx))
            if tok is None:
                raise SetupError(
                    "FailedMount", f'MountVolume.SetUp failed for volume "{name}" : no service account token'
                )
            files.append(
                FileContent(_safe_rel(s["serviceAccountToken"].get("path", "token")), tok.encode(), mode)
            )
        else:
            kinds = sorted(s)
            raise SetupError(
                "FailedMount", f'volume "{name}": unsupported projected source {kinds} on the process node'
            )
    return VolumePlan(name, "projected", vdir, read_only=True, files=tuple(files))


# ---------------------------------------------------------------------------
# containers


def container_mounts(
    container: Obj, volumes: Mapping[str, VolumePlan], env: Mapping[str, str], termination_file: str
) -> tuple[Mount, ...]:
    """Bind mounts for one container, parents before children (sorted by depth, stable)."""
    mounts: list[Mount] = []
    for vm in container.get("volumeMounts") or []:
        vname = vm.get("name", "")
        vol = volumes.get(vname)
        if vol is None:
            raise ConfigError(
                f'cannot find volume "{vname}" to mount into container "{container.get("name")}"'
            )
        source = vol.host_path
        sub = vm.get("subPath") or ""
        if vm.get("subPathExpr"):
            sub = expand(str(vm["subPathExpr"]), env.get)
        if sub:
            norm = posixpath.normpath(sub)
            if norm.startswith("/") or norm == ".." or norm.startswith("../"):
                raise ConfigError(f"subPath {sub!r} must be a relative path inside the volume")
            source = posixpath.join(source, norm)
        target = posixpath.normpath(str(vm.get("mountPath", "")))
        mounts.append(Mount(source, target, bool(vm.get("readOnly")) or vol.read_only))
    tm_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
    if not any(m.target == tm_path for m in mounts):
        mounts.append(Mount(termination_file, posixpath.normpath(tm_path), False))
    mounts.sort(key=lambda m: 0 if m.target == "/" else m.target.count("/"))
    return tuple(mounts)


def plan_container(
    pod: Obj,
    container: Obj,
    fetched: Fetched,
    volumes: Iterable[VolumePlan],
    node: NodeContext,
    termination_file: str,
) -> ContainerPlan:
    """Everything needed to start one container. Raises ConfigError (CreateContainerConfigError)."""
    name = container.get("name", "")
    sc = {**(pod.get("spec", {}).get("securityContext") or {}), **(container.get("securityContext") or {})}
    run_as_user = sc.get("runAsUser") if node.enforce_run_as_user else None
    run_as_group = sc.get("runAsGroup") if node.enforce_run_as_user else None
    env = finish_env(resolve_env(pod, container, fetched, node), pod, node, run_as_user)
    vol_map = {v.name: v for v in volumes}
    mounts = container_mounts(container, vol_map, env, termination_file)
    command = [expand(str(x), env.get) for x in container.get("command") or []]
    args = [expand(str(x), env.get) for x in container.get("args") or []]
    argv = tuple(command + args)
    start_error = None
    if not argv:
        start_error = (
            "no command specified: the process node runs no image, so there is no ENTRYPOINT/CMD; "
            "set the container's command (or args)"
        )
    kind = container_kind(pod, name)
    return ContainerPlan(
        name=name,
        kind=kind,
        image=str(container.get("image", "")),
        argv=argv,
        env=tuple(sorted(env.items())),
        working_dir=container.get("workingDir") or None,
        mounts=mounts,
        gpus=gpu_limit(container),
        termination_message_path=container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH,
        termination_message_policy=container.get("terminationMessagePolicy") or "File",
        run_as_user=int(run_as_user) if run_as_user is not None else None,
        run_as_group=int(run_as_group) if run_as_group is not None else None,
        resources=dict(container.get("resources") or {}),
        start_error=start_error,
    )
