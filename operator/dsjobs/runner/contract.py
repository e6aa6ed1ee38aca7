"""PURE: the runner's part of a job pod. The operator calls `runner_pod_parts` and adds the rest.

Pod shape (plain containers only: our process-based node runs init containers in order, then all
containers concurrently, and native sidecars are not guaranteed there; on real Kubernetes plain
containers work the same way with ``restartPolicy: Never``)::

    initContainers: [stage-in]          runner image: inputs, modules, entry script (Python), or
                                        for a job with nothing to fetch, dirs + entry script (sh)
    containers:     [job, ship]         job = user image running <shared>/entry.sh; ship = runner image
    volumes:        dsjobs-shared (emptyDir), dsjobs-work (emptyDir or working storage),
                    dsjobs-config (Secret with runner.json), mounts/datasets/project disk PVCs

Storage credentials (the Secret ``storage_secret_name`` with keys ``DSJOBS_S3_*``, as variables
or, with ``storage_delivery="files"``, as files of the config volume) and the runner config reach
only stage-in and ship; the job container gets neither (its environment is exported
by the entry script, so env values - which may be project secrets - are not in the pod spec).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from dsjobs.runner.config import ENV_CONFIG, ENV_CONFIG_FILE, RunnerConfig
from dsjobs.runner.entry import render_entry_script
from dsjobs.storage import (
    ENV_ACCESS_KEY,
    ENV_BUCKET,
    ENV_ENDPOINT,
    ENV_FILES_DIR,
    ENV_PUBLIC_ENDPOINT,
    ENV_REGION,
    ENV_SECRET_KEY,
)

#: The job container's CPU limit, whole CPUs (the entry script's dsjobs_machine_env reads it).
CPUS_ENV = "DSJOBS_CPUS"
SHARED_VOLUME = "dsjobs-shared"
WORK_VOLUME = "dsjobs-work"
CONFIG_VOLUME = "dsjobs-config"
CONFIG_MOUNT_PATH = "/job/.dsjobs-config"
#: What the operator may count on from the runner of a pod it renders, one more for each thing a
#: runner of an earlier build does not do (the pod's dsjobs.dev/runner-contract annotation):
#: 1 (pods without the annotation) the runner config, result and log formats of docs/contracts.md;
#: 2 the ship reads the operator's forced-cancel word and has the program killed at once.
RUNNER_CONTRACT: Final = 2
#: The first contract whose ship reads the forced-cancel word (forced-cancel.json).
FORCED_CANCEL_WORD_CONTRACT: Final = 2
#: Key of the runner config in its Secret.
CONFIG_KEY = "runner.json"
#: Key of the rendered entry script in the same Secret, for a stage-in without Python.
ENTRY_KEY = "entry.sh"
STAGE_IN_CONTAINER = "stage-in"
JOB_CONTAINER = "job"
SHIP_CONTAINER = "ship"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
#: How long the runner's requests ride out an object-storage outage before a job's staging or
#: upload fails: minutes of a restart or a network blip must not cost a job its inputs or the
#: outputs of hours of work.
STORAGE_PATIENCE_SECONDS = 300.0
#: Time the ship sidecar gets after the program ended (outputs, logs) before the kubelet kills it.
DEFAULT_SHIP_MARGIN_SECONDS = 300

DEFAULT_RUNNER_RESOURCES: Mapping[str, Any] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}

Json = dict[str, Any]


@dataclass(frozen=True)
class RunnerPodParts:
    init_containers: list[Json]
    #: The job container without resources (the operator adds them; ``image`` is already set).
    main: Json
    sidecars: list[Json]
    volumes: list[Json]
    termination_grace_period_seconds: int
    restart_policy: str = "Never"

    def pod_spec(self, *, main_resources: Mapping[str, Any] | None = None, **extra: Any) -> Json:
        """Convenience: a complete pod spec (``extra`` adds e.g. nodeSelector, tolerations)."""
        main = dict(self.main)
        if main_resources:
            main["resources"] = dict(main_resources)
        spec: Json = {
            "restartPolicy": self.restart_policy,
            "terminationGracePeriodSeconds": self.termination_grace_period_seconds,
            "initContainers": list(self.init_containers),
            "containers": [main, *self.sidecars],
            "volumes": list(self.volumes),
        }
        spec.update(extra)
        return spec


def _storage_env(secret: str) -> list[Json]:
    env: list[Json] = []
    for key in (ENV_ENDPOINT, ENV_BUCKET, ENV_ACCESS_KEY, ENV_SECRET_KEY, ENV_REGION, ENV_PUBLIC_ENDPOINT):
        ref: Json = {"name": secret, "key": key}
        if key in (ENV_REGION, ENV_PUBLIC_ENDPOINT):
            ref["optional"] = True
        env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


#: Bytes the shell stage-in's script may take: it is one argument of `sh -c`, which Linux limits
#: to 128 KiB (MAX_ARG_STRLEN); a job's output directories, up to 100 of up to 4 KiB, go in it.
MAX_SHELL_STAGE_IN_BYTES: Final = 96 * 1024
#: Bytes the shell stage-in's config Secret may take (a Secret holds 1 MiB): its entry script quotes
#: the job's env values for sh, which makes a value of quotes five times its size.
MAX_SHELL_SECRET_BYTES: Final = 960 * 1024


def stages_in_python(config: RunnerConfig) -> bool:
    """Whether stage-in needs the Python runner: inputs or local modules to fetch, requirements to
    write, or a job too big for the shell's way (its script past one argument's limit, its entry
    script with the env past a Secret's). Otherwise it is a POSIX sh script (`shell_stage_in`): one
    Python start with its imports (~0.15 s of CPU) less per job, for what is a few directories and
    a file copy."""
    return _shell_secret_data(config) is None


def _shell_secret_data(config: RunnerConfig) -> dict[str, str] | None:
    """The config Secret's data for a shell stage-in, or None when the job stages in Python."""
    python_env = config.python_env
    if config.inputs or config.local_modules or (python_env is not None and python_env.requirements):
        return None
    if len(shell_stage_in(config).encode()) > MAX_SHELL_STAGE_IN_BYTES:
        return None
    # The entry script carries the env values; in the config too they would take their room in
    # the Secret (1 MiB in all) twice. Nothing but the entry script's rendering reads them.
    data = {CONFIG_KEY: replace(config, env={}).to_json(), ENTRY_KEY: render_entry_script(config)}
    return data if sum(len(v.encode()) for v in data.values()) <= MAX_SHELL_SECRET_BYTES else None


