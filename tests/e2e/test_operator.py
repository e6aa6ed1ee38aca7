"""The operator against the local cluster: ProjectJob -> Pod -> status, and everything around it.

Each test polls with generous timeouts (never asserts on durations). The operator runs as a
subprocess for this module's own project namespace (operator_fixtures.py).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from cluster_fixtures import REPO_ROOT, cpu_accounted, local_claim, memory_limits_enforced, poll
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from node_fixtures import E2E_ONLY_TAINT, OwnNode, node_ready, own_node, small_disk_node  # noqa: F401
from operator_fixtures import (  # noqa: F401
    GPU_PYTHON_IMAGE,
    GROUP,
    PLURAL,
    PROJECT_ID,
    VERSION,
    OperatorHarness,
    PodWatch,
    operator_harness,
)
from prometheus_client.parser import text_string_to_metric_families

from dsjobs.controller.leader import micro_time
from dsjobs.controller.names import JOB_LABEL, PROJECT_LABEL
from dsjobs.devcluster import ClusterPaths, S3Config, restart
from dsjobs.devcluster.cluster import LOCAL_STORAGE_CLASS
from dsjobs.devcluster.procs import Record
from dsjobs.logrecords import DOCKER_STATS_LOG_PATH, Stream, decode_chunk, read_progress, read_records
from dsjobs.quantity import parse_quantity
from dsjobs.runner.contract import WORK_VOLUME
from dsjobs.runner.entry import DOCKER_STATS_HEADER
from dsjobs.storage import Storage, input_key, job_prefix

pytestmark = pytest.mark.e2e

EXAMPLES = REPO_ROOT / "deploy" / "examples"
# Tests that read and write volumes' directories, or remove the class for a while.
LOCAL_CLASS_ONLY = "uses the local cluster's hostPath class (its volumes are directories of this machine)"
H = OperatorHarness


@pytest.fixture(scope="module")
def h(operator_harness: H) -> H:  # noqa: F811 - the fixture imported above, registered here
    """The operator for this module (a conftest may register `operator_harness` as well)."""
    return operator_harness


@pytest.fixture(scope="module")
def storage(dev_s3: S3Config) -> Storage:
    return Storage.from_env(dev_s3.env())


def _objects(storage: Storage, prefix: str) -> list[str]:
    return [o.key for o in storage.iter_objects(prefix)]


def apply_example(h: H, name: str) -> None:
    """`kubectl apply` of deploy/examples/<name> in this module's project namespace (the examples
    name the demo project, and a ProjectJob must name its namespace's project)."""
    example = (EXAMPLES / name).read_text().replace("projectId: demo", f"projectId: {PROJECT_ID}")
    h.kubectl("apply", "-n", h.namespace, "-f", "-", stdin=example)


def _reasons(h: H, job: str) -> list[str]:
    return [e.reason for e in h.events(job)]


def _pinned_type(node: str, *tolerations: dict[str, Any]) -> dict[str, Any]:
    """An InstanceType spec whose pods land on one node of a test's own, with small requests."""
    return {
        "vcpu": 1,
        "memory": "1Gi",
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": [E2E_ONLY_TAINT, *tolerations],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
    }


def _details_starting(h: H, job: str, text: str, what: str, timeout: float) -> dict[str, Any]:
    """The job's status once its details start with `text`."""
    found = poll(
        what, lambda: (st := h.status(job)).get("statusDetails", "").startswith(text) and st, timeout, 1.0
    )
    return dict(found)


def _namespace_gone(h: H, namespace: str) -> bool:
    try:
        h.core.read_namespace(namespace)
    except ApiException as exc:
        return exc.status == 404
    return False


def _told(h: H, job: str, reason: str) -> bool:
    """Whether the job got an Event of `reason`, waiting a little: the operator posts its Events
    one at a time in the background, after the status that they tell."""
    return bool(poll(f"a {reason} Event of {job}", lambda: reason in _reasons(h, job), 15))


# --- running jobs ---------------------------------------------------------------------------------


def test_example_runs_to_success_and_kubectl_shows_it(h: H, storage: Storage) -> None:
    apply_example(h, "basic.yaml")
    status = h.wait_phase("hello", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    assert status["returnCode"] == 0 and status["actualCloudInstanceType"] == "c1.4"
    row = h.kubectl("get", "pj", "hello", "-n", h.namespace, "--no-headers").split()
    assert row[:4] == ["hello", "SUCCESS", "c1.4", "0"], row
    (output,) = status["outputFiles"]
    assert output["desc"]["path"] == "result.txt"
    assert storage.get_bytes(output["key"]) == b"Hello, world\n"
    # `kubectl describe pj` tells the story; changes seen in one step share one event.
    story = " | ".join(e.message or "" for e in h.events("hello"))
    assert all(f"-> {p}" in story for p in ("CREATING", "PREPARING", "EXECUTING", "SUCCESS")), story
    assert {"Preparing", "Succeeded"} <= set(_reasons(h, "hello"))
    # The operator's log line for the end says why, for triage from the logs alone.
    assert re.search(rf"{h.namespace}/hello: \w+ -> SUCCESS \(Succeeded, return code 0\)", h.log())
    (pod,) = h.pods("hello")
    assert pod.spec.restart_policy == "Never" and pod.spec.automount_service_account_token is False
    assert pod.metadata.owner_references[0].kind == "ProjectJob"
    assert pod.metadata.labels["dsjobs.dev/attempt"] == "1"
    assert pod.spec.containers[0].image == "python:3.11-slim"  # a CPU type: DSJOBS_PYTHON_IMAGE


def test_gpu_job_gets_the_catalog_placement_and_runs_on_the_gpu_node(h: H) -> None:
    apply_example(h, "gpu.yaml")
    status = h.wait_phase("gpu-hello", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    (pod,) = h.pods("gpu-hello")
    assert pod.spec.node_name == "gpu-0"
    assert pod.spec.node_selector == {"dsjobs.dev/node-pool": "gpu"}
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.spec.tolerations)
    job = pod.spec.containers[0]
    assert job.resources.limits["nvidia.com/gpu"] == "1"
    # No image of its own: DSJOBS_PYTHON_GPU_IMAGE (a CPU type's job runs DSJOBS_PYTHON_IMAGE).
    assert job.image == GPU_PYTHON_IMAGE.replace("{version}", "3.11")


@contextlib.contextmanager
def _instance_type(h: H, family: str, spec: dict[str, Any]) -> Iterator[str]:
    """A cluster InstanceType of the test's own (uniquely named), deleted afterwards."""
    name = f"{family}.e2e{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "InstanceType",
        "metadata": {"name": name},
        "spec": spec,
    }
    h.custom.create_cluster_custom_object("dsjobs.dev", "v1alpha1", "instancetypes", body)
    try:
        yield name
    finally:
        h.custom.delete_cluster_custom_object("dsjobs.dev", "v1alpha1", "instancetypes", name)


def _gpu_type(gpus: int) -> dict[str, Any]:
    """An InstanceType spec of `gpus` GPUs on the GPU node pool, given 3 s to find room."""
    return {
        "vcpu": 8,
        "memory": "1Gi",
        "gpus": gpus,
        "nodeSelector": {"dsjobs.dev/node-pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi", "nvidia.com/gpu": str(gpus)},
            "limits": {"memory": "1Gi", "nvidia.com/gpu": str(gpus)},
        },
        "scheduleTimeoutSeconds": 3,
    }


def test_a_job_on_an_invalid_instance_type_names_it_and_what_is_wrong(h: H) -> None:
    # The CRD lets through what only dsjobs.validation checks (requests above limits): the job
    # failed on the API server's wall of pod fields, naming no InstanceType.
    bad = {**_gpu_type(1), "resources": {"requests": {"cpu": "16"}, "limits": {"cpu": "8"}}}
    with _instance_type(h, "b1", bad) as name:
        h.create_job("invalid-type", {"cmd": "echo ok", "cloudInstanceTypes": [{"name": name}]})
        status = h.wait_phase("invalid-type", "ERROR", "SUCCESS", timeout=60)
        assert status["phase"] == "ERROR", status
        details = status["statusDetails"]
        assert f"InstanceType {name} is invalid" in details and "spec.resources" in details, details
        assert not h.pods("invalid-type")


def test_falls_back_to_the_second_type_when_the_first_cannot_fit(h: H) -> None:
    with _instance_type(h, "x9", _gpu_type(64)) as huge:
        h.create_job("fallback", {"cmd": "echo ok", "cloudInstanceTypes": [{"name": huge}, {"name": "g1.1"}]})
        status = h.wait_phase("fallback", "SUCCESS", "ERROR", timeout=180)
        assert status["phase"] == "SUCCESS", status
        assert status["actualCloudInstanceType"] == "g1.1"
        assert (status["attempt"], status["instanceTypeIndex"]) == (2, 1)
        assert "FallingBack" in _reasons(h, "fallback")
        pods = {p.metadata.name: p for p in h.pods("fallback")}
        assert list(pods) == ["fallback-a2"] and pods["fallback-a2"].spec.node_name == "gpu-0"


def test_no_fallback_while_an_autoscaler_adds_a_node_for_the_pod(h: H) -> None:
    # What cluster-autoscaler posts about a pending pod it bought a node for: the job waits for
    # that node past its type's budget (a GPU node takes minutes) instead of falling back.
    with _instance_type(h, "x8", {**_gpu_type(64), "scheduleTimeoutSeconds": 8}) as huge:
        h.create_job("scale-up", {"cmd": "echo ok", "cloudInstanceTypes": [{"name": huge}, {"name": "g1.1"}]})
        first = poll("pod scale-up-a1", lambda: next(iter(h.pods("scale-up")), None), 30, 0.2)
        now = datetime.now(UTC)
        h.core.create_namespaced_event(
            h.namespace,
            k8s_client.CoreV1Event(
                metadata=k8s_client.V1ObjectMeta(generate_name="scale-up-a1."),
                involved_object=k8s_client.V1ObjectReference(
                    api_version="v1",
                    kind="Pod",
                    name=first.metadata.name,
                    namespace=h.namespace,
                    uid=first.metadata.uid,
                ),
                reason="TriggeredScaleUp",
                message="pod triggered scale-up: [{gpu-pool 0->1 (max: 4)}]",
                type="Normal",
                source=k8s_client.V1EventSource(component="cluster-autoscaler"),
                first_timestamp=now,
                last_timestamp=now,
                count=1,
            ),
        )
        poll(
            "the scale-up in the details",
            lambda: (
                "a node is being added for it: pod triggered scale-up"
                in h.status("scale-up")["statusDetails"]
            ),
            30,
            0.5,
        )
        # A platform team sees the queue behind the type, and how long it has waited.
        metrics_text = h.metrics()
        assert f'dsjobs_jobs_waiting{{instance_type="{huge}"}} 1.0' in metrics_text, metrics_text
        assert f'dsjobs_job_oldest_wait_seconds{{instance_type="{huge}"}}' in metrics_text
        # Past its budget (8 s from the pod's creation, when the job is planned again), and still
        # on its first type.
        past = (first.metadata.creation_timestamp - datetime.now(UTC)).total_seconds() + 14
        time.sleep(max(past, 0))
        status = h.status("scale-up")
        assert (status["attempt"], status["instanceTypeIndex"]) == (1, 0), status
        assert "FallingBack" not in _reasons(h, "scale-up")


def test_falls_back_when_the_project_s_quota_refuses_the_first_type(h: H) -> None:
    # A project out of GPUs by its ResourceQuota: the GPU type's pod is refused (403), not
    # unschedulable. Past the type's budget the job goes on to the next type, as DataSphere runs a
    # job on the first type of its list that it can have.
    quota = k8s_client.V1ResourceQuota(
        metadata=k8s_client.V1ObjectMeta(name="no-gpus"),
        spec=k8s_client.V1ResourceQuotaSpec(hard={"requests.nvidia.com/gpu": "0"}),
    )
    h.core.create_namespaced_resource_quota(h.namespace, quota)
    try:
        with _instance_type(h, "q1", _gpu_type(1)) as gpu:
            types = [{"name": gpu}, {"name": "c1.4"}]
            h.create_job("quota-fallback", {"cmd": "echo ok", "cloudInstanceTypes": types})
            status = h.wait_phase("quota-fallback", "SUCCESS", "ERROR", timeout=120)
    finally:
        h.core.delete_namespaced_resource_quota("no-gpus", h.namespace)
    assert status["phase"] == "SUCCESS", status
    assert (status["actualCloudInstanceType"], status["instanceTypeIndex"]) == ("c1.4", 1), status
    # The refused pod never existed: the attempt that ran is the first.
    assert status["attempt"] == 1, status
    assert {"FailedCreate", "FallingBack"} <= set(_reasons(h, "quota-fallback"))
    pods = {p.metadata.name: p for p in h.pods("quota-fallback")}
    assert list(pods) == ["quota-fallback-a1"] and pods["quota-fallback-a1"].spec.node_name == "cpu-0"


def test_a_job_that_fills_its_working_dir_ends_working_dir_full(h: H) -> None:
    # The instance type's system disk bounds the scratch working directory; the node evicts the
    # pod that writes more, and the job says why (not a disruption: no retry).
    small_spec = {
        "vcpu": 1,
        "memory": "1Gi",
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
        "workingDirSizeLimit": "4Mi",
    }
    with _instance_type(h, "d1", small_spec) as small:
        cmd = "head -c 16777216 /dev/zero > big.bin && echo written && sleep 600"
        h.create_job(
            "disk-full",
            {"cmd": cmd, "cloudInstanceTypes": [{"name": small}]},
            retryPolicy={"maxAttempts": 3},
        )
        status = h.wait_phase("disk-full", "ERROR", "SUCCESS", timeout=120)
        assert status["phase"] == "ERROR", status
        assert "working directory outgrew the 4Mi limit" in status["statusDetails"], status
        assert status["attempt"] == 1
        finished = next(c for c in status["conditions"] if c["type"] == "Finished")
        assert finished["reason"] == "WorkingDirFull"
        # The logs (and pip packages) are on the system disk too: a job printing without end
        # cannot fill its node's disk either.
        h.create_job(
            "logs-full",
            {"cmd": "yes 0123456789 | head -c 16777216; sleep 600", "cloudInstanceTypes": [{"name": small}]},
        )
        status = h.wait_phase("logs-full", "ERROR", "SUCCESS", timeout=120)
        assert status["phase"] == "ERROR", status
        assert "logs and Python packages outgrew the 4Mi limit" in status["statusDetails"], status


