"""The ProjectJob spec: everything proto JobParameters carries, plus the job's bookkeeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, cast

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from dsjobs.models.base import CRModel, Duration, cel, field, kept_once_set, never_reset, optional_pattern
from dsjobs.models.files import File, FileDesc
from dsjobs.models.limits import (
    DEFAULT_DATA_TTL,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_SHUTDOWN_SIGNAL,
    DOCKER_REFERENCE_PATTERN,
    HOST_PORT_PATTERN,
    INFINITE_TTL,
    INSTANCE_TYPE_NAME_PATTERN,
    MAX_ATTEMPTS,
    MAX_BACKOFF_SECONDS,
    MAX_CMD_LENGTH,
    MAX_CONFIG_LENGTH,
    MAX_DESC_LENGTH,
    MAX_ENV_VALUE_LENGTH,
    MAX_ENV_VARS,
    MAX_LIST_ITEMS,
    MAX_NAME_LENGTH,
    MAX_REQUIREMENTS,
    MAX_SHORT_STRING,
    MAX_USER_ID_LENGTH,
    MAX_WORKING_STORAGE_GB,
    MIN_WORKING_STORAGE_GB,
    NO_CONTROL_CHARS_PATTERN,
    PYTHON_VERSION_PATTERN,
    RESOURCE_ID_PATTERN,
    SECRET_KEY_PATTERN,
    SECRET_NAME_PATTERN,
    SHUTDOWN_SIGNALS,
    TEXT_PATTERN,
    URL_PATTERN,
    VAR_PATTERN,
)
from dsjobs.syntax import ESCAPING_PATH_PATTERN, SHELL_SPECIAL_ENV

ResourceId = Annotated[str, Field(json_schema_extra={"pattern": RESOURCE_ID_PATTERN, "maxLength": 63})]
Url = Annotated[str, Field(json_schema_extra={"pattern": URL_PATTERN, "maxLength": MAX_SHORT_STRING})]
HostPort = Annotated[str, Field(json_schema_extra={"pattern": HOST_PORT_PATTERN, "maxLength": 259})]
Requirement = Annotated[
    str, Field(json_schema_extra={"maxLength": MAX_SHORT_STRING, "pattern": NO_CONTROL_CHARS_PATTERN})
]
EnvValue = Annotated[str, Field(json_schema_extra={"maxLength": MAX_ENV_VALUE_LENGTH})]
LabelValue = Annotated[str, Field(json_schema_extra={"maxLength": 63})]

# CEL for what the schema alone cannot say: a path without a var is where the file lives, so it
# must stay inside the working directory. `dsjobs.validation` says the same with field paths.
# (A CEL raw string: the RE2 pattern's backslashes stay as they are.)
_RELATIVE = "!{p}.matches(r'" + ESCAPING_PATH_PATTERN + "')"
# On each entry rather than the list, with the entry's path as fieldPath, so that the API
# server's error names the field (`spec.jobParameters.outputFiles[2].path`).
# `var` is a CEL reserved word: its field is `__var__` in a rule. The plain name compiles only
# from Kubernetes 1.32 (compatibility version 1.31); before that the whole CRD was refused.
_INPUT_PATH_RULE = "(has(self.desc.__var__) && self.desc.__var__ != '') || " + _RELATIVE.format(
    p="self.desc.path"
)
_OUTPUT_PATH_RULE = "(has(self.__var__) && self.__var__ != '') || " + _RELATIVE.format(p="self.path")
_PATHS_MESSAGE = (
    "a path without var must be relative to the working directory: no leading '/' or '\\', no drive "
    "like 'C:', no '..' segment ('/' and '\\' both separate segments) [path-absolute, path-parent]"
)


class SecretKeyRef(CRModel):
    """A key of a Secret in the job's namespace."""

    name: str = field("Name of the Secret.", maxLength=253, pattern=SECRET_NAME_PATTERN)
    key: str = field(
        "Key in the Secret's data; `password` when unset.",
        "password",
        maxLength=253,
        pattern=SECRET_KEY_PATTERN,
    )


