"""The process node agent against the real local control plane.

Acceptance points of "Local Kubernetes for tests and the demo" for the node agent:
GPUs, init containers and emptyDirs, exit codes, graceful and forced deletion, garbage
collection, NotReady when the agent stops, `kubectl logs -f`. Tests that stop or restart
an agent start their own extra node (a fresh agent with a certificate from the dev
cluster's CA) so the shared nodes stay up.

Every wait is a poll with a timeout, a hang guard; timing is never asserted (a grace period
honoured shows in what the program could still do within it). Latency figures are in
bench/cluster.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from cluster_fixtures import (  # noqa: F401
    REPO_ROOT,
    ClusterHandle,
    claim_directory,
    daemon_script,
    dev_cluster,
    memory_limits_enforced,
    poll,
    process_alive,
)
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from node_fixtures import OwnNode, node_ready, own_node  # noqa: F401

from dsjobs.controller.podview import PodView
from dsjobs.devcluster import ClusterPaths, node_agent_available
from dsjobs.devcluster.cluster import LOCAL_STORAGE_CLASS
from dsjobs.devcluster.procs import Record

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not node_agent_available(), reason="the node agent is not available"),
]

GPU = "nvidia.com/gpu"
Obj = dict[str, Any]


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def ns(dev_cluster: ClusterHandle) -> Iterator[str]:  # noqa: F811
    core = dev_cluster.core()
    name = f"e2e-node-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    # Pods are rejected until the namespace's default ServiceAccount exists.
    poll("default ServiceAccount", lambda: core.read_namespaced_service_account("default", name), 60)
    yield name
    core.delete_namespace(name)


def pod_manifest(
    name: str,
    script: str,
    *,
    restart: str = "Never",
    grace: int | None = None,
    **spec: Any,
) -> Obj:
    """A one-container pod running `python -c script` (the agent's interpreter)."""
    container: Obj = {"name": "main", "image": "python:3.11", "command": ["python", "-u", "-c", script]}
    container.update(spec.pop("container", {}))
    body: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **spec.pop("meta", {})},
        "spec": {"restartPolicy": restart, "containers": [container], **spec},
    }
    if grace is not None:
        body["spec"]["terminationGracePeriodSeconds"] = grace
    return body


def read_pod(core: Any, ns: str, name: str) -> Obj | None:
    try:
        return cast(Obj, core.api_client.sanitize_for_serialization(core.read_namespaced_pod(name, ns)))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_phase(core: Any, ns: str, name: str, phases: tuple[str, ...], timeout: float = 90) -> Obj:
    def check() -> Obj | None:
        pod = read_pod(core, ns, name)
        return pod if pod and pod.get("status", {}).get("phase") in phases else None

    return cast(Obj, poll(f"pod {name} in {phases}", check, timeout, interval=0.2))


def wait_gone(core: Any, ns: str, name: str, timeout: float) -> None:
    poll(f"pod {name} deleted", lambda: read_pod(core, ns, name) is None, timeout, interval=0.2)


def main_state(pod: Obj, container: str = "main") -> Obj:
    for cs in pod["status"].get("containerStatuses") or []:
        if cs["name"] == container:
            return cast(Obj, cs)
    raise AssertionError(f"no status for container {container}: {pod['status']}")


def condition(pod: Obj, ctype: str) -> Obj | None:
    return next((c for c in pod["status"].get("conditions") or [] if c["type"] == ctype), None)


def pod_log(core: Any, ns: str, name: str, **kw: Any) -> str:
    # The generated client turns a text/plain body into "b'...'" for response type str.
    resp = core.read_namespaced_pod_log(name, ns, _preload_content=False, **kw)
    return cast(bytes, resp.data).decode()


def gpu_nodes(core: Any) -> list[tuple[str, int]]:
    out = []
    for node in core.list_node().items:
        count = int((node.status.allocatable or {}).get(GPU, "0"))
        taints = {t.key for t in node.spec.taints or []}
        if count > 0 and "dsjobs.dev/e2e-only" not in taints:
            out.append((node.metadata.name, count))
    return out


GPU_TOLERATION = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]


def kubectl_path(handle: ClusterHandle) -> str:
    """The kubectl built next to the cluster's binaries, else the one on PATH."""
    if handle.root is not None:
        record = Record.load(ClusterPaths.at(handle.root).pids)
        bin_dir = record.info.get("bin_dir") if record else None
        if bin_dir and (Path(bin_dir) / "kubectl").exists():
            return str(Path(bin_dir) / "kubectl")
    return shutil.which("kubectl") or "/usr/bin/kubectl"


