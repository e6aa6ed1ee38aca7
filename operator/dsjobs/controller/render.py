"""PURE: the job's Pod and Secrets from the ProjectJob, its InstanceType and the operator settings.

    render_pod(job, spec, attempt=..., instance_type=..., settings=..., volumes=..., ...) -> dict

The runner's containers and volumes come from `dsjobs.runner.contract.runner_pod_parts`; this
module adds what is the operator's: identity (deterministic name, labels, owner reference), the
instance type (nodeSelector, tolerations, resources, priority class), the user's image and
registry credentials, the PVCs of the project disk / S3 mounts / datasets, and the working
storage. Golden files in tests/unit/golden/{pods,secrets}/ pin the output per feature.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from dsjobs.condaenv import read_conda_env
from dsjobs.controller.names import (
    ATTEMPT_LABEL,
    CLUSTER_AUTOSCALER_SAFE_TO_EVICT_ANNOTATION,
    DATASET_DESCRIPTION_ANNOTATION,
    DATASET_LABEL,
    DATASET_LABELS_ANNOTATION,
    DATASET_NAME_ANNOTATION,
    DEFAULT_CONTAINER_ANNOTATION,
    INSTANCE_TYPE_DIGEST_ANNOTATION,
    INSTANCE_TYPE_INDEX_ANNOTATION,
    INSTANCE_TYPE_LABEL,
    ISTIO_INJECT_LABEL,
    KARPENTER_DO_NOT_DISRUPT_ANNOTATION,
    LINKERD_INJECT_ANNOTATION,
    OUTPUT_DATASET_LABEL,
    PROJECT_DISK_LABEL,
    PROJECT_SECRETS_NAME,
    RUNNER_CONTRACT_ANNOTATION,
    RUNNER_SECRET_ROLE,
    S3_MOUNT_LABEL,
    job_labels,
    output_dataset_claim_name,
    output_dataset_id,
    pod_name,
    registry_secret_name,
    runner_secret_name,
)
from dsjobs.controller.secrets import SPARK_CONFIG_KEY, owned_secret
from dsjobs.controller.settings import OperatorSettings
from dsjobs.models import API_VERSION, PROJECTJOB_KIND, InstanceTypeSpec, ProjectJobSpec, job_relative_path
from dsjobs.models import PythonEnv as PythonEnvSpec
from dsjobs.models.limits import DEFAULT_GRACEFUL_TIMEOUT
from dsjobs.quantity import parse_quantity
from dsjobs.runner.config import (
    ENV_PROJECT_SECRETS,
    Compression,
    GracefulShutdown,
    InputFile,
    LocalModule,
    Mount,
    OutputFile,
    PipOptions,
    PythonEnv,
    RunnerConfig,
)
from dsjobs.runner.contract import JOB_CONTAINER, RUNNER_CONTRACT, config_secret_data, runner_pod_parts

# Where the job sees its mounts (DataSphere mounts S3 connectors at /job/s3/<id>).
S3_MOUNT_ROOT: Final = "/job/s3"
DATASET_ROOT: Final = "/job/datasets"
# Where the job writes the datasets it creates (`${VAR}` of each output dataset).
OUTPUT_DATASET_ROOT: Final = "/job/output-datasets"
PROJECT_DISK_PATH: Final = "/job/project"
# A Spark connector's config, where `datasphere.spark.connect_to_spark()` finds it.
SPARK_CONFIG_DIR: Final = "/job/.spark"
SPARK_CONFIG_ENV: Final = "JOB_DATAPROC_CONNECTION_CONFIG"
SPARK_VOLUME: Final = "dsjobs-spark"
#: The project secrets as files (see ENV_PROJECT_SECRETS).
PROJECT_SECRETS_VOLUME: Final = "dsjobs-project-secrets"
PROJECT_SECRETS_DIR: Final = "/job/.dsjobs-project-secrets"
SHM_VOLUME: Final = "dsjobs-shm"
SHM_PATH: Final = "/dev/shm"
WORK_VOLUME_SOURCE_EMPTY: Final[Mapping[str, Any]] = {"emptyDir": {}}


@dataclass(frozen=True)
class JobRef:
    """Identity of the ProjectJob the objects belong to."""

    name: str
    namespace: str
    uid: str
    project_id: str

    def owner(self) -> dict[str, Any]:
        # controller=true: `kubectl get pods` shows the job as owner. blockOwnerDeletion=false: the
        # finalizer keeps the job until its pods and Secrets are gone anyway, and true would need
        # projectjobs/finalizers update where OwnerReferencesPermissionEnforcement is on.
        return {
            "apiVersion": API_VERSION,
            "kind": PROJECTJOB_KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": False,
        }

    def labels(self) -> dict[str, str]:
        return job_labels(self.project_id, self.name)


@dataclass(frozen=True)
class PvcView:
    """A PersistentVolumeClaim of the project namespace, as far as volume lookup needs it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False

    @classmethod
    def from_pvc(cls, pvc: Mapping[str, Any]) -> PvcView:
        meta = pvc.get("metadata") or {}
        return cls(
            str(meta.get("name", "")), dict(meta.get("labels") or {}), bool(meta.get("deletionTimestamp"))
        )


