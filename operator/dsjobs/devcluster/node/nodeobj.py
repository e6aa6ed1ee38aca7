"""Pure builders for the Node object, its status and its Lease."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .podspec import GPU_RESOURCE
from .quantity import parse_quantity

Obj = dict[str, Any]

LEASE_NAMESPACE = "kube-node-lease"
RUNTIME_VERSION = "dsjobs-process://0.1.0"

# Labels NodeRestriction lets a node set on itself within the kubernetes.io / k8s.io namespaces.
_KUBELET_LABELS = {
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "node.kubernetes.io/windows-build",
}
_KUBELET_LABEL_NAMESPACES = ("kubelet.kubernetes.io", "node.kubernetes.io")


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str

    def to_api(self) -> Obj:
        out: Obj = {"key": self.key, "effect": self.effect}
        if self.value:
            out["value"] = self.value
        return out


def parse_taint(text: str) -> Taint:
    """`key=value:Effect` or `key:Effect`, as `kubectl taint` writes them."""
    kv, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not kv:
        raise ValueError(f"taint {text!r}: want key[=value]:NoSchedule|PreferNoSchedule|NoExecute")
    key, _, value = kv.partition("=")
    return Taint(key, value, effect)


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"label {text!r}: want key=value")
    return key, value


def label_allowed_for_node(key: str) -> bool:
    """Whether NodeRestriction admission lets a node set this label on itself."""
    prefix, sep, _ = key.partition("/")
    if not sep:
        return True
    if prefix == "node-restriction.kubernetes.io" or prefix.endswith(".node-restriction.kubernetes.io"):
        return False
    k8s = prefix in ("kubernetes.io", "k8s.io") or prefix.endswith((".kubernetes.io", ".k8s.io"))
    if not k8s:
        return True
    if key in _KUBELET_LABELS:
        return True
    return any(prefix == ns or prefix.endswith("." + ns) for ns in _KUBELET_LABEL_NAMESPACES)


def go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


@dataclass
class NodeSpec:
    name: str
    cpu: str
    memory: str
    pods: int
    gpus: int
    ephemeral_storage: str
    port: int
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[Taint] = field(default_factory=list)

    def validate(self) -> None:
        for value in (self.cpu, self.memory, self.ephemeral_storage):
            parse_quantity(value)  # raises QuantityError naming the offending text


def node_labels(spec: NodeSpec) -> dict[str, str]:
    arch = go_arch()
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": arch,
    }
    labels.update(spec.labels)
    return labels


def node_object(spec: NodeSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": node_labels(spec),
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {"taints": [t.to_api() for t in spec.taints]} if spec.taints else {},
    }


def capacity(spec: NodeSpec) -> dict[str, str]:
    cap = {
        "cpu": spec.cpu,
        "memory": spec.memory,
        "pods": str(spec.pods),
        "ephemeral-storage": spec.ephemeral_storage,
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    }
    if spec.gpus > 0:
        cap[GPU_RESOURCE] = str(spec.gpus)
    return cap


def micro_time(ts: datetime) -> str:
    """metav1.MicroTime's wire format."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_CONDITIONS = (
    # type, healthy status, reason, message
    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
    ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
)


def node_conditions(
    ready: bool, now: datetime, previous: list[Obj], not_ready_message: str = ""
) -> list[Obj]:
    prev = {c.get("type"): c for c in previous}
    out: list[Obj] = []

    def cond(ctype: str, status: str, reason: str, message: str) -> Obj:
        p = prev.get(ctype)
        ltt = p.get("lastTransitionTime") if p and p.get("status") == status else None
        return {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": _time(now),
            "lastTransitionTime": ltt or _time(now),
        }

    for ctype, status, reason, message in _CONDITIONS:
        out.append(cond(ctype, status, reason, message))
    if ready:
        out.append(cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"))
    else:
        out.append(
            cond("Ready", "False", "KubeletNotReady", not_ready_message or "node agent is not running")
        )
    return out


def ready_condition_status(node: Obj) -> str | None:
    """The status ("True", "False", "Unknown") of a Node object's Ready condition, if it has one."""
    for c in (node.get("status") or {}).get("conditions") or ():
        if c.get("type") == "Ready":
            return str(c.get("status"))
    return None


def node_status(
    spec: NodeSpec, info: Mapping[str, str], ready: bool, now: datetime, previous: list[Obj]
) -> Obj:
    cap = capacity(spec)
    return {
        "capacity": cap,
        "allocatable": dict(cap),
        "conditions": node_conditions(ready, now, previous),
        # Only an IP: the API server dials the first preferred address type it finds, and a
        # node name would not resolve.
        "addresses": [{"type": "InternalIP", "address": spec.address}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": spec.port}},
        "nodeInfo": dict(info),
    }


def lease_object(name: str, node_uid: str | None, duration: int, now: datetime) -> Obj:
    meta: Obj = {"name": name, "namespace": LEASE_NAMESPACE}
    if node_uid:
        # As the kubelet: the Lease goes away with its Node.
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {"holderIdentity": name, "leaseDurationSeconds": duration, "renewTime": micro_time(now)},
    }
