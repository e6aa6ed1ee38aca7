"""The job's status as a pure function of what the operator observes.

    compute_status(spec, status, pod, result, now, settings) -> StatusUpdate(status, events, ...)

`pod` is the current attempt's pod (a PodView; a PodView with `gone=True` when the pod vanished),
`result` the runner's result from the ship container's termination message (or result.json
when it did not fit). Nothing here talks to Kubernetes: plan.py turns the verdicts into actions,
handlers.py writes the status when (and only when) it differs from what the object holds.

Phase mapping (docs/operator.md has the full table):

    pod not scheduled / pulling images / staging inputs          PREPARING
    job container running                                        EXECUTING
    job container ended, ship container still uploading          UPLOADING_OUTPUT
    pod ended, return code 0                                     SUCCESS
    pod ended otherwise: non-zero code, OOMKilled, evicted,
      node lost, deadline exceeded, stage-in/setup failed        ERROR (or a retry, see RetryPolicy)
    image cannot be pulled for image_pull_timeout                ERROR (InvalidImageName: at once)
    cancel requested while the pod runs                          CANCELLING -> CANCELLED
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import pairwise
from typing import Any, Final, Literal

from dsjobs.controller.names import PROJECT_SECRETS_NAME
from dsjobs.controller.podview import (
    SETUP_PATIENCE,
    STATE_LOST,
    TOLERATED_FOREVER,
    ContainerView,
    PodView,
)
from dsjobs.controller.settings import OperatorSettings
from dsjobs.models import (
    CompressionType,
    Condition,
    FileDesc,
    FileError,
    FileErrorType,
    JobPhase,
    Progress,
    ProjectJobSpec,
    ProjectJobStatus,
    StoredFile,
    data_ttl_is_infinite,
    job_relative_path,
)
from dsjobs.models.limits import DEFAULT_GRACEFUL_TIMEOUT, MAX_DESC_LENGTH, MAX_STRING
from dsjobs.runner.contract import (
    JOB_CONTAINER,
    SHARED_VOLUME,
    SHIP_CONTAINER,
    STAGE_IN_CONTAINER,
    STORAGE_PATIENCE_SECONDS,
    WORK_VOLUME,
)
from dsjobs.runner.entry import SETUP_FAILED_EXIT
from dsjobs.runner.result import (
    LogFileResult,
    ResultPointer,
    RunnerResult,
    RunnerStatus,
    parse_termination_message,
)
from dsjobs.validation import data_ttl_problem
from dsjobs.validation.job import stored_json_bytes

# Condition types the operator maintains (docs/operator.md).
COND_SCHEDULED: Final = "Scheduled"
COND_CONTAINERS_CREATED: Final = "ContainersCreated"
COND_STARTED: Final = "Started"
COND_FINISHED: Final = "Finished"
#: True on every final phase (reason Succeeded, Failed or Cancelled): what `kubectl wait` can wait
#: for whatever the outcome, as Finished is False for a job that did not succeed.
COND_ENDED: Final = "Ended"
COND_RETRYING: Final = "Retrying"
COND_FINALIZED: Final = "Finalized"
COND_DATA_CLEARED: Final = "DataCleared"
#: The DataCleared condition's reason (status False) while the job's stored data is being deleted:
#: written, guarded by the job's resourceVersion, before the first object goes. The deletion then
#: always ends, whatever comes next (a SetDataTtl or an Execute that crossed it, the operator
#: restarted meanwhile), and the API refuses what would need the data.
DATA_DELETING: Final = "Deleting"
COND_NODE_REACHABLE: Final = "NodeReachable"
#: False while spec.dataTtl holds a TTL out of its range (set with kubectl after the job started).
COND_DATA_TTL_VALID: Final = "DataTtlValid"
#: False while the stored status cannot be read (edited by hand, or by another version): the
#: operator leaves the job alone meanwhile (plan.py).
COND_STATUS_READABLE: Final = "StatusReadable"
# Conditions describing one attempt: dropped when the next attempt starts.
ATTEMPT_CONDITIONS: Final = (COND_SCHEDULED, COND_CONTAINERS_CREATED, COND_STARTED, COND_NODE_REACHABLE)

# Waiting reasons that mean "this container cannot start". Fatal ones can never recover; the
# others fail the job when they last longer than the image pull timeout (the kubelet retries).
FATAL_WAITING: Final = frozenset({"InvalidImageName", "ErrImageNeverPull"})
FAILING_WAITING: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "RegistryUnavailable",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "PreCreateHookError",
        "PreStartHookError",
    }
)
# Reasons of a container that ended without its command ever running (e.g. an image without
# /bin/sh for the entry script). The ship sidecar waits for the entry script to start, so such a
# pod would never end by itself.
NEVER_RAN: Final = frozenset({"StartError", "ContainerCannotRun"})
IMAGE_PULL_REASONS: Final = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "RegistryUnavailable", *FATAL_WAITING}
)

# pod.status.reason of pods that failed for reasons outside the job (kubelet, controllers).
_POD_REASONS: Final[dict[str, tuple[str, str]]] = {
    "Evicted": ("Evicted", "the pod was evicted from its node"),
    "DeadlineExceeded": ("DeadlineExceeded", "the pod ran past its active deadline"),
    "NodeLost": ("NodeLost", "the pod's node was lost"),
    "Shutdown": ("NodeShutdown", "the pod's node shut down"),
    # Kubernetes >= 1.22: the kubelet of a node shutting down refuses the pods it is given.
    "NodeShutdown": ("NodeShutdown", "the pod's node was shutting down"),
    "Terminated": ("NodeShutdown", "the pod was terminated by its node"),
    "UnexpectedAdmissionError": ("AdmissionFailed", "the node refused the pod"),
    "Preempting": ("Preempted", "the pod was preempted"),
}
# Reasons of the DisruptionTarget pod condition (Kubernetes >= 1.26).
_DISRUPTION_REASONS: Final[dict[str, tuple[str, str]]] = {
    "DeletionByTaintManager": (
        "NodeLost",
        "the pod was evicted by a NoExecute taint of its node (unreachable or not ready, or an admin's)",
    ),
    "DeletionByPodGC": ("NodeLost", "the pod's node is gone"),
    "EvictionByEvictionAPI": ("Evicted", "the pod was evicted (kubectl drain, a scale-down, a descheduler)"),
    "PreemptionByScheduler": ("Preempted", "the pod was preempted by a higher-priority pod"),
    "TerminationByKubelet": ("Evicted", "the node's kubelet evicted the pod (node pressure or shutdown)"),
}


class FailureKind(StrEnum):
    """What ended an attempt that did not succeed: decides whether a retry may help."""

    PROGRAM = "Program"  # the program failed: retried only for the policy's exit codes
    INFRASTRUCTURE = "Infrastructure"  # evicted, node lost, pod deleted: retried while attempts remain
    PERMANENT = "Permanent"  # stage-in, setup: never retried


@dataclass(frozen=True)
class JobEvent:
    """A Kubernetes Event to post on the ProjectJob (`kubectl describe pj` tells the story)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended."""

    phase: JobPhase  # SUCCESS, ERROR or CANCELLED
    reason: str
    message: str
    return_code: int | None = None
    failure: FailureKind | None = None
    #: False when the job's container ended before the program (its setup failed): the exit code
    #: seen while the ship uploaded was the runner's, and is no return code of the job.
    program_ran: bool = True


@dataclass(frozen=True)
class StatusUpdate:
    """The new status, the events telling what happened, and when to look again."""

    status: ProjectJobStatus
    events: tuple[JobEvent, ...] = ()
    # The attempt failed in a way the retry policy covers: plan.py starts the next attempt.
    retry: bool = False
    requeue_after: timedelta | None = None


# --- status helpers (models are treated as immutable: every helper returns a new status) -------


def clip(text: str, limit: int = MAX_STRING) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def get_condition(status: ProjectJobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def set_condition(
    status: ProjectJobStatus,
    type_: str,
    value: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: datetime,
) -> ProjectJobStatus:
    """Kubernetes condition semantics: lastTransitionTime moves only when the value changes."""
    old = get_condition(status, type_)
    since = old.last_transition_time if old is not None and old.status == value else now
    new = Condition(
        type=type_, status=value, reason=reason, message=clip(message, 32768), last_transition_time=since
    )
    if old == new:
        return status
    others = [c for c in status.conditions if c.type != type_]
    return status.model_copy(update={"conditions": [*others, new]})


def drop_conditions(status: ProjectJobStatus, *types: str) -> ProjectJobStatus:
    kept = [c for c in status.conditions if c.type not in types]
    if len(kept) == len(status.conditions):
        return status
    return status.model_copy(update={"conditions": kept})


#: The latest time a datetime holds, where sums of status times saturate.
END_OF_TIME: Final = datetime.max.replace(tzinfo=UTC)


def later(when: datetime, by: timedelta) -> datetime:
    """`when + by`, or END_OF_TIME past it: a status time is anyone's to write who may write the
    status (9999-12-31T23:30:00Z passes the CRD), and an OverflowError failed every reconcile."""
    try:
        return when + by
    except OverflowError:
        return END_OF_TIME


def ttl_expiry(ttl: timedelta, since: datetime | None, previous: datetime | None = None) -> datetime | None:
    """`since` + the data TTL, `since` being finishedAt (or createdAt for a job never executed);
    None without it (a running job) or when the TTL is infinite. A TTL out of range (a kubectl
    edit) is not used, so that a typo ("-1d", "1m") deletes no data: `previous`, the last valid
    TTL's expiry, stands."""
    if data_ttl_problem(ttl) is not None:
        return previous
    if since is None or data_ttl_is_infinite(ttl):
        return None
    try:
        return since + ttl
    except OverflowError:  # a TTL too long for a datetime is as good as infinite
        return None


