"""The gRPC API end to end: real API processes, the test cluster, S3, real tokens (issue 6).

Most tests need no operator: where a job has to run, the test plays the operator itself (writes
log records and outputs to storage, patches the ProjectJob status), which makes every phase and
outcome reachable and fast. `test_full_flow_with_the_operator` runs a real job when the operator's
fixture exists.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import api_fixtures
import grpc
import pytest
import requests
from api_fixtures import GROUP, PLURAL, VERSION, ApiEnv, Project
from cluster_fixtures import poll
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from dsjobs import logrecords
from dsjobs.logrecords import FinalMarker, LogChunk, LogRecord, Stream
from dsjobs.pb.yandex.cloud.datasphere.v2 import project_service_pb2 as psvc
from dsjobs.pb.yandex.cloud.datasphere.v2 import project_service_pb2_grpc as psvc_grpc
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2_grpc as svc_grpc
from dsjobs.pb.yandex.cloud.operation import operation_pb2
from dsjobs.pb.yandex.cloud.operation import operation_service_pb2 as osvc
from dsjobs.pb.yandex.cloud.operation import operation_service_pb2_grpc as osvc_grpc
from dsjobs.storage import input_key, output_key

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
api_env = api_fixtures.api_env  # the session fixture, used by name below

Code = grpc.StatusCode
T = TypeVar("T")
POLL_TIMEOUT_S = 60


# --- a minimal client ----------------------------------------------------------------------------


Metadata = tuple[tuple[str, str | bytes], ...]


class Client:
    def __init__(self, channel: grpc.Channel, md: Metadata) -> None:
        self.jobs = svc_grpc.ProjectJobServiceStub(channel)
        self.ops = osvc_grpc.OperationServiceStub(channel)
        self.projects = psvc_grpc.ProjectServiceStub(channel)
        self.md = md

    def create(
        self, project: str, params: jobs_pb2.JobParameters, key: str | None = None, **fields: Any
    ) -> tuple[operation_pb2.Operation, svc.CreateProjectJobResponse]:
        md = (*self.md, ("idempotency-key", key)) if key else self.md
        op = self.jobs.Create(
            svc.CreateProjectJobRequest(project_id=project, job_parameters=params, **fields),
            metadata=md,
            timeout=30,
        )
        resp = svc.CreateProjectJobResponse()
        assert op.done and op.response.Unpack(resp), op
        return op, resp

    def upload(
        self, resp: svc.CreateProjectJobResponse | svc.CloneProjectJobResponse, files: dict[str, bytes]
    ) -> None:
        for f in resp.upload_files:
            r = requests.put(f.url, data=files[f.file.desc.path], timeout=30)  # what the official CLI does
            r.raise_for_status()

    def execute(self, job_id: str) -> operation_pb2.Operation:
        return self.jobs.Execute(svc.ExecuteProjectJobRequest(job_id=job_id), metadata=self.md, timeout=30)

    def get(self, job_id: str) -> jobs_pb2.Job:
        return self.jobs.Get(svc.GetProjectJobRequest(job_id=job_id), metadata=self.md, timeout=30)

    def op(self, op_id: str) -> operation_pb2.Operation:
        return self.ops.Get(osvc.GetOperationRequest(operation_id=op_id), metadata=self.md, timeout=30)

    def wait_op(self, op_id: str, timeout: float = POLL_TIMEOUT_S) -> operation_pb2.Operation:
        deadline = time.monotonic() + timeout
        while True:
            op = self.op(op_id)
            if op.done:
                return op
            assert time.monotonic() < deadline, f"operation {op_id} not done after {timeout}s: {op}"
            time.sleep(0.2)


def client_for(channel: grpc.Channel, env: ApiEnv, user: str = "alice") -> Client:
    return Client(channel, env.md(user))


def client(env: ApiEnv, user: str = "alice", replica: int = 0) -> Client:
    return Client(env.replicas[replica].channel(), env.md(user))


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    details: str


def rpc_error(call: Callable[[], Any]) -> Failure:
    """The status of a call that must fail."""
    with pytest.raises(grpc.RpcError) as exc:
        call()
    err: Any = exc.value  # a grpc.Call as well
    return Failure(err.code(), err.details() or "")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def params(
    inputs: dict[str, bytes] | None = None, cmd: str = "python main.py", **kw: Any
) -> jobs_pb2.JobParameters:
    files = [
        jobs_pb2.File(desc=jobs_pb2.FileDesc(path=p), sha256=sha(d), size_bytes=len(d))
        for p, d in (inputs or {}).items()
    ]
    return jobs_pb2.JobParameters(cmd=cmd, input_files=files, **kw)


def unique_inputs() -> dict[str, bytes]:
    tag = f"{time.time_ns()}".encode()
    return {"main.py": b"print('hello')  # " + tag + b"\n", "data/in.csv": b"a,b\n1,2\n" + tag}


# --- playing the operator --------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def fake_phase(env: ApiEnv, project: Project, job_id: str, phase: str, **status: Any) -> None:
    env.patch_status(project, job_id, {"phase": phase, **status})


def fake_logs(env: ApiEnv, project: Project, job_id: str, seq: int, records: list[LogRecord]) -> None:
    logrecords.write_chunk(
        env.storage(), project.project_id, job_id, LogChunk(seq=seq, records=tuple(records))
    )


def out(text: str) -> LogRecord:
    return LogRecord(Stream.OUT, text.encode(), time.time_ns())


def err(text: str) -> LogRecord:
    return LogRecord(Stream.ERR, text.encode(), time.time_ns())


def fake_success(
    env: ApiEnv, project: Project, job_id: str, outputs: dict[str, bytes], return_code: int = 0
) -> None:
    store = env.storage()
    stored = []
    for path, data in outputs.items():
        key = output_key(project.project_id, job_id, path)
        store.put_bytes(key, data)
        stored.append({"desc": {"path": path}, "sha256": sha(data), "sizeBytes": len(data), "key": key})
    phase = "SUCCESS" if return_code == 0 else "ERROR"
    fake_phase(
        env, project, job_id, phase, returnCode=return_code, outputFiles=stored, finishedAt=now_iso(),
        statusDetails="" if return_code == 0 else f"the program exited with code {return_code}",
    )  # fmt: skip


def created_job(env: ApiEnv, project: Project | None = None, **kw: Any) -> tuple[str, dict[str, bytes]]:
    """A created job with its inputs uploaded."""
    project = project or env.project_a
    inputs = unique_inputs()
    c = client(env)
    _, resp = c.create(project.project_id, params(inputs), **kw)
    c.upload(resp, inputs)
    return resp.job_id, inputs


# --- server basics --------------------------------------------------------------------------------


def test_health_and_reflection(api_env: ApiEnv) -> None:
    with api_env.api.channel() as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "yandex.cloud.datasphere.v2.jobs.ProjectJobService",
        "yandex.cloud.operation.OperationService",
        "yandex.cloud.datasphere.v2.ProjectService",
        "grpc.health.v1.Health",
    } <= names


def test_metrics_endpoint_counts_requests(api_env: ApiEnv) -> None:
    c = client(api_env)
    rpc_error(lambda: c.get("doesnotexist"))
    text = requests.get(f"http://{api_env.api.metrics}/metrics", timeout=10).text
    assert (
        'dsjobs_api_requests_total{code="NOT_FOUND",method="/yandex.cloud.datasphere.v2.jobs.ProjectJobService/Get"}'
        in text
    )
    assert "dsjobs_api_request_duration_seconds_bucket" in text
    # Every Kubernetes request, the authentication's among them (a Get of an unknown id: a token
    # review at most once per cache period, and the LIST that looks for the id).
    kube = [
        line for line in text.splitlines() if line.startswith("dsjobs_kube_request_duration_seconds_count{")
    ]
    assert any(
        'resource="projectjobs"' in line and 'code="ok"' in line and 'verb="get"' in line for line in kube
    )
    assert any('resource="tokenreviews"' in line and 'verb="post"' in line for line in kube), kube
    # The job index lists the jobs, then watches: in sync, reads come from its cache.
    poll(
        "the job index in sync",
        lambda: (
            "dsjobs_api_job_index_synced 1.0"
            in requests.get(f"http://{api_env.api.metrics}/metrics", timeout=10).text
        ),
        30,
    )


# --- auth ------------------------------------------------------------------------------------------


def _every_rpc(env: ApiEnv, job_id: str, op_id: str) -> dict[str, Callable[[Client], Any]]:
    p = env.project_a.project_id

    def stream(call: Any) -> Any:
        return list(call)

    return {
        "Create": lambda c: c.jobs.Create(
            svc.CreateProjectJobRequest(project_id=p, job_parameters=params()), metadata=c.md
        ),
        "Clone": lambda c: c.jobs.Clone(svc.CloneProjectJobRequest(source_job_id=job_id), metadata=c.md),
        "Execute": lambda c: c.jobs.Execute(svc.ExecuteProjectJobRequest(job_id=job_id), metadata=c.md),
        "Cancel": lambda c: c.jobs.Cancel(svc.CancelProjectJobRequest(job_id=job_id), metadata=c.md),
        "ReadStdLogs": lambda c: stream(
            c.jobs.ReadStdLogs(svc.ReadProjectJobStdLogsRequest(job_id=job_id), metadata=c.md, timeout=10)
        ),
        "ReadLogs": lambda c: stream(
            c.jobs.ReadLogs(svc.ReadProjectJobLogsRequest(job_id=job_id), metadata=c.md, timeout=10)
        ),
        "DownloadJobFiles": lambda c: c.jobs.DownloadJobFiles(
            svc.DownloadProjectJobFilesRequest(
                job_id=job_id, files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path="x"))]
            ),
            metadata=c.md,
        ),
        "List": lambda c: c.jobs.List(svc.ListProjectJobRequest(project_id=p), metadata=c.md),
        "Get": lambda c: c.jobs.Get(svc.GetProjectJobRequest(job_id=job_id), metadata=c.md),
        "Delete": lambda c: c.jobs.Delete(svc.DeleteProjectJobRequest(job_id=job_id), metadata=c.md),
        "DeleteData": lambda c: c.jobs.DeleteData(
            svc.DeleteProjectJobDataRequest(job_id=job_id), metadata=c.md
        ),
        "DeleteAllData": lambda c: c.jobs.DeleteAllData(
            svc.DeleteAllProjectJobDataRequest(project_id=p), metadata=c.md
        ),
        "SetDataTtl": lambda c: c.jobs.SetDataTtl(
            svc.SetProjectJobDataTtlRequest(job_id=job_id), metadata=c.md
        ),
        "Finalize": lambda c: c.jobs.Finalize(svc.FinalizeProjectJobRequest(job_id=job_id), metadata=c.md),
        "DownloadStdLogs": lambda c: c.jobs.DownloadStdLogs(
            svc.DownloadProjectJobStdLogsRequest(job_id=job_id), metadata=c.md
        ),
        "Operation.Get": lambda c: c.ops.Get(osvc.GetOperationRequest(operation_id=op_id), metadata=c.md),
        "Operation.Cancel": lambda c: c.ops.Cancel(
            osvc.CancelOperationRequest(operation_id=op_id), metadata=c.md
        ),
        "Project.Get": lambda c: c.projects.Get(psvc.GetProjectRequest(project_id=p), metadata=c.md),
        "Project.List": lambda c: c.projects.List(
            psvc.ListProjectsRequest(community_id="dsjobs"), metadata=c.md
        ),
    }


_NAMING_A_PROJECT = {"Create", "List", "DeleteAllData", "Operation.Get", "Operation.Cancel", "Project.Get"}


@pytest.fixture(scope="module")
def auth_job(api_env: ApiEnv) -> tuple[str, str]:
    job_id, _ = created_job(api_env)
    op = client(api_env).execute(job_id)
    return job_id, op.id


def test_every_rpc_needs_a_valid_token(api_env: ApiEnv, auth_job: tuple[str, str]) -> None:
    job_id, op_id = auth_job
    with api_env.api.channel() as ch:
        for md in ([], [("authorization", "Bearer not-a-token")], [("authorization", "Basic abc")]):
            for name, call in _every_rpc(api_env, job_id, op_id).items():
                e = rpc_error(lambda call=call, md=md: call(Client(ch, md)))  # type: ignore[misc]
                assert e.code == Code.UNAUTHENTICATED, (name, md, e.details)


def test_every_rpc_needs_permission_in_the_project(api_env: ApiEnv, auth_job: tuple[str, str]) -> None:
    job_id, op_id = auth_job
    calls = _every_rpc(api_env, job_id, op_id)
    with api_env.api.channel() as ch:
        outsider = Client(ch, api_env.md("outsider"))
        for name, call in calls.items():
            if name == "Project.List":
                # Lists only what the caller may see: nothing.
                assert not call(outsider).projects
                continue
            e = rpc_error(lambda call=call: call(outsider))  # type: ignore[misc]
            if name in _NAMING_A_PROJECT:
                assert e.code == Code.PERMISSION_DENIED, (name, e.details)
            else:
                # A job the caller may not read is answered as no job: whether another project ran
                # a job of an id is not the caller's to learn.
                assert e.code == Code.NOT_FOUND, (name, e.details)
                assert e.details.startswith(f"job {job_id!r} not found, or "), (name, e.details)
            assert "system:serviceaccount:" in e.details and "outsider" in e.details
        viewer = Client(ch, api_env.md("viewer"))
        reads = {
            "Get",
            "List",
            "Operation.Get",
            "Project.Get",
            "Project.List",
            "DownloadJobFiles",
            "DownloadStdLogs",
        }
        for name, call in calls.items():
            if name in reads or name.startswith("Read"):
                continue
            e = rpc_error(lambda call=call: call(viewer))  # type: ignore[misc]
            assert e.code == Code.PERMISSION_DENIED, (name, e.details)
        assert viewer.get(job_id).id == job_id
        assert viewer.jobs.List(
            svc.ListProjectJobRequest(project_id=api_env.project_a.project_id), metadata=viewer.md
        ).jobs


def test_the_built_in_edit_and_view_roles_include_the_project_roles(api_env: ApiEnv) -> None:
    """deploy/base/api-rbac.yaml aggregates dsjobs-project-user into `edit` and dsjobs-project-viewer
    into `view`: a namespace's editors run jobs and its viewers read them with no binding of the
    dsjobs roles (the cluster's aggregation controller fills the built-in roles in moments)."""
    project = api_env.project_a.project_id
    inputs = unique_inputs()
    with api_env.api.channel() as ch:
        editor = Client(ch, api_env.md("editor"))
        nsviewer = Client(ch, api_env.md("nsviewer"))

        # PERMISSION_DENIED until the aggregation (or the API's 2 s cache of a denial) catches up.
        created = poll(
            "`edit` to include dsjobs-project-user",
            lambda: _unless_denied(lambda: editor.create(project, params(inputs))),
            60,
        )
        job_id = created[1].job_id
        assert editor.get(job_id).created_by_id.endswith(":editor")  # a ServiceAccount of the test
        assert poll(
            "`view` to include dsjobs-project-viewer",
            lambda: _unless_denied(lambda: nsviewer.get(job_id)),
            60,
        )
        e = rpc_error(lambda: nsviewer.create(project, params(inputs)))
        assert e.code == Code.PERMISSION_DENIED and "nsviewer" in e.details
        e = rpc_error(
            lambda: nsviewer.jobs.Cancel(svc.CancelProjectJobRequest(job_id=job_id), metadata=nsviewer.md)
        )
        assert e.code == Code.PERMISSION_DENIED


def _unless_denied(call: Callable[[], T]) -> T | None:
    """The call's answer, or None when it was refused for want of permission (a job the caller may
    not read is NOT_FOUND)."""
    try:
        return call()
    except grpc.RpcError as exc:
        if exc.code() not in (Code.PERMISSION_DENIED, Code.NOT_FOUND):  # type: ignore[attr-defined]
            raise
        return None


def test_unknown_project_and_job(api_env: ApiEnv) -> None:
    c = client(api_env)
    e = rpc_error(lambda: c.create("no-such-project", params()))
    assert e.code == Code.NOT_FOUND and "no-such-project" in e.details
    e = rpc_error(lambda: c.create("Not_An_Id", params()))
    assert e.code == Code.INVALID_ARGUMENT and "project_id" in e.details
    e = rpc_error(lambda: c.get("nosuchjob0000000000"))
    assert e.code == Code.NOT_FOUND
    e = rpc_error(lambda: c.get(""))
    assert e.code == Code.INVALID_ARGUMENT and "job_id" in e.details
    e = rpc_error(lambda: c.op("op1bm9wZQ"))
    assert e.code == Code.NOT_FOUND
    e = rpc_error(lambda: c.projects.Get(psvc.GetProjectRequest(project_id="no-such-project"), metadata=c.md))
    assert e.code == Code.NOT_FOUND


def test_project_service_get(api_env: ApiEnv) -> None:
    c = client(api_env)
    project = c.projects.Get(psvc.GetProjectRequest(project_id=api_env.project_a.project_id), metadata=c.md)
    assert (
        project.id == api_env.project_a.project_id and project.community_id and project.HasField("created_at")
    )
    listed = c.projects.List(psvc.ListProjectsRequest(community_id=project.community_id), metadata=c.md)
    assert {api_env.project_a.project_id, api_env.project_b.project_id} <= {p.id for p in listed.projects}


# --- Create ---------------------------------------------------------------------------------------


def test_create_reports_every_problem_and_leaves_nothing_behind(api_env: ApiEnv) -> None:
    c = client(api_env)
    before = len(api_env.job_objects(api_env.project_a))
    bad = jobs_pb2.JobParameters(
        cmd="",
        input_files=[
            jobs_pb2.File(desc=jobs_pb2.FileDesc(path="../etc/passwd"), sha256="nothex", size_bytes=1),
        ],
        cloud_instance_types=[jobs_pb2.CloudInstanceType(name="z9.999")],
        env=jobs_pb2.Environment(
            docker_image_spec=jobs_pb2.DockerImageSpec(image_url="Not A Ref", password_plain_text="secret")
        ),
    )
    e = rpc_error(lambda: c.create(api_env.project_a.project_id, bad, data_ttl=Duration(seconds=60)))
    assert e.code == Code.INVALID_ARGUMENT
    details = e.details
    for fragment in (
        "cmd",
        "input_files[0].desc.path",
        "input_files[0].sha256",
        "cloud_instance_types[0]",
        "image_url",
    ):
        assert fragment in details, (fragment, details)
    e = rpc_error(lambda: c.create(api_env.project_a.project_id, params(), data_ttl=Duration(seconds=60)))
    assert e.code == Code.INVALID_ARGUMENT and "data_ttl" in e.details
    assert len(api_env.job_objects(api_env.project_a)) == before
    secrets = api_env.core().list_namespaced_secret(api_env.project_a.namespace).items
    assert not [
        s for s in secrets if s.metadata.name.endswith("-docker-password") and not _owner_exists(api_env, s)
    ]


def test_a_project_over_its_job_quota_gets_resource_exhausted(api_env: ApiEnv) -> None:
    # An admin's ResourceQuota on ProjectJobs: Create says so (not an internal error), creates
    # nothing. Until the quota controller has counted, admission refuses with "status unknown":
    # UNAVAILABLE, which the official CLI retries.
    c = client(api_env)
    ns = api_env.project_a.namespace
    quota = {"metadata": {"name": "job-count"}, "spec": {"hard": {"count/projectjobs.dsjobs.dev": "0"}}}
    api_env.core().create_namespaced_resource_quota(ns, quota)
    try:
        # Quota admission reads quotas from an informer (and caches a namespace without any for a
        # while): wait until it applies this one, probing with a dry run that stores nothing.
        probe = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ProjectJob",
            "metadata": {"generateName": "quota-probe-"},
            "spec": {"projectId": api_env.project_a.project_id, "jobParameters": {"cmd": "true"}},
        }

        def quota_applies() -> bool:
            try:
                api_env.custom().create_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, probe, dry_run="All"
                )
            except ApiException as exc:
                return exc.status == 403
            return False

        poll("quota admission to apply the new quota", quota_applies, 60)
        before = len(api_env.job_objects(api_env.project_a))
        e = rpc_error(
            lambda: c.create(api_env.project_a.project_id, params(), data_ttl=Duration(seconds=3600))
        )
        assert e.code in (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED), e
        if e.code == Code.UNAVAILABLE:
            assert "the project's quota is being counted; retry" in e.details, e

        def counted() -> bool:
            used = api_env.core().read_namespaced_resource_quota("job-count", ns).status.used or {}
            return "count/projectjobs.dsjobs.dev" in used

        # The dev cluster's quota resync is 15 s; a CRD's monitor appears within 30 s of start.
        poll("the quota counted", counted, 90)
        e = rpc_error(
            lambda: c.create(api_env.project_a.project_id, params(), data_ttl=Duration(seconds=3600))
        )
        assert e.code == Code.RESOURCE_EXHAUSTED, e
        assert "refused by the project's quota" in e.details and "exceeded quota: job-count" in e.details
        assert e.details.startswith("the new job (not created; its id would have been "), e.details
        assert len(api_env.job_objects(api_env.project_a)) == before
    finally:
        api_env.core().delete_namespaced_resource_quota("job-count", ns)


