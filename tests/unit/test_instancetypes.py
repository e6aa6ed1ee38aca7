"""The default InstanceType catalog (deploy/base/instancetypes.yaml) and its local profile."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from dsjobs import instancetypes as it
from dsjobs.controller.settings import OperatorSettings
from dsjobs.devcluster.topology import default_topology
from dsjobs.models import InstanceTypeSpec, parse_quantity
from dsjobs.validation import validate_instance_type

REPO = Path(__file__).resolve().parents[2]

# Published shapes: (vCPU, GPUs, RAM GiB).
PUBLISHED = {
    "c1.4": (4, 0, 32),
    "c1.8": (8, 0, 64),
    "c1.32": (32, 0, 256),
    "c1.80": (80, 0, 640),
    "g1.1": (8, 1, 48),
    "g1.2": (16, 2, 96),
    "g1.4": (32, 4, 192),
    "g2.mig": (4, 1, 32),
    "g2.1": (28, 1, 119),
    "g2.2": (56, 2, 238),
    "g2.4": (112, 4, 476),
    "g2.8": (224, 8, 952),
}
# The dev cluster's nodes, as its topology declares them: CPU node and GPU node.
_NODES = {n.name: n for n in default_topology()}
CPU_NODE = {"cpu": parse_quantity(_NODES["cpu-0"].cpu), "memory": parse_quantity(_NODES["cpu-0"].memory)}
GPU_NODE = {
    "cpu": parse_quantity(_NODES["gpu-0"].cpu),
    "memory": parse_quantity(_NODES["gpu-0"].memory),
    "nvidia.com/gpu": Fraction(_NODES["gpu-0"].gpus),
}


def test_committed_catalog_is_generated() -> None:
    assert (REPO / "deploy/base/instancetypes.yaml").read_text() == it.render_catalog_yaml("base")
    assert it.main(["--check"]) == 0


def test_catalog_has_the_published_shapes() -> None:
    docs = list(yaml.safe_load_all(it.render_catalog_yaml("base")))
    assert [d["metadata"]["name"] for d in docs] == list(PUBLISHED)
    for doc in docs:
        spec = InstanceTypeSpec.model_validate(doc["spec"])
        vcpu, gpus, ram = PUBLISHED[doc["metadata"]["name"]]
        assert (spec.vcpu, spec.gpus, spec.memory) == (vcpu, gpus, f"{ram}Gi")
        assert doc["apiVersion"] == "dsjobs.dev/v1alpha1" and doc["kind"] == "InstanceType"
        assert validate_instance_type(doc["metadata"]["name"], spec) == []


@pytest.mark.parametrize("profile", it.PROFILES)
def test_placement(profile: it.Profile) -> None:
    for entry in it.CATALOG:
        spec = it.instance_type_spec(entry, profile)
        if entry.name.startswith("c1."):
            assert spec.node_selector == {} and spec.tolerations == []
        else:
            assert spec.node_selector == {"dsjobs.dev/node-pool": "gpu"}
            assert [t.to_cr() for t in spec.tolerations] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
            resource = "nvidia.com/gpu" if profile == "local" else entry.gpu_resource
            gpu = spec.resources.limits[resource]
            assert gpu == spec.resources.requests[resource] == str(entry.gpus)
    mig = it.instance_type_spec(next(e for e in it.CATALOG if e.name == "g2.mig"), profile)
    slice_, whole = "nvidia.com/mig-1g.10gb", "nvidia.com/gpu"
    if profile == "base":
        assert slice_ in mig.resources.requests and whole not in mig.resources.requests
    else:  # the dev GPU node has no MIG slices
        assert whole in mig.resources.requests and slice_ not in mig.resources.requests


def _gke_allocatable(cpus: int, gib: int) -> tuple[Fraction, Fraction]:
    """A GKE node's allocatable CPUs and bytes (cloud.google.com/kubernetes-engine/docs/concepts/
    plan-node-sizes), eviction threshold included."""
    cores = [Fraction(6, 100), Fraction(1, 100), Fraction(5, 1000), Fraction(5, 1000)]
    cpu = sum(cores[:cpus], Fraction(0)) + Fraction(25, 10000) * max(cpus - 4, 0)
    mem, left = Fraction(0), Fraction(gib)
    for size, share in ((4, "0.25"), (4, "0.2"), (8, "0.1"), (112, "0.06"), (10**9, "0.02")):
        part = min(left, size)
        mem, left = mem + part * Fraction(share), left - part
    return cpus - cpu, (gib - mem) * 2**30 - 100 * 2**20


def _eks_allocatable(cpus: int, gib: int) -> tuple[Fraction, Fraction]:
    """An EKS AL2023 node's: the same CPU reserve; memory 255Mi + 11Mi per pod (110), eviction."""
    cpu, _ = _gke_allocatable(cpus, gib)
    return cpu, Fraction(gib * 2**30) - (255 + 11 * 110 + 100) * 2**20