def data_deletion_begun(status: ProjectJobStatus) -> str | None:
    """Why the job's stored data is being deleted when that has begun (DATA_DELETING), else None."""
    cond = get_condition(status, COND_DATA_CLEARED)
    if status.data_cleared or cond is None or not _deleting(cond.status, cond.reason):
        return None
    found = re.fullmatch(r"stored data being deleted \((.+)\)", cond.message or "")
    return found.group(1) if found else "requested"


def deletion_marked(status: Mapping[str, Any]) -> bool:
    """`data_deletion_begun` of a raw stored status (what InputRefs keeps of every watch event,
    without reading it whole)."""
    return any(
        isinstance(c, Mapping)
        and c.get("type") == COND_DATA_CLEARED
        and _deleting(c.get("status"), c.get("reason"))
        for c in status.get("conditions") or ()
    )


def _deleting(status: object, reason: object) -> bool:
    return status == "False" and reason == DATA_DELETING


def data_expiry(
    spec: ProjectJobSpec, since: datetime | None, previous: datetime | None = None
) -> datetime | None:
    """`ttl_expiry` of the spec's dataTtl."""
    return ttl_expiry(spec.data_ttl, since, previous)


_PHASE_REASONS: Final[dict[JobPhase, str]] = {
    JobPhase.CREATING: "Created",
    JobPhase.PREPARING: "Preparing",
    JobPhase.EXECUTING: "Executing",
    JobPhase.UPLOADING_OUTPUT: "UploadingOutput",
    JobPhase.SUCCESS: "Succeeded",
    JobPhase.ERROR: "Failed",
    JobPhase.CANCELLING: "Cancelling",
    JobPhase.CANCELLED: "Cancelled",
}
#: The reasons of phase-change Events, whose messages are chains ("new -> CREATING -> PREPARING: ...").
_PHASE_EVENT_REASONS: Final = frozenset(_PHASE_REASONS.values())


def with_phase(
    status: ProjectJobStatus, phase: JobPhase, details: str, events: list[JobEvent]
) -> ProjectJobStatus:
    """Set phase and details; a phase change is recorded as an event."""
    if status.phase != phase:
        text = f"{status.phase.value if status.phase else 'new'} -> {phase.value}" + (
            f": {details}" if details else ""
        )
        events.append(
            JobEvent(
                "Warning" if phase == JobPhase.ERROR else "Normal", _PHASE_REASONS[phase], clip(text, 1024)
            )
        )
    return status.model_copy(update={"phase": phase, "status_details": clip(details)})


def coalesce_transitions(events: Sequence[JobEvent]) -> list[JobEvent]:
    """One event for a chain of phase changes made in one step ("new -> CREATING -> PREPARING: ...").

    Each Event is a write to the API server; a new job passes CREATING and PREPARING in its first
    step, a short one EXECUTING, UPLOADING_OUTPUT and SUCCESS in one. The chain keeps the story and
    the last change's reason (and Warning type if any link was one).
    """
    reasons = _PHASE_EVENT_REASONS
    out: list[JobEvent] = []
    for event in events:
        prev = out[-1] if out else None
        if prev is not None and prev.reason in reasons and event.reason in reasons:
            head, _, _ = prev.message.partition(": ")
            last_phase = head.rpartition(" -> ")[2]
            if event.message.startswith(f"{last_phase} -> "):
                kind: Literal["Normal", "Warning"] = (
                    "Warning" if "Warning" in (prev.type, event.type) else "Normal"
                )
                message = head + event.message[len(last_phase) :]
                out[-1] = JobEvent(kind, event.reason, clip(message, 1024))
                continue
        out.append(event)
    return out


