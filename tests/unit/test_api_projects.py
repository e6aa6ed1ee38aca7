"""A job belongs to its namespace's project: the API never serves another project's data through it.

A project user may create a ProjectJob by hand (kubectl) in their own namespace; its
spec.projectId names the storage prefix of its data. One naming another project (with the same
id as a job there) must not open that project's logs, files or input cache. The admission policy
refuses such jobs (crds/projectjobs-in-their-project.yaml); these tests cover the API where it is
not installed. Real Core, Authenticator and indexes; a fake cluster and store.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
import pytest
from test_api_logs import MemoryStore

from dsjobs.api import auth
from dsjobs.api.cluster import InstanceTypeCatalog, JobIndex, ProjectIndex
from dsjobs.api.core import Core
from dsjobs.api.errors import ApiError, KubeError
from dsjobs.api.kube import Kube, jobs_path, namespaces_path
from dsjobs.api.operations import OpKind, OpRef
from dsjobs.api.servicer import OperationService, ProjectJobService
from dsjobs.api.settings import Settings
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.pb.yandex.cloud.operation import operation_service_pb2 as opsvc

JOB = "0abcdefghijklmnopqrs"
NAMESPACES = {"team-a": "pa", "team-b": "pb"}
# Who may do anything where: mallory in team-a only, bob in team-b only, carol in both.
RIGHTS = {("mallory", "team-a"), ("bob", "team-b"), ("carol", "team-a"), ("carol", "team-b")}


def job(namespace: str, project: str, uid: str, name: str = JOB) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "5",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"dsjobs.dev/project-id": project},
        },
        "spec": {"projectId": project, "jobParameters": {"cmd": "python train.py"}},
        "status": {"phase": "CREATING"},
    }


class FakeKube:
    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if path == namespaces_path():
            items = [
                {"metadata": {"name": n, "labels": {"dsjobs.dev/project-id": p}}}
                for n, p in NAMESPACES.items()
            ]
            return {"items": items}
        params = kwargs.get("params") or {}
        if path == jobs_path() and "fieldSelector" in params:
            return {"items": list(self.jobs)}
        for j in self.jobs:
            if path == jobs_path(j["metadata"]["namespace"], JOB):
                return j
        raise KubeError(404, "NotFound", path)


class Ctx:
    def __init__(self, user: str) -> None:
        self.user = user

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.user}")]


async def by_rights(who: auth.Identity, verb: auth.Verb, namespace: str, project: str) -> auth.Decision:
    allowed = (who.username, namespace) in RIGHTS
    return auth.Decision(allowed, "" if allowed else "no RBAC rule")


def core_of(jobs: list[dict[str, Any]], review_access: Any = by_rights) -> Core:
    """A real Core over the fake cluster; callers are who their token says."""

    async def review_token(token: str) -> auth.Identity:
        return auth.Identity(token)

    kube = cast(Kube, FakeKube(jobs))
    return Core(
        Settings(),
        kube,
        MemoryStore(),
        auth.Authenticator(review_token, review_access),
        ProjectIndex(kube),
        JobIndex(kube),
        InstanceTypeCatalog(kube),
    )


def services(jobs: list[dict[str, Any]]) -> tuple[ProjectJobService, OperationService]:
    core = core_of(jobs)
    jobs_service = ProjectJobService(core)
    return jobs_service, OperationService(core, jobs_service)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(ApiError) as info:
        asyncio.run(call)
    return info.value.code


def test_a_job_naming_another_project_is_no_job_of_its_namespace() -> None:
    # mallory's hand-made job in her namespace says it is project pb's: nothing of pb through it.
    jobs, ops = services([job("team-a", "pb", "uid-mallory")])
    ctx = cast(Any, Ctx("mallory"))
    assert code_of(jobs.Get(svc.GetProjectJobRequest(job_id=JOB), ctx)) == grpc.StatusCode.NOT_FOUND
    assert code_of(jobs.DownloadStdLogs(svc.DownloadProjectJobStdLogsRequest(job_id=JOB), ctx)) == (
        grpc.StatusCode.NOT_FOUND
    )
    op_id = OpRef(OpKind.CREATE, "pa", JOB, "uid-mallory").encode()
    # As a deleted job's operation: done, NOT_FOUND, nothing of the job.
    op = asyncio.run(ops.Get(opsvc.GetOperationRequest(operation_id=op_id), ctx))
    assert op.done and op.error.code == grpc.StatusCode.NOT_FOUND.value[0] and not op.HasField("response")


def test_a_job_id_in_two_namespaces_is_the_one_the_caller_may_use() -> None:
    jobs, _ = services([job("team-a", "pa", "uid-a"), job("team-b", "pb", "uid-b")])
    got = asyncio.run(jobs.Get(svc.GetProjectJobRequest(job_id=JOB), cast(Any, Ctx("bob"))))
    assert got.project_id == "pb"  # not team-a's, which sorts first
    got = asyncio.run(jobs.Get(svc.GetProjectJobRequest(job_id=JOB), cast(Any, Ctx("mallory"))))
    assert got.project_id == "pa"
    # Nobody's: as if no project had it.
    assert code_of(jobs.Get(svc.GetProjectJobRequest(job_id=JOB), cast(Any, Ctx("eve")))) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_a_project_list_does_not_drop_projects_the_cluster_did_not_answer_for() -> None:
    # Any ApiError left the project out, an outage of the access review too: the CLI got a
    # shorter list and no error.
    from dsjobs.api import errors
    from dsjobs.api.servicer import ProjectService
    from dsjobs.pb.yandex.cloud.datasphere.v2 import project_service_pb2

    async def review_access(
        who: auth.Identity, verb: auth.Verb, namespace: str, project: str
    ) -> auth.Decision:
        if namespace == "team-b" and who.username == "carol":
            raise errors.unavailable("cannot check permissions now; retry")
        return await by_rights(who, verb, namespace, project)

    core = core_of([], review_access)
    request = project_service_pb2.ListProjectsRequest(community_id="dsjobs")
    listed = asyncio.run(ProjectService(core).List(request, cast(Any, Ctx("mallory"))))
    assert [p.id for p in listed.projects] == ["pa"]  # denied ones are left out
    assert code_of(ProjectService(core).List(request, cast(Any, Ctx("carol")))) == grpc.StatusCode.UNAVAILABLE


def test_an_operation_id_names_ids_of_ours_only() -> None:
    from dsjobs.api.operations import OperationIdError, decode_op_id

    assert decode_op_id(OpRef(OpKind.CREATE, "pa", JOB, "u").encode()).job_id == JOB
    for project, job_id in (("pa", "."), ("pa", "a/b"), ("..", JOB), ("Pa", JOB)):
        with pytest.raises(OperationIdError):
            decode_op_id(OpRef(OpKind.CREATE, project, job_id, "u").encode())


def test_a_malformed_id_is_refused_with_the_rule() -> None:
    # "'UPPER' is not a job id" named the field but not what an id may be.
    jobs, _ = services([])
    ctx = cast(Any, Ctx("alice"))
    for call, field in (
        (jobs.Get(svc.GetProjectJobRequest(job_id="UPPER"), ctx), "job_id"),
        (jobs.List(svc.ListProjectJobRequest(project_id="Team_A"), ctx), "project_id"),
    ):
        with pytest.raises(ApiError) as info:
            asyncio.run(call)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message.startswith(f"{field}: ")
        assert "lowercase letters, digits and '-', 1 to 63 characters" in info.value.message
    # A long one is said to be cut: shown at 80 characters alone, it read as an id of 80.
    with pytest.raises(ApiError) as info:
        asyncio.run(jobs.Get(svc.GetProjectJobRequest(job_id="x" * 10000), ctx))
    assert info.value.message.startswith(f"job_id: {'x' * 80!r}... (10000 characters) is not a job id")


def test_upload_urls_are_signed_with_the_project_s_own_key_pair_when_runners_use_it() -> None:
    # DSJOBS_STORAGE_CREDENTIALS=project: a store that took an unsigned x-amz-copy-source on an
    # upload URL made it a copy of any object its signing key could read; signed with the project's
    # pair (limited to its prefix), of the project's own objects only.
    import base64

    import kube_fake

    from dsjobs.api.kube import secrets_path
    from dsjobs.storage import Storage, StorageSettings

    async def review_token(token: str) -> auth.Identity:
        return auth.Identity(token)

    fake = kube_fake.FakeKube()
    kube = cast(Kube, fake)
    store = Storage(
        StorageSettings(
            endpoint="http://127.0.0.1:9",
            bucket="b",
            access_key="BUCKETWIDE",
            secret_key="s",
            region="us-east-1",
        )
    )
    core = Core(
        Settings(storage_credentials="project"),
        kube,
        store,
        auth.Authenticator(review_token, by_rights),
        ProjectIndex(kube),
        JobIndex(kube),
        InstanceTypeCatalog(kube),
    )
    key = "projects/pa/inputs/" + "a" * 64
    with pytest.raises(ApiError) as refused:
        asyncio.run(core.presign_put("team-a", [(key, 3)]))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "Secret 'dsjobs-project-storage' in namespace team-a not found" in refused.value.message
    secret = {
        "metadata": {"name": "dsjobs-project-storage", "namespace": "team-a"},
        "data": {
            k: base64.b64encode(v.encode()).decode()
            for k, v in {"accessKey": "PROJ", "secretKey": "x"}.items()
        },
    }
    asyncio.run(fake.request("POST", secrets_path("team-a"), secret))
    url = asyncio.run(core.presign_put("team-a", [(key, 3)]))[key]
    assert "X-Amz-Credential=PROJ%2F" in url and "X-Amz-SignedHeaders=content-length%3Bhost" in url
    # The default: the bucket-wide pair, and no Secret read.
    core.settings = Settings()
    assert "X-Amz-Credential=BUCKETWIDE%2F" in asyncio.run(core.presign_put("team-b", [(key, 3)]))[key]