def _owner_exists(env: ApiEnv, secret: Any) -> bool:
    refs = secret.metadata.owner_references or []
    return any(env.job_object(env.project_a, r.name) is not None for r in refs)


def test_create_dedups_uploads_across_jobs(api_env: ApiEnv) -> None:
    c = client(api_env)
    inputs = unique_inputs()
    inputs["copy.csv"] = inputs["data/in.csv"]  # same content twice in one job: one upload
    _, first = c.create(api_env.project_a.project_id, params(inputs))
    assert sorted(f.file.desc.path for f in first.upload_files) == ["data/in.csv", "main.py"]
    assert all(f.url.startswith("http") for f in first.upload_files)
    c.upload(first, inputs)
    _, second = c.create(api_env.project_a.project_id, params(inputs))
    assert not second.upload_files
    assert second.job_id != first.job_id
    # A stored object with the wrong size does not count as present.
    store = api_env.storage()
    store.put_bytes(input_key(api_env.project_a.project_id, sha(inputs["main.py"])), b"truncated")
    _, third = c.create(api_env.project_a.project_id, params(inputs))
    assert [f.file.desc.path for f in third.upload_files] == ["main.py"]
    # The CLI uploads one file after another: the URLs outlive all of them on a slow link.
    big = params(inputs)
    big.input_files.append(
        jobs_pb2.File(desc=jobs_pb2.FileDesc(path="big.bin"), sha256="f" * 64, size_bytes=3 << 30)
    )
    _, fourth = c.create(api_env.project_a.project_id, big)
    assert {f.file.desc.path for f in fourth.upload_files} == {"main.py", "big.bin"}
    assert all("X-Amz-Expires=13188&" in f.url for f in fourth.upload_files)  # 900 s + 3 GiB at 256 KiB/s