def with_passed_phases(events: Sequence[JobEvent], passed: Sequence[str]) -> list[JobEvent]:
    """The step's Events with phase changes coalesced, the chain also telling the phases the job
    passed since the stored status.

    `passed` are phases seen in steps whose status write was held back (write_delay): they were
    never written, but `kubectl describe pj` should still tell them ("PREPARING -> EXECUTING ->
    UPLOADING_OUTPUT -> SUCCESS").
    """
    out = coalesce_transitions(events)
    if not passed:
        return out
    for i, event in enumerate(out):
        if event.reason in _PHASE_EVENT_REASONS:
            head, sep, details = event.message.partition(": ")
            chain = head.split(" -> ")
            middle = [p for p in passed if p not in chain]
            if middle:
                message = " -> ".join([chain[0], *middle, *chain[1:]]) + sep + details
                out[i] = JobEvent(event.type, event.reason, clip(message, 1024))
            break
    return out


def phase_hops(events: Sequence[JobEvent]) -> list[tuple[str, str]]:
    """Every phase change the Events tell, in order: ("NONE", "CREATING"), ("CREATING",
    "PREPARING") for "new -> CREATING -> PREPARING: ...".

    `dsjobs_job_transitions_total` counts these, so that it tells what `kubectl describe` does,
    the phases a step passed and those the write pacing held back included."""
    hops: list[tuple[str, str]] = []
    for event in events:
        if event.reason in _PHASE_EVENT_REASONS:
            chain = event.message.partition(": ")[0].split(" -> ")
            chain[0] = "NONE" if chain[0] == "new" else chain[0]
            hops += pairwise(chain)
    return hops


def finish(
    spec: ProjectJobSpec | None,
    status: ProjectJobStatus,
    outcome: Outcome,
    now: datetime,
    events: list[JobEvent],
    *,
    ended_at: datetime | None = None,
) -> ProjectJobStatus:
    """Move to a final phase: finishedAt, data expiry, return code, the Finished and Ended
    conditions. `ended_at`: when the pod's containers ended, which is finishedAt rather than
    `now`: an operator away meanwhile (a crash, a rollout, a standby waiting on the Lease) saw the
    end only later, and its downtime went into the run time, the data expiry and the metrics."""
    if (
        outcome.phase == JobPhase.CANCELLED
        and spec is not None
        and spec.cancel is not None
        and spec.cancel.reason
    ):
        # The reason stays told once the job is final (CANCELLING said it while it lasted).
        outcome = dataclasses.replace(outcome, message=f"{outcome.message}: {spec.cancel.reason}")
    status = with_phase(status, outcome.phase, outcome.message, events)
    finished_at = status.finished_at or (min(ended_at, now) if ended_at is not None else now)
    update: dict[str, object] = {"finished_at": finished_at}
    if status.started_at is not None and status.started_at > finished_at:
        # startedAt is the node's clock (the job container's start), finishedAt the operator's: a
        # node ahead would show a job that ended before it started.
        update["started_at"] = finished_at
    # A TTL out of range (a kubectl edit after the start) is not used: the expiry stays the last
    # valid one (none for a job that ran), and the final plan says why (_data_lifetime).
    update["data_expires_at"] = (
        None if spec is None else data_expiry(spec, finished_at, status.data_expires_at)
    )
    if outcome.return_code is not None or not outcome.program_ran:
        update["return_code"] = outcome.return_code
    status = drop_conditions(status.model_copy(update=update), COND_RETRYING)
    value: Literal["True", "False"] = "True" if outcome.phase == JobPhase.SUCCESS else "False"
    message = outcome.message or outcome.reason
    status = set_condition(status, COND_FINISHED, value, outcome.reason, message, now)
    return set_condition(status, COND_ENDED, "True", _PHASE_REASONS[outcome.phase], message, now)


def fail(
    spec: ProjectJobSpec | None, status: ProjectJobStatus, reason: str, message: str, now: datetime
) -> StatusUpdate:
    """ERROR with a message naming the cause (invalid spec, missing volume, unknown type...)."""
    events: list[JobEvent] = []
    new = finish(spec, status, Outcome(JobPhase.ERROR, reason, message), now, events)
    return StatusUpdate(new, tuple(events))


def graceful_timeout(spec: ProjectJobSpec) -> timedelta:
    """The job's graceful-shutdown timeout; zero without graceful-shutdown parameters."""
    params = spec.job_parameters.graceful_shutdown_parameters
    if params is None:
        return timedelta()
    return params.timeout if params.timeout is not None else DEFAULT_GRACEFUL_TIMEOUT


# --- reading the pod ---------------------------------------------------------------------------


def disruption_of(pod: PodView) -> tuple[str, str] | None:
    """(reason, message) when Kubernetes itself ended (or is ending) the pod."""
    cond = pod.condition("DisruptionTarget")
    if cond is not None and cond.status == "True":
        if cond.reason == "TerminationByKubelet" and pod.reason in _POD_REASONS:
            # The kubelet says which (a node shutdown: Terminated; node pressure: Evicted).
            reason, text = _POD_REASONS[pod.reason]
            return reason, f"{text}: {pod.message}" if pod.message else text
        reason, text = _DISRUPTION_REASONS.get(cond.reason, ("Disrupted", "the pod was disrupted"))
        return reason, f"{text}: {cond.message}" if cond.message else text
    if pod.reason in _POD_REASONS:
        reason, text = _POD_REASONS[pod.reason]
        return reason, f"{text}: {pod.message}" if pod.message else text
    return None


def _never_ran_text(job: ContainerView) -> str:
    text = job.message or job.reason
    if "argument list too long" in text.lower():
        # E2BIG at exec: the container's environment holds a value over Linux's MAX_ARG_STRLEN. The
        # job's own variables are capped below it (env-value-length); the project secrets (envFrom) are not.
        text += (
            f"; an environment variable is longer than Linux allows (128 KiB per variable): check the"
            f" values of the project secrets (Secret {PROJECT_SECRETS_NAME})"
        )
    return text


def evicted_from_lost_node(pod: PodView, now: datetime) -> bool:
    """Kubernetes evicted the pod from a node that stopped reporting: no end will ever be reported
    (the node is gone), and the pod stays until the node reports again or leaves the cluster.

    The taint manager evicts for any NoExecute taint the pod does not tolerate, a node that still
    reports among them (not-ready with its kubelet alive, an admin's taint): its kubelet stops the
    pod within its grace, and the pod ends as any evicted one. So the node is taken as silent only
    when the node lifecycle controller marked the pod (`node_not_ready`), or the deletion's grace
    has passed with no kubelet ending it (see `lost_node_check`)."""
    if not _taint_evicted(pod):
        return False
    return pod.node_not_ready or pod.deleted_at is None or now >= pod.deleted_at


def _taint_evicted(pod: PodView) -> bool:
    return pod.deleting and deleted_for_its_node(pod)