def test_extended_working_storage_is_a_volume_of_its_own_that_goes_with_the_pod(h: H) -> None:
    if h.cluster.root is None:
        pytest.skip(LOCAL_CLASS_ONLY)
    # working-storage -> a generic ephemeral volume of DSJOBS_WORKING_STORAGE_CLASS (here the dev
    # cluster's hostPath provisioner): the program's working directory is that volume.
    cmd = "pwd && echo kept > data.txt"
    h.create_job("big-work", {"cmd": cmd, "extendedWorkingStorage": {"type": "SSD", "sizeGb": 200}})
    status = h.wait_phase("big-work", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    (pod,) = h.pods("big-work")  # kept for inspection (DSJOBS_FINISHED_POD_RETENTION)
    claim = h.core.read_namespaced_persistent_volume_claim(f"{pod.metadata.name}-{WORK_VOLUME}", h.namespace)
    assert claim.spec.storage_class_name == LOCAL_STORAGE_CLASS
    assert claim.spec.resources.requests["storage"] == "200Gi"
    (owner,) = claim.metadata.owner_references
    assert (owner.kind, owner.uid, owner.controller) == ("Pod", pod.metadata.uid, True)
    volume = h.core.read_persistent_volume(claim.spec.volume_name)
    directory = Path(volume.spec.host_path.path)
    assert (directory / "data.txt").read_text() == "kept\n"
    # Deleting the job deletes its pod; the claim goes with the pod, the volume with the claim.
    h.custom.delete_namespaced_custom_object("dsjobs.dev", "v1alpha1", h.namespace, "projectjobs", "big-work")

    def volume_gone() -> bool:
        try:
            h.core.read_persistent_volume(claim.spec.volume_name)
        except ApiException as exc:
            if exc.status == 404:
                return not directory.exists()
            raise
        return False

    poll("the working storage volume and its directory deleted", volume_gone, 120)


def test_working_storage_of_a_class_that_does_not_exist_is_an_error(h: H) -> None:
    if h.cluster.root is None:
        pytest.skip(LOCAL_CLASS_ONLY)
    # The operator's DSJOBS_WORKING_STORAGE_CLASS is the dev cluster's class; without it no claim
    # of the job's could ever bind, and the job says so instead of waiting in PREPARING.
    storage = k8s_client.StorageV1Api(h.cluster.api_client)
    klass = storage.read_storage_class(LOCAL_STORAGE_CLASS)
    storage.delete_storage_class(LOCAL_STORAGE_CLASS)
    try:
        h.create_job("no-class", {"cmd": "true", "extendedWorkingStorage": {"type": "SSD", "sizeGb": 100}})
        status = h.wait_phase("no-class", "ERROR", "SUCCESS", "EXECUTING")
    finally:
        klass.metadata = k8s_client.V1ObjectMeta(name=LOCAL_STORAGE_CLASS)
        storage.create_storage_class(klass)
    assert status["phase"] == "ERROR", status
    assert status["statusDetails"] == (
        f"working storage: StorageClass '{LOCAL_STORAGE_CLASS}' (DSJOBS_WORKING_STORAGE_CLASS) does not exist"
    ), status
    assert not h.pods("no-class")
    assert "Failed" in _reasons(h, "no-class")


def test_a_mount_s_claim_deleted_while_the_pod_waits_ends_the_job(h: H) -> None:
    # PVC protection holds only the claims of scheduled pods: deleted meanwhile, the scheduler says
    # so for ever. The job ends as for a mount missing at its start, instead of waiting.
    if h.cluster.root is None:
        pytest.skip(LOCAL_CLASS_ONLY)
    local_claim(h.core, h.namespace, "mount-going", {"dsjobs.dev/s3-mount-id": "gonebucket"}, "ReadWriteMany")
    label = f"e2e-room-{uuid.uuid4().hex[:6]}"
    nowhere = {
        "vcpu": 1,
        "memory": "64Mi",
        "nodeSelector": {label: "yes"},  # no node has it (yet)
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
    }
    node = next(n.metadata.name for n in h.core.list_node().items if not n.spec.taints)
    with _instance_type(h, "n1", nowhere) as name:
        params = {
            "cmd": "ls ${gonebucket}",
            "s3MountIds": ["gonebucket"],
            "cloudInstanceTypes": [{"name": name}],
        }
        h.create_job("claim-gone", params)
        poll(
            "the pod to be unschedulable",
            lambda: "waiting" in h.status("claim-gone").get("statusDetails", ""),
            60,
        )
        h.core.delete_namespaced_persistent_volume_claim("mount-going", h.namespace)
        # The scheduler looks again at a pod its node selector kept out after up to 5 min, or when
        # a node comes to match it: then its verdict is the claim's.
        h.core.patch_node(node, {"metadata": {"labels": {label: "yes"}}})
        try:
            status = h.wait_phase("claim-gone", "ERROR", "SUCCESS", timeout=120)
        finally:
            h.core.patch_node(node, {"metadata": {"labels": {label: None}}})
    assert status["phase"] == "ERROR", status
    told = "volume claim 'mount-going' of the job was deleted while its pod waited to be scheduled"
    assert told in status["statusDetails"], status
    assert 'persistentvolumeclaim "mount-going" ' in status["statusDetails"], (
        status
    )  # not found, or being deleted
    finished = next(c for c in status["conditions"] if c["type"] == "Finished")
    assert finished["reason"] == "MissingVolume", status
    assert not h.pods("claim-gone") or all(p.metadata.deletion_timestamp for p in h.pods("claim-gone"))


def test_a_job_waiting_on_a_broken_instance_type_runs_once_an_admin_fixes_it(h: H) -> None:
    # The type's nodeSelector names no node; the admin fixes it while the job waits: its pod is
    # made again from the fixed type and runs (it would otherwise ask for the old one for ever).
    cpu_node = next(n for n in h.core.list_node().items if not n.spec.taints)
    spec = {
        "vcpu": 1,
        "memory": "64Mi",
        "nodeSelector": {"kubernetes.io/hostname": "no-such-node"},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
    }
    with _instance_type(h, "f1", spec) as name:
        h.create_job("type-fixed", {"cmd": "true", "cloudInstanceTypes": [{"name": name}]})
        poll(
            "the pod to be unschedulable",
            lambda: "waiting" in h.status("type-fixed").get("statusDetails", ""),
            60,
        )
        fixed = {
            "nodeSelector": {"kubernetes.io/hostname": cpu_node.metadata.labels["kubernetes.io/hostname"]}
        }
        h.custom.patch_cluster_custom_object("dsjobs.dev", "v1alpha1", "instancetypes", name, {"spec": fixed})
        status = h.wait_phase("type-fixed", "SUCCESS", "ERROR", timeout=120)
    assert status["phase"] == "SUCCESS" and status["attempt"] == 2, status
    assert any(e.reason == "InstanceTypeChanged" for e in h.events("type-fixed"))


def test_s3_mounts_datasets_and_the_project_disk_are_the_labelled_claims(h: H, storage: Storage) -> None:
    if h.cluster.root is None:
        pytest.skip(LOCAL_CLASS_ONLY)
    bucket = local_claim(
        h.core, h.namespace, "mount-bucket", {"dsjobs.dev/s3-mount-id": "bt1bucket"}, "ReadWriteMany"
    )
    dataset = local_claim(
        h.core, h.namespace, "dataset-images", {"dsjobs.dev/dataset-id": "images"}, "ReadWriteMany"
    )
    disk = local_claim(
        h.core, h.namespace, "project-disk", {"dsjobs.dev/project-disk": "true"}, "ReadWriteMany"
    )
    (bucket / "in.txt").write_text("from the bucket\n")
    (dataset / "data.csv").write_text("x,y\n")
    cmd = (
        "cat ${bt1bucket}/in.txt ${images}/data.csv"
        " && echo from the job > ${bt1bucket}/out.txt"
        " && echo kept > $DS_PROJECT_HOME/notes.txt"
        " && (touch ${images}/nope 2>/dev/null && echo dataset writable || echo dataset read-only)"
        " && echo at ${bt1bucket} ${images} ${DS_PROJECT_HOME}"
    )
    params = {"cmd": cmd, "s3MountIds": ["bt1bucket"], "datasetIds": ["images"], "attachProjectDisk": True}
    h.create_job("mounts", params)
    status = h.wait_phase("mounts", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    stdout = next(f["key"] for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
    assert storage.get_bytes(stdout).decode().splitlines() == [
        "from the bucket",
        "x,y",
        "dataset read-only",
        "at /job/s3/bt1bucket /job/datasets/images /job/project",
    ]
    assert (bucket / "out.txt").read_text() == "from the job\n"
    assert (disk / "notes.txt").read_text() == "kept\n"
    assert not (dataset / "nope").exists()


def test_a_mount_the_node_cannot_set_up_is_told_from_the_pods_events(h: H) -> None:
    # An S3 mount whose claim is bound to a volume the node cannot mount (a CSI driver it lacks):
    # a kubelet leaves the containers "ContainerCreating" and tells only in FailedMount Events.
    pv = f"e2e-no-driver-{uuid.uuid4().hex[:6]}"
    h.core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "csi": {"driver": "s3.csi.example.test", "volumeHandle": pv},
                "persistentVolumeReclaimPolicy": "Retain",
            },
        }
    )
    try:
        claim = {
            "metadata": {"name": "no-driver", "labels": {"dsjobs.dev/s3-mount-id": "nodriver"}},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        h.core.create_namespaced_persistent_volume_claim(h.namespace, claim)
        h.create_job("no-driver", {"cmd": "ls ${nodriver}", "s3MountIds": ["nodriver"]})

        def failed_mount() -> str | None:
            events = h.core.list_namespaced_event(
                h.namespace, field_selector="involvedObject.name=no-driver-a1,reason=FailedMount"
            ).items
            return events[-1].message if events else None

        message = poll("the node's FailedMount Event", failed_mount, 60)

        def told() -> dict[str, Any] | None:
            status = h.status("no-driver")
            return status if status.get("statusDetails", "").endswith(f": {message}") else None

        status = poll("the FailedMount in the details", told, 90)
        assert status["phase"] == "PREPARING", status
        assert status["statusDetails"].startswith("starting on node "), status
        h.patch_spec("no-driver", {"cancel": {"reason": "e2e done"}})
        assert h.wait_phase("no-driver", "CANCELLED", "ERROR", timeout=120)["phase"] == "CANCELLED"
    finally:
        with contextlib.suppress(ApiException):
            h.core.delete_namespaced_persistent_volume_claim("no-driver", h.namespace)
        with contextlib.suppress(ApiException):
            h.core.delete_persistent_volume(pv)


def test_an_output_dataset_whose_claim_was_deleted_is_not_told_created(h: H) -> None:
    if h.cluster.root is None:
        pytest.skip(LOCAL_CLASS_ONLY)
    # pvc-protection keeps a deleted claim only until the pod ends: the job said SUCCESS with
    # a dataset id that nothing could ever mount.
    ods = {"name": "lost", "var": "LOST", "sizeGb": 1}
    h.create_job("ods-lost", {"cmd": "echo a > ${LOST}/a.txt; sleep 20", "outputDatasets": [ods]})
    h.wait_phase("ods-lost", "EXECUTING", timeout=120)
    (claim,) = h.core.list_namespaced_persistent_volume_claim(
        h.namespace, label_selector="dsjobs.dev/job-id=ods-lost"
    ).items
    h.kubectl("delete", "pvc", "-n", h.namespace, claim.metadata.name, "--wait=false")
    status = h.wait_phase("ods-lost", "SUCCESS", "ERROR", timeout=120)
    assert status["phase"] == "SUCCESS" and not status.get("outputDatasets"), status
    assert "not created: its volume claim was deleted while the job ran" in status["statusDetails"], status
    assert _told(h, "ods-lost", "DatasetLost")
    assert "DatasetsCreated" not in [e.reason for e in h.events("ods-lost")]


def test_output_datasets_become_datasets_that_outlive_the_job(h: H, storage: Storage) -> None:
    if h.cluster.root is None:
        pytest.skip(LOCAL_CLASS_ONLY)
    # The example writes to ${MODELS}; when it succeeds that claim is the dataset of its status's
    # id, which later jobs mount read-only by id, and which stays when the job is deleted.
    apply_example(h, "dataset.yaml")
    status = h.wait_phase("make-dataset", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    ((dataset,),) = [status["outputDatasets"]]
    dataset_id = dataset["id"]
    ods = {"name": "models", "description": "weights of the example model", "var": "MODELS", "sizeGb": 1}
    assert dataset["desc"] == {**ods, "labels": {}}
    claim_name = f"dsjobs-dataset-{dataset_id}"
    try:
        claim = h.core.read_namespaced_persistent_volume_claim(claim_name, h.namespace)
        assert claim.metadata.labels["dsjobs.dev/dataset-id"] == dataset_id
        assert not claim.metadata.owner_references
        assert claim.metadata.annotations["dsjobs.dev/dataset-name"] == "models"
        assert _told(h, "make-dataset", "DatasetsCreated")

        read = (
            f"cat ${{{dataset_id}}}/weights.txt && (touch ${{{dataset_id}}}/x 2>/dev/null || echo read-only)"
        )
        h.create_job("ods-reader", {"cmd": read, "datasetIds": [dataset_id]})
        status = h.wait_phase("ods-reader", "SUCCESS", "ERROR")
        assert status["phase"] == "SUCCESS", status
        stdout = next(f["key"] for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
        assert storage.get_bytes(stdout).decode() == "0.1 0.2 0.3\nread-only\n"

        h.custom.delete_namespaced_custom_object(
            "dsjobs.dev", "v1alpha1", h.namespace, "projectjobs", "make-dataset"
        )
        poll("the writer job gone", lambda: h.job("make-dataset") is None, 60)
        time.sleep(2)  # the garbage collector would act on an owner reference at once
        kept = h.core.read_namespaced_persistent_volume_claim(claim_name, h.namespace)
        assert kept.metadata.uid == claim.metadata.uid and not kept.metadata.deletion_timestamp
        # The reason it stays, whatever the garbage collector's pace: nothing owns it.
        assert not kept.metadata.owner_references, kept.metadata.owner_references

        # A job that does not succeed leaves no claim behind, and no dataset in its status.
        failing = {"cmd": "echo half > ${MODELS}/w.txt; exit 3", "outputDatasets": [ods]}
        h.create_job("ods-failed", failing)
        status = h.wait_phase("ods-failed", "ERROR", "SUCCESS")
        assert status["phase"] == "ERROR" and not status.get("outputDatasets"), status

        def claims_of_failed() -> list[Any]:
            return h.core.list_namespaced_persistent_volume_claim(
                h.namespace, label_selector="dsjobs.dev/job-id=ods-failed"
            ).items

        # Deleted, which completes once the pod that mounted it is gone (pvc-protection; the
        # harness keeps finished pods for 10 minutes).
        (pod,) = h.pods("ods-failed")
        claimed = [
            v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim
        ]
        assert [c.metadata.name for c in claims_of_failed()] == claimed, claimed
        poll(
            "the failed job's dataset claim deleted",
            lambda: all(c.metadata.deletion_timestamp for c in claims_of_failed()),
            60,
        )
    finally:
        h.core.delete_namespaced_persistent_volume_claim(claim_name, h.namespace)


def test_a_spark_connector_is_the_config_datasphere_spark_reads(h: H, storage: Storage) -> None:
    # The connector's Secret (an admin's, like the mounts' claims) reaches the job where the
    # official client's `datasphere.spark.connect_to_spark()` looks: $JOB_DATAPROC_CONNECTION_CONFIG.
    config = {
        "master_node_host": "spark-connect.spark:15002",
        "connection_mode": "SPARK_CONNECT",
        "session_params": {"spark.executor.memory": "2g"},
    }
    secret = k8s_client.V1Secret(
        metadata=k8s_client.V1ObjectMeta(name="dsjobs-spark-bt1spark"),
        string_data={"config.json": json.dumps(config)},
    )
    h.core.create_namespaced_secret(h.namespace, secret)
    try:
        read = (
            "python -c 'import os; from datasphere.spark import load_spark_config as l; "
            'c = l(os.environ["JOB_DATAPROC_CONNECTION_CONFIG"]); '
            "print(c.master_node_host, c.connection_mode.name, c.session_params)'"
        )
        h.create_job("spark", {"cmd": read, "sparkParameters": {"connectorId": "bt1spark"}})
        status = h.wait_phase("spark", "SUCCESS", "ERROR")
        assert status["phase"] == "SUCCESS", status
        stdout = next(f["key"] for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
        assert storage.get_bytes(stdout).decode() == (
            "spark-connect.spark:15002 CONNECT {'spark.executor.memory': '2g'}\n"
        )
        # A connector whose config the client could not read fails the job before it starts.
        bad = {**config, "connection_mode": "YARN"}
        h.core.patch_namespaced_secret(
            "dsjobs-spark-bt1spark", h.namespace, {"stringData": {"config.json": json.dumps(bad)}}
        )
        h.create_job("spark-bad", {"cmd": "true", "sparkParameters": {"connectorId": "bt1spark"}})
        status = h.wait_phase("spark-bad", "ERROR", "SUCCESS")
        assert status["phase"] == "ERROR", status
        assert (
            "connection_mode must be one of SPARK_CONNECT, SPARK_CONTEXT, SPARK_LOCAL"
            in status["statusDetails"]
        )
        assert not h.pods("spark-bad")
    finally:
        h.core.delete_namespaced_secret("dsjobs-spark-bt1spark", h.namespace)


def test_project_secrets_reach_the_job_as_environment_variables_whatever_their_names(
    h: H, storage: Storage
) -> None:
    # As on DataSphere, whose secret names may have hyphens: `os.environ["hf-token"]` in the job.
    # The shells on the way drop such names from the environment; they come from the files.
    secret = k8s_client.V1Secret(
        metadata=k8s_client.V1ObjectMeta(name="dsjobs-project-secrets"),
        string_data={"API_TOKEN": "t0k3n", "hf-token": "hf_abc\n", "my.key": "a b=c"},
    )
    h.core.create_namespaced_secret(h.namespace, secret)
    try:
        read = (
            "python3 -c 'import os, json; "
            'print(json.dumps([os.environ.get(k) for k in ("API_TOKEN", "hf-token", "my.key")]))\''
        )
        h.create_job("secrets", {"cmd": read})
        status = h.wait_phase("secrets", "SUCCESS", "ERROR")
        assert status["phase"] == "SUCCESS", status
        stdout = next(f["key"] for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
        assert json.loads(storage.get_bytes(stdout)) == ["t0k3n", "hf_abc\n", "a b=c"]
    finally:
        h.core.delete_namespaced_secret("dsjobs-project-secrets", h.namespace)


def test_a_job_cannot_ship_the_runners_credentials_as_its_logs(h: H, storage: Storage) -> None:
    # The ship container mounts the runner's Secret (the storage key). A job that replaces its log
    # files by symlinks to that Secret's files must get none of it into its logs or outputs.
    secret = h.env["DSJOBS_S3_SECRET_KEY"].encode()
    config = "/job/.dsjobs-config"
    cmd = (
        "echo before"
        " && cd /job/.dsjobs/logs"
        # -f: the runner may create a file again between a rm and the ln (its system log lines).
        f" && ln -sf {config}/DSJOBS_S3_SECRET_KEY stderr.log"
        f" && ln -sf {config}/runner.json job_progress.jsonl"
        f" && ln -sf {config}/DSJOBS_S3_SECRET_KEY system.log"
        f" && ln -s {config}/DSJOBS_S3_SECRET_KEY /job/work/out.txt"
        " && sleep 3 && echo after"
    )
    h.create_job("no-leak", {"cmd": cmd, "outputFiles": [{"path": "out.txt"}]})
    status = h.wait_phase("no-leak", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    keys = _objects(storage, job_prefix(PROJECT_ID, "no-leak"))
    assert keys, status
    for key in keys:
        assert secret not in (storage.get_bytes(key) or b""), key
    stdout = next(f["key"] for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
    assert storage.get_bytes(stdout) == b"before\nafter\n"
    assert not status.get("outputFiles"), status
    errors = {e.get("outputFileDesc", {}).get("path") or e.get("logFileName") for e in status["fileErrors"]}
    assert {"out.txt", "stderr.txt"} <= errors, status["fileErrors"]


def test_absolute_links_in_a_directory_output_ship_the_work_dir_s_files_only(h: H, storage: Storage) -> None:
    # In the pod: `ln -s "$PWD/ckpt/best.pt" outputs/` ships the file; absolute links that name
    # the working dir but climb out of it (to the runner's Secret, which the ship container
    # mounts) or lead there through another link are not followed, and are counted for the user.
    secret = h.env["DSJOBS_S3_SECRET_KEY"].encode()
    config = "/job/.dsjobs-config"
    cmd = (
        "mkdir -p ckpt outputs && printf weights > ckpt/best.pt"
        ' && ln -s "$PWD/ckpt/best.pt" outputs/best.pt'
        ' && ln -s "$PWD/../.dsjobs-config/DSJOBS_S3_SECRET_KEY" outputs/climb'
        f' && ln -s {config}/DSJOBS_S3_SECRET_KEY key && ln -s "$PWD/key" outputs/via'
        ' && ln -s "$PWD//outputs/../../.dsjobs-config/runner.json" outputs/dots'
    )
    h.create_job("abs-links", {"cmd": cmd, "outputFiles": [{"path": "outputs"}]})
    status = h.wait_phase("abs-links", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    [out] = status["outputFiles"]
    with zipfile.ZipFile(io.BytesIO(storage.get_bytes(out["key"]) or b"")) as zf:
        assert {i.filename: zf.read(i) for i in zf.infolist()} == {"outputs/best.pt": b"weights"}
    for key in _objects(storage, job_prefix(PROJECT_ID, "abs-links")):
        assert secret not in (storage.get_bytes(key) or b""), key
    [err] = status["fileErrors"]
    assert err["description"].startswith("3 symlinks leading outside the working directory not followed"), err


@pytest.mark.parametrize("kind", ["pods", "secrets"])
def test_a_job_over_a_namespace_quota_waits_and_says_why(h: H, kind: str) -> None:
    # A ResourceQuota refuses the pod or its Secret (403): the job waits in PREPARING naming the
    # quota, as a Kubernetes Job would, with nothing half-made left, and runs once there is room;
    # one cancelled meanwhile never starts.
    quota = k8s_client.V1ResourceQuota(
        metadata=k8s_client.V1ObjectMeta(name="no-room"),
        spec=k8s_client.V1ResourceQuotaSpec(hard={kind: "0"}),
    )
    h.core.create_namespaced_resource_quota(h.namespace, quota)
    job, cancelled = f"over-{kind}-quota", f"over-{kind}-quota-cancelled"
    try:
        # Quota admission reads quotas from an informer (and caches a namespace without any for a
        # while): until it applies this one, a job created now simply runs. Probe with dry runs.
        def quota_applies() -> bool:
            meta = k8s_client.V1ObjectMeta(generate_name="quota-probe-")
            try:
                if kind == "secrets":
                    h.core.create_namespaced_secret(
                        h.namespace, k8s_client.V1Secret(metadata=meta), dry_run="All"
                    )
                else:
                    spec = k8s_client.V1PodSpec(containers=[k8s_client.V1Container(name="c", image="x")])
                    h.core.create_namespaced_pod(
                        h.namespace, k8s_client.V1Pod(metadata=meta, spec=spec), dry_run="All"
                    )
            except ApiException as exc:
                return exc.status == 403 and "exceeded quota: no-room" in str(exc.body)
            return False

        poll(f"quota admission to apply the {kind} quota", quota_applies, 60)
        h.create_job(job, {"cmd": "echo ran"})
        h.create_job(cancelled, {"cmd": "echo ran"})

        def waiting(name: str) -> dict[str, Any] | None:
            status = h.status(name)
            return status if "exceeded quota: no-room" in status.get("statusDetails", "") else None

        for name in (job, cancelled):
            status = poll(f"{name} waiting for quota", lambda name=name: waiting(name), 60)
            assert status["phase"] == "PREPARING", status
            assert status["statusDetails"].startswith("waiting to create the job's pod: "), status
            assert status["actualCloudInstanceType"] == "c1.4", status  # `kubectl get pj` shows it
            assert _told(h, name, "FailedCreate")
            poll(f"no pod of {name}", lambda name=name: not h.pods(name), 30)
            secrets = h.core.list_namespaced_secret(
                h.namespace, label_selector=f"dsjobs.dev/job-id={name}"
            ).items
            assert not secrets, [x.metadata.name for x in secrets]
        # While it waits, its tries are dry runs: no Secret made and deleted again each time (the
        # tries come 0.5, 1, 2, 4, 8 s apart at first).
        listed = h.core.list_namespaced_secret(h.namespace, label_selector=f"dsjobs.dev/job-id={job}")
        made = [
            event["object"].metadata.name
            for event in k8s_watch.Watch().stream(
                h.core.list_namespaced_secret,
                h.namespace,
                label_selector=f"dsjobs.dev/job-id={job}",
                resource_version=listed.metadata.resource_version,
                timeout_seconds=10,
            )
            if event["type"] == "ADDED"
        ]
        assert not made, made
        h.patch_spec(cancelled, {"cancel": {"reason": "no room"}})
        status = h.wait_phase(cancelled, "CANCELLED", "SUCCESS", "ERROR")
        assert status["phase"] == "CANCELLED", status
    finally:
        h.core.delete_namespaced_resource_quota("no-room", h.namespace)
    status = h.wait_phase(job, "SUCCESS", "ERROR", timeout=120)
    assert status["phase"] == "SUCCESS", status
    assert status["attempt"] == 1, status
    assert not h.pods(cancelled)


def test_a_working_storage_claim_a_quota_refuses_is_told_and_made_once_there_is_room(h: H) -> None:
    if h.cluster.root is None:
        pytest.skip(LOCAL_CLASS_ONLY)
    # The ephemeral volume controller, not the operator, makes the claim; the quota's refusal is
    # only in its Event on the pod, which the details now quote (the scheduler says only that it
    # waits for the claim).
    quota = k8s_client.V1ResourceQuota(
        metadata=k8s_client.V1ObjectMeta(name="no-claims"),
        spec=k8s_client.V1ResourceQuotaSpec(hard={"persistentvolumeclaims": "0"}),
    )
    h.core.create_namespaced_resource_quota(h.namespace, quota)
    try:
        storage = {"type": "SSD", "sizeGb": 100}
        h.create_job("claim-quota", {"cmd": "echo ran", "extendedWorkingStorage": storage})
        told = "its claim cannot be made: ephemeral volume dsjobs-work: create PVC claim-quota-a1-dsjobs-work"

        def refused() -> dict[str, Any] | None:
            status = h.status("claim-quota")
            return status if told in status.get("statusDetails", "") else None

        status = poll("the claim's refusal in the details", refused, 90)
        assert status["phase"] == "PREPARING", status
        assert "exceeded quota: no-claims" in status["statusDetails"], status
    finally:
        h.core.delete_namespaced_resource_quota("no-claims", h.namespace)
    status = h.wait_phase("claim-quota", "SUCCESS", "ERROR", timeout=180)
    assert status["phase"] == "SUCCESS", status


def test_a_job_over_its_instance_types_memory_is_oom_killed(h: H) -> None:
    # The instance type's memory limit is the job container's; the local nodes enforce it with a
    # memory cgroup where the host allows, and the kernel's OOM kill is the job's ERROR.
    if not memory_limits_enforced(h.cluster):
        pytest.skip("this host gives the node agent no memory cgroups: limits are recorded only")
    small_spec = {
        "vcpu": 1,
        "memory": "64Mi",
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "64Mi"}},
    }
    with _instance_type(h, "m1", small_spec) as small:
        grow = "python -c 'chunks = []\nwhile True: chunks.append(bytearray(16 * 2**20))'"
        h.create_job("oom", {"cmd": grow, "cloudInstanceTypes": [{"name": small}]})
        status = h.wait_phase("oom", "ERROR", "SUCCESS")
    assert status["phase"] == "ERROR", status
    assert status["returnCode"] == 137, status
    told = f"ran out of memory (OOMKilled; the job container's memory limit of instance type {small} is 64Mi)"
    assert told in status["statusDetails"], status
    finished = next(c for c in status["conditions"] if c["type"] == "Finished")
    assert finished["reason"] == "OOMKilled"
    # What it used before the kill is kept (docs/runner.md#resource-usage).
    assert [f["desc"]["path"] for f in status["diagnosticFiles"]] == ["docker_stats.tsv"], status


def test_the_job_s_memory_use_is_told_in_docker_stats(h: H, storage: Storage) -> None:
    # The entry script samples its container's cgroup; the ship sidecar sends the lines as the
    # `.docker_stats.tsv` records the official CLI writes to its docker_stats.tsv.
    if not memory_limits_enforced(h.cluster):
        pytest.skip("this host gives the node agent no memory cgroups: no container cgroup to read")
    # 200 MiB held, and about two seconds of CPU.
    hold = (
        "python -c 'import time; x = bytearray(200 * 2**20); t = time.process_time()\n"
        "while time.process_time() - t < 2: pass'"
    )
    h.create_job("stats", {"cmd": hold})
    status = h.wait_phase("stats", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    records = read_records(storage, PROJECT_ID, "stats", 0, max_records=10**6).records
    text = b"".join(r.content for r in records if r.file_path == DOCKER_STATS_LOG_PATH).decode()
    header, *lines = text.splitlines()
    assert header.split("\t") == list(DOCKER_STATS_HEADER)
    rows = [dict(zip(DOCKER_STATS_HEADER, line.split("\t"), strict=True)) for line in lines]
    assert len(rows) >= 2, text  # the first sample at the start, the script's own at the end
    # The instance type's memory limit is the container's.
    assert {r["memory_limit_bytes"] for r in rows} == {str(32 * 2**30)}, text
    assert int(rows[-1]["memory_peak_bytes"]) >= 200 * 2**20, text
    if cpu_accounted(h.cluster):  # a cpuacct cgroup of the container's own (node/cgroup.py)
        assert float(rows[-1]["cpu_seconds"]) >= 2, text
        assert rows[-1]["cpu_percent"], text  # since the first sample
    # The same lines are kept as the job's diagnostic file (`download-files --with-diagnostics`).
    (kept,) = status["diagnosticFiles"]
    assert kept["desc"]["path"] == "docker_stats.tsv"
    assert storage.get_bytes(kept["key"]) == text.encode()


def test_the_job_has_a_dev_shm_of_its_own_as_big_as_half_its_memory(h: H) -> None:
    # PyTorch DataLoader workers and NCCL pass tensors through /dev/shm; a container runtime's
    # is 64 MiB. The local node binds the pod's volume there, in the container's mount namespace.
    marker = f"dsjobs-e2e-{uuid.uuid4().hex[:8]}"
    use = (
        "python -c 'from multiprocessing import shared_memory as s\n"
        f'm = s.SharedMemory(create=True, size=100 * 2**20, name="{marker}"); m.buf[-1] = 7\n'
        f'open("/dev/shm/{marker}.kept", "w").write("x")\n'
        'import os; print(sorted(os.listdir("/dev/shm")))\n'
        "m.close(); m.unlink()'"
    )
    try:
        h.create_job("shm", {"cmd": use})
        status = h.wait_phase("shm", "SUCCESS", "ERROR")
        assert status["phase"] == "SUCCESS", status
        (pod,) = h.pods("shm")
        shm = next(v for v in pod.spec.volumes if v.name == "dsjobs-shm")
        job = pod.spec.containers[0]
        assert shm.empty_dir.medium == "Memory"
        assert parse_quantity(shm.empty_dir.size_limit) * 2 == parse_quantity(job.resources.limits["memory"])
        assert any(m.name == "dsjobs-shm" and m.mount_path == "/dev/shm" for m in job.volume_mounts)
        # What the job put there stayed in the pod's volume.
        assert not os.path.exists(f"/dev/shm/{marker}.kept")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{marker}.kept")


def test_the_program_s_thread_pools_are_as_wide_as_its_instance_type(h: H) -> None:
    # The container sees all of its node's CPUs; c1.4's limit is 4 (the downward API tells the
    # entry script). A CPU type's job sees no GPU, whatever its image's NVIDIA_VISIBLE_DEVICES.
    check = (
        'test "$OMP_NUM_THREADS $PYTHON_CPU_COUNT $PYTHONUNBUFFERED $NVIDIA_VISIBLE_DEVICES" = "4 4 1 void"'
    )
    h.create_job("cpus", {"cmd": check, "cloudInstanceTypes": [{"name": "c1.4"}]})
    status = h.wait_phase("cpus", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status


def test_a_namespace_enforcing_restricted_runs_jobs_once_the_operator_is_set_to_it(
    h: H, tmp_path: Path
) -> None:
    # The API server's own PodSecurity admission judges the pods: refused under `restricted` at
    # first (the job waits saying what to do), admitted and run with DSJOBS_JOB_POD_SECURITY.
    label = "pod-security.kubernetes.io/enforce"
    h.core.patch_namespace(h.namespace, {"metadata": {"labels": {label: "restricted"}}})
    try:
        h.create_job("psa", {"cmd": "true"})

        def told() -> bool:
            return "DSJOBS_JOB_POD_SECURITY=restricted" in h.status("psa").get("statusDetails", "")

        poll("the job told why it waits", told, 60)
        assert h.status("psa")["phase"] in ("CREATING", "PREPARING")
        assert not h.pods("psa")
        h.kill()
        restricted = {**h.env, "DSJOBS_JOB_POD_SECURITY": "restricted"}
        replica = dataclasses.replace(h, env=restricted, log_path=tmp_path / "restricted.log", proc=None)
        replica.start()
        try:
            status = h.wait_phase("psa", "SUCCESS", "ERROR")
        finally:
            replica.stop()
            h.start()
        assert status["phase"] == "SUCCESS", status
        (pod,) = h.pods("psa")
        context = pod.spec.containers[0].security_context
        assert context.run_as_non_root and context.run_as_user == 1000
        assert context.allow_privilege_escalation is False and context.capabilities.drop == ["ALL"]
    finally:
        h.core.patch_namespace(h.namespace, {"metadata": {"labels": {label: "baseline"}}})


def test_non_zero_exit_is_an_error_with_the_return_code(h: H) -> None:
    h.create_job("exit-3", {"cmd": 'python -c "import sys; print(42); sys.exit(3)"'})
    status = h.wait_phase("exit-3", "SUCCESS", "ERROR")
    assert status["phase"] == "ERROR" and status["returnCode"] == 3
    assert "Program returned code 3" in status["statusDetails"]
    assert any(f["desc"]["path"] == "stdout.txt" for f in status["logFiles"])
    assert re.search(rf"{h.namespace}/exit-3: \w+ -> ERROR \(NonZeroExit, return code 3\)", h.log())


def test_a_stop_signal_from_inside_the_job_is_the_program_s_failure_not_a_stopped_pod(h: H) -> None:
    # It was PodStopped ("deleted or evicted, not cancelled"), an infrastructure failure that a
    # retry policy ran again.
    policy = {"maxAttempts": 2, "backoffSeconds": 1, "retryOnExitCodes": [3]}
    h.create_job("kills-parent", {"cmd": "sh -c 'echo bye; kill $PPID; sleep 5'"}, retryPolicy=policy)
    status = h.wait_phase("kills-parent", "SUCCESS", "ERROR", timeout=120)
    assert status["phase"] == "ERROR" and status["attempt"] == 1, status
    assert "sent a stop signal from inside its container" in status["statusDetails"], status
    finished = [c for c in status["conditions"] if c["type"] == "Finished"]
    assert finished and finished[0]["reason"] == "NonZeroExit", status


def test_a_retried_exit_code_gets_a_fresh_attempt_after_the_backoff(h: H) -> None:
    # The local node sets HOSTNAME to the pod's name, as a container runtime does: -a<attempt>.
    cmd = "sh -c 'case $HOSTNAME in *-a1) echo first; exit 3;; esac; echo again'"
    policy = {"maxAttempts": 3, "backoffSeconds": 2, "retryOnExitCodes": [3]}
    watch = h.watch_pods("retried")
    try:
        h.create_job("retried", {"cmd": cmd}, retryPolicy=policy)
        h.create_job("not-retried", {"cmd": "sh -c 'exit 4'"}, retryPolicy=policy)
        status = h.wait_phase("retried", "SUCCESS", "ERROR", timeout=180)
    finally:
        watch.stop()
    assert status["phase"] == "SUCCESS" and status["attempt"] == 2 and status["returnCode"] == 0, status
    failed = [e for e in h.events("retried") if e.reason == "AttemptFailed"]
    assert [e.message for e in failed] == ["attempt 1: Program returned code 3"], failed
    # A fresh pod per attempt, never two at once: the first is gone before the second exists.
    assert watch.history[:3] == [("ADDED", "retried-a1"), ("DELETED", "retried-a1"), ("ADDED", "retried-a2")]
    # 4 is not in retryOnExitCodes: one attempt, ERROR with its code.
    status = h.wait_phase("not-retried", "SUCCESS", "ERROR", timeout=120)
    assert status["phase"] == "ERROR" and status["returnCode"] == 4 and status.get("attempt", 1) == 1, status


def test_the_most_env_vars_a_job_may_have_fit(h: H) -> None:
    # The runner Secret holds the values once (entry script), not also in the config.
    h.create_job("big-env", {"cmd": "sh -c 'test $${#V26} -eq 32768'", "env": {"vars": big_env("x")}})
    status = h.wait_phase("big-env", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS" and status["returnCode"] == 0, status


def big_env(char: str) -> dict[str, str]:
    """27 values of 32 KiB (the most one may have): 864 KiB, about all a job may take (spec-size:
    896 KiB)."""
    return {f"V{i}": char * 32768 for i in range(27)}


@pytest.mark.parametrize(
    ("name", "params", "cause"),
    [
        ("bad-type", {"cmd": "true", "cloudInstanceTypes": [{"name": "z9.nope"}]}, "z9.nope"),
        ("bad-mount", {"cmd": "ls ${nope-bucket}", "s3MountIds": ["nope-bucket"]}, "S3 mount 'nope-bucket'"),
        ("bad-dataset", {"cmd": "ls ${nope-data}", "datasetIds": ["nope-data"]}, "dataset 'nope-data'"),
        ("bad-image", {"cmd": "true", "env": {"dockerImageResourceId": "no-such-image"}}, "'no-such-image'"),
        (
            "bad-spark",
            {"cmd": "true", "sparkParameters": {"connectorId": "nope-spark"}},
            "Spark connector 'nope-spark': Secret 'dsjobs-spark-nope-spark' does not exist",
        ),
    ],
)
def test_jobs_that_cannot_run_fail_naming_the_cause(
    h: H, name: str, params: dict[str, Any], cause: str
) -> None:
    h.create_job(name, params)
    status = h.wait_phase(name, "ERROR", "SUCCESS")
    assert status["phase"] == "ERROR" and cause in status["statusDetails"], status
    assert not h.pods(name)
    assert "Failed" in _reasons(h, name)


def _image_with_api_password(h: H, job: str) -> dict[str, Any]:
    """A dockerImageSpec whose password is in a Secret as the API leaves it (`<job>-docker-password`,
    role registry-password), but owned by no job: so it names the registry it may go to."""
    password = f"{job}-docker-password"
    labels = {"dsjobs.dev/job-id": job, "dsjobs.dev/secret-role": "registry-password"}
    meta = {
        "name": password,
        "labels": labels,
        "annotations": {"dsjobs.dev/registry-hosts": "registry.example.com"},
    }
    h.core.create_namespaced_secret(h.namespace, {"metadata": meta, "stringData": {"password": "hunter2"}})
    return {
        "imageUrl": "registry.example.com/team/img:1",
        "username": "bot",
        "passwordSecretRef": {"name": password, "key": "password"},
    }


def test_a_retry_reads_the_registry_password_again(h: H) -> None:
    # Registry tokens are short-lived: one rotated while attempt 1 failed is the one attempt 2's
    # pod pulls with (each attempt has its own registry Secret, as its own runner Secret).
    job = "rotated-pw"
    image = _image_with_api_password(h, job)
    password = image["passwordSecretRef"]["name"]
    cmd = "sh -c 'case $HOSTNAME in *-a1) exit 3;; esac'"
    policy = {"maxAttempts": 2, "backoffSeconds": 10, "retryOnExitCodes": [3]}
    h.create_job(job, {"cmd": cmd, "env": {"dockerImageSpec": image}}, retryPolicy=policy)
    poll("attempt 1 to fail", lambda: any(e.reason == "AttemptFailed" for e in h.events(job)), 120)
    h.core.patch_namespaced_secret(password, h.namespace, {"stringData": {"password": "rotated"}})
    status = h.wait_phase(job, "SUCCESS", "ERROR", timeout=120)
    assert status["phase"] == "SUCCESS" and status["attempt"] == 2, status
    [pod] = h.pods(job)
    assert [s.name for s in pod.spec.image_pull_secrets] == [f"{job}-a2-registry"]
    secret = h.core.read_namespaced_secret(f"{job}-a2-registry", h.namespace)
    config = json.loads(base64.b64decode(secret.data[".dockerconfigjson"]))
    assert config["auths"]["registry.example.com"]["password"] == "rotated", config
    # Attempt 1's Secrets went once attempt 2's pod was made (they stayed until the job ended:
    # one more pair per retry, fallback or InstanceType change).
    left = h.core.list_namespaced_secret(h.namespace, label_selector=f"{JOB_LABEL}={job}").items
    names = {s.metadata.name for s in left}
    assert {f"{job}-a2-registry", f"{job}-a2-runner"} <= names, names
    assert not {f"{job}-a1-registry", f"{job}-a1-runner"} & names, names


def test_a_retry_runs_the_image_the_first_attempt_resolved(h: H) -> None:
    # The project's docker image resource is re-pointed while attempt 1 fails: attempt 2 runs what
    # attempt 1 ran (status.image), not the new image.
    cm = {"metadata": {"name": "dsjobs-docker-images"}, "data": {"trainer": "registry.example.com/trainer:1"}}
    h.core.create_namespaced_config_map(h.namespace, cm)
    try:
        cmd = "sh -c 'case $HOSTNAME in *-a1) exit 3;; esac'"
        policy = {"maxAttempts": 2, "backoffSeconds": 10, "retryOnExitCodes": [3]}
        h.create_job(
            "same-image", {"cmd": cmd, "env": {"dockerImageResourceId": "trainer"}}, retryPolicy=policy
        )
        poll(
            "attempt 1 to fail", lambda: any(e.reason == "AttemptFailed" for e in h.events("same-image")), 120
        )
        h.core.patch_namespaced_config_map(
            "dsjobs-docker-images", h.namespace, {"data": {"trainer": "registry.example.com/trainer:2"}}
        )
        status = h.wait_phase("same-image", "SUCCESS", "ERROR", timeout=120)
    finally:
        h.core.delete_namespaced_config_map("dsjobs-docker-images", h.namespace)
    assert status["phase"] == "SUCCESS" and status["attempt"] == 2, status
    assert status["image"] == "registry.example.com/trainer:1", status
    [pod] = h.pods("same-image")
    [job] = [c for c in pod.spec.containers if c.name == "job"]
    assert job.image == "registry.example.com/trainer:1"


def test_a_job_that_cannot_run_leaves_no_registry_secret(h: H) -> None:
    # The registry Secret is made after the checks: a failed job without a pod has nothing that
    # would delete it later.
    job = "no-mount-pw"
    image = _image_with_api_password(h, job)
    password = image["passwordSecretRef"]["name"]
    h.create_job(
        job, {"cmd": "ls ${nope-bucket}", "s3MountIds": ["nope-bucket"], "env": {"dockerImageSpec": image}}
    )
    status = h.wait_phase(job, "ERROR", "SUCCESS")
    assert status["phase"] == "ERROR" and "S3 mount 'nope-bucket'" in status["statusDetails"], status
    items = h.core.list_namespaced_secret(h.namespace, label_selector=f"dsjobs.dev/job-id={job}").items
    assert {s.metadata.name for s in items} == {password}


def test_a_job_too_big_for_the_shell_stage_in_runs(h: H) -> None:
    """Within spec-size, but each ' is 5 bytes of shell quoting in an entry script the
    operator renders: such a job failed ConfigTooLarge; it stages in Python now."""
    h.create_job("quotes", {"cmd": 'test "$${#V26}" = 32768', "env": {"vars": big_env("'")}})
    status = h.wait_phase("quotes", "ERROR", "SUCCESS")
    assert status["phase"] == "SUCCESS", status


def test_image_that_cannot_be_pulled_fails(h: H) -> None:
    image = {"dockerImageSpec": {"imageUrl": "registry.invalid/nope/img:1"}}
    h.create_job("no-pull", {"cmd": "true", "env": image})
    # .invalid never resolves (RFC 6761): a kubelet's pull fails, and so does the process node's.
    status = h.wait_phase("no-pull", "ERROR", "EXECUTING", "UPLOADING_OUTPUT", "SUCCESS", timeout=120)
    assert status["phase"] == "ERROR", status
    details = status["statusDetails"]
    assert "the image could not be pulled for 15s" in details, details
    assert "registry.invalid/nope/img:1" in details, details
    assert "ErrImagePull" in details or "ImagePullBackOff" in details, details


# --- cancel ---------------------------------------------------------------------------------------

_SIGNALLED = (
    "import json, os, signal, sys, time\n"
    "def stop(*_):\n"
    "    print('got SIGUSR1', flush=True)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGUSR1, stop)\n"
    "open(os.environ['JOB_PROGRESS_FILENAME'], 'a').write(json.dumps({'progress': 1, 'message': 'ready'}) + chr(10))\n"
    "[time.sleep(0.2) for _ in range(3000)]\n"
)


def _ready_for_sigusr1(h: H, storage: Storage, name: str, program: str, timeout: str) -> None:
    """A job running `program` with SIGUSR1 and `timeout` as its graceful shutdown, once the program
    said it is ready (its handler is set)."""
    h.create_job(
        name,
        {
            "cmd": "python ${PROG}",
            "gracefulShutdownParameters": {"signal": 10, "timeout": timeout},
            **_program_input(storage, "PROG", program),
        },
    )
    h.wait_phase(name, "EXECUTING", timeout=120)
    poll("the program to be ready", lambda: read_progress(storage, PROJECT_ID, name), 60)


def test_graceful_cancel_delivers_the_signal_then_cancels(h: H, storage: Storage) -> None:
    _ready_for_sigusr1(h, storage, "cancel-me", _SIGNALLED, "20s")
    h.patch_spec("cancel-me", {"cancel": {"reason": "e2e", "graceful": True}})
    status = h.wait_phase("cancel-me", "CANCELLED", "SUCCESS", "ERROR", timeout=20 + 10 + 60)
    assert status["phase"] == "CANCELLED", status
    assert "Cancelling" in _reasons(h, "cancel-me")
    stdout = next(f for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
    assert b"got SIGUSR1" in (storage.get_bytes(stdout["key"]) or b"")
    # Cancelling a finished job changes nothing.
    h.patch_spec("cancel-me", {"cancel": {"reason": "again", "graceful": False}})
    assert h.wait_phase("cancel-me", "CANCELLED")["finishedAt"] == status["finishedAt"]


_IGNORES_SIGUSR1 = (
    "import json, os, signal, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: print('ignoring SIGUSR1', flush=True))\n"
    "open(os.environ['JOB_PROGRESS_FILENAME'], 'a').write(json.dumps({'progress': 1, 'message': 'ready'}) + chr(10))\n"
    "[time.sleep(0.2) for _ in range(3000)]\n"
)


def test_a_forceful_cancel_cuts_a_graceful_one_short(h: H, storage: Storage) -> None:
    # The CLI's second Ctrl-C: the pod deleted with the job's 120 s timeout went on for all of it.
    _ready_for_sigusr1(h, storage, "escalate", _IGNORES_SIGUSR1, "120s")
    h.patch_spec("escalate", {"cancel": {"reason": "e2e", "graceful": True}})
    h.wait_phase("escalate", "CANCELLING", timeout=30)
    pod = poll(
        "the pod's deletion",
        lambda: next((p for p in h.pods("escalate") if p.metadata.deletion_timestamp), None),
        30,
    )
    assert pod.metadata.deletion_grace_period_seconds >= 120, pod.metadata  # the job's timeout and a margin
    time.sleep(2)  # the program ignores the signal; the pod would wait out its 120 s
    log_before = len(h.log())
    h.patch_spec("escalate", {"cancel": {"reason": "e2e", "graceful": False}})
    status = h.wait_phase("escalate", "CANCELLED", "SUCCESS", "ERROR", timeout=60)  # a hang guard
    assert status["phase"] == "CANCELLED", status
    # What cut it short: the runner told to kill the program now, the pod keeping its grace for
    # the logs (deleting it again with 1 s once killed the ship too: no log files).
    assert f"told the runner of pod {pod.metadata.name} that the cancel is forced" in h.log()[log_before:]
    _has_stdout(storage, status, b"ignoring SIGUSR1")


def _has_stdout(storage: Storage, status: dict[str, Any], text: bytes) -> None:
    stdout = next((f for f in status.get("logFiles") or () if f["desc"]["path"] == "stdout.txt"), None)
    assert stdout is not None, status
    assert text in (storage.get_bytes(stdout["key"]) or b"")


def test_a_forced_cancel_of_a_job_with_graceful_shutdown_keeps_its_logs(h: H, storage: Storage) -> None:
    # The CLI's `cancel` without --graceful: the program is killed at once (its 120 s timeout not
    # waited out), and the job's log files are stored all the same.
    _ready_for_sigusr1(h, storage, "forced", _IGNORES_SIGUSR1, "120s")
    h.patch_spec("forced", {"cancel": {"reason": "e2e", "graceful": False}})
    status = h.wait_phase("forced", "CANCELLED", "SUCCESS", "ERROR", timeout=60)  # a hang guard
    assert status["phase"] == "CANCELLED" and status["returnCode"] == 137, status
    _has_stdout(storage, status, b"")
    system = next(f for f in status["logFiles"] if f["desc"]["path"] == "system.log")
    assert b"the cancel is forced" in (storage.get_bytes(system["key"]) or b"")


def test_job_cancelled_before_it_started_never_starts(h: H) -> None:
    h.create_job("never", {"cmd": "echo never"}, execute=False)
    h.wait_phase("never", "CREATING")
    h.patch_spec("never", {"cancel": {"reason": "changed my mind"}})
    h.wait_phase("never", "CANCELLED")
    h.patch_spec("never", {"execute": True})
    poll("the operator to see execute", lambda: h.status("never").get("observedGeneration") == 3, 30)
    assert h.status("never")["phase"] == "CANCELLED" and not h.pods("never")


def test_a_pod_deleted_by_someone_else_fails_the_attempt_it_is_no_cancel(h: H) -> None:
    # The runner sees SIGTERM just as on a cancel; without a cancel request it is a disruption:
    # ERROR naming the pod, and with a retry policy a fresh attempt.
    for name, extra in (("deleted", {}), ("deleted-retry", {"retryPolicy": {"maxAttempts": 2}})):
        h.create_job(name, {"cmd": "sleep 600"}, **extra)
    for name in ("deleted", "deleted-retry"):
        h.wait_phase(name, "EXECUTING", timeout=120)
        h.kubectl("delete", "pod", "-n", h.namespace, f"{name}-a1", "--wait=false")
    status = h.wait_phase("deleted", "ERROR", "CANCELLED", "SUCCESS", timeout=120)
    assert status["phase"] == "ERROR", status
    assert "deleted-a1" in status["statusDetails"] and "before the job finished" in status["statusDetails"]
    poll(
        "attempt 2 of deleted-retry",
        lambda: (s := h.status("deleted-retry")).get("attempt") == 2 and s.get("phase") == "EXECUTING",
        120,
    )
    failed = next(e for e in h.events("deleted-retry") if e.reason == "AttemptFailed")
    assert "deleted-retry-a1" in failed.message, failed.message
    h.patch_spec("deleted-retry", {"cancel": {"reason": "e2e done"}})
    assert h.wait_phase("deleted-retry", "CANCELLED", "ERROR", timeout=120)["phase"] == "CANCELLED"


def test_a_pod_whose_job_label_is_removed_stays_the_job_s(h: H) -> None:
    # `kubectl label pod ... dsjobs.dev/job-id-` (the idiom that takes a pod out of a ReplicaSet)
    # made the pod vanish from the resync's LIST by label: taken for deleted, the job ended ERROR
    # with its program running, or (a retry policy) ran attempt 2 beside it.
    h.create_job("unlabelled", {"cmd": "sleep 20; echo done"}, retryPolicy={"maxAttempts": 2})
    h.wait_phase("unlabelled", "EXECUTING", timeout=120)
    h.kubectl("label", "pod", "-n", h.namespace, "unlabelled-a1", "dsjobs.dev/job-id-")
    told = poll(
        "the PodUnlabelled Event",
        lambda: next((e for e in h.events("unlabelled") if e.reason == "PodUnlabelled"), None),
        60,
    )
    assert (
        "kubectl -n " in told.message
        and "label pod unlabelled-a1 dsjobs.dev/job-id=unlabelled" in told.message
    )
    status = h.wait_phase("unlabelled", "SUCCESS", "ERROR", "CANCELLED", timeout=120)
    assert (status["phase"], status["attempt"], status["returnCode"]) == ("SUCCESS", 1, 0), status
    names = [p.metadata.name for p in h.core.list_namespaced_pod(h.namespace).items]
    assert "unlabelled-a2" not in names and "unlabelled-a1" in names, names
    # Told once, not at every resync that finds it again.
    assert [e.reason for e in h.events("unlabelled")].count("PodUnlabelled") == 1


def test_a_pod_deleted_while_the_operator_is_away_keeps_the_job_s_logs(h: H) -> None:
    # A drain evicts the operator with the job's pod; the new operator finds the pod gone. The
    # runner stored its result on its way out: the job's logs and return code are recorded.
    h.create_job("gone-away", {"cmd": "echo before the end; sleep 600"})
    h.wait_phase("gone-away", "EXECUTING", timeout=120)
    h.kill()
    try:
        h.kubectl("delete", "pod", "-n", h.namespace, "gone-away-a1", "--wait=true", "--timeout=60s")
    finally:
        h.start()
    status = h.wait_phase("gone-away", "ERROR", "CANCELLED", "SUCCESS", timeout=120)
    assert status["phase"] == "ERROR", status
    assert "gone-away-a1 was deleted before the job finished" in status["statusDetails"], status
    # No graceful-shutdown section: the runner, told to stop, killed the program (SIGKILL).
    assert status["returnCode"] == 137, status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Finished"]["reason"] == "PodDeleted", conditions
    assert conditions["Scheduled"]["status"] == "True", conditions  # where it ran stays told
    logs = {f["desc"]["path"]: f for f in status["logFiles"]}
    assert logs["stdout.txt"]["sizeBytes"] == len("before the end\n"), logs


def test_a_pod_deleted_with_force_keeps_the_job_s_logs(h: H) -> None:
    # Gone from the API at once, its runner stops a moment later and stores result.json then:
    # read only at once, the job ended listing no log file while the store held them.
    h.create_job("forced-away", {"cmd": "echo before the end; sleep 600"})
    h.wait_phase("forced-away", "EXECUTING", timeout=120)
    h.kubectl("delete", "pod", "-n", h.namespace, "forced-away-a1", "--grace-period=0", "--force")
    status = h.wait_phase("forced-away", "ERROR", "CANCELLED", "SUCCESS", timeout=120)
    assert status["phase"] == "ERROR", status
    logs = {f["desc"]["path"]: f for f in status.get("logFiles") or ()}
    assert logs["stdout.txt"]["sizeBytes"] == len("before the end\n"), status


def test_a_job_must_name_its_namespaces_project(h: H) -> None:
    # Its data lives under projects/<projectId>/: naming another project would reach that
    # project's data. The admission policy refuses it, and projectId cannot change later.
    body = {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "metadata": {"name": "elsewhere"},
        "spec": {"projectId": "someone-else", "jobParameters": {"cmd": "true"}},
    }
    out = h.kubectl("apply", "-n", h.namespace, "-f", "-", stdin=json.dumps(body), check=False)
    assert "spec.projectId: someone-else is not the project of namespace" in out, out
    assert h.job("elsewhere") is None
    h.create_job("stays", {"cmd": "true"}, execute=False)
    out = h.kubectl(
        "patch",
        "pj",
        "stays",
        "-n",
        h.namespace,
        "--type=merge",
        "-p",
        '{"spec":{"projectId":"other"}}',
        check=False,
    )
    assert "projectId is immutable" in out, out


def test_a_job_applied_without_execute_is_told_created_once(h: H) -> None:
    # The echo of the operator's finalizer patch came after it had dropped the job's body (idle in
    # CREATING) and was taken for news: a second `new -> CREATING` write, refused (409), then
    # counted, logged and posted as an Event twice for every job applied without execute.
    h.create_job("told-once", {"cmd": "true"}, execute=False)
    assert _told(h, "told-once", "Created")
    # Watch events come in order: once the operator acted on the execute below, it had seen the
    # echo before it.
    h.patch_spec("told-once", {"execute": True})
    assert h.wait_phase("told-once", "SUCCESS", "ERROR")["phase"] == "SUCCESS"
    created = [e.message for e in h.events("told-once") if "-> CREATING" in (e.message or "")]
    assert len(created) == 1, created


def test_who_created_a_job_and_its_parent_cannot_change_once_set(h: H) -> None:
    def patch(spec: dict[str, Any]) -> str:
        body = json.dumps({"spec": spec})
        return h.kubectl("patch", "pj", "facts", "-n", h.namespace, "--type=merge", "-p", body, check=False)

    h.create_job("facts", {"cmd": "true"}, execute=False, createdById="alice", parentJobId="origin")
    for field, value in (("createdById", "mallory"), ("createdById", None), ("parentJobId", "other")):
        out = patch({field: value})
        assert f"spec.{field}: Invalid value" in out and f"{field} cannot change once set" in out, out
    assert "patched" in patch({"createdById": "alice", "desc": "the same facts"})
    h.create_job("no-facts", {"cmd": "true"}, execute=False)  # kubectl users may leave them out
    h.patch_spec("no-facts", {"parentJobId": "facts"})
    job = h.job("facts")
    assert job is not None and (job["spec"]["createdById"], job["spec"]["parentJobId"]) == ("alice", "origin")


def test_a_project_member_cannot_name_someone_else_as_a_job_s_creator(h: H) -> None:
    # The API gives output paths back as written to the job's creator only: a member applying a
    # job with kubectl names themselves or nobody (crds/projectjobs-created-by-their-creator.yaml).
    rbac = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "e2e-jobs-editor"},
            "rules": [
                {
                    "apiGroups": ["dsjobs.dev"],
                    "resources": ["projectjobs"],
                    "verbs": ["get", "create", "patch", "update"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "e2e-jobs-editor-mallory"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "e2e-jobs-editor"},
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                for user in ("mallory", "alice")
            ],
        },
    ]
    h.kubectl(
        "apply",
        "-n",
        h.namespace,
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}),
    )

    def as_mallory(*args: str, stdin: str | None = None) -> str:
        return h.kubectl("--as=mallory", *args, "-n", h.namespace, stdin=stdin, check=False)

    def job(name: str, created_by: str | None) -> str:
        spec: dict[str, Any] = {"projectId": PROJECT_ID, "jobParameters": {"cmd": "true"}}
        if created_by is not None:
            spec["createdById"] = created_by
        body = {
            "apiVersion": "dsjobs.dev/v1alpha1",
            "kind": "ProjectJob",
            "metadata": {"name": name},
            "spec": spec,
        }
        return json.dumps(body)

    out = as_mallory("create", "-f", "-", stdin=job("posing", "alice"))
    assert "spec.createdById: alice is not you (mallory)" in out, out
    assert h.job("posing") is None
    assert "created" in as_mallory("create", "-f", "-", stdin=job("own", "mallory"))
    assert "created" in as_mallory("create", "-f", "-", stdin=job("nobodys", None))
    # Naming a creator later is held to the same rule; an edit that leaves it alone is not refused.
    out = as_mallory("patch", "pj", "nobodys", "--type=merge", "-p", '{"spec":{"createdById":"alice"}}')
    assert "spec.createdById: alice is not you (mallory)" in out, out
    h.create_job("alices", {"cmd": "true"}, execute=False, createdById="alice")  # an admin: exempt
    # The API is exempt by its ServiceAccount's name: that name is kept out of every namespace but
    # dsjobs' own (labelled dsjobs.dev/system=true), project namespaces or not.
    sa = json.dumps({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "dsjobs-api"}})
    other = f"{h.namespace}-other"
    h.kubectl("create", "namespace", other)
    try:
        for ns in (h.namespace, other):
            out = h.kubectl("create", "-n", ns, "-f", "-", stdin=sa, check=False)
            assert "metadata.name: dsjobs-api is the name of a dsjobs identity" in out, out
    finally:
        h.kubectl("delete", "namespace", other, "--wait=false", check=False)
    assert "patched" in as_mallory("patch", "pj", "alices", "--type=merge", "-p", '{"spec":{"desc":"x"}}')
    # Nor may a member rewrite what a colleague's job runs and writes before it is executed: the
    # colleague's CLI would place its outputs where the member says.
    planted = '{"spec":{"jobParameters":{"cmd":"true","outputFiles":[{"path":"../../.bashrc","var":"K"}]}}}'
    out = as_mallory("patch", "pj", "alices", "--type=merge", "-p", planted)
    assert "spec.jobParameters: only the job's creator (alice) may change them, not mallory" in out, out
    assert h.kubectl("--as=alice", "patch", "pj", "alices", "-n", h.namespace, "--type=merge", "-p", planted)
    assert "patched" in as_mallory("patch", "pj", "own", "--type=merge", "-p", planted)


def test_only_those_who_may_edit_the_policies_label_a_namespace_as_dsjobs_own(h: H) -> None:
    # The label lets a namespace hold ServiceAccounts the policies trust: someone who may only
    # create namespaces (self-service) must not set it, on a new namespace or an old one.
    role, who = f"{h.namespace}-ns-maker", f"{h.namespace}-maker"
    rbac = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["create", "get", "patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": who}],
        },
    ]
    h.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))
    labelled, plain = f"{h.namespace}-sys", f"{h.namespace}-plain"

    def namespace(name: str, labels: dict[str, str]) -> str:
        return json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )

    try:
        out = h.kubectl(
            f"--as={who}",
            "create",
            "-f",
            "-",
            stdin=namespace(labelled, {"dsjobs.dev/system": "true"}),
            check=False,
        )
        assert "metadata.labels[dsjobs.dev/system]: only those who may update" in out, out
        assert "created" in h.kubectl(
            f"--as={who}", "create", "-f", "-", stdin=namespace(plain, {}), check=False
        )
        out = h.kubectl(f"--as={who}", "label", "namespace", plain, "dsjobs.dev/system=true", check=False)
        assert "only those who may update the admission policy" in out, out
        assert "labeled" in h.kubectl("label", "namespace", plain, "dsjobs.dev/system=true")  # an admin
    finally:
        h.kubectl("delete", "namespace", labelled, plain, "--wait=false", "--ignore-not-found", check=False)
        h.kubectl("delete", "clusterrolebinding,clusterrole", role, "--ignore-not-found", check=False)