def test_idempotency_key_yields_exactly_one_job(api_env: ApiEnv) -> None:
    c = client(api_env)
    other = client(api_env, replica=1)
    p = api_env.project_a.project_id
    inputs = unique_inputs()
    key = f"key-{time.time_ns()}"
    op1, r1 = c.create(p, params(inputs), key=key, name="once")
    op2, r2 = other.create(p, params(inputs), key=key, name="once")  # a retry, even on another replica
    assert r1.job_id == r2.job_id and op1.id == op2.id
    named = [j for j in api_env.job_objects(api_env.project_a) if j["spec"].get("name") == "once"]
    assert len(named) == 1
    e = rpc_error(lambda: c.create(p, params(inputs), key=key, name="something else"))
    assert e.code == Code.ALREADY_EXISTS and "Idempotency-Key" in e.details
    _, r3 = c.create(p, params(inputs), key=key + "-2", name="once")
    assert r3.job_id != r1.job_id


def test_registry_password_goes_to_an_owned_secret(api_env: ApiEnv) -> None:
    c = client(api_env)
    p = params(
        env=jobs_pb2.Environment(
            docker_image_spec=jobs_pb2.DockerImageSpec(
                image_url="registry.example.com/team/image:1.0", username="bot", password_plain_text="hunter2"
            )
        )
    )
    _, resp = c.create(api_env.project_a.project_id, p)
    obj = api_env.job_object(api_env.project_a, resp.job_id)
    assert obj is not None and "hunter2" not in str(obj)
    ref = obj["spec"]["jobParameters"]["env"]["dockerImageSpec"]["passwordSecretRef"]
    secret = api_env.core().read_namespaced_secret(ref["name"], api_env.project_a.namespace)
    import base64

    assert base64.b64decode(secret.data[ref["key"]]).decode() == "hunter2"
    owner = secret.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid) == ("ProjectJob", resp.job_id, obj["metadata"]["uid"])
    job = c.get(resp.job_id)
    assert job.job_parameters.env.docker_image_spec.username == "bot"
    assert not job.job_parameters.env.docker_image_spec.password_plain_text