def deleted_for_its_node(pod: PodView) -> bool:
    """The pod is being (or was) deleted for its node's loss (the taint manager, the pod GC)."""
    disruption = disruption_of(pod)
    return disruption is not None and disruption[0] == "NodeLost"


def lost_node_check(pod: PodView, now: datetime) -> timedelta | None:
    """When to look again at a pod evicted by a taint that is not (yet) known to be on a silent
    node: at its deletion's deadline, which a reporting kubelet meets."""
    if not _taint_evicted(pod) or evicted_from_lost_node(pod, now) or pod.deleted_at is None:
        return None
    return pod.deleted_at - now + timedelta(seconds=1)


# The kubelet's message when an emptyDir outgrows its sizeLimit (pkg/kubelet/eviction).
_EMPTY_DIR_EVICTION = re.compile(r'Usage of EmptyDir volume "([^"]*)" exceeds the limit "([^"]*)"')
# ... and when a container, or the pod as a whole, outgrows an ephemeral-storage limit (the
# InstanceType's resources may set one): the files the job writes outside its volumes.
_CONTAINER_STORAGE_EVICTION = re.compile(
    r'Container (\S+) exceeded its local ephemeral storage limit "([^"]*)"'
)
_POD_STORAGE_EVICTION = re.compile(
    r"Pod ephemeral local storage usage exceeds the total limit of containers (\S+?)\.?\s*$"
)
_WRITABLE_LAYER = (
    "files outside its working directory (/tmp, $HOME: the image's writable layer)",
    "write big files into the working directory, or choose an instance type with a larger "
    "ephemeral-storage limit",
)
# The pod's total counts its emptyDirs (the working directory, logs and packages) with the
# containers' writable layers: anything of it may be what grew.
_POD_STORAGE = (
    "local files (working directory, logs and Python packages, and files outside them such as /tmp)",
    "declare working-storage for a big working directory, or choose an instance type with a larger "
    "ephemeral-storage limit",
)


#: What each volume on the system disk holds, and what gives a job more room.
_SYSTEM_DISK_VOLUMES: Final[dict[str, tuple[str, str]]] = {
    WORK_VOLUME: ("working directory", "declare working-storage for more room"),
    SHARED_VOLUME: (
        "logs and Python packages",
        "the limit is the same with working-storage: print less, or install fewer packages",
    ),
}


def system_disk_exceeded(pod: PodView) -> tuple[str, str, str] | None:
    """(what, limit, advice) when the kubelet evicted the pod because the job's scratch working directory,
    or its logs and pip-installed packages, outgrew the instance type's system disk: the job's own
    doing, not a disruption."""
    if pod.reason != "Evicted":
        return None
    container = _CONTAINER_STORAGE_EVICTION.search(pod.message or "")
    if container is not None and container.group(1) == JOB_CONTAINER:
        return _WRITABLE_LAYER[0], f"{container.group(2)} ephemeral-storage limit", _WRITABLE_LAYER[1]
    whole = _POD_STORAGE_EVICTION.search(pod.message or "")
    if whole is not None:
        return _POD_STORAGE[0], f"{whole.group(1)} ephemeral-storage limit of the pod", _POD_STORAGE[1]
    match = _EMPTY_DIR_EVICTION.search(pod.message or "")
    if match is None or match.group(1) not in _SYSTEM_DISK_VOLUMES:
        return None
    what, advice = _SYSTEM_DISK_VOLUMES[match.group(1)]
    return what, f"{match.group(2)} limit (the instance type's system disk)", advice


# The scheduler's verdict on a pod whose claim is gone (its VolumeBinding plugin).
_CLAIM_GONE = re.compile(r'persistentvolumeclaim "([^"]+)" (?:not found|is being deleted)')


def claim_gone(pod: PodView) -> str | None:
    """The claim (a project disk, S3 mount, dataset) the scheduler says the unscheduled pod's
    volume names but is deleted or being deleted, or None. The operator checked every claim before
    it made the pod, so it went since: nothing will schedule the pod. The pod's own ephemeral
    claims (`<pod>-<volume>`, made after it) are not such a verdict."""
    if pod.scheduled or pod.gone:
        return None
    cond = pod.condition("PodScheduled")
    if cond is None or cond.status != "False":
        return None
    match = _CLAIM_GONE.search(cond.message)
    if match is None or match.group(1).startswith(f"{pod.name}-"):
        return None
    return match.group(1)


def _stuck_container(pod: PodView) -> ContainerView | None:
    """The first container that cannot start (image pull, container config errors)."""
    for c in (*pod.init_containers, *pod.containers):
        if c.state == "waiting" and (c.reason in FAILING_WAITING or c.reason in FATAL_WAITING):
            return c
    return None


def _exit_text(code: int) -> str:
    if 128 < code <= 128 + MAX_SIGNAL:
        return f"Program returned code {code} (killed by signal {code - 128})"
    return f"Program returned code {code}"


#: Linux's highest signal number (SIGRTMAX): 255 is no "signal 127", it is an exit code.
MAX_SIGNAL: Final = 64


def _memory_limit_text(pod: PodView) -> str:
    limit = dict(pod.memory_limits).get(JOB_CONTAINER)
    if not limit:
        return ""
    of_type = f" of instance type {pod.instance_type}" if pod.instance_type else ""
    return f"; the job container's memory limit{of_type} is {limit}"


