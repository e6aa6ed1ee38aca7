"""ProjectJobService and OperationService over a fake Core: what a failed call leaves behind,
idempotency, downloads, operation lookups (no cluster, no object store)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import grpc
import kube_fake
import pytest
from google.protobuf.duration_pb2 import Duration
from kube_fake import Failure

from dsjobs import storage as st
from dsjobs.api import errors
from dsjobs.api import servicer as servicer_module
from dsjobs.api.auth import Identity, Verb
from dsjobs.api.cluster import ProjectInfo
from dsjobs.api.core import Core, InputCheck, ProjectJobs
from dsjobs.api.errors import ApiError, KubeError
from dsjobs.api.kube import jobs_path, secrets_path
from dsjobs.api.operations import JobSnapshot, OpKind, OpRef
from dsjobs.api.servicer import OperationService, ProjectJobService, _conversion_error
from dsjobs.api.settings import Settings
from dsjobs.convert.common import ConversionError
from dsjobs.models import File
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.pb.yandex.cloud.operation import operation_service_pb2
from dsjobs.validation import RULES

PROJECT, NAMESPACE = "p1", "ns-p1"
SHA = "ab" * 32
INFO = ProjectInfo(PROJECT, NAMESPACE, {})


class FakeKube(kube_fake.FakeKube):
    """The shared in-memory API server (tests/shared/kube_fake.py), with this module's namespace."""

    def jobs(self) -> list[str]:
        """The jobs not being deleted (one with a finalizer stays until the operator removes it)."""
        return self.names(jobs_path(NAMESPACE))


class FakeJobIndex:
    def remember(self, obj: Any) -> None:
        pass

    def forget(self, name: str, namespace: str | None = None) -> None:
        pass


class FakeCatalog:
    async def names(self, wanted: Collection[str] = ()) -> frozenset[str]:
        return frozenset({"c1.4"})

    def invalid(self) -> dict[str, str]:
        return {
            "c1.bad": "spec.resources.requests.cpu: the cpu request is above its limit [request-above-limit]"
        }


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
        self.stored_job: JobSnapshot | None = None
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
        job = await self.read_job(NAMESPACE, job_id, fresh=fresh)
        assert job is not None
        return Identity("alice"), job

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

    async def presign_put(self, namespace: str, files: Iterable[tuple[str, int]]) -> dict[str, str]:
        if self.presign_error is not None:
            raise self.presign_error
        wanted = dict(files)
        self.put_totals.append(sum(wanted.values()))
        return {k: f"https://store/{k}" for k in wanted}

    store = None  # io() answers for it

    async def io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return None  # the store holds no progress, no logs

    async def presign_get(self, files: Iterable[tuple[str, str, int]]) -> dict[str, str]:
        return {key: f"https://store/{key}?name={name}" for key, name, _ in files}

    async def read_job(self, namespace: str, job_id: str, *, fresh: bool = False) -> JobSnapshot | None:
        """`job` if given (`stored_job` instead when fresh and given: the watch's copy lags), else
        the FakeKube's."""
        if fresh and self.stored_job is not None:
            return self.stored_job
        if self.job is not None:
            return self.job
        obj = self.kube.objects.get(jobs_path(namespace, job_id))
        return None if obj is None else JobSnapshot.from_cr(obj)

    async def get_job(self, namespace: str, job_id: str, *, fresh: bool = False) -> JobSnapshot:
        return await Core.get_job(cast(Core, self), namespace, job_id, fresh=fresh)

    async def patch_job(
        self, job: JobSnapshot, patch: Mapping[str, Any], *, guard: bool = False
    ) -> JobSnapshot:
        return await Core.patch_job(cast(Core, self), job, patch, guard=guard)

    async def all_jobs(self, info: ProjectInfo) -> ProjectJobs:
        return await Core.all_jobs(cast(Core, self), info)

    async def list_jobs(
        self, info: ProjectInfo, *, limit: int, continue_token: str = ""
    ) -> tuple[list[Mapping[str, Any]], str]:
        """Kubernetes' paging: by name, `limit` at a time, the continue token names where the next
        page starts."""
        prefix = jobs_path(info.namespace) + "/"
        names = sorted(k for k in self.kube.objects if k.startswith(prefix))
        start = names.index(continue_token) if continue_token else 0
        page = names[start : start + limit]
        rest = names[start + limit : start + limit + 1]
        return [self.kube.objects[k] for k in page], (rest[0] if rest else "")


class FakeContext:
    def __init__(self, **metadata: str) -> None:
        self.metadata = [(k.replace("_", "-"), v) for k, v in metadata.items()]

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata


def ctx(**metadata: str) -> Any:
    """A call's context: only its metadata is read."""
    return FakeContext(**metadata)


def service(core: FakeCore) -> ProjectJobService:
    jobs = ProjectJobService(cast(Core, core))
    jobs.unanswered_rechecks = (0.0, 0.0)  # looked for twice more, without waiting
    return jobs


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


def test_a_keyed_retry_does_not_take_a_leftover_password_secret_either() -> None:
    # The attempt that met the leftover could not check its owner (no answer): it kept its job
    # for the key's retry, which took the Secret of the earlier, deleted job as its own.
    class FlakySecretGet(FakeKube):
        flaky = False

        async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
            if self.flaky and method == "GET" and path.startswith(secrets_path(NAMESPACE) + "/"):
                self.flaky = False
                raise KubeError(0, "Unavailable", "no answer in time")
            return await super().request(method, path, body, **kw)

    kube = FlakySecretGet()
    core = FakeCore(kube)
    call(service(core).Create(with_password("old"), ctx(idempotency_key="k1")))
    [job_id] = kube.jobs()
    del kube.objects[jobs_path(NAMESPACE, job_id)]  # the Secret stays until the GC comes
    kube.flaky = True
    failing(
        grpc.StatusCode.UNAVAILABLE, service(core).Create(with_password("new"), ctx(idempotency_key="k1"))
    )
    err = failing(
        grpc.StatusCode.UNAVAILABLE, service(core).Create(with_password("new"), ctx(idempotency_key="k1"))
    )
    assert "from an earlier attempt is still being removed" in err.message
    # Once the garbage collector took it, the retry stores the job's own.
    del kube.objects[secrets_path(NAMESPACE, f"{job_id}-docker-password")]
    call(service(core).Create(with_password("new"), ctx(idempotency_key="k1")))
    secret = kube.objects[secrets_path(NAMESPACE, f"{job_id}-docker-password")]
    owner = secret["metadata"]["ownerReferences"][0]["uid"]
    assert owner == kube.objects[jobs_path(NAMESPACE, job_id)]["metadata"]["uid"]


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


class LostPostKube(FakeKube):
    """Stores the first job POST, then fails it with `error` as if its answer were lost; with
    `error` None it stalls there (never answers) until the call is cancelled."""

    def __init__(self, error: BaseException | None, fail: Failure | None = None) -> None:
        super().__init__(fail)
        self.error = error
        self.posted = asyncio.Event()
        self.lost = False

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        obj = await super().request(method, path, body, **kw)
        if method == "POST" and path == jobs_path(NAMESPACE) and not self.lost:
            self.lost = True
            self.posted.set()
            if self.error is None:
                await asyncio.Event().wait()
            raise self.error
        return obj


@pytest.mark.parametrize(
    "error",
    [
        KubeError(0, "Unavailable", "no answer in time"),
        KubeError(0, "Unavailable", "ServerDisconnectedError"),
        KubeError(504, "Timeout", "request did not complete within the allowed duration"),
        KubeError(500, "InternalError", "etcdserver: request timed out"),
    ],
)
def test_create_removes_its_job_when_the_answer_to_its_post_is_lost(error: KubeError) -> None:
    """The official CLI retries UNAVAILABLE with a new random id: a stored job would stay CREATING."""
    kube = LostPostKube(error)
    core = FakeCore(kube)
    failing(grpc.StatusCode.UNAVAILABLE, service(core).Create(create_request(), ctx()))
    assert kube.jobs() == []
    [(_, _, delete)] = [c for c in kube.calls if c[0] == "DELETE"]
    # Only the job as read (not executed by someone who found it in a List meanwhile).
    assert delete["preconditions"] == {"uid": "uid-1", "resourceVersion": "1"}


def test_create_whose_post_is_refused_deletes_nothing() -> None:
    core = FakeCore(FakeKube(lambda m, p: KubeError(429, "TooManyRequests", "") if m == "POST" else None))
    failing(grpc.StatusCode.UNAVAILABLE, service(core).Create(create_request(), ctx()))
    assert core.kube.methods() == ["POST"]


def test_create_cancelled_while_its_post_is_in_flight_removes_the_job() -> None:
    async def scenario() -> LostPostKube:
        kube = LostPostKube(None)
        task = asyncio.ensure_future(service(FakeCore(kube)).Create(create_request(), ctx()))
        await kube.posted.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return kube

    assert asyncio.run(scenario()).jobs() == []