# --- Execute and the full flow ----------------------------------------------------------------------


def test_execute_needs_every_input_uploaded(api_env: ApiEnv) -> None:
    c = client(api_env)
    inputs = unique_inputs()
    _, resp = c.create(api_env.project_a.project_id, params(inputs))
    e = rpc_error(lambda: c.execute(resp.job_id))
    assert e.code == Code.FAILED_PRECONDITION
    assert "main.py" in e.details and "data/in.csv" in e.details and "not uploaded" in e.details
    obj = api_env.job_object(api_env.project_a, resp.job_id)
    assert obj is not None and not obj["spec"].get("execute")
    c.upload(resp, inputs)
    op = c.execute(resp.job_id)
    assert not op.done
    obj = api_env.job_object(api_env.project_a, resp.job_id)
    assert obj is not None and obj["spec"]["execute"] is True


def test_a_job_whose_data_was_deleted_before_execution_cannot_be_executed(api_env: ApiEnv) -> None:
    # DeleteData, or the data TTL of a job left unexecuted, deleted its inputs (those no other job
    # shares: the rest may still be present, so the upload check alone would let it run).
    c = client(api_env)
    inputs = unique_inputs()
    _, resp = c.create(api_env.project_a.project_id, params(inputs))
    c.upload(resp, inputs)
    api_env.patch_status(api_env.project_a, resp.job_id, {"phase": "CREATING", "dataCleared": True})
    e = rpc_error(lambda: c.execute(resp.job_id))
    assert e.code == Code.FAILED_PRECONDITION
    assert resp.job_id in e.details and "deleted before it was executed" in e.details
    obj = api_env.job_object(api_env.project_a, resp.job_id)
    assert obj is not None and not obj["spec"].get("execute")
    # Expired (createdAt + dataTtl passed) but not yet cleared by the operator: refused as well.
    # (By the spec's TTL: the status's expiry lags a SetDataTtl until the operator rewrites it.)
    _, late = c.create(api_env.project_a.project_id, params(inputs))
    api_env.patch_status(
        api_env.project_a,
        late.job_id,
        {"phase": "CREATING", "createdAt": "2000-01-01T00:00:00Z", "dataExpiresAt": "2099-01-01T00:00:00Z"},
    )
    e = rpc_error(lambda: c.execute(late.job_id))
    assert e.code == Code.FAILED_PRECONDITION and "deleted before it was executed" in e.details


def _log_records_sent(env: ApiEnv, replica: int) -> float:
    text = requests.get(f"http://{env.replicas[replica].metrics}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dsjobs_api_log_records_sent_total"
    )


