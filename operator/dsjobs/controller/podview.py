"""A job pod as the operator needs to see it: a small, frozen summary of the Pod object.

The operator keeps these (not whole Pods) in its in-memory pod index: a Pod with its managed
fields is ~10 KiB of dicts, a PodView a few hundred bytes. Everything the status function reads
about a pod is here, so the status function can be tested with hand-made pods.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from dsjobs.controller.names import (
    ATTEMPT_LABEL,
    INSTANCE_TYPE_DIGEST_ANNOTATION,
    INSTANCE_TYPE_INDEX_ANNOTATION,
    INSTANCE_TYPE_LABEL,
    RUNNER_CONTRACT_ANNOTATION,
)
from dsjobs.runner.contract import JOB_CONTAINER, RUNNER_CONTRACT

ContainerState = Literal["waiting", "running", "terminated"]


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp (`2025-06-01T11:00:12Z`, `t` and `z` too) in UTC, or None: also for
    one UTC cannot hold (0001-01-01T00:00:00+00:01: anyone who may annotate a job can write one)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True)
class ContainerView:
    """The state of one container (init, sidecar or main)."""

    name: str
    state: ContainerState
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ContainerView:
        name = str(status.get("name", ""))
        state = status.get("state") or {}
        if "terminated" in state:
            term = state["terminated"] or {}
            reason = str(term.get("reason") or "")
            # The kubelet's word for a container it could not find when the pod ended (one that
            # never started: the pod deleted after stage-in, during the image pull): its exit
            # code 137 and message are the kubelet's, not the container's. Read as an exit, the
            # job was "killed by signal 9", the program's failure, where it never ran.
            # Likewise a container's state the node lost: a reboot, or a container runtime
            # restarted without its shims, reports every container that was running as ended
            # "Unknown" with exit code 255 (containerd's placeholder), whatever it was doing.
            unknown = reason in (CONTAINER_STATUS_UNKNOWN, STATE_LOST)
            return cls(
                name=name,
                state="terminated",
                reason=reason,
                # The termination message carries the runner's result: keep it whole (<= 4 KiB).
                message="" if unknown else str(term.get("message") or ""),
                exit_code=None if unknown else int(term.get("exitCode", 0)),
                signal=term.get("signal"),
                started_at=parse_time(term.get("startedAt")),
                finished_at=parse_time(term.get("finishedAt")),
            )
        if "running" in state:
            return cls(
                name=name, state="running", started_at=parse_time((state["running"] or {}).get("startedAt"))
            )
        waiting = state.get("waiting") or {}
        return cls(
            name=name,
            state="waiting",
            reason=str(waiting.get("reason") or ""),
            message=str(waiting.get("message") or "")[:1024],
        )


@dataclass(frozen=True)
class PodCondition:
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None


#: Waiting reasons of containers whose pod is still being set up (volumes, sandbox).
SETTING_UP: Final = frozenset({"", "ContainerCreating", "PodInitializing"})
#: How long a scheduled pod may take to start its first container before its Events are asked why.
SETUP_PATIENCE: Final = timedelta(seconds=20)


@dataclass(frozen=True)
class PodView:
    """What the operator knows about one pod of a job."""

    name: str
    uid: str = ""
    # The uid of the ProjectJob that owns the pod (its controller ownerReference); "" if none.
    owner_uid: str = ""
    attempt: int = 1
    instance_type: str = ""
    instance_type_index: int = 0
    # instance_type_digest() of the InstanceType spec it was rendered from ("": an older operator's).
    instance_type_digest: str = ""
    # The runner contract it was rendered for (RUNNER_CONTRACT_ANNOTATION; 1: an older operator's).
    runner_contract: int = RUNNER_CONTRACT
    created_at: datetime | None = None
    deleting: bool = False
    # Its deletionTimestamp: when the deletion was asked for, plus the grace period.
    deleted_at: datetime | None = None
    # The grace period of its deletion (deletionGracePeriodSeconds): a later DELETE may shorten it.
    deletion_grace_seconds: int | None = None
    # True when the watch said DELETED: this is the pod's last state, the object is gone.
    gone: bool = False
    phase: str = "Pending"
    reason: str = ""
    message: str = ""
    node_name: str = ""
    # status.nominatedNodeName: the scheduler preempts pods of that node for this one.
    nominated_node: str = ""
    conditions: tuple[tuple[str, PodCondition], ...] = ()
    init_containers: tuple[ContainerView, ...] = ()
    containers: tuple[ContainerView, ...] = ()
    # (container name, image) of every container, to name the image that cannot be pulled.
    images: tuple[tuple[str, str], ...] = ()
    # (container name, memory limit) of every container with one, to tell an OOM kill's limit.
    memory_limits: tuple[tuple[str, str], ...] = ()
    # How long the pod stays bound to a node that stopped reporting (its NoExecute toleration of
    # node.kubernetes.io/unreachable; the API server adds 300 s by default). None: no such
    # toleration (evicted at once); TOLERATED_FOREVER: a toleration without seconds.
    unreachable_toleration_seconds: int | None = None
    # The newest Warning Event about the pod, looked up by the glue while the pod waits on what
    # only Events tell (events_to_ask): the ephemeral volume controller's FailedBinding (a quota
    # on claims), the kubelet's FailedMount (a volume it cannot mount).
    warning: str = ""
    # The newest node autoscaler's word that a node is being added for the pod (cluster-autoscaler's
    # TriggeredScaleUp, Karpenter's Nominated), looked up by the glue while the pod is unschedulable.
    scale_up: str = ""

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any], *, gone: bool = False) -> PodView:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        conditions = tuple(
            (
                str(c.get("type", "")),
                PodCondition(
                    status=str(c.get("status", "Unknown")),
                    reason=str(c.get("reason") or ""),
                    message=str(c.get("message") or "")[:1024],
                    last_transition_time=parse_time(c.get("lastTransitionTime")),
                ),
            )
            for c in status.get("conditions") or ()
        )
        return cls(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            owner_uid=_controller_uid(meta.get("ownerReferences") or ()),
            attempt=_attempt(str(meta.get("name", "")), labels),
            instance_type=str(labels.get(INSTANCE_TYPE_LABEL, "")),
            instance_type_index=_int(annotations.get(INSTANCE_TYPE_INDEX_ANNOTATION), 0),
            instance_type_digest=str(annotations.get(INSTANCE_TYPE_DIGEST_ANNOTATION) or ""),
            runner_contract=_int(annotations.get(RUNNER_CONTRACT_ANNOTATION), 1),
            created_at=parse_time(meta.get("creationTimestamp")),
            deleting=bool(meta.get("deletionTimestamp")),
            deleted_at=parse_time(meta.get("deletionTimestamp")),
            deletion_grace_seconds=(
                None
                if meta.get("deletionGracePeriodSeconds") is None
                else _int(meta["deletionGracePeriodSeconds"], 0)
            ),
            gone=gone,
            phase=str(status.get("phase") or "Pending"),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or "")[:1024],
            node_name=str(spec.get("nodeName") or ""),
            nominated_node=str(status.get("nominatedNodeName") or ""),
            conditions=conditions,
            init_containers=tuple(
                ContainerView.from_status(c) for c in status.get("initContainerStatuses") or ()
            ),
            containers=tuple(ContainerView.from_status(c) for c in status.get("containerStatuses") or ()),
            images=tuple(
                (str(c.get("name", "")), str(c.get("image", "")))
                for c in (*(spec.get("initContainers") or ()), *(spec.get("containers") or ()))
            ),
            memory_limits=tuple(
                (str(c.get("name", "")), str(limit))
                for c in spec.get("containers") or ()
                if (limit := ((c.get("resources") or {}).get("limits") or {}).get("memory"))
            ),
            unreachable_toleration_seconds=_unreachable_toleration(spec.get("tolerations") or ()),
        )

    def owned_by(self, job_uid: str, job_created: datetime | None = None) -> bool:
        """A pod of the ProjectJob with this uid (created then), not one left by an earlier
        ProjectJob of the same name: those carry the same labels and pod names until they are
        gone. A pod without an owner (its reference stripped by hand), or any pod of a job whose uid
        is not known, is taken as the job's, as Kubernetes' controllers adopt their orphans; but not
        one older than the job: `kubectl delete --cascade=orphan` strips an earlier job's pods'
        references, and such a pod stuck on a lost node outlives that job."""
        if self.owner_uid:
            return not job_uid or self.owner_uid == job_uid
        return job_created is None or self.created_at is None or self.created_at >= job_created

    def condition(self, type_: str) -> PodCondition | None:
        for name, cond in self.conditions:
            if name == type_:
                return cond
        return None

    @property
    def ended_at(self) -> datetime | None:
        """When its last container ended, by its node's clock (None: none ended, or no time)."""
        return max((c.finished_at for c in self.containers if c.finished_at is not None), default=None)

    def container(self, name: str) -> ContainerView | None:
        for c in (*self.init_containers, *self.containers):
            if c.name == name:
                return c
        return None

    @property
    def terminal(self) -> bool:
        """The pod will not run anything any more."""
        return self.phase in ("Succeeded", "Failed") or self.gone

    @property
    def alive(self) -> bool:
        """Still there and not being deleted: somebody has to delete it."""
        return not self.gone and not self.deleting

    @property
    def program_ended(self) -> bool:
        """The job's program has exited (its outputs may still be uploading)."""
        job = self.container(JOB_CONTAINER)
        return job is not None and job.state == "terminated"

    @property
    def scheduled(self) -> bool:
        return bool(self.node_name)

    @property
    def waits_for_ephemeral_claim(self) -> bool:
        """The scheduler waits for the ephemeral volume controller to make one of its claims."""
        cond = self.condition("PodScheduled")
        return (
            not self.scheduled
            and not self.gone
            and cond is not None
            and cond.status == "False"
            and "waiting for ephemeral volume controller" in cond.message
        )

    def events_to_ask(self, now: datetime) -> str | None:
        """The field selector of the Events that tell why the pod waits, when only they can: it
        waits for its ephemeral claim, or it was scheduled SETUP_PATIENCE ago and no container
        has started (a kubelet puts no reason on its containers while it mounts volumes); or it is
        unschedulable, and a node autoscaler may be adding a node for it (SCALE_UP_REASONS, both
        Normal, as the scheduler's FailedScheduling is not)."""
        if self.deleting or self.gone or self.terminal:
            return None
        if self.waits_for_ephemeral_claim:
            return "reason=FailedBinding"
        if self.unschedulable:
            return SCALE_UP_SELECTOR
        if not self.waits_on_events:
            return None
        scheduled = self.condition("PodScheduled")
        since = scheduled.last_transition_time if scheduled is not None else None
        if since is not None and now - since >= SETUP_PATIENCE:
            return "type=Warning,reason!=FailedScheduling"
        return None

    @property
    def waits_on_events(self) -> bool:
        """Waiting in a state whose cause only the pod's Events may tell: for its ephemeral claim,
        or scheduled with no container started yet."""
        return not self.gone and (self.waits_for_ephemeral_claim or self.setting_up)

    @property
    def setting_up(self) -> bool:
        """Scheduled, and no container has started yet: the node mounts volumes, makes the sandbox."""
        containers = (*self.init_containers, *self.containers)
        return self.scheduled and all(c.state == "waiting" and c.reason in SETTING_UP for c in containers)

    @property
    def unschedulable(self) -> bool:
        """The scheduler tried the pod and found no node for it (not merely: not scheduled yet)."""
        cond = self.condition("PodScheduled")
        return (
            not self.scheduled
            and cond is not None
            and cond.status == "False"
            and cond.reason == "Unschedulable"
        )

    @property
    def node_not_ready(self) -> bool:
        """The pod's node stopped reporting (the pod may still run there, unseen).

        The kubelet sets Ready and ContainersReady together; only the node lifecycle controller
        (MarkPodsNotReady, once the node is NotReady) makes Ready False and leaves ContainersReady
        True. So this is seen while every container runs; during stage-in or upload it looks like
        a pod that is not ready yet. Also while the pod is being deleted: a kubelet that stops its
        containers reports both False, a silent one nothing."""
        if self.terminal:
            return False
        ready, containers = self.condition("Ready"), self.condition("ContainersReady")
        return (
            ready is not None
            and containers is not None
            and ready.status != "True"
            and containers.status == "True"
        )


