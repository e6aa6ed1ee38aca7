"""The runner's result: what the operator reads from the ship container's termination message.

The full `RunnerResult` is always stored at ``result_key(project, job)`` (``result.json``). The
termination message (capped at 4 KiB by Kubernetes) carries the same JSON when it fits, else a
`ResultPointer`: the essentials plus where the full result is. `parse_termination_message`
returns whichever it was; `load_result` fetches the stored one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import ClassVar, Literal

from dsjobs.logrecords import Progress
from dsjobs.records import Record
from dsjobs.runner.config import Compression
from dsjobs.storage import ObjectStore, result_key

#: Raw log files uploaded at the end (name in storage / result -> shared-volume file).
LOG_FILE_NAMES = ("stdout.txt", "stderr.txt", "system.log")

#: Kubernetes truncates termination messages beyond this.
TERMINATION_MESSAGE_LIMIT = 4096


class RunnerStatus(StrEnum):
    #: The program ran and exited (``return_code`` set; ``cancelled`` if it was cancelled).
    EXITED = "EXITED"
    #: The entry script failed before starting the program (python version, pip): see ``reason``.
    SETUP_FAILED = "SETUP_FAILED"
    #: Cancelled before the program started.
    CANCELLED = "CANCELLED"
    #: Inputs could not be staged (missing/corrupt input, unsafe zip): see ``reason``.
    STAGE_IN_FAILED = "STAGE_IN_FAILED"
    #: The job container ended without recording an exit status (killed outright, e.g. OOM):
    #: the operator should take the exit code/reason from the job container's state.
    LOST = "LOST"
    #: The ship sidecar was told to stop before the job container ever started.
    NOT_STARTED = "NOT_STARTED"


class FileErrorType(StrEnum):
    NOT_FOUND = "NOT_FOUND"
    UPLOAD_FAILED = "UPLOAD_FAILED"


@dataclass(frozen=True, kw_only=True)
class _Model(Record):
    # A newer runner may report more than this operator knows.
    extra_forbidden: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class OutputResult(_Model):
    #: The declared path (``OutputFile.desc_path`` or ``path``) and var; ``index`` into the config's outputs.
    path: str
    var: str | None = None
    index: int = 0
    key: str
    sha256: str
    size_bytes: int
    compression: Compression = Compression.NONE


@dataclass(frozen=True, kw_only=True)
class FileError(_Model):
    """Maps to DataSphere's FileUploadError: an output (path/var) or a log file (log_file_name)."""

    type: FileErrorType
    description: str
    path: str | None = None
    var: str | None = None
    #: For outputs: the index into the config's outputs.
    index: int | None = None
    log_file_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class LogFileResult(_Model):
    name: str
    key: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, kw_only=True)
class ProgressResult(_Model):
    progress: int
    message: str = ""
    create_time: datetime | None = None

    @classmethod
    def of(cls, p: Progress | None) -> ProgressResult | None:
        if p is None:
            return None
        return cls(progress=p.progress, message=p.message, create_time=p.create_time)


@dataclass(frozen=True, kw_only=True)
class RunnerResult(_Model):
    v: Literal[1] = 1
    project_id: str
    job_id: str
    attempt: int = 0
    status: RunnerStatus
    return_code: int | None = None
    cancelled: bool = False
    reason: str = ""
    #: The object store kept failing (connection trouble, 5xx, timeouts past the runner's
    #: patience): a STAGE_IN_FAILED not because of the inputs, or an attempt whose outputs, logs
    #: or this result could not (all) be stored: an infrastructure failure. None (left out of the
    #: JSON, which an older operator reads as ever) otherwise.
    storage_unavailable: bool | None = None
    outputs: list[OutputResult] = field(default_factory=list)
    file_errors: list[FileError] = field(default_factory=list)
    log_files: list[LogFileResult] = field(default_factory=list)
    #: The resource-usage samples (docker_stats.tsv, gpu_stats.tsv), as the job's diagnostic files.
    diagnostic_files: list[LogFileResult] = field(default_factory=list)
    progress: ProgressResult | None = None
    #: Offset just past the last log record; ``logs_complete`` when the final marker was written.
    log_end_offset: int | None = None
    logs_complete: bool = False
    finished_at: datetime | None = None
    #: Told before the raw log files were uploaded (the outputs' record, should ship be killed
    #: then); the final result follows. None (left out) for the final one.
    provisional: bool | None = None

    def to_json(self, *, exclude_defaults: bool = False, exclude_none: bool = True) -> str:
        return super().to_json(exclude_defaults=exclude_defaults, exclude_none=exclude_none)


