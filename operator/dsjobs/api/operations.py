"""Operations: ids that say what they refer to, and their state derived from a ProjectJob.

Nothing about an operation is stored. Its id encodes the kind, the project, the job and the job's
uid (a job deleted and re-created under the same name is another job), so every replica can
answer OperationService.Get from the ProjectJob alone. This module is pure: the servicer fetches
the job, converts it and presigns URLs, and hands the results in.

Execute operations follow the contract the official CLI relies on: `done=false` until the job is
final; then a program that ran and exited non-zero is a *successful* operation with that
`result.return_code` (the CLI prints "Program returned code N"), while a job that could not run
(or was cancelled) ends the operation with a `google.rpc.Status` error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2  # type: ignore[import-untyped]

from dsjobs.api.errors import quoted
from dsjobs.api.ids import is_job_id, is_resource_id
from dsjobs.controller.names import EXECUTE_REQUESTED_AT
from dsjobs.controller.podview import parse_time
from dsjobs.controller.status import COND_FINISHED, COND_SCHEDULED, data_deletion_begun, data_expiry

# timestamp saturates: a status time near year 1 or 9999 (the CRD lets +-23:59 offsets through)
# must not fail an operation's Get when the job's Get answers.
from dsjobs.convert.common import file_to_proto, timestamp
from dsjobs.convert.job import progress_to_proto
from dsjobs.models import FINAL_PHASES, JobPhase, ProjectJobSpec, ProjectJobStatus
from dsjobs.models.base import read_stored
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.pb.yandex.cloud.operation import operation_pb2
from dsjobs.storage import job_prefix

_PREFIX = "op1"
_SEP = "|"
MAX_OPERATION_ID_LENGTH = 1024


class OpKind(StrEnum):
    CREATE = "create"
    CLONE = "clone"
    EXECUTE = "execute"
    DELETE = "delete"
    DELETE_DATA = "delete-data"
    DELETE_ALL_DATA = "delete-all-data"


_DESCRIPTIONS = {
    OpKind.CREATE: "Create project job",
    OpKind.CLONE: "Clone project job",
    OpKind.EXECUTE: "Execute project job",
    OpKind.DELETE: "Delete project job",
    OpKind.DELETE_DATA: "Delete project job data",
    OpKind.DELETE_ALL_DATA: "Delete all project job data",
}


class OperationIdError(ValueError):
    """Not an operation id this service issued."""


@dataclass(frozen=True)
class OpRef:
    """What an operation id refers to. `job_id`/`job_uid` are empty for project-wide operations."""

    kind: OpKind
    project_id: str
    job_id: str = ""
    job_uid: str = ""

    def encode(self) -> str:
        raw = _SEP.join((self.kind.value, self.project_id, self.job_id, self.job_uid))
        return _PREFIX + base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def decode_op_id(text: str) -> OpRef:
    if not text.startswith(_PREFIX) or len(text) > MAX_OPERATION_ID_LENGTH:
        raise OperationIdError(f"{quoted(text)} is not an operation id of this service")
    body = text[len(_PREFIX) :]
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise OperationIdError(f"{quoted(text)} is not an operation id of this service") from exc
    parts = raw.split(_SEP)
    if len(parts) != 4:
        raise OperationIdError(f"{quoted(text)} is not an operation id of this service")
    kind_text, project_id, job_id, job_uid = parts
    try:
        kind = OpKind(kind_text)
    except ValueError as exc:
        raise OperationIdError(f"{quoted(text)} is not an operation id of this service") from exc
    if not project_id or (kind != OpKind.DELETE_ALL_DATA and not job_id):
        raise OperationIdError(f"{quoted(text)} is not an operation id of this service")
    # Ids of ours only (they become parts of API paths): `.` or `a/b` would name something else.
    if not is_resource_id(project_id) or (job_id and not is_job_id(job_id)):
        raise OperationIdError(f"{quoted(text)} is not an operation id of this service")
    return OpRef(kind, project_id, job_id, job_uid)


# --- the job as the operations see it -----------------------------------------------------------


@dataclass(frozen=True)
class JobSnapshot:
    """A ProjectJob read from the cluster, parsed."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    created_at: datetime
    spec: ProjectJobSpec
    status: ProjectJobStatus
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False

    @classmethod
    def from_cr(cls, obj: Mapping[str, Any]) -> JobSnapshot:
        meta = obj.get("metadata") or {}
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            created_at=parse_time(meta.get("creationTimestamp")) or datetime.now(UTC),
            spec=read_stored(ProjectJobSpec, obj.get("spec") or {}),
            status=read_stored(ProjectJobStatus, obj.get("status") or {}),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
        )

    @property
    def project_id(self) -> str:
        return self.spec.project_id

    @property
    def phase(self) -> JobPhase:
        return self.status.phase or JobPhase.CREATING

    @property
    def is_final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def logs_may_flow(self) -> bool:
        """Whether a runner of the job may be storing log records now: its pod was placed on a
        node (only the pod's ship sidecar writes them), or the job is past waiting for one."""
        if self.phase not in (JobPhase.CREATING, JobPhase.PREPARING):
            return True
        return any(c.type == COND_SCHEDULED and c.status == "True" for c in self.status.conditions)

    @property
    def execute_requested_at(self) -> datetime | None:
        return parse_time(self.annotations.get(EXECUTE_REQUESTED_AT))

    def ref(self, kind: OpKind) -> OpRef:
        return OpRef(kind, self.project_id, self.name, self.uid)