def outcome_of(pod: PodView, result: RunnerResult | ResultPointer | None, *, cancelling: bool) -> Outcome:
    """How an attempt whose pod ended (or vanished) came out. Checked in order of precedence.

    `cancelling`: the user asked for a cancel. The runner reports `cancelled` whenever its
    container was told to stop (SIGTERM), which is also what an eviction, a preemption, a node
    drain or `kubectl delete pod` do: without a cancel request that is a disruption, not a cancel.
    """
    job = pod.container(JOB_CONTAINER)
    stage_in = pod.container(STAGE_IN_CONTAINER)
    ship = pod.container(SHIP_CONTAINER)
    exit_code = job.exit_code if job is not None and job.state == "terminated" else None
    code = result.return_code if result is not None and result.return_code is not None else exit_code
    # The runner's word when there is one: None during a setup (the job container's exit code is
    # then the entry script's, not a program's).
    program_code = result.return_code if result is not None else exit_code
    stopped = result is not None and (result.cancelled or result.status == RunnerStatus.CANCELLED)
    # The program ended by itself before the cancel reached it: the cancel was a no-op.
    ended_first = (
        result is not None
        and result.status == RunnerStatus.EXITED
        and not result.cancelled
        and code is not None
    )

    if cancelling and not ended_first:
        return Outcome(JobPhase.CANCELLED, "Cancelled", "the job was cancelled", return_code=program_code)
    # A program whose child the kernel killed for memory, and which then exited 0, succeeded.
    if job is not None and job.state == "terminated" and job.reason == "OOMKilled" and code != 0:
        return Outcome(
            JobPhase.ERROR,
            "OOMKilled",
            f"the job ran out of memory (OOMKilled{_memory_limit_text(pod)}); "
            "choose an instance type with more RAM",
            return_code=code if code is not None else 137,
            failure=FailureKind.PROGRAM,
        )
    disruption = disruption_of(pod)
    # A stage-in stopped from outside (an eviction, a preemption, a drain, the pod deleted) failed
    # for no fault of the inputs: that is the disruption's outcome, which a retry policy retries.
    # Only a stage-in ended by the stop's signal (TERM, or KILL after the grace): one that
    # failed by itself before a drain evicted its pod stays its own failure.
    stage_in_stopped = (
        stage_in is not None
        and stage_in.state == "terminated"
        and stage_in.reason != "OOMKilled"
        and stage_in.exit_code in _STOP_EXIT_CODES
        and (disruption is not None or pod.deleting)
    )
    if not stage_in_stopped:
        if result is not None and result.status == RunnerStatus.STAGE_IN_FAILED:
            # The object store's trouble is not the inputs': another attempt may well find it back.
            store_down = bool(result.storage_unavailable)
            return Outcome(
                JobPhase.ERROR,
                "StorageUnavailable" if store_down else "StageInFailed",
                f"staging inputs failed: {result.reason}",
                failure=FailureKind.INFRASTRUCTURE if store_down else FailureKind.PERMANENT,
            )
        if stage_in is not None and stage_in.state == "terminated" and stage_in.reason in NEVER_RAN:
            # The runner's image could not start on the node ("exec format error": an arm64 node
            # for an amd64-only image): nothing of the job's, and another node may take it.
            image = dict(pod.images).get(stage_in.name, "")
            what = f"container {stage_in.name}" + (f" (the runner's image {image})" if image else "")
            return Outcome(
                JobPhase.ERROR,
                stage_in.reason,
                f"{what} could not run on node {pod.node_name}: {_never_ran_text(stage_in)}",
                program_ran=False,
                failure=FailureKind.INFRASTRUCTURE,
            )
        if stage_in is not None and stage_in.state == "terminated" and stage_in.exit_code:
            # Its own termination message is the result then: with the store down, result.json
            # could not be stored, and the ship never ran.
            staged = _stage_in_result(stage_in)
            store_down = staged is not None and bool(staged.storage_unavailable)
            return Outcome(
                JobPhase.ERROR,
                "StorageUnavailable" if store_down else "StageInFailed",
                f"staging inputs failed: {_stage_in_failure(stage_in)}",
                failure=FailureKind.INFRASTRUCTURE if store_down else FailureKind.PERMANENT,
            )
    if result is not None and result.status == RunnerStatus.SETUP_FAILED:
        return Outcome(
            JobPhase.ERROR,
            "SetupFailed",
            f"the job's environment could not be set up: {result.reason}",
            program_ran=False,
            failure=FailureKind.PERMANENT,
        )
    if code is not None and result is not None and result.status == RunnerStatus.EXITED and not stopped:
        unrecorded = isinstance(result, ResultPointer) and bool(
            result.outputs_count or result.file_errors_count
        )
        if code == 0 and (result.storage_unavailable or unrecorded):
            # As DataSphere does, a program that succeeded makes a successful job; what the store
            # lost is told by the file errors (`apply_result`), and here why.
            return Outcome(
                JobPhase.SUCCESS,
                "Succeeded",
                "the program succeeded, but "
                + (
                    "the object store kept failing while its outputs and logs were stored: see the "
                    "file errors"
                    if result.storage_unavailable
                    else "the runner's record of its outputs (result.json) could not be read"
                ),
                return_code=0,
            )
        return _exit_outcome(code)
    full = system_disk_exceeded(pod)
    if full is not None:
        what, limit, advice = full
        return Outcome(
            JobPhase.ERROR,
            "WorkingDirFull",
            f"the job's {what} outgrew the {limit} and the pod was evicted; {advice}",
            return_code=code,
            failure=FailureKind.PERMANENT,
        )
    if disruption is not None:
        # An active deadline (set by a policy of the cluster, not dsjobs) ends every attempt alike.
        again = FailureKind.PERMANENT if disruption[0] == "DeadlineExceeded" else FailureKind.INFRASTRUCTURE
        return Outcome(JobPhase.ERROR, disruption[0], disruption[1], return_code=code, failure=again)
    lost = [c.name for c in (*pod.init_containers, *pod.containers) if c.reason == STATE_LOST]
    if lost:
        # Its 255 is the runtime's placeholder: read as the program's exit code, or a stage-in's
        # failure (never retried), the inputs or the program took the blame of a reboot.
        return Outcome(
            JobPhase.ERROR,
            "NodeRestarted",
            f"the node {pod.node_name or 'of the pod'} or its container runtime restarted while the "
            f"job ran: the state of its containers ({', '.join(lost)}) was lost",
            return_code=code,
            failure=FailureKind.INFRASTRUCTURE,
        )
    if (pod.gone and (exit_code is None or stopped)) or stage_in_stopped:
        return Outcome(
            JobPhase.ERROR,
            "PodDeleted",
            f"the job's pod {pod.name} was deleted before the job finished",
            return_code=code,
            failure=FailureKind.INFRASTRUCTURE,
        )
    if stopped and pod.deleted_at is None:
        # Neither deleted nor disrupted, yet stopped: the signal came from inside the job container
        # (its program killed the entry script: `kill $PPID`, `pkill -f job`). The program's doing,
        # not a pod stopped by someone, which is retried as a failure of the infrastructure.
        inside = "the job's entry script was sent a stop signal from inside its container"
        if program_code is None:  # during setup
            return Outcome(
                JobPhase.ERROR,
                "StoppedFromInside",
                f"{inside} before the program ran",
                failure=FailureKind.PROGRAM,
                program_ran=False,
            )
        exited = _exit_outcome(program_code)
        if exited.phase == JobPhase.SUCCESS:
            return exited
        return replace(exited, message=f"{exited.message} ({inside})")
    if stopped:
        return Outcome(
            JobPhase.ERROR,
            "PodStopped",
            f"the job's pod {pod.name} was stopped before the job finished (deleted or evicted, "
            "not cancelled)",
            return_code=code,
            failure=FailureKind.INFRASTRUCTURE,
        )
    if result is None and ship is not None and ship.state == "terminated" and not ship.message:
        # The ship sidecar reports every attempt that it saw through; no report means it died (e.g.
        # its own OOM kill) and the outputs and logs were not (all) uploaded.
        how = ship.reason or "ended"
        how += f", exit code {ship.exit_code}" if ship.exit_code is not None else ""
        program = f"; {_exit_text(code)}" if code is not None else ""
        return Outcome(
            JobPhase.ERROR,
            "RunnerFailed",
            f"the runner's ship container failed ({how}) without reporting the job's outputs and "
            f"logs{program}",
            return_code=code,
            failure=FailureKind.INFRASTRUCTURE,
        )
    if code is not None:
        # No (readable) runner result: the job container's exit code is all there is.
        return _exit_outcome(code)
    message = pod.message or pod.reason or "the pod ended before the job's program ran"
    return Outcome(
        JobPhase.ERROR, "PodFailed", f"pod {pod.name} failed: {message}", failure=FailureKind.INFRASTRUCTURE
    )