@dataclass(frozen=True, kw_only=True)
class ResultPointer(_Model):
    """What the termination message holds when the full result does not fit."""

    v: Literal[1] = 1
    truncated: Literal[True] = True
    result_key: str
    project_id: str
    job_id: str
    attempt: int = 0
    status: RunnerStatus
    return_code: int | None = None
    cancelled: bool = False
    reason: str = ""
    storage_unavailable: bool | None = None
    outputs_count: int = 0
    file_errors_count: int = 0
    provisional: bool | None = None


def termination_message(result: RunnerResult, *, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The full result if it fits in ``limit`` bytes, else a pointer to the stored copy."""
    full = result.to_json()
    if len(full.encode()) <= limit:
        return full
    pointer = ResultPointer(
        result_key=result_key(result.project_id, result.job_id),
        project_id=result.project_id,
        job_id=result.job_id,
        attempt=result.attempt,
        status=result.status,
        return_code=result.return_code,
        cancelled=result.cancelled,
        reason=result.reason[:1024],
        storage_unavailable=result.storage_unavailable,
        outputs_count=len(result.outputs),
        file_errors_count=len(result.file_errors),
        provisional=result.provisional,
    )
    text = pointer.to_json(exclude_none=True)
    if len(text.encode()) > limit:  # only a pathological reason gets here: drop it
        text = pointer.replace(reason="").to_json(exclude_none=True)
    return text


def parse_termination_message(text: str) -> RunnerResult | ResultPointer:
    """Parse the ship container's termination message. ValueError if it is not one of ours."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not a runner termination message: {exc}") from exc
    try:
        if isinstance(data, dict) and data.get("truncated"):
            return ResultPointer.from_dict(data)
        return RunnerResult.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"not a runner termination message: {exc}") from exc


def settled(
    pointer: ResultPointer | None, stored: RunnerResult | None
) -> RunnerResult | ResultPointer | None:
    """The result a termination message's pointer (None: no message) stands for, given the stored
    result.json: the stored one, unless only the provisional result was stored and the final one
    could not be (the store failed at the very end, or ship died writing its message): then that,
    with what a final pointer adds (the store's failure) and the raw log files told as not
    recorded. The pointer alone when nothing was stored."""
    if stored is None:
        return pointer
    if not stored.provisional or (pointer is not None and pointer.provisional):
        return stored
    lost = [
        FileError(
            type=FileErrorType.UPLOAD_FAILED,
            log_file_name=name,
            description="not recorded: the runner's final report (result.json) could not be stored",
        )
        for name in LOG_FILE_NAMES
    ]
    return stored.replace(
        provisional=None,
        storage_unavailable=(pointer is not None and pointer.storage_unavailable)
        or stored.storage_unavailable,
        file_errors=[*stored.file_errors, *lost],
    )


def store_result(store: ObjectStore, result: RunnerResult) -> str:
    key = result_key(result.project_id, result.job_id)
    store.put_bytes(key, result.to_json().encode(), content_type="application/json")
    return key


def load_result(store: ObjectStore, project: str, job: str) -> RunnerResult | None:
    data = store.get_bytes(result_key(project, job))
    return RunnerResult.from_json(data) if data is not None else None