def test_only_project_binders_label_a_namespace_as_a_project(h: H) -> None:
    # The label says which namespace is a project (its jobs, its storage prefix): someone who may
    # make or patch namespaces must not claim another team's project with it, nor take it away.
    role, who = f"{h.namespace}-ns-owner", f"{h.namespace}-owner"
    mine, theirs = f"{h.namespace}-mine", PROJECT_ID

    def rbac(bind: list[str]) -> str:
        rules: list[dict[str, Any]] = [
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["create", "get", "patch"]}
        ]
        if bind:
            rules.append(
                {
                    "apiGroups": ["dsjobs.dev"],
                    "resources": ["projects"],
                    "verbs": ["bind"],
                    "resourceNames": bind,
                }
            )
        items = [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": role},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": role},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": who}],
            },
        ]
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})

    def namespace(name: str, labels: dict[str, str]) -> str:
        return json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )

    def as_owner(*args: str, stdin: str | None = None) -> str:
        return h.kubectl(f"--as={who}", *args, stdin=stdin, check=False)

    grabbed = f"{h.namespace}-grab"
    h.kubectl("apply", "-f", "-", stdin=rbac([]))
    try:
        out = as_owner("create", "-f", "-", stdin=namespace(grabbed, {PROJECT_LABEL: theirs}))
        rule = "metadata.labels[dsjobs.dev/project-id]: setting, changing or removing it needs the verb bind"
        assert f"{rule} on projects.dsjobs.dev named {theirs}" in out, out
        assert f"which {who} lacks" in out, out
        assert "created" in as_owner("create", "-f", "-", stdin=namespace(mine, {"team": "a"}))
        out = as_owner("label", "namespace", mine, f"{PROJECT_LABEL}={theirs}")
        assert "needs the verb bind" in out, out
        assert "labeled" in as_owner("label", "namespace", mine, "other=label")  # other labels: as before
        # Granted for one project by name: that one, and not another.
        h.kubectl("apply", "-f", "-", stdin=rbac([f"{h.namespace}-own"]))
        assert "labeled" in as_owner("label", "namespace", mine, f"{PROJECT_LABEL}={h.namespace}-own")
        out = as_owner("label", "--overwrite", "namespace", mine, f"{PROJECT_LABEL}={theirs}")
        assert f"named {h.namespace}-own and {theirs} (the ClusterRole" in out, out
        # Nor may it be taken off a project's namespace by whoever may patch namespaces.
        out = as_owner("label", "namespace", h.namespace, f"{PROJECT_LABEL}-")
        assert f"named {theirs} (the ClusterRole" in out, out
        label = h.kubectl(
            "get", "namespace", h.namespace, "-o", "jsonpath={.metadata.labels.dsjobs\\.dev/project-id}"
        )
        assert label == theirs
        assert "unlabeled" in as_owner("label", "namespace", mine, f"{PROJECT_LABEL}-")
    finally:
        h.kubectl("delete", "namespace", mine, grabbed, "--wait=false", "--ignore-not-found", check=False)
        h.kubectl("delete", "clusterrolebinding,clusterrole", role, "--ignore-not-found", check=False)