class SlowGetKube(LostPostKube):
    """As LostPostKube, and the cleanup's read of the job waits for `go`."""

    def __init__(self) -> None:
        super().__init__(None)
        self.reading, self.go = asyncio.Event(), asyncio.Event()

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if method == "GET":
            self.reading.set()
            await self.go.wait()
        return await super().request(method, path, body, **kw)


async def settled() -> None:
    """Let every other task of the loop run to its end."""
    while len(asyncio.all_tasks()) > 1:
        await asyncio.sleep(0)


def test_removal_of_an_unanswered_job_outlives_a_second_cancellation() -> None:
    async def scenario() -> SlowGetKube:
        kube = SlowGetKube()
        task = asyncio.ensure_future(service(FakeCore(kube)).Create(create_request(), ctx()))
        await kube.posted.wait()
        task.cancel()
        reading = asyncio.ensure_future(kube.reading.wait())
        await asyncio.wait([reading, task], return_when=asyncio.FIRST_COMPLETED)
        assert kube.reading.is_set(), "no attempt to remove the job"
        task.cancel()  # e.g. the server drains: the call ends, its cleanup goes on
        with pytest.raises(asyncio.CancelledError):
            await task
        kube.go.set()
        await settled()
        return kube

    assert asyncio.run(scenario()).jobs() == []


class LateCommitKube(FakeKube):
    """The job POST gets no answer, and the API server stores it after the cleanup's `misses`
    GETs found nothing."""

    def __init__(self, misses: int) -> None:
        super().__init__()
        self.misses = misses
        self.pending: Any = None

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if method == "POST" and path == jobs_path(NAMESPACE):
            self.pending = body
            raise KubeError(0, "Unavailable", "no answer in time")
        try:
            return await super().request(method, path, body, **kw)
        finally:
            if method == "GET" and self.pending is not None:
                self.misses -= 1
                if self.misses == 0:
                    await super().request("POST", jobs_path(NAMESPACE), self.pending)


@pytest.mark.parametrize("misses", [1, 2])
def test_a_job_stored_after_its_unanswered_post_was_looked_for_is_removed(misses: int) -> None:
    # The cleanup's GET came before the API server stored the job: "never stored", and the job
    # stayed CREATING for ever beside the one the CLI's retry made. It is looked for again.
    async def scenario() -> LateCommitKube:
        kube = LateCommitKube(misses)
        with pytest.raises(ApiError) as err:
            await service(FakeCore(kube)).Create(create_request(), ctx())
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        await settled()
        return kube

    kube = asyncio.run(scenario())
    assert kube.jobs() == []
    assert kube.methods().count("DELETE") == 1


def test_a_job_whose_cleanup_get_got_no_answer_either_is_looked_for_again() -> None:
    # The API server that lost the POST's answer is slow: the cleanup's GET got none either, and
    # the job it stored meanwhile stayed CREATING for ever.
    class SlowServer(LateCommitKube):
        async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
            if method == "GET" and self.pending is not None:
                stored, self.pending = self.pending, None
                await FakeKube.request(self, "POST", jobs_path(NAMESPACE), stored)
                raise KubeError(0, "Unavailable", "no answer in time")
            return await super().request(method, path, body, **kw)

    async def scenario() -> LateCommitKube:
        kube = SlowServer(misses=-1)
        with pytest.raises(ApiError):
            await service(FakeCore(kube)).Create(create_request(), ctx())
        await settled()
        return kube

    kube = asyncio.run(scenario())
    assert kube.jobs() == [] and kube.methods().count("DELETE") == 1


def test_a_shutdown_has_the_cleanups_waiting_to_look_again_look_at_once() -> None:
    # A recheck asleep for seconds made the shutdown wait out its whole grace and warn that a
    # job may stay CREATING, usually for one never stored.
    async def scenario() -> LateCommitKube:
        kube = LateCommitKube(misses=-1)
        jobs = service(FakeCore(kube))
        jobs.unanswered_rechecks = (3600.0, 3600.0)
        with pytest.raises(ApiError):
            await jobs.Create(create_request(), ctx())
        assert len(jobs.cleanups) == 1
        jobs.hurrying.set()
        await asyncio.wait_for(asyncio.gather(*jobs.cleanups), 10)  # a hang guard
        assert not jobs.cleanups  # one last look, and no more scheduled
        return kube

    assert asyncio.run(scenario()).methods() == ["GET", "GET"]


def test_a_job_never_stored_is_looked_for_a_few_times_then_let_be() -> None:
    async def scenario() -> FakeKube:
        kube = LateCommitKube(misses=-1)  # never stored
        with pytest.raises(ApiError):
            await service(FakeCore(kube)).Create(create_request(), ctx())
        await settled()
        return kube

    kube = asyncio.run(scenario())
    assert kube.methods() == ["GET", "GET", "GET"]  # once at once, then after each recheck


def test_keyed_create_whose_post_answer_is_lost_leaves_the_job_to_its_retry() -> None:
    kube = LostPostKube(KubeError(0, "Unavailable", "no answer in time"))
    core = FakeCore(kube)
    failing(grpc.StatusCode.UNAVAILABLE, service(core).Create(create_request(), ctx(idempotency_key="k1")))
    assert "DELETE" not in kube.methods()
    call(service(core).Create(create_request(), ctx(idempotency_key="k1")))
    assert len(kube.jobs()) == 1


def test_unanswered_job_that_was_executed_meanwhile_is_kept() -> None:
    """Listed, so someone may have found and executed it: only a job as read is deleted."""

    class ExecutedBeforeTheDelete(LostPostKube):
        async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
            if method == "DELETE":
                self.write(path, {"spec": {"execute": True}})
            return await super().request(method, path, body, **kw)

    kube = ExecutedBeforeTheDelete(KubeError(0, "Unavailable", "no answer in time"))
    failing(grpc.StatusCode.UNAVAILABLE, service(FakeCore(kube)).Create(create_request(), ctx()))
    assert len(kube.jobs()) == 1
    assert kube.methods() == ["POST", "GET", "DELETE", "GET"]  # re-read after the conflict


def test_failed_removal_of_an_unanswered_job_is_logged_with_the_job(caplog: pytest.LogCaptureFixture) -> None:
    unavailable = KubeError(503, "ServiceUnavailable", "etcd")
    kube = LostPostKube(
        KubeError(0, "Unavailable", "no answer in time"),
        lambda m, p: unavailable if m == "DELETE" else None,
    )

    async def scenario() -> None:
        with pytest.raises(ApiError):
            await service(FakeCore(kube)).Create(create_request(), ctx())
        await settled()  # the deletion is tried again after each recheck: it fails every time

    with caplog.at_level(logging.ERROR, logger="dsjobs.api.servicer"):
        asyncio.run(scenario())
    [job_id] = kube.jobs()
    assert kube.methods().count("DELETE") == 3
    [record] = caplog.records
    assert job_id in record.getMessage() and getattr(record, "job", None) == job_id


def source_job(
    params: dict[str, Any], status: dict[str, Any] | None = None, *, created_by: str = ""
) -> JobSnapshot:
    return JobSnapshot.from_cr(
        {
            "metadata": {
                "name": "src1",
                "namespace": NAMESPACE,
                "uid": "u-src",
                "resourceVersion": "3",
                "creationTimestamp": "2025-06-01T00:00:00Z",
            },
            "spec": {
                "projectId": PROJECT,
                "execute": True,
                "jobParameters": params,
                **({"createdById": created_by} if created_by else {}),
            },
            "status": status or {"phase": "SUCCESS"},
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


def test_a_clone_of_a_source_whose_inputs_are_gone_is_told_to_create_a_new_job() -> None:
    # It was told to create a new job, then to upload the inputs to the URLs Create returned.
    core = FakeCore(stored=[], job=source_job(SOURCE_PARAMS))
    err = failing(
        grpc.StatusCode.FAILED_PRECONDITION,
        service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()),
    )
    assert err.message.startswith(
        "source job 'src1' no longer has all its inputs stored (its data was deleted or expired); create a "
        "new job instead.\ninputs of the source job missing from storage:\njob_parameters.input_files[0] "
        "'main.py'"
    ), err.message
    assert "URLs Create returned" not in err.message
    assert "POST" not in core.kube.methods()


# The source job's image, its registry password in the source's own Secret (as Create stores it).
SOURCE_DOCKER = {
    "dockerImageSpec": {
        "imageUrl": "cr.example.com/t/img:1",
        "username": "u",
        "passwordSecretRef": {"name": "src1-docker-password", "key": "password"},
    }
}


def test_clone_removes_its_job_when_copying_the_password_fails() -> None:
    kube = FakeKube(secret_fails(KubeError(500, "InternalError", "etcd")))
    kube.objects[secrets_path(NAMESPACE, "src1-docker-password")] = password_secret("u-src")
    core = FakeCore(
        kube, stored=[SHA], job=source_job({**SOURCE_PARAMS, "env": SOURCE_DOCKER}, created_by="alice")
    )
    failing(
        grpc.StatusCode.UNAVAILABLE,
        service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()),
    )
    assert kube.jobs() == []
    [(_, _, secret)] = [c for c in kube.calls if c[0] == "POST" and c[1] == secrets_path(NAMESPACE)]
    assert secret["stringData"] == {"password": "s3cret"}
    # Named for the registry it was given for (the operator sends it nowhere else).
    assert secret["metadata"]["annotations"] == {"dsjobs.dev/registry-hosts": "cr.example.com"}