class DockerImageSpec(CRModel):
    """A docker image by URL with optional registry credentials (proto DockerImageSpec)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            "!(has(self.passwordSecretRef) && has(self.passwordDsSecretName))",
            "passwordSecretRef and passwordDsSecretName are mutually exclusive [docker-password-oneof]",
        )
    )

    image_url: str = field(
        "Image reference (distribution reference grammar), e.g. `cr.example.com/team/image:1.2`.",
        maxLength=512,
        minLength=1,
        pattern=DOCKER_REFERENCE_PATTERN,
    )
    username: str = field("Registry user name; empty for anonymous pulls.", "", maxLength=MAX_SHORT_STRING)
    password_secret_ref: SecretKeyRef | None = field(
        "Secret key holding the registry password. The API never stores proto `password_plain_text` in "
        "the resource: it moves the password into a Secret owned by the job and puts the reference here. "
        "Users applying a ProjectJob directly create the Secret themselves, in the job's namespace and "
        "labelled `dsjobs.dev/secret-role=registry-password` (the operator reads no other Secret).",
        None,
    )
    password_ds_secret_name: str | None = field(
        "Name of the project secret holding the registry password (proto `password_ds_secret_name`): a "
        "key of the Secret dsjobs-project-secrets in the job's namespace, so letters, digits, '-', '_' "
        "and '.'.",
        None,
        maxLength=253,
        minLength=1,
        pattern=SECRET_KEY_PATTERN,
    )


class PipOptions(CRModel):
    """Options for pip when the Python environment is built (proto PipOptions)."""

    index_url: str = field(
        "Base URL of the package index; empty for the default.",
        "",
        maxLength=MAX_SHORT_STRING,
        pattern=optional_pattern(URL_PATTERN),
    )
    extra_index_urls: list[Url] = field("Extra package index URLs.", [], maxItems=MAX_LIST_ITEMS)
    trusted_hosts: list[HostPort] = field(
        "Hosts (host or host:port) pip trusts without valid HTTPS.", [], maxItems=MAX_LIST_ITEMS
    )
    no_deps: bool = field("Install the requirements without their dependencies.", False)


class PythonEnv(CRModel):
    """A Python environment the job runs in (proto PythonEnv)."""

    conda_yaml: str = field("Conda environment YAML; empty for none.", "", maxLength=MAX_CONFIG_LENGTH)
    local_modules: list[File] = field(
        "Zipped local Python modules, unpacked onto the module path. Their `desc.path` is a temporary "
        "name on the client and carries no meaning; `desc.var` is `_LOCAL_MODULE_<i>`.",
        [],
        maxItems=MAX_LIST_ITEMS,
    )
    python_version: str = field(
        "Interpreter version: `3`, `3.11` or `3.11.4`; empty for the server's default.",
        "",
        maxLength=16,
        pattern=optional_pattern(PYTHON_VERSION_PATTERN),
    )
    requirements: list[Requirement] = field(
        "pip requirement lines, e.g. `numpy==2.1.0`.", [], maxItems=MAX_REQUIREMENTS
    )
    pip_options: PipOptions | None = field("pip options.", None)


class Environment(CRModel):
    """Environment of the job's process (proto Environment)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            "!(has(self.dockerImageResourceId) && has(self.dockerImageSpec))",
            "dockerImageResourceId and dockerImageSpec are mutually exclusive [docker-oneof]",
        )
    )

    vars: dict[str, EnvValue] = field(
        "Environment variables. Names are C identifiers; DS_PROJECT_HOME, JOB_PROGRESS_FILENAME and "
        "names starting with DSJOBS_ are set by the server and may not be given, nor the shell's own "
        f"variables ({', '.join(sorted(SHELL_SPECIAL_ENV))}).",
        {},
        maxProperties=MAX_ENV_VARS,
    )
    docker_image_resource_id: str | None = field(
        "Id of a docker image resource of the project (exclusive with dockerImageSpec).",
        None,
        maxLength=63,
        pattern=RESOURCE_ID_PATTERN,
    )
    docker_image_spec: DockerImageSpec | None = field(
        "Docker image by URL (exclusive with dockerImageResourceId).", None
    )
    python_env: PythonEnv | None = field("Python environment to build for the job.", None)


class CloudInstanceType(CRModel):
    """A reference to an InstanceType (proto CloudInstanceType)."""

    name: str = field(
        "Name of a cluster InstanceType, e.g. `c1.4` or `g2.1`.",
        maxLength=63,
        pattern=INSTANCE_TYPE_NAME_PATTERN,
    )


class StorageType(StrEnum):
    """Kind of extended working storage (proto ExtendedWorkingStorage.StorageType)."""

    SSD = "SSD"


class ExtendedWorkingStorage(CRModel):
    """A bigger working directory than the node's system disk (proto ExtendedWorkingStorage)."""

    type: StorageType = field("Storage kind; only SSD.", StorageType.SSD)
    size_gb: int = field(
        f"Size in GB, {MIN_WORKING_STORAGE_GB} to {MAX_WORKING_STORAGE_GB}; the volume claims as many GiB.",
        minimum=MIN_WORKING_STORAGE_GB,
        maximum=MAX_WORKING_STORAGE_GB,
    )