@dataclass(frozen=True)
class Volumes:
    """Which PVC backs each S3 mount, dataset and the project disk."""

    mount_claims: Mapping[str, str] = field(default_factory=dict)
    project_disk_claim: str | None = None


def pvc_selectors(spec: ProjectJobSpec) -> list[str]:
    """Label selectors that find every PVC the job needs (one LIST each, only for what it uses)."""
    params = spec.job_parameters
    selectors = []
    if params.s3_mount_ids:
        selectors.append(f"{S3_MOUNT_LABEL} in ({','.join(sorted(set(params.s3_mount_ids)))})")
    if params.dataset_ids:
        selectors.append(f"{DATASET_LABEL} in ({','.join(sorted(set(params.dataset_ids)))})")
    if params.attach_project_disk:
        selectors.append(f"{PROJECT_DISK_LABEL}=true")
    return selectors


def resolve_volumes(spec: ProjectJobSpec, pvcs: Sequence[PvcView]) -> tuple[Volumes, list[str]]:
    """Match the job's mounts to PVCs by label: (volumes, what is missing - named for the user).

    Several PVCs with the same label: the first by name wins (deterministic across restarts).
    """
    usable = sorted((p for p in pvcs if not p.deleting), key=lambda p: p.name)
    missing: list[str] = []
    claims: dict[str, str] = {}

    def find(label: str, value: str) -> str | None:
        return next((p.name for p in usable if p.labels.get(label) == value), None)

    def none_found(label: str, value: str) -> str:
        # A claim there but being deleted is told as such: "no claim" sent its owner looking for a
        # label that `kubectl get pvc` shows.
        going = sorted(p.name for p in pvcs if p.deleting and p.labels.get(label) == value)
        if going:
            return f"its PersistentVolumeClaim {going[0]!r} labelled {label}={value} is being deleted"
        return f"no PersistentVolumeClaim labelled {label}={value}"

    params = spec.job_parameters
    for kind, label, ids in (
        ("S3 mount", S3_MOUNT_LABEL, params.s3_mount_ids),
        ("dataset", DATASET_LABEL, params.dataset_ids),
    ):
        for id_ in ids:
            claim = find(label, id_)
            if claim is None:
                missing.append(f"{kind} {id_!r} ({none_found(label, id_)})")
            else:
                claims[id_] = claim
    disk: str | None = None
    if params.attach_project_disk:
        disk = find(PROJECT_DISK_LABEL, "true")
        if disk is None:
            missing.append(f"project disk ({none_found(PROJECT_DISK_LABEL, 'true')})")
    return Volumes(claims, disk), missing


def user_image(
    spec: ProjectJobSpec,
    settings: OperatorSettings,
    docker_images: Mapping[str, str],
    instance_type: InstanceTypeSpec | None = None,
) -> str | None:
    """The job container's image; None when a docker image resource id is unknown.

    Order: docker image by URL, project docker image resource (ConfigMap `dsjobs-docker-images`,
    key = resource id), the default Python image for the job's python_version (the GPU one on a
    GPU `instance_type`).
    """
    env = spec.job_parameters.env
    if env is not None and env.docker_image_spec is not None:
        return env.docker_image_spec.image_url
    if env is not None and env.docker_image_resource_id:
        return docker_images.get(env.docker_image_resource_id)
    version = python_wanted(env.python_env)[0] if env is not None and env.python_env is not None else ""
    return settings.python_image_for(version, gpu=instance_type is not None and _gpu_type(instance_type))