#: A container's exit codes when it was stopped: SIGTERM, or SIGKILL once its grace was over.
_STOP_EXIT_CODES: Final = frozenset({128 + 15, 128 + 9})


def _stage_in_result(container: ContainerView) -> RunnerResult | ResultPointer | None:
    """The runner result in a stage-in's termination message (the Python stage-in writes one)."""
    text = container.message or ""
    if not text.lstrip().startswith("{"):
        return None
    try:
        return parse_termination_message(text)
    except ValueError:
        return None


def _stage_in_failure(container: ContainerView) -> str:
    """What a failed stage-in said: the reason of its runner result (the Python stage-in), else its
    termination message as is (the shell stage-in's stderr), else how it ended."""
    parsed = _stage_in_result(container)
    if parsed is not None and parsed.reason:
        return parsed.reason
    text = container.message or ""
    return text.strip() or container.reason or f"exit code {container.exit_code}"


def _exit_outcome(code: int) -> Outcome:
    if code == 0:
        return Outcome(JobPhase.SUCCESS, "Succeeded", "", return_code=0)
    return Outcome(
        JobPhase.ERROR, "NonZeroExit", _exit_text(code), return_code=code, failure=FailureKind.PROGRAM
    )


def may_retry(spec: ProjectJobSpec, status: ProjectJobStatus, outcome: Outcome) -> bool:
    """Whether the retry policy gives this failed attempt another go."""
    policy = spec.retry_policy
    if policy is None or outcome.failure is None or spec.cancel is not None:
        return False
    if status.retried_failures + 1 >= policy.max_attempts:
        return False
    if outcome.failure == FailureKind.INFRASTRUCTURE:
        return True
    return outcome.failure == FailureKind.PROGRAM and outcome.return_code in policy.retry_on_exit_codes


def _declared(spec: ProjectJobSpec) -> dict[str, FileDesc]:
    """Declared outputs by their location in the working directory (what the runner reports)."""
    found: dict[str, FileDesc] = {}
    for desc in spec.job_parameters.output_files:
        try:
            found[job_relative_path(desc)] = desc
        except ValueError:
            continue
    return found


def apply_result(
    spec: ProjectJobSpec, status: ProjectJobStatus, result: RunnerResult | ResultPointer | None
) -> ProjectJobStatus:
    """Outputs, logs, file errors and progress from the runner's full result.

    Outputs are recorded under the desc the job declared (path as the client wrote it), which is
    what the API hands back to the CLI to place downloaded files.
    """
    if isinstance(result, ResultPointer):
        if not (result.outputs_count or result.file_errors_count):
            return status
        # Only the termination message's pointer is left of the report: the outputs may be in
        # the store, but nothing says which, with what content; each is told, never silently
        # missing.
        lost = "the runner's record of the job's outputs (result.json) could not be stored or read"
        return status.model_copy(
            update={
                "file_errors": [
                    FileError(output_file_desc=desc, description=lost, type=FileErrorType.UPLOAD_FAILED)
                    for desc in spec.job_parameters.output_files
                ]
            }
        )
    if not isinstance(result, RunnerResult):
        return status
    declared = _declared(spec)

    def desc_of(path: str, var: str | None) -> FileDesc:
        return declared.get(path) or FileDesc(path=path, var=var or "")

    outputs = [
        StoredFile(
            desc=desc_of(o.path, o.var),
            sha256=o.sha256,
            size_bytes=o.size_bytes,
            compression_type=CompressionType(o.compression.value),
            key=o.key,
        )
        for o in result.outputs
    ]

    def stored(files: list[LogFileResult]) -> list[StoredFile]:
        return [
            StoredFile(desc=FileDesc(path=f.name), sha256=f.sha256, size_bytes=f.size_bytes, key=f.key)
            for f in files
        ]

    logs, diagnostics = stored(result.log_files), stored(result.diagnostic_files)
    errors = [
        FileError(
            output_file_desc=desc_of(e.path, e.var) if e.path else None,
            log_file_name=None if e.path else (e.log_file_name or ""),
            description=clip(e.description, MAX_DESC_LENGTH),
            type=FileErrorType(e.type.value),
        )
        for e in result.file_errors
    ]
    update: dict[str, object] = {
        "output_files": outputs,
        "log_files": logs,
        "diagnostic_files": diagnostics,
        "file_errors": bounded_file_errors(errors),
    }
    if result.progress is not None:
        update["progress"] = Progress(
            progress=max(0, min(100, result.progress.progress)),
            message=clip(result.progress.message, MAX_DESC_LENGTH),
            create_time=result.progress.create_time,
        )
    return status.model_copy(update=update)


#: File errors a job's status lists, and the bytes of their text: the status shares etcd's
#: ~1.5 MiB object with a spec of up to 1 MiB, and a refused status write would leave the job
#: unfinished for ever. The runner names at most ~300 (100 outputs: one per output, or per
#: output one counting its lost entries and one counting its links leading outside, plus 100 lost
#: entries by name; a few of the log files); a result beyond that is not one it wrote.
MAX_FILE_ERRORS_LISTED: Final = 320
MAX_FILE_ERRORS_BYTES: Final = 256 * 1024


def bounded_file_errors(errors: Sequence[FileError]) -> list[FileError]:
    """`errors` when they fit MAX_FILE_ERRORS_LISTED and MAX_FILE_ERRORS_BYTES; else the first
    that fit, and one more error, of the first left out's file, counting the rest."""

    def size(e: FileError) -> int:
        # As the API server stores them (Go escapes <, > and & in 6 bytes, control characters
        # too): a budget of raw bytes could grow 6 times in etcd.
        where = e.output_file_desc.path if e.output_file_desc else e.log_file_name or ""
        return stored_json_bytes(e.description) + stored_json_bytes(where)

    if len(errors) <= MAX_FILE_ERRORS_LISTED and sum(map(size, errors)) <= MAX_FILE_ERRORS_BYTES:
        return list(errors)
    kept: list[FileError] = []
    used = 0
    for e in errors:
        used += size(e)
        if len(kept) == MAX_FILE_ERRORS_LISTED - 1 or used > MAX_FILE_ERRORS_BYTES:
            break
        kept.append(e)
    left = len(errors) - len(kept)
    more = errors[len(kept)].model_copy(
        update={"description": f"{left} more file errors are not listed here"}
    )
    return [*kept, more]