def test_job_parameters_are_fixed_once_executed(h: H) -> None:
    def patch(spec: dict[str, Any]) -> str:
        body = json.dumps({"spec": spec})
        return h.kubectl("patch", "pj", "fixed", "-n", h.namespace, "--type=merge", "-p", body, check=False)

    h.create_job("fixed", {"cmd": "sleep 30"}, execute=False)
    assert "patched" in patch({"jobParameters": {"cmd": "sleep 20"}})  # not executed yet: still a draft
    assert "patched" in patch({"execute": True})
    out = patch({"jobParameters": {"cmd": "echo other"}})
    assert (
        "spec.jobParameters: Invalid value" in out
        and "jobParameters cannot change once execute is true" in out
    ), out
    # Nor by removing execute first (a rule on the field itself does not see it removed): a plain
    # `kubectl apply` of a manifest without it would do that.
    out = patch({"execute": None})
    assert "spec.execute: Invalid value" in out and "cannot be reset or removed once true" in out, out
    # Nor its config: 256 Ki characters of `<` (6 bytes each once stored) made the job too large
    # for etcd, and every status write failed.
    out = patch({"config": "<" * 10})
    assert "spec.config: Invalid value" in out and "config cannot change once execute is true" in out, out
    assert "patched" in patch({"dataTtl": "2d"})  # the rest of the spec is not the job's program
    out = patch({"dataTtl": "-1d"})
    assert 'spec.dataTtl: Invalid value: "-1d"' in out, out
    job = h.job("fixed")
    assert job is not None and job["spec"]["jobParameters"]["cmd"] == "sleep 20"
    assert "patched" in patch({"cancel": {"reason": "done"}})
    assert h.wait_phase("fixed", "CANCELLED")["phase"] == "CANCELLED"