def password_secret(owner_uid: str | None, *, labelled: bool = True) -> dict[str, Any]:
    """A Secret holding "s3cret", as the API stores a job's registry password (owned by the job)."""
    meta: dict[str, Any] = {"labels": {"dsjobs.dev/secret-role": "registry-password"} if labelled else {}}
    if owner_uid is not None:
        meta["ownerReferences"] = [{"kind": "ProjectJob", "name": "someone", "uid": owner_uid}]
    return {"metadata": meta, "data": {"password": base64.b64encode(b"s3cret").decode()}}


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        (
            password_secret(None, labelled=False),
            "no Secret 'db-credentials' labelled dsjobs.dev/secret-role=",
        ),
        (None, "no Secret 'db-credentials' labelled dsjobs.dev/secret-role=registry-password in its"),
        (password_secret("u-other"), "holds the registry password of ProjectJob 'someone'"),
        (password_secret(None), "is owned by no ProjectJob and has no annotation dsjobs.dev/registry-hosts"),
    ],
)
def test_clone_copies_no_secret_the_operator_would_not_send_to_the_source_job_s_registry(
    secret: dict[str, Any] | None, problem: str
) -> None:
    # A source job applied with kubectl may name any Secret of the namespace (the storage keys,
    # another member's registry password) with an image URL of its author's: the API, which may
    # read every Secret, must not copy it into a clone's labelled one.
    docker = {
        "dockerImageSpec": {
            "imageUrl": "attacker.example.com/x:1",
            "username": "u",
            "passwordSecretRef": {"name": "db-credentials", "key": "password"},
        }
    }
    kube = FakeKube()
    if secret is not None:  # a missing one is told as one not labelled: which names exist is no one's
        kube.objects[secrets_path(NAMESPACE, "db-credentials")] = secret
    core = FakeCore(kube, stored=[SHA], job=source_job({**SOURCE_PARAMS, "env": docker}, created_by="alice"))
    err = failing(
        grpc.StatusCode.FAILED_PRECONDITION,
        service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()),
    )
    assert problem in err.message and "pass the docker image with its password" in err.message
    assert kube.jobs() == [] and not [c for c in kube.calls if c[0] == "POST"]


def clone_with_the_source_s_password(created_by: str, request: svc.CloneProjectJobRequest) -> FakeKube:
    """Clone `request` (by alice) of a job of `created_by` whose registry password is in its Secret."""
    kube = FakeKube()
    kube.objects[secrets_path(NAMESPACE, "src1-docker-password")] = password_secret("u-src")
    core = FakeCore(
        kube, stored=[SHA], job=source_job({**SOURCE_PARAMS, "env": SOURCE_DOCKER}, created_by=created_by)
    )
    call(service(core).Clone(request, ctx()))
    return kube


def clone_password(kube: FakeKube) -> str:
    """The registry password in the Secret of the one job in `kube` (the clone)."""
    [job_id] = kube.jobs()
    secret = kube.objects[secrets_path(NAMESPACE, f"{job_id}-docker-password")]
    return base64.b64decode(secret["data"]["password"]).decode()


def test_the_creator_s_clone_gets_a_copy_of_the_source_s_registry_password() -> None:
    kube = clone_with_the_source_s_password("alice", svc.CloneProjectJobRequest(source_job_id="src1"))
    assert clone_password(kube) == "s3cret"


@pytest.mark.parametrize("created_by", ["bob", ""], ids=["colleague", "nobody (kubectl)"])
def test_a_clone_by_someone_else_never_gets_the_creator_s_registry_password(created_by: str) -> None:
    # The clone and its Secret are the caller's: they may edit its image before executing it and
    # pull anything of that registry with bob's credential.
    kube = FakeKube()
    kube.objects[secrets_path(NAMESPACE, "src1-docker-password")] = password_secret("u-src")
    core = FakeCore(
        kube, stored=[SHA], job=source_job({**SOURCE_PARAMS, "env": SOURCE_DOCKER}, created_by=created_by)
    )
    err = failing(
        grpc.StatusCode.FAILED_PRECONDITION,
        service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()),
    )
    assert err.message.startswith(
        "job_parameters_overrides.env.docker_image_spec.password_plain_text: the registry password "
        "of the source job 'src1' is its creator's"
    )
    assert (repr(created_by) if created_by else "not named in the job") in err.message
    assert "give your own" in err.message
    # Nothing created, and the source's Secret not even read.
    assert kube.methods() == []


def test_a_clone_by_someone_else_with_their_own_password_works() -> None:
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    req.job_parameters_overrides.env.docker_image_spec.CopyFrom(
        jobs_pb2.DockerImageSpec(
            image_url="cr.example.com/t/img:1", username="alice", password_plain_text="mine"
        )
    )
    kube = clone_with_the_source_s_password("bob", req)
    assert clone_password(kube) == "mine"
    assert [m for m, path, _ in kube.calls if path.startswith(secrets_path(NAMESPACE))] == ["POST"]


def test_a_job_whose_image_needs_no_password_is_clonable_by_anyone() -> None:
    docker = {"dockerImageSpec": {"imageUrl": "cr.example.com/t/public:1"}}
    core = FakeCore(stored=[SHA], job=source_job({**SOURCE_PARAMS, "env": docker}, created_by="bob"))
    call(service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()))
    [job_id] = core.kube.jobs()
    assert core.kube.objects[jobs_path(NAMESPACE, job_id)]["spec"]["createdById"] == "alice"
    assert not [path for _, path, _ in core.kube.calls if path.startswith(secrets_path(NAMESPACE))]


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


