"""InstanceType: the cluster-scoped catalog of machine shapes a job can ask for."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from dsjobs.models.base import CRModel, Quantity, field
from dsjobs.models.limits import (
    MAX_DESC_LENGTH,
    MAX_SCHEDULE_TIMEOUT_SECONDS,
    MIN_SCHEDULE_TIMEOUT_SECONDS,
)

LabelValue = Annotated[str, Field(json_schema_extra={"maxLength": 63})]


class Toleration(CRModel):
    """A Kubernetes toleration, copied as is into the job's pod."""

    key: str = field("Taint key; empty with operator Exists tolerates every taint.", "", maxLength=316)
    operator: Literal["Exists", "Equal"] | None = field("Exists or Equal (the default).", None)
    value: str = field("Taint value for operator Equal.", "", maxLength=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = field(
        "Taint effect to tolerate; all effects when unset.", None
    )
    toleration_seconds: int | None = field(
        "For NoExecute: how long the pod stays bound after the taint appears.", None
    )

    @model_serializer(mode="wrap")
    def _without_empty_value(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An empty value is no value to Kubernetes: `operator: Exists` tolerations (the catalog's,
        # the pods') read cleaner without `value: ''`.
        found: dict[str, Any] = handler(self)
        if found.get("value") == "":
            del found["value"]
        return found


class ResourceRequirements(CRModel):
    """Container resources, copied as is into the job's container."""

    requests: dict[str, Quantity] = field(
        "What the scheduler reserves, e.g. `cpu: 4`, `memory: 32Gi`, `nvidia.com/gpu: 1`.",
        {},
        maxProperties=32,
    )
    limits: dict[str, Quantity] = field(
        "What the container may use. Extended resources (GPUs) must have limits equal to requests.",
        {},
        maxProperties=32,
    )


class InstanceTypeSpec(CRModel):
    """A machine shape (the resource's name is the type name, e.g. `g2.1`)."""

    vcpu: int = field("Number of vCPUs the type advertises.", minimum=1, maximum=4096)
    memory: Quantity = field("RAM the type advertises, e.g. `32Gi`.")
    gpus: int = field("Number of GPUs (or GPU partitions) the type advertises.", 0, minimum=0, maximum=64)
    gpu_model: str = field("GPU model, e.g. `NVIDIA V100` or `NVIDIA A100 (1/8 MIG)`.", "", maxLength=256)
    description: str = field("Human-readable description.", "", maxLength=MAX_DESC_LENGTH)
    node_selector: dict[str, LabelValue] = field(
        "Node labels the job's pod requires; empty for any node.", {}, maxProperties=32
    )
    tolerations: list[Toleration] = field("Taints the job's pod tolerates.", [], maxItems=32)
    resources: ResourceRequirements = field("Requests and limits of the job's container.")
    priority_class_name: str = field(
        "PriorityClass of the job's pod; empty for the default.", "", maxLength=253
    )
    schedule_timeout_seconds: int = field(
        "How long a job waits for this type to be scheduled before it falls back to its next type "
        "(on the last type it keeps waiting, with a status detail saying so).",
        300,
        minimum=MIN_SCHEDULE_TIMEOUT_SECONDS,
        maximum=MAX_SCHEDULE_TIMEOUT_SECONDS,
    )
    working_dir_size_limit: Quantity | None = field(
        "The type's system disk (DataSphere: about 20 GB), e.g. `20Gi`: the sizeLimit of the job's "
        "scratch working directory (without extendedWorkingStorage) and of the runner's shared "
        "volume (logs, pip-installed packages); the kubelet evicts a pod that writes more, and the "
        "job ends ERROR (WorkingDirFull). Unset: no limit.",
        None,
    )
    shm_size: Quantity | None = field(
        "Size of the job container's /dev/shm, a memory-backed emptyDir counted in the pod's memory "
        "(PyTorch DataLoader workers, NCCL and multiprocessing pass data through it; a container "
        "runtime's own is 64 MiB). Unset: half the container's memory limit, as a Linux machine's "
        "/dev/shm; `0`: the container runtime's own.",
        None,
    )