def test_kubectl_apply_refuses_a_path_leaving_the_working_directory(h: H) -> None:
    # The CRD's rule is the validator's: '\\' separates segments too, and a drive is absolute.
    # The error names the entry's path and the rules.
    inside = {"path": "ok.txt"}
    for i, path in enumerate(["..\\x", "C:\\data.csv", "../x"]):
        name = f"escapes-{i}"
        params = (
            {"outputFiles": [inside, {"path": path}]}
            if i != 1
            else {
                "inputFiles": [
                    {"desc": inside, "sha256": "0" * 64},
                    {"desc": {"path": path}, "sha256": "0" * 64},
                ]
            }
        )
        body = {
            "apiVersion": "dsjobs.dev/v1alpha1",
            "kind": "ProjectJob",
            "metadata": {"name": name},
            "spec": {"projectId": PROJECT_ID, "jobParameters": {"cmd": "true", **params}},
        }
        out = h.kubectl("apply", "-n", h.namespace, "-f", "-", stdin=json.dumps(body), check=False)
        assert "must be relative to the working directory" in out and "[path-absolute, path-parent]" in out, (
            out
        )
        field = "desc.path" if i == 1 else "path"
        assert f"spec.jobParameters.{next(iter(params))}[1].{field}: Invalid value" in out, out
        assert h.job(name) is None
    h.create_job("stays-inside", {"cmd": "true", "outputFiles": [{"path": "out\\..x"}]}, execute=False)
    assert h.job("stays-inside") is not None