def shell_stage_in(config: RunnerConfig) -> str:
    """What `stagein.prepare` does, as sh: the directories (new ones world-writable, as the job may
    run as any uid), the shared log files (0666) and the entry script, rendered by the operator
    into the config Secret."""
    q = shlex.quote
    layout_dirs = " ".join(q(str(d)) for d in config.layout.dirs)
    # Sorted and once each: 100 outputs in one deep directory would name it 100 times.
    work_dirs = " ".join(q(str(d)) for d in sorted(set(config.work_dirs())))
    shared_files = " ".join(q(str(f)) for f in config.layout.shared_files)
    entry = q(f"{CONFIG_MOUNT_PATH}/{ENTRY_KEY}")
    return (
        "set -e\n"
        "umask 0\n"
        f"mkdir -p {layout_dirs} {work_dirs}\n"
        f"chmod 0777 {layout_dirs}\n"
        # umask 0: a file created here is 0666, one that exists keeps its mode (as in Python).
        f'for f in {shared_files}; do : >>"$f"; done\n'
        # Without FIFOs (some file system) ship judges by the heartbeat alone, as in Python.
        f"[ -p {q(str(config.layout.alive))} ] || mkfifo {q(str(config.layout.alive))} 2>/dev/null || :\n"
        f"install -m 0755 {entry} {q(str(config.layout.entry_script))}\n"
    )


