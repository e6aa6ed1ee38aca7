"""Fixtures for the API's end-to-end tests: the API as real processes against the test cluster and S3.

    from api_fixtures import api_env  # noqa: F401   (in a test module)

`api_env` (session) prepares the cluster as the API needs it (CRDs, the InstanceType catalog, the
user ClusterRoles of deploy/base/api-rbac.yaml), makes two project namespaces and five users
(ServiceAccounts with TokenRequest tokens, which TokenReview accepts):

- `alice`: `dsjobs-project-user` in project A and B,
- `viewer`: `dsjobs-project-viewer` in project A,
- `outsider`: no binding at all,
- `editor` and `nsviewer`: Kubernetes' built-in `edit` and `view` in project A (which the user
  ClusterRoles are aggregated into),

and starts two API replicas (`python -m dsjobs.api`, Kubernetes auth mode, one shared page-token
key). The replicas run with a ServiceAccount bound to the `dsjobs-api` ClusterRole of
deploy/base/api-rbac.yaml, so the tests also prove that role sufficient. Everything made here is
deleted at the end; the cluster itself belongs to `cluster_fixtures.dev_cluster`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cluster_fixtures import (
    REPO_ROOT,
    ClusterHandle,
    apply_admission,
    apply_cluster_role,
    deployed_operator_paused,
    free_ports,
    service_account_token,
    token_kubeconfig,
)
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from dsjobs.devcluster import S3Config

API_STARTUP_TIMEOUT_S = 60
GROUP, VERSION, PLURAL = "dsjobs.dev", "v1alpha1", "projectjobs"


@dataclass
class ApiProcess:
    name: str
    endpoint: str
    metrics: str
    proc: subprocess.Popen[bytes]
    log: Path
    ca: bytes | None = None  # the server certificate's CA when it serves TLS

    def channel(self) -> grpc.Channel:
        if self.ca is not None:
            return grpc.secure_channel(self.endpoint, grpc.ssl_channel_credentials(self.ca))
        return grpc.insecure_channel(self.endpoint)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Project:
    project_id: str
    namespace: str


@dataclass
class ApiEnv:
    cluster: ClusterHandle
    s3: S3Config
    replicas: list[ApiProcess]
    project_a: Project
    project_b: Project
    tokens: dict[str, str]  # user -> bearer token
    workdir: Path
    api_kubeconfig: Path
    _started: list[ApiProcess] = field(default_factory=list)

    @property
    def api(self) -> ApiProcess:
        return self.replicas[0]

    def md(self, user: str = "alice") -> tuple[tuple[str, str | bytes], ...]:
        return (("authorization", f"Bearer {self.tokens[user]}"),)

    def custom(self) -> Any:
        return k8s.CustomObjectsApi(self.cluster.api_client)

    def core(self) -> Any:
        return k8s.CoreV1Api(self.cluster.api_client)

    def job_object(self, project: Project, job_id: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom().get_namespaced_custom_object(
                GROUP, VERSION, project.namespace, PLURAL, job_id
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def job_objects(self, project: Project) -> list[dict[str, Any]]:
        result = self.custom().list_namespaced_custom_object(GROUP, VERSION, project.namespace, PLURAL)
        return list(result.get("items") or [])

    def patch_status(self, project: Project, job_id: str, status: dict[str, Any]) -> None:
        """Play the operator: merge `status` into the job's status subresource."""
        self.custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, project.namespace, PLURAL, job_id, {"status": status}
        )

    def release(self, project: Project, job_id: str) -> None:
        """Play the operator at deletion: drop the finalizer the API put on the job."""
        with contextlib.suppress(ApiException):
            self.custom().patch_namespaced_custom_object(
                GROUP, VERSION, project.namespace, PLURAL, job_id, {"metadata": {"finalizers": None}}
            )

    def storage(self) -> Any:
        from dsjobs.storage import Storage, StorageSettings

        return Storage(StorageSettings.from_env(self.s3.env()))

    def start_replica(self, name: str, ca: bytes | None = None, **env: str) -> ApiProcess:
        proc = start_api(self, name, env, ca)
        self._started.append(proc)
        return proc


