"""Pure: what the node knows about a pod's processes -> the pod's `status` as the API wants it.

The worker keeps a `PodSnapshot` (one `ContainerSnapshot` per container) and decides when
a pod is terminal; everything here derives the API representation from that: phase,
conditions (with stable lastTransitionTime), container statuses, and the strategic merge
patch that writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Obj = dict[str, Any]

State = Literal["waiting", "running", "terminated"]
Kind = Literal["init", "sidecar", "main"]

# The kubelet's limits for termination messages.
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str) -> datetime:
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Python 3.11 handles fractions of any length up to 6 digits; trim nanoseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        text = head + "." + digits[:6].ljust(6, "0") + rest[i:]
    return datetime.fromisoformat(text)


@dataclass
class Terminated:
    exit_code: int
    reason: str
    finished_at: datetime
    started_at: datetime | None = None
    message: str | None = None
    signal: int | None = None
    container_id: str | None = None

    def to_api(self) -> Obj:
        out: Obj = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "finishedAt": rfc3339(self.finished_at),
        }
        if self.started_at is not None:
            out["startedAt"] = rfc3339(self.started_at)
        if self.message:
            out["message"] = self.message
        if self.signal:
            out["signal"] = self.signal
        if self.container_id:
            out["containerID"] = self.container_id
        return out

    def to_json(self) -> Obj:
        return {
            "exit_code": self.exit_code,
            "reason": self.reason,
            "finished_at": self.finished_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "message": self.message,
            "signal": self.signal,
            "container_id": self.container_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Terminated:
        return cls(
            exit_code=int(data["exit_code"]),
            reason=str(data["reason"]),
            finished_at=datetime.fromisoformat(data["finished_at"]),
            started_at=datetime.fromisoformat(data["started_at"]) if data.get("started_at") else None,
            message=data.get("message"),
            signal=data.get("signal"),
            container_id=data.get("container_id"),
        )


@dataclass
class ContainerSnapshot:
    name: str
    image: str
    kind: Kind
    state: State = "waiting"
    waiting_reason: str | None = None
    waiting_message: str | None = None
    running_since: datetime | None = None
    container_id: str | None = None
    terminated: Terminated | None = None
    last_terminated: Terminated | None = None
    restart_count: int = 0
    ready: bool = False
    resources: Obj | None = None

    def ever_ran(self) -> bool:
        return self.state != "waiting" or self.last_terminated is not None or self.restart_count > 0

    def succeeded(self) -> bool:
        return self.state == "terminated" and self.terminated is not None and self.terminated.exit_code == 0


@dataclass
class PodSnapshot:
    host_ip: str
    start_time: datetime | None = None
    sandbox_ready: bool = False
    init: list[ContainerSnapshot] = field(default_factory=list)
    main: list[ContainerSnapshot] = field(default_factory=list)
    terminal_phase: str | None = None
    reason: str | None = None
    message: str | None = None

    def all(self) -> list[ContainerSnapshot]:
        return self.init + self.main

    def get(self, name: str) -> ContainerSnapshot | None:
        for c in self.all():
            if c.name == name:
                return c
        return None


def initialized(snap: PodSnapshot) -> bool:
    """All regular init containers completed and every sidecar has started."""
    for c in snap.init:
        if c.kind == "sidecar":
            if not c.ever_ran():
                return False
        elif not c.succeeded():
            return False
    return True


def pod_phase(snap: PodSnapshot) -> str:
    if snap.terminal_phase:
        return snap.terminal_phase
    if not initialized(snap):
        return "Pending"
    if not any(c.ever_ran() for c in snap.main):
        return "Pending"
    return "Running"


def _condition(
    ctype: str,
    status: bool,
    previous: Mapping[str, Obj],
    now: datetime,
    generation: int | None,
    reason: str | None = None,
    message: str | None = None,
) -> Obj:
    value = "True" if status else "False"
    prev = previous.get(ctype)
    ltt = prev.get("lastTransitionTime") if prev and prev.get("status") == value else None
    cond: Obj = {
        "type": ctype,
        "status": value,
        "lastProbeTime": None,
        "lastTransitionTime": ltt or rfc3339(now),
        # Explicit nulls: the patch merges into the existing condition, and a reason or
        # message from an earlier state must not linger.
        "reason": reason or None,
        "message": message or None,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def readiness_gates_ok(pod: Obj, previous: Mapping[str, Obj]) -> tuple[bool, str | None]:
    for gate in pod.get("spec", {}).get("readinessGates") or []:
        ctype = gate.get("conditionType", "")
        cond = previous.get(ctype)
        if cond is None:
            return False, f'corresponding condition of pod readiness gate "{ctype}" does not exist.'
        if cond.get("status") != "True":
            return (
                False,
                f'the status of pod readiness gate "{ctype}" is not "True", but {cond.get("status")}',
            )
    return True, None


#: pod.status.reason of the pods a node shutdown stopped (the kubelet's nodeShutdownReason).
NODE_SHUTDOWN_REASON = "Terminated"

#: The condition types `conditions` computes: the node's own (others', e.g. readiness gates, are not).
NODE_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready", "PodScheduled")


def conditions(pod: Obj, snap: PodSnapshot, previous: Mapping[str, Obj], now: datetime) -> list[Obj]:
    gen = pod.get("metadata", {}).get("generation")
    phase = pod_phase(snap)
    terminal = phase in ("Succeeded", "Failed")
    out: list[Obj] = []
    out.append(
        _condition("PodReadyToStartContainers", snap.sandbox_ready and not terminal, previous, now, gen)
    )
    if initialized(snap) or (terminal and all(c.kind == "sidecar" or c.succeeded() for c in snap.init)):
        out.append(_condition("Initialized", True, previous, now, gen))
    else:
        pending = [c.name for c in snap.init if not (c.succeeded() or (c.kind == "sidecar" and c.ever_ran()))]
        out.append(
            _condition(
                "Initialized",
                False,
                previous,
                now,
                gen,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(pending)}]",
            )
        )
    unready = [c.name for c in snap.main if not c.ready] + [
        c.name for c in snap.init if c.kind == "sidecar" and not c.ready
    ]
    if phase == "Succeeded":
        ready, reason, message = False, "PodCompleted", None
    elif unready:
        ready, reason, message = (
            False,
            "ContainersNotReady",
            f"containers with unready status: [{' '.join(unready)}]",
        )
    else:
        ready, reason, message = True, None, None
    out.append(_condition("ContainersReady", ready, previous, now, gen, reason, message))
    gates_ok, gate_msg = readiness_gates_ok(pod, previous)
    if ready and not gates_ok:
        out.append(_condition("Ready", False, previous, now, gen, "ReadinessGatesNotReady", gate_msg))
    else:
        out.append(_condition("Ready", ready, previous, now, gen, reason, message))
    # Bound pods already carry PodScheduled=True from the binding; one created with
    # spec.nodeName set never saw the scheduler. The kubelet reports it either way.
    out.append(_condition("PodScheduled", True, previous, now, gen))
    if phase == "Failed" and snap.reason == NODE_SHUTDOWN_REASON:
        # As the kubelet's node shutdown manager: the pod did not fail by itself.
        out.append(
            _condition("DisruptionTarget", True, previous, now, gen, "TerminationByKubelet", snap.message)
        )
    return out


def _state(c: ContainerSnapshot) -> Obj:
    if c.state == "running":
        return {"running": {"startedAt": rfc3339(c.running_since or datetime.now(UTC))}}
    if c.state == "terminated" and c.terminated is not None:
        return {"terminated": c.terminated.to_api()}
    waiting: Obj = {"reason": c.waiting_reason or "ContainerCreating"}
    if c.waiting_message:
        waiting["message"] = c.waiting_message
    return {"waiting": waiting}


def container_status(c: ContainerSnapshot) -> Obj:
    ran = c.ever_ran()
    out: Obj = {
        "name": c.name,
        "image": c.image,
        # Nothing is pulled: the host filesystem is the image. An imageID that says so.
        "imageID": f"process://{c.image}" if ran else "",
        "ready": c.ready,
        "started": c.state == "running",
        "restartCount": c.restart_count,
        "state": _state(c),
        "lastState": {"terminated": c.last_terminated.to_api()} if c.last_terminated else {},
    }
    cid = c.container_id if c.state == "running" else (c.terminated.container_id if c.terminated else None)
    if cid:
        out["containerID"] = cid
    if c.resources:
        out["resources"] = c.resources
    return out


def compute_status(
    pod: Obj, snap: PodSnapshot, now: datetime, previous_conditions: list[Obj] | None = None
) -> Obj:
    """The `status` stanza this node reports for the pod."""
    prev_list = (
        previous_conditions
        if previous_conditions is not None
        else pod.get("status", {}).get("conditions") or []
    )
    previous = {c.get("type", ""): c for c in prev_list}
    status: Obj = {
        "phase": pod_phase(snap),
        "conditions": conditions(pod, snap, previous, now),
        "hostIP": snap.host_ip,
        "hostIPs": [{"ip": snap.host_ip}],
        "initContainerStatuses": [container_status(c) for c in snap.init],
        "containerStatuses": [container_status(c) for c in snap.main],
    }
    if snap.sandbox_ready or snap.terminal_phase:
        status["podIP"] = snap.host_ip
        status["podIPs"] = [{"ip": snap.host_ip}]
    if snap.start_time is not None:
        status["startTime"] = rfc3339(snap.start_time)
    if snap.reason:
        status["reason"] = snap.reason
    if snap.message:
        status["message"] = snap.message
    gen = pod.get("metadata", {}).get("generation")
    if gen is not None:
        status["observedGeneration"] = gen
    return status


def reported_view(status: Mapping[str, Any]) -> Obj:
    """What a status says in the fields the node owns, in a form that survives the API
    server's round trip (nulls it drops, timestamps that only record when).

    The kubelet compares the same (isPodStatusByKubeletEqual: its conditions by status,
    reason and message) to notice that someone else rewrote them. Phase is left out: a
    terminal phase set by another writer (pod GC) cannot be undone, and must not be fought.
    """
    conds = {
        str(c.get("type")): (c.get("status"), c.get("reason") or None, c.get("message") or None)
        for c in status.get("conditions") or []
        if c.get("type") in NODE_CONDITIONS
    }
    containers = [
        (
            key,
            s.get("name"),
            bool(s.get("ready")),
            int(s.get("restartCount") or 0),
            sorted(s.get("state") or {}),
        )
        for key in ("initContainerStatuses", "containerStatuses")
        for s in status.get(key) or []
    ]
    return {"conditions": conds, "containers": containers}


def status_patch(status: Obj, uid: str) -> Obj:
    """A strategic merge patch writing `status` to the pod instance `uid`.

    Conditions merge by type, so others' conditions (e.g. DisruptionTarget) survive; every
    condition we send carries `reason`/`message` (null when unset) so a stale reason from a
    previous state is cleared. The container status lists are atomic: replaced whole.
    `metadata.uid` is a precondition, as in the kubelet's patch: pod names are reused, and a
    late write meant for a deleted pod must be refused rather than land on its successor.
    """
    return {"metadata": {"uid": uid}, "status": status}


# ---------------------------------------------------------------------------
# termination messages


def termination_message(file_bytes: bytes, log_tail: str | None, policy: str, exit_code: int) -> str | None:
    """The kubelet's rule: the file's content; with FallbackToLogsOnError and a failure, the log tail."""
    text = file_bytes[:MAX_TERMINATION_MESSAGE].decode("utf-8", errors="replace")
    if text:
        return text
    if policy == "FallbackToLogsOnError" and exit_code != 0 and log_tail:
        return log_tail
    return None


def tail_for_message(lines: list[str]) -> str:
    """Last 80 lines, at most the last 2048 bytes of them."""
    text = "".join(lines[-FALLBACK_LOG_LINES:])
    data = text.encode()
    if len(data) > FALLBACK_LOG_BYTES:
        data = data[-FALLBACK_LOG_BYTES:]
    return data.decode("utf-8", errors="replace")