class SlowSecretKube(FakeKube):
    """The first Secret POST (the creating call's) waits until `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting, self.go = asyncio.Event(), asyncio.Event()

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if method == "POST" and path == secrets_path(NAMESPACE) and not self.waiting.is_set():
            self.waiting.set()
            await self.go.wait()
        return await super().request(method, path, body, **kw)


def test_concurrent_keyed_creates_with_a_password_both_get_the_job() -> None:
    """The second call stores the Secret first: the first must take it for its sibling's, not for a
    leftover of an earlier attempt (which would remove the job the second call answered)."""

    async def scenario() -> tuple[Any, Any, SlowSecretKube]:
        kube = SlowSecretKube()
        jobs = service(FakeCore(kube))
        first = asyncio.ensure_future(jobs.Create(with_password("pw"), ctx(idempotency_key="k1")))
        await kube.waiting.wait()  # the first call made the job and is storing its Secret
        second = await jobs.Create(with_password("pw"), ctx(idempotency_key="k1"))
        kube.go.set()
        return await first, second, kube

    first, second, kube = asyncio.run(scenario())
    assert first.id == second.id
    [job_id] = kube.jobs()
    secret = kube.objects[secrets_path(NAMESPACE, f"{job_id}-docker-password")]
    assert (
        secret["metadata"]["ownerReferences"][0]["uid"]
        == kube.objects[jobs_path(NAMESPACE, job_id)]["metadata"]["uid"]
    )
    assert "DELETE" not in kube.methods()


class UnansweredSecretKube(SlowSecretKube):
    """The first Secret POST waits until `go`, then gets no answer."""

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if method == "POST" and path == secrets_path(NAMESPACE) and not self.waiting.is_set():
            self.waiting.set()
            await self.go.wait()
            raise KubeError(0, "Unavailable", "no answer in time")
        return await super().request(method, path, body, **kw)


@pytest.mark.parametrize("how", ["cancelled", "unanswered"])
def test_a_keyed_create_given_up_keeps_the_job_its_retry_was_answered_with(how: str) -> None:
    """The client's deadline passed while the first call stored the Secret; its retry found the job
    and was answered. The first call then ends (cancelled, or its Secret POST unanswered): the job
    answered to the retry stays."""

    async def scenario() -> tuple[Any, SlowSecretKube]:
        kube = SlowSecretKube() if how == "cancelled" else UnansweredSecretKube()
        jobs = service(FakeCore(kube))
        first = asyncio.ensure_future(jobs.Create(with_password("pw"), ctx(idempotency_key="k1")))
        await kube.waiting.wait()
        second = await jobs.Create(with_password("pw"), ctx(idempotency_key="k1"))
        if how == "cancelled":
            first.cancel()
        else:
            kube.go.set()
        with pytest.raises((asyncio.CancelledError, grpc.RpcError, ApiError)):
            await first
        await settled()
        return second, kube

    second, kube = asyncio.run(scenario())
    assert not second.HasField("error")
    [job_id] = kube.jobs()
    assert "deletionTimestamp" not in kube.objects[jobs_path(NAMESPACE, job_id)]["metadata"]
    assert "DELETE" not in kube.methods()


# --- writes guarded against a concurrent Execute --------------------------------------------


def stored_job(kube: FakeKube, name: str, *, execute: bool = False, phase: str = "CREATING") -> None:
    kube.objects[jobs_path(NAMESPACE, name)] = {
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"u-{name}",
            "resourceVersion": "5",
            "creationTimestamp": "2025-06-01T00:00:00Z",
        },
        "spec": {"projectId": PROJECT, "execute": execute, "jobParameters": SOURCE_PARAMS},
        "status": {"phase": phase},
    }


def test_list_pages_end_before_a_client_s_receive_limit_and_resume_inside_a_kubernetes_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Big jobs (env vars of tens of KiB) must not make a page of 50 that the official CLI, at
    grpc's 4 MiB receive default, cannot take: listing the project would fail for everyone."""
    core = FakeCore()
    names = [f"job-{i:02}" for i in range(23)]
    for name in names:
        stored_job(core.kube, name)
    one = job_proto_size(core, names[0])
    monkeypatch.setattr(servicer_module, "MAX_LIST_RESPONSE_BYTES", 4 * one + one // 2)
    seen: list[str] = []
    pages: list[int] = []
    token = ""
    while True:
        page = call(
            service(core).List(
                svc.ListProjectJobRequest(project_id=PROJECT, page_size=10, page_token=token), ctx()
            )
        )
        pages.append(len(page.jobs))
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == names  # each once, in order
    assert pages == [4, 4, 4, 4, 4, 3]


def test_a_list_page_cut_by_its_size_resumes_after_its_last_job_whatever_came_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next page of a cut one must start after the last job given, not so many items into a
    listing that a job created (API ids sort newest first) or deleted meanwhile has shifted."""
    core = FakeCore()
    for i in range(10, 20):
        stored_job(core.kube, f"job-{i}")
    one = job_proto_size(core, "job-10")
    monkeypatch.setattr(servicer_module, "MAX_LIST_RESPONSE_BYTES", 3 * one + one // 2)
    first = call(service(core).List(svc.ListProjectJobRequest(project_id=PROJECT, page_size=10), ctx()))
    assert [j.id for j in first.jobs] == ["job-10", "job-11", "job-12"]
    stored_job(core.kube, "job-01")  # a newer job, sorting first
    del core.kube.objects[jobs_path(NAMESPACE, "job-11")]  # one of the first page, deleted
    second = call(
        service(core).List(
            svc.ListProjectJobRequest(project_id=PROJECT, page_size=10, page_token=first.next_page_token),
            ctx(),
        )
    )
    assert [j.id for j in second.jobs] == ["job-13", "job-14", "job-15"]


def test_a_list_page_holds_one_job_bigger_than_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    core = FakeCore()
    for name in ("a", "b"):
        stored_job(core.kube, name)
    monkeypatch.setattr(servicer_module, "MAX_LIST_RESPONSE_BYTES", 10)
    first = call(service(core).List(svc.ListProjectJobRequest(project_id=PROJECT), ctx()))
    assert [j.id for j in first.jobs] == ["a"] and first.next_page_token
    second = call(
        service(core).List(
            svc.ListProjectJobRequest(project_id=PROJECT, page_token=first.next_page_token), ctx()
        )
    )
    assert [j.id for j in second.jobs] == ["b"] and not second.next_page_token


def job_proto_size(core: FakeCore, name: str) -> int:
    page = call(service(core).List(svc.ListProjectJobRequest(project_id=PROJECT, page_size=1), ctx()))
    assert page.jobs[0].id == name
    return page.jobs[0].ByteSize()


class RacingKube(FakeKube):
    """Another replica writes `change` into a job just before this call's first `method` of it."""

    def __init__(self, method: str, change: Mapping[str, Any], names: Iterable[str]) -> None:
        super().__init__()
        self.method, self.change = method, change
        self.pending = {jobs_path(NAMESPACE, n) for n in names}

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if method == self.method and path in self.pending:
            self.pending.discard(path)
            self.write(path, self.change)
        return await super().request(method, path, body, **kw)


EXECUTED = {"spec": {"execute": True}}


def test_delete_refuses_a_job_executed_after_its_check() -> None:
    kube = RacingKube("DELETE", EXECUTED, ["j1"])
    stored_job(kube, "j1")
    err = failing(
        grpc.StatusCode.FAILED_PRECONDITION,
        service(FakeCore(kube)).Delete(svc.DeleteProjectJobRequest(job_id="j1"), ctx()),
    )
    assert "j1" in err.message and "cancel it" in err.message
    assert kube.jobs() == ["j1"]


def test_delete_of_a_job_changed_otherwise_meanwhile_deletes_it() -> None:
    kube = RacingKube("DELETE", {"status": {"statusDetails": "waiting"}}, ["j1"])
    stored_job(kube, "j1")
    op = call(service(FakeCore(kube)).Delete(svc.DeleteProjectJobRequest(job_id="j1"), ctx()))
    assert op.done and kube.jobs() == []
    preconditions = [body["preconditions"] for method, _, body in kube.calls if method == "DELETE"]
    assert preconditions == [{"uid": "u-j1", "resourceVersion": "5"}, {"uid": "u-j1", "resourceVersion": "6"}]


def test_delete_data_refuses_a_job_executed_after_its_check() -> None:
    kube = RacingKube("PATCH", EXECUTED, ["j1"])
    stored_job(kube, "j1")
    failing(
        grpc.StatusCode.FAILED_PRECONDITION,
        service(FakeCore(kube)).DeleteData(svc.DeleteProjectJobDataRequest(job_id="j1"), ctx()),
    )
    assert "clearData" not in kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]


def test_delete_data_of_a_job_changed_otherwise_meanwhile_marks_it() -> None:
    kube = RacingKube("PATCH", {"status": {"statusDetails": "waiting"}}, ["j1"])
    stored_job(kube, "j1")
    op = call(service(FakeCore(kube)).DeleteData(svc.DeleteProjectJobDataRequest(job_id="j1"), ctx()))
    assert not op.done and kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["clearData"] is True


def test_delete_all_data_leaves_a_job_executed_meanwhile_alone() -> None:
    kube = RacingKube("PATCH", EXECUTED, ["j1"])
    stored_job(kube, "j1")
    stored_job(kube, "j2")
    stored_job(kube, "j3", execute=True, phase="EXECUTING")
    op = call(
        service(FakeCore(kube)).DeleteAllData(svc.DeleteAllProjectJobDataRequest(project_id=PROJECT), ctx())
    )
    spec = {name: kube.objects[jobs_path(NAMESPACE, name)]["spec"] for name in ("j1", "j2", "j3")}
    assert [n for n, s in spec.items() if s.get("clearData")] == ["j2"]
    metadata = svc.DeleteAllProjectJobDataMetadata()
    assert op.metadata.Unpack(metadata) and not op.done


def test_delete_all_data_fails_naming_the_jobs_whose_resource_does_not_read() -> None:
    # Nothing can mark their data for deletion: the operation must not say it was all deleted.
    kube = FakeKube()
    stored_job(kube, "j1", phase="SUCCESS")
    stored_job(kube, "bad", phase="NOT-A-PHASE")
    stored_job(kube, "bad-cleared", phase="NOT-A-PHASE")
    kube.objects[jobs_path(NAMESPACE, "bad-cleared")]["status"]["dataCleared"] = True
    core = FakeCore(kube)
    op = call(service(core).DeleteAllData(svc.DeleteAllProjectJobDataRequest(project_id=PROJECT), ctx()))
    assert not op.done
    assert kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["clearData"] is True
    assert "clearData" not in kube.objects[jobs_path(NAMESPACE, "bad")]["spec"]
    kube.objects[jobs_path(NAMESPACE, "j1")]["status"]["dataCleared"] = True
    ops = OperationService(cast(Core, core), service(core))
    got = call(ops.Get(operation_service_pb2.GetOperationRequest(operation_id=op.id), ctx()))
    assert got.done and got.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "the data of 1 jobs was not deleted" in got.error.message
    assert "'bad'" in got.error.message and "bad-cleared" not in got.error.message


def test_the_jobs_of_a_project_are_read_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # DeleteAllData's operation reads every job of the project at each poll (tens of ms of CPU per
    # page of 500): on the event loop, every other call of the replica waited meanwhile.
    import threading

    import dsjobs.api.core as core_module

    kube = FakeKube()
    stored_job(kube, "j1", phase="SUCCESS")
    stored_job(kube, "j2", phase="SUCCESS")
    core = FakeCore(kube)
    op = call(service(core).DeleteAllData(svc.DeleteAllProjectJobDataRequest(project_id=PROJECT), ctx()))
    threads: set[str] = set()
    read = core_module.try_snapshot

    def recording(obj: Mapping[str, Any]) -> Any:
        threads.add(threading.current_thread().name)
        return read(obj)

    monkeypatch.setattr(core_module, "try_snapshot", recording)
    ops = OperationService(cast(Core, core), service(core))
    got = call(ops.Get(operation_service_pb2.GetOperationRequest(operation_id=op.id), ctx()))
    assert not got.done and threads and threading.main_thread().name not in threads


def cancel_request(graceful: bool, reason: str) -> dict[str, Any]:
    return {
        "spec": {"cancel": {"reason": reason, "graceful": graceful, "requestedAt": "2025-06-01T00:00:01Z"}}
    }


