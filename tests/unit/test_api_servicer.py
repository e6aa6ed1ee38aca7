"""ProjectJobService and OperationService over a fake Core: what a failed call leaves behind,
idempotency, downloads, operation lookups (no cluster, no object store)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, cast

import grpc
import pytest

from dsjobs import storage as st
from dsjobs.api import errors
from dsjobs.api.auth import Identity, Verb
from dsjobs.api.cluster import ProjectInfo
from dsjobs.api.core import Core, InputCheck
from dsjobs.api.errors import ApiError, KubeError
from dsjobs.api.kube import jobs_path, secrets_path
from dsjobs.api.operations import JobSnapshot, OpKind, OpRef
from dsjobs.api.servicer import OperationService, ProjectJobService
from dsjobs.api.settings import Settings
from dsjobs.models import File
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.pb.yandex.cloud.operation import operation_service_pb2

PROJECT, NAMESPACE = "p1", "ns-p1"
SHA = "ab" * 32
INFO = ProjectInfo(PROJECT, NAMESPACE, {})
Failure = Callable[[str, str], BaseException | None]


class FakeKube:
    """Jobs and Secrets by path; `fail(method, path)` may return an exception to raise instead."""

    def __init__(self, fail: Failure | None = None) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail = fail

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        self.calls.append((method, path, body))
        error = self.fail(method, path) if self.fail else None
        if error is not None:
            raise error
        if method == "POST":
            meta = body["metadata"]
            key = f"{path}/{meta['name']}"
            if key in self.objects:
                raise KubeError(409, "AlreadyExists", f"{meta['name']} already exists")
            obj = {
                **body,
                "metadata": {
                    **meta,
                    "uid": f"uid-{len(self.calls)}",
                    "resourceVersion": "1",
                    "creationTimestamp": "2025-06-01T00:00:00Z",
                },
            }
            self.objects[key] = obj
            return obj
        if method == "GET" and path in self.objects:
            return self.objects[path]
        if method == "DELETE" and path in self.objects:
            if body["preconditions"]["uid"] != self.objects[path]["metadata"]["uid"]:
                raise KubeError(409, "Conflict", "uid precondition failed")
            return self.objects.pop(path)
        raise KubeError(404, "NotFound", f"{path} not found")

    def jobs(self) -> list[str]:
        prefix = jobs_path(NAMESPACE) + "/"
        return [k[len(prefix) :] for k in self.objects if k.startswith(prefix)]

    def methods(self) -> list[str]:
        return [m for m, _, _ in self.calls]


class FakeJobIndex:
    def remember(self, obj: Any) -> None:
        pass

    def forget(self, name: str, namespace: str | None = None) -> None:
        pass


class FakeCatalog:
    async def names(self) -> frozenset[str]:
        return frozenset({"c1.4"})


class FakeAuth:
    async def authorize(self, *args: Any) -> None:
        pass


class FakeCore:
    def __init__(
        self,
        kube: FakeKube | None = None,
        *,
        stored: Iterable[str] = (),
        storage_error: ApiError | None = None,
        presign_error: ApiError | None = None,
        project_error: ApiError | None = None,
        job: JobSnapshot | None = None,
    ) -> None:
        self.settings = Settings()
        self.kube = kube or FakeKube()
        self.jobs = FakeJobIndex()
        self.catalog = FakeCatalog()
        self.auth = FakeAuth()
        self.stored = set(stored)
        self.storage_error = storage_error
        self.presign_error = presign_error
        self.project_error = project_error
        self.job = job
        self.put_totals: list[int] = []

    async def identity(self, context: Any) -> Identity:
        return Identity("alice")

    async def project(self, project_id: str, field: str = "project_id") -> ProjectInfo:
        if self.project_error is not None:
            raise self.project_error
        return INFO

    async def authorized_project(
        self, context: Any, project_id: str, verb: Verb
    ) -> tuple[Identity, ProjectInfo]:
        return Identity("alice"), await self.project(project_id)

    async def authorized_job(
        self, context: Any, job_id: str, verb: Verb, field: str = "job_id", *, fresh: bool = False
    ) -> tuple[Identity, JobSnapshot]:
        assert self.job is not None
        return Identity("alice"), self.job

    async def k8s(self, verb: str, what: str, call: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await call
        except KubeError as exc:
            raise errors.from_kube(exc, what) from exc

    async def check_inputs(self, project_id: str, files: Sequence[tuple[str, File]]) -> list[InputCheck]:
        if self.storage_error is not None:
            raise self.storage_error
        first = {f.sha256: (p, f) for p, f in reversed(files)}
        return [
            InputCheck(p, f, f.size_bytes if f.sha256 in self.stored else None) for p, f in first.values()
        ]

    async def presign_put(self, files: Iterable[tuple[str, int]]) -> dict[str, str]:
        if self.presign_error is not None:
            raise self.presign_error
        wanted = dict(files)
        self.put_totals.append(sum(wanted.values()))
        return {k: f"https://store/{k}" for k in wanted}

    async def read_job(self, namespace: str, job_id: str, *, fresh: bool = False) -> JobSnapshot | None:
        return self.job


class FakeContext:
    def __init__(self, **metadata: str) -> None:
        self.metadata = [(k.replace("_", "-"), v) for k, v in metadata.items()]

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata


def ctx(**metadata: str) -> Any:
    """A call's context: only its metadata is read."""
    return FakeContext(**metadata)