def test_full_flow_with_our_client(api_env: ApiEnv) -> None:
    """Create -> PUT -> Execute -> ReadLogs -> operation done -> GET outputs; polled on the other replica."""
    project = api_env.project_a
    c, other = client(api_env, replica=0), client(api_env, replica=1)
    inputs = unique_inputs()
    _, resp = c.create(
        project.project_id, params(inputs, output_files=[jobs_pb2.FileDesc(path="out/result.txt")])
    )
    c.upload(resp, inputs)
    job_id = resp.job_id
    op = c.execute(job_id)
    assert not op.done and op.id == other.execute(job_id).id  # Execute again = attach

    received: list[svc.LogMessage] = []
    offsets: list[int] = []
    done = threading.Event()

    def read() -> None:
        for r in c.jobs.ReadLogs(
            svc.ReadProjectJobLogsRequest(job_id=job_id, offset=0), metadata=c.md, timeout=120
        ):
            received.extend(r.logs)
            offsets.append(r.offset)
        done.set()

    sent_before = _log_records_sent(api_env, 0)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # The job runs: the "operator" moves it on, the "runner" ships logs while it runs.
    fake_phase(
        api_env,
        project,
        job_id,
        "EXECUTING",
        startedAt=now_iso(),
        progress={"progress": 40, "message": "half"},
    )
    fake_logs(api_env, project, job_id, 0, [out("line 1\n"), err("warning\n")])
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while len(received) < 2:
        assert time.monotonic() < deadline, "the first log records never arrived"
        time.sleep(0.1)
    running = other.op(op.id)
    assert not running.done
    meta = svc.ExecuteProjectJobMetadata()
    assert running.metadata.Unpack(meta)
    assert (
        meta.job.id == job_id and meta.metadata.status == jobs_pb2.EXECUTING and meta.progress.progress == 40
    )
    fake_logs(
        api_env,
        project,
        job_id,
        1,
        [out("line 2\n"), LogRecord(Stream.FILE, b"sys\n", time.time_ns(), ".system.log")],
    )
    logrecords.write_final(api_env.storage(), project.project_id, job_id, FinalMarker(next_seq=2))
    assert not done.wait(1.0), "the stream ended before the job did"
    fake_success(api_env, project, job_id, {"out/result.txt": b"42\n"})
    assert done.wait(POLL_TIMEOUT_S), "ReadLogs did not end after the job finished"
    assert [m.content for m in received] == [b"line 1\n", b"warning\n", b"line 2\n", b"sys\n"]
    assert [m.standard_stream for m in received[:3]] == [svc.OUT, svc.ERR, svc.OUT]
    assert received[3].file_path == ".system.log" and all(m.HasField("created_at") for m in received)
    assert offsets == sorted(offsets)
    assert _log_records_sent(api_env, 0) >= sent_before + 4  # the replica that streamed them counts them

    final = other.wait_op(op.id)
    assert not final.HasField("error")
    result = svc.ExecuteProjectJobResponse()
    assert final.response.Unpack(result)
    assert result.result.return_code == 0
    assert [f.file.desc.path for f in result.output_files] == ["out/result.txt"]
    assert requests.get(result.output_files[0].url, timeout=30).content == b"42\n"
    assert c.get(job_id).status == jobs_pb2.SUCCESS


def test_read_logs_resume_and_from_now(api_env: ApiEnv) -> None:
    project = api_env.project_a
    job_id, _ = created_job(api_env)
    c = client(api_env)
    c.execute(job_id)
    fake_phase(api_env, project, job_id, "EXECUTING")
    fake_logs(api_env, project, job_id, 0, [out(f"a{i}\n") for i in range(3)])
    # Take one response, drop the connection; more records come; reconnect from its offset.
    stream = c.jobs.ReadStdLogs(
        svc.ReadProjectJobStdLogsRequest(job_id=job_id, offset=0), metadata=c.md, timeout=60
    )
    first = next(iter(stream))
    stream.cancel()
    got = [x.content for x in first.logs]
    offset = first.offset
    assert got == [b"a0\n", b"a1\n", b"a2\n"]
    fake_logs(api_env, project, job_id, 1, [out(f"b{i}\n") for i in range(3)])
    # From now: nothing that was already written.
    now_stream = c.jobs.ReadLogs(
        svc.ReadProjectJobLogsRequest(job_id=job_id, offset=-1), metadata=c.md, timeout=60
    )
    responses = iter(now_stream)
    position = next(responses)  # from now: first an empty response saying where "now" is
    assert not position.logs and position.offset > offset
    fake_logs(api_env, project, job_id, 2, [out("c0\n")])
    later = next(responses)
    now_stream.cancel()
    assert [m.content for m in later.logs] == [b"c0\n"]
    logrecords.write_final(api_env.storage(), project.project_id, job_id, FinalMarker(next_seq=3))
    fake_phase(api_env, project, job_id, "SUCCESS", returnCode=0, finishedAt=now_iso())
    for r in c.jobs.ReadStdLogs(
        svc.ReadProjectJobStdLogsRequest(job_id=job_id, offset=offset), metadata=c.md, timeout=60
    ):
        got += [x.content for x in r.logs]
    assert got == [b"a0\n", b"a1\n", b"a2\n", b"b0\n", b"b1\n", b"b2\n", b"c0\n"]
    e = rpc_error(
        lambda: list(c.jobs.ReadLogs(svc.ReadProjectJobLogsRequest(job_id=job_id, offset=-5), metadata=c.md))
    )
    assert e.code == Code.INVALID_ARGUMENT and "offset" in e.details


@pytest.mark.parametrize(
    ("status", "code", "return_code"),
    [
        ({"phase": "ERROR", "returnCode": 3, "statusDetails": "exit 3"}, None, 3),
        (
            {
                "phase": "ERROR",
                "statusDetails": "image registry.example.com/x:1 could not be pulled",
                "conditions": [{"type": "Finished", "status": "False", "reason": "ImagePullBackOff"}],
            },
            Code.FAILED_PRECONDITION,
            None,
        ),
        ({"phase": "CANCELLED", "statusDetails": "cancelled by the user"}, Code.CANCELLED, None),
    ],
)
def test_execute_outcomes(
    api_env: ApiEnv, status: dict[str, Any], code: Code | None, return_code: int | None
) -> None:
    job_id, _ = created_job(api_env)
    c = client(api_env)
    op = c.execute(job_id)
    api_env.patch_status(api_env.project_a, job_id, {**status, "finishedAt": now_iso()})
    final = c.wait_op(op.id)
    if code is None:
        result = svc.ExecuteProjectJobResponse()
        assert not final.HasField("error") and final.response.Unpack(result)
        assert result.result.return_code == return_code
    else:
        assert final.error.code == code.value[0]
        assert status["statusDetails"] in final.error.message or code == Code.CANCELLED
    # Execute on a finished job returns the same, finished operation (the CLI's attach).
    again = c.execute(job_id)
    assert again.id == op.id and again.done


# --- Cancel, SetDataTtl, Finalize, DeleteData, DeleteAllData, Delete ------------------------------


def test_cancel_is_recorded_and_escalates(api_env: ApiEnv) -> None:
    job_id, _ = created_job(api_env)
    c = client(api_env)
    c.execute(job_id)
    fake_phase(api_env, api_env.project_a, job_id, "EXECUTING")
    c.jobs.Cancel(svc.CancelProjectJobRequest(job_id=job_id, reason="enough", graceful=True), metadata=c.md)
    cancel = (api_env.job_object(api_env.project_a, job_id) or {})["spec"]["cancel"]
    assert cancel["reason"] == "enough" and cancel["graceful"] is True and cancel["requestedAt"]
    c.jobs.Cancel(svc.CancelProjectJobRequest(job_id=job_id), metadata=c.md)  # the second Ctrl-C
    assert (api_env.job_object(api_env.project_a, job_id) or {})["spec"]["cancel"]["graceful"] is False
    e = rpc_error(lambda: c.jobs.Delete(svc.DeleteProjectJobRequest(job_id=job_id), metadata=c.md))
    assert e.code == Code.FAILED_PRECONDITION and "cancel" in e.details


def test_set_data_ttl(api_env: ApiEnv) -> None:
    job_id, _ = created_job(api_env)
    c = client(api_env)
    c.jobs.SetDataTtl(
        svc.SetProjectJobDataTtlRequest(job_id=job_id, ttl=Duration(seconds=3 * 86400)), metadata=c.md
    )
    assert (api_env.job_object(api_env.project_a, job_id) or {})["spec"]["dataTtl"] == "3d"
    c.jobs.SetDataTtl(svc.SetProjectJobDataTtlRequest(job_id=job_id), metadata=c.md)
    assert (api_env.job_object(api_env.project_a, job_id) or {})["spec"]["dataTtl"] == "infinity"
    e = rpc_error(
        lambda: c.jobs.SetDataTtl(
            svc.SetProjectJobDataTtlRequest(job_id=job_id, ttl=Duration(seconds=10)), metadata=c.md
        )
    )
    assert e.code == Code.INVALID_ARGUMENT and "ttl" in e.details


