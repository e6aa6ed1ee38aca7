"""The local cluster itself: control plane, S3 server, launcher lifecycle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from cluster_fixtures import (
    NO_NODE_AGENT_REASON,
    REPO_ROOT,
    ClusterHandle,
    daemon_script,
    devcluster_cli,
    local_claim,
    poll,
    process_alive,
)
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from dsjobs.devcluster import (
    ClusterPaths,
    S3Config,
    default_topology,
    load_topology,
    node_agent_available,
    restart,
)
from dsjobs.devcluster.node.cgroup import V1_MEMORY_MOUNT, MemoryCgroups, node_cgroup_name
from dsjobs.devcluster.pki import CertificateAuthority
from dsjobs.devcluster.procs import Record, group_members, is_running

pytestmark = pytest.mark.e2e

needs_node_agent = pytest.mark.skipif(not node_agent_available(), reason=NO_NODE_AGENT_REASON)

MiB = 1024 * 1024


def s3_client(cfg: S3Config) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=cfg.endpoint,
        aws_access_key_id=cfg.access_key,
        aws_secret_access_key=cfg.secret_key,
        region_name=cfg.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def write_random(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ control plane


def test_apiserver_readyz(dev_cluster: ClusterHandle) -> None:
    # Raw response: the generated client's response-type arguments differ across versions.
    resp = dev_cluster.api_client.call_api(
        "/readyz", "GET", auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True
    )
    body = resp.data.decode()
    assert body == "ok"
    version = k8s.VersionApi(dev_cluster.api_client).get_code()
    if dev_cluster.local:
        # hack/k8s-bins.sh stamps the real version into the binaries.
        assert version.git_version == "v1.37.2"


@needs_node_agent
def test_nodes_match_topology(dev_cluster: ClusterHandle) -> None:
    if not dev_cluster.local:
        pytest.skip("the topology is only known for the local dev cluster")
    core = dev_cluster.core()
    for spec in default_topology():
        node = poll(f"node {spec.name} Ready", lambda n=spec.name: _ready_node(core, n), 60)
        for k, v in spec.labels.items():
            assert node.metadata.labels.get(k) == v, k
        taints = {f"{t.key}={t.value or ''}:{t.effect}" for t in node.spec.taints or []}
        assert set(spec.taints) <= taints
        assert node.status.capacity["pods"] == str(spec.pods)
        if spec.gpus:
            assert node.status.capacity["nvidia.com/gpu"] == str(spec.gpus)


def _ready_node(core: Any, name: str) -> Any:
    node = core.read_node(name)
    ready = [c for c in node.status.conditions or [] if c.type == "Ready" and c.status == "True"]
    return node if ready else None


@pytest.fixture
def namespace(dev_cluster: ClusterHandle) -> Iterator[str]:
    core = dev_cluster.core()
    name = f"e2e-devcluster-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    # Pods are rejected until the namespace's default ServiceAccount exists.
    poll("default ServiceAccount", lambda: core.read_namespaced_service_account("default", name), 60)
    yield name
    core.delete_namespace(name)  # the namespace controller finishes it in the background


def _sleeper_pod(name: str, **spec: Any) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, **spec.pop("meta", {})),
        spec=k8s.V1PodSpec(
            restart_policy="Never",
            termination_grace_period_seconds=5,
            containers=[
                k8s.V1Container(
                    name="main",
                    image="python:3.11",
                    command=["python", "-c", "import time; time.sleep(3600)"],
                    resources=spec.pop("resources", None),
                )
            ],
            **spec,
        ),
    )


@needs_node_agent
def test_garbage_collector_deletes_orphaned_pod(dev_cluster: ClusterHandle, namespace: str) -> None:
    core = dev_cluster.core()
    owner = core.create_namespaced_config_map(
        namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="owner"), data={"k": "v"})
    )
    ref = k8s.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_pod(namespace, _sleeper_pod("owned", meta={"owner_references": [ref]}))
    # Scheduled onto a node (the scheduler works), then GC'd once the owner is gone.
    poll("pod scheduled", lambda: core.read_namespaced_pod("owned", namespace).spec.node_name, 60)
    core.delete_namespaced_config_map("owner", namespace)

    def pod_gone() -> bool:
        try:
            core.read_namespaced_pod("owned", namespace)
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        return False

    # The GC marks the pod deleted; the node agent must then stop it and confirm.
    poll("garbage collection of the orphaned pod", pod_gone, 120)


@needs_node_agent
def test_gpu_pod_lands_on_gpu_node(dev_cluster: ClusterHandle, namespace: str) -> None:
    if not dev_cluster.local:
        pytest.skip("relies on the local topology's gpu-0 node")
    core = dev_cluster.core()
    pod = _sleeper_pod(
        "gpu",
        resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
    )
    core.create_namespaced_pod(namespace, pod)
    node = poll("gpu pod scheduled", lambda: core.read_namespaced_pod("gpu", namespace).spec.node_name, 60)
    assert node == "gpu-0"
    core.delete_namespaced_pod("gpu", namespace, grace_period_seconds=0)


# ------------------------------------------------------------------ S3


def test_s3_presigned_put_get_100mib(dev_s3: S3Config, tmp_path: Path) -> None:
    s3 = s3_client(dev_s3)
    key = f"e2e/{uuid.uuid4().hex}/blob.bin"
    src = tmp_path / "src.bin"
    digest = write_random(src, 100 * MiB)

    put_url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": dev_s3.bucket, "Key": key}, ExpiresIn=600
    )
    with open(src, "rb") as f:
        r = requests.put(put_url, data=f, timeout=300)
    assert r.status_code == 200, r.text

    get_url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": dev_s3.bucket, "Key": key}, ExpiresIn=600
    )
    h = hashlib.sha256()
    size = 0
    with requests.get(get_url, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for chunk in r.iter_content(MiB):
            h.update(chunk)
            size += len(chunk)
    assert size == 100 * MiB
    assert h.hexdigest() == digest
    s3.delete_object(Bucket=dev_s3.bucket, Key=key)


def test_s3_rejects_bad_or_missing_signatures(dev_s3: S3Config) -> None:
    s3 = s3_client(dev_s3)
    key = f"e2e/{uuid.uuid4().hex}/x"
    s3.put_object(Bucket=dev_s3.bucket, Key=key, Body=b"secret")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": dev_s3.bucket, "Key": key}, ExpiresIn=600)
    assert requests.get(url, timeout=30).content == b"secret"
    tampered = url.replace(key, key + "y")  # a URL signed for another key
    assert requests.get(tampered, timeout=30).status_code == 403
    assert requests.get(f"{dev_s3.endpoint}/{dev_s3.bucket}/{key}", timeout=30).status_code == 403
    wrong = s3_client(S3Config(dev_s3.endpoint, dev_s3.bucket, dev_s3.access_key, "not-the-secret"))
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        wrong.get_object(Bucket=dev_s3.bucket, Key=key)
    s3.delete_object(Bucket=dev_s3.bucket, Key=key)


def test_s3server_go_unit_tests() -> None:
    # The S3 server's own tests (SigV4, scoped keys): Go is a build requirement of the local
    # cluster, and its module cache is warm from building the server.
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed")
    proc = subprocess.run(
        [go, "test", "-count=1", "./..."],
        cwd=REPO_ROOT / "hack" / "s3server",
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_s3_scoped_key_reaches_its_prefix_only(dev_cluster: ClusterHandle, dev_s3: S3Config) -> None:
    if dev_cluster.root is None:
        pytest.skip("needs the local cluster's own S3 server")
    from dsjobs.devcluster.s3 import scoped_key

    paths = ClusterPaths.at(dev_cluster.root)
    prefix = f"projects/e2e-{uuid.uuid4().hex[:8]}/"
    key = scoped_key(paths.s3_scoped_keys, prefix)
    assert scoped_key(paths.s3_scoped_keys, prefix) == key  # one pair per prefix
    s3 = boto3.client(
        "s3",
        endpoint_url=dev_s3.endpoint,
        aws_access_key_id=key.access_key,
        aws_secret_access_key=key.secret_key,
        region_name=dev_s3.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )

    def put(k: str) -> None:
        s3.put_object(Bucket=dev_s3.bucket, Key=k, Body=b"x")

    # The server re-reads the file at most once a second.
    poll("the new scoped key to be accepted", lambda: put(prefix + "a") or True, 10, 0.3)
    assert s3.get_object(Bucket=dev_s3.bucket, Key=prefix + "a")["Body"].read() == b"x"
    for outside in ("projects/other/a", prefix.rstrip("/") + "x/a", prefix + "../b"):
        with pytest.raises(ClientError) as err:
            put(outside)
        assert err.value.response["Error"]["Code"] == "AccessDenied"


def test_s3_multipart_upload(dev_s3: S3Config, tmp_path: Path) -> None:
    s3 = s3_client(dev_s3)
    key = f"e2e/{uuid.uuid4().hex}/multi.bin"
    src = tmp_path / "multi.bin"
    digest = write_random(src, 17 * MiB)  # 4 parts of 5 MiB (the S3 minimum) and a tail
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3.upload_file(str(src), dev_s3.bucket, key, Config=cfg)
    head = s3.head_object(Bucket=dev_s3.bucket, Key=key)
    assert head["ContentLength"] == 17 * MiB
    body = s3.get_object(Bucket=dev_s3.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == digest
    s3.delete_object(Bucket=dev_s3.bucket, Key=key)


def test_s3_multipart_upload_survives_a_server_restart(dev_cluster: ClusterHandle, dev_s3: S3Config) -> None:
    """As on S3, an unfinished multipart upload outlives an outage: the parts sent before it stay,
    and the client goes on with the same upload id."""
    if dev_cluster.root is None:
        pytest.skip("restarts the local cluster's S3 server")
    s3 = s3_client(dev_s3)
    key = f"e2e/{uuid.uuid4().hex}/resumed.bin"
    first, second = os.urandom(5 * MiB), os.urandom(MiB)
    upload = s3.create_multipart_upload(Bucket=dev_s3.bucket, Key=key)["UploadId"]
    etag1 = s3.upload_part(Bucket=dev_s3.bucket, Key=key, UploadId=upload, PartNumber=1, Body=first)["ETag"]

    restart(ClusterPaths.at(dev_cluster.root), "s3")

    etag2 = s3.upload_part(Bucket=dev_s3.bucket, Key=key, UploadId=upload, PartNumber=2, Body=second)["ETag"]
    listed = s3.list_parts(Bucket=dev_s3.bucket, Key=key, UploadId=upload)["Parts"]
    assert [(p["PartNumber"], p["ETag"]) for p in listed] == [(1, etag1), (2, etag2)]
    parts = [{"PartNumber": 1, "ETag": etag1}, {"PartNumber": 2, "ETag": etag2}]
    s3.complete_multipart_upload(
        Bucket=dev_s3.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )
    assert s3.get_object(Bucket=dev_s3.bucket, Key=key)["Body"].read() == first + second
    s3.delete_object(Bucket=dev_s3.bucket, Key=key)


# ------------------------------------------------------------------ launcher lifecycle


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.timeout(900)
def test_up_down_leaves_nothing_behind(tmp_path: Path) -> None:
    if (
        os.environ.get("DSJOBS_E2E_KUBECONFIG")
        and devcluster_cli(tmp_path, "bin-dir", "--no-build", timeout=60).returncode
    ):
        pytest.skip("no control-plane binaries here (tests run against an external cluster)")
    root = tmp_path / "cluster"
    args = ["up"] if node_agent_available() else ["up", "--no-nodes"]
    first = devcluster_cli(root, *args)
    assert first.returncode == 0, first.stderr
    try:
        second = devcluster_cli(root, "up")
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout
        st = devcluster_cli(root, "status", timeout=60)
        assert st.returncode == 0, st.stdout + st.stderr

        record = Record.load(ClusterPaths.at(root).pids)
        assert record is not None
        names = {c.name for c in record.components}
        assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "s3"} <= names
        ports = [p for c in record.components for p in c.ports.values()]
        assert all(is_running(c) for c in record.components)
        assert any(_listening(p) for p in ports)
        # A claim of the local class still bound at `down`: its directory goes with the cluster.
        volume = _provisioned_volume(root)
        orphan = _container_of_a_killed_agent(root, record, tmp_path) if node_agent_available() else None
    finally:
        down = devcluster_cli(root, "down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert not volume.exists(), f"{volume} left behind"
    if orphan is not None:
        assert not process_alive(orphan), f"container process {orphan} of a killed node agent left running"
        paths = ClusterPaths.at(root)
        cgroups = [
            V1_MEMORY_MOUNT + "/" + node_cgroup_name(n, str(paths.node_state(n)))
            for n in record.info["nodes"]
        ]
        left = [c for c in cgroups if Path(c).exists()]
        assert not left, f"memory cgroups left: {left}"

    for c in record.components:
        assert not is_running(c), f"{c.name} (pid {c.pid}) still running"
        assert not group_members(c.pgid), f"{c.name}'s process group {c.pgid} still has members"
    still_listening = [p for p in ports if _listening(p)]
    assert not still_listening, f"ports still accepting connections: {still_listening}"
    assert not (root / "cluster").exists()
    assert not (root / "kubeconfig").exists()
    assert (root / "last-logs" / "kube-apiserver.log").exists()

    again = devcluster_cli(root, "status", timeout=60)
    assert again.returncode == 3
    assert "no cluster" in again.stdout


def _container_of_a_killed_agent(root: Path, record: Record, tmp_path: Path) -> int:
    """A running pod's program whose node agent was SIGKILLed: it lives on, as a dead kubelet's
    containers do, until something ends it. It left the container's process group (setsid, as
    the runner starts a job's program); the container's memory cgroup still holds it. Its pid."""
    node = str(record.info["nodes"][0])
    marks = tmp_path / "marks"
    marks.mkdir()
    api = k8s_config.new_client_from_config(config_file=str(root / "kubeconfig"))
    try:
        core = k8s.CoreV1Api(api)
        poll("default ServiceAccount", lambda: core.read_namespaced_service_account("default", "default"), 60)
        script = "import os, time\nopen('/marks/pid', 'w').write(str(os.getpid()))\ntime.sleep(600)"
        container: dict[str, Any] = {}
        probe = MemoryCgroups.discover("probe", str(root))
        if probe is not None:  # the nodes put containers in memory cgroups (node/cgroup.py)
            probe.close()
            script = daemon_script("/marks/pid", then_sleep=True)
            container["resources"] = {"limits": {"memory": "256Mi"}}
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "outlives-its-agent"},
            "spec": {
                "nodeName": node,
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3.11",
                        "command": ["python", "-c", script],
                        "volumeMounts": [{"name": "marks", "mountPath": "/marks"}],
                        **container,
                    }
                ],
                "volumes": [{"name": "marks", "hostPath": {"path": str(marks), "type": "Directory"}}],
            },
        }
        core.create_namespaced_pod("default", body)
        pid = int(poll("the pod's pid", lambda: (marks / "pid").exists() and (marks / "pid").read_text(), 90))
    finally:
        api.close()
    agent = record.find(f"node-{node}")
    assert agent is not None
    os.kill(agent.pid, signal.SIGKILL)
    poll("the agent gone", lambda: not is_running(agent), 30)
    assert process_alive(pid)
    return pid


def _provisioned_volume(root: Path) -> Path:
    """A PVC of the local class, bound: its directory (with a file in it)."""
    api = k8s_config.new_client_from_config(config_file=str(root / "kubeconfig"))
    try:
        core = k8s.CoreV1Api(api)
        poll("default ServiceAccount", lambda: core.read_namespaced_service_account("default", "default"), 60)
        path = local_claim(core, "default", "left-at-down")
    finally:
        api.close()
    assert path.is_dir()
    (path / "data.bin").write_bytes(b"x" * 1024)
    return path


# ------------------------------------------------------------------ pure helpers


def test_topology_file_overrides_default(tmp_path: Path) -> None:
    yml = tmp_path / "topo.yaml"
    yml.write_text(
        "nodes:\n"
        "  - {name: small-0, cpu: 2, memory: 4Gi, labels: {dsjobs.dev/node-pool: small}}\n"
        "  - name: gpu-x\n    gpus: 2\n    taints: ['nvidia.com/gpu=present:NoSchedule']\n"
    )
    nodes = load_topology(yml)
    assert [n.name for n in nodes] == ["small-0", "gpu-x"]
    assert nodes[0].agent_args() == [
        "--cpu",
        "2",
        "--memory",
        "4Gi",
        "--pods",
        "110",
        "--label",
        "dsjobs.dev/node-pool=small",
    ]
    assert nodes[1].agent_args()[-4:] == ["--gpus", "2", "--taint", "nvidia.com/gpu=present:NoSchedule"]
    js = tmp_path / "topo.json"
    js.write_text(json.dumps({"nodes": [{"name": "a"}]}))
    assert load_topology(js)[0].memory == "64Gi"
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{name: a, taints: ['no-effect']}]\n")
    with pytest.raises(ValueError, match="taints"):
        load_topology(bad)
    bad.write_text("nodes: [{name: a, memory: 64GB}]\n")
    with pytest.raises(ValueError, match=r"nodes\[0\]\.memory: not a Kubernetes quantity: '64GB'"):
        load_topology(bad)
    bad.write_text("nodes: [{name: a, cpu: 0}]\n")
    with pytest.raises(ValueError, match=r"nodes\[0\]\.cpu: must be positive"):
        load_topology(bad)
    bad.write_text("nodes: [{name: a, cpu: 1500m}]\n")
    assert load_topology(bad)[0].cpu == "1500m"


def test_default_topology_gpu_node() -> None:
    gpu = {n.name: n for n in default_topology()}["gpu-0"]
    args = gpu.agent_args()
    assert args[:8] == ["--cpu", "32", "--memory", "128Gi", "--pods", "110", "--gpus", "8"]
    assert "nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB" in args
    assert args[-2:] == ["--taint", "nvidia.com/gpu=present:NoSchedule"]


def test_node_client_cert_identity(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca = CertificateAuthority.create(tmp_path)
    pair = ca.issue("n", "system:node:cpu-0", orgs=("system:nodes",), client=True)
    cert = x509.load_pem_x509_certificate(pair.read_cert())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:cpu-0"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    assert (pair.key.stat().st_mode & 0o777) == 0o600
