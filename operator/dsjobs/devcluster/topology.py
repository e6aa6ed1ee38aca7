"""The dev cluster's nodes: the default topology and loading one from a file.

File format (YAML or JSON)::

    nodes:
      - name: cpu-0
        cpu: 16
        memory: 64Gi
        pods: 110
        labels: {dsjobs.dev/node-pool: cpu}
      - name: gpu-0
        cpu: 32
        memory: 128Gi
        gpus: 8
        labels: {dsjobs.dev/node-pool: gpu}
        taints: ["nvidia.com/gpu=present:NoSchedule"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsjobs.quantity import QuantityError, parse_quantity

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TAINT = re.compile(
    r"^(?P<key>[^=:]+)(=(?P<value>[^:]*))?:(?P<effect>NoSchedule|PreferNoSchedule|NoExecute)$"
)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    cpu: str = "16"
    memory: str = "64Gi"
    pods: int = 110
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = ()  # "key=value:Effect"

    def agent_args(self) -> list[str]:
        """The resource/label/taint part of the node agent's command line."""
        args = ["--cpu", self.cpu, "--memory", self.memory, "--pods", str(self.pods)]
        if self.gpus:
            args += ["--gpus", str(self.gpus)]
        for k, v in self.labels.items():
            args += ["--label", f"{k}={v}"]
        for t in self.taints:
            args += ["--taint", t]
        return args


GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"


def default_topology() -> list[NodeSpec]:
    return [
        NodeSpec(
            name="cpu-0",
            cpu="16",
            memory="64Gi",
            pods=110,
            labels={"dsjobs.dev/node-pool": "cpu"},
        ),
        NodeSpec(
            name="gpu-0",
            cpu="32",
            memory="128Gi",
            pods=110,
            gpus=8,
            labels={
                "dsjobs.dev/node-pool": "gpu",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
            },
            taints=("nvidia.com/gpu=present:NoSchedule",),
        ),
    ]


class TopologyError(ValueError):
    pass


def _node_from(raw: Any, index: int) -> NodeSpec:
    where = f"nodes[{index}]"
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected a mapping")
    unknown = set(raw) - {"name", "cpu", "memory", "pods", "gpus", "labels", "taints"}
    if unknown:
        raise TopologyError(f"{where}: unknown keys {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 63:
        raise TopologyError(f"{where}: name must be a DNS label, got {name!r}")
    cpu, memory = str(raw.get("cpu", "16")), str(raw.get("memory", "64Gi"))
    for key, val in (("cpu", cpu), ("memory", memory)):
        try:
            positive = parse_quantity(val) > 0
        except QuantityError:
            raise TopologyError(f"{where}.{key}: not a Kubernetes quantity: {val!r}") from None
        if not positive:
            raise TopologyError(f"{where}.{key}: must be positive, got {val!r}")
    pods, gpus = raw.get("pods", 110), raw.get("gpus", 0)
    if not isinstance(pods, int) or pods < 1:
        raise TopologyError(f"{where}.pods: expected a positive integer")
    if not isinstance(gpus, int) or gpus < 0:
        raise TopologyError(f"{where}.gpus: expected a non-negative integer")
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        raise TopologyError(f"{where}.labels: expected a mapping")
    taints = raw.get("taints") or []
    if not isinstance(taints, list) or not all(isinstance(t, str) and _TAINT.match(t) for t in taints):
        raise TopologyError(f"{where}.taints: expected a list of 'key=value:Effect'")
    return NodeSpec(
        name=name,
        cpu=cpu,
        memory=memory,
        pods=pods,
        gpus=gpus,
        labels={str(k): str(v) for k, v in labels.items()},
        taints=tuple(taints),
    )


def load_topology(path: Path | str) -> list[NodeSpec]:
    """Read a topology file; YAML is a superset of JSON, so one parser reads both."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise TopologyError(f"{path}: expected a mapping with a 'nodes' list")
    nodes = [_node_from(n, i) for i, n in enumerate(data["nodes"])]
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise TopologyError(f"{path}: duplicate node names")
    return nodes
