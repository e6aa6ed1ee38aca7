"""The default InstanceType catalog: DataSphere's published configurations as a Python table.

    python -m dsjobs.instancetypes --write          # regenerate deploy/base/instancetypes.yaml
    python -m dsjobs.instancetypes --check          # fail when it differs
    python -m dsjobs.instancetypes --profile local  # print the dev-cluster catalog (kubectl apply -f -)

Two profiles from one table:
- `base` (deploy/base/instancetypes.yaml): limits are the machine shape, so a job's container may use
  all of it, as on DataSphere; cpu/memory *requests* are the shape less what a node of exactly that
  shape keeps for itself (`node_reserve`), so the cloud VM of the type's size hosts its job. With
  requests equal to limits no pod fitted such a node (allocatable is capacity less the kubelet's
  reserves, DaemonSets take their part, the runner's containers request more): a g1.1 waited for
  ever on the one-V100 8-vCPU machines, or an autoscaler bought a 4-GPU one. (The pod's QoS class
  is Burstable either way: the runner's containers have no CPU limit, DSJOBS_RUNNER_*.)
- `local`: the same shapes with cpu and memory *requests* divided by 16 (limits unchanged, GPUs
  unchanged since extended resources need requests == limits), so the dev cluster's CPU node
  (16 CPU / 64Gi) runs several c1.4 jobs and its GPU node (32 CPU / 128Gi / 8 GPU) runs g1.1 and g2.1
  side by side. Jobs still see the advertised shape as their limits. g2.mig asks for one whole
  nvidia.com/gpu there (the dev GPU node has no MIG slices).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from dsjobs.models import API_VERSION, INSTANCETYPE_KIND, InstanceTypeSpec, ResourceRequirements, Toleration

Profile = Literal["base", "local"]
PROFILES: Final[tuple[Profile, ...]] = ("base", "local")
LOCAL_REQUEST_DIVISOR: Final = 16
# DataSphere: "without working-storage the working directory is on the system disk (~20 GB)".
SYSTEM_DISK: Final = "20Gi"

NODE_POOL_LABEL: Final = "dsjobs.dev/node-pool"
GPU_POOL: Final = "gpu"
GPU_RESOURCE: Final = "nvidia.com/gpu"
# g2.mig is 1/8 of an A100 80GB: with the NVIDIA GPU operator's `mixed` MIG strategy a node
# advertises each 1g.10gb slice as this extended resource. Clusters using the `single` strategy
# (slices advertised as nvidia.com/gpu) should override g2.mig's resources and nodeSelector.
MIG_RESOURCE: Final = "nvidia.com/mig-1g.10gb"
# Any value: GKE taints its GPU nodes nvidia.com/gpu=present, EKS setups often =true or none.
GPU_TAINT: Final = Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_CATALOG_PATH = REPO_ROOT / "deploy" / "base" / "instancetypes.yaml"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    vcpu: int
    memory_gib: int
    gpus: int = 0
    gpu_model: str = ""
    gpu_resource: str = GPU_RESOURCE

    @property
    def is_gpu(self) -> bool:
        return self.gpus > 0


# vCPU and GPU counts: DataSphere's public instance-type table. RAM is not in that table; these are
# the figures of DataSphere's public pricing page (GB taken as GiB).
CATALOG: Final[tuple[CatalogEntry, ...]] = (
    CatalogEntry("c1.4", 4, 32),
    CatalogEntry("c1.8", 8, 64),
    CatalogEntry("c1.32", 32, 256),
    CatalogEntry("c1.80", 80, 640),
    CatalogEntry("g1.1", 8, 48, 1, "NVIDIA V100"),
    CatalogEntry("g1.2", 16, 96, 2, "NVIDIA V100"),
    CatalogEntry("g1.4", 32, 192, 4, "NVIDIA V100"),
    CatalogEntry("g2.mig", 4, 32, 1, "NVIDIA A100 (1/8, MIG 1g.10gb)", MIG_RESOURCE),
    CatalogEntry("g2.1", 28, 119, 1, "NVIDIA A100"),
    CatalogEntry("g2.2", 56, 238, 2, "NVIDIA A100"),
    CatalogEntry("g2.4", 112, 476, 4, "NVIDIA A100"),
    CatalogEntry("g2.8", 224, 952, 8, "NVIDIA A100"),
)


def _describe(entry: CatalogEntry) -> str:
    text = f"{entry.vcpu} vCPU, {entry.memory_gib} GiB RAM"
    if entry.is_gpu:
        text += f", {entry.gpus} x {entry.gpu_model}"
    return text


#: What a node's DaemonSets (network, proxy, device plugin, log and metric agents) and the job's
#: runner containers are given room for, over the kubelet's reserves: millicores, MiB.
DAEMONS_CPU_M: Final = 400
DAEMONS_MEMORY_MI: Final = 1024
#: The kubelet's default hard eviction threshold (memory.available<100Mi).
EVICTION_MEMORY_MI: Final = 100


def _tiered(amount: float, tiers: tuple[tuple[float, float], ...], rest: float) -> float:
    """Sum of `share * part` over consecutive parts of `amount` (each tier: size, share)."""
    total, left = 0.0, amount
    for size, share in tiers:
        part = min(left, size)
        total, left = total + part * share, left - part
    return total + max(left, 0) * rest


def node_reserve(vcpu: int, memory_gib: int) -> tuple[int, int]:
    """What a node of `vcpu` CPUs and `memory_gib` GiB keeps from its pods' requests, in millicores
    and MiB: the kubelet's reserves as GKE sets them (the largest of the big clouds': CPU 6% of the
    first core, 1% of the second, 0.5% of the next two, 0.25% above; memory 25% of the first 4 GiB,
    20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above), the eviction threshold,
    and DAEMONS_*."""
    cpu = _tiered(vcpu * 1000, ((1000, 0.06), (1000, 0.01), (2000, 0.005)), 0.0025)
    memory = _tiered(memory_gib * 1024, ((4096, 0.25), (4096, 0.2), (8192, 0.1), (114688, 0.06)), 0.02)
    return math.ceil(cpu) + DAEMONS_CPU_M, math.ceil(memory) + EVICTION_MEMORY_MI + DAEMONS_MEMORY_MI


def instance_type_spec(entry: CatalogEntry, profile: Profile = "base") -> InstanceTypeSpec:
    """The InstanceType spec of one catalog entry in a profile."""
    limits: dict[str, str] = {"cpu": str(entry.vcpu), "memory": f"{entry.memory_gib}Gi"}
    cpu_reserve, memory_reserve = node_reserve(entry.vcpu, entry.memory_gib)
    requests = {
        "cpu": f"{entry.vcpu * 1000 - cpu_reserve}m",
        "memory": f"{entry.memory_gib * 1024 - memory_reserve}Mi",
    }
    if profile == "local":
        requests["cpu"] = f"{entry.vcpu * 1000 // LOCAL_REQUEST_DIVISOR}m"
        requests["memory"] = f"{entry.memory_gib * 1024 // LOCAL_REQUEST_DIVISOR}Mi"
    if entry.is_gpu:
        # The dev cluster's GPU node has whole fake GPUs, no MIG slices: g2.mig takes one there.
        resource = GPU_RESOURCE if profile == "local" else entry.gpu_resource
        limits[resource] = requests[resource] = str(entry.gpus)
    return InstanceTypeSpec(
        vcpu=entry.vcpu,
        memory=f"{entry.memory_gib}Gi",
        gpus=entry.gpus,
        gpu_model=entry.gpu_model,
        description=_describe(entry),
        node_selector={NODE_POOL_LABEL: GPU_POOL} if entry.is_gpu else {},
        tolerations=[GPU_TAINT] if entry.is_gpu else [],
        resources=ResourceRequirements(requests=requests, limits=limits),
        schedule_timeout_seconds=60 if profile == "local" else 300,
        working_dir_size_limit=SYSTEM_DISK,
    )


def catalog_objects(profile: Profile = "base") -> list[dict[str, Any]]:
    """The InstanceType resources of the catalog, ready for the API server."""
    return [
        {
            "apiVersion": API_VERSION,
            "kind": INSTANCETYPE_KIND,
            "metadata": {"name": entry.name, "labels": {"app.kubernetes.io/part-of": "dsjobs"}},
            "spec": instance_type_spec(entry, profile).to_cr(),
        }
        for entry in CATALOG
    ]


_HEADER = """\
# Generated by `python -m dsjobs.instancetypes --write{flag}` from dsjobs/instancetypes.py. Do not edit.
#
# DataSphere's published instance types. vCPU and GPU counts come from DataSphere's public docs; RAM
# is not in that table, so these are the figures of its public pricing page (GB read as GiB).
# Profile `{profile}`: {profile_text}
# CPU types (c1.*) need no node label, so they run on any plain node. GPU types select nodes labelled
# dsjobs.dev/node-pool=gpu and tolerate the taint nvidia.com/gpu (any value):NoSchedule. g2.mig asks for
# one `nvidia.com/mig-1g.10gb` (NVIDIA GPU operator, `mixed` MIG strategy); with the `single`
# strategy, override it to request nvidia.com/gpu on the MIG-partitioned nodes.
"""
_PROFILE_TEXT: Final[dict[Profile, str]] = {
    "base": "limits are the shape (the job's container may use all of it); cpu/memory requests\n"
    "# are the shape less what a node of exactly that shape keeps: the kubelet's reserves as GKE sets them,\n"
    "# the eviction threshold, 400m / 1Gi for DaemonSets and the runner (dsjobs.instancetypes.node_reserve),\n"
    "# so the cloud machine of the type's size hosts its job. Requests equal to limits never fit such a node.",
    "local": f"cpu/memory requests are limits / {LOCAL_REQUEST_DIVISOR} so the dev cluster can pack jobs.",
}


def render_catalog_yaml(profile: Profile = "base") -> str:
    """The catalog as a multi-document YAML file."""
    flag = "" if profile == "base" else f" --profile {profile}"
    parts = [_HEADER.format(flag=flag, profile=profile, profile_text=_PROFILE_TEXT[profile])]
    for entry, obj in zip(CATALOG, catalog_objects(profile), strict=True):
        parts.append(f"---\n# {entry.name}: {_describe(entry)}\n")
        parts.append(yaml.safe_dump(obj, sort_keys=False, width=100))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsjobs.instancetypes", description="InstanceType catalog"
    )
    parser.add_argument("--profile", choices=PROFILES, default="base")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {BASE_CATALOG_PATH} (base profile)")
    group.add_argument("--check", action="store_true", help=f"fail when {BASE_CATALOG_PATH} differs")
    args = parser.parse_args(argv)
    text = render_catalog_yaml(args.profile)
    if not (args.write or args.check):
        sys.stdout.write(text)
        return 0
    if args.profile != "base":
        parser.error("--write/--check apply to the committed base profile only")
    if args.check:
        current = BASE_CATALOG_PATH.read_text() if BASE_CATALOG_PATH.exists() else None
        if current != text:
            print(
                f"{BASE_CATALOG_PATH} is out of date: run python -m dsjobs.instancetypes --write",
                file=sys.stderr,
            )
            return 1
        return 0
    BASE_CATALOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    BASE_CATALOG_PATH.write_text(text)
    print(f"wrote {BASE_CATALOG_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