#: A requirements-file line the official CLI sends as a requirement (see runner_config).
NO_DEPS_LINE: Final = "--no-deps"


def python_wanted(pe: PythonEnvSpec) -> tuple[str, list[str]]:
    """The Python version and pip requirements a job's Python env asks for: its own fields, with
    what its conda_yaml adds (validation refused what pip cannot install). Of two versions (validation
    made them agree: 3.11 and 3.11.4) the more precise one: the other does not refuse what it does."""
    conda = read_conda_env(pe.conda_yaml)
    version = max(pe.python_version, conda.python_version, key=lambda v: len(v.split(".")) if v else 0)
    return version, [*pe.requirements, *conda.pip]


def needs_registry_secret(spec: ProjectJobSpec) -> bool:
    image = spec.job_parameters.docker_image()
    return image is not None and (
        image.password_secret_ref is not None or bool(image.password_ds_secret_name)
    )


def runner_config(job: JobRef, spec: ProjectJobSpec, attempt: int) -> RunnerConfig:
    """The runner's input for one attempt (dsjobs.runner.config)."""
    params = spec.job_parameters
    env = params.env
    python_env: PythonEnv | None = None
    local_modules: list[LocalModule] = []
    if env is not None and env.python_env is not None:
        pe = env.python_env
        pip = pe.pip_options
        version, wanted = python_wanted(pe)
        # The official CLI passes a requirements file's `--no-deps` line through as a requirement
        # (its other option lines, --extra-index-url and --trusted-host, pip takes in the file);
        # pip refuses that one there, so it becomes the option.
        requirements = [r for r in wanted if r.strip() != NO_DEPS_LINE]
        no_deps = (pip is not None and pip.no_deps) or len(requirements) != len(wanted)
        python_env = PythonEnv(
            python_version=version or None,
            requirements=requirements,
            pip=PipOptions(
                index_url=pip.index_url or None,
                extra_index_urls=list(pip.extra_index_urls),
                trusted_hosts=list(pip.trusted_hosts),
                no_deps=no_deps,
            )
            if pip is not None
            else PipOptions(no_deps=no_deps),
        )
        local_modules = [
            LocalModule(
                path=m.desc.path,
                var=m.desc.var or None,
                sha256=m.sha256,
                size_bytes=m.size_bytes,
                compression=Compression(m.compression_type.value),
            )
            for m in pe.local_modules
        ]
    graceful: GracefulShutdown | None = None
    gsp = params.graceful_shutdown_parameters
    if gsp is not None:
        # The pod's grace period is computed from the same default (status.graceful_timeout).
        timeout = (gsp.timeout if gsp.timeout is not None else DEFAULT_GRACEFUL_TIMEOUT).total_seconds()
        graceful = GracefulShutdown(signal=gsp.signal or 15, timeout_seconds=timeout)
    return RunnerConfig(
        project_id=spec.project_id,
        job_id=job.name,
        attempt=attempt,
        cmd=params.cmd,
        inputs=[
            InputFile(
                path=job_relative_path(f.desc),
                var=f.desc.var or None,
                sha256=f.sha256,
                size_bytes=f.size_bytes,
                compression=Compression(f.compression_type.value),
            )
            for f in params.input_files
        ],
        local_modules=local_modules,
        outputs=[OutputFile(path=job_relative_path(d), var=d.var or None) for d in params.output_files],
        arguments={a.name: a.value for a in params.arguments},
        s3_mounts=[Mount(id=i, mount_path=f"{S3_MOUNT_ROOT}/{i}") for i in params.s3_mount_ids],
        datasets=[Mount(id=i, mount_path=f"{DATASET_ROOT}/{i}") for i in params.dataset_ids],
        output_datasets=[
            Mount(
                id=output_dataset_id(job.uid, d.var), var=d.var, mount_path=f"{OUTPUT_DATASET_ROOT}/{d.var}"
            )
            for d in params.output_datasets
        ],
        project_disk_path=PROJECT_DISK_PATH if params.attach_project_disk else None,
        env=dict(env.vars) if env is not None else {},
        python_env=python_env,
        graceful_shutdown=graceful,
    )


