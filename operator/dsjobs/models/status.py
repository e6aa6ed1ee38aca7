"""The ProjectJob status, written by the operator only (status subresource)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, ConfigDict

from dsjobs.models.base import CRModel, cel, field, optional_pattern
from dsjobs.models.files import CompressionType, FileDesc
from dsjobs.models.limits import (
    INSTANCE_TYPE_NAME_PATTERN,
    MAX_CONDITIONS,
    MAX_DESC_LENGTH,
    MAX_PATH_LENGTH,
    MAX_STATUS_FILES,
    MAX_STRING,
    SHA256_PATTERN,
)
from dsjobs.models.spec import OutputDatasetDesc


class JobPhase(StrEnum):
    """Where the job is (proto JobStatus names; UNSPECIFIED has no phase)."""

    CREATING = "CREATING"  # created, waiting for inputs and the execute request
    PREPARING = "PREPARING"  # execute requested: scheduling, staging inputs, building the environment
    EXECUTING = "EXECUTING"
    UPLOADING_OUTPUT = "UPLOADING_OUTPUT"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_PHASES


FINAL_PHASES = frozenset({JobPhase.SUCCESS, JobPhase.ERROR, JobPhase.CANCELLED})


class Condition(CRModel):
    """A Kubernetes-style condition."""

    type: str = field(
        "Condition type, CamelCase (e.g. `Scheduled`, `Finished`; `Ended` is True once the job "
        "ended, whatever the outcome: what `kubectl wait` waits for).",
        maxLength=316,
        minLength=1,
    )
    status: Literal["True", "False", "Unknown"] = field("True, False or Unknown.")
    reason: str = field("Machine-readable CamelCase reason of the last transition.", "", maxLength=1024)
    message: str = field("Human-readable details.", "", maxLength=32768)
    last_transition_time: AwareDatetime | None = field("When the status last changed.", None)
    observed_generation: int | None = field("The spec generation the condition was set for.", None, minimum=0)


class StoredFile(CRModel):
    """A file the server stored for the job (proto File plus its object key)."""

    desc: FileDesc = field("Path (and var) of the file as the job declared it; the log name for logs.")
    sha256: str = field(
        "SHA-256 of the stored content (64 lowercase hex digits); empty when unknown.",
        "",
        maxLength=64,
        pattern=optional_pattern(SHA256_PATTERN),
    )
    size_bytes: int = field("Size of the stored content in bytes.", 0, minimum=0)
    compression_type: CompressionType = field(
        "ZIP when the server zipped a directory output.", CompressionType.NONE
    )
    key: str = field(
        "Object key in the bucket (`projects/<project>/jobs/<job id>/...`).",
        "",
        maxLength=MAX_PATH_LENGTH + 256,
    )


class FileErrorType(StrEnum):
    """Why a file is missing (proto FileUploadError.ErrorType)."""

    UNSPECIFIED = "UNSPECIFIED"
    UPLOAD_FAILED = "UPLOAD_FAILED"
    NOT_FOUND = "NOT_FOUND"


class FileError(CRModel):
    """An output or log file that could not be stored (proto FileUploadError)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            "!(has(self.outputFileDesc) && has(self.logFileName))",
            "outputFileDesc and logFileName are mutually exclusive",
        )
    )

    output_file_desc: FileDesc | None = field("The output file, for an output.", None)
    log_file_name: str | None = field("The log file name, for a log.", None, maxLength=MAX_PATH_LENGTH)
    description: str = field("What went wrong.", "", maxLength=MAX_DESC_LENGTH)
    type: FileErrorType = field("Kind of failure.", FileErrorType.UNSPECIFIED)


class OutputDataset(CRModel):
    """A dataset the job created (proto OutputDataset)."""

    desc: OutputDatasetDesc = field("The dataset as the job declared it.")
    id: str = field("Id of the created dataset.", "", maxLength=253)


class Progress(CRModel):
    """The last line the job appended to its JOB_PROGRESS_FILENAME (proto JobProgress)."""

    progress: int = field("Percent done, 0 to 100.", 0, minimum=0, maximum=100)
    message: str = field("Progress message.", "", maxLength=MAX_DESC_LENGTH)
    create_time: AwareDatetime | None = field("When the job wrote it.", None)


class ProjectJobStatus(CRModel):
    """Observed state of a ProjectJob."""

    phase: JobPhase | None = field(
        "Job status (proto JobStatus); unset until the operator has seen the job (the API reports CREATING).",
        None,
    )
    conditions: list[Condition] = field(
        "Conditions of the job.",
        [],
        maxItems=MAX_CONDITIONS,
        **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    created_at: AwareDatetime | None = field("When the job was created.", None)
    started_at: AwareDatetime | None = field("When the job's process started (the current attempt).", None)
    finished_at: AwareDatetime | None = field("When the job reached a final phase.", None)
    data_expires_at: AwareDatetime | None = field(
        "When the job's data will be deleted: finishedAt + spec.dataTtl (createdAt + spec.dataTtl for a "
        "job not executed); unset for an infinite TTL and while the job runs.",
        None,
    )
    data_cleared: bool = field("The job's stored data has been deleted.", False)
    return_code: int | None = field("Exit code of the job's process.", None)
    actual_cloud_instance_type: str | None = field(
        "The instance type the job runs (ran) on; while it waits for a node, the type it waits for.",
        None,
        maxLength=63,
        pattern=INSTANCE_TYPE_NAME_PATTERN,
    )
    image: str | None = field(
        "The job container's image as its first attempt resolved it (the default runtime image of its "
        "Python version, a docker image resource): retries and fallbacks run this one, whatever the "
        "operator's settings or the project's images say later.",
        None,
        maxLength=4096,
    )
    output_files: list[StoredFile] = field("Stored output files.", [], maxItems=MAX_STATUS_FILES)
    log_files: list[StoredFile] = field("Stored log files.", [], maxItems=MAX_STATUS_FILES)
    diagnostic_files: list[StoredFile] = field("Stored diagnostic files.", [], maxItems=MAX_STATUS_FILES)
    file_errors: list[FileError] = field(
        "Outputs and logs that could not be stored.", [], maxItems=MAX_STATUS_FILES
    )
    output_datasets: list[OutputDataset] = field("Datasets the job created.", [], maxItems=100)
    status_details: str = field(
        "Human-readable details of the phase (e.g. the error).", "", maxLength=MAX_STRING
    )
    progress: Progress | None = field("Last progress the job reported.", None)
    attempt: int = field("Current attempt, from 1; 0 before the first.", 0, minimum=0)
    pod_name: str = field("Pod of the current attempt.", "", maxLength=253)
    instance_type_index: int = field(
        "Index into spec.jobParameters.cloudInstanceTypes of the type being tried.", 0, minimum=0
    )
    retried_failures: int = field("Failed attempts that spec.retryPolicy gave another one.", 0, minimum=0)
    observed_generation: int | None = field("The spec generation this status reflects.", None, minimum=0)
    data_size_bytes: int = field("Total size of the job's stored data.", 0, minimum=0)