def cancel_racing(change: Mapping[str, Any], *, graceful: bool) -> RacingKube:
    """Cancel j1 (running) while another replica writes `change` between this call's read and its write."""
    kube = RacingKube("PATCH", change, ["j1"])
    stored_job(kube, "j1", execute=True, phase="EXECUTING")
    req = svc.CancelProjectJobRequest(job_id="j1", reason="mine", graceful=graceful)
    call(service(FakeCore(kube)).Cancel(req, ctx()))
    return kube


def test_a_graceful_cancel_landing_after_a_forceful_one_does_not_undo_it() -> None:
    # The CLI's graceful Ctrl-C and someone's forceful cancel at once, on two replicas: both read
    # no cancel; the graceful one, written second, must not turn the kill into a graceful wait.
    kube = cancel_racing(cancel_request(False, "forceful"), graceful=True)
    assert kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["cancel"]["graceful"] is False
    assert kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["cancel"]["reason"] == "forceful"
    patches = [body for method, _, body in kube.calls if method == "PATCH"]
    assert [b["metadata"]["resourceVersion"] for b in patches] == ["5"]  # refused; nothing left to do


def test_a_forceful_cancel_landing_after_a_graceful_one_escalates_it() -> None:
    kube = cancel_racing(cancel_request(True, "graceful"), graceful=False)
    cancel = kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["cancel"]
    assert cancel["graceful"] is False and cancel["reason"] == "graceful"
    patches = [body for method, _, body in kube.calls if method == "PATCH"]
    assert [b["metadata"]["resourceVersion"] for b in patches] == ["5", "6"]
    assert patches[1]["spec"] == {"cancel": {"graceful": False}}


@pytest.mark.parametrize("graceful", [True, False])
def test_a_cancel_of_a_job_that_ended_meanwhile_writes_nothing(graceful: bool) -> None:
    kube = cancel_racing({"status": {"phase": "SUCCESS"}}, graceful=graceful)
    assert "cancel" not in kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]


def test_a_cancel_of_a_job_changed_otherwise_meanwhile_is_written() -> None:
    kube = cancel_racing({"status": {"statusDetails": "running"}}, graceful=True)
    cancel = kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["cancel"]
    assert cancel["graceful"] is True and cancel["reason"] == "mine"


# --- Duration overflow -------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [10**14, -(10**14), 315_576_000_001])
def test_out_of_range_graceful_timeout_is_invalid_argument(seconds: int) -> None:
    req = create_request()
    req.job_parameters.graceful_shutdown_parameters.timeout.seconds = seconds
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(FakeCore()).Create(req, ctx()))
    assert "job_parameters.graceful_shutdown_parameters.timeout: is not a valid Duration" in err.message
    assert "315576000000" in err.message


def test_an_unknown_enum_in_clone_overrides_is_invalid_argument() -> None:
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    req.job_parameters_overrides.extended_working_storage.type = 99
    core = FakeCore(stored=[SHA], job=source_job(SOURCE_PARAMS))
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Clone(req, ctx()))
    assert "job_parameters_overrides.extended_working_storage.type: " in err.message


def test_clone_overrides_it_would_not_apply_are_invalid_argument_and_create_nothing() -> None:
    # They were dropped without a word: the clone ran the source's parameters (an unknown var, a
    # cmd, a graceful shutdown: also invalid values in them got through).
    params = {
        **SOURCE_PARAMS,
        "inputFiles": [{"desc": {"path": "d.csv", "var": "DATA"}, "sha256": SHA, "sizeBytes": 1}],
        "outputFiles": [{"path": "out.txt", "var": "OUT"}],
        "arguments": [{"name": "epochs", "value": "3"}],
    }
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    o = req.job_parameters_overrides
    o.input_files.add(desc=jobs_pb2.FileDesc(path="e.csv", var="NOPE"), sha256=SHA, size_bytes=1)
    o.input_files.add(desc=jobs_pb2.FileDesc(path="f.csv"), sha256=SHA, size_bytes=1)
    o.input_files.add(desc=jobs_pb2.FileDesc(path="g.csv", var="OUT"), sha256=SHA, size_bytes=1)
    o.output_files.add(path="o2.txt", var="DATA")
    o.arguments.add(name="epochs", value="5")
    o.arguments.add(name="epochs", value="6")
    o.arguments.add(name="lr", value="0.1")
    kube = FakeKube()
    core = FakeCore(kube, stored=[SHA], job=source_job(params))
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Clone(req, ctx()))
    p = "job_parameters_overrides"
    for line in (
        f"{p}.input_files[0].desc.var: 'NOPE' is no var of the source job's input files [clone-var]",
        f"{p}.input_files[1].desc.var: is required: a Clone replaces the source job's input files of the same var",
        f"{p}.input_files[2].desc.var: 'OUT' is no var of the source job's input files (it is one of its output "
        "files) [clone-var]",
        f"{p}.output_files[0].var: 'DATA' is no var of the source job's output files (it is one of its input files)",
        f"{p}.arguments[1].name: 'epochs' is already overridden at {p}.arguments[0].name [var-unique]",
        f"{p}.arguments[2].name: 'lr' is no argument of the source job [clone-arg]",
    ):
        assert line in err.message, (line, err.message)
    assert err.message.startswith("invalid request: 6 problems:")
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    o = req.job_parameters_overrides
    o.cmd = "python other.py"
    o.graceful_shutdown_parameters.signal = 9
    o.env.python_env.python_version = "3.11"
    o.attach_project_disk = True
    o.s3_mount_ids.append("m1")
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Clone(req, ctx()))
    for line in (
        f"{p}.cmd: a Clone keeps the source job's; create a new job to change it [clone-keeps]",
        f"{p}.env.python_env: a Clone keeps",
        f"{p}.attach_project_disk: a Clone keeps",
        f"{p}.s3_mount_ids: a Clone keeps",
        f"{p}.graceful_shutdown_parameters: a Clone keeps",
    ):
        assert line in err.message, (line, err.message)
    assert err.message.startswith("invalid request: 5 problems:")
    assert kube.methods() == []
    # What the CLI's fork sends (vars, arguments, env vars, docker, working storage, types) goes.
    ok = svc.CloneProjectJobRequest(source_job_id="src1")
    ok.job_parameters_overrides.input_files.add(
        desc=jobs_pb2.FileDesc(path="e.csv", var="DATA"), sha256=SHA, size_bytes=1
    )
    ok.job_parameters_overrides.output_files.add(path="o2.txt", var="OUT")
    ok.job_parameters_overrides.arguments.add(name="epochs", value="5")
    ok.job_parameters_overrides.env.vars["A"] = "1"
    assert asyncio.run(service(FakeCore(stored=[SHA], job=source_job(params))).Clone(ok, ctx())).id


def test_out_of_range_data_ttl_is_invalid_argument() -> None:
    req = create_request()
    req.data_ttl.seconds = 10**14
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(FakeCore()).Create(req, ctx()))
    assert "data_ttl: is not a valid Duration" in err.message
    # The CLI's set-data-ttl --days 400: told what the CLI calls forever.
    ttl = svc.SetProjectJobDataTtlRequest(job_id="src1", ttl=Duration(seconds=400 * 86400))
    core = FakeCore(job=source_job(SOURCE_PARAMS))
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).SetDataTtl(ttl, ctx()))
    assert err.message == (
        "invalid request: 1 problem:\n"
        "ttl: must be between 1h and 365d (unset: keep the data forever, the CLI's --days infinity) [data-ttl]"
    )


def test_a_registry_password_too_long_for_its_secret_is_invalid_argument() -> None:
    # The operator's registry Secret holds it twice: 500 KiB took it past a Secret's 1 MiB, and
    # the job failed every reconcile after its uploads.
    err = failing(
        grpc.StatusCode.INVALID_ARGUMENT,
        service(FakeCore()).Create(with_password("x" * (64 * 1024 + 1)), ctx()),
    )
    assert err.message == (
        "job_parameters.env.docker_image_spec.password_plain_text: must be at most 65536 bytes (UTF-8), "
        "not 65537"
    )
    call(service(FakeCore()).Create(with_password("x" * 64 * 1024), ctx()))
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    req.job_parameters_overrides.env.docker_image_spec.password_plain_text = "ж" * 40000
    core = FakeCore(stored=[SHA], job=source_job(SOURCE_PARAMS))
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Clone(req, ctx()))
    assert "job_parameters_overrides.env.docker_image_spec.password_plain_text" in err.message


def test_a_create_s_data_ttl_out_of_range_is_not_offered_infinity() -> None:
    # A protobuf Duration cannot say `infinity`: the rule a Create can follow is the range.
    req = create_request()
    req.data_ttl.seconds = 1800
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(FakeCore()).Create(req, ctx()))
    assert "data_ttl: must be between 1h and 365d [data-ttl]" in err.message
    assert "infinity" not in err.message


# --- downloads ---------------------------------------------------------------------------------


