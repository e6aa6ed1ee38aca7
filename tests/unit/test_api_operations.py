"""Operations derived from a ProjectJob, for every phase."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from dsjobs.api import listfilter
from dsjobs.api import operations as ops
from dsjobs.api.servicer import _filter_fields
from dsjobs.controller.status import (
    _DISRUPTION_REASONS,
    _POD_REASONS,
    FAILING_WAITING,
    FATAL_WAITING,
    NEVER_RAN,
)
from dsjobs.models import JobPhase
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc

T0 = datetime(2025, 6, 1, 11, 0, tzinfo=UTC)
SHA = "ab" * 32


# Keys the operator records are below the job's prefix (dsjobs.storage.job_prefix).
OWN = "projects/p1/jobs/j1/outputs/"


def job(status: dict[str, Any] | None = None, **spec: Any) -> ops.JobSnapshot:
    return ops.JobSnapshot.from_cr(
        {
            "metadata": {
                "name": "j1",
                "namespace": "ns1",
                "uid": "uid-1",
                "resourceVersion": "5",
                "creationTimestamp": "2025-06-01T11:00:00Z",
                "annotations": {ops.EXECUTE_REQUESTED_AT: "2025-06-01T11:00:05Z"},
            },
            "spec": {
                "projectId": "p1",
                "createdById": "alice",
                "jobParameters": {"cmd": "python x.py"},
                **spec,
            },
            "status": status or {},
        }
    )


#: "Now" of the operations these tests ask for: after every time their jobs hold.
NOW = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)


def execute_op(j: ops.JobSnapshot, urls: dict[str, str] | None = None, now: datetime = NOW) -> Any:
    return ops.execute_operation(
        j, jobs_pb2.Job(id=j.name, project_id="p1"), jobs_pb2.JobMetadata(id=j.name), urls or {}, now
    )


def test_create_operation_is_done_with_upload_urls() -> None:
    j = job()
    files = [
        jobs_pb2.StorageFile(
            file=jobs_pb2.File(desc=jobs_pb2.FileDesc(path="a.txt"), sha256=SHA), url="http://u"
        )
    ]
    op = ops.create_operation(j.ref(ops.OpKind.CREATE), j, files)
    assert op.done and not op.HasField("error")
    assert ops.decode_op_id(op.id) == ops.OpRef(ops.OpKind.CREATE, "p1", "j1", "uid-1")
    meta, resp = svc.CreateProjectJobMetadata(), svc.CreateProjectJobResponse()
    assert op.metadata.Unpack(meta) and op.response.Unpack(resp)
    assert (meta.project_id, meta.job_id) == ("p1", "j1")
    assert resp.job_id == "j1" and [f.url for f in resp.upload_files] == ["http://u"]
    assert op.created_by == "alice"


def test_clone_operation_uses_clone_messages() -> None:
    j = job()
    op = ops.create_operation(j.ref(ops.OpKind.CLONE), j, [])
    assert op.metadata.Is(svc.CloneProjectJobMetadata.DESCRIPTOR)
    assert op.response.Is(svc.CloneProjectJobResponse.DESCRIPTOR)


@pytest.mark.parametrize(
    "phase",
    [
        None,
        JobPhase.CREATING,
        JobPhase.PREPARING,
        JobPhase.EXECUTING,
        JobPhase.UPLOADING_OUTPUT,
        JobPhase.CANCELLING,
    ],
)
def test_execute_operation_is_pending_until_final(phase: JobPhase | None) -> None:
    status: dict[str, Any] = {"phase": phase.value} if phase else {}
    status["progress"] = {"progress": 21, "message": "epoch 2", "createTime": "2025-06-01T11:00:12Z"}
    op = execute_op(job(status, execute=True))
    assert not op.done and not op.HasField("error") and not op.HasField("response")
    meta = svc.ExecuteProjectJobMetadata()
    assert op.metadata.Unpack(meta)
    assert meta.job.id == "j1" and meta.job.project_id == "p1" and meta.metadata.id == "j1"
    assert meta.progress.progress == 21 and meta.progress.message == "epoch 2"
    assert op.created_at.ToDatetime(tzinfo=UTC) == datetime(2025, 6, 1, 11, 0, 5, tzinfo=UTC)
    assert op.modified_at.ToDatetime(tzinfo=UTC) == datetime(2025, 6, 1, 11, 0, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("phase", "written"),
    [
        ("EXECUTING", "9999-12-31T23:59:59Z"),
        ("EXECUTING", "2025-06-02T12:00:00Z"),
        ("SUCCESS", "2025-06-01T11:30:00Z"),
    ],
    ids=["far-future", "ahead-of-now", "after-the-end"],
)
def test_a_progress_time_past_the_job_s_end_or_now_dates_no_operation(phase: str, written: str) -> None:
    # The progress line's create_time is the job's own: 9999-12-31, or a local time ahead of UTC.
    status: dict[str, Any] = {
        "phase": phase,
        "startedAt": "2025-06-01T11:00:08Z",
        "progress": {"progress": 21, "message": "epoch 2", "createTime": written},
    }
    if phase == "SUCCESS":
        status |= {"finishedAt": "2025-06-01T11:20:00Z", "returnCode": 0}
    op = execute_op(job(status, execute=True))
    meta = svc.ExecuteProjectJobMetadata()
    assert op.metadata.Unpack(meta) and meta.progress.progress == 21  # still shown
    last = (
        datetime(2025, 6, 1, 11, 20, tzinfo=UTC)
        if phase == "SUCCESS"
        else datetime(2025, 6, 1, 11, 0, 8, tzinfo=UTC)
    )
    assert op.modified_at.ToDatetime(tzinfo=UTC) == last


def test_success_has_outputs_with_urls_and_errors() -> None:
    status = {
        "phase": "SUCCESS",
        "returnCode": 0,
        "outputFiles": [
            {"desc": {"path": "out/a.txt", "var": "A"}, "sha256": SHA, "sizeBytes": 3, "key": f"{OWN}a"},
            {"desc": {"path": "b.zip"}, "sizeBytes": 9, "compressionType": "ZIP", "key": f"{OWN}b"},
        ],
        "fileErrors": [
            {"outputFileDesc": {"path": "missing.txt"}, "description": "not produced", "type": "NOT_FOUND"},
            {"logFileName": "stdout.txt", "description": "upload failed", "type": "UPLOAD_FAILED"},
        ],
        "outputDatasets": [{"desc": {"name": "ds", "var": "DS", "sizeGb": 1}, "id": "ds1"}],
    }
    j = job(status, execute=True)
    assert ops.output_keys(j) == [f"{OWN}a", f"{OWN}b"]
    op = execute_op(j, {f"{OWN}a": "http://a", f"{OWN}b": "http://b"})
    assert op.done and not op.HasField("error")
    resp = svc.ExecuteProjectJobResponse()
    assert op.response.Unpack(resp)
    assert resp.result.return_code == 0
    assert [(f.file.desc.path, f.url) for f in resp.output_files] == [
        ("out/a.txt", "http://a"),
        ("b.zip", "http://b"),
    ]
    assert resp.output_files[1].file.compression_type == jobs_pb2.FileCompressionType.ZIP
    assert [e.output_file_desc.path for e in resp.output_files_errors] == ["missing.txt"]
    assert resp.output_files_errors[0].type == jobs_pb2.FileUploadError.ErrorType.NOT_FOUND
    assert [d.id for d in resp.output_datasets] == ["ds1"]


def test_only_keys_below_the_job_s_own_prefix_are_presigned() -> None:
    # A status naming another job's or project's objects (edited by someone allowed to) must not
    # make the API hand out URLs for them.
    files = [
        {"desc": {"path": "mine.txt"}, "key": f"{OWN}mine.txt"},
        {"desc": {"path": "theirs.txt"}, "key": "projects/p2/jobs/j9/outputs/theirs.txt"},
        {"desc": {"path": "sibling.txt"}, "key": "projects/p1/jobs/j10/outputs/sibling.txt"},
        {"desc": {"path": "nothing.txt"}, "key": ""},
        # Below the prefix as text, out of it for a store or proxy resolving dot segments.
        {"desc": {"path": "climb.txt"}, "key": f"{OWN}../../../p2/jobs/j9/outputs/theirs.txt"},
        {"desc": {"path": "dot.txt"}, "key": f"{OWN}./mine.txt"},
        {"desc": {"path": "empty.txt"}, "key": f"{OWN}a//mine.txt"},
        {"desc": {"path": "prefix.txt"}, "key": OWN},
    ]
    j = job({"phase": "SUCCESS", "returnCode": 0, "outputFiles": files}, execute=True)
    assert ops.output_keys(j) == [f"{OWN}mine.txt"]
    assert [ops.is_own_key(j, f["key"]) for f in files] == [True] + [False] * 7
    assert ops.is_own_key(j, f"{OWN}out dir/report (1).v2..txt")  # dots inside a name are fine
    # The response lists only the outputs it has URLs for: the foreign ones are left out, silently
    # (no URL, no file error naming another job's object either).
    op = execute_op(j, {f"{OWN}mine.txt": "http://m"})
    resp = svc.ExecuteProjectJobResponse()
    assert op.response.Unpack(resp)
    assert [(f.file.desc.path, f.url) for f in resp.output_files] == [("mine.txt", "http://m")]
    assert not resp.output_files_errors
    # A project id no key can hold (a status and spec edited past the CRD): nothing is its own,
    # not even a key spelled with that id as a path segment.
    dots = job({"phase": "SUCCESS", "returnCode": 0}, execute=True, projectId="..")
    assert not ops.is_own_key(dots, "projects/../jobs/j1/outputs/x.txt")


def test_failed_program_is_a_successful_operation_with_its_return_code() -> None:
    op = execute_op(job({"phase": "ERROR", "returnCode": 3, "statusDetails": "exit 3"}, execute=True))
    assert op.done and not op.HasField("error")
    resp = svc.ExecuteProjectJobResponse()
    assert op.response.Unpack(resp)
    assert resp.result.return_code == 3


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("InvalidSpec", grpc.StatusCode.INVALID_ARGUMENT),
        ("ImagePullBackOff", grpc.StatusCode.FAILED_PRECONDITION),
        ("StageInFailed", grpc.StatusCode.FAILED_PRECONDITION),
        ("SetupFailed", grpc.StatusCode.FAILED_PRECONDITION),
        ("Unschedulable", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("Evicted", grpc.StatusCode.ABORTED),
        ("PodStopped", grpc.StatusCode.ABORTED),
        ("StartError", grpc.StatusCode.FAILED_PRECONDITION),
        ("DataCleared", grpc.StatusCode.FAILED_PRECONDITION),
        ("StorageCredentials", grpc.StatusCode.FAILED_PRECONDITION),
        ("SparkConnector", grpc.StatusCode.FAILED_PRECONDITION),
        ("WorkingDirFull", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("SomeNewImageProblem", grpc.StatusCode.FAILED_PRECONDITION),
        ("PodFailed", grpc.StatusCode.INTERNAL),
        ("RunnerFailed", grpc.StatusCode.INTERNAL),
    ],
)
def test_job_that_could_not_run_ends_with_an_error(reason: str, code: grpc.StatusCode) -> None:
    status = {
        "phase": "ERROR",
        "statusDetails": "could not pull image x",
        # A return code does not make it a result: setup failures may carry one.
        "returnCode": 1,
        "conditions": [{"type": "Finished", "status": "False", "reason": reason}],
    }
    op = execute_op(job(status, execute=True))
    assert op.done and op.HasField("error") and not op.HasField("response")
    assert op.error.code == code.value[0]
    assert op.error.message == "could not pull image x"


# Reasons the operator ends a job with that the job, its image or the cluster's setup causes:
# INTERNAL is for dsjobs' own failures (RunnerFailed, PodFailed).
_NOT_OURS = sorted(
    {
        *FAILING_WAITING,
        *FATAL_WAITING,
        *NEVER_RAN,
        *(reason for reason, _ in _POD_REASONS.values()),
        *(reason for reason, _ in _DISRUPTION_REASONS.values()),
        "ConfigTooLarge",
        "InvalidSpec",
        "MissingVolume",
        "PodRejected",
        "RegistryCredentials",
        "UnknownInstanceType",
        "WorkingStorageClass",
    }
)


@pytest.mark.parametrize("reason", _NOT_OURS)
def test_failures_the_job_or_the_cluster_causes_are_not_internal(reason: str) -> None:
    assert ops.failure_code(reason) != grpc.StatusCode.INTERNAL


def _written_reasons() -> dict[str, str]:
    """Every literal `Finished` reason the operator's code ends a job with (`fail(spec, status,
    REASON, ...)`, `Outcome(phase, REASON, ...)`), read from its source: the hand-made list above
    missed reasons added since (ProjectMismatch, NodeRestarted, StoppedFromInside were INTERNAL)."""
    found: dict[str, str] = {}
    for path in sorted(CONTROLLER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            at = {"fail": 2, "Outcome": 1}.get(str(name))
            if at is None or len(node.args) <= at:
                continue
            arg = node.args[at]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.setdefault(arg.value, f"{path.name}:{node.lineno}")
    return found


CONTROLLER = Path(ops.__file__).resolve().parents[1] / "controller"


def test_the_reader_of_the_operator_s_reasons_finds_them() -> None:
    found = _written_reasons()
    assert {"NonZeroExit", "PodFailed", "InvalidSpec", "PodRejected", "Cancelled"} <= set(found)


@pytest.mark.parametrize("reason", sorted(_written_reasons()))
def test_every_reason_the_operator_writes_has_a_deliberate_code(reason: str) -> None:
    # Not left to the hints by accident, nor INTERNAL unless it is dsjobs' own failure (docs/api.md).
    where = _written_reasons()[reason]
    known = ops._FAILURE_CODES.keys() | ops.PROGRAM_REASONS | ops.INTERNAL_REASONS | {"Cancelled"}
    assert reason in known, f"{reason} ({where}) has no gRPC code in dsjobs.api.operations._FAILURE_CODES"
    if reason in ops.PROGRAM_REASONS or reason == "Cancelled":
        return  # a result, or the operation's CANCELLED: not told by failure_code
    internal = ops.failure_code(reason) == grpc.StatusCode.INTERNAL
    assert internal == (reason in ops.INTERNAL_REASONS), reason


@pytest.mark.parametrize("reason", ["NonZeroExit", "OOMKilled"])
def test_program_failures_are_results(reason: str) -> None:
    status = {
        "phase": "ERROR",
        "returnCode": 137,
        "conditions": [{"type": "Finished", "status": "False", "reason": reason}],
    }
    resp = svc.ExecuteProjectJobResponse()
    op = execute_op(job(status, execute=True))
    assert op.done and op.response.Unpack(resp) and resp.result.return_code == 137


@pytest.mark.parametrize("reason", ["NonZeroExit", "OOMKilled", ""])
def test_a_failed_job_never_reads_as_a_success(reason: str) -> None:
    # A status of an older operator (an OOM kill of a child, the program exiting 0) said ERROR with
    # code 0: the operation said "done, code 0" and the CLI printed a success.
    conditions = [{"type": "Finished", "status": "False", "reason": reason}] if reason else []
    status = {"phase": "ERROR", "returnCode": 0, "statusDetails": "it failed", "conditions": conditions}
    op = execute_op(job(status, execute=True))
    assert op.done and op.HasField("error") and not op.HasField("response")
    assert op.error.message == "it failed"
    if reason == "OOMKilled":
        assert op.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_cancelled_job_ends_with_cancelled_error() -> None:
    j = job({"phase": "CANCELLED"}, execute=True, cancel={"reason": "user pressed ctrl-c", "graceful": True})
    op = execute_op(j)
    assert op.done and op.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert "user pressed ctrl-c" in op.error.message
    assert ops.output_keys(j) == []


@pytest.mark.parametrize(
    ("details", "message"),
    [
        ("the job was cancelled: stop", "the job was cancelled: stop"),
        ("the job was cancelled before it started: stop", "the job was cancelled before it started: stop"),
        ("the job was cancelled before it started", "the job was cancelled before it started: stop"),
        ("", "the job was cancelled: stop"),
        ("node lost", "the job was cancelled: stop (node lost)"),
    ],
)
def test_a_cancel_s_message_tells_its_reason_once(details: str, message: str) -> None:
    j = job({"phase": "CANCELLED", "statusDetails": details}, execute=True, cancel={"reason": "stop"})
    assert execute_op(j).error.message == message


def test_a_cancel_reason_that_is_a_word_of_the_details_is_still_told() -> None:
    # Details of a job that ended before the reason was kept in them.
    j = job(
        {"phase": "CANCELLED", "statusDetails": "the job was cancelled before it started"},
        execute=True,
        cancel={"reason": "started"},
    )
    assert execute_op(j).error.message == "the job was cancelled before it started: started"


def test_cleared_data_reports_outputs_as_errors() -> None:
    status = {
        "phase": "SUCCESS",
        "returnCode": 0,
        "dataCleared": True,
        "outputFiles": [{"desc": {"path": "a.txt"}, "key": "k/a"}],
    }
    j = job(status, execute=True)
    assert ops.output_keys(j) == []
    resp = svc.ExecuteProjectJobResponse()
    assert execute_op(j).response.Unpack(resp)
    assert not resp.output_files
    assert "deleted" in resp.output_files_errors[0].description


def test_data_being_deleted_gets_no_urls() -> None:
    # DeleteData or the TTL asked for, the operator not done yet: a URL would 404 by its use.
    status = {"phase": "SUCCESS", "returnCode": 0, "outputFiles": [{"desc": {"path": "a.txt"}, "key": "k/a"}]}
    j = job(status, execute=True, clearData=True)
    assert ops.data_unavailable(j) and ops.output_keys(j) == []
    resp = svc.ExecuteProjectJobResponse()
    assert execute_op(j).response.Unpack(resp)
    assert not resp.output_files
    assert resp.output_files_errors[0].description.startswith("the job's data is being deleted")


def test_delete_operation_done_when_gone_or_replaced() -> None:
    j = job()
    ref = j.ref(ops.OpKind.DELETE)
    assert not ops.delete_operation(ref, j, T0).done
    assert ops.delete_operation(ref, None, T0).done
    other = ops.JobSnapshot(**{**j.__dict__, "uid": "uid-2"})
    op = ops.delete_operation(ref, other, T0)
    assert op.done and op.response.Is(empty_pb2.Empty.DESCRIPTOR)


def test_delete_data_operation_follows_data_cleared() -> None:
    ref = job().ref(ops.OpKind.DELETE_DATA)
    pending = job({"phase": "SUCCESS"}, clearData=True)
    assert ops.data_deletion_pending(pending)
    assert not ops.delete_data_operation(ref, pending, T0).done
    cleared = job({"phase": "SUCCESS", "dataCleared": True}, clearData=True)
    assert not ops.data_deletion_pending(cleared)
    op = ops.delete_data_operation(ref, cleared, T0)
    assert op.done and op.response.Is(svc.DeleteProjectJobDataResponse.DESCRIPTOR)
    assert ops.delete_data_operation(ref, None, T0).done


def test_delete_all_data_operation() -> None:
    ref = ops.OpRef(ops.OpKind.DELETE_ALL_DATA, "p1")
    assert not ops.delete_all_data_operation(ref, 2, T0).done
    op = ops.delete_all_data_operation(ref, 0, T0)
    assert op.done and op.metadata.Is(svc.DeleteAllProjectJobDataMetadata.DESCRIPTOR)
    assert op.response.Is(svc.DeleteAllProjectJobDataResponse.DESCRIPTOR)


def test_delete_all_data_operation_names_jobs_left_out() -> None:
    ref = ops.OpRef(ops.OpKind.DELETE_ALL_DATA, "p1")
    assert not ops.delete_all_data_operation(ref, 1, T0, ["j0"]).done
    op = ops.delete_all_data_operation(ref, 0, T0, [f"j{i:02}" for i in range(12)])
    assert op.done and not op.HasField("response")
    assert op.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "the data of 12 jobs was not deleted" in op.error.message
    assert "'j09' and 2 more" in op.error.message and "'j10'" not in op.error.message


def test_an_execute_time_utc_cannot_hold_is_ignored_not_an_internal_error() -> None:
    # Anyone who may annotate the job can write one; the operation then counts from creation.
    j = job()
    j.annotations[ops.EXECUTE_REQUESTED_AT] = "0001-01-01T00:00:00+00:01"
    assert j.execute_requested_at is None
    op = execute_op(j)
    assert op.created_at.ToDatetime(tzinfo=UTC) == datetime(2025, 6, 1, 11, 0, tzinfo=UTC)
    assert ops.parse_time("9999-12-31T23:59:59-00:01") is None
    assert ops.parse_time("2025-06-01T12:00:00+01:00") == datetime(2025, 6, 1, 11, 0, tzinfo=UTC)
    # RFC 3339 lets the separator and the zone be lower case.
    assert ops.parse_time("2025-06-01t11:00:00z") == datetime(2025, 6, 1, 11, 0, tzinfo=UTC)
    j.annotations[ops.EXECUTE_REQUESTED_AT] = "2025-06-01t11:00:05z"
    assert j.execute_requested_at == datetime(2025, 6, 1, 11, 0, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "EXECUTING", "startedAt": "9999-12-31T23:59:59-00:01"},
        {"phase": "SUCCESS", "finishedAt": "9999-12-31T23:59:59-00:01"},
    ],
)
def test_a_status_time_utc_cannot_hold_makes_no_internal_error_of_an_operation(
    status: dict[str, Any],
) -> None:
    # The CRD's date-time format lets offsets through that put a time past year 9999 in UTC. The
    # job's Get answered (its times saturate); its Execute operation's Get failed (INTERNAL), and
    # with it the CLI's polling.
    j = job(status)
    assert execute_op(j).modified_at.ToDatetime(tzinfo=UTC).year == 9999
    ops.delete_data_operation(j.ref(ops.OpKind.DELETE_DATA), j, T0)


def test_a_job_a_newer_version_wrote_keys_into_is_served() -> None:
    # Mid-rollout a newer operator or API replica wrote fields this replica does not know: Get,
    # Cancel, Delete and the CLI's operation polling must not answer "cannot be read".
    j = job(
        {"phase": "SUCCESS", "returnCode": 0, "fieldOfANewerVersion": {"x": 1}},
        newerSpecField=True,
        jobParameters={"cmd": "python x.py", "newerParameter": "y"},
    )
    assert j.status.phase == JobPhase.SUCCESS and j.status.return_code == 0
    assert j.spec.job_parameters.cmd == "python x.py"


def test_list_filters_every_field_the_filter_grammar_names() -> None:
    # A field listfilter accepts but List does not supply would fail the call with a KeyError
    # (INTERNAL) instead of filtering.
    assert set(_filter_fields(job())) == set(listfilter.FIELDS)