def _latest(*values: datetime | None) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _operation(
    ref: OpRef,
    *,
    created_at: datetime,
    modified_at: datetime | None,
    created_by: str,
    metadata: Message,
    done: bool,
    response: Message | None = None,
    error: status_pb2.Status | None = None,
) -> operation_pb2.Operation:
    op = operation_pb2.Operation(
        id=ref.encode(),
        description=_DESCRIPTIONS[ref.kind],
        created_at=timestamp(created_at),
        created_by=created_by,
        modified_at=timestamp(modified_at or created_at),
        done=done,
    )
    op.metadata.Pack(metadata)
    if done:
        if error is not None:
            op.error.CopyFrom(error)
        else:
            op.response.Pack(response if response is not None else empty_pb2.Empty())
    return op


# --- Create / Clone -----------------------------------------------------------------------------


def create_operation(
    ref: OpRef, job: JobSnapshot, upload_files: Sequence[jobs_pb2.StorageFile]
) -> operation_pb2.Operation:
    """Create and Clone are done as soon as the ProjectJob exists (the API creates it synchronously)."""
    metadata: Message
    response: Message
    if ref.kind == OpKind.CLONE:
        metadata = svc.CloneProjectJobMetadata(project_id=job.project_id, job_id=job.name)
        response = svc.CloneProjectJobResponse(job_id=job.name, upload_files=upload_files)
    else:
        metadata = svc.CreateProjectJobMetadata(project_id=job.project_id, job_id=job.name)
        response = svc.CreateProjectJobResponse(job_id=job.name, upload_files=upload_files)
    return _operation(
        ref,
        created_at=job.created_at,
        modified_at=job.created_at,
        created_by=job.spec.created_by_id,
        metadata=metadata,
        done=True,
        response=response,
    )


# --- Execute ------------------------------------------------------------------------------------

# The operator records how a job ended in its `Finished` condition. These reasons mean the program
# ran and exited (a *result* for the client, whatever the code); any other reason means the job
# never got to run its program to the end (an operation *error*).
FINISHED_CONDITION = COND_FINISHED
PROGRAM_REASONS = frozenset({"Succeeded", "NonZeroExit", "OOMKilled"})