class Argument(CRModel):
    """A named value `cmd` refers to as `${name}` (proto Argument)."""

    name: str = field("Argument name (a variable name).", maxLength=50, pattern=VAR_PATTERN)
    value: str = field("Value substituted for `${name}`.", "", maxLength=MAX_CMD_LENGTH)


class OutputDatasetDesc(CRModel):
    """A dataset the job creates from a directory it fills (proto OutputDatasetDesc)."""

    name: str = field("Dataset name, unique within the job.", maxLength=MAX_NAME_LENGTH, minLength=1)
    description: str = field("Dataset description.", "", maxLength=MAX_DESC_LENGTH, pattern=TEXT_PATTERN)
    labels: dict[str, LabelValue] = field("Dataset labels.", {}, maxProperties=64)
    size_gb: int = field(
        "Dataset size in GiB (the claim asks for at least 1).", 0, minimum=0, maximum=MAX_WORKING_STORAGE_GB
    )
    var: str = field(
        "Variable `cmd` uses as `${var}` for the dataset's directory.", maxLength=50, pattern=VAR_PATTERN
    )


class GracefulShutdownParameters(CRModel):
    """How a cancelled job is stopped (proto GracefulShutdownParameters)."""

    timeout: Duration | None = field(
        "Time between the signal and SIGKILL (e.g. `30s`), 1s to 1h (`infinity` is refused); the "
        "server's default (30s) when unset.",
        None,
    )
    signal: int = field(
        "Signal number sent first: 15 SIGTERM (default), 2 SIGINT, 1 SIGHUP, 10 SIGUSR1, 12 SIGUSR2 "
        "(the API reads the proto's unset 0 as SIGTERM).",
        DEFAULT_SHUTDOWN_SIGNAL,
        enum=sorted(SHUTDOWN_SIGNALS.values()),
    )


class SparkParameters(CRModel):
    """Spark connector of the job (proto SparkParameters)."""

    connector_id: str = field(
        "Id of the Spark connector: the Secret `dsjobs-spark-<id>` of the namespace holds its config.",
        "",
        maxLength=63,
        pattern=optional_pattern(RESOURCE_ID_PATTERN),
    )


class JobParameters(CRModel):
    """What to run and with what (proto JobParameters, field for field)."""

    input_files: list[
        Annotated[
            File, Field(json_schema_extra=cel(_INPUT_PATH_RULE, _PATHS_MESSAGE, field_path=".desc.path"))
        ]
    ] = field(
        "Files uploaded by the client before the job runs, placed at `desc.path` (or at a server-chosen "
        "location named by `${desc.var}`).",
        [],
        maxItems=MAX_LIST_ITEMS,
    )
    output_files: list[
        Annotated[
            FileDesc, Field(json_schema_extra=cel(_OUTPUT_PATH_RULE, _PATHS_MESSAGE, field_path=".path"))
        ]
    ] = field(
        "Files the job writes; they are uploaded after it ends.",
        [],
        maxItems=MAX_LIST_ITEMS,
    )
    s3_mount_ids: list[ResourceId] = field(
        "S3 mounts (PVCs labelled `dsjobs.dev/s3-mount-id`) mounted at /job/s3/<id>; `cmd` refers to them "
        "as `${<id>}`.",
        [],
        maxItems=MAX_LIST_ITEMS,
    )
    dataset_ids: list[ResourceId] = field(
        "Datasets (PVCs labelled `dsjobs.dev/dataset-id`) mounted read-only; `cmd` refers to them as `${<id>}`.",
        [],
        maxItems=MAX_LIST_ITEMS,
    )
    cmd: str = field(
        "Shell command line of the job; `${var}` references are replaced before it runs.",
        minLength=1,
        maxLength=MAX_CMD_LENGTH,
    )
    env: Environment | None = field("Environment: variables, docker image, Python environment.", None)
    attach_project_disk: bool = field(
        "Mount the project disk (PVC labelled `dsjobs.dev/project-disk=true`); its path is in DS_PROJECT_HOME.",
        False,
    )
    cloud_instance_types: list[CloudInstanceType] = field(
        "Instance types by priority: the job runs on the first one with capacity. Empty means `c1.4`.",
        [],
        maxItems=MAX_LIST_ITEMS,
    )
    extended_working_storage: ExtendedWorkingStorage | None = field(
        "Working directory on a dedicated volume instead of the node's disk.", None
    )
    arguments: list[Argument] = field("Named values substituted into `cmd`.", [], maxItems=MAX_LIST_ITEMS)
    output_datasets: list[OutputDatasetDesc] = field(
        "Datasets the job creates: it writes each to `${var}`; they are published when it succeeds.",
        [],
        maxItems=MAX_LIST_ITEMS,
    )
    graceful_shutdown_parameters: GracefulShutdownParameters | None = field(
        "Signal and timeout for cancellation; without it a cancelled job is killed at once.", None
    )
    spark_parameters: SparkParameters | None = field("Spark connector.", None)

    def docker_image(self) -> DockerImageSpec | None:
        """The docker image the job names by URL (with its registry credentials), if any."""
        return self.env.docker_image_spec if self.env is not None else None

    def instance_type_names(self) -> list[str]:
        """The instance types by priority; an empty list means the default type (c1.4)."""
        return [t.name for t in self.cloud_instance_types] or [DEFAULT_INSTANCE_TYPE]