def apply_crds(api_client: Any) -> None:
    ext = k8s.ApiextensionsV1Api(api_client)
    for path in sorted((REPO_ROOT / "crds").glob("*.dsjobs.dev.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        try:
            current = ext.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            ext.create_custom_resource_definition(body)
    for name in ("projectjobs.dsjobs.dev", "instancetypes.dsjobs.dev"):
        _wait(
            f"CRD {name} established",
            lambda n=name: any(  # type: ignore[misc]
                c.type == "Established" and c.status == "True"
                for c in (ext.read_custom_resource_definition(n).status.conditions or [])
            ),
        )


def _apply_instance_types(api_client: Any) -> None:
    custom = k8s.CustomObjectsApi(api_client)
    for doc in yaml.safe_load_all((REPO_ROOT / "deploy" / "base" / "instancetypes.yaml").read_text()):
        if not doc:
            continue
        try:
            custom.create_cluster_custom_object(GROUP, VERSION, "instancetypes", doc)
        except ApiException as exc:
            if exc.status != 409:
                raise


def _apply_rbac(api_client: Any) -> dict[str, Any]:
    """The ClusterRoles of api-rbac.yaml (created or replaced); returns the docs by kind/name."""
    docs = {
        f"{d['kind']}/{d['metadata']['name']}": d
        for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "base" / "api-rbac.yaml").read_text())
        if d
    }
    for doc in docs.values():
        if doc["kind"] == "ClusterRole":
            apply_cluster_role(api_client, doc)
    return docs


def _wait(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def _service_account(api_client: Any, namespace: str, name: str) -> None:
    core = k8s.CoreV1Api(api_client)
    try:
        core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def _bind(api_client: Any, namespace: str, role: str, sa_namespace: str, sa: str) -> None:
    rbac = k8s.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": f"{role}-{sa}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_namespace}],
        },
    )