@pytest.mark.parametrize("name", ["j" * 64, "train.v2"])
def test_kubectl_apply_refuses_a_job_name_that_is_no_job_id(h: H, name: str) -> None:
    # Kubernetes takes dotted names of custom resources; the API and the CLI could never name such
    # a job to fetch its outputs. The rule is create-only (optionalOldSelf), which the API server
    # of `make up` must take.
    body = {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "metadata": {"name": name},
        "spec": {
            "projectId": PROJECT_ID,
            "jobParameters": {"cmd": "true"},
            "retryPolicy": {"retryOnExitCodes": [0]},
        },
    }
    out = h.kubectl("apply", "-n", h.namespace, "-f", "-", stdin=json.dumps(body), check=False)
    assert "metadata.name: Invalid value" in out and "must be a DNS label [job-name]" in out, out
    assert "spec.retryPolicy.retryOnExitCodes[0]: Invalid value: 0" in out, out


def test_kubectl_cannot_take_a_cancel_back(h: H) -> None:
    h.create_job("take-back", {"cmd": "true"}, execute=False)

    def patch(cancel: object, check: bool = True) -> str:
        body = json.dumps({"spec": {"cancel": cancel}})
        return h.kubectl(
            "patch", "pj", "take-back", "-n", h.namespace, "--type=merge", "-p", body, check=check
        )

    patch({"graceful": True})
    out = patch(None, check=False)
    assert "spec.cancel: Invalid value" in out and "cannot be removed once set" in out, out
    patch({"graceful": False})
    # A forced cancel stays forced: its pod may already be going with 1 s.
    out = patch({"graceful": True}, check=False)
    assert "spec.cancel.graceful: Invalid value" in out and "a forced cancel stays forced" in out, out
    # A reason goes into the status and Events: lines and tabs, no other control character (the
    # API's Cancel refuses them too).
    out = patch({"reason": "a\u0001b"}, check=False)
    assert "spec.cancel.reason: Invalid value" in out, out
    patch({"reason": "two\nlines\tand a tab"})


def test_kubectl_apply_refuses_an_instance_type_name_and_names_the_field(h: H) -> None:
    body = {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "InstanceType",
        "metadata": {"name": "g1.1-quick"},
        "spec": {"vcpu": 1, "memory": "1Gi", "resources": {}},
    }
    out = h.kubectl("apply", "-f", "-", stdin=json.dumps(body), check=False)
    assert "metadata.name: Invalid value: an instance type name looks like c1.4 or g2.mig" in out, out


# --- robustness -----------------------------------------------------------------------------------


def test_operator_killed_after_pod_creation_and_mid_run(h: H) -> None:
    watch = h.watch_pods("kill-me")
    try:
        h.create_job("kill-me", {"cmd": 'python -c "import time; time.sleep(6); print(1)"'})
        assert watch.first_added.wait(60), "no pod was created"
        h.kill()  # SIGKILL right after the pod appeared: the status may not name it yet
        h.start()
        h.wait_phase("kill-me", "EXECUTING", "SUCCESS", timeout=120)
        h.kill()  # and again while the program runs
        h.start()
        status = h.wait_phase("kill-me", "SUCCESS", "ERROR", timeout=120)
    finally:
        watch.stop()
    assert status["phase"] == "SUCCESS" and status["returnCode"] == 0, status
    assert status["attempt"] == 1
    assert list(watch.added.values()) == ["kill-me-a1"], watch.added  # exactly one pod ever existed


class ChaosJob(NamedTuple):
    name: str
    cmd: str
    fate: str = ""  # "cancel" or "delete", a few seconds in
    phase: str = ""  # expected at the end (none for a deleted job)
    code: int | None = None
    attempts: int = 1
    retry: dict[str, Any] | None = None


RETRY_ON_3 = {"maxAttempts": 2, "backoffSeconds": 1, "retryOnExitCodes": [3]}
CHAOS_JOBS = [
    *[
        ChaosJob(f"chaos-ok{i}", f"echo ok {i} > ${{OUT}}; sleep {i}", phase="SUCCESS", code=0)
        for i in range(4)
    ],
    *[
        ChaosJob(f"chaos-retry{i}", f"sleep {i}; exit 3", phase="ERROR", code=3, attempts=2, retry=RETRY_ON_3)
        for i in range(3)
    ],
    *[ChaosJob(f"chaos-cancel{i}", "sleep 120", "cancel", "CANCELLED") for i in range(2)],
    *[ChaosJob(f"chaos-delete{i}", f"echo x > ${{OUT}}; sleep {30 * i}", "delete") for i in range(2)],
]


def _chaos_fate(h: H, name: str, fate: str) -> None:
    if fate == "cancel":
        h.patch_spec(name, {"cancel": {"reason": "chaos", "graceful": False}})
    else:
        h.custom.delete_namespaced_custom_object(GROUP, VERSION, h.namespace, PLURAL, name)


def test_operator_killed_over_and_over_while_jobs_run_loses_and_leaves_nothing(
    h: H, storage: Storage
) -> None:
    """SIGKILL the operator every second or two while jobs start, end, retry, are cancelled and
    deleted: every job still ends as it should, with one pod per attempt, and no pod, Secret or
    stored object of a deleted job is left. Where a kill lands varies from run to run; the unit
    test test_an_operator_killed_between_two_actions_plans_the_rest_again covers every point
    between two actions."""
    names = {j.name for j in CHAOS_JOBS}
    attempts: dict[str, int] = {}
    watch = PodWatch(h.core, h.namespace, JOB_LABEL).start()
    rng = random.Random(7)
    env = h.env
    # Finished pods go at once, their Secrets with them (the harness keeps them for the tests).
    h.env = {**env, "DSJOBS_FINISHED_POD_RETENTION": "0"}
    try:
        for j in CHAOS_JOBS:
            extra = {"retryPolicy": j.retry} if j.retry else {}
            h.create_job(j.name, {"cmd": j.cmd, "outputFiles": [{"path": "out.txt", "var": "OUT"}]}, **extra)
        fates = sorted((rng.uniform(2, 8), j.name, j.fate) for j in CHAOS_JOBS if j.fate)
        started = time.monotonic()
        for _ in range(8):
            time.sleep(rng.uniform(0.3, 1.5))
            h.kill()
            while fates and time.monotonic() - started >= fates[0][0]:  # while the operator is down
                _chaos_fate(h, *fates.pop(0)[1:])
            time.sleep(rng.uniform(0.1, 1.0))
            h.start()
        for _at, name, fate in fates:
            _chaos_fate(h, name, fate)
        for j in CHAOS_JOBS:
            if j.fate == "delete":
                poll(f"{j.name} deleted", lambda name=j.name: h.job(name) is None, 120)
                continue
            status = h.wait_phase(j.name, j.phase, timeout=180)
            assert j.code is None or status.get("returnCode") == j.code, (j.name, status)
            attempts[j.name] = status["attempt"]
            # A cancel may land before the job's pod (the operator slow to start between kills):
            # then it never starts, attempt 0, and no pod of it may ever have existed (below).
            expected = (0, j.attempts) if j.fate == "cancel" else (j.attempts,)
            assert status["attempt"] in expected, (j.name, status)
            if j.phase == "SUCCESS":
                (output,) = status["outputFiles"]
                assert storage.get_bytes(output["key"]).startswith(b"ok"), (j.name, status)

        left: list[str] = []

        def nothing_left() -> bool:
            pods = h.core.list_namespaced_pod(h.namespace, label_selector=JOB_LABEL).items
            secrets = h.core.list_namespaced_secret(h.namespace, label_selector=JOB_LABEL).items
            left[:] = [o.metadata.name for o in [*pods, *secrets] if o.metadata.labels[JOB_LABEL] in names]
            return not left

        deadline = time.monotonic() + 60
        while not nothing_left() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left behind: {left}"
    finally:
        watch.stop()
        h.env = env
        if h.proc is not None and h.proc.poll() is None:
            h.kill()
        h.start()
    ever = [name for name in watch.added.values() if name.startswith("chaos-")]
    assert len(ever) == len(set(ever)), f"a pod name was created twice: {sorted(ever)}"
    for j in CHAOS_JOBS:
        if j.fate in ("", "cancel"):
            mine = sorted(p for p in ever if p.rsplit("-a", 1)[0] == j.name)
            assert mine == [f"{j.name}-a{i}" for i in range(1, attempts[j.name] + 1)], (j.name, sorted(ever))
        if j.fate == "delete":
            assert not _objects(storage, job_prefix(PROJECT_ID, j.name)), j.name


def test_a_standby_replica_takes_over_the_lease_from_a_killed_leader(h: H, tmp_path: Path) -> None:
    # Two operators elect a leader on a Lease: the standby does nothing until the leader is
    # SIGKILLed, takes over once the Lease has gone unrenewed for its duration, and on SIGTERM
    # hands it back.
    # The Lease the deployment's leader Role grants, in the operator's own namespace.
    lease, system = "dsjobs-operator", h.system_namespace
    # 10 s: with 4 s a renewal slower than 2.7 s on a loaded machine let the leader give the Lease
    # up on its own, and the standby led before the test killed anyone.
    env = {**h.env, "DSJOBS_LEADER_LEASE": f"{system}/{lease}", "DSJOBS_LEADER_LEASE_SECONDS": "10"}
    replicas = [dataclasses.replace(h, env=env, log_path=tmp_path / f"{n}.log", proc=None) for n in "ab"]

    def holder() -> dict[str, Any]:
        spec = k8s_client.CoordinationV1Api(h.cluster.api_client).read_namespaced_lease(lease, system).spec
        return {"holderIdentity": spec.holder_identity or "", "leaseTransitions": spec.lease_transitions}

    h.kill()
    try:
        a, b = replicas
        a.start()
        poll("replica a to lead", lambda: "leading: holding lease" in a.log(), 30)
        b.start()  # alive while it stands by: /healthz is served before Kopf runs
        poll("replica b to stand by", lambda: "standing by: lease" in b.log(), 30)
        assert "dsjobs_leader 0.0" in b.metrics() and "dsjobs_leader 1.0" in a.metrics()
        leader = holder()["holderIdentity"]
        assert leader in a.log() and leader not in b.log().split("standing by")[0], leader

        h.create_job("led-1", {"cmd": "echo one"})
        assert h.wait_phase("led-1", "SUCCESS", "ERROR")["phase"] == "SUCCESS"
        assert "led-1" not in b.log()  # the standby ran no handler

        a.kill()
        h.create_job("led-2", {"cmd": "echo two"})
        assert h.wait_phase("led-2", "SUCCESS", "ERROR", timeout=120)["phase"] == "SUCCESS"
        spec = holder()
        assert spec["holderIdentity"] != leader and spec["holderIdentity"] in b.log(), spec
        assert spec["leaseTransitions"] == 1, spec
        assert "dsjobs_leader 1.0" in b.metrics()

        # Someone else holds the Lease now (a replica that took it while this one was stalled):
        # the leader stops acting at once, by exiting.
        coordination = k8s_client.CoordinationV1Api(h.cluster.api_client)
        stolen = {"spec": {"holderIdentity": "thief", "renewTime": micro_time(datetime.now(UTC))}}
        coordination.patch_namespaced_lease(lease, system, stolen)
        assert b.proc is not None and b.proc.wait(timeout=30) == 1
        assert "lost the leadership: the lease is held by thief; exiting" in b.log()

        a.start()  # the thief never renews: a takes over once its Lease has stood still
        poll("replica a to lead again", lambda: "(transition 2)" in a.log(), 60)
        a.stop()  # graceful: the Lease is released for the next replica
        assert holder()["holderIdentity"] == "", holder()
        assert "released lease" in a.log()
    finally:
        for replica in replicas:
            replica.stop()
        h.start()


def test_watches_recover_from_an_api_server_restart(h: H) -> None:
    if h.cluster.root is None:
        pytest.skip("restarts the local cluster's API server")
    h.create_job("outage", {"cmd": 'python -c "import time; time.sleep(5); print(1)"'})
    h.wait_phase("outage", "EXECUTING", "SUCCESS", "ERROR")
    # The program ends while the API server is down (the restart takes longer than 5 s): the
    # operator's watches must come back and see what happened meanwhile.
    log_before = len(h.log())
    restart(ClusterPaths.at(h.cluster.root), "kube-apiserver")
    status = h.wait_phase("outage", "SUCCESS", "ERROR", timeout=120)
    # What healed itself is no ERROR: Kopf's retried requests are WARNINGs.
    loud = [line for line in h.log()[log_before:].splitlines() if re.search(r"^\S+ \S+ ERROR ", line)]
    assert not loud, loud[:3]
    assert status["phase"] == "SUCCESS" and status["returnCode"] == 0, status
    assert status["attempt"] == 1
    assert [p.metadata.name for p in h.pods("outage")] == ["outage-a1"]  # no second pod after re-listing
    # A job made after the restart is seen too (the job watch is back, not only the pod watch).
    h.create_job("after-outage", {"cmd": "true"})
    assert h.wait_phase("after-outage", "SUCCESS", "ERROR", timeout=120)["phase"] == "SUCCESS"


def test_a_job_rides_out_object_store_restarts(h: H, storage: Storage) -> None:
    """The runner ships logs and uploads outputs through S3 outages (it retries; the dev server
    keeps unfinished multipart uploads, as S3 does): nothing is lost, nothing fails."""
    if h.cluster.root is None:
        pytest.skip("restarts the local cluster's S3 server")
    size = 40 * 2**20  # multipart: above the runner's 16 MiB single-request limit
    cmd = (
        'python -c "import random, sys, time; random.seed(7); '
        "[print('line', i, flush=True) or print('err', i, file=sys.stderr, flush=True) or time.sleep(0.1)"
        " for i in range(40)]; "
        f"open(sys.argv[1], 'wb').write(random.randbytes({size}))\" ${{OUT}}"
    )
    h.create_job("s3-outage", {"cmd": cmd, "outputFiles": [{"path": "big.bin", "var": "OUT"}]})
    h.wait_phase("s3-outage", "EXECUTING", "SUCCESS", "ERROR")
    paths = ClusterPaths.at(h.cluster.root)
    restarts = 0
    # Again and again until the job ends: some restarts land in log shipping, some in the upload.
    while (h.status("s3-outage").get("phase") or "") not in ("SUCCESS", "ERROR") and restarts < 40:
        restart(paths, "s3")
        restarts += 1
        time.sleep(0.5)
    status = h.wait_phase("s3-outage", "SUCCESS", "ERROR", timeout=120)
    assert status["phase"] == "SUCCESS" and status["returnCode"] == 0, status
    assert not status["fileErrors"], status["fileErrors"]
    assert restarts >= 3, restarts
    (output,) = status["outputFiles"]
    random.seed(7)
    assert (
        hashlib.sha256(storage.get_bytes(output["key"])).hexdigest()
        == hashlib.sha256(random.randbytes(size)).hexdigest()
    )
    logs = {f["desc"]["path"]: storage.get_bytes(f["key"]).decode() for f in status["logFiles"]}
    assert logs["stdout.txt"].splitlines() == [f"line {i}" for i in range(40)]
    assert logs["stderr.txt"].splitlines() == [f"err {i}" for i in range(40)]