def test_finalize_after_the_job_ended(api_env: ApiEnv) -> None:
    job_id, _ = created_job(api_env)
    c = client(api_env)
    c.execute(job_id)
    e = rpc_error(lambda: c.jobs.Finalize(svc.FinalizeProjectJobRequest(job_id=job_id), metadata=c.md))
    assert e.code == Code.FAILED_PRECONDITION
    fake_success(api_env, api_env.project_a, job_id, {})
    assert c.jobs.Finalize(svc.FinalizeProjectJobRequest(job_id=job_id), metadata=c.md).job_id == job_id
    assert (api_env.job_object(api_env.project_a, job_id) or {})["spec"]["finalized"] is True


def test_delete_data_and_delete(api_env: ApiEnv) -> None:
    project = api_env.project_a
    job_id, _ = created_job(api_env)
    c, other = client(api_env), client(api_env, replica=1)
    eop = c.execute(job_id)
    e = rpc_error(lambda: c.jobs.DeleteData(svc.DeleteProjectJobDataRequest(job_id=job_id), metadata=c.md))
    assert e.code == Code.FAILED_PRECONDITION
    fake_success(api_env, project, job_id, {"o.txt": b"x"})
    op = c.jobs.DeleteData(svc.DeleteProjectJobDataRequest(job_id=job_id), metadata=c.md)
    assert not op.done and (api_env.job_object(project, job_id) or {})["spec"]["clearData"] is True
    fake_phase(api_env, project, job_id, "SUCCESS", dataCleared=True)
    assert other.wait_op(op.id).response.Is(svc.DeleteProjectJobDataResponse.DESCRIPTOR)
    e = rpc_error(
        lambda: c.jobs.DownloadJobFiles(
            svc.DownloadProjectJobFilesRequest(
                job_id=job_id, files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path="o.txt"))]
            ),
            metadata=c.md,
        )
    )
    assert e.code == Code.FAILED_PRECONDITION
    e = rpc_error(
        lambda: list(
            c.jobs.ReadStdLogs(svc.ReadProjectJobStdLogsRequest(job_id=job_id), metadata=c.md, timeout=10)
        )
    )
    assert (e.code, e.details) == (
        Code.FAILED_PRECONDITION,
        f"the data of job {job_id!r} was deleted, its logs with it",
    )
    dop = c.jobs.Delete(svc.DeleteProjectJobRequest(job_id=job_id), metadata=c.md)
    # The API made the job with the operator's finalizer: the deletion waits for its cleanup.
    held = api_env.job_object(project, job_id) or {}
    assert held["metadata"]["finalizers"] == ["dsjobs.dev/cleanup"]
    assert held["metadata"].get("deletionTimestamp")
    assert not other.op(dop.id).done
    api_env.release(project, job_id)
    assert other.wait_op(dop.id).done
    assert api_env.job_object(project, job_id) is None
    assert rpc_error(lambda: c.get(job_id)).code == Code.NOT_FOUND
    # Its Execute operation is over (the CLI polls until `done`).
    gone = other.op(eop.id)
    assert gone.done and gone.error.code == Code.NOT_FOUND.value[0], gone
    assert gone.error.message == f"job {job_id} was deleted"
    assert (
        rpc_error(lambda: c.jobs.Delete(svc.DeleteProjectJobRequest(job_id=job_id), metadata=c.md)).code
        == Code.NOT_FOUND
    )


def test_delete_all_data(api_env: ApiEnv) -> None:
    project = api_env.project_b  # a project of its own: the operation waits for all of its jobs
    c = client(api_env)
    finished, _ = created_job(api_env, project)
    c.execute(finished)
    fake_success(api_env, project, finished, {})
    running, _ = created_job(api_env, project)
    c.execute(running)
    fake_phase(api_env, project, running, "EXECUTING")
    op = c.jobs.DeleteAllData(
        svc.DeleteAllProjectJobDataRequest(project_id=project.project_id), metadata=c.md
    )
    assert not op.done
    assert (api_env.job_object(project, finished) or {})["spec"]["clearData"] is True
    assert not (api_env.job_object(project, running) or {})["spec"].get("clearData")
    fake_phase(api_env, project, finished, "SUCCESS", dataCleared=True)
    assert c.wait_op(op.id).response.Is(svc.DeleteAllProjectJobDataResponse.DESCRIPTOR)


# --- List -------------------------------------------------------------------------------------------