def _utc_if_naive(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# A time written by hand (`kubectl patch`) without a zone, which the CRD's date-time format may let
# through: read as UTC rather than making the whole spec unreadable, which ends a running job.
LenientDatetime = Annotated[datetime, AfterValidator(_utc_if_naive)]


def _none_if_unreadable(value: Any, handler: ValidatorFunctionWrapHandler) -> datetime | None:
    try:
        return cast(datetime | None, handler(value))
    except ValidationError:
        return None


# A time the CRD's date-time format lets through that is no time (year 0, `+99:99`, trailing
# text): read as unknown. The field only informs; unreadable, it made the whole spec unreadable,
# and a graceful cancel written by hand ended the job ERROR with its program killed.
InformativeDatetime = Annotated[LenientDatetime | None, WrapValidator(_none_if_unreadable)]


class CancelRequest(CRModel):
    """A request to cancel the job (CancelProjectJob, or set by hand)."""

    reason: str = field("Why the job is cancelled.", "", maxLength=MAX_DESC_LENGTH, pattern=TEXT_PATTERN)
    graceful: bool = field(
        "Send the graceful-shutdown signal and wait its timeout before killing; otherwise kill at once.",
        False,
    )
    requested_at: InformativeDatetime = field(
        "When the cancellation was requested (a time without a zone is read as UTC, one that is no "
        "time as unknown).",
        None,
    )


class RetryPolicy(CRModel):
    """Extension (not in DataSphere): run the job again after a failure."""

    max_attempts: int = field(
        f"Attempts in total, including the first (1 to {MAX_ATTEMPTS}); 1 when unset.",
        1,
        minimum=1,
        maximum=MAX_ATTEMPTS,
    )
    backoff_seconds: int = field(
        f"Seconds to wait before the next attempt (0 to {MAX_BACKOFF_SECONDS}); 10 when unset.",
        10,
        minimum=0,
        maximum=MAX_BACKOFF_SECONDS,
    )
    retry_on_exit_codes: list[int] = field(
        "Non-zero exit codes of the job that are worth another attempt. Failures of the infrastructure "
        "(pod evicted, node lost) are always retried while attempts remain.",
        [],
        maxItems=32,
        # Checked at apply too: the policy may be edited after the start, when no validation runs.
        items={"type": "integer", "minimum": 1, "maximum": 255},
    )


class ProjectJobSpec(CRModel):
    """Desired state of a ProjectJob. The resource's name is the job id."""

    # As a Job's pod template: a retry or a fallback pod must run what the first one ran, and the
    # operator counts references to the inputs (shared by sha256) from what the job was executed with.
    model_config = ConfigDict(
        json_schema_extra=cel(
            "!has(oldSelf.execute) || !oldSelf.execute || self.jobParameters == oldSelf.jobParameters",
            "jobParameters cannot change once execute is true: to run something else, create a new job "
            "(with kubectl: apply it under a new name, or kubectl create it with metadata.generateName; "
            "with the API: clone this one), or delete this job first",
            # Nor its config text: up to 256 Ki characters each up to 6 bytes once stored (`<` is
            # \u003c), an edit could make the job too large for etcd, and every status write of
            # the running job then failed with it.
            {
                "rule": "!has(oldSelf.execute) || !oldSelf.execute || "
                "(has(self.config) ? self.config : '') == (has(oldSelf.config) ? oldSelf.config : '')",
                "message": "config cannot change once execute is true (it is the job's own config, as "
                "it was run)",
                "fieldPath": ".config",
            },
            # Who created the job and what it was cloned from are facts, not settings.
            kept_once_set("createdById"),
            kept_once_set("parentJobId"),
            never_reset("execute"),
            never_reset("clearData"),
            never_reset("finalized"),
            # A cancel is one-way: the pod is being deleted whatever the spec says next (a cancel
            # removed during a graceful shutdown once made the operator kill it with 1 s, losing the
            # checkpoint's upload). Its fields may change: `graceful: false` is the API's second
            # Cancel, which turns a graceful cancel into a forced one.
            {
                "rule": "!has(oldSelf.cancel) || has(self.cancel)",
                "message": "cancel cannot be removed once set (a cancel is one-way; to force a graceful "
                "cancel, set cancel.graceful to false)",
                "fieldPath": ".cancel",
            },
            # Nor may a forced cancel become graceful again: the pod may already be going with 1 s.
            {
                "rule": "!has(oldSelf.cancel) || (has(oldSelf.cancel.graceful) && oldSelf.cancel.graceful) "
                "|| !has(self.cancel) || !has(self.cancel.graceful) || !self.cancel.graceful",
                "message": "cancel.graceful cannot go from false to true: a forced cancel stays forced",
                "fieldPath": ".cancel.graceful",
            },
            field_path=".jobParameters",
        )
    )

    project_id: str = field(
        "Project the job belongs to: the `dsjobs.dev/project-id` label of the job's namespace "
        "(the admission policy projectjobs-in-their-project checks it). Immutable.",
        maxLength=63,
        pattern=RESOURCE_ID_PATTERN,
        **cel("self == oldSelf", "projectId is immutable"),
    )
    name: str = field("Job name.", "", maxLength=MAX_NAME_LENGTH)
    desc: str = field("Job description.", "", maxLength=MAX_DESC_LENGTH, pattern=TEXT_PATTERN)
    config: str = field(
        "The job's config YAML as the user wrote it. Fixed once execute is true, as jobParameters.",
        "",
        maxLength=MAX_CONFIG_LENGTH,
    )
    data_ttl: Duration = field(
        "How long the job's data (inputs, outputs, logs) is kept after it ends (a job never executed: "
        "after its creation), e.g. `14d` (default), `36h`; `infinity` keeps it forever. 1h to 365d: a job "
        "with one out of range does not start (InvalidSpec); one set out of range after the start is not "
        "used (condition DataTtlValid=False).",
        DEFAULT_DATA_TTL,
    )
    created_by_id: str = field(
        "Id of the subject that created the job: the API sets it to its caller; anyone else may name "
        "only themselves (the admission policy projectjobs-created-by-their-creator checks it). Only "
        "this user gets the job's output paths back as written. Cannot change once set.",
        "",
        maxLength=MAX_USER_ID_LENGTH,
    )
    parent_job_id: str = field(
        "Job this one was cloned from (CloneProjectJob). Cannot change once set.", "", maxLength=253
    )
    job_parameters: JobParameters = field(
        "What to run and with what. Fixed once execute is true (a new job or a clone runs something else); "
        "before, only the job's creator (createdById) may change them (the admission policy "
        "projectjobs-created-by-their-creator checks it)."
    )
    execute: bool = field(
        "Run the job. The API creates jobs with false until the client has uploaded the inputs "
        "(ExecuteProjectJob sets it); set it to true when applying a ProjectJob by hand. It cannot be reset.",
        False,
    )
    cancel: CancelRequest | None = field(
        "Set to cancel the job (CancelProjectJob): one-way, it cannot be removed once set, and "
        "cancel.graceful may only go from true to false (a forced cancel stays forced). A job that "
        "already finished stays as it ended; one that never started never starts.",
        None,
    )
    clear_data: bool = field(
        "Delete the job's stored data now (DeleteProjectJobData); status.dataCleared tells when done "
        "(condition DataCleared). It cannot be reset or removed.",
        False,
    )
    finalized: bool = field(
        "The client has fetched the finished job's results (FinalizeProjectJob, a dsjobs extension): the "
        "operator deletes its pod and Secrets at once instead of after the operator's finished-pod "
        "retention (condition Finalized). Stored data stays until the data TTL. Acts once the job has "
        "finished; it cannot be reset.",
        False,
    )
    retry_policy: RetryPolicy | None = field("Extension: retry after failures. One attempt when unset.", None)


def data_ttl_is_infinite(ttl: timedelta) -> bool:
    """Whether a data TTL means "keep forever"."""
    return ttl == INFINITE_TTL