def config_secret_data(config: RunnerConfig) -> dict[str, str]:
    """The runner's keys of its config Secret: the config, and the entry script when stage-in is a
    shell script (it holds the job's env values, which may be secrets: a Secret, not the pod spec)."""
    return _shell_secret_data(config) or {CONFIG_KEY: config.to_json()}


def runner_config_secret(
    config: RunnerConfig, *, name: str, namespace: str, labels: Mapping[str, str] | None = None
) -> Json:
    """The Secret manifest carrying the runner config (create it before the pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "type": "Opaque",
        "stringData": config_secret_data(config),
    }


def runner_pod_parts(
    config: RunnerConfig,
    *,
    runner_image: str,
    user_image: str,
    storage_secret_name: str,
    config_secret_name: str,
    work_volume_source: Mapping[str, Any] | None = None,
    shared_size_limit: str | None = None,
    mount_claims: Mapping[str, str] | None = None,
    project_disk_claim: str | None = None,
    runner_resources: Mapping[str, Any] | None = None,
    runner_image_pull_policy: str | None = None,
    config_delivery: Literal["volume", "env"] = "volume",
    storage_delivery: Literal["env", "files"] = "env",
    ship_margin_seconds: int = DEFAULT_SHIP_MARGIN_SECONDS,
    job_cpus: int | None = None,
) -> RunnerPodParts:
    """Containers and volumes of a job pod for ``config``.

    ``job_cpus``: the CPUs the program is told it has (``DSJOBS_CPUS``); None: the job container's
    CPU limit, from the downward API (the node's CPUs when it has none).

    ``mount_claims`` maps each S3 mount / dataset / output dataset id to its PVC name (the
    operator finds the first two by label and makes the last); ``project_disk_claim`` is the project disk PVC (needed iff ``project_disk_path``).
    ``work_volume_source`` is the working-storage volume source (default: an emptyDir).
    ``shared_size_limit`` bounds the shared volume (logs, pip-installed packages) as an emptyDir
    ``sizeLimit``.
    ``storage_delivery="files"``: the storage settings are keys of the config Secret (the same
    Secret, delivered as a volume) and the runner reads them from the mounted files: six
    ``secretKeyRef`` variables less per runner container, a pod a third smaller for the API
    server, the scheduler and every pod watcher, and no credentials in the runner's environment.
    """
    if storage_delivery == "files" and (
        config_delivery != "volume" or storage_secret_name != config_secret_name
    ):
        raise ValueError(
            "storage_delivery='files' needs config_delivery='volume' and the storage settings in the "
            f"config Secret (storage_secret_name {storage_secret_name!r} != config_secret_name "
            f"{config_secret_name!r})"
        )
    claims = dict(mount_claims or {})
    shell_stage = config_delivery == "volume" and not stages_in_python(config)
    shared_dir = config.paths.shared_dir
    work_dir = config.paths.work_dir
    layout = config.layout

    volumes: list[Json] = [
        {"name": SHARED_VOLUME, "emptyDir": {"sizeLimit": shared_size_limit} if shared_size_limit else {}},
        {"name": WORK_VOLUME, **(dict(work_volume_source) if work_volume_source else {"emptyDir": {}})},
    ]
    runner_env: list[Json] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if storage_delivery == "files":
        runner_env.append({"name": ENV_FILES_DIR, "value": CONFIG_MOUNT_PATH})
    else:
        runner_env.extend(_storage_env(storage_secret_name))
    runner_mounts: list[Json] = [
        {"name": SHARED_VOLUME, "mountPath": shared_dir},
    ]
    if config_delivery == "volume":
        source: Json = {"secretName": config_secret_name}
        if storage_delivery != "files":
            keys = [CONFIG_KEY, ENTRY_KEY] if shell_stage else [CONFIG_KEY]
            source["items"] = [{"key": k, "path": k} for k in keys]
        volumes.append({"name": CONFIG_VOLUME, "secret": source})
        runner_mounts.append({"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_PATH, "readOnly": True})
        runner_env.append({"name": ENV_CONFIG_FILE, "value": f"{CONFIG_MOUNT_PATH}/{CONFIG_KEY}"})
    elif config_delivery == "env":
        runner_env.append(
            {
                "name": ENV_CONFIG,
                "valueFrom": {"secretKeyRef": {"name": config_secret_name, "key": CONFIG_KEY}},
            }
        )
    else:
        raise ValueError(f"unknown config delivery {config_delivery!r}")

    main_mounts: list[Json] = [
        {"name": SHARED_VOLUME, "mountPath": shared_dir},
        {"name": WORK_VOLUME, "mountPath": work_dir},
    ]
    for kind, mounts, read_only in (
        ("s3", config.s3_mounts, False),
        ("dataset", config.datasets, True),
        ("output-dataset", config.output_datasets, False),
    ):
        for i, m in enumerate(mounts):
            claim = claims.get(m.id)
            if not claim:
                raise ValueError(f"no PersistentVolumeClaim given for {kind} {m.id!r}")
            name = f"dsjobs-{kind}-{i}"
            volumes.append(
                {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
            )
            main_mounts.append({"name": name, "mountPath": m.mount_path, "readOnly": read_only})
    if config.project_disk_path:
        if not project_disk_claim:
            raise ValueError("the job attaches the project disk but no project disk claim was given")
        volumes.append(
            {"name": "dsjobs-project-disk", "persistentVolumeClaim": {"claimName": project_disk_claim}}
        )
        main_mounts.append({"name": "dsjobs-project-disk", "mountPath": config.project_disk_path})

    resources = dict(runner_resources or DEFAULT_RUNNER_RESOURCES)

    def runner_container(name: str, command: str, work_read_only: bool) -> Json:
        c: Json = {
            "name": name,
            "image": runner_image,
            "command": ["python", "-m", "dsjobs.runner", command],
            "env": [dict(e) for e in runner_env],
            "volumeMounts": [
                *[dict(m) for m in runner_mounts],
                {"name": WORK_VOLUME, "mountPath": work_dir, "readOnly": work_read_only},
            ],
            "resources": resources,
            "terminationMessagePath": TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "File",
            # They hold the storage credentials: as little power as the restricted Pod Security
            # Standard allows (the image's user is 10001).
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }
        if runner_image_pull_policy:
            c["imagePullPolicy"] = runner_image_pull_policy
        return c

    main: Json = {
        "name": JOB_CONTAINER,
        "image": user_image,
        "command": ["/bin/sh", str(layout.entry_script)],
        "args": [],
        # The entry script sizes the program's thread pools by it.
        "env": [
            {"name": CPUS_ENV, "value": str(job_cpus)}
            if job_cpus is not None
            # Its CPU limit in whole CPUs (the downward API rounds up; without a limit, the node's).
            else {
                "name": CPUS_ENV,
                "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}},
            }
        ],
        "workingDir": work_dir,
        "volumeMounts": main_mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }

    stage_in = runner_container(STAGE_IN_CONTAINER, "stage-in", False)
    if shell_stage:
        stage_in["command"] = ["/bin/sh", "-c", shell_stage_in(config)]
        # Its errors (mkdir, install) are on stderr: they become the termination message.
        stage_in["terminationMessagePolicy"] = "FallbackToLogsOnError"
    grace = config.graceful_shutdown
    grace_seconds = (math.ceil(grace.timeout_seconds) if grace else 0) + ship_margin_seconds
    return RunnerPodParts(
        init_containers=[stage_in],
        main=main,
        sidecars=[runner_container(SHIP_CONTAINER, "ship", True)],
        volumes=volumes,
        termination_grace_period_seconds=grace_seconds,
    )