# Error codes of the other reasons, by what the user can do about them.
_FAILURE_CODES: dict[str, grpc.StatusCode] = {
    "InvalidSpec": grpc.StatusCode.INVALID_ARGUMENT,
    "UnknownInstanceType": grpc.StatusCode.FAILED_PRECONDITION,
    "UnknownDockerImage": grpc.StatusCode.FAILED_PRECONDITION,
    # The job's projectId is not its namespace's project: the cluster's setup (or the job's).
    "ProjectMismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "ConfigTooLarge": grpc.StatusCode.FAILED_PRECONDITION,
    "MissingVolume": grpc.StatusCode.FAILED_PRECONDITION,
    "SparkConnector": grpc.StatusCode.FAILED_PRECONDITION,
    "RegistryCredentials": grpc.StatusCode.FAILED_PRECONDITION,
    "DataCleared": grpc.StatusCode.FAILED_PRECONDITION,
    "StorageCredentials": grpc.StatusCode.FAILED_PRECONDITION,
    "StageInFailed": grpc.StatusCode.FAILED_PRECONDITION,
    "SetupFailed": grpc.StatusCode.FAILED_PRECONDITION,
    # The job's own program stopped its entry script before the program ran (during setup).
    "StoppedFromInside": grpc.StatusCode.FAILED_PRECONDITION,
    "InvalidImageName": grpc.StatusCode.FAILED_PRECONDITION,
    "ErrImageNeverPull": grpc.StatusCode.FAILED_PRECONDITION,
    "ErrImagePull": grpc.StatusCode.FAILED_PRECONDITION,
    "ImagePullBackOff": grpc.StatusCode.FAILED_PRECONDITION,
    "RegistryUnavailable": grpc.StatusCode.UNAVAILABLE,
    "StorageUnavailable": grpc.StatusCode.UNAVAILABLE,
    "CreateContainerConfigError": grpc.StatusCode.FAILED_PRECONDITION,
    # The image's or the job's (an entrypoint the runtime cannot start, a hook of the image).
    "CreateContainerError": grpc.StatusCode.FAILED_PRECONDITION,
    "RunContainerError": grpc.StatusCode.FAILED_PRECONDITION,
    "PreCreateHookError": grpc.StatusCode.FAILED_PRECONDITION,
    "PreStartHookError": grpc.StatusCode.FAILED_PRECONDITION,
    # The cluster's policy or setup refused what the job needs: its admins can act on the message.
    "PodRejected": grpc.StatusCode.FAILED_PRECONDITION,
    "WorkingStorageClass": grpc.StatusCode.FAILED_PRECONDITION,
    "AdmissionFailed": grpc.StatusCode.ABORTED,
    "StartError": grpc.StatusCode.FAILED_PRECONDITION,
    "ContainerCannotRun": grpc.StatusCode.FAILED_PRECONDITION,
    "Unschedulable": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "WorkingDirFull": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "OOMKilled": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "Evicted": grpc.StatusCode.ABORTED,
    "Preempted": grpc.StatusCode.ABORTED,
    "NodeLost": grpc.StatusCode.ABORTED,
    # The node or its container runtime restarted under the job: as a lost node.
    "NodeRestarted": grpc.StatusCode.ABORTED,
    "NodeShutdown": grpc.StatusCode.ABORTED,
    "Disrupted": grpc.StatusCode.ABORTED,
    "PodDeleted": grpc.StatusCode.ABORTED,
    "PodStopped": grpc.StatusCode.ABORTED,
}
#: dsjobs' own failures, the only reasons of the operator's that are INTERNAL (by design, not by
#: falling through the table): the runner's sidecar failed, the pod failed for no reason given.
INTERNAL_REASONS: Final = frozenset({"RunnerFailed", "PodFailed"})
# Reasons not in the table (container waiting reasons, future ones): by what they mention.
_FAILURE_HINTS: tuple[tuple[str, grpc.StatusCode], ...] = (
    ("Invalid", grpc.StatusCode.FAILED_PRECONDITION),
    ("Image", grpc.StatusCode.FAILED_PRECONDITION),
    ("Input", grpc.StatusCode.FAILED_PRECONDITION),
    ("Secret", grpc.StatusCode.FAILED_PRECONDITION),
    ("Config", grpc.StatusCode.FAILED_PRECONDITION),
    ("Capacity", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("Quota", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("Timeout", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("Deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
)


@dataclass(frozen=True)
class Outcome:
    """How an execution ended: `return_code` for a program that ran, else `error`."""

    done: bool
    return_code: int | None = None
    error: status_pb2.Status | None = None


def _status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


def finished_reason(status: ProjectJobStatus) -> str:
    for c in status.conditions:
        if c.type == FINISHED_CONDITION:
            return c.reason
    return ""


def failure_code(reason: str) -> grpc.StatusCode:
    code = _FAILURE_CODES.get(reason)
    if code is not None:
        return code
    for needle, hinted in _FAILURE_HINTS:
        if needle in reason:
            return hinted
    # The program never ran and nothing says the request was at fault: an infrastructure failure.
    return grpc.StatusCode.INTERNAL


def execution_outcome(job: JobSnapshot) -> Outcome:
    phase = job.phase
    if phase not in FINAL_PHASES:
        return Outcome(done=False)
    status = job.status
    details = status.status_details
    if phase == JobPhase.CANCELLED:
        reason = job.spec.cancel.reason if job.spec.cancel and job.spec.cancel.reason else ""
        message = "the job was cancelled" + (f": {reason}" if reason else "")
        if details.startswith("the job was cancelled"):  # the operator's own words, with the reason
            message = details if not reason or details.endswith(f": {reason}") else f"{details}: {reason}"
        elif details and details not in message:
            message += f" ({details})"
        return Outcome(done=True, error=_status(grpc.StatusCode.CANCELLED, message))
    if phase == JobPhase.SUCCESS:
        return Outcome(done=True, return_code=status.return_code or 0)
    # ERROR: the program ran and failed (a result), or the job never got to run it (an error).
    reason = finished_reason(status)
    code = status.return_code
    # Never a code 0: the CLI would tell a success of a job that failed.
    if (reason in PROGRAM_REASONS or (not reason and code is not None)) and code != 0:
        return Outcome(done=True, return_code=code if code is not None else 1)
    message = details or "the job failed before its command ran"
    return Outcome(done=True, error=_status(failure_code(reason), message))


def execute_metadata(
    job: JobSnapshot, job_proto: jobs_pb2.Job, job_metadata: jobs_pb2.JobMetadata
) -> svc.ExecuteProjectJobMetadata:
    metadata = svc.ExecuteProjectJobMetadata(metadata=job_metadata)
    # Deprecated, but the official CLI reads `job.id` / `job.project_id` from it (cancel, job link).
    metadata.job.CopyFrom(job_proto)
    if job.status.progress is not None:
        metadata.progress.CopyFrom(progress_to_proto(job.status.progress))
    return metadata


def execute_response(
    job: JobSnapshot, return_code: int, output_urls: Mapping[str, str]
) -> svc.ExecuteProjectJobResponse:
    """Outputs with presigned GET URLs (`output_urls` maps object keys to URLs), errors and the code."""
    status = job.status
    response = svc.ExecuteProjectJobResponse(result=jobs_pb2.JobResult(return_code=return_code))
    for stored in status.output_files:
        url = output_urls.get(stored.key, "")
        if not url:
            if data_unavailable(job):
                response.output_files_errors.append(
                    jobs_pb2.FileUploadError(
                        output_file_desc=jobs_pb2.FileDesc(path=stored.desc.path, var=stored.desc.var),
                        description=(
                            f"the job's data {data_deletion_words(status)}; "
                            "this output can no longer be downloaded"
                        ),
                        type=jobs_pb2.FileUploadError.ErrorType.NOT_FOUND,
                    )
                )
            continue
        response.output_files.append(jobs_pb2.StorageFile(file=file_to_proto(stored), url=url))
    for err in status.file_errors:
        if err.output_file_desc is None:
            continue  # log files: not the program's outputs
        response.output_files_errors.append(
            jobs_pb2.FileUploadError(
                output_file_desc=jobs_pb2.FileDesc(
                    path=err.output_file_desc.path, var=err.output_file_desc.var
                ),
                description=err.description,
                type=jobs_pb2.FileUploadError.ErrorType.Value(
                    "ERROR_TYPE_UNSPECIFIED" if err.type.value == "UNSPECIFIED" else err.type.value
                ),
            )
        )
    for ds in status.output_datasets:
        response.output_datasets.append(
            jobs_pb2.OutputDataset(
                desc=jobs_pb2.OutputDatasetDesc(
                    name=ds.desc.name,
                    description=ds.desc.description,
                    labels=dict(ds.desc.labels),
                    size_gb=ds.desc.size_gb,
                    var=ds.desc.var,
                ),
                id=ds.id,
            )
        )
    return response


def execute_operation(
    job: JobSnapshot,
    job_proto: jobs_pb2.Job,
    job_metadata: jobs_pb2.JobMetadata,
    output_urls: Mapping[str, str],
    now: datetime,
) -> operation_pb2.Operation:
    outcome = execution_outcome(job)
    status = job.status
    created = job.execute_requested_at or job.created_at
    # The progress line's time is the job's own words: one later than the job's end (or than now)
    # would date the operation in the future (a job's `9999-12-31`, or its local time read as UTC).
    progress_time = status.progress.create_time if status.progress else None
    if progress_time is not None and progress_time > (status.finished_at or now):
        progress_time = None
    modified = _latest(created, status.started_at, status.finished_at, progress_time)
    response: Message | None = None
    if outcome.done and outcome.error is None:
        response = execute_response(job, outcome.return_code or 0, output_urls)
    return _operation(
        job.ref(OpKind.EXECUTE),
        created_at=created,
        modified_at=modified,
        created_by=job.spec.created_by_id,
        metadata=execute_metadata(job, job_proto, job_metadata),
        done=outcome.done,
        response=response,
        error=outcome.error,
    )


def output_keys(job: JobSnapshot) -> list[str]:
    """Object keys an Execute operation's response needs GET URLs for (empty until it is done)."""
    outcome = execution_outcome(job)
    if not outcome.done or outcome.error is not None or data_unavailable(job):
        return []
    return [f.key for f in job.status.output_files if is_own_key(job, f.key)]


def is_own_key(job: JobSnapshot, key: str) -> bool:
    """Whether `key` is below the job's own prefix. The API presigns no other: the status is the
    operator's to write, but a key there naming another job's or project's object (a status
    edited by someone allowed to, or a result.json rewritten with the runner's credentials) would
    hand out data its caller may not read. Nor one with `.`, `..` or empty segments: the runner
    writes none, and a store or proxy resolving them after the signature check would reach out
    of the prefix (`.../jobs/j1/../../pb/...`)."""
    try:
        prefix = job_prefix(job.project_id, job.name)
    except ValueError:  # a project or job id no key can have
        return False
    if not key.startswith(prefix) or len(key) == len(prefix):
        return False
    return all(part not in ("", ".", "..") for part in key[len(prefix) :].split("/"))


# --- Delete, DeleteData, DeleteAllData ---------------------------------------------------------


def gone_job_operation(ref: OpRef, now: datetime) -> operation_pb2.Operation:
    """A Create, Clone or Execute operation whose job was deleted: done, with NOT_FOUND. An
    operation outlives its job; answering the Get itself NOT_FOUND left the official CLI polling
    it for good (it retries every failed poll, and stops only at `done`)."""
    metadata: Message
    if ref.kind == OpKind.EXECUTE:
        metadata = svc.ExecuteProjectJobMetadata(job=jobs_pb2.Job(id=ref.job_id, project_id=ref.project_id))
    elif ref.kind == OpKind.CLONE:
        metadata = svc.CloneProjectJobMetadata(project_id=ref.project_id, job_id=ref.job_id)
    else:
        metadata = svc.CreateProjectJobMetadata(project_id=ref.project_id, job_id=ref.job_id)
    return _operation(
        ref,
        created_at=now,
        modified_at=now,
        created_by="",
        metadata=metadata,
        done=True,
        error=_status(grpc.StatusCode.NOT_FOUND, f"job {ref.job_id} was deleted"),
    )


def delete_operation(ref: OpRef, job: JobSnapshot | None, now: datetime) -> operation_pb2.Operation:
    """Done when the job is gone (`job` is None, or a different job now has the name)."""
    gone = job is None or (bool(ref.job_uid) and job.uid != ref.job_uid)
    created = job.created_at if job is not None and not gone else now
    return _operation(
        ref,
        created_at=created,
        modified_at=now,
        created_by=job.spec.created_by_id if job is not None else "",
        metadata=svc.DeleteProjectJobMetadata(job_id=ref.job_id),
        done=gone,
        response=empty_pb2.Empty(),
    )


def delete_data_operation(ref: OpRef, job: JobSnapshot | None, now: datetime) -> operation_pb2.Operation:
    """Done when the operator reports the data cleared (or the job, and so its data, is gone)."""
    gone = job is None or (bool(ref.job_uid) and job.uid != ref.job_uid)
    done = gone or (job is not None and job.status.data_cleared)
    return _operation(
        ref,
        created_at=job.created_at if job is not None and not gone else now,
        modified_at=(job.status.finished_at if job is not None and not gone else None) or now,
        created_by=job.spec.created_by_id if job is not None else "",
        metadata=svc.DeleteProjectJobDataMetadata(job_id=ref.job_id),
        done=done,
        response=svc.DeleteProjectJobDataResponse(),
    )


#: How many jobs left out a DeleteAllData operation's error names.
_UNREADABLE_NAMED: Final = 10


def delete_all_data_operation(
    ref: OpRef, pending_jobs: int, now: datetime, unreadable: Sequence[str] = ()
) -> operation_pb2.Operation:
    """Done when no job of the project has a data deletion pending; failed when jobs whose resource
    does not read (so nothing can mark their data for deletion) still hold data."""
    error = None
    if unreadable:
        names = ", ".join(repr(n) for n in sorted(unreadable)[:_UNREADABLE_NAMED])
        more = len(unreadable) - _UNREADABLE_NAMED
        error = _status(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the data of {len(unreadable)} jobs was not deleted: their ProjectJob resources do not "
            f"match the schema (mend or delete them with kubectl): {names}"
            + (f" and {more} more" if more > 0 else ""),
        )
    return _operation(
        ref,
        created_at=now,
        modified_at=now,
        created_by="",
        metadata=svc.DeleteAllProjectJobDataMetadata(project_id=ref.project_id),
        done=pending_jobs == 0,
        response=svc.DeleteAllProjectJobDataResponse(),
        error=error,
    )


def data_deletion_pending(job: JobSnapshot) -> bool:
    return job.spec.clear_data and not job.status.data_cleared


def data_deletion_words(status: ProjectJobStatus) -> str:
    """How the job's data went, for messages: deleted already, or being deleted."""
    return "was deleted" if status.data_cleared else "is being deleted"


def data_expired(job: JobSnapshot, at: datetime | None = None) -> bool:
    """Whether the job's data TTL has run out by `at` (this replica's clock, by default): its
    deletion is due, begun or not. Counted as the operator counts it, from the spec (SetDataTtl
    changes that first): from finishedAt, or createdAt for a job not executed; a running job's
    data does not expire."""
    if job.is_final:
        since = job.status.finished_at
    elif not job.spec.execute:
        since = job.status.created_at or job.created_at
    else:
        return False
    expires = data_expiry(job.spec, since, job.status.data_expires_at)
    return expires is not None and expires <= (at or datetime.now(UTC))


def data_unavailable(job: JobSnapshot) -> bool:
    """The job's stored data is deleted, or being deleted (DeleteData, its TTL run out): no URL
    for it would still work by the time it is used."""
    return (
        job.status.data_cleared
        or job.spec.clear_data
        or data_deletion_begun(job.status) is not None
        or data_expired(job)
    )