def test_list_pages_filters_and_tokens(api_env: ApiEnv) -> None:
    project = api_env.project_b
    c, other = client(api_env), client(api_env, replica=1)
    made = {c.create(project.project_id, params(), name=f"list-{i}")[1].job_id for i in range(7)}
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        # Alternate replicas: the page token is valid on every one of them (the fixture sets no
        # DSJOBS_API_PAGE_TOKEN_KEY: each derives the same key from the storage key).
        stub = (c if pages % 2 == 0 else other).jobs
        page = stub.List(
            svc.ListProjectJobRequest(project_id=project.project_id, page_size=3, page_token=token),
            metadata=c.md,
        )
        assert len(page.jobs) <= 3
        seen += [j.id for j in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert made <= set(seen) and len(seen) == len(set(seen))
    newest_first = [j for j in seen if j in made]
    assert newest_first == sorted(newest_first)  # ids count down with time
    filtered = c.jobs.List(
        svc.ListProjectJobRequest(project_id=project.project_id, filter='name = "list-3"', page_size=100),
        metadata=c.md,
    )
    assert [j.name for j in filtered.jobs] == ["list-3"]
    first = c.jobs.List(svc.ListProjectJobRequest(project_id=project.project_id, page_size=1), metadata=c.md)
    forged = first.next_page_token[:-2] + ("AA" if not first.next_page_token.endswith("AA") else "BB")
    for req, field in [
        (svc.ListProjectJobRequest(project_id=project.project_id, page_token=forged), "page_token"),
        (
            svc.ListProjectJobRequest(
                project_id=api_env.project_a.project_id, page_token=first.next_page_token
            ),
            "page_token",
        ),
        (svc.ListProjectJobRequest(project_id=project.project_id, page_size=101), "page_size"),
        (svc.ListProjectJobRequest(project_id=project.project_id, page_size=-1), "page_size"),
        (svc.ListProjectJobRequest(project_id=project.project_id, filter="owner = me"), "filter"),
    ]:
        e = rpc_error(lambda req=req: c.jobs.List(req, metadata=c.md))  # type: ignore[misc]
        assert e.code == Code.INVALID_ARGUMENT and field in e.details, (field, e.details)


# --- Clone, downloads ---------------------------------------------------------------------------------


def test_clone_reuses_stored_inputs(api_env: ApiEnv) -> None:
    c = client(api_env)
    inputs = unique_inputs()
    src_params = params({"main.py": inputs["main.py"]}, cmd="python main.py ${DATA}")
    src_params.input_files.append(
        jobs_pb2.File(
            desc=jobs_pb2.FileDesc(path="in.csv", var="DATA"),
            sha256=sha(inputs["data/in.csv"]),
            size_bytes=len(inputs["data/in.csv"]),
        )
    )
    _, resp = c.create(api_env.project_a.project_id, src_params, name="source")
    c.upload(resp, {"main.py": inputs["main.py"], "in.csv": inputs["data/in.csv"]})
    new_data = b"x,y\n" + str(time.time_ns()).encode()
    overrides = jobs_pb2.JobParameters(
        input_files=[
            jobs_pb2.File(
                desc=jobs_pb2.FileDesc(path="other.csv", var="DATA"),
                sha256=sha(new_data),
                size_bytes=len(new_data),
            )
        ]
    )
    op = c.jobs.Clone(
        svc.CloneProjectJobRequest(source_job_id=resp.job_id, job_parameters_overrides=overrides),
        metadata=c.md,
    )
    clone = svc.CloneProjectJobResponse()
    assert op.done and op.response.Unpack(clone)
    assert [f.file.desc.path for f in clone.upload_files] == ["other.csv"]
    job = c.get(clone.job_id)
    assert job.parent_job_id == resp.job_id and job.name == "source"
    assert sorted(f.desc.path for f in job.job_parameters.input_files) == ["main.py", "other.csv"]
    c.upload(clone, {"other.csv": new_data})
    assert not c.execute(clone.job_id).done
    e = rpc_error(lambda: c.jobs.Clone(svc.CloneProjectJobRequest(source_job_id="nosuchjob"), metadata=c.md))
    assert e.code == Code.NOT_FOUND
    # An override a clone would not apply is refused, not dropped; nothing is created.
    before = {
        j.id
        for j in c.jobs.List(
            svc.ListProjectJobRequest(project_id=api_env.project_a.project_id), metadata=c.md
        ).jobs
    }
    unapplied = jobs_pb2.JobParameters(
        cmd="python other.py", arguments=[jobs_pb2.Argument(name="lr", value="1")]
    )
    e = rpc_error(
        lambda: c.jobs.Clone(
            svc.CloneProjectJobRequest(source_job_id=resp.job_id, job_parameters_overrides=unapplied),
            metadata=c.md,
        )
    )
    assert e.code == Code.INVALID_ARGUMENT
    assert "job_parameters_overrides.cmd: a Clone keeps the source job's" in e.details, e.details
    assert "job_parameters_overrides.arguments[0].name: 'lr' is no argument of the source job" in e.details
    after = {
        j.id
        for j in c.jobs.List(
            svc.ListProjectJobRequest(project_id=api_env.project_a.project_id), metadata=c.md
        ).jobs
    }
    assert after == before


def test_download_job_files_and_std_logs(api_env: ApiEnv) -> None:
    project = api_env.project_a
    job_id, _ = created_job(api_env)
    c = client(api_env)
    c.execute(job_id)
    e = rpc_error(
        lambda: c.jobs.DownloadStdLogs(svc.DownloadProjectJobStdLogsRequest(job_id=job_id), metadata=c.md)
    )
    assert e.code == Code.FAILED_PRECONDITION
    fake_success(api_env, project, job_id, {"model/weights.bin": b"\x00\x01", "report.txt": b"ok"})
    store = api_env.storage()
    store.put_bytes(logrecords.log_file_key(project.project_id, job_id, "stdout.txt"), b"all of stdout\n")
    files = [jobs_pb2.File(desc=jobs_pb2.FileDesc(path=p)) for p in ("report.txt", "model/weights.bin")]
    resp = c.jobs.DownloadJobFiles(
        svc.DownloadProjectJobFilesRequest(job_id=job_id, files=files), metadata=c.md
    )
    got = {f.file.desc.path: requests.get(f.url, timeout=30).content for f in resp.download_files}
    assert got == {"report.txt": b"ok", "model/weights.bin": b"\x00\x01"}
    assert all("X-Amz-Expires=900" in f.url for f in resp.download_files)  # 15 minutes by default
    e = rpc_error(
        lambda: c.jobs.DownloadJobFiles(
            svc.DownloadProjectJobFilesRequest(
                job_id=job_id, files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path="nope.txt"))]
            ),
            metadata=c.md,
        )
    )
    assert e.code == Code.NOT_FOUND and "nope.txt" in e.details
    # No files named (the CLI's download-files of a job without outputs): an empty answer.
    empty = c.jobs.DownloadJobFiles(svc.DownloadProjectJobFilesRequest(job_id=job_id), metadata=c.md)
    assert not empty.download_files
    std = c.jobs.DownloadStdLogs(svc.DownloadProjectJobStdLogsRequest(job_id=job_id), metadata=c.md)
    assert requests.get(std.stdout_url, timeout=30).content == b"all of stdout\n" and not std.stderr_url


def test_operation_cancel_cancels_the_job(api_env: ApiEnv) -> None:
    job_id, _ = created_job(api_env)
    c = client(api_env)
    op = c.execute(job_id)
    fake_phase(api_env, api_env.project_a, job_id, "EXECUTING")
    returned = c.ops.Cancel(osvc.CancelOperationRequest(operation_id=op.id), metadata=c.md)
    assert returned.id == op.id and not returned.done
    assert (api_env.job_object(api_env.project_a, job_id) or {})["spec"]["cancel"]["graceful"] is False


# --- replicas ---------------------------------------------------------------------------------------