def test_a_job_waits_out_an_object_store_outage_in_its_stage_in(h: H, storage: Storage) -> None:
    """S3 down (connection refused) for longer than a few retries take: the runner waits it out
    (STORAGE_PATIENCE_SECONDS) instead of failing the job, and the status says what it waits for."""
    if h.cluster.root is None:
        pytest.skip("stops the local cluster's S3 server")
    data = random.randbytes(2**20)
    sha = hashlib.sha256(data).hexdigest()
    storage.put_bytes(input_key(PROJECT_ID, sha), data)
    paths = ClusterPaths.at(h.cluster.root)
    record = Record.load(paths.pids)
    server = record.find("s3") if record is not None else None
    assert server is not None
    os.kill(server.pid, signal.SIGKILL)
    try:
        inputs = [{"desc": {"path": "in.bin", "var": "IN"}, "sha256": sha, "sizeBytes": len(data)}]
        h.create_job("s3-down", {"cmd": "sha256sum ${IN}", "inputFiles": inputs})
        poll(
            "the stage-in running",
            lambda: "staging inputs" in h.status("s3-down").get("statusDetails", ""),
            120,
        )
        # The runner's retries are invisible from outside the pod; the operator checks the store
        # itself and says so (five tries took under 8 s: the outage outlasts them).
        status = poll(
            "the status to tell of the outage",
            lambda: (
                "the object store does not answer the operator either"
                in (st := h.status("s3-down")).get("statusDetails", "")
                and st
            ),
            60,
        )
        assert status["phase"] == "PREPARING", status
        assert status["statusDetails"].startswith("staging inputs on node "), status
    finally:
        restart(paths, "s3")
    status = h.wait_phase("s3-down", "SUCCESS", "ERROR", timeout=180)
    assert status["phase"] == "SUCCESS", status
    stdout = next(f["key"] for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
    assert storage.get_bytes(stdout).decode().startswith(sha)


def test_a_finished_job_s_result_waits_out_an_object_store_outage(h: H, storage: Storage) -> None:
    """A result too big for the ship's termination message (24 outputs) is in result.json only.
    The object store is down when the operator comes to read it: the job's end waits for it
    (RESULT_PATIENCE) instead of ending SUCCESS without its outputs and logs, for good."""
    if h.cluster.root is None:
        pytest.skip("stops the local cluster's S3 server")
    names = [f"output-file-number-{i:02d}-of-this-job.txt" for i in range(24)]
    cmd = "sleep 2; for f in " + " ".join(names) + '; do echo "$f" > "$f"; done'
    h.create_job("big-result", {"cmd": cmd, "outputFiles": [{"path": n} for n in names]})
    h.wait_phase("big-result", "EXECUTING", "SUCCESS", "ERROR")
    paths = ClusterPaths.at(h.cluster.root)
    h.kill()  # the pod ends unseen
    try:
        poll(
            "the pod Succeeded", lambda: [p.status.phase for p in h.pods("big-result")] == ["Succeeded"], 120
        )
        record = Record.load(paths.pids)
        server = record.find("s3") if record is not None else None
        assert server is not None
        os.kill(server.pid, signal.SIGKILL)
        try:
            h.start()
            final = ("SUCCESS", "ERROR")
            poll(
                "the operator to come to the job's result",
                lambda: (
                    "result.json cannot be read now" in h.log() or h.status("big-result")["phase"] in final
                ),
                120,
            )
            status = h.status("big-result")
            assert status["phase"] not in final, status  # it would end without its outputs, for good
        finally:
            restart(paths, "s3")
    finally:
        if h.proc is None or h.proc.poll() is not None:
            h.start()
    status = h.wait_phase("big-result", "SUCCESS", "ERROR", timeout=180)
    assert status["phase"] == "SUCCESS", status
    assert sorted(o["desc"]["path"] for o in status["outputFiles"]) == names
    assert {f["desc"]["path"] for f in status["logFiles"]} >= {"system.log"}
    first = next(o for o in status["outputFiles"] if o["desc"]["path"] == names[0])
    assert storage.get_bytes(first["key"]) == f"{names[0]}\n".encode()


def test_a_retry_waits_for_the_pod_of_a_lost_node_and_says_why(
    h: H,
    own_node: OwnNode,  # noqa: F811
    tmp_path: Path,
) -> None:
    """NodeLost against the real node lifecycle controller: the pod of a node that stopped reporting
    is evicted after the InstanceType's unreachable toleration (3 s here, not the default 300 s),
    the job retries, and the next attempt waits, saying so, until the old pod is gone: the program
    may still run on that node. The node comes back and attempt 2 runs."""
    silent = [
        {
            "key": f"node.kubernetes.io/{taint}",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 3,
        }
        for taint in ("unreachable", "not-ready")
    ]
    spec = _pinned_type(own_node.name, *silent)
    with _instance_type(h, "n9", spec) as type_name:
        # Process nodes share the host's files: attempt 1 runs until its node's agent is back (and
        # ends it), attempt 2 finds the mark and is done at once.
        mark = tmp_path / "attempt-1-ran"
        cmd = f"test -e {mark} || (touch {mark} && sleep 300)"
        params = {"cmd": cmd, "cloudInstanceTypes": [{"name": type_name}]}
        h.create_job("lost-node", params, retryPolicy={"maxAttempts": 2, "backoffSeconds": 0})
        h.wait_phase("lost-node", "EXECUTING", "SUCCESS", "ERROR")
        try:
            own_node.signal(signal.SIGKILL)  # the node goes silent; its program lives on
            waiting = (
                "attempt 2 starts once pod lost-node-a1 of attempt 1 is gone (never two attempts at once)"
            )
            status = _details_starting(h, "lost-node", waiting, "the job waiting for the lost node", 180)
            assert status["phase"] == "PREPARING" and status["attempt"] == 2, status
            assert f"its node {own_node.name} stopped reporting" in status["statusDetails"]
            assert _told(h, "lost-node", "WaitingForLostNode") and _told(h, "lost-node", "AttemptFailed")
            assert [p.metadata.name for p in h.pods("lost-node")] == ["lost-node-a1"]  # never two at once
        finally:
            own_node.start()
        poll("the node Ready again", lambda: node_ready(h.core, own_node.name) is True, 60)
        status = h.wait_phase("lost-node", "SUCCESS", "ERROR", timeout=180)
    assert status["phase"] == "SUCCESS" and status["attempt"] == 2, status


def test_a_job_named_like_a_deleted_one_waits_for_its_pod_and_takes_nothing_of_it(
    h: H,
    own_node: OwnNode,  # noqa: F811
    storage: Storage,
) -> None:
    """A ProjectJob deleted while its node is silent lets go after DELETE_POD_WAIT, its pod left
    terminating there. A new job of the same name (kubectl users reuse names) finds a pod with
    its labels and its first pod's name: it must neither take that pod for its own (and end with
    its fate) nor run beside it under that name. It waits, saying why, and runs once it is gone.
    The old pod's runner went on shipping logs after its job's data was deleted: the new job
    starts from a clean prefix, its logs its own."""
    spec = _pinned_type(own_node.name)
    with _instance_type(h, "r9", spec) as type_name:
        types = [{"name": type_name}]
        first_life = "while :; do echo first life; sleep 0.5; done"
        h.create_job("reborn", {"cmd": first_life, "cloudInstanceTypes": types})
        assert h.wait_phase("reborn", "EXECUTING", "SUCCESS", "ERROR")["phase"] == "EXECUTING"
        first = h.job("reborn")
        assert first is not None
        agent = own_node.proc
        assert agent is not None
        try:
            # The node goes silent (as behind a network partition): its pod cannot end, and its
            # runner goes on shipping the program's output.
            agent.send_signal(signal.SIGSTOP)
            h.custom.delete_namespaced_custom_object(
                "dsjobs.dev", "v1alpha1", h.namespace, "projectjobs", "reborn"
            )
            poll("the first job gone", lambda: h.job("reborn") is None, 120)
            prefix = job_prefix(PROJECT_ID, "reborn")
            poll(
                "the old pod's logs after its job's data was deleted", lambda: storage.first_keys(prefix), 30
            )
            (left,) = h.pods("reborn")
            assert left.metadata.name == "reborn-a1" and left.metadata.deletion_timestamp is not None
            h.create_job("reborn", {"cmd": "echo second life", "cloudInstanceTypes": types})
            waiting = (
                f"waiting to create the job's pod: pod reborn-a1 on node {own_node.name}, left by an "
                "earlier ProjectJob of the same name, still exists (being deleted)"
            )
            status = _details_starting(
                h, "reborn", waiting, "the second job waiting for the first one's pod", 60
            )
            assert status["phase"] == "PREPARING" and not status.get("podName"), status
            assert _told(h, "reborn", "FailedCreate")
            assert [p.metadata.owner_references[0].uid for p in h.pods("reborn")] == [
                first["metadata"]["uid"]
            ]
        finally:
            agent.send_signal(signal.SIGCONT)
        poll("the node Ready again", lambda: node_ready(h.core, own_node.name) is True, 60)
        status = h.wait_phase("reborn", "SUCCESS", "ERROR", timeout=180)
    assert status["phase"] == "SUCCESS" and status["attempt"] == 1, status
    stdout = next(f["key"] for f in status["logFiles"] if f["desc"]["path"] == "stdout.txt")
    assert storage.get_bytes(stdout) == b"second life\n"
    chunks = [o.key for o in storage.iter_objects(prefix) if "/logs/chunks/" in o.key]
    records = [r for key in chunks for r in decode_chunk(storage.get_bytes(key) or b"").records]
    assert b"".join(r.content for r in records if r.stream == Stream.OUT) == b"second life\n"
    assert b"first life" not in b"".join(r.content for r in records)


def test_a_job_that_fills_its_node_s_disk_ends_with_its_own_exit_code_outputs_and_logs(
    h: H,
    small_disk_node: OwnNode,  # noqa: F811
    storage: Storage,
) -> None:
    """The program writes until the disk is full and exits 3. Nothing below it may fail for want
    of room: the node's own bookkeeping (the agent, as a kubelet, carries on), the entry script's
    status (its room taken at the start), the ship's termination message (lost: the operator
    reads result.json instead). The job ends as its program did, with its outputs and logs."""
    spec = _pinned_type(small_disk_node.name)
    with _instance_type(h, "d9", spec) as type_name:
        params = {
            "cmd": "echo before; head -c 100000000 /dev/zero > fill.bin; exit 3",
            "outputFiles": [{"path": "fill.bin"}],
            "cloudInstanceTypes": [{"name": type_name}],
        }
        h.create_job("node-disk-full", params)
        try:
            status = h.wait_phase("node-disk-full", "SUCCESS", "ERROR", timeout=180)
            assert status["phase"] == "ERROR" and status["returnCode"] == 3, status
            assert status["statusDetails"] == "Program returned code 3", status
            assert "cannot save the pod's state on the node" in small_disk_node.log()  # the disk was full
            (output,) = status["outputFiles"]
            size = int(output.get("sizeBytes") or 0)
            assert 16 * 2**20 < size < 48 * 2**20, output  # as much as fitted
            assert storage.get_bytes(output["key"]) == b"\0" * size
            logs = {f["desc"]["path"]: f["key"] for f in status["logFiles"]}
            assert storage.get_bytes(logs["stdout.txt"]) == b"before\n"
        finally:
            # The pod's volumes go with it: the node's disk is free again for other tests.
            h.custom.delete_namespaced_custom_object(GROUP, "v1alpha1", h.namespace, PLURAL, "node-disk-full")
            poll("the pod gone", lambda: not h.pods("node-disk-full"), 60)


def test_a_second_namespace_labelled_with_the_project_runs_none_of_its_jobs(h: H, storage: Storage) -> None:
    # A `staging` overlay copying the namespace with its project label: the same-named job there
    # overwrote this namespace's job's outputs, and its deletion deleted them.
    h.create_job("twin", {"cmd": "echo first > out.txt", "outputFiles": [{"path": "out.txt"}]})
    assert h.wait_phase("twin", "SUCCESS", "ERROR")["phase"] == "SUCCESS"
    stored = _objects(storage, job_prefix(PROJECT_ID, "twin"))
    assert stored
    namespace = h.twin_namespace
    h.core.create_namespace(
        {"metadata": {"name": namespace, "labels": {"dsjobs.dev/project-id": PROJECT_ID}}}
    )
    try:
        body = {
            "apiVersion": "dsjobs.dev/v1alpha1",
            "kind": "ProjectJob",
            "metadata": {"name": "twin"},
            "spec": {
                "projectId": PROJECT_ID,
                "execute": True,
                "jobParameters": {"cmd": "echo second > out.txt"},
            },
        }
        h.custom.create_namespaced_custom_object(GROUP, "v1alpha1", namespace, PLURAL, body)

        def ended() -> dict[str, Any] | None:
            obj = h.custom.get_namespaced_custom_object(GROUP, "v1alpha1", namespace, PLURAL, "twin")
            status = obj.get("status") or {}
            return status if status.get("phase") in ("SUCCESS", "ERROR") else None

        status = poll("the second namespace's job to end", ended, 60)
        assert status["phase"] == "ERROR", status
        assert f"but that project is namespace {h.namespace}'s" in status["statusDetails"], status
        assert not h.core.list_namespaced_pod(namespace).items
        h.custom.delete_namespaced_custom_object(GROUP, "v1alpha1", namespace, PLURAL, "twin")
        poll("the second job gone", lambda: not h.custom.list_namespaced_custom_object(
            GROUP, "v1alpha1", namespace, PLURAL)["items"], 60)  # fmt: skip
        assert _objects(storage, job_prefix(PROJECT_ID, "twin")) == stored  # the first job's, intact
    finally:
        h.core.delete_namespace(namespace)
        poll("the twin namespace gone", lambda: _namespace_gone(h, namespace), 120)


def test_deleting_a_project_namespace_with_a_running_job(h: H) -> None:
    # The namespace controller kills the pod and deletes the job; the finalizer still cleans up.
    # Events about it are refused (403: the namespace is being terminated): dropped quietly,
    # not retried for a minute with an ERROR line per attempt (Kopf's poster did that).
    namespace = h.spare_namespace
    project = f"{PROJECT_ID}-spare"  # a project is one namespace's: the test's holds PROJECT_ID
    h.core.create_namespace({"metadata": {"name": namespace, "labels": {"dsjobs.dev/project-id": project}}})
    poll("the default ServiceAccount", lambda: h.core.list_namespaced_service_account(namespace).items, 60)
    body = {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "metadata": {"name": "doomed"},
        "spec": {"projectId": project, "execute": True, "jobParameters": {"cmd": "sleep 600"}},
    }
    h.custom.create_namespaced_custom_object("dsjobs.dev", "v1alpha1", namespace, "projectjobs", body)

    def phase() -> str:
        obj = h.custom.get_namespaced_custom_object(
            "dsjobs.dev", "v1alpha1", namespace, "projectjobs", "doomed"
        )
        return str((obj.get("status") or {}).get("phase"))

    poll("the job running", lambda: phase() == "EXECUTING", 120)
    log_before = len(h.log())
    h.core.delete_namespace(namespace)
    poll("the namespace gone", lambda: _namespace_gone(h, namespace), 120)
    log = h.log()[log_before:]
    assert f"stored objects of job {project}/doomed" in log, log[-3000:]
    assert f"deleted 0 stored objects of job {project}/doomed" not in log  # it had logs to delete
    loud = [line for line in log.splitlines() if re.search(r"^\S+ \S+ (ERROR|WARNING) ", line)]
    assert not loud, loud[:3]


def test_delete_removes_pods_secrets_and_stored_data(h: H, storage: Storage) -> None:
    data = f"shared input {uuid.uuid4()}\n".encode()
    sha = hashlib.sha256(data).hexdigest()
    storage.put_bytes(input_key(PROJECT_ID, sha), data)
    params = {
        "cmd": "cat data.txt > copy.txt",
        "inputFiles": [{"desc": {"path": "data.txt"}, "sha256": sha, "sizeBytes": len(data)}],
        "outputFiles": [{"path": "copy.txt"}],
    }
    h.create_job("del-a", params)
    h.create_job("del-b", params, execute=False)  # references the same input
    status = h.wait_phase("del-a", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS", status
    assert storage.get_bytes(status["outputFiles"][0]["key"]) == data
    assert h.pods("del-a")
    selector = "dsjobs.dev/job-id=del-a"
    assert h.core.list_namespaced_secret(h.namespace, label_selector=selector).items

    h.custom.delete_namespaced_custom_object("dsjobs.dev", "v1alpha1", h.namespace, "projectjobs", "del-a")
    poll("del-a to be gone", lambda: h.job("del-a") is None, 60)
    poll("del-a's pods to be gone", lambda: not h.pods("del-a"), 60)
    assert not h.core.list_namespaced_secret(h.namespace, label_selector=selector).items
    assert not _objects(storage, job_prefix(PROJECT_ID, "del-a"))
    assert storage.get_bytes(input_key(PROJECT_ID, sha)) == data  # del-b still uses it

    h.custom.delete_namespaced_custom_object("dsjobs.dev", "v1alpha1", h.namespace, "projectjobs", "del-b")
    poll("del-b to be gone", lambda: h.job("del-b") is None, 60)
    assert storage.get_bytes(input_key(PROJECT_ID, sha)) is None


def test_finalize_keeps_the_api_password_secret_and_clear_data_works_unexecuted(
    h: H, storage: Storage
) -> None:
    # The API keeps a plain-text registry password in `<job>-docker-password` (role
    # registry-password) for Clone to copy; the operator's cleanup removes only its own Secrets.
    job = "pw-job"
    image = _image_with_api_password(h, job)
    password = image["passwordSecretRef"]["name"]
    h.create_job(job, {"cmd": "true", "env": {"dockerImageSpec": image}})
    assert h.wait_phase(job, "SUCCESS", "ERROR")["phase"] == "SUCCESS"

    def secrets() -> set[str]:
        items = h.core.list_namespaced_secret(h.namespace, label_selector=f"dsjobs.dev/job-id={job}").items
        return {s.metadata.name for s in items}

    assert secrets() == {password, f"{job}-a1-runner", f"{job}-a1-registry"}
    h.patch_spec(job, {"finalized": True})
    poll("the operator's Secrets to go", lambda: secrets() == {password}, 60)

    # A passwordSecretRef must name a registry password Secret: the operator reads Secrets the
    # project's users may not (a runner Secret holds the storage credentials) and would hand the
    # value to a registry of the user's choice.
    h.core.create_namespaced_secret(
        h.namespace, {"metadata": {"name": "not-a-password"}, "stringData": {"key": "storage secret"}}
    )
    stolen = {**image, "passwordSecretRef": {"name": "not-a-password", "key": "key"}}
    h.create_job("steal", {"cmd": "true", "env": {"dockerImageSpec": stolen}})
    status = h.wait_phase("steal", "ERROR", "SUCCESS")
    assert status["phase"] == "ERROR", status
    told = "no Secret 'not-a-password' labelled dsjobs.dev/secret-role=registry-password in namespace"
    assert told in status["statusDetails"], status
    # A shared one (owned by no job) goes only to the registries its annotation names.
    elsewhere = {**image, "imageUrl": "attacker.example.net:5000/x:latest"}
    h.create_job("exfiltrate", {"cmd": "true", "env": {"dockerImageSpec": elsewhere}})
    status = h.wait_phase("exfiltrate", "ERROR", "SUCCESS")
    assert status["phase"] == "ERROR", status
    told = "may be sent only to registry.example.com (dsjobs.dev/registry-hosts), not to attacker.example.net:5000"
    assert told in status["statusDetails"], status
    assert not h.core.list_namespaced_secret(h.namespace, label_selector="dsjobs.dev/job-id=exfiltrate").items

    # DeleteData of a job that was never executed: its input goes, dataCleared says so.
    data = f"never used {uuid.uuid4()}\n".encode()
    sha = hashlib.sha256(data).hexdigest()
    storage.put_bytes(input_key(PROJECT_ID, sha), data)
    inputs = [{"desc": {"path": "data.txt"}, "sha256": sha, "sizeBytes": len(data)}]
    h.create_job("unrun", {"cmd": "cat data.txt", "inputFiles": inputs}, execute=False)
    h.wait_phase("unrun", "CREATING")
    h.patch_spec("unrun", {"clearData": True})
    poll("unrun's data to be cleared", lambda: h.status("unrun").get("dataCleared"), 60)
    assert h.status("unrun")["phase"] == "CREATING"
    assert storage.get_bytes(input_key(PROJECT_ID, sha)) is None


def test_data_ttl_expiry_clears_the_data(h: H, storage: Storage) -> None:
    h.create_job("ttl", {"cmd": "echo data > out.txt", "outputFiles": [{"path": "out.txt"}]}, dataTtl="1h")
    status = h.wait_phase("ttl", "SUCCESS", "ERROR")
    assert status["phase"] == "SUCCESS" and not status.get("dataCleared")
    assert _objects(storage, job_prefix(PROJECT_ID, "ttl"))
    # The test plays the clock: the job "finished" two hours ago, so its 1h TTL has passed. The
    # operator derives the expiry from finishedAt whenever it looks at the job.
    patch = {"status": {"finishedAt": "2000-01-01T00:00:00Z"}}
    h.custom.patch_namespaced_custom_object_status(
        "dsjobs.dev", "v1alpha1", h.namespace, "projectjobs", "ttl", patch
    )
    poll("the data to be cleared", lambda: h.status("ttl").get("dataCleared"), 60)
    assert h.status("ttl")["dataExpiresAt"].startswith("2000-01-01T01:00:00")
    assert not _objects(storage, job_prefix(PROJECT_ID, "ttl"))
    assert "DataCleared" in _reasons(h, "ttl")

    # A job left unexecuted (the CLI stopped during its upload): its inputs expire createdAt + TTL.
    data = f"abandoned {uuid.uuid4()}\n".encode()
    sha = hashlib.sha256(data).hexdigest()
    storage.put_bytes(input_key(PROJECT_ID, sha), data)
    inputs = [{"desc": {"path": "data.txt"}, "sha256": sha, "sizeBytes": len(data)}]
    h.create_job("left", {"cmd": "cat data.txt", "inputFiles": inputs}, execute=False, dataTtl="1h")
    assert h.wait_phase("left", "CREATING").get("dataExpiresAt")
    patch = {"status": {"createdAt": "2000-01-01T00:00:00Z"}}
    h.custom.patch_namespaced_custom_object_status(
        "dsjobs.dev", "v1alpha1", h.namespace, "projectjobs", "left", patch
    )
    poll("the unexecuted job's data to be cleared", lambda: h.status("left").get("dataCleared"), 60)
    assert h.status("left")["dataExpiresAt"].startswith("2000-01-01T01:00:00")
    assert storage.get_bytes(input_key(PROJECT_ID, sha)) is None
    # Executed after that (kubectl; the API refuses): it fails naming why, and makes no pod.
    h.patch_spec("left", {"execute": True})
    status = h.wait_phase("left", "ERROR", "SUCCESS")
    assert status["phase"] == "ERROR" and "deleted before it was executed" in status["statusDetails"]
    assert not h.core.list_namespaced_pod(h.namespace, label_selector="dsjobs.dev/job-id=left").items


def test_a_job_restored_from_a_backup_keeps_its_run_and_one_without_its_status_runs_again(
    h: H, storage: Storage
) -> None:
    """docs/admin.md#backup-and-restore with the operator running: the cluster lost two finished
    ProjectJobs, the bucket kept their data; both are created again from their saved copies, one
    has its status written back a moment later (as Velero or `kubectl replace --subresource=status`
    do). That one is the finished job it was, its outputs and logs untouched, no pod started; the
    other, whose status never comes, runs again after DSJOBS_RESTORE_GRACE over its old run."""
    params = {"cmd": "date +%s%N > out.txt", "outputFiles": [{"path": "out.txt"}]}
    names = ("restored", "statusless")
    for name in names:
        h.create_job(name, params)
    for name in names:
        assert h.wait_phase(name, "SUCCESS", "ERROR")["phase"] == "SUCCESS"
    saved = {name: h.job(name) for name in names}
    stored = {name: _objects(storage, job_prefix(PROJECT_ID, name)) for name in names}
    first_output = storage.get_bytes(job_prefix(PROJECT_ID, "statusless") + "outputs/out.txt")
    assert first_output, stored
    assert all(job_prefix(PROJECT_ID, name) + "result.json" in stored[name] for name in names), stored
    h.kill()
    try:
        for name in names:  # lost without the operator's finalizer: the data stays
            h.custom.patch_namespaced_custom_object(
                GROUP, VERSION, h.namespace, PLURAL, name, {"metadata": {"finalizers": None}}
            )
            h.kubectl("delete", "pj", "-n", h.namespace, name, "--wait=true", "--timeout=60s")
    finally:
        h.start()
    # The old pods go with their owners (the garbage collector); a pod left would hold the names.
    poll("the lost jobs' pods gone", lambda: not any(h.pods(name) for name in names), 90)

    for name in names:
        old = saved[name]
        assert old is not None
        meta = old["metadata"]
        keep = {k: meta[k] for k in ("name", "labels", "annotations", "finalizers") if meta.get(k)}
        body = {"apiVersion": old["apiVersion"], "kind": old["kind"], "metadata": keep, "spec": old["spec"]}
        h.custom.create_namespaced_custom_object(GROUP, VERSION, h.namespace, PLURAL, body)
    time.sleep(2)  # the operator has seen both (it answers in milliseconds); a tool may be slower
    made = h.job("restored")
    assert made is not None and not made.get("status"), made  # nothing written meanwhile
    old_status = saved["restored"]["status"]  # type: ignore[index]
    h.custom.replace_namespaced_custom_object_status(
        GROUP, VERSION, h.namespace, PLURAL, "restored", {**made, "status": old_status}
    )

    rerun = h.wait_phase("statusless", "SUCCESS", "ERROR", timeout=120)
    assert rerun["phase"] == "SUCCESS" and rerun["attempt"] == 1, rerun
    assert _told(h, "statusless", "StoredRunFound")
    (pod,) = h.pods("statusless")
    assert pod.metadata.owner_references[0].uid == h.job("statusless")["metadata"]["uid"]  # type: ignore[index]
    (output,) = (o["key"] for o in rerun["outputFiles"] if o["desc"]["path"] == "out.txt")
    assert output == job_prefix(PROJECT_ID, "statusless") + "outputs/out.txt"
    assert storage.get_bytes(output) not in (None, first_output)  # the new run's

    # By now the restored job has had every chance to start (the other ran meanwhile): it did not.
    status = h.status("restored")
    kept = ("phase", "finishedAt", "returnCode", "outputFiles", "logFiles")
    assert {k: status.get(k) for k in kept} == {k: old_status.get(k) for k in kept}, status
    assert h.pods("restored") == []
    assert _objects(storage, job_prefix(PROJECT_ID, "restored")) == stored["restored"]
    assert _told(h, "restored", "StoredRunFound")
    assert "created pod restored-a1" not in h.log().rsplit("===== start", 1)[-1]


def test_data_whose_job_was_removed_by_hand_is_found_and_deleted_by_the_orphans_command(
    h: H, storage: Storage
) -> None:
    # A ProjectJob whose finalizer a user removed while the operator was away: its data stays,
    # and only `python -m dsjobs.orphans` finds it. The command spares what live jobs own.
    data, shared = f"orphan {uuid.uuid4()}\n".encode(), f"shared {uuid.uuid4()}\n".encode()
    sha, shared_sha = hashlib.sha256(data).hexdigest(), hashlib.sha256(shared).hexdigest()
    storage.put_bytes(input_key(PROJECT_ID, sha), data)
    storage.put_bytes(input_key(PROJECT_ID, shared_sha), shared)

    def inputs(*pairs: tuple[str, bytes]) -> list[dict[str, Any]]:
        return [
            {"desc": {"path": f"in{i}.txt"}, "sha256": s, "sizeBytes": len(d)}
            for i, (s, d) in enumerate(pairs)
        ]

    outputs = {"cmd": "cat in*.txt > out.txt", "outputFiles": [{"path": "out.txt"}]}
    h.create_job("orphaned", {**outputs, "inputFiles": inputs((sha, data), (shared_sha, shared))})
    h.create_job("kept", {**outputs, "inputFiles": inputs((shared_sha, shared))})
    for name in ("orphaned", "kept"):
        assert h.wait_phase(name, "SUCCESS", "ERROR")["phase"] == "SUCCESS"
    h.kill()
    try:
        h.custom.patch_namespaced_custom_object(
            "dsjobs.dev",
            "v1alpha1",
            h.namespace,
            "projectjobs",
            "orphaned",
            {"metadata": {"finalizers": None}},
        )
        h.kubectl("delete", "pj", "-n", h.namespace, "orphaned", "--wait=true", "--timeout=60s")
    finally:
        h.start()
    assert _objects(storage, job_prefix(PROJECT_ID, "orphaned"))  # left behind
    # Unfinished multipart uploads (a runner killed mid-upload): invisible, but they take space.
    ghost = job_prefix(PROJECT_ID, f"ghost-{uuid.uuid4().hex[:8]}")
    for prefix in (ghost, job_prefix(PROJECT_ID, "orphaned")):
        storage._client.create_multipart_upload(Bucket=storage.bucket, Key=prefix + "outputs/big.bin")

    def orphans(*args: str) -> str:
        command = [sys.executable, "-m", "dsjobs.orphans", "--project", PROJECT_ID, *args]
        # As an admin runs it (the operator's identity may not list namespaces, so it could not
        # tell which project ids are unlabelled).
        admin = {**h.env, "KUBECONFIG": str(h.cluster.kubeconfig)}
        done = subprocess.run(command, env=admin, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def listed(out: str) -> set[str]:
        return {line.split()[1] for line in out.splitlines() if line.startswith(("job ", "input "))}

    # (Other runs on this bucket may have left orphans of this project id: only ours are checked.)
    ours = {input_key(PROJECT_ID, sha), job_prefix(PROJECT_ID, "orphaned"), ghost}
    assert not listed(orphans()) & ours  # all written within the default grace (1d)
    out = orphans("--grace", "0s")
    assert (
        listed(out) & (ours | {job_prefix(PROJECT_ID, "kept"), input_key(PROJECT_ID, shared_sha)}) == ours
    ), out
    assert (
        f"{job_prefix(PROJECT_ID, 'orphaned')}  " in out and "(no ProjectJob, or its data was cleared)" in out
    ), out
    assert "(no ProjectJob uses it)" in out, out
    assert f"{ghost}  0 objects and 1 unfinished upload, 0 B," in out, out
    assert _objects(storage, job_prefix(PROJECT_ID, "orphaned"))  # listing deletes nothing

    assert "deleted" in orphans("--grace", "0s", "--delete")
    assert not _objects(storage, job_prefix(PROJECT_ID, "orphaned"))
    for prefix in (ghost, job_prefix(PROJECT_ID, "orphaned")):
        assert list(storage.iter_uploads(prefix)) == []
    assert storage.get_bytes(input_key(PROJECT_ID, sha)) is None
    assert storage.get_bytes(input_key(PROJECT_ID, shared_sha)) == shared  # "kept" uses it
    assert _objects(storage, job_prefix(PROJECT_ID, "kept"))
    assert "0 orphaned" in orphans("--grace", "0s")


def _samples(text: str, name: str, **labels: str) -> float:
    """The sum of metric `name`'s samples whose labels include `labels` (every phase is exported
    from the start, at 0: only values tell)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_metrics_count_jobs_by_phase(h: H) -> None:
    before = h.metrics()
    h.create_job("metrics-hello", {"cmd": "true"})
    assert h.wait_phase("metrics-hello", "SUCCESS", "ERROR")["phase"] == "SUCCESS"

    def counted() -> str | None:
        text = h.metrics()
        return text if _samples(text, "dsjobs_jobs", phase="SUCCESS") >= 1 else None

    after = poll("the SUCCESS job counted", counted, timeout=30)
    successes = "dsjobs_job_transitions_total"
    assert (
        _samples(after, successes, to_phase="SUCCESS") >= _samples(before, successes, to_phase="SUCCESS") + 1
    )
    assert _samples(after, successes, from_phase="NONE") >= _samples(before, successes, from_phase="NONE") + 1
    pods = {"verb": "post", "resource": "pods", "code": "ok"}
    created = "dsjobs_kube_request_duration_seconds_count"
    assert _samples(after, created, **pods) >= _samples(before, created, **pods) + 1
    for name in ("dsjobs_pod_create_seconds_count", "dsjobs_reconciles_total", "dsjobs_status_writes_total"):
        assert _samples(after, name) >= _samples(before, name) + 1, name


# --- helpers --------------------------------------------------------------------------------------


def _program_input(storage: Storage, var: str, code: str) -> dict[str, Any]:
    """Upload a Python program as a job input (content-addressed) and declare it with `var`."""
    data = code.encode()
    sha = hashlib.sha256(data).hexdigest()
    storage.put_bytes(input_key(PROJECT_ID, sha), data)
    return {"inputFiles": [{"desc": {"path": "prog.py", "var": var}, "sha256": sha, "sizeBytes": len(data)}]}
