"""A ProjectJob resource (metadata + spec + status) as proto Job / JobMetadata / JobProgress."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from dsjobs.convert.common import file_desc_to_proto, file_to_proto, phase_to_proto, timestamp
from dsjobs.convert.params import job_parameters_to_proto, output_dataset_desc_to_proto
from dsjobs.models import FileError, FileErrorType, Progress, ProjectJobSpec, ProjectJobStatus
from dsjobs.models.base import read_stored
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2

_ERROR_TYPE = {
    FileErrorType.UNSPECIFIED: jobs_pb2.FileUploadError.ERROR_TYPE_UNSPECIFIED,
    FileErrorType.UPLOAD_FAILED: jobs_pb2.FileUploadError.UPLOAD_FAILED,
    FileErrorType.NOT_FOUND: jobs_pb2.FileUploadError.NOT_FOUND,
}


def file_error_to_proto(e: FileError) -> jobs_pb2.FileUploadError:
    pb = jobs_pb2.FileUploadError(description=e.description, type=_ERROR_TYPE[e.type])
    if e.output_file_desc is not None:
        pb.output_file_desc.CopyFrom(file_desc_to_proto(e.output_file_desc))
    elif e.log_file_name is not None:
        pb.log_file_name = e.log_file_name
    return pb


def progress_to_proto(p: Progress) -> jobs_pb2.JobProgress:
    pb = jobs_pb2.JobProgress(message=p.message, progress=p.progress)
    if p.create_time is not None:
        pb.create_time.CopyFrom(timestamp(p.create_time))
    return pb


def _set_time(message: Any, field: str, value: datetime | None) -> None:
    if value is not None:
        getattr(message, field).CopyFrom(timestamp(value))


def job_to_proto(
    job_id: str, spec: ProjectJobSpec, status: ProjectJobStatus | None, *, created_at: datetime | None = None
) -> jobs_pb2.Job:
    """proto Job of a ProjectJob. `created_at` (metadata.creationTimestamp) stands in for an unset
    status.createdAt; a job without status is CREATING."""
    status = status or ProjectJobStatus()
    pb = jobs_pb2.Job(
        id=job_id,
        name=spec.name,
        desc=spec.desc,
        status=phase_to_proto(status.phase),
        config=spec.config,
        created_by_id=spec.created_by_id,
        project_id=spec.project_id,
        data_cleared=status.data_cleared,
        output_files=[file_to_proto(f) for f in status.output_files],
        log_files=[file_to_proto(f) for f in status.log_files],
        diagnostic_files=[file_to_proto(f) for f in status.diagnostic_files],
        data_size_bytes=status.data_size_bytes,
        status_details=status.status_details,
        parent_job_id=spec.parent_job_id,
        file_errors=[file_error_to_proto(e) for e in status.file_errors],
        output_datasets=[
            jobs_pb2.OutputDataset(desc=output_dataset_desc_to_proto(d.desc), id=d.id)
            for d in status.output_datasets
        ],
    )
    pb.job_parameters.CopyFrom(job_parameters_to_proto(spec.job_parameters))
    _set_time(pb, "created_at", status.created_at or created_at)
    _set_time(pb, "started_at", status.started_at)
    _set_time(pb, "finished_at", status.finished_at)
    _set_time(pb, "data_expires_at", status.data_expires_at)
    if status.actual_cloud_instance_type:
        pb.actual_cloud_instance_type.name = status.actual_cloud_instance_type
    return pb


def job_metadata_to_proto(
    job_id: str, spec: ProjectJobSpec, status: ProjectJobStatus | None, *, created_at: datetime | None = None
) -> jobs_pb2.JobMetadata:
    """proto JobMetadata (the Execute operation's metadata.metadata)."""
    status = status or ProjectJobStatus()
    pb = jobs_pb2.JobMetadata(
        id=job_id,
        name=spec.name,
        description=spec.desc,
        status=phase_to_proto(status.phase),
        status_details=status.status_details,
        created_by_id=spec.created_by_id,
        project_id=spec.project_id,
        parent_job_id=spec.parent_job_id,
    )
    _set_time(pb, "created_at", status.created_at or created_at)
    _set_time(pb, "started_at", status.started_at)
    _set_time(pb, "finished_at", status.finished_at)
    _set_time(pb, "data_expires_at", status.data_expires_at)
    return pb


def parse_resource(
    obj: Mapping[str, Any],
) -> tuple[str, ProjectJobSpec, ProjectJobStatus | None, datetime | None]:
    """(job id, spec, status, creation time) of a ProjectJob resource as the API server returns it."""
    metadata = obj.get("metadata") or {}
    created = metadata.get("creationTimestamp")
    created_at: datetime | None
    if isinstance(created, datetime):
        created_at = created
    elif isinstance(created, str):
        created_at = datetime.fromisoformat(created)
    else:
        created_at = None
    status = obj.get("status")
    return (
        str(metadata.get("name", "")),
        read_stored(ProjectJobSpec, obj["spec"]),
        read_stored(ProjectJobStatus, status) if status else None,
        created_at,
    )


def job_from_resource(obj: Mapping[str, Any]) -> jobs_pb2.Job:
    """proto Job of a ProjectJob resource dict (metadata, spec, status)."""
    job_id, spec, status, created_at = parse_resource(obj)
    return job_to_proto(job_id, spec, status, created_at=created_at)
