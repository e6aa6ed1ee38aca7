"""One pod's lifecycle on the node: setup, init containers, containers, restarts, termination.

A `PodWorker` is a handful of asyncio tasks (the lifecycle, a status writer, a deadline
watch, a token refresher); container processes are `runtime.ContainerProcess`es.
The lifecycle mutates a `status.PodSnapshot`; every mutation marks the status dirty, and
the writer patches `pods/status` only when the computed status differs from what it
last wrote (coalescing bursts into one write), or when someone else has since rewritten
the node's fields in the API's copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp

from . import podspec
from .cgroup import MemoryCgroups, cgroup_name, memory_limit_bytes
from .gpu import GpuAllocator, visible_devices_env
from .kubeapi import STRATEGIC_PATCH, ApiError, KubeClient
from .leftovers import kill_cgroup
from .logs import last_lines_text
from .mounts import Tools, launch_argv, materialize_volume, resolve_executable
from .podspec import ContainerPlan, Fetched, NodeContext, Obj, SetupError, VolumePlan
from .runtime import ContainerProcess, Notifier, proc_start_ticks, wait_any
from .status import (
    FALLBACK_LOG_LINES,
    NODE_SHUTDOWN_REASON,
    ContainerSnapshot,
    Kind,
    PodSnapshot,
    Terminated,
    compute_status,
    parse_rfc3339,
    reported_view,
    status_patch,
    tail_for_message,
    termination_message,
)

log = logging.getLogger("dsjobs.node.pod")

# A container that ran this long before failing starts its back-off from scratch (kubelet: 10 min).
BACKOFF_RESET_SECONDS = 600.0


class AgentContext(Protocol):
    api: KubeClient
    node: NodeContext
    tools: Tools
    gpus: GpuAllocator
    gpu_released: Notifier
    #: Memory cgroups for containers' limits.memory; None: limits are recorded only.
    memory: MemoryCgroups | None
    state_dir: str
    restart_backoff: float
    max_restart_backoff: float

    def record_event(
        self, pod: Obj, etype: str, reason: str, message: str, container: str | None = None
    ) -> None: ...


def dir_usage(path: str) -> int:
    """Bytes a directory tree occupies on disk, as `du` counts them (each inode once, symlinks
    not followed); entries that vanish meanwhile are skipped."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(current) as entries:
                    stack.extend(e.path for e in entries)
            except OSError:
                continue
    return total


def now() -> datetime:
    return datetime.now(UTC)


def pod_dir_name(namespace: str, name: str, uid: str) -> str:
    """`<ns>_<name>_<uid>` like /var/log/pods; the name is shortened to fit a file name (255)."""
    room = 255 - len(namespace) - len(uid) - 2
    return f"{namespace}_{name[:room]}_{uid}"


def pod_ref(pod: Obj) -> str:
    meta = pod.get("metadata", {})
    return f"{meta.get('namespace')}/{meta.get('name')}"


@dataclass
class StopRequest:
    reason: str  # "Deleted" | "DeadlineExceeded" | "NodeShutdown" | "Gone" | "Evicted"
    deadline: float
    message: str = ""


#: How often the kubelet-like local storage check runs (the kubelet's housekeeping is 10 s; the
#: dev cluster checks sooner so that tests wait less, not so often that it costs every pod much CPU).
STORAGE_CHECK_SECONDS = 5.0
STORAGE_CHECK_BACKOFF = 10.0
#: The kubelet evicts a pod over a local storage limit with this grace period.
EVICTION_GRACE_SECONDS = 1
#: The shortest grace period a pod's containers get, whatever asked for less: the kubelet's pod
#: worker ends calculateEffectiveGracePeriod (pkg/kubelet/pod_workers.go) with "no matter what,
#: we always supply a grace period of 1", and passes the result to killContainer as an override
#: (which wins over killContainer's own minimumGracePeriodInSeconds = 2). A force deletion
#: (grace 0) thus still gives SIGTERM handlers a second.
MIN_GRACE_SECONDS = 1
#: Re-sending a status that someone else overwrote is spaced by this much, as the kubelet's status
#: manager re-checks the API's copy on its periodic sync (10 s): a writer that insists on another
#: value (the node lifecycle controller, while it thinks the node is down) gets no tight loop.
RECONCILE_SECONDS = 10.0
#: How many of its own writes a worker remembers, to know late echoes of them from others' writes.
REPORTED_HISTORY = 16
#: Cap of the back-off between attempts of the final DELETE.
DELETE_RETRY_MAX_SECONDS = 10.0