def service(core: FakeCore) -> ProjectJobService:
    return ProjectJobService(cast(Core, core))


def call(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def failing(code: grpc.StatusCode, coro: Coroutine[Any, Any, Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        asyncio.run(coro)
    assert info.value.code == code, info.value
    return info.value


def create_request(**env: Any) -> svc.CreateProjectJobRequest:
    params = jobs_pb2.JobParameters(
        cmd="python main.py",
        input_files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path="main.py"), sha256=SHA, size_bytes=10)],
        cloud_instance_types=[jobs_pb2.CloudInstanceType(name="c1.4")],
    )
    if env:
        params.env.CopyFrom(jobs_pb2.Environment(**env))
    return svc.CreateProjectJobRequest(project_id=PROJECT, name="train", job_parameters=params)


def with_password(password: str) -> svc.CreateProjectJobRequest:
    image = jobs_pb2.DockerImageSpec(
        image_url="cr.example.com/t/img:1", username="u", password_plain_text=password
    )
    return create_request(docker_image_spec=image)


def secret_fails(error: BaseException) -> Failure:
    return lambda method, path: error if method == "POST" and path == secrets_path(NAMESPACE) else None


# --- a failed Create or Clone leaves nothing behind -------------------------------------------


def test_create_checks_storage_before_writing_the_job() -> None:
    core = FakeCore(storage_error=errors.unavailable("object storage is unavailable"))
    failing(grpc.StatusCode.UNAVAILABLE, service(core).Create(create_request(), ctx()))
    assert "POST" not in core.kube.methods() and core.kube.jobs() == []


def test_create_signs_upload_urls_before_writing_the_job() -> None:
    core = FakeCore(presign_error=errors.unavailable("object storage failed"))
    failing(grpc.StatusCode.UNAVAILABLE, service(core).Create(create_request(), ctx()))
    assert "POST" not in core.kube.methods()


def test_create_removes_its_job_when_the_password_secret_fails() -> None:
    core = FakeCore(FakeKube(secret_fails(KubeError(503, "ServiceUnavailable", "etcd"))))
    failing(grpc.StatusCode.UNAVAILABLE, service(core).Create(with_password("s3cret"), ctx()))
    assert core.kube.jobs() == []
    delete = [body for method, _, body in core.kube.calls if method == "DELETE"]
    assert delete and delete[0]["preconditions"]["uid"].startswith("uid-")


def test_create_removes_its_job_when_cancelled_after_writing_it() -> None:
    core = FakeCore(FakeKube(secret_fails(asyncio.CancelledError())))
    with pytest.raises(asyncio.CancelledError):
        call(service(core).Create(with_password("s3cret"), ctx()))
    assert core.kube.jobs() == []


def test_create_does_not_take_over_a_leftover_password_secret() -> None:
    """An earlier attempt with the same key stored a Secret, then removed its job: the GC deletes it."""
    kube = FakeKube()
    core = FakeCore(kube)
    call(service(core).Create(with_password("old"), ctx(idempotency_key="k1")))
    [job_id] = kube.jobs()
    del kube.objects[jobs_path(NAMESPACE, job_id)]  # the Secret stays until the GC comes
    failing(
        grpc.StatusCode.UNAVAILABLE, service(core).Create(with_password("new"), ctx(idempotency_key="k1"))
    )
    assert kube.jobs() == []