def start_api(
    env: ApiEnv, name: str, extra_env: dict[str, str] | None = None, ca: bytes | None = None
) -> ApiProcess:
    port, metrics_port = free_ports(2)
    log = env.workdir / f"api-{name}.log"
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith(("DSJOBS_API_", "DSJOBS_S3_"))}
    proc_env.update(env.s3.env())
    proc_env.update(
        {
            "DSJOBS_API_LISTEN": f"127.0.0.1:{port}",
            "DSJOBS_API_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            "DSJOBS_API_KUBECONFIG": str(env.api_kubeconfig),
            "DSJOBS_API_LOG_LEVEL": "DEBUG",
            "DSJOBS_API_LOG_POLL": "100ms",
            "DSJOBS_API_DRAIN_TIMEOUT": "5s",
            "DSJOBS_API_DRAIN_DELAY": "1s",
            **(extra_env or {}),
        }
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsjobs.api"],
            env=proc_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    api = ApiProcess(name, f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}", proc, log, ca)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"API {name} exited with {proc.returncode}:\n{api.log_text()[-4000:]}")
        with api.channel() as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    try:
        _wait(f"API {name} serving", serving, API_STARTUP_TIMEOUT_S)
    except BaseException:
        api.stop()
        raise
    return api


@pytest.fixture(scope="session")
def api_env(
    dev_cluster: ClusterHandle, dev_s3: S3Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiEnv]:
    # These tests play the operator's part (phases, logs): a deployed one (`make up`, `make demo`)
    # would run their jobs for real. The deployed-stack tests deploy it again (kubectl apply
    # restores its replicas).
    with deployed_operator_paused(dev_cluster):
        yield from _api_env(dev_cluster, dev_s3, tmp_path_factory)


def _api_env(
    dev_cluster: ClusterHandle, dev_s3: S3Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiEnv]:
    api_client = dev_cluster.api_client
    core = k8s.CoreV1Api(api_client)
    apply_crds(api_client)
    _apply_instance_types(api_client)
    docs = _apply_rbac(api_client)
    # The API's ServiceAccount is held to what deploy/base/admission.yaml lets it do, as deployed.
    apply_admission(dev_cluster)
    suffix = secrets.token_hex(3)
    a = Project(f"apitest-{suffix}-a", f"apitest-{suffix}-a")
    b = Project(f"apitest-{suffix}-b", f"apitest-{suffix}-b")
    system = f"apitest-{suffix}-system"
    namespaces = [a.namespace, b.namespace, system]
    workdir = tmp_path_factory.mktemp("api")
    env: ApiEnv | None = None
    binding = f"dsjobs-api-{suffix}"
    rbac = k8s.RbacAuthorizationV1Api(api_client)
    try:
        for p in (a, b):
            core.create_namespace(
                {"metadata": {"name": p.namespace, "labels": {"dsjobs.dev/project-id": p.project_id}}}
            )
        core.create_namespace({"metadata": {"name": system, "labels": {"dsjobs.dev/system": "true"}}})
        for ns in namespaces:

            def has_default_sa(n: str = ns) -> Any:
                return core.read_namespaced_service_account("default", n)

            _wait(f"default ServiceAccount in {ns}", has_default_sa)
        # The API's own identity, with exactly the ClusterRole the deployment gives it.
        _service_account(api_client, system, "dsjobs-api")
        role_ref = docs["ClusterRoleBinding/dsjobs-api"]["roleRef"]
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": binding},
                "roleRef": role_ref,
                "subjects": [{"kind": "ServiceAccount", "name": "dsjobs-api", "namespace": system}],
            }
        )
        api_kubeconfig = token_kubeconfig(
            dev_cluster, service_account_token(api_client, system, "dsjobs-api"), workdir / "api.kubeconfig"
        )
        users = ("alice", "viewer", "outsider", "editor", "nsviewer")
        for user in users:
            _service_account(api_client, system, user)
        _bind(api_client, a.namespace, "dsjobs-project-user", system, "alice")
        _bind(api_client, b.namespace, "dsjobs-project-user", system, "alice")
        _bind(api_client, a.namespace, "dsjobs-project-viewer", system, "viewer")
        _bind(api_client, a.namespace, "edit", system, "editor")
        _bind(api_client, a.namespace, "view", system, "nsviewer")
        tokens = {user: service_account_token(api_client, system, user) for user in users}
        env = ApiEnv(
            cluster=dev_cluster,
            s3=dev_s3,
            replicas=[],
            project_a=a,
            project_b=b,
            tokens=tokens,
            workdir=workdir,
            api_kubeconfig=api_kubeconfig,
        )
        env.replicas = [env.start_replica("r1"), env.start_replica("r2")]
        yield env
    finally:
        traced: list[str] = []
        if env is not None:
            for proc in env._started:
                proc.stop()
                text = proc.log_text()
                if "Traceback" in text:
                    traced.append(proc.name)
                    print(f"--- API {proc.name} log had tracebacks:\n{text[-8000:]}", file=sys.stderr)
            # No operator serves these namespaces: let go of the jobs the API made (finalizer).
            for p in (a, b):
                with contextlib.suppress(ApiException):
                    for job in env.job_objects(p):
                        env.release(p, job["metadata"]["name"])
        for ns in namespaces:
            with contextlib.suppress(ApiException):
                core.delete_namespace(ns)
        try:
            from dsjobs.storage import Storage, StorageSettings, project_prefix

            store = Storage(StorageSettings.from_env(dev_s3.env()))
            for p in (a, b):
                store.delete_prefix(project_prefix(p.project_id))
        except Exception as exc:  # best effort: the bucket belongs to the test cluster
            print(f"could not clean the test projects' objects: {exc}", file=sys.stderr)
        with contextlib.suppress(ApiException):
            rbac.delete_cluster_role_binding(binding)
        # No test provokes an API traceback: one is a bug the calls' answers may not show (every
        # replica once failed its job watch on each event of a large job, all tests passing).
        if traced and sys.exc_info()[1] is None:  # not in place of the setup's own failure
            pytest.fail(f"the API replicas {traced} logged tracebacks (above)", pytrace=False)