# What a node's DaemonSets usually request (CNI, kube-proxy, CSI node plugin, log agent; the NVIDIA
# device plugin and DCGM exporter on GPU nodes).
DAEMONSETS_CPU, DAEMONSETS_MEMORY = Fraction(3, 10), Fraction(700 * 2**20)


@pytest.mark.parametrize("allocatable", [_gke_allocatable, _eks_allocatable], ids=["gke", "eks"])
def test_a_node_of_the_type_s_own_shape_hosts_its_job(
    allocatable: Callable[..., tuple[Fraction, Fraction]],
) -> None:
    # Requests equal to limits never fitted: a g1.1 waited for ever on the one-V100 8-vCPU machines
    # (p3.2xlarge, n1-standard-8 + V100), or an autoscaler bought a bigger, 4-GPU one.
    settings = OperatorSettings()
    runner_cpu, runner_memory = (
        parse_quantity(settings.runner_cpu_request),
        parse_quantity(settings.runner_memory_request),
    )
    for entry in it.CATALOG:
        spec = it.instance_type_spec(entry)
        # The job may use the whole shape; GPUs are asked for whole.
        assert (spec.resources.limits["cpu"], spec.resources.limits["memory"]) == (
            str(entry.vcpu),
            f"{entry.memory_gib}Gi",
        )
        cpu, memory = allocatable(entry.vcpu, entry.memory_gib)
        # The pod: the job's container and the ship sidecar (stage-in, an init container, asks for
        # as much as ship: the pod's requests are the larger of the two sums).
        pod_cpu = parse_quantity(spec.resources.requests["cpu"]) + runner_cpu
        pod_memory = parse_quantity(spec.resources.requests["memory"]) + runner_memory
        assert pod_cpu <= cpu - DAEMONSETS_CPU, entry.name
        assert pod_memory <= memory - DAEMONSETS_MEMORY, entry.name
        # ... and is guaranteed most of its shape.
        assert pod_cpu >= Fraction(entry.vcpu) * Fraction(85, 100), entry.name
        assert pod_memory >= Fraction(entry.memory_gib * 2**30) * Fraction(85, 100), entry.name


def _fits(spec: InstanceTypeSpec, node: dict[str, Fraction]) -> bool:
    return all(
        name in node and parse_quantity(value) <= node[name]
        for name, value in spec.resources.requests.items()
    )


def test_the_demo_types_schedule_on_the_dev_cluster() -> None:
    local = {e.name: it.instance_type_spec(e, "local") for e in it.CATALOG}
    assert _fits(local["c1.4"], CPU_NODE)
    assert _fits(local["g1.1"], GPU_NODE) and _fits(local["g2.1"], GPU_NODE)
    assert all(
        _fits(local[name], GPU_NODE) for name in local if name.startswith("g") and local[name].gpus == 1
    )
    # g1.1 and g2.1 side by side on the one GPU node
    together = {
        name: sum((parse_quantity(local[t].resources.requests[name]) for t in ("g1.1", "g2.1")), Fraction(0))
        for name in ("cpu", "memory", "nvidia.com/gpu")
    }
    assert all(together[name] <= GPU_NODE[name] for name in together)
    # limits still advertise the full shape
    assert local["c1.4"].resources.limits == {"cpu": "4", "memory": "32Gi"}


def test_local_profile_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert it.main(["--profile", "local"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(docs) == len(it.CATALOG)
