"""The default InstanceType catalog: DataSphere's published configurations as a Python table.

    python -m dsjobs.instancetypes --write          # regenerate deploy/base/instancetypes.yaml
    python -m dsjobs.instancetypes --check          # fail when it differs
    python -m dsjobs.instancetypes --profile local  # print the dev-cluster catalog (kubectl apply -f -)

Two profiles from one table:
- `base` (deploy/base/instancetypes.yaml): requests equal limits, so a job's container gets the whole
  machine shape it asked for, as on DataSphere. (The pod's QoS class is Burstable all the same: the
  runner's containers have a small request and no CPU limit, DSJOBS_RUNNER_*.)
- `local`: the same shapes with cpu and memory *requests* divided by 16 (limits unchanged, GPUs
  unchanged since extended resources need requests == limits), so the dev cluster's CPU node
  (16 CPU / 64Gi) runs several c1.4 jobs and its GPU node (32 CPU / 128Gi / 8 GPU) runs g1.1 and g2.1
  side by side. Jobs still see the advertised shape as their limits. g2.mig asks for one whole
  nvidia.com/gpu there (the dev GPU node has no MIG slices).
"""

from __future__ import annotations

import argparse
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
GPU_TAINT: Final = Toleration(key="nvidia.com/gpu", operator="Equal", value="present", effect="NoSchedule")

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


def instance_type_spec(entry: CatalogEntry, profile: Profile = "base") -> InstanceTypeSpec:
    """The InstanceType spec of one catalog entry in a profile."""
    limits: dict[str, str] = {"cpu": str(entry.vcpu), "memory": f"{entry.memory_gib}Gi"}
    requests = dict(limits)
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
# dsjobs.dev/node-pool=gpu and tolerate the taint nvidia.com/gpu=present:NoSchedule. g2.mig asks for
# one `nvidia.com/mig-1g.10gb` (NVIDIA GPU operator, `mixed` MIG strategy); with the `single`
# strategy, override it to request nvidia.com/gpu on the MIG-partitioned nodes.
"""
_PROFILE_TEXT: Final[dict[Profile, str]] = {
    "base": "requests equal limits (the job's container gets the whole shape; the pod is Burstable, "
    "as the runner's containers request less than their limits).",
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
