"""Scalars shared by the conversions: timestamps, durations, enums, files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from dsjobs.models import CompressionType, File, FileDesc, JobPhase, StoredFile
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2


class ConversionError(ValueError):
    """A proto value with no model equivalent (e.g. an enum number this server does not know)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    try:
        ts.FromDatetime(value)  # aware datetimes are converted to UTC
    except (OverflowError, ValueError):
        # A status time the CRD's date-time format lets through whose UTC is beyond year 1..9999
        # (0001-01-01T00:00:00+00:01): the nearest time a Timestamp holds, not a failed Get/List.
        limit = datetime.min if value.year < 5000 else datetime.max
        ts.FromDatetime(limit.replace(tzinfo=UTC))
    return ts


def from_timestamp(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


#: google.protobuf.Duration's range: +-10000 years.
MAX_DURATION_SECONDS = 315_576_000_000


def duration(value: timedelta) -> Duration:
    """`value` as a Duration, saturated at its range (a CR's `infinity` or `100000000d`)."""
    d = Duration()
    limit = timedelta(seconds=MAX_DURATION_SECONDS)
    d.FromTimedelta(max(-limit, min(limit, value)))
    return d


# google.protobuf.Duration's own range (about 10,000 years); beyond it timedelta may overflow.
MAX_DURATION_SECONDS = 315_576_000_000
MAX_DURATION_NANOS = 999_999_999


def from_duration(d: Duration, path: str = "duration") -> timedelta:
    """The timedelta of a Duration; ConversionError at `path` outside the Duration range."""
    if abs(d.seconds) > MAX_DURATION_SECONDS or abs(d.nanos) > MAX_DURATION_NANOS:
        raise ConversionError(
            path,
            f"is not a valid Duration: seconds must be within ±{MAX_DURATION_SECONDS} (10000 years) "
            f"and nanos within ±{MAX_DURATION_NANOS}",
        )
    if (d.seconds < 0 < d.nanos) or (d.nanos < 0 < d.seconds):
        # google.protobuf.Duration's rule: (3601s, -999999999ns) was read as 1h plus a microsecond.
        raise ConversionError(path, "is not a valid Duration: nanos must have the sign of seconds")
    return d.ToTimedelta()


_COMPRESSION_TO_PROTO = {CompressionType.NONE: jobs_pb2.NONE, CompressionType.ZIP: jobs_pb2.ZIP}
# UNSPECIFIED is what a client that never set the field sends: a plain file.
_COMPRESSION_FROM_PROTO = {
    jobs_pb2.FILE_COMPRESSION_TYPE_UNSPECIFIED: CompressionType.NONE,
    jobs_pb2.NONE: CompressionType.NONE,
    jobs_pb2.ZIP: CompressionType.ZIP,
}

PHASE_TO_PROTO: dict[JobPhase, jobs_pb2.JobStatus.ValueType] = {
    JobPhase.CREATING: jobs_pb2.CREATING,
    JobPhase.PREPARING: jobs_pb2.PREPARING,
    JobPhase.EXECUTING: jobs_pb2.EXECUTING,
    JobPhase.UPLOADING_OUTPUT: jobs_pb2.UPLOADING_OUTPUT,
    JobPhase.SUCCESS: jobs_pb2.SUCCESS,
    JobPhase.ERROR: jobs_pb2.ERROR,
    JobPhase.CANCELLING: jobs_pb2.CANCELLING,
    JobPhase.CANCELLED: jobs_pb2.CANCELLED,
}


def phase_to_proto(phase: JobPhase | None) -> jobs_pb2.JobStatus.ValueType:
    """A job the operator has not picked up yet is CREATING: it exists and awaits its inputs."""
    return PHASE_TO_PROTO[phase or JobPhase.CREATING]


def file_desc_to_proto(desc: FileDesc) -> jobs_pb2.FileDesc:
    return jobs_pb2.FileDesc(path=desc.path, var=desc.var)


def file_desc_from_proto(pb: jobs_pb2.FileDesc) -> FileDesc:
    return FileDesc(path=pb.path, var=pb.var)


def file_to_proto(f: File | StoredFile) -> jobs_pb2.File:
    """A spec file or a stored file as proto File (a stored file's object key is not on the wire)."""
    return jobs_pb2.File(
        desc=file_desc_to_proto(f.desc),
        sha256=f.sha256,
        size_bytes=f.size_bytes,
        compression_type=_COMPRESSION_TO_PROTO[f.compression_type],
    )


def compression_from_proto(value: int, path: str) -> CompressionType:
    try:
        return _COMPRESSION_FROM_PROTO[value]  # type: ignore[index]
    except KeyError:
        raise ConversionError(path, f"unknown compression type {value}") from None


def file_from_proto(pb: jobs_pb2.File, path: str = "file") -> File:
    return File(
        desc=file_desc_from_proto(pb.desc),
        sha256=pb.sha256,
        size_bytes=pb.size_bytes,
        compression_type=compression_from_proto(pb.compression_type, f"{path}.compression_type"),
    )