def runner_secret(
    job: JobRef, config: RunnerConfig, storage_env: Mapping[str, str], *, attempt: int
) -> dict[str, Any]:
    """One Secret per job for the runner: its config (`runner.json`, holds the job's env, which may
    carry project secrets) and the storage credentials (DSJOBS_S3_*), because a pod can only
    reference Secrets of its own namespace. Only the runner's containers mount it."""
    return owned_secret(
        # One per attempt: a Secret is immutable and the config names the attempt.
        name=runner_secret_name(pod_name(job.name, attempt)),
        namespace=job.namespace,
        labels=job.labels(),
        owner=job.owner(),
        role=RUNNER_SECRET_ROLE,
        secret_type="Opaque",
        string_data={**config_secret_data(config), **storage_env},
    )


#: What the API server accepts in one Secret's data: keys and values together.
MAX_SECRET_DATA_BYTES: Final = 1 << 20


def secret_size_problem(secret: Mapping[str, Any], config: RunnerConfig) -> str | None:
    """Why the runner Secret cannot be created (its data over 1 MiB), naming what fills it."""
    # Decoded sizes by arithmetic: this runs before every job's pod, and the data may be 1 MiB.
    size = sum(len(k) + len(v) * 3 // 4 - v[-2:].count("=") for k, v in (secret.get("data") or {}).items())
    if size <= MAX_SECRET_DATA_BYTES:
        return None
    env = sum(len(k.encode()) + len(v.encode()) for k, v in config.env.items())
    return (
        f"the job's runner config needs {size} bytes, more than the {MAX_SECRET_DATA_BYTES} a Secret "
        f"may hold; its environment variables take {env} bytes"
    )


def output_dataset_claims(
    job: JobRef, spec: ProjectJobSpec, settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The claims the job writes its output datasets to, made before its first pod.

    Owned by the job and without the dataset-id label until the job succeeds (then the operator
    publishes them: the label on, the owner reference off). The dataset's name, description and
    labels ride along as annotations: DataSphere's labels need not be valid Kubernetes labels.
    """
    claims: list[dict[str, Any]] = []
    for d in spec.job_parameters.output_datasets:
        dataset_id = output_dataset_id(job.uid, d.var)
        # The official CLI rounds the size down to whole GiB: "500Mb" arrives as 0.
        claim_spec = _claim_spec(max(d.size_gb, 1), settings)
        annotations = {DATASET_NAME_ANNOTATION: d.name}
        if d.description:
            annotations[DATASET_DESCRIPTION_ANNOTATION] = d.description
        if d.labels:
            annotations[DATASET_LABELS_ANNOTATION] = json.dumps(dict(sorted(d.labels.items())))
        claims.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {
                    "name": output_dataset_claim_name(dataset_id),
                    "namespace": job.namespace,
                    "labels": {**job.labels(), OUTPUT_DATASET_LABEL: "true"},
                    "annotations": annotations,
                    "ownerReferences": [job.owner()],
                },
                "spec": claim_spec,
            }
        )
    return claims


def published_dataset_patch(dataset_id: str) -> dict[str, Any]:
    """Turns an output dataset's claim into a dataset other jobs find by id (merge patch)."""
    return {"metadata": {"labels": {DATASET_LABEL: dataset_id}, "ownerReferences": None}}


def working_storage_source(
    spec: ProjectJobSpec, job: JobRef, settings: OperatorSettings, instance_type: InstanceTypeSpec
) -> Mapping[str, Any]:
    """A generic ephemeral volume (a PVC living and dying with the pod) for extended working
    storage; otherwise a scratch emptyDir as big as the instance type's system disk."""
    storage = spec.job_parameters.extended_working_storage
    if storage is None:
        if instance_type.working_dir_size_limit is not None:
            return {"emptyDir": {"sizeLimit": instance_type.working_dir_size_limit}}
        return WORK_VOLUME_SOURCE_EMPTY
    claim_spec = _claim_spec(storage.size_gb, settings)
    return {"ephemeral": {"volumeClaimTemplate": {"metadata": {"labels": job.labels()}, "spec": claim_spec}}}


def _claim_spec(size_gb: int, settings: OperatorSettings) -> dict[str, Any]:
    """A claim of a volume dsjobs provisions (working storage, output datasets)."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": f"{size_gb}Gi"}},
    }
    if settings.working_storage_class:
        spec["storageClassName"] = settings.working_storage_class
    return spec


DEFAULT_CLASS_ANNOTATIONS: Final = (
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
)


def working_storage_class_problem(configured: str, classes: Sequence[Mapping[str, Any]]) -> str | None:
    """Why no volume could ever be provisioned for a job's working storage, or None.

    Without it such a job would wait in PREPARING for good: its claim stays unbound and the
    scheduler only says "unbound immediate PersistentVolumeClaims".
    """
    if configured:
        if any((c.get("metadata") or {}).get("name") == configured for c in classes):
            return None
        return f"working storage: StorageClass {configured!r} (DSJOBS_WORKING_STORAGE_CLASS) does not exist"
    for c in classes:
        annotations = (c.get("metadata") or {}).get("annotations") or {}
        if any(annotations.get(a) == "true" for a in DEFAULT_CLASS_ANNOTATIONS):
            return None
    return (
        "working storage: the cluster has no default StorageClass and DSJOBS_WORKING_STORAGE_CLASS names none"
    )


def _restricted_job_container(run_as_user: int) -> dict[str, Any]:
    """The job container's securityContext under the restricted Pod Security Standard."""
    context: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    if run_as_user:
        context["runAsUser"] = run_as_user
    return context


def job_cpus(instance_type: InstanceTypeSpec) -> int:
    """The CPUs the program is told it has: its CPU limit in whole CPUs, else the vCPUs the type
    advertises (a DataSphere VM has that many; the downward API would give the node's)."""
    limit = parse_quantity(instance_type.resources.limits.get("cpu", 0))
    return math.ceil(limit) if limit > 0 else instance_type.vcpu


def _gpu_type(instance_type: InstanceTypeSpec) -> bool:
    """Whether the type asks for GPUs (any nvidia.com/* resource: whole GPUs or MIG slices)."""
    resources = instance_type.resources
    return instance_type.gpus > 0 or any(
        name.startswith("nvidia.com/") for name in (*resources.requests, *resources.limits)
    )


def shm_size_limit(instance_type: InstanceTypeSpec) -> str | None:
    """The sizeLimit of the job container's /dev/shm, or None to leave it to the container runtime
    (64 MiB there: PyTorch's DataLoader workers die of it with a "Bus error")."""
    if instance_type.shm_size is not None:
        return None if parse_quantity(instance_type.shm_size) <= 0 else instance_type.shm_size
    resources = instance_type.resources
    memory = resources.limits.get("memory") or resources.requests.get("memory") or instance_type.memory
    half = int(parse_quantity(memory) / 2)
    if half <= 0:
        return None
    for suffix, unit in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if half % unit == 0:
            return f"{half // unit}{suffix}"
    return str(half)


def _resources(instance_type: InstanceTypeSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if instance_type.resources.requests:
        resources["requests"] = dict(instance_type.resources.requests)
    if instance_type.resources.limits:
        resources["limits"] = dict(instance_type.resources.limits)
    return resources


#: The InstanceType's fields that its pods are made of (render_pod): a change of any other (its
#: description, the vCPUs it advertises, a field a newer version adds with a default) leaves the
#: pods waiting for a node as they are. `gpus`, `memory` and `vcpu` are read too, only where the
#: resources say nothing (GPU visibility, /dev/shm, DSJOBS_CPUS): left out, as adding them would
#: remake every waiting pod at an upgrade.
_POD_FIELDS: Final = (
    "nodeSelector",
    "tolerations",
    "resources",
    "priorityClassName",
    "workingDirSizeLimit",
    "shmSize",
)
#: Marks a digest of those fields; a digest without it (of the whole spec) is an older operator's.
_POD_DIGEST_PREFIX: Final = "p-"


def _digest(doc: Mapping[str, Any]) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def instance_type_digest(instance_type: InstanceTypeSpec) -> str:
    """Short digest of what of an InstanceType goes into its pods."""
    doc = instance_type.to_cr()
    return _POD_DIGEST_PREFIX + _digest({k: doc[k] for k in _POD_FIELDS if k in doc})


def made_from(digest: str, instance_type: InstanceTypeSpec) -> bool:
    """Whether a pod whose annotation holds `digest` asks what `instance_type` says now."""
    if digest.startswith(_POD_DIGEST_PREFIX):
        return digest == instance_type_digest(instance_type)
    # An older operator digested the whole spec: a pod it made before this upgrade is not made
    # again for the upgrade alone.
    return digest == _digest(instance_type.to_cr())


def render_pod(
    job: JobRef,
    spec: ProjectJobSpec,
    *,
    attempt: int,
    instance_type_name: str,
    instance_type_index: int,
    instance_type: InstanceTypeSpec,
    settings: OperatorSettings,
    volumes: Volumes,
    image: str,
    registry_secret: str | None = None,
    spark_secret: str | None = None,
) -> dict[str, Any]:
    """The pod of one attempt. Pure: same inputs, same pod (byte for byte, see the golden tests)."""
    config = runner_config(job, spec, attempt)
    secret = runner_secret_name(pod_name(job.name, attempt))
    parts = runner_pod_parts(
        config,
        runner_image=settings.runner_image,
        runner_image_pull_policy=settings.runner_image_pull_policy or None,
        user_image=image,
        storage_secret_name=secret,
        config_secret_name=secret,
        storage_delivery="files",
        work_volume_source=working_storage_source(spec, job, settings, instance_type),
        # The logs and pip-installed packages are on the system disk too.
        shared_size_limit=instance_type.working_dir_size_limit,
        mount_claims={
            **volumes.mount_claims,
            **{m.id: output_dataset_claim_name(m.id) for m in config.output_datasets},
        },
        project_disk_claim=volumes.project_disk_claim,
        job_cpus=job_cpus(instance_type),
        runner_resources={
            "requests": {"cpu": settings.runner_cpu_request, "memory": settings.runner_memory_request},
            "limits": {
                "memory": settings.runner_memory_limit,
                **({"cpu": settings.runner_cpu_limit} if settings.runner_cpu_limit else {}),
            },
        },
    )
    main = dict(parts.main)
    main["resources"] = _resources(instance_type)
    env = spec.job_parameters.env
    if (
        settings.job_image_pull_policy
        and env is not None
        and (env.docker_image_spec is not None or env.docker_image_resource_id)
    ):
        main["imagePullPolicy"] = settings.job_image_pull_policy
    # Project secrets become environment variables of the job (as on DataSphere); optional, so a
    # project without secrets needs no Secret. The runner's containers never see them.
    main["envFrom"] = [{"secretRef": {"name": PROJECT_SECRETS_NAME, "optional": True}}]
    # And as files, for the keys that are no shell names (`hf-token`): the entry script passes
    # those on (ENV_PROJECT_SECRETS), which the shells on the way would drop.
    main["volumeMounts"] = [
        *main["volumeMounts"],
        {"name": PROJECT_SECRETS_VOLUME, "mountPath": PROJECT_SECRETS_DIR, "readOnly": True},
    ]
    main["env"] = [*main["env"], {"name": ENV_PROJECT_SECRETS, "value": PROJECT_SECRETS_DIR}]
    pod_volumes = [
        *parts.volumes,
        {
            "name": PROJECT_SECRETS_VOLUME,
            # Readable by the job's user whoever it is: the job's environment holds these anyway.
            "secret": {"secretName": PROJECT_SECRETS_NAME, "optional": True, "defaultMode": 0o444},
        },
    ]
    if spark_secret:
        pod_volumes.append(
            {
                "name": SPARK_VOLUME,
                "secret": {
                    "secretName": spark_secret,
                    "items": [{"key": SPARK_CONFIG_KEY, "path": SPARK_CONFIG_KEY}],
                },
            }
        )
        main["volumeMounts"] = [
            *main["volumeMounts"],
            {"name": SPARK_VOLUME, "mountPath": SPARK_CONFIG_DIR, "readOnly": True},
        ]
        main["env"] = [
            *main["env"],
            {"name": SPARK_CONFIG_ENV, "value": f"{SPARK_CONFIG_DIR}/{SPARK_CONFIG_KEY}"},
        ]
    if not _gpu_type(instance_type):
        # NVIDIA's images set NVIDIA_VISIBLE_DEVICES=all: on a node whose runtime is NVIDIA's, a
        # pod asking no GPU would get every one of them (the device plugin sets it only for pods
        # it gave GPUs).
        main["env"] = [*main["env"], {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}]
    shm = shm_size_limit(instance_type)
    if shm is not None:
        # Memory-backed, so it counts in the pod's memory as on a machine whose /dev/shm is RAM.
        pod_volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        main["volumeMounts"] = [*main["volumeMounts"], {"name": SHM_VOLUME, "mountPath": SHM_PATH}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": parts.restart_policy,
        "automountServiceAccountToken": False,
        # Service links put one variable per Service of the namespace into every container.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": parts.termination_grace_period_seconds,
        "initContainers": list(parts.init_containers),
        "containers": [main, *parts.sidecars],
        "volumes": pod_volumes,
    }
    params = spec.job_parameters
    # The profile `docker run` applies (DataSphere runs jobs in docker); a kubelet's default is none.
    pod_security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if settings.volume_fs_group and (params.extended_working_storage is not None or params.output_datasets):
        # The volumes dsjobs provisions start empty, their root as the StorageClass made it.
        pod_security["fsGroup"] = settings.volume_fs_group
        pod_security["fsGroupChangePolicy"] = "OnRootMismatch"
    pod_spec["securityContext"] = pod_security
    if settings.job_pod_security == "restricted":
        main["securityContext"] = _restricted_job_container(settings.job_run_as_user)
    if instance_type.node_selector:
        pod_spec["nodeSelector"] = dict(instance_type.node_selector)
    if instance_type.tolerations:
        pod_spec["tolerations"] = [t.to_cr() for t in instance_type.tolerations]
    if instance_type.priority_class_name:
        pod_spec["priorityClassName"] = instance_type.priority_class_name
    # The job image's own credentials, and the runner image's (a private registry); with any of
    # them the ServiceAccount's pull secrets are not added (its admission adds them to none).
    pull_secrets = [s for s in (registry_secret, settings.runner_image_pull_secret) if s]
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in pull_secrets]
    labels = {
        **job.labels(),
        ATTEMPT_LABEL: str(attempt),
        INSTANCE_TYPE_LABEL: instance_type_name,
        # A mesh's injected proxy would never exit (the pod would never end), and its token volume
        # is what the dsjobs-service-accounts policy refuses in job pods: no injection.
        ISTIO_INJECT_LABEL: "false",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job.name, attempt),
            "namespace": job.namespace,
            "labels": labels,
            "annotations": {
                INSTANCE_TYPE_INDEX_ANNOTATION: str(instance_type_index),
                INSTANCE_TYPE_DIGEST_ANNOTATION: instance_type_digest(instance_type),
                # `kubectl logs` / `exec` on the pod mean the user's program, not the runner's
                # containers (and say nothing about having picked it).
                DEFAULT_CONTAINER_ANNOTATION: JOB_CONTAINER,
                LINKERD_INJECT_ANNOTATION: "disabled",
                RUNNER_CONTRACT_ANNOTATION: str(RUNNER_CONTRACT),
                # A running job is hours of work a restart would lose: Karpenter's consolidation
                # and the cluster autoscaler's scale-down evicted it to save an idle-ish node.
                KARPENTER_DO_NOT_DISRUPT_ANNOTATION: "true",
                CLUSTER_AUTOSCALER_SAFE_TO_EVICT_ANNOTATION: "false",
            },
            "ownerReferences": [job.owner()],
        },
        "spec": pod_spec,
    }


__all__ = [
    "JobRef",
    "PvcView",
    "Volumes",
    "instance_type_digest",
    "job_cpus",
    "made_from",
    "needs_registry_secret",
    "output_dataset_claims",
    "published_dataset_patch",
    "pvc_selectors",
    "registry_secret_name",
    "render_pod",
    "resolve_volumes",
    "runner_config",
    "runner_secret",
    "shm_size_limit",
    "user_image",
    "working_storage_source",
]