def test_download_of_no_files_is_an_empty_answer() -> None:
    """The CLI's download-files asks for the job's output_files: none for a job without outputs."""
    core = FakeCore(job=source_job(SOURCE_PARAMS))
    resp = call(service(core).DownloadJobFiles(svc.DownloadProjectJobFilesRequest(job_id="src1"), ctx()))
    assert resp == svc.DownloadProjectJobFilesResponse()


def test_a_download_is_named_for_the_file_s_last_name_from_a_windows_path_too() -> None:
    # The name a browser or curl saves the file as (the official CLI picks its own).
    path = "C:\\Users\\me\\result.csv"
    params = {**SOURCE_PARAMS, "outputFiles": [{"path": path, "var": "RES"}]}
    key = f"projects/{PROJECT}/jobs/src1/outputs/.dsjobs-vars/RES/result.csv"
    stored = {
        "phase": "SUCCESS",
        "outputFiles": [
            {"desc": {"path": path, "var": "RES"}, "sha256": "0a" * 32, "sizeBytes": 3, "key": key}
        ],
    }
    job = source_job(params, stored, created_by="alice")
    req = svc.DownloadProjectJobFilesRequest(
        job_id="src1", files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path=path, var="RES"))]
    )
    resp = call(service(FakeCore(job=job)).DownloadJobFiles(req, ctx()))
    assert [f.url for f in resp.download_files] == [f"https://store/{key}?name=result.csv"]


def test_downloads_of_a_job_this_replica_has_not_seen_end_yet_read_the_stored_job() -> None:
    # Another replica told the CLI the job ended; this one's watch copy lags a moment behind.
    key = f"projects/{PROJECT}/jobs/src1/outputs/report.txt"
    ended = {
        "phase": "SUCCESS",
        "outputFiles": [{"desc": {"path": "report.txt"}, "sha256": "0a" * 32, "sizeBytes": 2, "key": key}],
    }
    core = FakeCore(job=source_job(SOURCE_PARAMS, {"phase": "EXECUTING"}))
    core.stored_job = source_job(SOURCE_PARAMS, ended)
    req = svc.DownloadProjectJobFilesRequest(
        job_id="src1", files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path="report.txt"))]
    )
    resp = call(service(core).DownloadJobFiles(req, ctx()))
    assert [f.url for f in resp.download_files] == [f"https://store/{key}?name=report.txt"]
    # DownloadStdLogs too: the stored job has ended (its files: none in this store).
    core.store = SimpleNamespace(head=lambda key: None)
    std = svc.DownloadProjectJobStdLogsRequest(job_id="src1")
    err = failing(grpc.StatusCode.NOT_FOUND, service(core).DownloadStdLogs(std, ctx()))
    assert "has no stored stdout/stderr" in err.message
    # A file the stored job lacks too is not found.
    req.files[0].desc.path = "nope.txt"
    err = failing(grpc.StatusCode.NOT_FOUND, service(core).DownloadJobFiles(req, ctx()))
    assert err.message == "files[0]: job 'src1' has no stored file 'nope.txt'"


def test_an_output_with_a_log_s_path_does_not_hide_the_log() -> None:
    prefix = f"projects/{PROJECT}/jobs/src1"
    out_sha, log_sha = "0a" * 32, "0b" * 32
    stored = {
        "phase": "SUCCESS",
        "outputFiles": [
            {
                "desc": {"path": "stdout.txt"},
                "sha256": out_sha,
                "sizeBytes": 3,
                "key": f"{prefix}/outputs/stdout.txt",
            }
        ],
        "logFiles": [
            {
                "desc": {"path": "stdout.txt"},
                "sha256": log_sha,
                "sizeBytes": 5,
                "key": f"{prefix}/logs/files/stdout.txt",
            }
        ],
    }
    job = source_job(SOURCE_PARAMS, stored)
    wanted = [
        jobs_pb2.File(desc=jobs_pb2.FileDesc(path="stdout.txt"), sha256=out_sha),
        jobs_pb2.File(desc=jobs_pb2.FileDesc(path="stdout.txt"), sha256=log_sha),
        jobs_pb2.File(desc=jobs_pb2.FileDesc(path="stdout.txt")),  # without content: the first stored
    ]
    req = svc.DownloadProjectJobFilesRequest(job_id="src1", files=wanted)
    resp = call(service(FakeCore(job=job)).DownloadJobFiles(req, ctx()))
    assert [f.url.split("?")[0] for f in resp.download_files] == [
        f"https://store/{prefix}/outputs/stdout.txt",
        f"https://store/{prefix}/logs/files/stdout.txt",
        f"https://store/{prefix}/outputs/stdout.txt",
    ]


def test_std_logs_of_a_job_not_ended_are_not_an_earlier_attempt_s() -> None:
    job = source_job(SOURCE_PARAMS, {"phase": "EXECUTING"})
    err = failing(
        grpc.StatusCode.FAILED_PRECONDITION,
        service(FakeCore(job=job)).DownloadStdLogs(
            svc.DownloadProjectJobStdLogsRequest(job_id="src1"), ctx()
        ),
    )
    assert "stored when it ends; use ReadLogs meanwhile" in err.message


# --- operations --------------------------------------------------------------------------------


def get_operation(core: FakeCore) -> Any:
    op_id = OpRef(OpKind.CREATE, PROJECT, "src1", "u-src").encode()
    ops = OperationService(cast(Core, core), service(core))
    return ops.Get(operation_service_pb2.GetOperationRequest(operation_id=op_id), ctx())


class ViewerAuth:
    """A caller allowed `get` only (the viewer role); records what is asked."""

    def __init__(self) -> None:
        self.verbs: list[Verb] = []

    async def authorize(self, identity: Any, verb: Verb, namespace: str, project_id: str) -> None:
        self.verbs.append(verb)
        if verb != Verb.GET:
            raise errors.permission_denied(f"may not {verb} jobs of project {project_id!r}")


@pytest.mark.parametrize("viewer", [True, False])
def test_a_create_operation_s_upload_urls_go_only_to_those_who_may_create_jobs(viewer: bool) -> None:
    # Presigned PUTs into the project's input store: a viewer reading the operation gets none.
    core = FakeCore(job=source_job(SOURCE_PARAMS))  # nothing stored: main.py is to be uploaded
    if viewer:
        core.auth = ViewerAuth()
    resp = svc.CreateProjectJobResponse()
    assert call(get_operation(core)).response.Unpack(resp)
    assert bool(resp.upload_files) is not viewer
    if viewer:
        assert core.auth.verbs == [Verb.GET, Verb.CREATE]


@pytest.mark.parametrize("kind", [OpKind.CREATE, OpKind.CLONE, OpKind.EXECUTE])
def test_an_operation_of_a_deleted_job_is_done_with_not_found(kind: OpKind) -> None:
    # The official CLI retries every failed poll and stops only at `done`: a NOT_FOUND answer to
    # the Get itself kept it polling a deleted job's operation for good.
    core = FakeCore(job=None)
    op_id = OpRef(kind, PROJECT, "gone1", "u-gone").encode()
    ops = OperationService(cast(Core, core), service(core))
    op = call(ops.Get(operation_service_pb2.GetOperationRequest(operation_id=op_id), ctx()))
    assert op.done and op.id == op_id
    assert op.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert op.error.message == "job gone1 was deleted"
    if kind == OpKind.EXECUTE:
        meta = svc.ExecuteProjectJobMetadata()
        assert op.metadata.Unpack(meta)
        # What the CLI reads for its job link and Ctrl-C cancel.
        assert (meta.job.id, meta.job.project_id) == ("gone1", PROJECT)
    else:
        meta_type = svc.CloneProjectJobMetadata if kind == OpKind.CLONE else svc.CreateProjectJobMetadata
        meta = meta_type()
        assert op.metadata.Unpack(meta) and meta.job_id == "gone1"


def test_a_stale_cache_is_no_reason_to_end_an_operation() -> None:
    # The watch cache still holds an earlier job of the name (another uid): the job is read
    # afresh before the operation is told done and gone, which ends the CLI's polling.
    core = FakeCore(job=source_job(SOURCE_PARAMS))
    assert core.job is not None
    current = core.job
    stale = JobSnapshot(**{**current.__dict__, "uid": "u-earlier"})
    reads: list[bool] = []

    async def read_job(namespace: str, job_id: str, *, fresh: bool = False) -> JobSnapshot | None:
        reads.append(fresh)
        return current if fresh else stale

    core.read_job = read_job  # type: ignore[method-assign]
    op_id = OpRef(OpKind.CREATE, PROJECT, current.name, current.uid).encode()
    ops = OperationService(cast(Core, core), service(core))
    op = call(ops.Get(operation_service_pb2.GetOperationRequest(operation_id=op_id), ctx()))
    assert op.done and not op.HasField("error") and op.HasField("response")
    assert reads == [False, True]


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