def test_retry_while_the_failed_attempts_job_is_being_removed_is_unavailable() -> None:
    kube = FakeKube()
    core = FakeCore(kube)
    call(service(core).Create(create_request(), ctx(idempotency_key="k1")))
    [job_id] = kube.jobs()
    kube.objects[jobs_path(NAMESPACE, job_id)]["metadata"]["deletionTimestamp"] = "2025-06-01T00:00:01Z"
    err = failing(
        grpc.StatusCode.UNAVAILABLE, service(core).Create(create_request(), ctx(idempotency_key="k1"))
    )
    assert "being removed" in err.message


def source_job(params: dict[str, Any]) -> JobSnapshot:
    return JobSnapshot.from_cr(
        {
            "metadata": {
                "name": "src1",
                "namespace": NAMESPACE,
                "uid": "u-src",
                "resourceVersion": "3",
                "creationTimestamp": "2025-06-01T00:00:00Z",
            },
            "spec": {"projectId": PROJECT, "execute": True, "jobParameters": params},
            "status": {"phase": "SUCCESS"},
        }
    )


SOURCE_PARAMS = {
    "cmd": "python main.py",
    "inputFiles": [{"desc": {"path": "main.py"}, "sha256": SHA, "sizeBytes": 10}],
    "cloudInstanceTypes": [{"name": "c1.4"}],
}


def test_clone_signs_upload_urls_before_writing_the_job() -> None:
    params = {
        **SOURCE_PARAMS,
        "inputFiles": [{"desc": {"path": "d.csv", "var": "DATA"}, "sha256": SHA, "sizeBytes": 1}],
    }
    core = FakeCore(
        stored=[SHA], presign_error=errors.unavailable("object storage failed"), job=source_job(params)
    )
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    req.job_parameters_overrides.input_files.add(
        desc=jobs_pb2.FileDesc(path="d2.csv", var="DATA"), sha256="cd" * 32, size_bytes=2
    )
    failing(grpc.StatusCode.UNAVAILABLE, service(core).Clone(req, ctx()))
    assert "POST" not in core.kube.methods()


def test_clone_removes_its_job_when_copying_the_password_fails() -> None:
    docker = {
        "dockerImageSpec": {
            "imageUrl": "cr.example.com/t/img:1",
            "username": "u",
            "passwordSecretRef": {"name": "src1-docker-password", "key": "password"},
        }
    }
    kube = FakeKube(secret_fails(KubeError(500, "InternalError", "etcd")))
    kube.objects[secrets_path(NAMESPACE, "src1-docker-password")] = {
        "data": {"password": base64.b64encode(b"s3cret").decode()}
    }
    core = FakeCore(kube, stored=[SHA], job=source_job({**SOURCE_PARAMS, "env": docker}))
    failing(
        grpc.StatusCode.UNAVAILABLE,
        service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()),
    )
    assert kube.jobs() == []
    [(_, _, secret)] = [c for c in kube.calls if c[0] == "POST" and c[1] == secrets_path(NAMESPACE)]
    assert secret["stringData"] == {"password": "s3cret"}


def test_clone_problems_name_the_merged_jobs_fields() -> None:
    """The overrides' input lands at index 1 of the merged inputs; the bad type is the source's."""
    params = {
        "cmd": "python ${A} ${B}",
        "inputFiles": [
            {"desc": {"path": "a.py", "var": "A"}, "sha256": SHA, "sizeBytes": 1},
            {"desc": {"path": "b.csv", "var": "B"}, "sha256": SHA, "sizeBytes": 1},
        ],
        "cloudInstanceTypes": [{"name": "g1.1"}],  # not in FakeCatalog any more
    }
    core = FakeCore(stored=[SHA], job=source_job(params))
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    req.job_parameters_overrides.input_files.add(
        desc=jobs_pb2.FileDesc(path="b.csv", var="B"), sha256="BAD", size_bytes=1
    )
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Clone(req, ctx()))
    head, *lines = err.message.splitlines()
    assert head == f"invalid request: 2 problems in {errors.CLONE_SUBJECT}:"
    assert [v.field for v in err.violations] == [
        "job_parameters.input_files[1].sha256",
        "job_parameters.cloud_instance_types[0].name",
    ]
    assert "job_parameters_overrides" not in "".join(lines)