@dataclass
class PodWatch:
    """Every event for the namespace's pods, recorded by a background watch."""

    core: Any
    ns: str
    events: list[tuple[float, str, Obj]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PodWatch:
        # A list, then a watch from its resourceVersion, resumed from the last event's: no event
        # falls between two watch requests, and the caller may act as soon as the list is done.
        version = self._list()

        def run() -> None:
            nonlocal version
            while not self._stop.is_set():
                w = k8s_watch.Watch()
                try:
                    stream = w.stream(
                        self.core.list_namespaced_pod, self.ns, timeout_seconds=5, resource_version=version
                    )
                    for ev in stream:
                        obj = self.core.api_client.sanitize_for_serialization(ev["object"])
                        version = obj["metadata"].get("resourceVersion") or version
                        self.events.append((time.monotonic(), ev["type"], obj))
                        if self._stop.is_set():
                            break
                except ApiException as exc:
                    if exc.status == 410:  # too old: list again
                        version = self._list()
                    else:
                        time.sleep(0.2)
                except Exception:
                    time.sleep(0.2)
                finally:
                    w.stop()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def _list(self) -> str:
        """Record the namespace's pods as they are now (as ADDED); the list's resourceVersion."""
        listed = self.core.list_namespaced_pod(self.ns)
        for pod in listed.items:
            self.events.append(
                (time.monotonic(), "ADDED", self.core.api_client.sanitize_for_serialization(pod))
            )
        return str(listed.metadata.resource_version)

    def stop(self) -> None:
        self._stop.set()

    def of(self, name: str) -> list[tuple[float, str, Obj]]:
        return [e for e in list(self.events) if e[2]["metadata"]["name"] == name]

    def last_status_before_delete(self, name: str) -> Obj:
        objs = [obj for _, typ, obj in self.of(name) if typ != "DELETED"]
        assert objs, f"no events for {name}"
        return objs[-1]


# ------------------------------------------------------------------ GPUs


def test_gpu_pod_gets_two_distinct_devices(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    nodes = gpu_nodes(core)
    if not nodes:
        pytest.skip("no node with nvidia.com/gpu")
    script = (
        "import os\n"
        "v = os.environ['CUDA_VISIBLE_DEVICES']\n"
        "assert v == os.environ['NVIDIA_VISIBLE_DEVICES']\n"
        "open('/dev/termination-log', 'w').write('devices=' + v)\n"
    )
    pod = pod_manifest(
        "gpu2",
        script,
        tolerations=GPU_TOLERATION,
        nodeSelector={"nvidia.com/gpu.present": "true"} if any(n == "gpu-0" for n, _ in nodes) else {},
        container={"resources": {"limits": {GPU: "2"}}},
    )
    core.create_namespaced_pod(ns, pod)
    done = wait_phase(core, ns, "gpu2", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["spec"]["nodeName"] in {n for n, _ in nodes}
    term = main_state(done)["state"]["terminated"]
    assert term["exitCode"] == 0
    devices = term["message"].removeprefix("devices=").split(",")
    assert len(devices) == 2 and len(set(devices)) == 2, term["message"]


def test_more_gpus_than_any_node_stays_pending(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    most = max([c for _, c in gpu_nodes(core)] or [0])
    pod = pod_manifest(
        "gpu-too-many",
        "print('never')",
        tolerations=GPU_TOLERATION,
        container={"resources": {"limits": {GPU: str(most + 1)}}},
    )
    core.create_namespaced_pod(ns, pod)

    def unschedulable() -> Obj | None:
        p = read_pod(core, ns, "gpu-too-many")
        c = condition(p, "PodScheduled") if p else None
        return p if c and c["status"] == "False" and c.get("reason") == "Unschedulable" else None

    p = poll("PodScheduled=False/Unschedulable", unschedulable, 60)
    assert p["status"]["phase"] == "Pending"
    assert not p["spec"].get("nodeName")
    core.delete_namespaced_pod("gpu-too-many", ns, grace_period_seconds=0)


def test_full_node_gpu_pods_run_one_after_the_other(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    nodes = gpu_nodes(core)
    if not nodes:
        pytest.skip("no node with nvidia.com/gpu")
    node, count = nodes[0]
    script = (
        "import os, time\n"
        "start = time.time()\n"
        "devs = os.environ['CUDA_VISIBLE_DEVICES']\n"
        "time.sleep(2)\n"
        "open('/dev/termination-log', 'w').write(f'{start} {time.time()} {devs}')\n"
    )
    names = ["full-a", "full-b"]
    for name in names:
        core.create_namespaced_pod(
            ns,
            pod_manifest(
                name,
                script,
                tolerations=GPU_TOLERATION,
                nodeSelector={"kubernetes.io/hostname": node},
                container={"resources": {"limits": {GPU: str(count)}}},
            ),
        )
    spans = []
    for name in names:
        done = wait_phase(core, ns, name, ("Succeeded", "Failed"), timeout=180)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        start, end, devs = main_state(done)["state"]["terminated"]["message"].split()
        assert sorted(int(d) for d in devs.split(",")) == list(range(count))
        spans.append((float(start), float(end)))
    first, second = sorted(spans)
    assert first[1] <= second[0], f"the two {count}-GPU pods overlapped: {spans}"


# ------------------------------------------------------------------ containers


def test_init_container_file_in_empty_dir_reaches_main(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    body = pod_manifest(
        "init-share",
        "print(open('/shared/greeting').read().strip())\n"
        "open('/dev/termination-log', 'w').write(open('/shared/greeting').read())",
        container={"volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        initContainers=[
            {
                "name": "writer",
                "image": "busybox",
                "command": ["sh", "-c", "echo hello from $(POD) > /shared/greeting"],
                "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            }
        ],
        volumes=[{"name": "shared", "emptyDir": {}}],
    )
    core.create_namespaced_pod(ns, body)
    done = wait_phase(core, ns, "init-share", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert main_state(done)["state"]["terminated"]["message"].strip() == "hello from init-share"
    init = done["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["reason"] == "Completed"
    assert condition(done, "Initialized")["status"] == "True"  # type: ignore[index]
    assert pod_log(core, ns, "init-share", container="main").strip() == "hello from init-share"


def test_exit_code_3_fails_the_pod(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    core.create_namespaced_pod(
        ns,
        pod_manifest(
            "exit3",
            "import sys; print('bad input', file=sys.stderr); sys.exit(3)",
            container={"terminationMessagePolicy": "FallbackToLogsOnError"},
        ),
    )
    done = wait_phase(core, ns, "exit3", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Failed"
    term = main_state(done)["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert term["message"].strip() == "bad input"  # FallbackToLogsOnError
    assert term["containerID"].startswith("process://")
    assert condition(done, "Ready")["status"] == "False"  # type: ignore[index]


def test_failing_init_container_fails_the_pod(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    body = pod_manifest(
        "init-fails",
        "print('must not run')",
        initContainers=[{"name": "check", "image": "busybox", "command": ["sh", "-c", "exit 7"]}],
    )
    core.create_namespaced_pod(ns, body)
    done = wait_phase(core, ns, "init-fails", ("Failed",))
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert "waiting" in main_state(done)["state"]
    assert condition(done, "Initialized")["status"] == "False"  # type: ignore[index]


def test_on_failure_restarts_until_success(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    script = (
        "import os, sys\n"
        "if not os.path.exists('/scratch/once'):\n"
        "    print('first attempt'); open('/scratch/once', 'w').close(); sys.exit(1)\n"
        "print('second time lucky')\n"
    )
    body = pod_manifest(
        "onfailure",
        script,
        restart="OnFailure",
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    core.create_namespaced_pod(ns, body)
    done = wait_phase(core, ns, "onfailure", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded"
    cs = main_state(done)
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert pod_log(core, ns, "onfailure") == "second time lucky\n"
    assert pod_log(core, ns, "onfailure", previous=True) == "first attempt\n"
    assert pod_log(core, ns, "onfailure", limit_bytes=6) == "second"


def test_pvc_bound_to_host_path_pv(dev_cluster: ClusterHandle, ns: str, tmp_path: Path) -> None:  # noqa: F811
    core = dev_cluster.core()
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "existing.txt").write_text("on the volume\n")
    pv_name = f"{ns}-pv"
    klass = f"{ns}-manual"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": klass,
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(disk), "type": "Directory"},
            },
        }
    )
    try:
        core.create_namespaced_persistent_volume_claim(
            ns,
            {
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": klass,
                    "volumeName": pv_name,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        poll(
            "PVC Bound",
            lambda: core.read_namespaced_persistent_volume_claim("data", ns).status.phase == "Bound",
            60,
        )
        script = "print(open('/data/existing.txt').read(), end=''); open('/data/new.txt', 'w').write('from the pod')"
        core.create_namespaced_pod(
            ns,
            pod_manifest(
                "pvc-user",
                script,
                container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            ),
        )
        done = wait_phase(core, ns, "pvc-user", ("Succeeded", "Failed"))
        assert done["status"]["phase"] == "Succeeded", pod_log(core, ns, "pvc-user")
        assert pod_log(core, ns, "pvc-user") == "on the volume\n"
        assert (disk / "new.txt").read_text() == "from the pod"
    finally:
        core.delete_persistent_volume(pv_name)


def test_generic_ephemeral_volume_is_provisioned_and_goes_with_the_pod(
    dev_cluster: ClusterHandle,  # noqa: F811
    ns: str,
) -> None:
    # The ephemeral volume controller makes the claim <pod>-<volume>, the controller-manager's
    # hostPath provisioner a PV for it (class local-hostpath), the node mounts it.
    if dev_cluster.root is None:
        pytest.skip("uses the local cluster's hostPath class")
    core = dev_cluster.core()
    template = {
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": LOCAL_STORAGE_CLASS,
            "resources": {"requests": {"storage": "5Gi"}},
        }
    }
    core.create_namespaced_pod(
        ns,
        pod_manifest(
            "scratch-user",
            "import os; open('/scratch/f.txt', 'w').write('on the volume'); print(sorted(os.listdir('/scratch')))",
            container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
            volumes=[{"name": "scratch", "ephemeral": {"volumeClaimTemplate": template}}],
        ),
    )
    done = wait_phase(core, ns, "scratch-user", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", pod_log(core, ns, "scratch-user")
    assert pod_log(core, ns, "scratch-user") == "['f.txt']\n"
    directory = claim_directory(core, ns, "scratch-user-scratch")
    assert (directory / "f.txt").read_text() == "on the volume"
    core.delete_namespaced_pod("scratch-user", ns)
    poll("the claim's directory removed with the pod", lambda: not directory.exists(), 120)


def test_a_container_over_its_memory_limit_is_oom_killed(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    if not memory_limits_enforced(dev_cluster):
        pytest.skip("this host gives the node agent no memory cgroups: limits are recorded only")
    core = dev_cluster.core()
    grow = "import time; chunks = []\nwhile True: chunks.append(bytearray(16 * 2**20)); time.sleep(0.01)"
    limits = {"resources": {"limits": {"memory": "64Mi"}}}
    core.create_namespaced_pod(ns, pod_manifest("hungry", grow, container=limits))
    # Within its limit a container runs as before (the agent's Python alone needs ~10 MiB).
    fits = "x = bytearray(16 * 2**20); print('fits', len(x))"
    core.create_namespaced_pod(ns, pod_manifest("modest", fits, container=limits))
    done = wait_phase(core, ns, "hungry", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Failed"
    terminated = main_state(done)["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137), terminated
    modest = wait_phase(core, ns, "modest", ("Succeeded", "Failed"))
    assert modest["status"]["phase"] == "Succeeded", pod_log(core, ns, "modest")
    assert main_state(modest)["state"]["terminated"]["reason"] == "Completed"


def test_a_daemon_that_left_the_group_ends_with_its_container(
    dev_cluster: ClusterHandle,  # noqa: F811
    ns: str,
    tmp_path: Path,
) -> None:
    """As the end of a container's PID namespace would: the agent kills what is left in the
    container's memory cgroup when its main process exits, a setsid'd daemon too."""
    if not memory_limits_enforced(dev_cluster):
        pytest.skip("this host gives the node agent no memory cgroups: a daemon escapes")
    marks = tmp_path / "marks"
    marks.mkdir()
    core = dev_cluster.core()
    body = pod_manifest(
        "daemonizes",
        daemon_script("/marks/pid", then_sleep=False),
        container={
            "resources": {"limits": {"memory": "256Mi"}},
            "volumeMounts": [{"name": "marks", "mountPath": "/marks"}],
        },
        volumes=[{"name": "marks", "hostPath": {"path": str(marks), "type": "Directory"}}],
    )
    core.create_namespaced_pod(ns, body)
    done = wait_phase(core, ns, "daemonizes", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", pod_log(core, ns, "daemonizes")
    pid = int((marks / "pid").read_text())
    poll("the daemon gone", lambda: not process_alive(pid), 30)
    core.delete_namespaced_pod("daemonizes", ns)


def test_native_sidecar_is_stopped_when_main_completes(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    body = pod_manifest(
        "sidecar",
        "import time; time.sleep(0.5); print('main done')",
        initContainers=[
            {
                "name": "proxy",
                "image": "envoy",
                "restartPolicy": "Always",
                "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"],
            }
        ],
    )
    core.create_namespaced_pod(ns, body)
    done = wait_phase(core, ns, "sidecar", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert "terminated" in done["status"]["initContainerStatuses"][0]["state"]


def test_config_secret_downward_and_service_account(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "cfg"}, "data": {"MODE": "fast", "file.txt": "cfg-file"}}
    )
    core.create_namespaced_secret(ns, {"metadata": {"name": "sec"}, "stringData": {"password": "hunter2"}})
    script = (
        "import os, json\n"
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "who = client.AuthenticationV1Api().create_self_subject_review({}).status.user_info.username\n"
        "out = {\n"
        "  'mode': os.environ['MODE'], 'pw': os.environ['PW'], 'mem': os.environ['MEM_MI'],\n"
        "  'file': open('/etc/cfg/file.txt').read(), 'secret': open('/etc/sec/password').read(),\n"
        "  'labels': open('/etc/podinfo/labels').read(), 'ns': open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read(),\n"
        "  'who': who,\n"
        "}\n"
        "open('/dev/termination-log', 'w').write(json.dumps(out))\n"
    )
    body = pod_manifest(
        "wiring",
        script,
        meta={"labels": {"app": "wiring"}},
        container={
            "envFrom": [{"configMapRef": {"name": "cfg"}}],
            "env": [
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
                {
                    "name": "MEM_MI",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
                },
            ],
            "resources": {"limits": {"memory": "256Mi"}},
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/etc/cfg"},
                {"name": "sec", "mountPath": "/etc/sec"},
                {"name": "podinfo", "mountPath": "/etc/podinfo"},
            ],
        },
        volumes=[
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "sec"}},
            {
                "name": "podinfo",
                "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
            },
        ],
    )
    core.create_namespaced_pod(ns, body)
    done = wait_phase(core, ns, "wiring", ("Succeeded", "Failed"))
    term = main_state(done)["state"]["terminated"]
    assert done["status"]["phase"] == "Succeeded", pod_log(core, ns, "wiring")
    out = json.loads(term["message"])
    assert out == {
        "mode": "fast",
        "pw": "hunter2",
        "mem": "256",
        "file": "cfg-file",
        "secret": "hunter2",
        "labels": 'app="wiring"',
        "ns": ns,
        "who": f"system:serviceaccount:{ns}:default",
    }


def test_active_deadline_exceeded(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    core.create_namespaced_pod(
        ns, pod_manifest("deadline", "import time; time.sleep(600)", grace=1, activeDeadlineSeconds=2)
    )
    done = wait_phase(core, ns, "deadline", ("Failed", "Succeeded"), timeout=60)
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["reason"] == "DeadlineExceeded"
    assert "terminated" in main_state(done)["state"]


def test_empty_dir_over_its_size_limit_evicts_the_pod(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    # The kubelet's local storage isolation: the volume holds more than its sizeLimit -> evicted.
    core = dev_cluster.core()
    mounts = {"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
    writes = "open('/scratch/big', 'wb').write(b'x' * ({mib} << 20)); print('written'); import time; time.sleep({nap})"
    core.create_namespaced_pod(
        ns,
        pod_manifest(
            "fits",
            writes.format(mib=1, nap=5),
            container=mounts,
            volumes=[{"name": "scratch", "emptyDir": {"sizeLimit": "4Mi"}}],
        ),
    )
    core.create_namespaced_pod(
        ns,
        pod_manifest(
            "too-big",
            writes.format(mib=8, nap=600),
            grace=30,
            container=mounts,
            volumes=[{"name": "scratch", "emptyDir": {"sizeLimit": "4Mi"}}],
        ),
    )
    done = wait_phase(core, ns, "too-big", ("Failed", "Succeeded"), timeout=60)
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["reason"] == "Evicted"
    assert done["status"]["message"] == 'Usage of EmptyDir volume "scratch" exceeds the limit "4Mi". '
    assert "terminated" in main_state(done)["state"]
    events = core.list_namespaced_event(ns, field_selector="involvedObject.name=too-big").items
    assert any(e.reason == "Evicted" and e.type == "Warning" for e in events)
    assert wait_phase(core, ns, "fits", ("Failed", "Succeeded"), timeout=60)["status"]["phase"] == "Succeeded"


# ------------------------------------------------------------------ deletion


TRAPS_TERM = "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.1; done"


def _shell_pod(name: str, script: str, grace: int) -> Obj:
    return pod_manifest(
        name, "", grace=grace, container={"image": "busybox", "command": ["sh", "-c", script]}
    )


def _wait_log(core: Any, ns: str, name: str, text: str) -> None:
    poll(f"{text!r} in the log of {name}", lambda: text in pod_log(core, ns, name), 60, 0.2)


def test_delete_trapping_pod_ends_promptly(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    watch = PodWatch(core, ns).start()
    try:
        core.create_namespaced_pod(ns, _shell_pod("traps", TRAPS_TERM, grace=120))
        wait_phase(core, ns, "traps", ("Running",))
        _wait_log(core, ns, "traps", "ready")
        core.delete_namespaced_pod("traps", ns)
        # Far below the 120s grace period: the process exited on SIGTERM and the agent
        # removed the pod right away.
        wait_gone(core, ns, "traps", timeout=60)
        poll("DELETED event", lambda: any(t == "DELETED" for _, t, _ in watch.of("traps")), 10)
        final = watch.last_status_before_delete("traps")
        term = main_state(final)["state"]["terminated"]
        assert term["exitCode"] == 0
        assert final["status"]["phase"] == "Succeeded"
    finally:
        watch.stop()


# Takes its time on SIGTERM, and does not end by itself: the gate (a file the test makes) lets it
# answer once the test has seen the signal arrive.
SLOW_ON_TERM = (
    "trap 'echo got TERM; until [ -e /gate/go ]; do sleep 0.1; done; echo running after TERM' TERM; "
    "echo ready; while true; do sleep 0.1; done"
)


def test_delete_ignoring_pod_is_killed_after_grace(
    dev_cluster: ClusterHandle,  # noqa: F811
    ns: str,
    tmp_path: Path,
) -> None:
    core = dev_cluster.core()
    watch = PodWatch(core, ns).start()
    gate = tmp_path / "gate"
    gate.mkdir()
    grace = 10  # time enough for the exchange below on a loaded machine
    try:
        body = _shell_pod("ignores", SLOW_ON_TERM, grace=grace)
        body["spec"]["containers"][0]["volumeMounts"] = [{"name": "gate", "mountPath": "/gate"}]
        body["spec"]["volumes"] = [{"name": "gate", "hostPath": {"path": str(gate), "type": "Directory"}}]
        core.create_namespaced_pod(ns, body)
        wait_phase(core, ns, "ignores", ("Running",))
        _wait_log(core, ns, "ignores", "ready")
        core.delete_namespaced_pod("ignores", ns)
        # The grace period is honoured, seen by what happened rather than timed: SIGTERM first,
        # then the program still runs when the test answers it...
        _wait_log(core, ns, "ignores", "got TERM")
        deleting = read_pod(core, ns, "ignores")
        assert deleting is not None and deleting["metadata"]["deletionGracePeriodSeconds"] == grace
        (gate / "go").touch()
        _wait_log(core, ns, "ignores", "running after TERM")
        # ... and, as it does not end by itself, it is SIGKILLed (at the end of the grace period).
        wait_gone(core, ns, "ignores", timeout=60)
        poll("DELETED event", lambda: any(t == "DELETED" for _, t, _ in watch.of("ignores")), 10)
        term = main_state(watch.last_status_before_delete("ignores"))["state"]["terminated"]
        assert (term["exitCode"], term.get("signal")) == (137, 9), term  # SIGKILLed
    finally:
        watch.stop()


def test_deleting_owner_garbage_collects_pod(dev_cluster: ClusterHandle, ns: str) -> None:  # noqa: F811
    core = dev_cluster.core()
    owner = core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}, "data": {}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_pod(
        ns, pod_manifest("owned", "import time; time.sleep(600)", grace=2, meta={"ownerReferences": [ref]})
    )
    wait_phase(core, ns, "owned", ("Running",))
    core.delete_namespaced_config_map("owner", ns)
    wait_gone(core, ns, "owned", timeout=120)


# ------------------------------------------------------------------ logs


def test_kubectl_logs_follow_streams_until_exit(dev_cluster: ClusterHandle, ns: str, tmp_path: Path) -> None:  # noqa: F811
    core = dev_cluster.core()
    gate = tmp_path / "gate"
    gate.mkdir()
    script = (
        "import os, time\n"
        "i = 0\n"
        "while not os.path.exists('/gate/go'):\n"
        "    print(f'tick {i}'); i += 1; time.sleep(0.2)\n"
        "print('bye')\n"
    )
    core.create_namespaced_pod(
        ns,
        pod_manifest(
            "chatty",
            script,
            container={"volumeMounts": [{"name": "gate", "mountPath": "/gate"}]},
            volumes=[{"name": "gate", "hostPath": {"path": str(gate), "type": "Directory"}}],
        ),
    )
    wait_phase(core, ns, "chatty", ("Running",))
    env = {**os.environ, "KUBECONFIG": str(dev_cluster.kubeconfig)}
    proc = subprocess.Popen(
        [kubectl_path(dev_cluster), "logs", "-f", "-n", ns, "chatty"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        poll("three streamed lines", lambda: sum(x.startswith("tick") for x in lines) >= 3, 60, 0.1)
        # The container cannot exit before the gate opens: the stream is live.
        assert proc.poll() is None
        (gate / "go").touch()
        proc.wait(timeout=60)
        reader.join(10)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert lines[-1].strip() == "bye"
        ticks = [int(x.split()[1]) for x in lines if x.startswith("tick")]
        assert ticks == list(range(len(ticks)))
    finally:
        if proc.poll() is None:
            proc.kill()
    done = wait_phase(core, ns, "chatty", ("Succeeded",))
    assert done["status"]["phase"] == "Succeeded"
    stamped = subprocess.run(
        [kubectl_path(dev_cluster), "logs", "-n", ns, "chatty", "--timestamps", "--tail=1"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    ts, _, text = stamped.partition(" ")
    assert text == "bye" and ts.endswith("Z") and "T" in ts, stamped


# ------------------------------------------------------------------ an agent of our own


def _ready_reason(core: Any, name: str) -> tuple[str, str]:
    node = core.read_node(name)
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    return ready.status, ready.reason or ""


def _restart(node: OwnNode, core: Any, sig: int) -> None:
    node.signal(sig)
    node.start()
    poll(f"node {node.name} Ready again", lambda: node_ready(core, node.name) is True, 60)


def test_stopping_agent_makes_node_not_ready(
    dev_cluster: ClusterHandle,  # noqa: F811
    ns: str,
    own_node: OwnNode,  # noqa: F811
    tmp_path: Path,
) -> None:
    core = dev_cluster.core()
    marks = tmp_path / "marks"
    marks.mkdir()
    script = "trap 'echo got TERM > /marks/term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
    body = _shell_pod("on-shutdown", script, grace=30)
    body["spec"]["nodeName"] = own_node.name
    body["spec"]["containers"][0]["volumeMounts"] = [{"name": "marks", "mountPath": "/marks"}]
    body["spec"]["volumes"] = [{"name": "marks", "hostPath": {"path": str(marks), "type": "Directory"}}]
    core.create_namespaced_pod(ns, body)
    wait_phase(core, ns, "on-shutdown", ("Running",))
    _wait_log(core, ns, "on-shutdown", "ready")

    own_node.signal(signal.SIGTERM)
    poll("NotReady after SIGTERM", lambda: node_ready(core, own_node.name) is False, 60)
    assert _ready_reason(core, own_node.name) == ("False", "KubeletNotReady")
    # The agent stopped its pod gracefully and said so.
    assert (marks / "term").read_text() == "got TERM\n"
    stopped = wait_phase(core, ns, "on-shutdown", ("Failed",), timeout=10)
    assert stopped["status"]["reason"] == "Terminated"
    [disruption] = [c for c in stopped["status"]["conditions"] if c["type"] == "DisruptionTarget"]
    assert (disruption["status"], disruption["reason"]) == ("True", "TerminationByKubelet")
    assert main_state(stopped)["state"]["terminated"]["exitCode"] == 0

    own_node.start()
    poll("Ready after restart", lambda: node_ready(core, own_node.name) is True, 60, 0.2)
    # A killed agent cannot say goodbye: the node lifecycle controller notices the stale Lease.
    own_node.signal(signal.SIGKILL)
    poll(
        "NotReady (Unknown) after SIGKILL",
        lambda: _ready_reason(core, own_node.name) == ("Unknown", "NodeStatusUnknown"),
        180,
        1.0,
    )
    own_node.start()
    poll("Ready after restart", lambda: node_ready(core, own_node.name) is True, 60, 0.2)
    still = read_pod(core, ns, "on-shutdown")
    assert still is not None and still["status"]["reason"] == "Terminated"
    core.delete_namespaced_pod("on-shutdown", ns)
    wait_gone(core, ns, "on-shutdown", 60)


def test_restarted_agent_keeps_finished_pods_and_fails_lost_ones(
    dev_cluster: ClusterHandle,  # noqa: F811
    ns: str,
    own_node: OwnNode,  # noqa: F811
    tmp_path: Path,
) -> None:
    core = dev_cluster.core()
    marks = tmp_path / "marks"
    marks.mkdir()
    vol: dict[str, Any] = {
        "volumes": [{"name": "marks", "hostPath": {"path": str(marks), "type": "Directory"}}],
        "nodeName": own_node.name,
    }
    mount = {"volumeMounts": [{"name": "marks", "mountPath": "/marks"}]}
    finished = pod_manifest(
        "finished",
        "open('/marks/finished-runs', 'a').write('run\\n'); print('finished once')",
        container=mount,
        **vol,
    )
    lost_script = "import os, time\nopen('/marks/lost-pid', 'w').write(str(os.getpid()))\ntime.sleep(600)"
    lost_container: Obj = dict(mount)
    if memory_limits_enforced(dev_cluster):
        # Its program leaves the container's process group (setsid, as the runner starts a job's
        # program): only the container's memory cgroup still holds it.
        lost_script = daemon_script("/marks/lost-pid", then_sleep=True)
        lost_container["resources"] = {"limits": {"memory": "256Mi"}}
    lost = pod_manifest("lost", lost_script, container=lost_container, **vol)
    core.create_namespaced_pod(ns, finished)
    core.create_namespaced_pod(ns, lost)
    wait_phase(core, ns, "finished", ("Succeeded",))
    wait_phase(core, ns, "lost", ("Running",))
    pid = int(
        poll(
            "pid of the lost pod",
            lambda: (marks / "lost-pid").exists() and (marks / "lost-pid").read_text(),
            30,
        )
    )

    _restart(own_node, core, signal.SIGKILL)  # the agent dies; its process lives on

    failed = wait_phase(core, ns, "lost", ("Failed",), timeout=60)
    assert failed["status"]["reason"] == "NodeAgentRestarted", failed["status"]
    term = main_state(failed)["state"]["terminated"]
    assert term["reason"] == "ContainerStatusUnknown"
    poll("the orphaned process is gone", lambda: not process_alive(pid), 30)
    kept = read_pod(core, ns, "finished")
    assert kept is not None and kept["status"]["phase"] == "Succeeded"
    assert main_state(kept)["state"]["terminated"]["exitCode"] == 0
    assert (marks / "finished-runs").read_text() == "run\n"  # not run again
    # Logs of the finished pod survive the restart.
    assert pod_log(core, ns, "finished") == "finished once\n"
    for name in ("finished", "lost"):
        core.delete_namespaced_pod(name, ns)
        wait_gone(core, ns, name, 60)


def test_a_running_pod_of_a_silent_node_is_not_ready_with_its_containers_ready(
    dev_cluster: ClusterHandle,  # noqa: F811
    ns: str,
    own_node: OwnNode,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The mark the operator reads as "the node stopped reporting" (PodView.node_not_ready): the
    node lifecycle controller turns a running pod's Ready False and leaves ContainersReady True."""
    core = dev_cluster.core()
    marks = tmp_path / "marks"
    marks.mkdir()
    body = pod_manifest(
        "silent",
        "import os, time\nopen('/marks/pid', 'w').write(str(os.getpid()))\ntime.sleep(600)",
        container={"volumeMounts": [{"name": "marks", "mountPath": "/marks"}]},
        volumes=[{"name": "marks", "hostPath": {"path": str(marks), "type": "Directory"}}],
        nodeName=own_node.name,
    )
    core.create_namespaced_pod(ns, body)
    wait_phase(core, ns, "silent", ("Running",))
    pid = int(poll("pid of the pod", lambda: (marks / "pid").exists() and (marks / "pid").read_text(), 30))
    assert not PodView.from_pod(read_pod(core, ns, "silent") or {}).node_not_ready
    try:
        own_node.signal(signal.SIGKILL)  # the node goes silent; its process lives on

        def marked() -> bool:
            pod = read_pod(core, ns, "silent")
            return pod is not None and PodView.from_pod(pod).node_not_ready

        poll("the pod marked not ready, its containers still ready", marked, 180, 1.0)
    finally:
        own_node.start()
        poll("Ready after restart", lambda: node_ready(core, own_node.name) is True, 60, 0.2)
    wait_phase(core, ns, "silent", ("Failed",), timeout=60)  # the restarted agent lost it
    poll("the orphaned process is gone", lambda: not process_alive(pid), 30)
    core.delete_namespaced_pod("silent", ns)
    wait_gone(core, ns, "silent", 60)


def test_node_restriction_allows_everything_the_agent_does(own_node: OwnNode) -> None:  # noqa: F811
    """Nothing the agent did in this module was refused by the Node authorizer/NodeRestriction."""
    log = own_node.log()
    assert "Forbidden" not in log and "forbidden" not in log, log
