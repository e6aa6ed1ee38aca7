"""Operator settings: read once from the environment, then passed to the pure core as a value.

Every knob is an environment variable `DSJOBS_*` with a documented default (the tables in
docs/operator.md and docs/configuration.md are `settings_table()` of `SETTINGS_DOC` below; a unit
test compares, so they cannot drift apart).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Final

from dsjobs.quantity import parse_quantity

DEFAULT_RUNNER_IMAGE: Final = "ghcr.io/dsjobs/dsjobs:0.1.0"
# `{version}` is replaced with the job's python_version (or DEFAULT_PYTHON_VERSION).
DEFAULT_PYTHON_IMAGE: Final = "python:{version}-slim"
DEFAULT_PYTHON_VERSION: Final = "3.11"


STORAGE_CREDENTIALS_ENV: Final = "DSJOBS_STORAGE_CREDENTIALS"
PROJECT_CREDENTIALS: Final = "project"
STORAGE_CREDENTIAL_SOURCES: Final = ("operator", PROJECT_CREDENTIALS)


RUNNER_PULL_POLICIES: Final = ("", "Always", "IfNotPresent", "Never")
JOB_POD_SECURITY_LEVELS: Final = ("baseline", "restricted")
_DNS_SUBDOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


_VERSION_TAG: Final = re.compile(r"v?([0-9]+\.[0-9]+\.[0-9]+)")
_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def namespace_problems(namespaces: tuple[str, ...], where: str = "DSJOBS_NAMESPACES") -> list[str]:
    """Names that are no namespace's: Kopf, its namespace observation off, drops a pattern
    (`dsjobs-*`, `!kube-system`) without a word, and the operator then served nothing."""
    return [
        f"{where}={ns!r}: not a namespace name (lowercase letters, digits and '-'; no patterns)"
        for ns in namespaces
        if not _DNS_LABEL.fullmatch(ns)
    ]


def runner_image_skew(image: str, version: str) -> str | None:
    """Why `image` (DSJOBS_RUNNER_IMAGE) looks like another dsjobs version than `version`, the
    operator's own, or None. Only a tag that is a version tells (`dsjobs:0.1.0`); a digest or a
    tag such as `dev` does not. The runner's config and result change with dsjobs: kustomize's
    `images:` rewrites the Deployments' images, not this setting, so an upgrade may leave it behind."""
    if "@" in image:
        return None
    _name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # no tag, or the colon was a registry's port
        return None
    m = _VERSION_TAG.fullmatch(tag)
    if m is None or m.group(1) == version:
        return None
    return (
        f"the runner image {image} is tagged {tag} but this operator is dsjobs {version}: the "
        "runner reads the operator's config and the operator the runner's result, which change "
        "between versions; set DSJOBS_RUNNER_IMAGE to the operator's version"
    )


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator's behaviour depends on besides the cluster's state."""

    runner_image: str = DEFAULT_RUNNER_IMAGE
    # A private registry's pull Secret (in each project namespace) and the pull policy of the
    # runner's containers; empty: none, and Kubernetes' default policy.
    runner_image_pull_secret: str = ""
    runner_image_pull_policy: str = ""
    # imagePullPolicy of a job container whose image the job chose (not the Python runtime image):
    # Always, so that a node checks the job's own credentials against the registry, where with
    # IfNotPresent it would run another project's private image cached by an earlier job.
    job_image_pull_policy: str = "Always"
    python_image: str = DEFAULT_PYTHON_IMAGE
    # Empty: GPU types run python_image too.
    python_gpu_image: str = ""
    default_python_version: str = DEFAULT_PYTHON_VERSION
    # Empty: the whole cluster (ClusterRole). Otherwise only these namespaces are served.
    namespaces: tuple[str, ...] = ()
    # StorageClass of extended working storage (generic ephemeral volumes); empty = cluster default.
    working_storage_class: str = ""
    # The pod's fsGroup for jobs with working storage or output datasets (0: none): the GID that
    # lets the runner (uid/gid 10001) and the job write to a new volume whose root is root's.
    volume_fs_group: int = 0
    # The Pod Security Standard job pods meet: baseline (the job runs as its image's user) or
    # restricted (as job_run_as_user, or the image's non-root user when that is 0).
    job_pod_security: str = "baseline"
    job_run_as_user: int = 1000
    # A job whose image cannot be pulled for this long fails (InvalidImageName fails at once).
    image_pull_timeout_seconds: float = 120.0
    # Extra grace on top of the job's graceful-shutdown timeout so that the ship sidecar can upload
    # the last logs and outputs after the runner has stopped the program: the checkpoint a graceful
    # cancel let the program save (gigabytes) included. As long as an eviction's (the pod's own
    # terminationGracePeriodSeconds margin); a bound only, the pod goes once ship is done.
    shutdown_grace_margin_seconds: int = 300
    # How long a finished job's pod is kept (for `kubectl logs`) before it is deleted. 0 = at once.
    finished_pod_retention_seconds: float = 0.0
    # How long a job new to the operator (no status) whose name holds a stored run waits for its
    # status to be written back before running again over that run: a restore (Velero, kubectl)
    # creates the object first and writes its status a moment later.
    restore_grace_seconds: float = 120.0
    # Requests of the runner's own containers (stage-in, ship); the job's container gets the
    # instance type's resources.
    runner_cpu_request: str = "50m"
    runner_memory_request: str = "64Mi"
    runner_memory_limit: str = "512Mi"
    # Empty: none (CPU limits throttle uploads); a namespace ResourceQuota on limits.cpu needs one.
    runner_cpu_limit: str = ""
    metrics_port: int = 9090
    # 0 disables the liveness endpoint (kopf's /healthz).
    liveness_port: int = 8080
    # Address of the metrics and liveness endpoints: every interface in a pod; loopback where pods
    # share the host's network (the local stack).
    bind_address: str = "0.0.0.0"
    # Upper bound of one timer, so that a long one (e.g. a 14-day data TTL) is re-derived from the
    # status now and then (wall-clock changes) rather than trusted as one long monotonic sleep. Each
    # wake-up of a finished job costs one GET, so not too often: 10k jobs / 6 h = 0.5 GET/s.
    max_requeue_seconds: float = 21600.0
    # At most one status write per job per this many seconds for steps that only observe the pod
    # (no action, no final phase, no new attempt, no cancel); the latest status wins. 0: no pacing.
    status_write_interval_seconds: float = 1.0
    # Kubernetes API calls of the operator in flight at once (Kopf's watches not counted).
    kube_concurrency: int = 64
    # Page size of the initial listing of jobs and pods (0: one request for everything).
    watch_chunk_size: int = 100
    # How long Kopf keeps an idle per-object worker (and the last body it saw) alive.
    worker_idle_seconds: float = 1.0
    # Kubernetes Event reporter name (shows in `kubectl describe pj` as "From").
    event_component: str = "dsjobs-operator"
    # Whose storage credentials the job's runner gets: `operator` (the operator's own, bucket-wide)
    # or `project` (the project namespace's dsjobs-project-storage Secret, limited to the project's prefix).
    storage_credentials: str = "operator"
    # `<namespace>/<name>` of the Lease replicas elect their leader on; empty: no election (one
    # replica, or a process run by hand or by the tests).
    leader_lease: str = ""
    leader_lease_seconds: int = 15
    # How often the job pods are listed against the cache (Operator.resync_pods), for the rare
    # deletion no watch event told and pods that lost their job label.
    pod_resync_seconds: float = 600.0
    # Level of the operator's own loggers (`dsjobs.*`); Kopf's stay at WARNING unless --verbose.
    log_level: str = "INFO"
    # `json` or `text`, as the API's DSJOBS_API_LOG_FORMAT (--log-format wins).
    log_format: str = "json"

    def python_image_for(self, version: str, *, gpu: bool = False) -> str:
        """The default runtime image of a job with a Python env (and of jobs without any image), on
        a GPU instance type when `gpu`."""
        template = (self.python_gpu_image if gpu else "") or self.python_image
        return template.replace("{version}", version or self.default_python_version)


# env name -> (attribute, documentation). Order = order in docs/operator.md and docs/configuration.md.
SETTINGS_DOC: Final[dict[str, tuple[str, str]]] = {
    "DSJOBS_RUNNER_IMAGE": ("runner_image", "Image of the runner's stage-in and ship containers."),
    "DSJOBS_RUNNER_IMAGE_PULL_SECRET": (
        "runner_image_pull_secret",
        "Name of a `kubernetes.io/dockerconfigjson` Secret that pulls the runner image from a private "
        "registry; it must exist in every project namespace (job pods list it in imagePullSecrets). "
        "Kubernetes uses a pod's pull Secrets for all its containers, so the job's image (the user's "
        "choice) can be pulled with it too: scope it to the runner's repository, read-only. Empty: none.",
    ),
    "DSJOBS_RUNNER_IMAGE_PULL_POLICY": (
        "runner_image_pull_policy",
        "imagePullPolicy of the runner's containers: `Always`, `IfNotPresent` or `Never`; empty: "
        "Kubernetes' default (`Always` for a `:latest` or untagged image, else `IfNotPresent`).",
    ),
    "DSJOBS_JOB_IMAGE_PULL_POLICY": (
        "job_image_pull_policy",
        "imagePullPolicy of the job's container when the job names its image (a docker image or a "
        "project's docker image resource): `Always` (the default) makes the node ask the registry, with "
        "the job's own pull credentials, before every start (layers stay cached); with `IfNotPresent` "
        "a job of one project could run another project's private image that a node pulled before "
        "with that project's credentials (the AlwaysPullImages admission plugin is the cluster-wide "
        "way; `IfNotPresent` is then enough). The Python runtime image (DSJOBS_PYTHON_IMAGE) keeps "
        "Kubernetes' default.",
    ),
    "DSJOBS_PYTHON_IMAGE": (
        "python_image",
        "Image of jobs without a docker image; `{version}` becomes the job's python_version.",
    ),
    "DSJOBS_PYTHON_GPU_IMAGE": (
        "python_gpu_image",
        "Image of jobs without a docker image on a GPU instance type (DataSphere's default image has "
        "CUDA and cuDNN; python-slim has neither: TensorFlow falls back to the CPU), `{version}` as "
        "in DSJOBS_PYTHON_IMAGE; a tag without `{version}` runs every job in that image's Python (a "
        "job asking for another version fails its setup, naming both). Empty: DSJOBS_PYTHON_IMAGE.",
    ),
    "DSJOBS_DEFAULT_PYTHON_VERSION": (
        "default_python_version",
        "Python version used for `{version}` when the job names none.",
    ),
    "DSJOBS_NAMESPACES": (
        "namespaces",
        "Comma-separated namespaces to serve; empty serves the whole cluster.",
    ),
    "DSJOBS_WORKING_STORAGE_CLASS": (
        "working_storage_class",
        "StorageClass of extended working storage volumes; empty uses the cluster default.",
    ),
    "DSJOBS_JOB_POD_SECURITY": (
        "job_pod_security",
        "The Pod Security Standard job pods meet: `baseline` (the default: the job's container runs as "
        "its image's user, root in most data-science images) or `restricted`, for project namespaces "
        "that enforce it: the job's container then runs as `DSJOBS_JOB_RUN_AS_USER`, without privilege "
        "escalation or capabilities (no `sudo`, no `apt-get`). The runner's containers meet "
        "`restricted` either way.",
    ),
    "DSJOBS_JOB_RUN_AS_USER": (
        "job_run_as_user",
        "With `DSJOBS_JOB_POD_SECURITY=restricted`: the uid the job's container runs as (its `HOME` is "
        "made writable if the image has none for it); 0 leaves it to the image, which must then name "
        "a non-root numeric USER or the container does not start.",
    ),
    "DSJOBS_VOLUME_FS_GROUP": (
        "volume_fs_group",
        "GID set as the pod's `fsGroup` (`fsGroupChangePolicy: OnRootMismatch`) for jobs with working "
        "storage or output datasets, for StorageClasses whose new volumes have a root only root may "
        "write (block-storage CSI); 10001 is the runner image's group. 0 sets none. The kubelet applies "
        "it to every volume of such a pod whose driver manages ownership, an attached project disk too.",
    ),
    "DSJOBS_IMAGE_PULL_TIMEOUT": (
        "image_pull_timeout_seconds",
        "Seconds a container of a job may keep failing to start for a reason the kubelet retries "
        "(ErrImagePull, ImagePullBackOff, RegistryUnavailable, CreateContainerConfigError, "
        "CreateContainerError, RunContainerError, PreCreateHookError, PreStartHookError) before the job "
        "fails; InvalidImageName and ErrImageNeverPull fail it at once. It counts from the first failure "
        "and the kubelet shows the back-off reason while it pulls again, so give it more than one whole "
        "pull of the biggest image takes.",
    ),
    "DSJOBS_SHUTDOWN_GRACE_MARGIN": (
        "shutdown_grace_margin_seconds",
        "Seconds added to a cancel's graceful-shutdown timeout for the final upload of outputs and "
        "logs (a checkpoint the program saved on the signal included): a bound, the pod goes as soon "
        "as they are stored.",
    ),
    "DSJOBS_FINISHED_POD_RETENTION": (
        "finished_pod_retention_seconds",
        "Seconds a finished job's pod is kept for inspection (Finalize removes it at once); 0 deletes it "
        "as soon as the result is recorded.",
    ),
    "DSJOBS_RESTORE_GRACE": (
        "restore_grace_seconds",
        "Seconds from its creation a job without a status waits, when the object store holds a run "
        "(`result.json`) under its name, for that status to be written back before it runs: a restore "
        "(Velero, `kubectl create` + `kubectl replace --subresource=status`) creates the object first. "
        "Running deletes the stored run's outputs and logs; 0 runs such a job at once.",
    ),
    "DSJOBS_RUNNER_CPU_REQUEST": ("runner_cpu_request", "CPU request of each runner container."),
    "DSJOBS_RUNNER_MEMORY_REQUEST": ("runner_memory_request", "Memory request of each runner container."),
    "DSJOBS_RUNNER_MEMORY_LIMIT": ("runner_memory_limit", "Memory limit of each runner container."),
    "DSJOBS_RUNNER_CPU_LIMIT": (
        "runner_cpu_limit",
        "CPU limit of each runner container; empty for none. Set it where a ResourceQuota on `limits.cpu` "
        'refuses pods whose containers lack one ("must specify limits.cpu for: ship,stage-in").',
    ),
    "DSJOBS_METRICS_PORT": ("metrics_port", "Port of the Prometheus metrics endpoint; 0 disables it."),
    "DSJOBS_LIVENESS_PORT": ("liveness_port", "Port of the liveness endpoint `/healthz`; 0 disables it."),
    "DSJOBS_BIND_ADDRESS": (
        "bind_address",
        "Address the metrics and liveness endpoints listen on: `0.0.0.0` every IPv4 interface, an IPv6 "
        "address such as `::` on IPv6 clusters, `127.0.0.1` loopback only (the local overlay: its pods share "
        "the host's network).",
    ),
    "DSJOBS_MAX_REQUEUE": (
        "max_requeue_seconds",
        "Longest single wait of a timer before the job is looked at again.",
    ),
    "DSJOBS_EVENT_COMPONENT": ("event_component", "Reporting component of the Kubernetes Events."),
    "DSJOBS_STATUS_WRITE_INTERVAL": (
        "status_write_interval_seconds",
        "Seconds between two status writes of one job for what the pod reports on its way (scheduled, "
        "staging, executing, uploading); the latest state wins, the Event tells every phase passed. "
        "Actions, new attempts, cancels and final phases are written at once. 0 writes every change.",
    ),
    "DSJOBS_KUBE_CONCURRENCY": (
        "kube_concurrency",
        "Kubernetes API requests the operator keeps in flight at most (bursts queue behind them).",
    ),
    "DSJOBS_WATCH_CHUNK_SIZE": (
        "watch_chunk_size",
        "Page size of the initial listing of ProjectJobs and pods, and of the operator's listing of "
        "every job before its first data deletion; 0 lists everything in one response (more memory at "
        "start-up; that listing then takes pages of 500).",
    ),
    STORAGE_CREDENTIALS_ENV: (
        "storage_credentials",
        "Storage credentials of the job's runner: `operator` copies the operator's own (bucket-wide) into "
        "each job's runner Secret; `project` takes `accessKey`/`secretKey` of the Secret `dsjobs-project-storage` "
        "in the job's namespace (credentials the admin limited to `projects/<project-id>/`), and a job "
        "whose namespace has none ends ERROR (`StorageCredentials`).",
    ),
    "DSJOBS_LEADER_LEASE": (
        "leader_lease",
        "`<namespace>/<name>` of a coordination.k8s.io Lease: replicas elect one leader on it and the "
        "others stand by (the base deployment: `dsjobs-system/dsjobs-operator`, 2 replicas). Empty: no "
        "election, for a single process.",
    ),
    "DSJOBS_LEADER_LEASE_SECONDS": (
        "leader_lease_seconds",
        "How long a leader's Lease lasts without renewal: a standby takes over that long after the "
        "leader stopped renewing (a released Lease at once); the leader renews every 2/15 of it and "
        "exits when it could not for 2/3 of it.",
    ),
    "DSJOBS_WORKER_IDLE_TIMEOUT": (
        "worker_idle_seconds",
        "Seconds an idle per-object worker (and the object it last saw) is kept; lower saves memory.",
    ),
    "DSJOBS_POD_RESYNC_INTERVAL": (
        "pod_resync_seconds",
        "Seconds between two LISTs of the job pods against the operator's cache: they find a pod deleted "
        "while the pod watch was away, and a pod whose `dsjobs.dev/job-id` label was removed (then "
        "followed by a GET each time, and a Warning Event PodUnlabelled asks for the label back).",
    ),
    "DSJOBS_OPERATOR_LOG_LEVEL": (
        "log_level",
        "Level of the operator's own log lines: `DEBUG`, `INFO`, `WARNING` or `ERROR` (`--verbose` "
        "logs everything, Kopf's per-handler lines included, at DEBUG).",
    ),
    "DSJOBS_OPERATOR_LOG_FORMAT": (
        "log_format",
        "`json` (one object per line, as the API's) or `text`; `--log-format` overrides it.",
    ),
}

LOG_FORMATS: Final = ("json", "text")

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


# The runner containers' resources (SETTINGS_DOC names their fields): Kubernetes quantities, a
# bad one would fail every job's pod; (request, limit) pairs.
RUNNER_RESOURCES: Final = (
    ("DSJOBS_RUNNER_CPU_REQUEST", "DSJOBS_RUNNER_CPU_LIMIT"),
    ("DSJOBS_RUNNER_MEMORY_REQUEST", "DSJOBS_RUNNER_MEMORY_LIMIT"),
)


#: Upper bound of every duration setting.
MAX_SECONDS: Final = 365 * 24 * 3600.0


def _convert(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            value = float(raw)
            # Durations, in seconds: `inf` or a year and more overflowed the datetime arithmetic
            # of every reconcile (the jobs then never finished).
            if not math.isfinite(value) or value < 0 or value > MAX_SECONDS:
                raise ValueError(f"must be a number of seconds from 0 to {MAX_SECONDS:.0f} (a year)")
            return value
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from exc
    return raw.strip()


def settings_from_env(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """The settings, with every `DSJOBS_*` variable of SETTINGS_DOC that is set and non-empty.

    SettingsError names every setting that is wrong, one a line: an operator in a crash loop
    that told one at a time took a rollout per mistake."""
    env = os.environ if environ is None else environ
    defaults = OperatorSettings()
    values: dict[str, object] = {}
    problems: list[str] = []
    for name, (attr, _doc) in SETTINGS_DOC.items():
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[attr] = _convert(name, raw, getattr(defaults, attr))
        except SettingsError as exc:
            problems.append(str(exc))  # the default stands in while the others are checked
    settings = OperatorSettings(**values)  # type: ignore[arg-type]
    if settings.log_level.upper() not in LOG_LEVELS:
        problems.append(
            f"DSJOBS_OPERATOR_LOG_LEVEL={settings.log_level!r}: must be one of " + ", ".join(LOG_LEVELS)
        )
    else:
        settings = replace(settings, log_level=settings.log_level.upper())
    if settings.log_format not in LOG_FORMATS:
        problems.append(
            f"DSJOBS_OPERATOR_LOG_FORMAT={settings.log_format!r}: must be one of " + ", ".join(LOG_FORMATS)
        )
    if settings.storage_credentials not in STORAGE_CREDENTIAL_SOURCES:
        problems.append(
            f"{STORAGE_CREDENTIALS_ENV}={settings.storage_credentials!r}: must be one of "
            + ", ".join(STORAGE_CREDENTIAL_SOURCES)
        )
    if settings.leader_lease:
        from dsjobs.controller.leader import parse_lease_ref

        try:
            parse_lease_ref(settings.leader_lease)
        except ValueError as exc:
            problems.append(f"DSJOBS_LEADER_LEASE={settings.leader_lease!r}: {exc}")
    if settings.pod_resync_seconds < 1:
        problems.append(f"DSJOBS_POD_RESYNC_INTERVAL={settings.pod_resync_seconds}: must be 1 or more")
    if settings.max_requeue_seconds < 1:
        # 0 would wake every job with a timer (its data TTL) in a loop.
        problems.append(f"DSJOBS_MAX_REQUEUE={settings.max_requeue_seconds}: must be 1 or more")
    if not 0 <= settings.shutdown_grace_margin_seconds <= 3600:
        problems.append(
            f"DSJOBS_SHUTDOWN_GRACE_MARGIN={settings.shutdown_grace_margin_seconds}: must be from 0 to 3600"
        )
    if settings.kube_concurrency < 1:
        # 0 made every Kubernetes call wait for ever (an operator up and doing nothing).
        problems.append(f"DSJOBS_KUBE_CONCURRENCY={settings.kube_concurrency}: must be 1 or more")
    if settings.watch_chunk_size < 0:
        problems.append(f"DSJOBS_WATCH_CHUNK_SIZE={settings.watch_chunk_size}: must be 0 or more")
    for env_name, port in (
        ("DSJOBS_METRICS_PORT", settings.metrics_port),
        ("DSJOBS_LIVENESS_PORT", settings.liveness_port),
    ):
        if not 0 <= port <= 65535:
            problems.append(f"{env_name}={port}: must be a port from 0 (off) to 65535")
    if settings.leader_lease_seconds < 3:
        problems.append(f"DSJOBS_LEADER_LEASE_SECONDS={settings.leader_lease_seconds}: must be 3 or more")
    for env_name, policy in (
        ("DSJOBS_RUNNER_IMAGE_PULL_POLICY", settings.runner_image_pull_policy),
        ("DSJOBS_JOB_IMAGE_PULL_POLICY", settings.job_image_pull_policy),
    ):
        if policy not in RUNNER_PULL_POLICIES:
            problems.append(
                f"{env_name}={policy!r}: must be one of " + ", ".join(p for p in RUNNER_PULL_POLICIES if p)
            )
    secret = settings.runner_image_pull_secret
    if secret and not _DNS_SUBDOMAIN.fullmatch(secret):
        problems.append(f"DSJOBS_RUNNER_IMAGE_PULL_SECRET={secret!r}: not a Secret name (DNS-1123 subdomain)")
    if settings.job_pod_security not in JOB_POD_SECURITY_LEVELS:
        problems.append(
            f"DSJOBS_JOB_POD_SECURITY={settings.job_pod_security!r}: must be one of "
            + ", ".join(JOB_POD_SECURITY_LEVELS)
        )
    if settings.job_run_as_user < 0:
        problems.append(f"DSJOBS_JOB_RUN_AS_USER={settings.job_run_as_user}: must not be negative")
    if settings.volume_fs_group < 0:
        problems.append(f"DSJOBS_VOLUME_FS_GROUP={settings.volume_fs_group}: must not be negative")
    for request, limit in RUNNER_RESOURCES:
        amounts: dict[str, Fraction] = {}
        for name in (request, limit):
            value = getattr(settings, SETTINGS_DOC[name][0])
            if value == "" and name == limit:
                continue  # no limit (only the CPU limit defaults to none)
            try:
                amounts[name] = parse_quantity(value)
            except ValueError as exc:
                problems.append(f"{name}={value!r}: {exc}")
        if limit in amounts and request in amounts and amounts[limit] < amounts[request]:
            problems.append(
                f"{limit}={getattr(settings, SETTINGS_DOC[limit][0])!r}: must not be "
                f"less than {request} ({getattr(settings, SETTINGS_DOC[request][0])})"
            )
    problems += namespace_problems(settings.namespaces)
    for name in ("DSJOBS_PYTHON_IMAGE", "DSJOBS_PYTHON_GPU_IMAGE"):
        image = getattr(settings, SETTINGS_DOC[name][0])
        if image and "{version}" not in image and ":" not in image.rsplit("/", 1)[-1]:
            problems.append(f"{name}={image!r}: must contain {{version}} or a tag")
    if problems:
        raise SettingsError("\n".join(problems))
    return settings


def settings_table() -> str:
    """The Markdown table of docs/operator.md's settings reference."""
    defaults = OperatorSettings()
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, (attr, doc) in SETTINGS_DOC.items():
        value = getattr(defaults, attr)
        shown = ",".join(value) if isinstance(value, tuple) else str(value)
        rows.append(f"| `{name}` | {f'`{shown}`' if shown else ''} | {doc} |")
    return "\n".join(rows)
