"""The node agent: registers the Node, keeps its Lease, watches its pods, runs them.

Every API call is one the Node authorizer and NodeRestriction admission allow a node to
make for itself: create/get/patch its own Node (labels only; taints are set at creation),
patch `nodes/status`, get/create/update its Lease in kube-node-lease, list/watch pods with
`spec.nodeName=<node>`, patch `pods/status`, delete its pods, get the ConfigMaps/Secrets/
PVCs/PVs its pods reference, create tokens for its pods' service accounts, and create events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import aiohttp

from dsjobs.backoff import Backoff

from .cgroup import MemoryCgroups
from .gpu import GpuAllocator
from .kubeapi import STRATEGIC_PATCH, ApiError, KubeClient, WatchExpired, load_kubeconfig
from .leftovers import kill_recorded_processes, read_state
from .logs_server import make_app, server_ssl_context, start_server
from .mounts import Tools
from .nodeobj import (
    LEASE_NAMESPACE,
    RUNTIME_VERSION,
    NodeSpec,
    label_allowed_for_node,
    lease_object,
    micro_time,
    node_conditions,
    node_labels,
    node_object,
    node_status,
    parse_taint,
    ready_condition_status,
)
from .podspec import NodeContext, Obj, termination_grace_seconds
from .quantity import parse_quantity
from .runtime import Notifier, wait_any
from .worker import PodWorker, api_shows_started, pod_ref, state_shows_started

log = logging.getLogger("dsjobs.node")

LEASE_DURATION = 40
LEASE_RENEW_INTERVAL = 10.0
NODE_STATUS_INTERVAL = 60.0
NODE_STATUS_CHECK = 10.0


@dataclass
class AgentConfig:
    kubeconfig: str
    name: str
    state_dir: str
    port: int
    tls_cert: str
    tls_key: str
    cpu: str = "16"
    memory: str = "64Gi"
    pods: int = 110
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[str] = field(default_factory=list)
    address: str = "127.0.0.1"
    client_ca: str | None = None
    ephemeral_storage: str | None = None
    restart_backoff: float = 10.0
    max_restart_backoff: float = 300.0
    shutdown_grace: float = 5.0
    events: bool = True
    enforce_run_as_user: bool = False
    #: limits.memory as a memory cgroup per container where the host allows (cgroup.py).
    memory_limits: bool = True


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return "Linux"


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.state_dir = os.path.abspath(cfg.state_dir)
        self.kubeconfig = load_kubeconfig(cfg.kubeconfig, os.path.join(self.state_dir, "kubeconfig-data"))
        self.api = KubeClient(self.kubeconfig)
        self.tools = Tools.discover()
        self.gpus = GpuAllocator(cfg.gpus)
        self.gpu_released = Notifier()
        self.memory = MemoryCgroups.discover(cfg.name, self.state_dir) if cfg.memory_limits else None
        self.restart_backoff = cfg.restart_backoff
        self.max_restart_backoff = cfg.max_restart_backoff
        if cfg.ephemeral_storage:
            storage = cfg.ephemeral_storage
        else:
            os.makedirs(self.state_dir, exist_ok=True)
            st = os.statvfs(self.state_dir)
            storage = str(st.f_blocks * st.f_frsize)
        self.spec = NodeSpec(
            name=cfg.name,
            cpu=cfg.cpu,
            memory=cfg.memory,
            pods=cfg.pods,
            gpus=cfg.gpus,
            ephemeral_storage=storage,
            port=cfg.port,
            address=cfg.address,
            labels=dict(cfg.labels),
            taints=[parse_taint(t) for t in cfg.taints],
        )
        self.spec.validate()
        for key in self.spec.labels:
            if not label_allowed_for_node(key):
                raise ValueError(f"label {key!r}: NodeRestriction does not let a node set it on itself")
        api_host, api_port = self.kubeconfig.host_port
        allocatable = {
            "cpu": parse_quantity(cfg.cpu),
            "memory": parse_quantity(cfg.memory),
            "ephemeral-storage": parse_quantity(storage),
            "pods": Fraction(cfg.pods),
        }
        self.node = NodeContext(
            name=cfg.name,
            host_ip=cfg.address,
            allocatable=allocatable,
            api_host=api_host,
            api_port=api_port,
            python_bin_dir=os.path.dirname(sys.executable),
            enforce_run_as_user=cfg.enforce_run_as_user,
        )
        self.workers: dict[str, PodWorker] = {}
        self.by_name: dict[tuple[str, str], str] = {}
        self.node_uid: str | None = None
        self.node_conditions: list[Obj] = []
        self.node_info: dict[str, str] = {}
        self.stopping = asyncio.Event()
        #: When the Node status was last posted (monotonic); see `node_status_loop`.
        self.status_posted_at = -math.inf
        self.ready_event = asyncio.Event()
        self._bg: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ AgentContext

    def record_event(
        self, pod: Obj, etype: str, reason: str, message: str, container: str | None = None
    ) -> None:
        if not self.cfg.events or self.stopping.is_set():
            return
        meta = pod.get("metadata", {})
        ts = datetime.now(UTC)
        involved: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": meta.get("namespace"),
            "name": meta.get("name"),
            "uid": meta.get("uid"),
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name')}.{time.time_ns():x}",
                "namespace": meta.get("namespace"),
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": etype,
            "source": {"component": "kubelet", "host": self.cfg.name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.cfg.name,
            "firstTimestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        }

        async def send() -> None:
            with contextlib.suppress(ApiError, aiohttp.ClientError, OSError, TimeoutError):
                await self.api.request(
                    "POST", f"/api/v1/namespaces/{meta.get('namespace')}/events", body=body
                )

        self._background(send())

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ------------------------------------------------------------------ node

    async def _node_info(self) -> dict[str, str]:
        version = "v0.0.0"
        try:
            v = await self.api.get("/version")
            version = str(v.get("gitVersion") or version)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("could not read the API server version", extra={"kv": {"error": str(exc)}})
        machine_id = _read("/etc/machine-id") or uuid.uuid4().hex
        return {
            "machineID": machine_id,
            # Several agents share one machine: make the node's identity unique per node name.
            "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{machine_id}/{self.cfg.name}")),
            "bootID": _read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": os.uname().release,
            "osImage": os_image(),
            "containerRuntimeVersion": RUNTIME_VERSION,
            "kubeletVersion": version,
            "operatingSystem": "linux",
            "architecture": node_labels(self.spec)["kubernetes.io/arch"],
        }

    async def register(self) -> None:
        """Create the Node (or adopt the existing one), then report its status."""
        path = f"/api/v1/nodes/{self.cfg.name}"
        while not self.stopping.is_set():
            try:
                try:
                    node = await self.api.request("POST", "/api/v1/nodes", body=node_object(self.spec))
                    log.info("node registered", extra={"kv": {"node": self.cfg.name}})
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                    node = await self.api.get(path)
                    node = await self._reconcile_existing(node)
                self.node_uid = node["metadata"]["uid"]
                self.node_conditions = list(node.get("status", {}).get("conditions") or [])
                await self.patch_node_status(ready=True)
                return
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("node registration failed, retrying", extra={"kv": {"error": str(exc)}})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 2.0)

    async def _reconcile_existing(self, node: Obj) -> Obj:
        want = node_labels(self.spec)
        have = node.get("metadata", {}).get("labels") or {}
        changed = {k: v for k, v in want.items() if have.get(k) != v}
        if changed:
            node = await self.api.request(
                "PATCH",
                f"/api/v1/nodes/{self.cfg.name}",
                body={"metadata": {"labels": changed}},
                content_type=STRATEGIC_PATCH,
            )
        want_taints = sorted((t.key, t.value, t.effect) for t in self.spec.taints)
        have_taints = sorted(
            (t.get("key", ""), t.get("value", ""), t.get("effect", ""))
            for t in node.get("spec", {}).get("taints") or []
            if not str(t.get("key", "")).startswith("node.kubernetes.io/")
        )
        if want_taints != have_taints:
            # NodeRestriction forbids a node to change its own taints after creation.
            log.warning(
                "existing node has different taints; delete the Node to re-register with new ones",
                extra={"kv": {"node": self.cfg.name, "have": have_taints, "want": want_taints}},
            )
        log.info("node re-registered", extra={"kv": {"node": self.cfg.name}})
        return node

    async def patch_node_status(self, ready: bool, message: str = "") -> None:
        if not self.node_info:
            self.node_info = await self._node_info()
        now = datetime.now(UTC)
        status = node_status(self.spec, self.node_info, ready, now, self.node_conditions)
        if not ready:
            status["conditions"] = node_conditions(False, now, self.node_conditions, message)
        await self.api.request(
            "PATCH",
            f"/api/v1/nodes/{self.cfg.name}/status",
            body={"status": status},
            content_type=STRATEGIC_PATCH,
        )
        self.node_conditions = status["conditions"]
        self.status_posted_at = time.monotonic()

    async def node_status_loop(self) -> None:
        """Post the status every NODE_STATUS_INTERVAL, and sooner when the Node's Ready condition
        is not ours: after an API server outage the node controller may have marked it Unknown
        (checked every NODE_STATUS_CHECK, like the kubelet's 10 s node status update frequency)."""
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), NODE_STATUS_CHECK)
            if self.stopping.is_set():
                return
            if time.monotonic() - self.status_posted_at < NODE_STATUS_INTERVAL:
                try:
                    node = await self.api.get_or_none(f"/api/v1/nodes/{self.cfg.name}")
                except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.debug("node status check failed", extra={"kv": {"error": str(exc)}})
                    continue
                if node is not None and ready_condition_status(node) == "True":
                    continue
            try:
                await self.patch_node_status(ready=True)
            except ApiError as exc:
                if exc.status == 404:
                    log.warning(
                        "node object disappeared, registering again", extra={"kv": {"node": self.cfg.name}}
                    )
                    await self.register()
                else:
                    log.warning("node status update failed", extra={"kv": {"error": str(exc)}})
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("node status update failed", extra={"kv": {"error": str(exc)}})

    async def lease_loop(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.cfg.name}"
        lease: Obj | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                now = datetime.now(UTC)
                if lease is None:
                    lease = await self.api.get_or_none(path)
                if lease is None:
                    lease = await self.api.request(
                        "POST",
                        f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases",
                        body=lease_object(self.cfg.name, self.node_uid, LEASE_DURATION, now),
                    )
                else:
                    lease["spec"]["holderIdentity"] = self.cfg.name
                    lease["spec"]["leaseDurationSeconds"] = LEASE_DURATION
                    lease["spec"]["renewTime"] = micro_time(now)
                    lease = await self.api.request("PUT", path, body=lease)
                failures = 0
                delay = LEASE_RENEW_INTERVAL
            except ApiError as exc:
                lease = None  # conflict or gone: re-read
                failures += 1
                if failures > 1:
                    log.warning("lease renewal failed", extra={"kv": {"error": str(exc)}})
                delay = 0.2 if failures < 3 else 2.0
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures += 1
                log.warning("lease renewal failed", extra={"kv": {"error": str(exc)}})
                delay = 2.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    # ------------------------------------------------------------------ pods

    def find_worker(self, namespace: str, name: str) -> PodWorker | None:
        uid = self.by_name.get((namespace, name))
        return self.workers.get(uid) if uid else None

    def pod_list(self) -> list[Obj]:
        return [w.pod for w in self.workers.values()]

    def on_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        worker = self.workers.get(uid)
        if worker is None:
            if self.stopping.is_set():
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            self.by_name[(meta["namespace"], meta["name"])] = uid
            phase = pod.get("status", {}).get("phase")
            state = read_state(os.path.join(worker.dir, "state.json"))
            if phase in ("Succeeded", "Failed"):
                worker.start_passive(state)
            elif state_shows_started(state) or api_shows_started(pod):
                killed = kill_recorded_processes(state, self.memory.root if self.memory else None)
                if killed:
                    log.info(
                        "killed processes left by a previous agent",
                        extra={"kv": {"pod": pod_ref(pod), "groups": killed}},
                    )
                worker.start_recovered(state)
            else:
                log.debug("pod bound, starting", extra={"kv": {"pod": pod_ref(pod)}})
                worker.start()
        worker.update(pod)

    def on_pod_deleted(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is None:
            return
        worker.api_deleted(pod)

        async def cleanup() -> None:
            await worker.finished.wait()
            await worker.close(patience=2.0)
            self.workers.pop(uid, None)
            key = (worker.namespace, worker.name)
            if self.by_name.get(key) == uid:
                del self.by_name[key]
            await asyncio.to_thread(worker.remove_dir)

        self._background(cleanup())

    def _sync(self, pods: list[Obj]) -> None:
        seen = set()
        for pod in pods:
            seen.add(pod["metadata"]["uid"])
            self.on_pod(pod)
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                self.on_pod_deleted(worker.pod)

    def _cleanup_orphan_dirs(self, live_uids: set[str]) -> None:
        """Pod directories whose pods no longer exist: kill leftovers, remove."""
        root = os.path.join(self.state_dir, "pods")
        if not os.path.isdir(root):
            return
        for entry in os.listdir(root):
            uid = entry.rsplit("_", 1)[-1]
            if uid in live_uids:
                continue
            path = os.path.join(root, entry)
            kill_recorded_processes(
                read_state(os.path.join(path, "state.json")), self.memory.root if self.memory else None
            )
            shutil.rmtree(path, ignore_errors=True)

    async def watch_pods(self) -> None:
        selector = {"fieldSelector": f"spec.nodeName={self.cfg.name}"}
        rv: str | None = None
        first = True
        # Failures in a row, and watches that ended at once without an event (a proxy in the way)
        # or with 410 right after a list: each waits, so that none of them spins the loop.
        backoff = Backoff(first=0.5, cap=10.0)
        while not self.stopping.is_set():
            wait = 0.0
            try:
                if rv is None:
                    listing = await self.api.get("/api/v1/pods", params=selector)
                    rv = str(listing["metadata"]["resourceVersion"])
                    items = listing.get("items") or []
                    for item in items:
                        # List items carry no kind; the worker reports them as-is.
                        item.setdefault("kind", "Pod")
                    if first:
                        # Killing leftovers and removing their files may take a while: the node's
                        # lease and status loops go on meanwhile.
                        await asyncio.to_thread(
                            self._cleanup_orphan_dirs, {p["metadata"]["uid"] for p in items}
                        )
                        first = False
                    self._sync(items)
                    self.ready_event.set()
                params = {
                    **selector,
                    "resourceVersion": rv,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                }
                started, events = time.monotonic(), 0
                async for event in self.api.watch("/api/v1/pods", params):
                    events += 1
                    obj = event.get("object") or {}
                    new_rv = obj.get("metadata", {}).get("resourceVersion")
                    if new_rv:
                        rv = str(new_rv)
                    etype = event.get("type")
                    if etype in ("ADDED", "MODIFIED"):
                        self.on_pod(obj)
                    elif etype == "DELETED":
                        self.on_pod_deleted(obj)
                if events or time.monotonic() - started >= 1.0:
                    backoff.reset()
                else:
                    wait = backoff.next_wait()
            except WatchExpired:
                rv = None
                if backoff.failures:  # right after a list, or after other trouble: not at once
                    wait = backoff.next_wait()
                else:
                    backoff.next_wait()
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                if self.stopping.is_set():
                    return
                wait = backoff.next_wait()
                log.warning("pod watch failed, retrying", extra={"kv": {"error": str(exc)}})
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), wait)

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        self.tools.check_mount_namespaces()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        os.makedirs(os.path.join(self.state_dir, "pods"), exist_ok=True)
        # By default callers must hold a certificate from the cluster CA (the API server's
        # kubelet client certificate is one); "none" turns the check off.
        client_ca = self.cfg.client_ca
        if client_ca is None:
            client_ca = self.kubeconfig.ca_file
        elif client_ca.lower() == "none":
            client_ca = None
        ctx = server_ssl_context(self.cfg.tls_cert, self.cfg.tls_key, client_ca)
        runner = await start_server(
            make_app(self.find_worker, self.pod_list), self.cfg.address, self.cfg.port, ctx
        )
        try:
            await self.register()
            if self.stopping.is_set():
                return 0
            tasks = [
                asyncio.create_task(self.lease_loop()),
                asyncio.create_task(self.node_status_loop()),
                asyncio.create_task(self.watch_pods()),
            ]
            log.info(
                "node agent running",
                extra={
                    "kv": {
                        "node": self.cfg.name,
                        "port": self.cfg.port,
                        "gpus": self.cfg.gpus,
                        "memory_limits": "enforced" if self.memory is not None else "recorded",
                        "state_dir": self.state_dir,
                    }
                },
            )
            await self.stopping.wait()
            log.info("node agent stopping", extra={"kv": {"node": self.cfg.name}})
            tasks[2].cancel()
            await self.shutdown_pods()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self._mark_not_ready()
            return 0
        finally:
            for w in list(self.workers.values()):
                await w.close()
            for t in list(self._bg):
                t.cancel()
            if self.memory is not None:
                self.memory.close()
            await runner.cleanup()
            await self.api.close()

    async def _mark_not_ready(self, within: float = 6.0) -> None:
        """Say the node is NotReady on the way out, retrying for `within` seconds: a loaded API
        server may take longer than one try, and the node then went Unknown through the node
        controller instead. (The stack's stop waits 15 s before SIGKILL: the pods' stop, usually
        far less than its bound, then this.) A refusal (4xx) is not tried again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                left = max(0.5, deadline - loop.time())
                await asyncio.wait_for(
                    self.patch_node_status(ready=False, message="node agent stopped"), left
                )
                return
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                if (isinstance(exc, ApiError) and exc.refused) or loop.time() + 0.5 >= deadline:
                    log.warning("could not mark the node NotReady", extra={"kv": {"error": str(exc)}})
                    return
                await asyncio.sleep(0.5)

    async def shutdown_pods(self) -> None:
        """Stop every pod's processes within the shutdown grace period and report them."""
        grace = self.cfg.shutdown_grace
        active = [w for w in self.workers.values() if not w.finished.is_set()]
        for w in active:
            w.request_stop("NodeShutdown", min(grace, termination_grace_seconds(w.pod)))
        if active:
            await wait_any(*(w.finished.wait() for w in active), timeout=grace + 8.0, every=True)