def stored_data_size(spec: ProjectJobSpec, status: ProjectJobStatus) -> int:
    """Bytes the object store holds for the job (proto Job.data_size_bytes): its inputs and local
    modules (each content once; the project's cache may share them with other jobs), outputs, logs
    and diagnostic files. Nothing once its data is cleared."""
    if status.data_cleared:
        return 0
    params = spec.job_parameters
    inputs = {f.sha256: f.size_bytes for f in params.input_files}
    if params.env is not None and params.env.python_env is not None:
        inputs |= {m.sha256: m.size_bytes for m in params.env.python_env.local_modules}
    stored = (*status.output_files, *status.log_files, *status.diagnostic_files)
    return sum(inputs.values()) + sum(f.size_bytes for f in stored)


#: After this long staging inputs or uploading results, the operator checks the object store
#: itself (and again every so often): the runner's retries are invisible from outside the pod.
STORAGE_CHECK_AFTER: Final = timedelta(seconds=10)


def storage_bound_since(pod: PodView) -> datetime | None:
    """Since when the pod's runner has been moving the job's files: the stage-in running, or the
    ship uploading after the program ended. None when it is not."""
    stage_in = pod.container(STAGE_IN_CONTAINER)
    if stage_in is not None and stage_in.state == "running":
        return stage_in.started_at
    job, ship = pod.container(JOB_CONTAINER), pod.container(SHIP_CONTAINER)
    if job is not None and job.state == "terminated" and ship is not None and ship.state == "running":
        return job.finished_at
    return None


def _storage_hint(storage_problem: str | None) -> str:
    if not storage_problem:
        return ""
    return (
        f"; the object store does not answer the operator either ({storage_problem}): the runner keeps "
        f"trying for up to {int(STORAGE_PATIENCE_SECONDS) // 60} minutes"
    )


def _waiting_details(pod: PodView, instance_type: str, storage_problem: str | None = None) -> str:
    """What a pod that has not started the job is waiting for."""
    if pod.phase == "Unknown":
        return f"the node {pod.node_name} of pod {pod.name} is not responding"
    if not pod.scheduled:
        cond = pod.condition("PodScheduled")
        if cond is not None and cond.status == "False" and cond.reason:
            message = cond.message or cond.reason
            if "persistentvolume" in message.lower().replace(" ", ""):
                # Not a matter of capacity: a claim (working storage, a mount) is not bound yet.
                if pod.warning and pod.waits_for_ephemeral_claim:
                    # The scheduler only says it waits for the claim; this is why it never comes.
                    message = f"its claim cannot be made: {pod.warning}"
                return f"waiting for the job's volumes (instance type {instance_type}): {message}"
            coming = f"; a node is being added for it: {pod.scale_up}" if pod.scale_up else ""
            return f"waiting for capacity for instance type {instance_type}: {message}{coming}"
        return f"waiting for a node for instance type {instance_type}"
    stage_in = pod.container(STAGE_IN_CONTAINER)
    if stage_in is not None and stage_in.state == "running":
        return f"staging inputs on node {pod.node_name}{_storage_hint(storage_problem)}"
    for c in (*pod.init_containers, *pod.containers):
        if c.state == "waiting" and c.reason and c.reason not in ("PodInitializing", "ContainerCreating"):
            return f"container {c.name}: {c.reason}" + (f": {c.message}" if c.message else "")
    if pod.warning and pod.setting_up:
        # A kubelet names no reason on the containers while it mounts volumes; its Events do.
        return f"starting on node {pod.node_name}: {pod.warning}"
    return f"starting on node {pod.node_name}"


def _observe_scheduling(
    status: ProjectJobStatus, pod: PodView, now: datetime, events: list[JobEvent]
) -> ProjectJobStatus:
    if pod.gone and not pod.scheduled:
        return status  # a pod known only to be gone says nothing of where it ran
    if pod.scheduled:
        return set_condition(status, COND_SCHEDULED, "True", "Scheduled", f"on node {pod.node_name}", now)
    cond = pod.condition("PodScheduled")
    reason = cond.reason if cond is not None and cond.reason else "Pending"
    message = cond.message if cond is not None else ""
    old = get_condition(status, COND_SCHEDULED)
    if pod.unschedulable and (old is None or old.reason != reason):
        events.append(JobEvent("Warning", "Unschedulable", clip(message or "no node fits the pod", 1024)))
    return set_condition(status, COND_SCHEDULED, "False", reason, message, now)


def _observe_node(
    status: ProjectJobStatus, pod: PodView, now: datetime, events: list[JobEvent]
) -> ProjectJobStatus:
    """NodeReachable False while the running pod's node has stopped reporting (told once), True
    again when it reports; absent while nothing happened. Until Kubernetes evicts the pod (then
    the attempt is NodeLost), nobody can tell whether the program still runs there."""
    old = get_condition(status, COND_NODE_REACHABLE)
    if pod.node_not_ready:
        ready = pod.condition("Ready")
        since = ready.last_transition_time if ready is not None else None
        when = f" at {since.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}" if since is not None else ""
        grace = pod.unreachable_toleration_seconds
        if grace is None:
            then = "Kubernetes evicts the pod"
        elif grace == TOLERATED_FOREVER:
            then = "the pod stays bound to it (it tolerates an unreachable node for ever)"
        else:
            then = f"Kubernetes evicts the pod {grace}s after that unless the node comes back"
        message = (
            f"node {pod.node_name} stopped reporting{when}; {then}; the program may still be running there"
        )
        if old is None or old.status != "False":
            events.append(JobEvent("Warning", "NodeNotReady", clip(message, 1024)))
        return set_condition(status, COND_NODE_REACHABLE, "False", "NodeNotReady", message, now)
    if old is not None and old.status == "False":
        message = f"node {pod.node_name} reports again"
        events.append(JobEvent("Normal", "NodeReady", message))
        return set_condition(status, COND_NODE_REACHABLE, "True", "NodeReady", message, now)
    return status


def _silent_node_details(status: ProjectJobStatus) -> str:
    """ "; <what NodeReachable=False says>" while the pod's node is silent, else ""."""
    silent = get_condition(status, COND_NODE_REACHABLE)
    return f"; {silent.message}" if silent is not None and silent.status == "False" else ""