UNREACHABLE_TAINT: Final = "node.kubernetes.io/unreachable"
TOLERATED_FOREVER: Final = -1


def _unreachable_toleration(tolerations: Any) -> int | None:
    for t in tolerations:
        if not isinstance(t, Mapping) or t.get("effect") not in ("NoExecute", "", None):
            continue
        if t.get("key") == UNREACHABLE_TAINT or (not t.get("key") and t.get("operator") == "Exists"):
            seconds = t.get("tolerationSeconds")
            return TOLERATED_FOREVER if seconds is None else max(0, _int(seconds, 0))
    return None


def _int(value: object, default: int) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


#: terminated.reason of a container the kubelet could not locate when the pod ended.
CONTAINER_STATUS_UNKNOWN: Final = "ContainerStatusUnknown"
#: terminated.reason of a container whose state its node's container runtime lost (a reboot, a
#: runtime restart that took the shims with it): CRI's recovery of a container without a task.
STATE_LOST: Final = "Unknown"
_POD_NAME_ATTEMPT: Final = re.compile(r"-a([1-9][0-9]{0,8})$")


def _attempt(name: str, labels: Mapping[str, Any]) -> int:
    """The attempt a pod is of: its name's (`names.pod_name`), which cannot change, not its label
    (which selects it), which a `kubectl label --overwrite` can: believed, it made the running
    pod look like a newer attempt than the status and the plan delete it as superseded."""
    m = _POD_NAME_ATTEMPT.search(name)
    return int(m.group(1)) if m else _int(labels.get(ATTEMPT_LABEL), 1)