class PodWorker:
    def __init__(self, ctx: AgentContext, pod: Obj) -> None:
        self.ctx = ctx
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.dir = os.path.join(ctx.state_dir, "pods", pod_dir_name(self.namespace, self.name, self.uid))
        self.snap = PodSnapshot(host_ip=ctx.node.host_ip)
        for c in podspec.init_containers(pod):
            kind: Kind = "sidecar" if podspec.is_sidecar(c) else "init"
            self.snap.init.append(self._new_snapshot(c, kind, "PodInitializing"))
        has_init = bool(self.snap.init)
        for c in podspec.main_containers(pod):
            self.snap.main.append(
                self._new_snapshot(c, "main", "PodInitializing" if has_init else "ContainerCreating")
            )
        self.procs: dict[str, ContainerProcess] = {}
        self.proc_meta: dict[str, tuple[int, int | None]] = {}
        self.log_notifiers: dict[str, Notifier] = {c.name: Notifier() for c in self.snap.all()}
        self.fetched = Fetched()
        self.volumes: list[VolumePlan] = []
        self.stop: StopRequest | None = None
        self._stop_event = asyncio.Event()
        self._kill_poke = Notifier()
        self._proc_exit = Notifier()
        self._pod_changed = Notifier()
        self._started: dict[str, asyncio.Event] = {c.name: asyncio.Event() for c in self.snap.all()}
        self._sidecars_stopping = False
        self._sidecars_stop_event = asyncio.Event()
        self._dirty = asyncio.Event()
        self._persist_failing = False
        self._written = Notifier()
        self._last_written: Obj | None = None
        self._reported: deque[Obj] = deque(maxlen=REPORTED_HISTORY)
        # The status the pod came with is no one else's rewrite: until the watch echoes this
        # worker's first write, the API's copy still shows it.
        self._reported.append(reported_view(pod.get("status") or {}))
        self._reconciled_at = float("-inf")
        self._reconcile_timer: asyncio.TimerHandle | None = None
        self._rejected: Obj | None = None
        self._writing = False
        self._in_flight = 0  # status PATCHes and the final DELETE awaiting their answer
        self._tasks: list[asyncio.Task[Any]] = []
        self._kill_task: asyncio.Task[None] | None = None
        self._delete_requested = False
        self.finished = asyncio.Event()
        self.gone = False
        self.passive = False

    def _new_snapshot(self, c: Obj, kind: Kind, reason: str) -> ContainerSnapshot:
        return ContainerSnapshot(
            name=c["name"],
            image=str(c.get("image", "")),
            kind=kind,
            waiting_reason=reason,
            resources=dict(c.get("resources") or {}) or None,
        )

    # ------------------------------------------------------------------ entry points

    def start(self) -> None:
        os.makedirs(os.path.join(self.dir, "termination"), exist_ok=True)
        start = self.pod.get("status", {}).get("startTime")
        self.snap.start_time = parse_rfc3339(start) if start else now()
        self._persist()
        self._spawn(self._writer())
        self._spawn(self._deadline_watch())
        self._spawn(self._storage_watch())
        self._spawn(self._lifecycle())
        self._changed()

    def start_passive(self, state: Obj | None) -> None:
        """A pod that is already terminal: nothing to run; logs to serve, deletion to acknowledge."""
        self.passive = True
        self._restore(state)
        self.finished.set()

    def start_recovered(self, state: Obj | None) -> None:
        """The agent restarted while this pod ran: its processes are lost. Report it Failed."""
        self._restore(state)
        lost = [c for c in self.snap.all() if c.state == "running"]
        if (
            not lost
            and not self.snap.terminal_phase
            and self.snap.main
            and all(c.state == "terminated" for c in self.snap.main)
        ):
            # It had finished; only the final report was missing.
            self.snap.terminal_phase = "Succeeded" if all(c.succeeded() for c in self.snap.main) else "Failed"
        for c in lost:
            c.state = "terminated"
            c.ready = False
            c.terminated = Terminated(
                exit_code=137,
                reason="ContainerStatusUnknown",
                started_at=c.running_since,
                finished_at=now(),
                message="The node agent restarted and lost the container's process",
                container_id=c.container_id,
            )
        if not self.snap.terminal_phase:
            self.snap.terminal_phase = "Failed"
            self.snap.reason = "NodeAgentRestarted"
            self.snap.message = (
                "The node agent restarted while the pod was running; its processes were stopped"
            )
        self.snap.sandbox_ready = False
        self._persist()
        log.info("pod lost by a restarted agent, reporting Failed", extra={"kv": {"pod": pod_ref(self.pod)}})
        self._spawn(self._writer())
        self._changed()

        async def done() -> None:
            await self.flush()
            self.finished.set()
            if self.pod["metadata"].get("deletionTimestamp"):
                await self._delete_from_api()

        self._spawn(done())

    def update(self, pod: Obj) -> None:
        """A newer version of the pod from the watch."""
        self.pod = pod
        self._pod_changed.notify()
        if pod["metadata"].get("deletionTimestamp"):
            if self.finished.is_set():
                if not self._delete_requested:
                    self._spawn(self._delete_from_api())
            else:
                self.request_stop("Deleted", podspec.termination_grace_seconds(pod))
        if not self.passive:
            # Readiness gates and generation live in the pod: recompute (no write if unchanged).
            self._changed()

    def api_deleted(self, pod: Obj | None = None) -> None:
        """The API object is gone (e.g. force deletion): stop writing, stop the containers.

        `pod` is the object as last seen (the watch's DELETED event carries it). Its deletion
        grace period applies, else the spec's, as the kubelet's pod worker computes it for a
        pod removed from the API: a force deletion is written with deletionGracePeriodSeconds 0
        before the object goes, and becomes MIN_GRACE_SECONDS.
        """
        self.gone = True
        if not self.finished.is_set():
            self.request_stop("Gone", podspec.termination_grace_seconds(pod or self.pod))

    def request_stop(self, reason: str, grace: float, message: str = "") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(MIN_GRACE_SECONDS, grace)
        if self.stop is None:
            self.stop = StopRequest(reason, deadline, message)
            self._stop_event.set()
            if self.procs:
                log.info(
                    "stopping pod", extra={"kv": {"pod": pod_ref(self.pod), "reason": reason, "grace": grace}}
                )
            self._kill_task = asyncio.create_task(self._kill_all())
        elif deadline < self.stop.deadline:
            # A second deletion with a shorter grace period (e.g. --force) wins.
            self.stop.deadline = deadline
            if reason == "Gone":
                self.stop.reason = reason
        self._kill_poke.notify()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "pod worker task failed",
                exc_info=task.exception(),
                extra={"kv": {"pod": pod_ref(self.pod)}},
            )

    async def close(self, patience: float = 0.0) -> None:
        """Stop the worker's tasks. `patience`: how long a status write or the final DELETE whose
        answer is on its way may still finish (the pod's DELETED event can come before the
        DELETE's own answer): cancelled, the request is aborted, which the API server logs as an
        error ("Timeout or abort while handling")."""
        if self._reconcile_timer is not None:
            self._reconcile_timer.cancel()
            self._reconcile_timer = None
        loop = asyncio.get_running_loop()
        until = loop.time() + patience
        while self._in_flight and loop.time() < until:
            await asyncio.sleep(0.02)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _request(self, method: str, path: str, **kwargs: Any) -> Obj:
        """A write whose answer `close` waits for a moment (counted while in flight)."""
        self._in_flight += 1
        try:
            return await self.ctx.api.request(method, path, **kwargs)
        finally:
            self._in_flight -= 1

    # ------------------------------------------------------------------ status

    def _changed(self) -> None:
        self._dirty.set()

    def _previous_conditions(self) -> list[Obj]:
        merged = {c.get("type"): c for c in self.pod.get("status", {}).get("conditions") or []}
        if self._last_written:
            for c in self._last_written.get("conditions", []):
                merged[c.get("type")] = c
        return list(merged.values())

    def current_status(self) -> Obj:
        return compute_status(self.pod, self.snap, now(), self._previous_conditions())

    async def _writer(self) -> None:
        delay = 0.2
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self.gone:
                self._written.notify()
                continue
            status = self.current_status()
            reconcile = status == self._last_written
            if reconcile and not self._api_differs():
                self._written.notify()
                continue
            self._writing = True
            try:
                await self._request(
                    "PATCH",
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
                    body=status_patch(status, self.uid),
                    content_type=STRATEGIC_PATCH,
                )
                self._last_written = status
                self._reported.append(reported_view(status))
                if reconcile:
                    self._reconciled_at = asyncio.get_running_loop().time()
                delay = 0.2
            except ApiError as exc:
                if exc.status == 404:
                    self.gone = True
                elif exc.status in (409, 422) and await self._replaced():
                    # The uid in the patch refused it: the name belongs to a new pod now.
                    log.info(
                        "pod replaced by another of the same name, no more status writes",
                        extra={"kv": {"pod": pod_ref(self.pod), "uid": self.uid}},
                    )
                    self.gone = True
                elif 400 <= exc.status < 500 and exc.status not in (409, 429):
                    # Invalid or forbidden: retrying the same status cannot help; the next
                    # change writes again.
                    log.error(
                        "pod status rejected", extra={"kv": {"pod": pod_ref(self.pod), "error": str(exc)}}
                    )
                    self._rejected = status
                else:
                    log.warning(
                        "pod status write failed", extra={"kv": {"pod": pod_ref(self.pod), "error": str(exc)}}
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    self._dirty.set()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning(
                    "pod status write failed", extra={"kv": {"pod": pod_ref(self.pod), "error": str(exc)}}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                self._dirty.set()
            finally:
                self._writing = False
            self._written.notify()

    def _api_differs(self) -> bool:
        """Whether the API's copy of the pod shows, in the fields the node owns, something this
        worker never wrote: someone else rewrote them (the node lifecycle controller marks the
        pods of a node it thinks down Ready=False). The kubelet's status manager then sends its
        own status again (needsReconcile); late echoes of this worker's earlier writes are no
        reason to. At most once per RECONCILE_SECONDS; a later one is scheduled."""
        if reported_view(self.pod.get("status") or {}) in self._reported:
            return False
        loop = asyncio.get_running_loop()
        wait = self._reconciled_at + RECONCILE_SECONDS - loop.time()
        if wait <= 0:
            return True
        if self._reconcile_timer is None:
            self._reconcile_timer = loop.call_later(wait, self._reconcile_due)
        return False

    def _reconcile_due(self) -> None:
        self._reconcile_timer = None
        self._changed()

    async def _replaced(self) -> bool:
        """Whether the API's pod of this name is another instance than this worker's, or none."""
        try:
            pod = await self.ctx.api.get_or_none(f"/api/v1/namespaces/{self.namespace}/pods/{self.name}")
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError):
            return False
        return pod is None or pod.get("metadata", {}).get("uid") != self.uid

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until the current status has been written (or the pod is gone)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            if self.gone:
                return
            current = self.current_status()
            if (
                not self._dirty.is_set()
                and not self._writing
                and current in (self._last_written, self._rejected)
            ):
                return
            self._changed()
            await self._written.wait(min(1.0, max(0.01, end - loop.time())))

    # ------------------------------------------------------------------ persistence

    def _state_path(self) -> str:
        return os.path.join(self.dir, "state.json")

    def _persist(self) -> None:
        containers: dict[str, Obj] = {}
        for c in self.snap.all():
            pid, ticks = self.proc_meta.get(c.name, (None, None))
            containers[c.name] = {
                "state": c.state,
                "pid": pid if c.state == "running" else None,
                "start_ticks": ticks if c.state == "running" else None,
                "running_since": c.running_since.isoformat() if c.running_since else None,
                "container_id": c.container_id,
                "restart_count": c.restart_count,
                "terminated": c.terminated.to_json() if c.terminated else None,
                "last_terminated": c.last_terminated.to_json() if c.last_terminated else None,
            }
        data = {
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "start_time": self.snap.start_time.isoformat() if self.snap.start_time else None,
            "terminal_phase": self.snap.terminal_phase,
            "reason": self.snap.reason,
            "message": self.snap.message,
            "containers": containers,
        }
        tmp = self._state_path() + ".tmp"
        try:
            os.makedirs(self.dir, exist_ok=True)
            with open(tmp, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self._state_path())
        except OSError as exc:
            # The state is a checkpoint for an agent restart; the pod's life goes on without it,
            # as the kubelet's does when its disk is full (a job filled it, most likely).
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._persist_failing:
                log.warning(
                    "cannot save the pod's state on the node",
                    extra={"kv": {"pod": pod_ref(self.pod), "error": str(exc)}},
                )
            self._persist_failing = True
            return
        self._persist_failing = False

    def _restore(self, state: Obj | None) -> None:
        """Rebuild the snapshot from state.json, or from the API's status if there is none."""
        if state:
            if state.get("start_time"):
                self.snap.start_time = datetime.fromisoformat(state["start_time"])
            self.snap.terminal_phase = state.get("terminal_phase")
            self.snap.reason = state.get("reason")
            self.snap.message = state.get("message")
            for c in self.snap.all():
                rec = (state.get("containers") or {}).get(c.name)
                if not rec:
                    continue
                c.restart_count = int(rec.get("restart_count") or 0)
                c.container_id = rec.get("container_id")
                if rec.get("running_since"):
                    c.running_since = datetime.fromisoformat(rec["running_since"])
                if rec.get("last_terminated"):
                    c.last_terminated = Terminated.from_json(rec["last_terminated"])
                if rec.get("terminated"):
                    c.terminated = Terminated.from_json(rec["terminated"])
                st = rec.get("state")
                if st in ("waiting", "running", "terminated"):
                    c.state = st
                    c.waiting_reason = None if st != "waiting" else c.waiting_reason
            return
        start = self.pod.get("status", {}).get("startTime")
        if start:
            self.snap.start_time = parse_rfc3339(start)
        api_statuses = {
            s.get("name"): s
            for s in (self.pod.get("status", {}).get("initContainerStatuses") or [])
            + (self.pod.get("status", {}).get("containerStatuses") or [])
        }
        for c in self.snap.all():
            s = api_statuses.get(c.name)
            if not s:
                continue
            c.restart_count = int(s.get("restartCount") or 0)
            state = s.get("state") or {}
            if "running" in state:
                c.state = "running"
                c.running_since = (
                    parse_rfc3339(state["running"]["startedAt"])
                    if state["running"].get("startedAt")
                    else None
                )
                c.container_id = s.get("containerID")
            elif "terminated" in state:
                t = state["terminated"]
                c.state = "terminated"
                c.terminated = Terminated(
                    exit_code=int(t.get("exitCode", 0)),
                    reason=str(t.get("reason") or ""),
                    finished_at=parse_rfc3339(t["finishedAt"]) if t.get("finishedAt") else now(),
                    started_at=parse_rfc3339(t["startedAt"]) if t.get("startedAt") else None,
                    message=t.get("message"),
                    container_id=t.get("containerID"),
                )

    # ------------------------------------------------------------------ lifecycle

    async def _lifecycle(self) -> None:
        try:
            if self._admit() and await self._setup():
                await self._run_containers()
        finally:
            await self._finish()

    def _admit(self) -> bool:
        """The kubelet's resource admission, for the one resource we can get wrong: GPUs."""
        need = max(
            sum(podspec.gpu_limit(c) for c in podspec.main_containers(self.pod))
            + sum(podspec.gpu_limit(c) for c in podspec.init_containers(self.pod) if podspec.is_sidecar(c)),
            max([podspec.gpu_limit(c) for c in podspec.init_containers(self.pod)] or [0]),
        )
        if need <= self.ctx.gpus.count:
            return True
        self.snap.terminal_phase = "Failed"
        self.snap.reason = "OutOfnvidia.com/gpu"
        self.snap.message = (
            f"Pod was rejected: Node didn't have enough resource: {podspec.GPU_RESOURCE}, "
            f"requested: {need}, capacity: {self.ctx.gpus.count}"
        )
        return False

    async def _wait_stop(self, timeout: float, sidecar: bool = False) -> bool:
        """Sleep up to timeout; True if a stop was requested meanwhile (for sidecars: or theirs)."""
        waits = [self._stop_event.wait()]
        if sidecar:
            waits.append(self._sidecars_stop_event.wait())
        await wait_any(*waits, timeout=timeout)
        return self._stopped(sidecar)

    def _stopped(self, sidecar: bool) -> bool:
        return self.stop is not None or (sidecar and self._sidecars_stopping)

    async def _fetch(self) -> Fetched:
        req = podspec.requirements(self.pod)
        api = self.ctx.api
        ns = self.namespace
        fetched = Fetched()

        async def get_obj(kind: str, name: str) -> tuple[str, str, Obj | None]:
            try:
                return kind, name, await api.get(f"/api/v1/namespaces/{ns}/{kind}/{name}")
            except ApiError as exc:
                if exc.status == 404:
                    return kind, name, None
                if exc.status == 403:
                    # The node authorizer learns of the pod->object edge from its own watch;
                    # right after binding it may not know yet.
                    raise SetupError(
                        "FailedMount", f"{kind} {ns}/{name}: {exc.message or 'forbidden'}"
                    ) from exc
                raise

        async def pvc_path(claim: str) -> tuple[str, str]:
            pvc = await api.get_or_none(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
            if pvc is None:
                raise SetupError("FailedMount", f'persistentvolumeclaim "{claim}" not found')
            if claim in req.ephemeral_pvcs:
                problem = podspec.ephemeral_claim_problem(pvc, ns, self.name, self.uid)
                if problem is not None:
                    raise SetupError("FailedMount", problem)
            volume = pvc.get("spec", {}).get("volumeName")
            if not volume or pvc.get("status", {}).get("phase") != "Bound":
                raise SetupError("FailedMount", f'persistentvolumeclaim "{claim}" is not bound')
            pv = await api.get_or_none(f"/api/v1/persistentvolumes/{volume}")
            if pv is None:
                raise SetupError("FailedMount", f'persistentvolume "{volume}" not found')
            path = podspec.pv_host_path(pv)
            if path is None:
                raise SetupError(
                    "FailedMount",
                    f'persistentvolume "{volume}" is neither local nor hostPath: the process node cannot mount it',
                )
            return claim, path

        async def token(t: podspec.TokenRequirement) -> tuple[str, str]:
            body = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [t.audience] if t.audience else [],
                    "expirationSeconds": t.expiration_seconds,
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
                },
            }
            try:
                resp = await api.request(
                    "POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{t.service_account}/token", body=body
                )
            except ApiError as exc:
                raise SetupError(
                    "FailedMount", f"service account token for {t.service_account}: {exc.message}"
                ) from exc
            return t.key, str(resp.get("status", {}).get("token", ""))

        jobs: list[Awaitable[Any]] = []
        jobs += [get_obj("configmaps", n) for n in sorted(req.configmaps)]
        jobs += [get_obj("secrets", n) for n in sorted(req.secrets)]
        results = await asyncio.gather(
            *jobs, *[pvc_path(c) for c in sorted(req.pvcs)], *[token(t) for t in req.tokens]
        )
        n_objs = len(jobs)
        for kind, name, obj in results[:n_objs]:
            (fetched.configmaps if kind == "configmaps" else fetched.secrets)[name] = obj
        for key, value in results[n_objs : n_objs + len(req.pvcs)]:
            fetched.pvc_paths[key] = value
        for key, value in results[n_objs + len(req.pvcs) :]:
            fetched.tokens[key] = value
        return fetched

    def _set_waiting(self, names: list[str], reason: str, message: str | None) -> None:
        for c in self.snap.all():
            if c.name in names and c.state == "waiting":
                c.waiting_reason = reason
                c.waiting_message = message
        self._changed()

    async def _setup(self) -> bool:
        """Fetch referenced objects and write the volumes; retried until it works or the pod stops."""
        delay = 0.1
        warned = ""
        while self.stop is None:
            try:
                self.fetched = await self._fetch()
                self.volumes = podspec.plan_volumes(self.pod, self.fetched, self.dir, self.ctx.node)
                for vol in self.volumes:
                    materialize_volume(vol)
                self.snap.sandbox_ready = True
                if any(v.kind == "projected" for v in self.volumes) and self.fetched.tokens:
                    self._spawn(self._refresh_tokens())
                self._changed()
                return True
            except SetupError as exc:
                message = exc.message
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                message = f"setting up the pod: {exc}"
            names = [c.name for c in self.snap.all()]
            self._set_waiting(names, "ContainerCreating", message)
            if message != warned and delay >= 1.0:
                # Short first retries absorb the authorizer's lag without noise.
                self.ctx.record_event(self.pod, "Warning", "FailedMount", message)
                log.warning(
                    "pod setup failed, retrying", extra={"kv": {"pod": pod_ref(self.pod), "error": message}}
                )
                warned = message
            if await self._wait_stop(delay):
                return False
            delay = min(delay * 2, 8.0)
        return False

    async def _refresh_tokens(self) -> None:
        """Rewrite projected token files at 80% of their lifetime, like the kubelet."""
        tokens = podspec.requirements(self.pod).tokens
        if not tokens:
            return
        period = 0.8 * min(t.expiration_seconds for t in tokens)
        while not await self._wait_stop(period):
            try:
                fetched = await self._fetch()
                volumes = podspec.plan_volumes(self.pod, fetched, self.dir, self.ctx.node)
                for vol in volumes:
                    if vol.kind == "projected":
                        materialize_volume(vol)
                self.fetched = fetched
            except (SetupError, ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning(
                    "token refresh failed", extra={"kv": {"pod": pod_ref(self.pod), "error": str(exc)}}
                )
                period = 30.0

    async def _run_containers(self) -> None:
        policy = podspec.restart_policy(self.pod)
        init_policy = "Never" if policy == "Never" else "OnFailure"
        for c in podspec.init_containers(self.pod):
            if self.stop is not None:
                return
            if podspec.is_sidecar(c):
                self._spawn(self._supervise(c, "Always"))
                await wait_any(self._started[c["name"]].wait(), self._stop_event.wait())
                continue
            term = await self._supervise(c, init_policy)
            if self.stop is not None:
                return
            if term is None or term.exit_code != 0:
                # The pod has failed; as the kubelet kills every container of a terminal pod,
                # the sidecars started before this init container must not outlive it.
                await self._stop_sidecars()
                self.snap.terminal_phase = "Failed"
                return
        if self.stop is not None:
            return
        for snap in self.snap.main:
            snap.waiting_reason = "ContainerCreating"
        mains = [asyncio.ensure_future(self._supervise(c, policy)) for c in podspec.main_containers(self.pod)]
        results = await asyncio.gather(*mains)
        if self.stop is not None:
            return
        await self._stop_sidecars()
        ok = all(r is not None and r.exit_code == 0 for r in results)
        self.snap.terminal_phase = "Succeeded" if ok else "Failed"

    async def _stop_sidecars(self) -> None:
        self._sidecars_stopping = True
        self._sidecars_stop_event.set()
        sidecars = [c.name for c in reversed(self.snap.init) if c.kind == "sidecar"]
        if not sidecars:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + podspec.termination_grace_seconds(self.pod)
        await self._terminate_group(sidecars, lambda: deadline)
        for name in sidecars:
            proc = self.procs.get(name)
            if proc is not None:
                proc.signal(signal.SIGKILL)
        while any(n in self.procs for n in sidecars):
            await self._proc_exit.wait(0.5)

    async def _terminate_group(self, names: list[str], deadline: Callable[[], float]) -> None:
        loop = asyncio.get_running_loop()
        for name in names:
            proc = self.procs.get(name)
            if proc is not None:
                self.ctx.record_event(self.pod, "Normal", "Killing", f"Stopping container {name}", name)
                proc.signal(signal.SIGTERM)
        while any(n in self.procs for n in names):
            remaining = deadline() - loop.time()
            if remaining <= 0:
                return
            await wait_any(
                self._proc_exit.wait(min(remaining, 1.0)), self._kill_poke.wait(min(remaining, 1.0))
            )

    async def _kill_all(self) -> None:
        """SIGTERM regular containers, then sidecars (reverse order); SIGKILL at the grace deadline."""
        assert self.stop is not None
        stop = self.stop
        regular = [c.name for c in self.snap.all() if c.kind != "sidecar"]
        sidecars = [c.name for c in reversed(self.snap.init) if c.kind == "sidecar"]
        await self._terminate_group(regular, lambda: stop.deadline)
        await self._terminate_group(sidecars, lambda: stop.deadline)
        while self.procs:
            for proc in list(self.procs.values()):
                proc.signal(signal.SIGKILL)
            await self._proc_exit.wait(0.5)

    async def _supervise(self, c: Obj, policy: str) -> Terminated | None:
        """Run one container, restarting per policy. Returns the last termination."""
        name = c["name"]
        snap = self.snap.get(name)
        assert snap is not None
        backoff = 0.0
        last: Terminated | None = None
        loop = asyncio.get_running_loop()
        sidecar = snap.kind == "sidecar"
        while True:
            if self._stopped(sidecar):
                return last
            started = loop.time()
            term = await self._run_once(c, snap)
            if term is None:
                return last
            last = term
            if self._stopped(sidecar):
                return last
            restart = policy == "Always" or (policy == "OnFailure" and term.exit_code != 0)
            if not restart:
                return last
            if loop.time() - started > BACKOFF_RESET_SECONDS:
                backoff = 0.0
            if backoff > 0:
                snap.state = "waiting"
                snap.last_terminated = term
                snap.terminated = None
                snap.waiting_reason = "CrashLoopBackOff"
                snap.waiting_message = (
                    f"back-off {int(backoff)}s restarting failed container={name} "
                    f"pod={self.name}_{self.namespace}({self.uid})"
                )
                self._changed()
                self.ctx.record_event(
                    self.pod, "Warning", "BackOff", "Back-off restarting failed container", name
                )
                if await self._wait_stop(backoff, sidecar):
                    return last
            # The kubelet restarts at once the first time, then waits 10s, 20s, 40s... up to the cap.
            backoff = (
                self.ctx.restart_backoff if backoff == 0 else min(backoff * 2, self.ctx.max_restart_backoff)
            )
            snap.restart_count += 1
            snap.last_terminated = term

    def _termination_file(self, name: str) -> str:
        return os.path.join(self.dir, "termination", name)

    def log_path(self, name: str, previous: bool = False) -> str:
        return os.path.join(self.dir, f"{name}.previous.log" if previous else f"{name}.log")

    def _start_error(self, snap: ContainerSnapshot, message: str, reason: str = "StartError") -> Terminated:
        t = now()
        term = Terminated(exit_code=128, reason=reason, finished_at=t, started_at=t, message=message)
        snap.state = "terminated"
        snap.terminated = term
        snap.ready = False
        self._persist()
        self._changed()
        self.ctx.record_event(self.pod, "Warning", "Failed", f"Error: {message}", snap.name)
        return term

    async def _plan(self, c: Obj, snap: ContainerSnapshot) -> ContainerPlan | None:
        """The container's plan; CreateContainerConfigError waits (refetching) like the kubelet,
        and so does an image that cannot be pulled (ErrImagePull, then ImagePullBackOff)."""
        image = str(c.get("image", ""))
        failure = podspec.pull_failure(image)
        if failure is not None:
            await self._fail_pulls(c["name"], snap, image, failure)
            return None
        delay = 1.0
        while self.stop is None:
            try:
                return podspec.plan_container(
                    self.pod, c, self.fetched, self.volumes, self.ctx.node, self._termination_file(c["name"])
                )
            except SetupError as exc:
                snap.state = "waiting"
                snap.waiting_reason = exc.reason
                snap.waiting_message = exc.message
                self._changed()
                self.ctx.record_event(self.pod, "Warning", "Failed", f"Error: {exc.message}", c["name"])
            if await self._wait_stop(delay):
                return None
            delay = min(delay * 2, 8.0)
            with contextlib.suppress(SetupError, ApiError, aiohttp.ClientError, OSError, TimeoutError):
                self.fetched = await self._fetch()
        return None

    async def _fail_pulls(self, name: str, snap: ContainerSnapshot, image: str, failure: str) -> None:
        """Try to pull `image` until the pod stops, as the kubelet does: each try fails
        (ErrImagePull), and the container waits in ImagePullBackOff between tries (10 s, doubled
        up to 300 s, as the kubelet's back-off)."""
        sidecar = snap.kind == "sidecar"
        delay = 10.0
        while not self._stopped(sidecar):
            self.ctx.record_event(self.pod, "Normal", "Pulling", f'Pulling image "{image}"', name)
            self.ctx.record_event(
                self.pod, "Warning", "Failed", f'Failed to pull image "{image}": {failure}', name
            )
            self.ctx.record_event(self.pod, "Warning", "Failed", "Error: ErrImagePull", name)
            snap.state = "waiting"
            snap.waiting_reason = "ErrImagePull"
            snap.waiting_message = failure
            self._changed()
            if await self._wait_stop(1.0, sidecar):
                return
            snap.waiting_reason = "ImagePullBackOff"
            snap.waiting_message = f'Back-off pulling image "{image}"'
            self._changed()
            self.ctx.record_event(self.pod, "Normal", "BackOff", f'Back-off pulling image "{image}"', name)
            self.ctx.record_event(self.pod, "Warning", "Failed", "Error: ImagePullBackOff", name)
            if await self._wait_stop(delay, sidecar):
                return
            delay = min(delay * 2, 300.0)

    async def _allocate_gpus(self, snap: ContainerSnapshot, n: int) -> tuple[int, ...] | None:
        owner = f"{self.uid}/{snap.name}"
        while self.stop is None:
            got = self.ctx.gpus.try_allocate(owner, n)
            if got is not None:
                return got
            snap.waiting_reason = "ContainerCreating"
            snap.waiting_message = f"waiting for {n} free {podspec.GPU_RESOURCE} (held by other containers)"
            self._changed()
            await wait_any(self.ctx.gpu_released.wait(5.0), self._stop_event.wait())
        return None

    async def _run_once(self, c: Obj, snap: ContainerSnapshot) -> Terminated | None:
        """Start one instance and wait for it. None if the pod stopped before it started."""
        name = c["name"]
        plan = await self._plan(c, snap)
        if plan is None:
            return None
        if plan.start_error:
            return self._start_error(snap, plan.start_error)
        env = plan.env_dict()
        exe = resolve_executable(plan.argv[0], env.get("PATH", ""))
        if exe is None:
            return self._start_error(snap, f'exec: "{plan.argv[0]}": executable file not found in $PATH')
        gpus: tuple[int, ...] = ()
        if plan.gpus:
            got = await self._allocate_gpus(snap, plan.gpus)
            if got is None:
                return None
            gpus = got
            env.update(visible_devices_env(gpus))
        if self._stopped(snap.kind == "sidecar"):
            # Nothing awaited from here to the spawn: a stop cannot slip in between.
            self._release_gpus(name)
            return None
        term_file = self._termination_file(name)
        with open(term_file, "wb"):
            pass  # a fresh, empty message file for this instance
        log_file = self.log_path(name)
        if os.path.exists(log_file):
            os.replace(log_file, self.log_path(name, previous=True))
        cgroups: MemoryCgroups | None = self.ctx.memory
        limit = memory_limit_bytes(plan.resources)
        cgroup = (
            cgroups.create(cgroup_name(self.uid, name, snap.restart_count), limit)
            if cgroups and limit
            else None
        )
        joins = cgroups.companions(cgroup) if cgroups is not None and cgroup is not None else []
        argv = launch_argv(plan, self.ctx.tools, joins)
        try:
            proc = ContainerProcess.spawn(argv, env, log_file, self.log_notifiers[name])
        except OSError as exc:
            self._release_gpus(name)
            if cgroups is not None and cgroup is not None:
                cgroups.remove_instance(cgroup)
            return self._start_error(snap, f"starting the process: {exc}")
        started_at = now()
        self.procs[name] = proc
        self.proc_meta[name] = (proc.pid, proc_start_ticks(proc.pid))
        snap.state = "running"
        snap.running_since = started_at
        snap.container_id = f"process://{proc.pid}"
        snap.terminated = None
        snap.waiting_reason = None
        snap.waiting_message = None
        # No probes are run: a running container is ready.
        snap.ready = True
        self._persist()
        self._changed()
        self._started[name].set()
        log.debug(
            "container started", extra={"kv": {"pod": pod_ref(self.pod), "container": name, "pid": proc.pid}}
        )
        self.ctx.record_event(self.pod, "Normal", "Started", f"Started container {name}", name)
        status = await proc.wait()
        del self.procs[name]
        self._release_gpus(name)
        self._proc_exit.notify()
        finished_at = now()
        oom_killed = cgroup is not None and MemoryCgroups.oom_killed(cgroup)
        if cgroups is not None and cgroup is not None:
            self._spawn(_remove_cgroup(cgroups, cgroup))
        try:
            with open(term_file, "rb") as fh:
                raw = fh.read(8192)
        except OSError:
            raw = b""
        tail = None
        if not raw and plan.termination_message_policy == "FallbackToLogsOnError" and status.exit_code != 0:
            tail = tail_for_message(last_lines_text(log_file, FALLBACK_LOG_LINES))
        term = Terminated(
            exit_code=status.exit_code,
            # As a container runtime reports it: any OOM kill in the container's cgroup.
            reason="OOMKilled" if oom_killed else "Completed" if status.exit_code == 0 else "Error",
            finished_at=finished_at,
            started_at=started_at,
            message=termination_message(raw, tail, plan.termination_message_policy, status.exit_code),
            signal=status.signal,
            container_id=snap.container_id,
        )
        snap.state = "terminated"
        snap.terminated = term
        snap.ready = False
        self._persist()
        self._changed()
        return term

    def _release_gpus(self, name: str) -> None:
        if self.ctx.gpus.release(f"{self.uid}/{name}"):
            self.ctx.gpu_released.notify()

    async def _deadline_watch(self) -> None:
        while not self.finished.is_set():
            ads = self.pod.get("spec", {}).get("activeDeadlineSeconds")
            if ads is None or self.snap.start_time is None:
                await self._pod_changed.wait(3600)
                continue
            remaining = (self.snap.start_time - now()).total_seconds() + float(ads)
            if remaining <= 0:
                if self.stop is None and not self.snap.terminal_phase:
                    spec_grace = self.pod.get("spec", {}).get("terminationGracePeriodSeconds")
                    self.request_stop("DeadlineExceeded", 30 if spec_grace is None else int(spec_grace))
                return
            await self._pod_changed.wait(min(remaining, 3600))

    async def _storage_watch(self) -> None:
        """The kubelet's local storage isolation for emptyDir volumes with a sizeLimit: a pod whose
        volume holds more is evicted (Failed, reason Evicted, the kubelet's message)."""
        limits = podspec.empty_dir_limits(self.pod)
        if not limits:
            return
        loop = asyncio.get_running_loop()
        pause = STORAGE_CHECK_SECONDS
        while not self.finished.is_set() and self.stop is None:
            await asyncio.sleep(pause)
            if self.finished.is_set() or self.stop is not None:
                return
            began = loop.time()
            for name, (limit, text) in limits.items():
                used = await asyncio.to_thread(dir_usage, podspec.volume_dir(self.dir, name))
                # Trees that take long to walk (many files) are walked less often: about a tenth
                # of the time at most goes to it (the kubelet walks volumes once a minute).
                pause = max(STORAGE_CHECK_SECONDS, STORAGE_CHECK_BACKOFF * (loop.time() - began))
                if used > limit:
                    message = podspec.EMPTY_DIR_EVICTION_MESSAGE.format(name=name, limit=text)
                    self.ctx.record_event(self.pod, "Warning", "Evicted", message)
                    self.request_stop("Evicted", EVICTION_GRACE_SECONDS, message)
                    return

    async def _finish(self) -> None:
        if self._kill_task is not None:
            await self._kill_task
        stop = self.stop
        if stop is not None and not self.snap.terminal_phase:
            if stop.reason == "DeadlineExceeded":
                self.snap.terminal_phase = "Failed"
                self.snap.reason = "DeadlineExceeded"
                self.snap.message = "Pod was active on the node longer than the specified deadline"
            elif stop.reason == "Evicted":
                self.snap.terminal_phase = "Failed"
                self.snap.reason = "Evicted"
                self.snap.message = stop.message
            elif stop.reason == "NodeShutdown":
                # Every pod the kubelet's shutdown manager stops fails, started or not
                # (nodeshutdown_manager_linux.go), with DisruptionTarget (status.conditions).
                self.snap.terminal_phase = "Failed"
                self.snap.reason = NODE_SHUTDOWN_REASON
                self.snap.message = "Pod was terminated in response to imminent node shutdown."
            elif stop.reason in ("Deleted", "Gone"):
                ok = bool(self.snap.main) and all(c.succeeded() for c in self.snap.main)
                self.snap.terminal_phase = "Succeeded" if ok else "Failed"
        self.snap.sandbox_ready = False if self.snap.terminal_phase else self.snap.sandbox_ready
        for c in self.snap.all():
            c.ready = False if c.state != "running" else c.ready
        self._persist()
        self._changed()
        phase = self.snap.terminal_phase
        if phase:
            log.info(
                "pod finished",
                extra={
                    "kv": {
                        "pod": pod_ref(self.pod),
                        "phase": phase,
                        "reason": self.snap.reason or (stop.reason if stop else ""),
                    }
                },
            )
        if not self.gone:
            # At node shutdown the launcher waits for us only so long.
            await self.flush(3.0 if stop is not None and stop.reason == "NodeShutdown" else 30.0)
        self.finished.set()
        # Re-read: a deletion may have arrived while the containers were finishing.
        if self.pod["metadata"].get("deletionTimestamp") and not self.gone:
            await self._delete_from_api()

    async def _delete_from_api(self) -> None:
        """After the containers are gone, remove the API object as the kubelet does (grace 0)."""
        if self._delete_requested or self.gone:
            return
        self._delete_requested = True
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        # Retried until it is done: no other event may come to try again (the kubelet's status
        # manager re-tries on every periodic sync). 404/409: the pod, or this instance of it, is gone.
        delay = 0.5
        while not self.gone:
            try:
                await self._request(
                    "DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}", body=body
                )
                return
            except ApiError as exc:
                if exc.status in (404, 409):
                    return
                if exc.refused:
                    # An answer, not an outage (RBAC, admission): trying again changes nothing. The
                    # pod's next update tries again, as before.
                    log.error(
                        "pod delete refused",
                        extra={"kv": {"pod": pod_ref(self.pod), "status": exc.status, "error": str(exc)}},
                    )
                    self._delete_requested = False
                    return
                error = str(exc)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            log.warning(
                "pod delete failed, retrying",
                extra={"kv": {"pod": pod_ref(self.pod), "error": error, "retry_in": delay}},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, DELETE_RETRY_MAX_SECONDS)

    # ------------------------------------------------------------------ logs support

    def container_running_instance(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None else None

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


async def _remove_cgroup(cgroups: MemoryCgroups, procs: str, attempts: int = 20) -> None:
    """A container's cgroups, once its processes are gone: its group was killed at its exit, and
    what left the group (setsid) is killed here, as the end of a container's PID namespace would."""
    for _ in range(attempts):
        kill_cgroup(os.path.dirname(procs))
        if cgroups.remove_instance(procs):
            return
        await asyncio.sleep(0.5)
    log.info("memory cgroup %s still busy (a process of it could not be killed)", procs)


def state_shows_started(state: Obj | None) -> bool:
    if not state:
        return False
    for rec in (state.get("containers") or {}).values():
        if rec.get("state") in ("running", "terminated") or int(rec.get("restart_count") or 0) > 0:
            return True
    return bool(state.get("terminal_phase"))


def api_shows_started(pod: Obj) -> bool:
    st = pod.get("status", {})
    for s in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        state = s.get("state") or {}
        if "running" in state or "terminated" in state or int(s.get("restartCount") or 0) > 0:
            return True
    return bool(st.get("phase") == "Running")