@pytest.mark.parametrize(
    ("reason", "rule"),
    [("stop\x00\x1b[2J", "control-chars"), ("x" * 4097, "max-length")],
    ids=["control", "long"],
)
def test_cancel_refuses_a_reason_the_spec_would_refuse(reason: str, rule: str) -> None:
    # It is written to spec.cancel.reason and shown in the status details (escape sequences would
    # reach every terminal that prints them).
    kube = FakeKube()
    path = jobs_path(NAMESPACE, "j1")
    kube.objects[path] = {
        "metadata": {
            "name": "j1",
            "namespace": NAMESPACE,
            "uid": "u1",
            "resourceVersion": "1",
            "creationTimestamp": "2025-06-01T00:00:00Z",
        },
        "spec": {"projectId": PROJECT, "execute": True, "jobParameters": {"cmd": "python x.py"}},
        "status": {"phase": "PREPARING"},
    }
    with pytest.raises(ApiError) as info:
        asyncio.run(
            service(FakeCore(kube)).Cancel(svc.CancelProjectJobRequest(job_id="j1", reason=reason), ctx())
        )
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason:" in info.value.message and f"[{rule}]" in info.value.message
    assert "cancel" not in kube.objects[path]["spec"]
    multi_line = "stopped by the scheduler\nsee ticket 42"
    asyncio.run(
        service(FakeCore(kube)).Cancel(svc.CancelProjectJobRequest(job_id="j1", reason=multi_line), ctx())
    )
    assert kube.objects[path]["spec"]["cancel"]["reason"] == multi_line


def test_a_proto_value_with_no_model_equivalent_is_refused_with_a_documented_rule() -> None:
    err = _conversion_error(
        ConversionError("job_parameters.graceful_shutdown_parameters.timeout", "out of range")
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_parameters.graceful_shutdown_parameters.timeout: out of range [type]" in err.message
    assert "type" in RULES


def test_create_refuses_an_instance_type_the_operator_would_refuse() -> None:
    """An InstanceType of the cluster that is invalid: the operator fails a job naming it, after
    its user uploaded the inputs; Create tells it at once."""
    core = FakeCore()
    req = create_request()
    req.job_parameters.cloud_instance_types[0].name = "c1.bad"
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Create(req, ctx()))
    assert [v.field for v in err.violations] == ["job_parameters.cloud_instance_types[0].name"]
    assert "c1.bad is invalid" in err.message and "cpu request is above its limit" in err.message, err.message
    assert "POST" not in core.kube.methods() and core.kube.jobs() == []


def test_create_refuses_an_oversized_list_by_its_count_alone() -> None:
    core = FakeCore()
    req = create_request()
    req.job_parameters.cloud_instance_types.extend([jobs_pb2.CloudInstanceType(name="c1.4")] * 200_000)
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Create(req, ctx()))
    assert err.message.splitlines() == [
        "invalid request: 1 problem:",
        "job_parameters.cloud_instance_types: must have at most 100 entries, has 200001 [max-items]",
    ]
    assert "POST" not in core.kube.methods() and core.kube.jobs() == []


def test_a_conda_yaml_of_a_hundred_thousand_problems_is_refused_with_a_bounded_listing() -> None:
    # 256 KiB of `[a,a,...]`: 131,001 conda packages, each a problem.
    conda = "dependencies: [" + "a," * 131_000 + "a]"
    core = FakeCore()
    req = create_request(python_env=jobs_pb2.PythonEnv(conda_yaml=conda))
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Create(req, ctx()))
    head, *lines = err.message.splitlines()
    assert head == "invalid request: 51 problems:"
    assert lines[0] == (
        "job_parameters.env.python_env.conda_yaml: dependencies[0] 'a' is a conda package: this server "
        "installs with pip only; list it under pip: (or in requirements) [conda-yaml]"
    )
    assert lines[-1].startswith("... and ") and len(lines) <= 51
    assert 0 < len(err.violations) <= 50 and err.wire_bytes() <= errors.MAX_STATUS_BYTES
    assert "POST" not in core.kube.methods()


def test_create_validates_the_spec_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hundreds of ms for a spec at its limits, which every other call of the replica would wait.
    threads: list[threading.Thread] = []
    validate = servicer_module.validate_job_spec

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return validate(*args, **kwargs)

    monkeypatch.setattr(servicer_module, "validate_job_spec", recording)
    call(service(FakeCore()).Create(create_request(), ctx()))
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


def test_clone_refuses_oversized_overrides_by_the_requests_field() -> None:
    core = FakeCore(stored=[SHA], job=source_job({"cmd": "python main.py"}))
    req = svc.CloneProjectJobRequest(source_job_id="src1")
    req.job_parameters_overrides.env.vars.update({f"V{i}": "x" for i in range(300)})
    err = failing(grpc.StatusCode.INVALID_ARGUMENT, service(core).Clone(req, ctx()))
    assert [v.field for v in err.violations] == ["job_parameters_overrides.env.vars"]
    assert "POST" not in core.kube.methods()


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_execute_judges_the_expiry_by_the_spec_s_ttl_not_a_stale_status() -> None:
    """After SetDataTtl the operator rewrites status.dataExpiresAt a moment later: an Execute
    meanwhile was refused by the old expiry (or let through by it)."""
    created = datetime.now(UTC) - timedelta(hours=2)
    for ttl, stale, executes in (
        ("1d", created + timedelta(hours=1), True),
        ("1h", created + timedelta(days=1), False),
    ):
        kube = FakeKube()
        stored_job(kube, "j1")
        obj = kube.objects[jobs_path(NAMESPACE, "j1")]
        obj["spec"]["dataTtl"] = ttl
        obj["status"] = {"phase": "CREATING", "createdAt": ts(created), "dataExpiresAt": ts(stale)}
        request = svc.ExecuteProjectJobRequest(job_id="j1")
        if executes:
            call(service(FakeCore(kube, stored=[SHA])).Execute(request, ctx()))
            assert kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["execute"] is True
        else:
            err = failing(
                grpc.StatusCode.FAILED_PRECONDITION,
                service(FakeCore(kube, stored=[SHA])).Execute(request, ctx()),
            )
            assert "was deleted before it was executed" in err.message


DELETING = {
    "type": "DataCleared",
    "status": "False",
    "reason": "Deleting",
    "message": "stored data being deleted (data TTL expired)",
}


def test_set_data_ttl_is_refused_once_the_data_goes() -> None:
    """A TTL written while (or after) the operator deletes the data would say the data stays: the
    deletion ends whatever the TTL becomes once the operator has marked it."""
    finished = datetime.now(UTC) - timedelta(days=2)
    forever = svc.SetProjectJobDataTtlRequest(job_id="j1")  # no ttl: the CLI's --days infinity
    cases = {
        # Marked by the operator (a clock ahead of this replica's), not expired by this one's.
        "is being deleted": {
            "phase": "SUCCESS",
            "finishedAt": ts(datetime.now(UTC)),
            "conditions": [DELETING],
        },
        "was deleted": {"phase": "SUCCESS", "finishedAt": ts(finished), "dataCleared": True},
        # Expired by this replica's clock, the operator's mark not seen yet.
        "is being deleted ": {"phase": "SUCCESS", "finishedAt": ts(finished)},
    }
    for said, status in cases.items():
        kube = FakeKube()
        stored_job(kube, "j1", execute=True, phase="SUCCESS")
        obj = kube.objects[jobs_path(NAMESPACE, "j1")]
        obj["spec"]["dataTtl"] = "1d"
        obj["status"] = status
        err = failing(grpc.StatusCode.FAILED_PRECONDITION, service(FakeCore(kube)).SetDataTtl(forever, ctx()))
        assert err.message == (
            f"the data of job 'j1' {said.strip()} (DeleteData or its data TTL): its TTL can no longer change"
        )
        assert obj["spec"]["dataTtl"] == "1d" and "PATCH" not in kube.methods()
        # The TTL it has already (a retry of a call that took effect): nothing changes, no error.
        same = svc.SetProjectJobDataTtlRequest(job_id="j1", ttl=Duration(seconds=86400))
        call(service(FakeCore(kube)).SetDataTtl(same, ctx()))
        assert "PATCH" not in kube.methods()
    # Not expired yet: set.
    kube = FakeKube()
    stored_job(kube, "j1", execute=True, phase="SUCCESS")
    kube.objects[jobs_path(NAMESPACE, "j1")]["status"] = {"phase": "SUCCESS", "finishedAt": ts(finished)}
    call(service(FakeCore(kube)).SetDataTtl(forever, ctx()))
    assert kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]["dataTtl"] == "infinity"
    # The operator's mark landed between the read and the write: read again, refused.
    kube = RacingKube("PATCH", {"status": {"conditions": [DELETING]}}, ["j1"])
    stored_job(kube, "j1", execute=True, phase="SUCCESS")
    kube.objects[jobs_path(NAMESPACE, "j1")]["status"] = {"phase": "SUCCESS", "finishedAt": ts(finished)}
    err = failing(grpc.StatusCode.FAILED_PRECONDITION, service(FakeCore(kube)).SetDataTtl(forever, ctx()))
    assert "is being deleted" in err.message
    assert "dataTtl" not in kube.objects[jobs_path(NAMESPACE, "j1")]["spec"]