def test_drain_ends_log_streams_with_unavailable(api_env: ApiEnv) -> None:
    job_id, _ = created_job(api_env)
    extra = api_env.start_replica("drain")
    with extra.channel() as ch:
        c = Client(ch, api_env.md())
        c.execute(job_id)
        fake_phase(api_env, api_env.project_a, job_id, "EXECUTING")
        errors: list[grpc.RpcError] = []

        def follow() -> None:
            try:
                for _ in c.jobs.ReadLogs(
                    svc.ReadProjectJobLogsRequest(job_id=job_id), metadata=c.md, timeout=60
                ):
                    pass
            except grpc.RpcError as exc:
                errors.append(exc)

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        gauge = 'dsjobs_api_inflight_streams{method="/yandex.cloud.datasphere.v2.jobs.ProjectJobService/ReadLogs"} 1.0'
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while gauge not in requests.get(f"http://{extra.metrics}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the log stream never opened"
            time.sleep(0.1)
        assert extra.stop() == 0  # it exited by itself on SIGTERM, not killed after the wait
        t.join(30)  # a hang guard: the stream has ended by now or the test fails below
        # The stream was ended by the drain itself (UNAVAILABLE, telling where to go on), not cut
        # when the server's grace for in-flight calls ran out.
        assert not t.is_alive()
        assert (
            errors
            and errors[0].code() == Code.UNAVAILABLE
            and "reconnect with offset" in (errors[0].details() or "")
        ), errors


# --- the official CLI against the API (the test plays the operator) -------------------------------


def _play_operator(
    env: ApiEnv, project: Project, name: str, stop: threading.Event, played: list[str]
) -> None:
    """Runs every executed job named `name`: logs, an output `result.txt`, SUCCESS."""
    while not stop.is_set():
        for obj in env.job_objects(project):
            job_id = obj["metadata"]["name"]
            if obj["spec"].get("name") != name or not obj["spec"].get("execute") or job_id in played:
                continue
            played.append(job_id)
            fake_phase(env, project, job_id, "EXECUTING", startedAt=now_iso())
            fake_logs(env, project, job_id, 0, [out("hello from the job\n"), err("a warning\n")])
            logrecords.write_final(env.storage(), project.project_id, job_id, FinalMarker(next_seq=1))
            fake_success(env, project, job_id, {"result.txt": b"42\n"})
        stop.wait(0.3)


def test_official_cli_against_the_api(api_env: ApiEnv, tmp_path: Any) -> None:
    """`dsjobs datasphere` (the unmodified official CLI in its own process) through a whole job."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    project = api_env.project_a
    name = f"cli-{time.time_ns()}"
    work = Path(tmp_path)
    (work / "main.py").write_text(f"print('hello')  # {name}\n")
    (work / "config.yaml").write_text(
        f"name: {name}\ncmd: python main.py > ${{OUT}}\ninputs:\n  - main.py\noutputs:\n  - result.txt: OUT\n"
    )
    env = {
        **os.environ,
        "DSJOBS_ENDPOINT": api_env.api.endpoint,
        "DSJOBS_TOKEN": api_env.tokens["alice"],
        "DSJOBS_ENV_FILE": os.devnull,
    }
    script = Path(sys.executable).with_name("dsjobs")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), "datasphere", *args],
            cwd=work, env=env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip

    stop, played = threading.Event(), []  # type: ignore[var-annotated]
    operator = threading.Thread(
        target=_play_operator, args=(api_env, project, name, stop, played), daemon=True
    )
    operator.start()
    try:
        run = cli("project", "job", "execute", "-p", project.project_id, "-c", "config.yaml")
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert "hello from the job" in output and "a warning" in output
        assert "job link:" in output and "Failed to get community ID" not in output
        assert (work / "result.txt").read_text() == "42\n"
        job_id = played[0]
        again = cli("project", "job", "execute", "-p", project.project_id, "-c", "config.yaml")
        assert again.returncode == 0 and "no files to upload" in again.stdout + again.stderr
    finally:
        stop.set()
        operator.join(10)
    listed = cli("project", "job", "list", "-p", project.project_id)
    assert listed.returncode == 0 and job_id in listed.stdout
    got = cli("project", "job", "get", "--id", job_id)
    assert got.returncode == 0 and "SUCCESS" in got.stdout
    assert cli("project", "job", "set-data-ttl", "--id", job_id, "--days", "3").returncode == 0
    assert (api_env.job_object(project, job_id) or {})["spec"]["dataTtl"] == "3d"
    (work / "result.txt").unlink()
    downloaded = cli("project", "job", "download-files", "--id", job_id)
    assert downloaded.returncode == 0, downloaded.stderr
    assert (work / "result.txt").read_text() == "42\n"
    # (`project job delete` is not wired up in the official CLI 0.10.0: it fails before any call.)


def test_tls(api_env: ApiEnv, tmp_path: Any) -> None:
    """DSJOBS_API_TLS_CERT/_KEY: the same API over TLS (a self-signed certificate for 127.0.0.1)."""
    import datetime as dt
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsjobs-api-test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    work = Path(tmp_path)
    (work / "tls.crt").write_bytes(cert_pem)
    (work / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    replica = api_env.start_replica(
        "tls",
        ca=cert_pem,
        DSJOBS_API_TLS_CERT=str(work / "tls.crt"),
        DSJOBS_API_TLS_KEY=str(work / "tls.key"),
    )
    with grpc.insecure_channel(replica.endpoint) as plain:
        e = rpc_error(lambda: client_for(plain, api_env).get("x"))
        assert e.code == Code.UNAVAILABLE
    with replica.channel() as ch:
        c = Client(ch, api_env.md())
        project = c.projects.Get(
            psvc.GetProjectRequest(project_id=api_env.project_a.project_id), metadata=c.md
        )
        assert project.id == api_env.project_a.project_id
    assert replica.stop() == 0


# --- the deployed stack (last in this module) -----------------------------------------------------
# The stack's operator watches the whole cluster and stays up for the session: started any earlier,
# it would also run the jobs that the tests above play the operator for (two writers of one job).


def test_full_flow_with_the_operator(dsjobs_stack: Any) -> None:
    """Our minimal client through a real job: the deployed stack (API + operator + runner + nodes)."""
    stack = dsjobs_stack
    if stack.ca_file:
        from pathlib import Path

        creds = grpc.ssl_channel_credentials(Path(stack.ca_file).read_bytes())
        channel = grpc.secure_channel(stack.endpoint, creds)
    else:
        channel = grpc.insecure_channel(stack.endpoint)
    c = Client(channel, (("authorization", f"Bearer {stack.token}"),))
    tag = str(time.time_ns())
    inputs = {
        "main.py": (
            "import sys, time\n"
            "for i in range(3):\n"
            "    print(f'line {i}', flush=True)\n"
            "    time.sleep(0.3)\n"
            "print('to stderr', file=sys.stderr, flush=True)\n"
            "open(sys.argv[1], 'w').write('42\\n')\n"
            f"# {tag}\n"
        ).encode()
    }
    job_params = params(
        inputs, cmd="python main.py ${OUT}", output_files=[jobs_pb2.FileDesc(path="result.txt", var="OUT")]
    )
    _, resp = c.create(stack.project_id, job_params, name=f"api-e2e-{tag}")
    assert [f.file.desc.path for f in resp.upload_files] == ["main.py"]
    if stack.local:
        # The local overlay runs with DSJOBS_STORAGE_CREDENTIALS=project: the upload URL is signed
        # with the project's own key pair (limited to its prefix), not the bucket-wide one.
        secret = stack.kubectl_json("get", "secret", "dsjobs-project-storage", "-n", stack.project_namespace)
        access = base64.b64decode(secret["data"]["accessKey"]).decode()
        assert f"X-Amz-Credential={access}%2F" in resp.upload_files[0].url
    c.upload(resp, inputs)
    op = c.execute(resp.job_id)
    received: list[svc.LogMessage] = []
    for r in c.jobs.ReadLogs(svc.ReadProjectJobLogsRequest(job_id=resp.job_id), metadata=c.md, timeout=600):
        received.extend(r.logs)
    stdout = b"".join(
        m.content for m in received if m.HasField("standard_stream") and m.standard_stream == svc.OUT
    )
    stderr = b"".join(
        m.content for m in received if m.HasField("standard_stream") and m.standard_stream == svc.ERR
    )
    assert stdout == b"line 0\nline 1\nline 2\n" and stderr == b"to stderr\n"
    final = c.wait_op(op.id, timeout=600)
    assert not final.HasField("error"), final.error
    result = svc.ExecuteProjectJobResponse()
    assert final.response.Unpack(result) and result.result.return_code == 0
    assert [f.file.desc.path for f in result.output_files] == ["result.txt"]
    assert requests.get(result.output_files[0].url, timeout=30).content == b"42\n"
    # What the job holds in the object store: its input, its output and its logs.
    job = c.get(resp.job_id)
    files = (*job.output_files, *job.log_files, *job.diagnostic_files)
    assert job.log_files and job.output_files[0].size_bytes == 3
    assert job.data_size_bytes == len(inputs["main.py"]) + sum(f.size_bytes for f in files), job
    _, again = c.create(stack.project_id, job_params, name=f"api-e2e-{tag}-2")
    assert not again.upload_files
    # Not left in the stack's project (`make up` keeps it between runs, and `make demo` shows it).
    for job_id in (resp.job_id, again.job_id):
        c.jobs.Delete(svc.DeleteProjectJobRequest(job_id=job_id), metadata=c.md)
    channel.close()
