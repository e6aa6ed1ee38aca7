"""The operator under test: `python -m dsjobs.controller` as a subprocess, one per test module.

    from operator_fixtures import operator_harness  # noqa: F401   (or via tests/e2e/conftest.py)

    def test_x(operator_harness: OperatorHarness) -> None: ...

The harness applies the CRDs and the `local` InstanceType catalog, makes a project namespace of
its own, and runs the operator for that namespace only, with the cluster's S3 settings. When a
deployed dsjobs operator runs in the cluster (the stack fixture's), it is scaled to zero while
this module runs (two operators would make the kill/restart tests meaningless) and restored after.
The operator can be SIGKILLed and restarted (`kill()`, `start()`); its log is kept in a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_fixtures import (
    REPO_ROOT,
    ClusterHandle,
    apply_admission,
    apply_cluster_role,
    deployed_operator_paused,
    free_ports,
    poll,
    service_account_token,
    token_kubeconfig,
)
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from dsjobs import localstack
from dsjobs.devcluster.cluster import LOCAL_STORAGE_CLASS
from dsjobs.instancetypes import render_catalog_yaml

GROUP, VERSION, PLURAL = "dsjobs.dev", "v1alpha1", "projectjobs"
#: One per session: a project is held by the oldest namespace labelled with it, so a namespace an
#: interrupted earlier run left behind on a cluster kept for the next would hold a fixed id.
PROJECT_ID = f"e2e-op-{uuid.uuid4().hex[:6]}"
#: DSJOBS_PYTHON_GPU_IMAGE of the operator under test.
GPU_PYTHON_IMAGE = "registry.example.com/ml/python-cuda:{version}"
START_TIMEOUT_S = 60


@dataclass
class PodWatch:
    """Every pod ADDED for a label selector while it runs (a thread with a watch)."""

    core: Any
    namespace: str
    selector: str
    added: dict[str, str] = field(default_factory=dict)  # uid -> name
    history: list[tuple[str, str]] = field(default_factory=list)  # (ADDED | DELETED, name), in order
    first_added: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PodWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            w = k8s_watch.Watch()
            try:
                kwargs: dict[str, Any] = {"label_selector": self.selector, "timeout_seconds": 5}
                if version:
                    kwargs["resource_version"] = version
                for event in w.stream(self.core.list_namespaced_pod, self.namespace, **kwargs):
                    obj = event["object"]
                    version = obj.metadata.resource_version or version
                    uid, name = obj.metadata.uid, obj.metadata.name
                    if event["type"] == "ADDED" and uid not in self.added:
                        self.added[uid] = name
                        self.history.append(("ADDED", name))
                        self.first_added.set()
                    elif event["type"] == "DELETED" and ("DELETED", name) not in self.history:
                        self.history.append(("DELETED", name))
                    if self._stop.is_set():
                        break
            except ApiException as exc:
                if exc.status == 410:  # too old: list again (ADDED for what exists; uids dedupe)
                    version = ""
                else:
                    time.sleep(0.5)
            except Exception:
                time.sleep(0.5)
            finally:
                w.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class OperatorHarness:
    cluster: ClusterHandle
    namespace: str
    kubectl_bin: str
    env: dict[str, str]
    log_path: Path
    #: Where the operator's ServiceAccount and its leader Lease live (as dsjobs-system does).
    system_namespace: str = ""
    proc: subprocess.Popen[bytes] | None = None
    liveness_port: int = 0
    metrics_port: int = 0

    # ---- the operator process

    @property
    def spare_namespace(self) -> str:
        """A second namespace the operator serves: a test creates (and deletes) it itself."""
        return f"{self.namespace}-spare"

    @property
    def twin_namespace(self) -> str:
        """A third one, for a test that labels it with this namespace's project: the operator
        remembers a namespace's label for a minute, so the spare one, labelled with a project of
        its own by another test, cannot serve for both."""
        return f"{self.namespace}-twin"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the operator is running"
        self.liveness_port, self.metrics_port = free_ports(2)
        env = {
            **self.env,
            "DSJOBS_LIVENESS_PORT": str(self.liveness_port),
            "DSJOBS_METRICS_PORT": str(self.metrics_port),
        }
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dsjobs.controller",
                    "--namespace",
                    self.namespace,
                    "--namespace",
                    self.spare_namespace,
                    "--namespace",
                    self.twin_namespace,
                    "--log-format",
                    "text",
                ],
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        poll("the operator's liveness endpoint", self._alive, START_TIMEOUT_S, interval=0.3)

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(
                f"the operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}", pytrace=False
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as rsp:
                return bool(rsp.status == 200)
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            return str(rsp.read().decode())

    # ---- cluster access

    @property
    def core(self) -> Any:
        return k8s_client.CoreV1Api(self.cluster.api_client)

    @property
    def custom(self) -> Any:
        return k8s_client.CustomObjectsApi(self.cluster.api_client)

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        """kubectl's stdout; with check=False its stdout and stderr (what a refusal says)."""
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.cluster.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout if check else proc.stdout + proc.stderr

    def create_job(self, name: str, params: dict[str, Any], **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ProjectJob",
            "metadata": {"name": name},
            "spec": {"projectId": PROJECT_ID, "name": name, "execute": True, "jobParameters": params, **spec},
        }
        obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return obj

    def job(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def status(self, name: str) -> dict[str, Any]:
        obj = self.job(name)
        return dict((obj or {}).get("status") or {})

    def wait_phase(self, name: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        try:
            found: dict[str, Any] = poll(f"job {name} in {'/'.join(phases)}", reached, timeout, interval=0.3)
        except BaseException:
            print(f"--- status of {name}: {json.dumps(self.status(name), indent=1)[-3000:]}", file=sys.stderr)
            print(f"--- operator log:\n{self.log()[-5000:]}", file=sys.stderr)
            raise
        return found

    def pods(self, job: str) -> list[Any]:
        return list(
            self.core.list_namespaced_pod(self.namespace, label_selector=f"dsjobs.dev/job-id={job}").items
        )

    def events(self, job: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={job}"
        ).items
        return sorted(items, key=lambda e: e.metadata.creation_timestamp)

    def watch_pods(self, job: str) -> PodWatch:
        return PodWatch(self.core, self.namespace, f"dsjobs.dev/job-id={job}").start()


def _apply_setup(kubectl: Callable[..., str]) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-k", str(REPO_ROOT / "crds"))
    kubectl(
        "wait", "--for=condition=Established", "crd/projectjobs.dsjobs.dev", "crd/instancetypes.dsjobs.dev"
    )
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=render_catalog_yaml("local"))


OPERATOR_RBAC = REPO_ROOT / "deploy" / "base" / "operator-rbac.yaml"


def _operator_identity(cluster: ClusterHandle, system: str, workdir: Path) -> tuple[Path, str]:
    """The operator's identity as deployed: a ServiceAccount dsjobs-operator in `system` (labelled
    dsjobs.dev/system=true, as dsjobs-system) bound to exactly deploy/base/operator-rbac.yaml's
    ClusterRole and leader Role, and held to deploy/base/admission.yaml. A call the deployment does
    not grant fails here as in a cluster (run as the admin, the operator once needed a verb its
    ClusterRole lacked and every test passed). Returns its kubeconfig and ClusterRoleBinding."""
    api = cluster.api_client
    core = k8s_client.CoreV1Api(api)
    rbac = k8s_client.RbacAuthorizationV1Api(api)
    apply_admission(cluster)
    core.create_namespace({"metadata": {"name": system, "labels": {"dsjobs.dev/system": "true"}}})
    core.create_namespaced_service_account(system, {"metadata": {"name": "dsjobs-operator"}})
    subject = {"kind": "ServiceAccount", "name": "dsjobs-operator", "namespace": system}
    binding = f"dsjobs-operator-{system}"
    for doc in yaml.safe_load_all(OPERATOR_RBAC.read_text()):
        kind = (doc or {}).get("kind")
        if kind == "ClusterRole":
            apply_cluster_role(api, doc)
        elif kind == "ClusterRoleBinding":
            doc = {**doc, "metadata": {"name": binding}, "subjects": [subject]}
            rbac.create_cluster_role_binding(doc)
        elif kind == "Role":
            rbac.create_namespaced_role(system, {**doc, "metadata": {**doc["metadata"], "namespace": system}})
        elif kind == "RoleBinding":
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": system}, "subjects": [subject]}
            rbac.create_namespaced_role_binding(system, doc)
    token = service_account_token(api, system, "dsjobs-operator")
    return token_kubeconfig(cluster, token, workdir / "operator.kubeconfig"), binding


@pytest.fixture(scope="module")
def operator_harness(
    dev_cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorHarness]:
    if dev_cluster.s3 is None:
        pytest.skip("the operator tests need the cluster's S3 endpoint")
    namespace = f"dsjobs-e2e-op-{uuid.uuid4().hex[:6]}"
    system = f"{namespace}-system"
    workdir = tmp_path_factory.mktemp("operator")
    env = {
        **os.environ,
        **dev_cluster.s3.env(),
        "KUBECONFIG": "",  # set once its identity exists (below)
        # Pods stay for inspection after their job ended (Finalize and deletion remove them).
        "DSJOBS_FINISHED_POD_RETENTION": "600",
        "DSJOBS_IMAGE_PULL_TIMEOUT": "15",
        "DSJOBS_RUNNER_IMAGE": "dsjobs:e2e",
        # The local nodes run any image (the host is the image): shown in the pods' spec only.
        "DSJOBS_PYTHON_GPU_IMAGE": GPU_PYTHON_IMAGE,
        "DSJOBS_SHUTDOWN_GRACE_MARGIN": "10",
        # Pods that lost their job label are followed by the resync: seconds, not the default 10 min.
        "DSJOBS_POD_RESYNC_INTERVAL": "3",
        # A job restored without its status runs again after this: seconds, not the default 2 min.
        "DSJOBS_RESTORE_GRACE": "15",
        # The local cluster's provisioner; an external cluster's default class otherwise.
        "DSJOBS_WORKING_STORAGE_CLASS": LOCAL_STORAGE_CLASS if dev_cluster.root is not None else "",
    }
    harness = OperatorHarness(
        cluster=dev_cluster,
        namespace=namespace,
        kubectl_bin=localstack.find_kubectl(),
        env=env,
        log_path=workdir / "operator.log",
        system_namespace=system,
    )
    _apply_setup(harness.kubectl)
    rbac = k8s_client.RbacAuthorizationV1Api(dev_cluster.api_client)
    binding = ""
    try:
        kubeconfig, binding = _operator_identity(dev_cluster, system, workdir)
        env["KUBECONFIG"] = str(kubeconfig)
        with deployed_operator_paused(dev_cluster):
            yield from _run_harness(harness, namespace)
    finally:
        if binding:
            with contextlib.suppress(ApiException):
                rbac.delete_cluster_role_binding(binding)
        with contextlib.suppress(ApiException):
            harness.core.delete_namespace(system)


def _run_harness(harness: OperatorHarness, namespace: str) -> Iterator[OperatorHarness]:
    # Job pods meet the baseline Pod Security Standard: every job of these tests proves it.
    labels = {"dsjobs.dev/project-id": PROJECT_ID, "pod-security.kubernetes.io/enforce": "baseline"}
    harness.core.create_namespace({"metadata": {"name": namespace, "labels": labels}})
    poll(
        "the namespace's default ServiceAccount",
        lambda: harness.core.list_namespaced_service_account(namespace).items,
        60,
    )
    harness.start()
    try:
        yield harness
    finally:
        try:
            # Delete the jobs while the operator runs, so that their finalizers are honoured.
            if harness.proc is None or harness.proc.poll() is not None:
                harness.start()
            # A failed test may leave the spare or twin one.
            served = (namespace, harness.spare_namespace, harness.twin_namespace)
            for ns in served:
                harness.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
            poll(
                "the test jobs to be deleted",
                lambda: (
                    not any(
                        harness.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                        for ns in served
                    )
                ),
                120,
            )
        finally:
            harness.stop()
            harness.core.delete_namespace(namespace)
            for extra in (harness.spare_namespace, harness.twin_namespace):
                with contextlib.suppress(ApiException):
                    harness.core.delete_namespace(extra)