def compute_status(
    spec: ProjectJobSpec,
    status: ProjectJobStatus,
    pod: PodView,
    result: RunnerResult | ResultPointer | None,
    now: datetime,
    settings: OperatorSettings,
    *,
    instance_type: str = "",
    storage_problem: str | None = None,
) -> StatusUpdate:
    """The status after observing the current attempt's pod.

    Only the pod-driven part of the lifecycle; starting attempts, cancel requests, fallbacks and
    data are plan.py's. `status` belongs to a job whose current attempt's pod was created.
    `storage_problem`: what the operator's own check of the object store said, while the pod's
    runner moves the job's files (`storage_bound_since`); the details pass it on.
    """
    update = _compute_status(
        spec, status, pod, result, now, settings, instance_type=instance_type, storage_problem=storage_problem
    )
    # A silent node sends no event when the eviction's grace passes: the timer is the only news.
    check = lost_node_check(pod, now)
    if check is not None and (update.requeue_after is None or check < update.requeue_after):
        update = dataclasses.replace(update, requeue_after=check)
    return update


def _compute_status(
    spec: ProjectJobSpec,
    status: ProjectJobStatus,
    pod: PodView,
    result: RunnerResult | ResultPointer | None,
    now: datetime,
    settings: OperatorSettings,
    *,
    instance_type: str,
    storage_problem: str | None,
) -> StatusUpdate:
    events: list[JobEvent] = []
    if status.phase is not None and status.phase.is_final:
        return StatusUpdate(status)
    cancelling = status.phase == JobPhase.CANCELLING
    status = _observe_scheduling(status, pod, now, events)

    job = pod.container(JOB_CONTAINER)
    if job is not None and job.started_at is not None:
        if status.started_at != job.started_at:
            status = status.model_copy(update={"started_at": job.started_at})
        status = set_condition(
            status,
            COND_STARTED,
            "True",
            "Started",
            "the job's container started (its setup, then its program)",
            now,
        )

    disruption = disruption_of(pod)
    if pod.terminal or evicted_from_lost_node(pod, now):
        # A cancel the operator had no time to write down still makes a stopped program CANCELLED.
        outcome = outcome_of(pod, result, cancelling=cancelling or spec.cancel is not None)
        status = apply_result(spec, status, result)
        if outcome.phase == JobPhase.ERROR and may_retry(spec, status, outcome):
            status = drop_conditions(status, COND_RETRYING).model_copy(
                update={"return_code": outcome.return_code}
            )
            status = set_condition(status, COND_RETRYING, "True", outcome.reason, outcome.message, now)
            events.append(
                JobEvent(
                    "Warning", "AttemptFailed", clip(f"attempt {status.attempt}: {outcome.message}", 1024)
                )
            )
            return StatusUpdate(status, tuple(events), retry=True)
        return StatusUpdate(finish(spec, status, outcome, now, events, ended_at=pod.ended_at), tuple(events))

    if cancelling:
        details = "cancelling" + (
            f": {spec.cancel.reason}" if spec.cancel is not None and spec.cancel.reason else ""
        )
        if spec.cancel is not None and spec.cancel.graceful and graceful_timeout(spec):
            details += f" (graceful shutdown, up to {int(graceful_timeout(spec).total_seconds())}s)"
        # A silent node cannot confirm the program's end: the cancel waits for its eviction.
        status = _observe_node(status, pod, now, events)
        details += _silent_node_details(status)
        return StatusUpdate(with_phase(status, JobPhase.CANCELLING, details, events), tuple(events))

    stuck = _stuck_container(pod)
    if stuck is not None:
        image = dict(pod.images).get(stuck.name, "")
        what = f"container {stuck.name}" + (f" (image {image})" if image else "")
        message = f"{what}: {stuck.reason}" + (f": {stuck.message}" if stuck.message else "")
        if stuck.reason in FATAL_WAITING:
            return fail(spec, status, stuck.reason, message, now)
        before = get_condition(status, COND_CONTAINERS_CREATED)
        status = set_condition(status, COND_CONTAINERS_CREATED, "False", stuck.reason, message, now)
        since = get_condition(status, COND_CONTAINERS_CREATED)
        assert since is not None and since.last_transition_time is not None
        if before is None or before.status != "False":
            events.append(JobEvent("Warning", stuck.reason, clip(message, 1024)))
        limit = timedelta(seconds=settings.image_pull_timeout_seconds)
        if now - since.last_transition_time >= limit:
            kind = (
                "the image could not be pulled"
                if stuck.reason in IMAGE_PULL_REASONS
                else "a container could not start"
            )
            return fail(
                spec, status, stuck.reason, f"{kind} for {int(limit.total_seconds())}s: {message}", now
            )
        new = with_phase(status, JobPhase.PREPARING, message, events)
        return StatusUpdate(new, tuple(events), requeue_after=later(since.last_transition_time, limit) - now)
    if any(c.state != "waiting" for c in (*pod.init_containers, *pod.containers)):
        status = set_condition(status, COND_CONTAINERS_CREATED, "True", "Created", "", now)

    if job is not None and job.state == "running":
        details = f"running on node {pod.node_name}" + (f"; {disruption[1]}" if disruption else "")
        status = _observe_node(status, pod, now, events)
        details += _silent_node_details(status)
        return StatusUpdate(with_phase(status, JobPhase.EXECUTING, details, events), tuple(events))
    if job is not None and job.state == "terminated" and job.reason in NEVER_RAN:
        image = dict(pod.images).get(job.name, "")
        what = f"container {job.name}" + (f" (image {image})" if image else "")
        return fail(spec, status, job.reason, f"{what} could not run: {_never_ran_text(job)}", now)
    # While the runner moves files, plan again now and then: the operator's check of the object
    # store is what tells a stalled transfer from a slow one. So too while the pod waits on what
    # only its Events tell (the glue asks them).
    check = STORAGE_CHECK_AFTER if storage_bound_since(pod) is not None else None
    if pod.waits_on_events:
        check = SETUP_PATIENCE
    if job is not None and job.state == "terminated" and job.exit_code is not None:
        if job.exit_code == SETUP_FAILED_EXIT:
            # The entry script's code for a failed setup (pip): most likely no program ran; the
            # runner's result says which.
            details = (
                f"the job container exited with code {job.exit_code} (its setup failed, or the program "
                "returned it); uploading outputs and logs"
            )
        else:
            status = status.model_copy(update={"return_code": job.exit_code})
            details = f"the program exited with code {job.exit_code}; uploading outputs and logs"
        details += _storage_hint(storage_problem)
        new = with_phase(status, JobPhase.UPLOADING_OUTPUT, details, events)
        return StatusUpdate(new, tuple(events), requeue_after=check)
    details = (
        disruption[1]
        if disruption is not None
        else _waiting_details(pod, instance_type or pod.instance_type, storage_problem)
    )
    return StatusUpdate(
        with_phase(status, JobPhase.PREPARING, details, events), tuple(events), requeue_after=check
    )