def _controller_uid(refs: Any) -> str:
    for ref in refs:
        if isinstance(ref, Mapping) and ref.get("controller"):
            return str(ref.get("uid") or "")
    return ""


#: A Warning Event last seen longer ago than this no longer tells why the pod waits: a kubelet
#: retries a failing mount at least every ~2 minutes (its backoff's cap), each time bumping the
#: Event's lastTimestamp; an older one is a trouble that went (a mount that failed once).
EVENT_FRESHNESS: Final = timedelta(minutes=5)


#: The Event reasons with which node autoscalers say they add a node for a pod:
#: cluster-autoscaler's "pod triggered scale-up: [{group 0->1 (max: 4)}]", Karpenter's
#: "Pod should schedule on: nodeclaim/default-x4k2p".
SCALE_UP_REASONS: Final = ("TriggeredScaleUp", "Nominated")
#: The Events of an unschedulable pod that may hold them.
SCALE_UP_SELECTOR: Final = "type=Normal"


#: cluster-autoscaler's "pod didn't trigger scale-up: ... in backoff after failed scale-up": said
#: after a scale-up that brought no node (a stockout), it ends what TriggeredScaleUp promised.
NO_SCALE_UP_REASON: Final = "NotTriggerScaleUp"


def scale_up_message(events: Sequence[Mapping[str, Any]]) -> str:
    """The newest autoscaler's scale-up word of some Events of one pod, or "" (none, or a newer
    NotTriggerScaleUp). No freshness bound: an autoscaler says it once per scale-up and the node
    takes minutes; how long the job waits on it is the plan's to bound."""
    newest = max(
        (e for e in events if e.get("reason") in (*SCALE_UP_REASONS, NO_SCALE_UP_REASON)),
        key=_event_time,
        default=None,
    )
    if newest is None or newest.get("reason") == NO_SCALE_UP_REASON:
        return ""
    return str(newest.get("message") or "")


def _event_time(e: Mapping[str, Any]) -> str:
    """When the API server last wrote the Event (its managedFields' times): lastTimestamp is the
    kubelet's clock, and a node minutes behind would hide every trouble it reports; else its last,
    then first, time. RFC 3339 in UTC: the strings sort as the times do."""
    meta = e.get("metadata") or {}
    written = [
        str(f["time"]) for f in meta.get("managedFields") or () if isinstance(f, Mapping) and f.get("time")
    ]
    if written:
        return max(written)
    return str(e.get("lastTimestamp") or e.get("eventTime") or meta.get("creationTimestamp") or "")


def latest_event_message(events: Sequence[Mapping[str, Any]], now: datetime) -> str:
    """The message of the most recent of some core/v1 Events (by _event_time), or "" when there is
    none, or it was last seen more than EVENT_FRESHNESS before `now`."""
    latest = max(events, key=_event_time, default=None)
    if latest is None:
        return ""
    seen = parse_time(_event_time(latest))
    if seen is not None and now - seen > EVENT_FRESHNESS:
        return ""
    return str(latest.get("message") or "")