def test_execute_is_refused_once_the_operator_began_to_delete_the_data() -> None:
    kube = FakeKube()
    stored_job(kube, "j1")
    obj = kube.objects[jobs_path(NAMESPACE, "j1")]
    obj["status"] = {"phase": "CREATING", "createdAt": ts(datetime.now(UTC)), "conditions": [DELETING]}
    request = svc.ExecuteProjectJobRequest(job_id="j1")
    err = failing(
        grpc.StatusCode.FAILED_PRECONDITION, service(FakeCore(kube, stored=[SHA])).Execute(request, ctx())
    )
    assert "was deleted before it was executed" in err.message
    assert obj["spec"]["execute"] is False


def test_files_of_a_job_whose_data_ttl_ran_out_are_not_handed_out() -> None:
    # Its deletion is due (the operator's mark may come a moment later): URLs would break midway.
    long_ago = datetime.now(UTC) - timedelta(days=15)
    prefix = f"projects/{PROJECT}/jobs/src1"
    out = {"desc": {"path": "r.txt"}, "sha256": SHA, "sizeBytes": 5, "key": f"{prefix}/outputs/r.txt"}
    for status in (
        {"phase": "SUCCESS", "finishedAt": ts(long_ago), "outputFiles": [out]},  # the default 14d TTL
        {
            "phase": "SUCCESS",
            "finishedAt": ts(datetime.now(UTC)),
            "outputFiles": [out],
            "conditions": [DELETING],
        },
    ):
        job = source_job(SOURCE_PARAMS, status)
        req = svc.DownloadProjectJobFilesRequest(
            job_id="src1", files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path="r.txt"))]
        )
        err = failing(
            grpc.StatusCode.FAILED_PRECONDITION, service(FakeCore(job=job)).DownloadJobFiles(req, ctx())
        )
        assert err.message == "the data of job 'src1' is being deleted"
    fresh = source_job(
        SOURCE_PARAMS, {"phase": "SUCCESS", "finishedAt": ts(datetime.now(UTC)), "outputFiles": [out]}
    )
    req = svc.DownloadProjectJobFilesRequest(
        job_id="src1", files=[jobs_pb2.File(desc=jobs_pb2.FileDesc(path="r.txt"))]
    )
    assert len(call(service(FakeCore(job=fresh)).DownloadJobFiles(req, ctx())).download_files) == 1


# --- output paths as another user gets them (dsjobs.api.clientpaths) ------------------------------

PLANTED = [
    {"path": "../../../.bashrc", "var": "RC"},
    {"path": "/home/alice/.ssh/authorized_keys", "var": "KEYS"},
    {"path": "C:\\Users\\alice\\run.bat", "var": "BAT"},
    {"path": "results/metrics.csv", "var": "METRICS"},
]
# Where each file lived in the job (models.paths.job_relative_path): where another user gets it.
SEEN = [".dsjobs-vars/RC/.bashrc", ".dsjobs-vars/KEYS/authorized_keys", ".dsjobs-vars/BAT/run.bat"]
PROFILE_SEEN = ".dsjobs-vars/PROFILE/.profile"  # an output the job did not create (a file error)


def planted_job(created_by: str) -> JobSnapshot:
    prefix = f"projects/{PROJECT}/jobs/src1/outputs"
    stored = [
        {"desc": d, "sha256": f"{i:02x}" * 32, "sizeBytes": 1, "key": f"{prefix}/{i}"}
        for i, d in enumerate(PLANTED)
    ]
    missing = {
        "type": "NOT_FOUND",
        "description": "not created",
        "outputFileDesc": {"path": "/home/alice/.profile", "var": "PROFILE"},
    }
    params = {**SOURCE_PARAMS, "outputFiles": [*PLANTED, {"path": "/home/alice/.profile", "var": "PROFILE"}]}
    status = {"phase": "SUCCESS", "outputFiles": stored, "fileErrors": [missing]}
    job = source_job(params, status)
    spec = job.spec.model_copy(update={"created_by_id": created_by})
    return JobSnapshot(**{**job.__dict__, "spec": spec})


def test_another_user_never_gets_output_paths_that_leave_their_directory() -> None:
    # mallory's job, alice's CLI: Get, the Execute operation and DownloadJobFiles all give the
    # paths the job itself used, so alice's download-files/attach/fork write below her cwd.
    core = FakeCore(job=planted_job("mallory"))
    expected = [*SEEN, "results/metrics.csv"]
    got = call(service(core).Get(svc.GetProjectJobRequest(job_id="src1"), ctx()))
    assert [d.path for d in got.job_parameters.output_files] == [*expected, PROFILE_SEEN]
    assert [f.desc.path for f in got.output_files] == expected  # the stored ones
    op_id = OpRef(OpKind.EXECUTE, PROJECT, "src1", "u-src").encode()
    ops = OperationService(cast(Core, core), service(core))
    op = call(ops.Get(operation_service_pb2.GetOperationRequest(operation_id=op_id), ctx()))
    response = svc.ExecuteProjectJobResponse()
    op.response.Unpack(response)
    assert [f.file.desc.path for f in response.output_files] == expected
    assert [e.output_file_desc.path for e in response.output_files_errors] == [
        ".dsjobs-vars/PROFILE/.profile"
    ]
    assert [e.output_file_desc.path for e in got.file_errors] == [PROFILE_SEEN]
    wanted = [jobs_pb2.File(desc=f.desc, sha256=f.sha256) for f in got.output_files]
    req = svc.DownloadProjectJobFilesRequest(job_id="src1", files=wanted)
    resp = call(service(core).DownloadJobFiles(req, ctx()))
    assert [f.file.desc.path for f in resp.download_files] == expected
    assert [f.url.split("?")[0].rsplit("/", 1)[-1] for f in resp.download_files] == ["0", "1", "2", "3"]


def test_the_job_s_creator_gets_the_paths_as_written() -> None:
    core = FakeCore(job=planted_job("alice"))
    got = call(service(core).Get(svc.GetProjectJobRequest(job_id="src1"), ctx()))
    assert [d.path for d in got.job_parameters.output_files] == [d["path"] for d in PLANTED] + [
        "/home/alice/.profile"
    ]
    # A job without createdById (applied with kubectl, leaving it out) is nobody's: rewritten.
    core = FakeCore(job=planted_job(""))
    got = call(service(core).Get(svc.GetProjectJobRequest(job_id="src1"), ctx()))
    assert [d.path for d in got.job_parameters.output_files] == [*SEEN, "results/metrics.csv", PROFILE_SEEN]


def test_a_clone_of_another_user_s_job_inherits_the_outputs_where_the_job_had_them() -> None:
    # The CLI's fork executes the clone and downloads its outputs: alice's clone of mallory's job
    # is alice's, so its paths must already be safe ones.
    core = FakeCore(job=planted_job("mallory"), stored=[SHA])
    call(service(core).Clone(svc.CloneProjectJobRequest(source_job_id="src1"), ctx()))
    [clone] = [o for o in core.kube.objects.values() if o["metadata"]["name"] != "src1"]
    assert clone["spec"]["createdById"] == "alice"
    paths = [d["path"] for d in clone["spec"]["jobParameters"]["outputFiles"]]
    assert paths == [*SEEN, "results/metrics.csv", PROFILE_SEEN]


@pytest.mark.parametrize(
    ("path", "var", "seen"),
    [
        (".", "", ".dsjobs-vars/unnamed"),  # the CRD lets these through without a var
        (".dsjobs-vars/x", "", ".dsjobs-vars/unnamed"),
        ("..", "..", ".dsjobs-vars/__"),  # a var the validator refuses: never a path part
        ("/etc/passwd", "P", ".dsjobs-vars/P/passwd"),
    ],
)
def test_any_output_path_a_kubectl_user_may_write_is_given_back_safely(
    path: str, var: str, seen: str
) -> None:
    # One job's odd path must not fail another user's Get or List (as_seen_by raised for `.`).
    from dsjobs.api.clientpaths import client_desc
    from dsjobs.models.files import FileDesc
    from dsjobs.models.paths import is_safe_relative_path

    got = client_desc(FileDesc(path=path, var=var)).path
    assert got == seen
    assert (
        not os.path.isabs(got) and ".." not in got.split("/") and is_safe_relative_path(got.split("/", 1)[1])
    )


def test_log_streams_of_a_job_whose_data_was_deleted_say_so() -> None:
    # They answered nothing at all, as if the job had printed nothing (the downloads refused).
    kube = FakeKube()
    stored_job(kube, "j1", phase="SUCCESS")
    kube.objects[jobs_path(NAMESPACE, "j1")]["status"]["dataCleared"] = True
    jobs = service(FakeCore(kube))

    async def drain(stream: Any) -> list[Any]:
        return [item async for item in stream]

    for stream in (
        jobs.ReadStdLogs(svc.ReadProjectJobStdLogsRequest(job_id="j1"), ctx()),
        jobs.ReadLogs(svc.ReadProjectJobLogsRequest(job_id="j1"), ctx()),
    ):
        err = failing(grpc.StatusCode.FAILED_PRECONDITION, drain(stream))
        assert err.message == "the data of job 'j1' was deleted, its logs with it"