def test_clone_of_a_source_with_deleted_inputs_writes_nothing() -> None:
    core = FakeCore(job=source_job(SOURCE_PARAMS))
    err = failing(
        grpc.StatusCode.FAILED_PRECONDITION,
        service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()),
    )
    assert "main.py" in err.message and "POST" not in core.kube.methods()


def test_create_answers_upload_urls_for_missing_inputs_only() -> None:
    core = FakeCore()
    op = call(service(core).Create(create_request(), ctx()))
    resp = svc.CreateProjectJobResponse()
    assert op.response.Unpack(resp)
    assert [f.url for f in resp.upload_files] == [f"https://store/{st.input_key(PROJECT, SHA)}"]
    assert core.put_totals == [10]  # the URLs live long enough for all the uploads (transfer_ttl)
    assert resp.job_id in core.kube.jobs()
    core.stored.add(SHA)
    assert not svc.CreateProjectJobResponse.FromString(
        call(service(core).Create(create_request(), ctx())).response.value
    ).upload_files


# --- idempotency --------------------------------------------------------------------------------


def test_same_key_for_another_docker_image_resource_is_already_exists() -> None:
    core = FakeCore()
    call(service(core).Create(create_request(docker_image_resource_id="img1"), ctx(idempotency_key="k1")))
    failing(
        grpc.StatusCode.ALREADY_EXISTS,
        service(core).Create(create_request(docker_image_resource_id="img2"), ctx(idempotency_key="k1")),
    )


def test_same_key_differing_only_in_the_password_is_the_same_request() -> None:
    core = FakeCore()
    first = call(service(core).Create(with_password("a"), ctx(idempotency_key="k1")))
    again = call(service(core).Create(with_password("b"), ctx(idempotency_key="k1")))
    assert first.id == again.id and len(core.kube.jobs()) == 1


# --- Duration overflow -------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [10**14, -(10**14), 315_576_000_001])
def test_out_of_range_graceful_timeout_is_invalid_argument(seconds: int) -> None:
    req = create_request()
    req.job_parameters.graceful_shutdown_parameters.timeout.seconds = seconds
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(FakeCore()).Create(req, ctx()))
    assert "job_parameters.graceful_shutdown_parameters.timeout: is not a valid Duration" in err.message
    assert "315576000000" in err.message


def test_out_of_range_graceful_timeout_in_clone_overrides_is_invalid_argument() -> None:
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    req.job_parameters_overrides.graceful_shutdown_parameters.timeout.seconds = 10**14
    core = FakeCore(stored=[SHA], job=source_job(SOURCE_PARAMS))
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Clone(req, ctx()))
    assert "job_parameters_overrides.graceful_shutdown_parameters.timeout: is not a valid" in err.message


def test_out_of_range_data_ttl_is_invalid_argument() -> None:
    req = create_request()
    req.data_ttl.seconds = 10**14
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(FakeCore()).Create(req, ctx()))
    assert "data_ttl: is not a valid Duration" in err.message


# --- downloads ---------------------------------------------------------------------------------


def test_download_of_no_files_is_an_empty_answer() -> None:
    """The CLI's download-files asks for the job's output_files: none for a job without outputs."""
    core = FakeCore(job=source_job(SOURCE_PARAMS))
    resp = call(service(core).DownloadJobFiles(svc.DownloadProjectJobFilesRequest(job_id="src1"), ctx()))
    assert resp == svc.DownloadProjectJobFilesResponse()


# --- operations --------------------------------------------------------------------------------


def get_operation(core: FakeCore) -> Any:
    op_id = OpRef(OpKind.CREATE, PROJECT, "src1", "u-src").encode()
    ops = OperationService(cast(Core, core), service(core))
    return ops.Get(operation_service_pb2.GetOperationRequest(operation_id=op_id), ctx())


def test_operation_of_an_unreachable_project_stays_unavailable() -> None:
    core = FakeCore(
        project_error=errors.unavailable("the cluster is unavailable"), job=source_job(SOURCE_PARAMS)
    )
    failing(grpc.StatusCode.UNAVAILABLE, get_operation(core))


@pytest.mark.parametrize(
    "error",
    [
        errors.not_found("project 'p1' not found"),
        errors.invalid_argument("is not a project id", "project_id"),
    ],
)
def test_operation_of_an_unknown_project_is_not_found(error: ApiError) -> None:
    core = FakeCore(project_error=error, job=source_job(SOURCE_PARAMS))
    failing(grpc.StatusCode.NOT_FOUND, get_operation(core))
