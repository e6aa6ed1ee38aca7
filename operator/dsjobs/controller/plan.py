"""One reconcile step of a ProjectJob, as a pure function of what the operator observed.

    plan(job, pods, catalog, result, now, settings) -> Plan(status, actions, events, requeue_after)

The glue (handlers.py) performs the actions in order, then writes `status` if it changed; after a
step without actions (a status-only step, e.g. "attempt 2 goes to the next instance type") it
plans again, so an intent is recorded before it is acted on. That ordering makes a SIGKILL at any
moment safe:

- a pod is created *before* the status names it; a pod found in the cluster but not in the status
  is adopted (its attempt label says which), so a crash in between duplicates nothing;
- a new attempt (fallback, retry) is written to the status *before* its pod is created, and the
  previous attempt's pod must be gone before the new one is created: never two at once;
- a final status (with the runner's result) is written *before* the pod is deleted;
- stored data is deleted *before* `dataCleared` is set; the finalizer is removed last.

Timers are derived from timestamps in the cluster (pod creation, condition transition times,
finishedAt, dataExpiresAt) and come back as `requeue_after`, so they survive restarts.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final

from pydantic import ValidationError

from dsjobs.controller.names import (
    EXECUTE_REQUESTED_AT,
    FINALIZER,
    JOB_LABEL,
    PROJECT_LABEL,
    output_dataset_id,
    pod_name,
)
from dsjobs.controller.podview import PodView, parse_time
from dsjobs.controller.render import made_from
from dsjobs.controller.settings import OperatorSettings
from dsjobs.controller.status import (
    ATTEMPT_CONDITIONS,
    COND_DATA_CLEARED,
    COND_DATA_TTL_VALID,
    COND_FINALIZED,
    COND_FINISHED,
    COND_RETRYING,
    COND_SCHEDULED,
    COND_STATUS_READABLE,
    DATA_DELETING,
    JobEvent,
    Outcome,
    StatusUpdate,
    claim_gone,
    clip,
    compute_status,
    data_deletion_begun,
    data_expiry,
    drop_conditions,
    evicted_from_lost_node,
    fail,
    finish,
    get_condition,
    graceful_timeout,
    later,
    set_condition,
    stored_data_size,
    ttl_expiry,
    with_phase,
)
from dsjobs.models import (
    InstanceTypeSpec,
    JobPhase,
    OutputDataset,
    ProjectJobSpec,
    ProjectJobStatus,
    format_duration,
)
from dsjobs.models.base import drop_paths, parse_duration, read_stored
from dsjobs.models.limits import DEFAULT_DATA_TTL, LABEL_VALUE_PATTERN, MAX_JOB_NAME, RESOURCE_ID_PATTERN
from dsjobs.records import format_datetime
from dsjobs.runner.contract import FORCED_CANCEL_WORD_CONTRACT
from dsjobs.runner.result import ResultPointer, RunnerResult
from dsjobs.validation import Problem, data_ttl_problem, format_problems, parse_job_spec

#: The details of a job waiting for its execute request.
UNEXECUTED_DETAILS: Final = (
    "waiting for spec.execute: true (the API sets it after the client's uploads; set it yourself "
    "when applying the job by hand)"
)
# How long a deleted job waits for its pods to be gone before its stored data is deleted.
DELETE_POD_WAIT: Final = timedelta(seconds=30)
#: How old a pod must be before the scheduler's "persistentvolumeclaim not found" ends its job.
CLAIM_GONE_PATIENCE: Final = timedelta(seconds=30)


@dataclass(frozen=True)
class JobView:
    """The parts of a ProjectJob object the plan reads."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    generation: int
    created_at: datetime | None
    deleting: bool
    finalizers: tuple[str, ...]
    spec: Mapping[str, Any]
    status: ProjectJobStatus
    # What of the stored status could not be read ("": all of it was), each part naming its field:
    # `status` holds the rest, and the plan leaves the job alone (_plan_unreadable_status).
    status_problem: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    deleted_at: datetime | None = None
    execute_requested_at: datetime | None = None  # the API's annotation (EXECUTE_REQUESTED_AT)
    # The project of the job's namespace (its dsjobs.dev/project-id label; "" unlabelled), looked
    # up by the glue before a job's first pod; None: not known (not looked up, or not readable).
    namespace_project: str | None = None
    # The namespace that holds that project (names.project_holder: another one may carry the same
    # label); None: not known (namespaces not listable).
    project_namespace: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobView:
        meta = body.get("metadata") or {}
        status, problem = read_status(body.get("status") or {})
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            generation=int(meta.get("generation") or 0),
            created_at=parse_time(meta.get("creationTimestamp")),
            deleting=bool(meta.get("deletionTimestamp")),
            finalizers=tuple(meta.get("finalizers") or ()),
            spec=body.get("spec") or {},
            status=status,
            status_problem=problem,
            labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
            deleted_at=parse_time(meta.get("deletionTimestamp")),
            execute_requested_at=parse_time((meta.get("annotations") or {}).get(EXECUTE_REQUESTED_AT)),
        )


def read_status(raw: Any) -> tuple[ProjectJobStatus, str]:
    """A stored status as far as it can be read, and what could not be ("": nothing).

    Keys this version does not know are skipped without a word: fields of a newer dsjobs (a CRD
    applied before its operator, a rollback), as `models.base.read_stored` reads them. A value of a
    known field that does not read (a time without a zone, a phase of a newer version) leaves out
    that field (or that list entry), and the problem names it with what is stored.
    """
    try:
        return read_stored(ProjectJobStatus, raw), ""
    except ValidationError:
        if not isinstance(raw, Mapping):
            return ProjectJobStatus(), f"status: not an object: {_stored_value(raw)}"
    data: Any = deepcopy(dict(raw))
    problems: list[str] = []
    # Leaving a part out cannot make another one unreadable; a few rounds are a bound, not a need.
    for _ in range(4):
        try:
            return read_stored(ProjectJobStatus, data), "; ".join(problems)
        except ValidationError as exc:
            cuts: set[tuple[str | int, ...]] = set()
            for error in exc.errors(include_url=False):  # unknown keys: read_stored skips them
                loc = tuple(error["loc"])
                cuts.add(loc[:2] if len(loc) > 1 and isinstance(loc[1], int) else loc[:1])
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
                problems.append(f"status{where}: {error['msg']} (stored: {_stored_value(error['input'])})")
            if () in cuts:
                break
            drop_paths(data, cuts)
    return ProjectJobStatus(), "; ".join(problems) or "status: cannot be read"


def _stored_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)
# A job's name is its id (dsjobs.api.ids) and a label value of its pods: a DNS label.
_JOB_NAME = re.compile(RESOURCE_ID_PATTERN)


def missing_labels(job: JobView) -> tuple[tuple[str, str], ...]:
    """The project and job labels a job lacks (or carries with another value than its spec's).

    They are how the API finds a project's jobs (List selects by the project label); a job
    applied with kubectl would otherwise run but never be listed.
    """
    wanted = {JOB_LABEL: job.name, PROJECT_LABEL: job.spec.get("projectId")}
    return tuple(
        (key, value)
        for key, value in sorted(wanted.items())
        if isinstance(value, str) and value and _LABEL_VALUE.match(value) and job.labels.get(key) != value
    )


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatePod:
    """Render and create (if absent) the pod of `attempt` on the instance type at `type_index`."""

    attempt: int
    type_index: int
    instance_type: str


@dataclass(frozen=True)
class DeletePod:
    name: str
    grace_seconds: int
    why: str


@dataclass(frozen=True)
class ForceCancel:
    """Tell the pod's runner that its cancel is forced (the object store's forced-cancel word): its
    program is SIGKILLed at once instead of after its graceful-shutdown timeout, while the pod's
    grace leaves the runner the time to store the logs. Should the word not reach the store, the
    pod is deleted with 1 s (the logs may then be lost)."""

    pod: str
    attempt: int


@dataclass(frozen=True)
class DeleteSecrets:
    """Delete the Secrets the operator made for the job (registry credentials, runner configs)."""


@dataclass(frozen=True)
class ClearData:
    """Delete the job's stored data (and the inputs no other job of the project references)."""


@dataclass(frozen=True)
class EnsureMetadata:
    """Give a job what the API sets at creation and `kubectl apply` users usually do not: the
    dsjobs.dev/cleanup finalizer, and the project and job labels the API lists jobs by."""

    finalizer: bool = True
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RemoveFinalizer:
    """Let a deleted job go: everything it owned is cleaned up."""


@dataclass(frozen=True)
class PublishDatasets:
    """The job succeeded: its output datasets' claims become datasets (by these ids) that outlive it."""

    dataset_ids: tuple[str, ...]


@dataclass(frozen=True)
class DeleteDatasetClaims:
    """The job ended without success (or is deleted): the claims of its output datasets go
    (unpublished ones only)."""


@dataclass(frozen=True)
class DeleteRegistryPasswords:
    """The job is deleted: the API's Secrets of its plain-text registry password go too
    (`<job>-docker-password`: labelled `dsjobs.dev/job-id=<job>`,
    `dsjobs.dev/secret-role=registry-password` and `app.kubernetes.io/created-by=dsjobs-api`, so a
    user's own password Secret is never one; none: nothing to do). Kept until then, as Clone copies
    them from finished jobs; their owner reference does not outlive `kubectl delete --cascade=orphan`."""


Action = (
    CreatePod
    | DeletePod
    | ForceCancel
    | DeleteSecrets
    | ClearData
    | EnsureMetadata
    | RemoveFinalizer
    | PublishDatasets
    | DeleteDatasetClaims
    | DeleteRegistryPasswords
)


@dataclass(frozen=True)
class Plan:
    status: ProjectJobStatus
    actions: tuple[Action, ...] = ()
    events: tuple[JobEvent, ...] = ()
    requeue_after: timedelta | None = None
    # The parsed spec, for the glue (rendering the pod); None when it is unreadable.
    spec: ProjectJobSpec | None = field(default=None, compare=False)


# --- helpers ---------------------------------------------------------------------------------


_OUTCOMES_OF_PROGRAM: Final = (JobPhase.SUCCESS, JobPhase.ERROR)


def _cancel_too_late(status: ProjectJobStatus) -> str:
    code = "" if status.return_code is None else f" with code {status.return_code}"
    return (
        f"the cancel came after the program had exited{code}: its outputs and logs were kept "
        f"and the job ended {status.phase.value if status.phase else ''}"
    )


def cancel_grace_seconds(spec: ProjectJobSpec, settings: OperatorSettings) -> int:
    """Pod deletion grace period for a cancel.

    The runner's entry script handles SIGTERM itself: with graceful-shutdown parameters it sends
    the configured signal and SIGKILLs the program after the timeout; without them it SIGKILLs the
    program at once. So the grace is the job's timeout plus a margin for the ship container's last
    upload. A non-graceful cancel of a job that has graceful-shutdown parameters gets the same grace
    and a ForceCancel, which has the runner SIGKILL the program at once: a grace of 1 s killed the
    ship container too, and the job lost its log files. Never 0: that would make the API server
    drop the pod object before the kubelet has stopped anything (a force delete).

    A job CANCELLING without `spec.cancel` (removed by hand, on a cluster whose CRD did not refuse
    it yet) gets the graceful grace: a cancel is one-way, and a shorter one would kill a program
    saving its checkpoint, and its upload.
    """
    has_params = spec.job_parameters.graceful_shutdown_parameters is not None
    seconds = int(-(-graceful_timeout(spec).total_seconds() // 1)) if has_params else 0
    return seconds + settings.shutdown_grace_margin_seconds


def forced_cancel(spec: ProjectJobSpec, pod: PodView) -> list[ForceCancel | DeletePod]:
    """What a forced cancel of `pod` needs when its program would otherwise get its graceful-shutdown
    timeout: a ForceCancel; for a pod whose runner reads no forced-cancel word (rendered by an
    operator of before it, an upgrade ago), its deletion with 1 s, which kills the program (its
    log files may be lost), where the word would wait out the whole timeout."""
    forced = spec.cancel is not None and not spec.cancel.graceful
    if not forced or spec.job_parameters.graceful_shutdown_parameters is None:
        return []
    if pod.runner_contract < FORCED_CANCEL_WORD_CONTRACT:
        return [DeletePod(pod.name, DELETION_GRACE_SECONDS, "cancelled (forced; its runner reads no word)")]
    return [ForceCancel(pod.name, pod.attempt)]


#: How much longer than its type's budget a pod waits while the scheduler preempts pods of a
#: node for it (status.nominatedNodeName) before the job falls back to its next type.
NOMINATED_PATIENCE: Final = timedelta(minutes=15)
#: ... and while a node autoscaler adds a node for it (PodView.scale_up).
SCALE_UP_PATIENCE: Final = timedelta(minutes=15)

#: Grace for deleting a pod whose program needs no time. Never 0, a force delete: the API server
#: deletes a pod not bound to a node at once anyway, while one the scheduler bound since the
#: operator's cache saw it would vanish with its program still running (two attempts at once).
DELETION_GRACE_SECONDS: Final = 1


def _min_delay(*delays: timedelta | None) -> timedelta | None:
    present = [d for d in delays if d is not None]
    return max(min(present), timedelta()) if present else None


def adoptable(status: ProjectJobStatus, pods: Sequence[PodView]) -> PodView | None:
    """The newest pod when it is newer than (or the same attempt as) what the status names: the
    status lags behind the cluster after a crash between a pod's creation and the status write."""
    newest = max((p for p in pods if not p.gone), key=lambda p: p.attempt, default=None)
    if newest is None or newest.attempt < status.attempt:
        return None
    return newest


def current_pod_name(status: ProjectJobStatus, pods: Sequence[PodView]) -> str:
    """The pod of the job's current attempt, as the plan will see it (after adoption)."""
    newest = adoptable(status, pods)
    return newest.name if newest is not None else status.pod_name


def _adopt(status: ProjectJobStatus, pods: Sequence[PodView], names: list[str]) -> ProjectJobStatus:
    """Take over the newest pod when the status lags behind the cluster (a crash after create)."""
    newest = adoptable(status, pods)
    if newest is None:
        return status
    if newest.attempt == status.attempt and status.pod_name == newest.name:
        return status
    index = (
        newest.instance_type_index
        if 0 <= newest.instance_type_index < len(names)
        else status.instance_type_index
    )
    return status.model_copy(
        update={
            "attempt": newest.attempt,
            "pod_name": newest.name,
            "instance_type_index": index,
            "actual_cloud_instance_type": newest.instance_type or names[min(index, len(names) - 1)],
        }
    )


def _spec_problem_update(
    status: ProjectJobStatus, spec: ProjectJobSpec | None, problems: list[Problem], now: datetime
) -> StatusUpdate:
    unknown = [p for p in problems if p.rule == "instance-type-unknown"]
    if unknown and len(unknown) == len(problems):
        names = ", ".join(p.message.split(" ", 1)[0] for p in unknown)
        return fail(
            spec,
            status,
            "UnknownInstanceType",
            f"unknown instance type {names}: " + format_problems(problems, cr=True),
            now,
        )
    return fail(spec, status, "InvalidSpec", "invalid job: " + format_problems(problems, cr=True), now)


def _observed(job: JobView, now: datetime, events: list[JobEvent]) -> ProjectJobStatus:
    """The job's status with what every step records first: CREATING for a new job (with its
    Event) and the generation seen."""
    status = job.status
    if status.phase is None:
        status = status.model_copy(update={"phase": JobPhase.CREATING, "created_at": job.created_at or now})
        events.append(JobEvent("Normal", "Created", "new -> CREATING"))
    if status.observed_generation != job.generation:
        status = status.model_copy(update={"observed_generation": job.generation})
    return status


def _plan_of(
    update: StatusUpdate, actions: list[Action], events: list[JobEvent], spec: ProjectJobSpec | None
) -> Plan:
    return Plan(update.status, tuple(actions), (*events, *update.events), update.requeue_after, spec=spec)


# --- the plan --------------------------------------------------------------------------------


def plan(
    job: JobView,
    pods: Sequence[PodView],
    catalog: Mapping[str, InstanceTypeSpec],
    result: RunnerResult | ResultPointer | None,
    now: datetime,
    settings: OperatorSettings,
    *,
    storage_problem: str | None = None,
    invalid_types: Mapping[str, str] | None = None,
) -> Plan:
    """The next step for one job.

    `pods` are all pods labelled with the job (any attempt), plus (with `gone=True`) pods whose
    deletion the operator saw or confirmed. `catalog` is the cluster's InstanceTypes. `result` is
    the runner's result of the current attempt when its ship container has ended.
    `storage_problem`: what the operator's own check of the object store said (see
    `status.storage_bound_since`), for the status details.
    """
    step = _plan(job, pods, catalog, result, now, settings, storage_problem, invalid_types or {})
    step = _settle_output_datasets(job, _secrets_of_an_ended_job(job, pods, step))
    step = _keep_other_projects_data(job, step)
    if step.spec is None:
        return step
    size = stored_data_size(step.spec, step.status)
    if size == step.status.data_size_bytes:
        return step
    return replace(step, status=step.status.model_copy(update={"data_size_bytes": size}))


def foreign_project(job: JobView) -> str:
    """Why the job's stored-data prefix is another project's ("" when it is its own, or unknown):
    its projectId is not its namespace's project (a job the admission policy would refuse), or
    the project is another namespace's (`_second_namespace`). The operator's deletions of stored data ask it too.."""
    project = job.spec.get("projectId")
    if job.namespace_project is None or not isinstance(project, str) or project == job.namespace_project:
        return _second_namespace(job)
    label = repr(job.namespace_project) if job.namespace_project else "none"
    return f"its projectId {project!r} is not the project of namespace {job.namespace} ({label})"


def _second_namespace(job: JobView) -> str:
    """Why the job's namespace does not hold its project ("" when it does, or unknown): another
    namespace with the same project label, made before it, holds it (names.project_holder)."""
    holder = job.project_namespace
    if not job.namespace_project or holder is None or holder in ("", job.namespace):
        return ""
    return (
        f"namespace {job.namespace} is labelled {PROJECT_LABEL}={job.namespace_project}, but that "
        f"project is namespace {holder}'s (the oldest namespace with that label): one project, one namespace"
    )


def _keep_other_projects_data(job: JobView, step: Plan) -> Plan:
    """A step that would delete a job's stored data under another project's prefix (the same name
    there is that project's job) deletes nothing, and its status and Event say so."""
    foreign = foreign_project(job)
    if not foreign or not any(isinstance(a, ClearData) for a in step.actions):
        return step
    actions = tuple(a for a in step.actions if not isinstance(a, ClearData))
    told = f"nothing was deleted: {foreign}, so that prefix is another project's"
    events = tuple(
        replace(e, message=f"the job's stored data is cleared: {told}") if e.reason == "DataCleared" else e
        for e in step.events
    )
    status = step.status
    cleared = get_condition(status, COND_DATA_CLEARED)
    if cleared is not None and cleared.last_transition_time is not None:
        status = set_condition(
            status, COND_DATA_CLEARED, "True", "DataCleared", told, cleared.last_transition_time
        )
    return replace(step, status=status, actions=actions, events=events)


def _secrets_of_an_ended_job(job: JobView, pods: Sequence[PodView], step: Plan) -> Plan:
    """On the step that ends a job with no pod left (cancelled, a pod deleted by someone else, a
    node lost, a cancel during a retry's backoff): delete its Secrets now, as they would go with
    the pod (_plan_final); no later step would, as a final job with no pod deletes nothing."""
    phase = step.status.phase
    if job.deleting or phase is None or not phase.is_final:
        return step
    if step.status.attempt == 0 and not (job.spec.get("execute") and job.spec.get("cancel")):
        # Nothing was made for it: never asked to run, or refused before its first pod (a
        # refused pod's Secrets are deleted with it).
        return step
    # A cancel at attempt 0 too: the first pod's Secrets are made before the step writes attempt
    # 1, and an operator killed in between left them for a job then cancelled before its pod.
    if (job.status.phase is not None and job.status.phase.is_final) or any(p.alive for p in pods):
        return step
    if DeleteSecrets() in step.actions:
        return step
    return replace(step, actions=(*step.actions, DeleteSecrets()))


def _settle_output_datasets(job: JobView, step: Plan) -> Plan:
    """On the step that ends a job with output datasets: publish them (SUCCESS) or delete their
    claims. The action comes before the final status is written, so a crash in between repeats it
    (both are idempotent) and a job never says SUCCESS with datasets that do not exist."""
    spec, phase = step.spec, step.status.phase
    if spec is None:
        # Made unreadable by an edit after the start: it ends in ERROR, and its claims are found
        # by label, so the raw field says enough.
        params = job.spec.get("jobParameters")
        declared = isinstance(params, dict) and bool(params.get("outputDatasets"))
    else:
        declared = bool(spec.job_parameters.output_datasets)
    if not declared or job.deleting:
        return step
    if phase is None or not phase.is_final or (job.status.phase is not None and job.status.phase.is_final):
        return step
    if spec is None or phase != JobPhase.SUCCESS:
        # Also for a job that never had a pod: its claims may exist (a pod the API server refused).
        return replace(step, actions=(*step.actions, DeleteDatasetClaims()))
    created = [
        OutputDataset(desc=d, id=output_dataset_id(job.uid, d.var))
        for d in spec.job_parameters.output_datasets
    ]
    return replace(
        step,
        status=step.status.model_copy(update={"output_datasets": created}),
        actions=(*step.actions, PublishDatasets(tuple(d.id for d in created))),
        events=(*step.events, JobEvent("Normal", "DatasetsCreated", f"created datasets {_named(created)}")),
    )


def _named(datasets: Sequence[OutputDataset]) -> str:
    """Datasets as their Events name them: `<id> (<name>), ...`."""
    return ", ".join(f"{d.id} ({d.desc.name})" for d in datasets)


def without_lost_datasets(
    status: ProjectJobStatus, events: Sequence[JobEvent], lost: Collection[str]
) -> tuple[ProjectJobStatus, list[JobEvent]]:
    """The final status and Events of a job whose output datasets `lost` (ids) could not be
    published: their claims were deleted while it ran (pvc-protection kept them only until the
    pod ended). Such a dataset is not created, and says so, instead of being listed as one."""
    gone = [d for d in status.output_datasets if d.id in lost]
    if not gone:
        return status, list(events)
    kept = [d for d in status.output_datasets if d.id not in lost]
    told = f"dataset {_named(gone)} not created: its volume claim was deleted while the job ran"
    out = [e for e in events if e.reason != "DatasetsCreated"]
    if kept:
        out.append(JobEvent("Normal", "DatasetsCreated", f"created datasets {_named(kept)}"))
    out.append(JobEvent("Warning", "DatasetLost", told))
    details = f"{status.status_details}; {told}" if status.status_details else told
    return status.model_copy(update={"output_datasets": kept, "status_details": clip(details)}), out


def _plan(
    job: JobView,
    pods: Sequence[PodView],
    catalog: Mapping[str, InstanceTypeSpec],
    result: RunnerResult | ResultPointer | None,
    now: datetime,
    settings: OperatorSettings,
    storage_problem: str | None,
    invalid_types: Mapping[str, str],
) -> Plan:
    if job.deleting:
        return _plan_delete(job, pods, now)

    labels = missing_labels(job)
    actions: list[Action] = []
    if FINALIZER not in job.finalizers or labels:
        actions.append(EnsureMetadata(finalizer=FINALIZER not in job.finalizers, labels=labels))
    events: list[JobEvent] = []
    if job.status_problem or _phase_unknown(job.status):
        return _plan_unreadable_status(job, now, actions, events)
    status = _readable_again(_observed(job, now, events), job, now)
    phase = status.phase
    assert phase is not None
    started = status.attempt > 0 or any(not p.gone for p in pods)

    problems: list[Problem] = []
    spec: ProjectJobSpec | None
    if not started and not phase.is_final:
        # The whole validation, with the cluster's catalog, before the first pod only: the catalog
        # may change under a running job without making it invalid.
        spec, problems = parse_job_spec(
            job.spec, known_instance_types=set(catalog), invalid_instance_types=invalid_types
        )
    else:
        try:
            # A running job's spec with a newer version's key reads: refusing it would delete its pod.
            spec = read_stored(ProjectJobSpec, job.spec)
        except ValidationError as exc:
            spec, problems = None, [_unreadable(exc)]
    if spec is None:
        if phase.is_final:
            return _plan_final_unreadable(job, status, pods, now, settings, actions, events)
        # A started job's pod would run on untracked: it goes, with the time to ship its logs, and
        # its Secrets with it (they were read when it started; no later step would know to).
        alive = [p for p in pods if p.alive]
        if alive:
            actions.append(DeleteSecrets())
        actions.extend(
            DeletePod(p.name, settings.shutdown_grace_margin_seconds, "the job's spec cannot be read")
            for p in alive
        )
        update = _spec_problem_update(status, None, problems, now)
        expires = _raw_data_expiry(job.spec, update.status.finished_at, update.status.data_expires_at)
        update = replace(update, status=update.status.model_copy(update={"data_expires_at": expires}))
        return _plan_of(update, actions, events, None)

    if phase.is_final:
        return _plan_final(spec, status, pods, now, settings, actions, events)

    names = spec.job_parameters.instance_type_names()
    status = _adopt(status, pods, names)

    if status.attempt == 0:
        return _plan_start(job, spec, status, problems, names, now, actions, events, settings)

    current_name = pod_name(job.name, status.attempt)
    superseded = [p for p in pods if p.name != current_name and not p.gone]
    actions.extend(
        DeletePod(p.name, DELETION_GRACE_SECONDS, "superseded by a newer attempt")
        for p in superseded
        if not p.deleting
    )

    if status.pod_name != current_name:
        return _plan_next_attempt(
            spec,
            status,
            current_name,
            superseded,
            names,
            catalog,
            invalid_types,
            now,
            actions,
            events,
            settings,
        )

    current = next((p for p in pods if p.name == current_name), None)
    if current is None:
        # The status names a pod the cluster does not have (the glue confirmed it): it was
        # deleted before the operator saw it end.
        current = PodView(name=current_name, attempt=status.attempt, gone=True)

    if spec.cancel is not None and status.phase != JobPhase.CANCELLING:
        reason = f": {spec.cancel.reason}" if spec.cancel.reason else ""
        if current.gone:
            # Cancelled and the pod is gone: whatever removed it, the user wanted it stopped.
            status = with_phase(status, JobPhase.CANCELLING, f"cancelling{reason}", events)
        elif not current.terminal and not current.program_ended:
            forced = forced_cancel(spec, current)
            actions.extend(forced)
            if not current.deleting and not any(isinstance(a, DeletePod) for a in forced):
                actions.append(DeletePod(current.name, cancel_grace_seconds(spec, settings), "cancelled"))
            status = with_phase(status, JobPhase.CANCELLING, f"cancelling{reason}", events)
            return Plan(status, tuple(actions), tuple(events), spec=spec)
        # The program already ended (its outputs may be uploading): the cancel is a no-op, the
        # job's real outcome is reported.
    elif (
        status.phase == JobPhase.CANCELLING
        and not current.terminal
        and not current.deleting
        and not current.program_ended
    ):
        # The delete was decided but may not have happened (a crash in between): issue it again.
        forced = forced_cancel(spec, current)
        actions.extend(forced)
        if not any(isinstance(a, DeletePod) for a in forced):
            actions.append(DeletePod(current.name, cancel_grace_seconds(spec, settings), "cancelled"))
    elif (
        status.phase == JobPhase.CANCELLING
        and current.deleting
        and not current.terminal
        and not current.program_ended
        and (current.deletion_grace_seconds or 0) != DELETION_GRACE_SECONDS
    ):
        # A graceful cancel, then a forceful one (the CLI's second Ctrl-C): the runner is told to
        # kill the program now (the glue tells it once; the pod's grace stays, for the logs). A pod
        # going with 1 s already (an older operator's forced cancel) needs no word.
        actions.extend(forced_cancel(spec, current))

    index = min(status.instance_type_index, len(names) - 1)
    phase_before = status.phase
    update = compute_status(
        spec,
        status,
        current,
        result,
        now,
        settings,
        instance_type=names[index],
        storage_problem=storage_problem,
    )
    events.extend(update.events)
    status = update.status
    if spec.cancel is not None and status.phase != phase_before and status.phase in _OUTCOMES_OF_PROGRAM:
        # The user asked for a stop and got another outcome: say why, once (a job ends once).
        events.append(JobEvent("Normal", "CancelTooLate", _cancel_too_late(status)))
    requeue = update.requeue_after

    if update.retry:
        backoff = spec.retry_policy.backoff_seconds if spec.retry_policy is not None else 0
        retrying = get_condition(status, COND_RETRYING)
        why = retrying.message if retrying is not None else "failed"
        # Counted, not derived from the attempt: a fallback from a refused pod keeps its attempt.
        status = status.model_copy(
            update={
                "attempt": status.attempt + 1,
                "pod_name": "",
                "retried_failures": status.retried_failures + 1,
            }
        )
        details = (
            f"attempt {status.attempt - 1} failed ({why}); attempt {status.attempt} starts in {backoff}s"
        )
        status = with_phase(status, JobPhase.PREPARING, details, events)
        return Plan(status, tuple(actions), tuple(events), spec=spec)

    if (
        status.phase == JobPhase.PREPARING
        and not current.scheduled
        and not current.gone
        and not current.deleting
    ):
        budget = schedule_budget(catalog.get(names[index]))
        waited = now - (current.created_at or now)
        gone = claim_gone(current)
        if gone is not None and waited < CLAIM_GONE_PATIENCE:
            # An output dataset's claim is made just before the pod: a scheduler whose claim
            # informer lags may not know it yet. Its verdict must hold a while first.
            requeue = _min_delay(requeue, CLAIM_GONE_PATIENCE - waited)
        elif gone is not None:
            # Deleted after the pod was made (PVC protection holds only claims of scheduled
            # pods): as if it had been missing when the job started, and no type can help.
            cond = current.condition("PodScheduled")
            problem = (
                f"volume claim {gone!r} of the job was deleted while its pod waited to be scheduled "
                f"(the scheduler: {cond.message if cond is not None else ''})"
            )
            actions.append(DeletePod(current.name, DELETION_GRACE_SECONDS, "its volume claim is gone"))
            return _plan_of(fail(spec, status, "MissingVolume", problem, now), actions, events, spec)
        type_now = catalog.get(names[index])
        if (
            current.unschedulable
            and type_now is not None
            and current.instance_type_digest
            and not made_from(current.instance_type_digest, type_now)
        ):
            # An admin changed the type (its nodeSelector, tolerations, resources) while the pod
            # waited: the pod still asks what the old one said. A fresh pod asks the new (no
            # failure, as a fallback is none; it waits the type's budget anew).
            message = (
                f"instance type {names[index]} changed while pod {current.name} waited for a node; "
                "making its pod again"
            )
            events.append(JobEvent("Normal", "InstanceTypeChanged", message))
            status = status.model_copy(update={"attempt": status.attempt + 1, "pod_name": ""})
            return Plan(
                with_phase(status, JobPhase.PREPARING, message, events),
                tuple(actions),
                tuple(events),
                spec=spec,
            )
        if waited < budget:
            requeue = _min_delay(requeue, budget - waited)
        elif current.nominated_node and waited < budget + NOMINATED_PATIENCE:
            # The scheduler preempts lower-priority pods of a node for this one, and their grace
            # (a job's pod: its graceful timeout and more) runs: falling back now would have
            # killed them for nothing.
            requeue = _min_delay(requeue, budget + NOMINATED_PATIENCE - waited)
        elif current.scale_up and waited < budget + SCALE_UP_PATIENCE:
            # A node autoscaler is adding a node for this pod (a GPU node with its drivers takes
            # minutes): falling back now would leave that node idle and start another scale-up.
            requeue = _min_delay(requeue, budget + SCALE_UP_PATIENCE - waited)
        elif not current.unschedulable:
            # The scheduler has not found the pod unschedulable (it is down, or still working
            # through a backlog): a lack of capacity is not known, so no fallback. Its verdict
            # comes as a pod update, which brings the job back here.
            if current.condition("PodScheduled") is None:
                details = (
                    f"{status.status_details}: no scheduler has placed or refused pod {current.name} "
                    f"in {int(budget.total_seconds())}s (is kube-scheduler running, or working "
                    "through a backlog?)"
                )
                status = status.model_copy(update={"status_details": details})
        elif index + 1 >= len(names) and names[index] not in catalog:
            # Its type left the catalog (or broke) while its pod waited, and no other type is
            # listed: nothing will ever make room for a type the admin took away.
            problem = (
                f"{gone_type_problem(names[index], invalid_types)}, and pod {current.name} could not "
                f"be scheduled within {int(budget.total_seconds())}s; no other instance type is listed"
            )
            actions.append(DeletePod(current.name, DELETION_GRACE_SECONDS, "its instance type is gone"))
            return _plan_of(fail(spec, status, "UnknownInstanceType", problem, now), actions, events, spec)
        elif index + 1 < len(names):
            following = names[index + 1]
            message = (
                f"no capacity for instance type {names[index]} within {int(budget.total_seconds())}s; "
                f"falling back to {following}"
            )
            events.append(JobEvent("Warning", "FallingBack", message))
            status = status.model_copy(
                update={
                    "attempt": status.attempt + 1,
                    "instance_type_index": index + 1,
                    "pod_name": "",
                    "actual_cloud_instance_type": following,
                }
            )
            return Plan(
                with_phase(status, JobPhase.PREPARING, message, events),
                tuple(actions),
                tuple(events),
                spec=spec,
            )
        elif len(names) > 1:
            # Every type was tried: keep waiting on the last one, and say so. The details already
            # name the last type ("waiting for capacity for instance type g1.1: <scheduler>").
            waiting = status.status_details
            exhausted = f"no capacity for any of the instance types {', '.join(names)}"
            details = f"{exhausted}; " + (
                f"still {waiting}"
                if waiting.startswith("waiting ")
                else f"still waiting for {names[index]}: {waiting}"
            )
            if not job.status.status_details.startswith(exhausted):
                # Once, when it is first so (as FallingBack is told once per type).
                events.append(
                    JobEvent("Warning", "InstanceTypesExhausted", f"{exhausted}; waiting for {names[index]}")
                )
            status = status.model_copy(update={"status_details": details})
    return Plan(status, tuple(actions), tuple(events), requeue_after=requeue, spec=spec)


def _phase_unknown(status: ProjectJobStatus) -> bool:
    """The status was unreadable and its phase is gone with the unreadable part (the glue wrote
    the readable rest): where the job is cannot be told, and a job without a phase looks new."""
    readable = get_condition(status, COND_STATUS_READABLE)
    return readable is not None and readable.status == "False" and status.phase is None


def _plan_unreadable_status(
    job: JobView, now: datetime, actions: list[Action], events: list[JobEvent]
) -> Plan:
    """A job whose stored status cannot be read (edited by hand, or by a newer version): it might
    have finished, or be running on a pod the status names. No step may start it again, delete its
    pod or its data from what is left: it stays as it is, saying why, until the status reads."""
    status = job.status
    if job.status_problem:
        message = clip(
            f"{_UNREADABLE}: {job.status_problem}; the operator leaves the job as it "
            "is (no pod created or deleted, no data deleted) until it can: fix the status with "
            f"`kubectl edit projectjob {job.name} --subresource=status`",
            8192,
        )
        if status.status_details != clip(message):
            events.append(JobEvent("Warning", "UnreadableStatus", clip(message, 1024)))
        if _CUT_CONDITION not in job.status_problem:
            # Not when a condition was what did not read: a merge patch writes a list whole, and
            # adding this one would delete that entry (details and the Event tell it then).
            status = set_condition(status, COND_STATUS_READABLE, "False", "UnreadableStatus", message, now)
        status = status.model_copy(update={"status_details": clip(message)})
    return Plan(status, tuple(actions), tuple(events))


_UNREADABLE: Final = "the stored status cannot be read"
#: How read_status names a problem inside the conditions list.
_CUT_CONDITION: Final = "status.conditions["


def _readable_again(status: ProjectJobStatus, job: JobView, now: datetime) -> ProjectJobStatus:
    """The status reads again (fixed, or its unreadable part dropped by the write that reported
    it) and has its phase: the job goes on from it, without the report. The times its data's
    expiry counts from come back when they went: without them its data would never expire."""
    if get_condition(status, COND_STATUS_READABLE) is None and not status.status_details.startswith(
        _UNREADABLE
    ):
        return status
    status = drop_conditions(status, COND_STATUS_READABLE)
    final = status.phase is not None and status.phase.is_final
    finished = get_condition(status, COND_FINISHED)
    update: dict[str, Any] = {"status_details": finished.message if finished is not None and final else ""}
    if status.created_at is None:
        update["created_at"] = job.created_at or now
    if final and status.finished_at is None:
        # When the Finished condition was set (when the operator saw the end, the same as
        # finishedAt or a little later); else from now on, which is later, never earlier.
        when = finished.last_transition_time if finished is not None else None
        update["finished_at"] = when or now
    return status.model_copy(update=update)


def _plan_start(
    job: JobView,
    spec: ProjectJobSpec,
    status: ProjectJobStatus,
    problems: list[Problem],
    names: list[str],
    now: datetime,
    actions: list[Action],
    events: list[JobEvent],
    settings: OperatorSettings,
) -> Plan:
    """A job without any pod yet: wait for execute, cancel, fail validation, or create attempt 1."""
    if spec.cancel is not None:
        # A job cancelled before it started never starts.
        outcome = Outcome(JobPhase.CANCELLED, "Cancelled", "the job was cancelled before it started")
        return Plan(finish(spec, status, outcome, now, events), tuple(actions), tuple(events), spec=spec)
    if not spec.execute:
        return _plan_unexecuted(spec, status, now, actions, events)
    why = data_deletion_begun(status) or _data_gone_before_start(
        spec, status, min(job.execute_requested_at or now, now)
    )
    if why is not None:
        # Also when the deletion had begun as the execute request came (the API refuses an Execute
        # of such a job, kubectl does not): the job must not run without its inputs.
        if not status.data_cleared:
            status = _clear_data(status, why, now, actions, events)
        message = (
            f"the job's stored data was deleted before it was executed ({why}); create the job again "
            "(or clone it with new inputs)"
        )
        update = fail(spec, status, "DataCleared", message, now)
        # The data is gone already: no expiry to show.
        cleared = update.status.model_copy(update={"data_expires_at": status.data_expires_at})
        return _plan_of(StatusUpdate(cleared, update.events), actions, events, spec)
    if job.namespace_project is not None and job.namespace_project != spec.project_id:
        # The admission policy projectjobs-in-their-project refuses such a job; a cluster without
        # it (the CRD applied alone) would have it run in another project's storage prefix.
        label = (
            f"labelled {PROJECT_LABEL}={job.namespace_project}"
            if job.namespace_project
            else f"not labelled {PROJECT_LABEL}"
        )
        message = (
            f"invalid job: spec.projectId: {spec.project_id!r} is not the project of namespace "
            f"{job.namespace} ({label}): a job runs in its own project's namespace [project-namespace]"
        )
        return _plan_of(fail(spec, status, "ProjectMismatch", message, now), actions, events, spec)
    second = _second_namespace(job)
    if second:
        # The project's stored data is one prefix: a job here would overwrite (and its deletion
        # delete) the data of that namespace's job of the same name.
        message = (
            f"invalid job: {second}; its jobs share one storage prefix: label this namespace with "
            f"a project id of its own [project-namespace]"
        )
        return _plan_of(fail(spec, status, "ProjectMismatch", message, now), actions, events, spec)
    if problems:
        return _plan_of(_spec_problem_update(status, spec, problems, now), actions, events, spec)
    if not _JOB_NAME.fullmatch(job.name):
        # Only objects stored before the CRD's rule get here: such a job would run, but neither the
        # API nor the CLI could ever name it to fetch its outputs, and a long name is no label value.
        message = (
            f"invalid job: metadata.name: {job.name!r} must be a DNS label: at most {MAX_JOB_NAME} "
            "lowercase letters, digits and '-', starting and ending with a letter or digit (it is the "
            "job id the API and the CLI take, and a label value of its pods) [job-name]; apply the job "
            "again under such a name"
        )
        return _plan_of(fail(spec, status, "InvalidSpec", message, now), actions, events, spec)
    name = pod_name(job.name, 1)
    status = status.model_copy(
        update={
            "attempt": 1,
            "pod_name": name,
            "instance_type_index": 0,
            "actual_cloud_instance_type": names[0],
            # Derived from finishedAt again when the job ends; nothing expires while it runs.
            "data_expires_at": None,
        }
    )
    status = with_phase(
        status, JobPhase.PREPARING, f"creating pod {name} for instance type {names[0]}", events
    )
    actions.append(CreatePod(1, 0, names[0]))
    status = _as_created(spec, status, PodView(name=name, attempt=1, instance_type=names[0]), now, settings)
    return Plan(status, tuple(actions), tuple(events), spec=spec)


def _data_gone_before_start(
    spec: ProjectJobSpec, status: ProjectJobStatus, executed_at: datetime
) -> str | None:
    """Why a job about to start has (or is to have) no stored data, or None. The expiry is judged
    at `executed_at`: when the API accepted the Execute (the operator may see it later, after a
    restart or a backlog, and the data is still there: only the operator deletes it)."""
    if status.data_cleared:
        return "DeleteData or its data TTL"
    if spec.clear_data:
        return "DeleteData"
    if status.phase == JobPhase.PREPARING:
        # Executed while its data was there, and waiting for its pod (a quota, an earlier pod of
        # its name): an executed job's data expires from its end, not its creation.
        return None
    # A TTL out of range is not used (the job fails InvalidSpec [data-ttl] for it): the last
    # valid expiry stands, as for a job not executed (_data_lifetime).
    expires = data_expiry(spec, status.created_at, status.data_expires_at)
    recorded = status.data_expires_at
    if expires is not None and recorded is not None and recorded > expires:
        # The expiry this operator last set for the job not executed: a SetDataTtl accepted after
        # the Execute (an executed job's TTL counts from its end) may shorten the spec's before
        # this step sees the job; its data was there all the same (only the operator deletes it,
        # and the API refuses an Execute of expired data by the spec as it was then).
        expires = recorded
    if expires is not None and executed_at >= expires:
        return "data TTL expired before the job was executed"
    return None


def _plan_unexecuted(
    spec: ProjectJobSpec,
    status: ProjectJobStatus,
    now: datetime,
    actions: list[Action],
    events: list[JobEvent],
) -> Plan:
    """A job created but not executed (yet): its uploaded inputs live as long as a finished job's
    data would, counted from its creation, so a job abandoned during upload leaves nothing behind
    for ever. DeleteData / DeleteAllData clear them at once."""
    # DeleteData's operation is done when dataCleared says so.
    status, requeue, _ = _data_lifetime(
        spec, status, status.created_at, "data TTL expired before the job was executed", now, actions, events
    )
    if status.phase == JobPhase.CREATING:
        # A job applied by hand without `execute` would otherwise wait without a word.
        details = (
            "not executed, and its stored data was deleted: it cannot run any more (create it again)"
            if status.data_cleared
            else UNEXECUTED_DETAILS
        )
        status = status.model_copy(update={"status_details": details})
    return Plan(status, tuple(actions), tuple(events), requeue, spec=spec)


def _waiting_for_lost_node(attempt: int, superseded: Sequence[PodView], now: datetime) -> str | None:
    """Why attempt `attempt` has not started, when a previous attempt's pod lingers on a node that
    stopped reporting: Kubernetes cannot end it there, and it may still run (or come back)."""
    for previous in sorted(superseded, key=lambda p: p.attempt):
        if evicted_from_lost_node(previous, now):
            return (
                f"attempt {attempt} starts once pod {previous.name} of attempt {previous.attempt} is "
                f"gone (never two attempts at once); its node {previous.node_name} stopped reporting "
                "and the program may still run there, so the pod goes only when the node reports "
                "again or leaves the cluster"
            )
    return None


def _plan_next_attempt(
    spec: ProjectJobSpec,
    status: ProjectJobStatus,
    current_name: str,
    superseded: Sequence[PodView],
    names: list[str],
    catalog: Mapping[str, InstanceTypeSpec],
    invalid_types: Mapping[str, str],
    now: datetime,
    actions: list[Action],
    events: list[JobEvent],
    settings: OperatorSettings,
) -> Plan:
    """A new attempt was decided (fallback or retry) and its pod is not created yet."""
    if spec.cancel is not None:
        outcome = Outcome(JobPhase.CANCELLED, "Cancelled", "the job was cancelled")
        return Plan(finish(spec, status, outcome, now, events), tuple(actions), tuple(events), spec=spec)
    retrying = get_condition(status, COND_RETRYING)
    if retrying is not None and not _retry_still_allowed(spec, status):
        # The retry policy was removed or lowered during the backoff: the user wants no more
        # attempts, and the decided one would have started at once (no backoff without a policy).
        # The job ends with the failure that was to be retried, as if it had not been.
        outcome = Outcome(
            JobPhase.ERROR,
            retrying.reason,
            f"{retrying.message} (not retried: spec.retryPolicy allows no further attempt since it was changed)",
            return_code=status.return_code,
        )
        last = status.attempt - 1
        undone = status.model_copy(
            update={
                "attempt": last,
                "pod_name": pod_name(current_name.rsplit("-a", 1)[0], last),
                "retried_failures": max(0, status.retried_failures - 1),
            }
        )
        # It ended when it failed, not when the backoff was cut short (its data expires from then).
        failed_at = retrying.last_transition_time or now
        return Plan(
            finish(spec, undone, outcome, failed_at, events), tuple(actions), tuple(events), spec=spec
        )
    if retrying is not None and retrying.last_transition_time is not None and spec.retry_policy is not None:
        due = later(retrying.last_transition_time, timedelta(seconds=spec.retry_policy.backoff_seconds))
        if now < due:
            return Plan(status, tuple(actions), tuple(events), requeue_after=due - now, spec=spec)
    if superseded:
        # Never two attempts at once: the previous pod's deletion (an event) brings us back.
        details = _waiting_for_lost_node(status.attempt, superseded, now)
        if details is not None and details != status.status_details:
            events.append(JobEvent("Warning", "WaitingForLostNode", clip(details, 1024)))
            status = with_phase(status, JobPhase.PREPARING, details, events)
        return Plan(status, tuple(actions), tuple(events), spec=spec)
    index = min(status.instance_type_index, len(names) - 1)
    if names[index] not in catalog:
        # Deleted from the catalog (or made invalid) since the job started: its later types may
        # still run it, as they would for a lack of capacity.
        usable = next((i for i in range(index + 1, len(names)) if names[i] in catalog), None)
        if usable is None:
            update = fail(
                spec, status, "UnknownInstanceType", gone_type_problem(names[index], invalid_types), now
            )
            return _plan_of(update, actions, events, spec)
        message = (
            f"{'; '.join(gone_type_problem(n, invalid_types) for n in names[index:usable])}; "
            f"falling back to {names[usable]}"
        )
        events.append(JobEvent("Warning", "FallingBack", message))
        index = usable
        status = status.model_copy(update={"instance_type_index": usable})
    status = drop_conditions(status, COND_RETRYING, *ATTEMPT_CONDITIONS).model_copy(
        update={
            "pod_name": current_name,
            "actual_cloud_instance_type": names[index],
            "started_at": None,
            "return_code": None,
            # The previous attempt's progress is not this one's (the API shows the status's
            # progress in the Execute operation's metadata once it is set).
            "progress": None,
            # Nor are its files: this attempt's writer deletes its raw logs and overwrites its
            # outputs, so the API would hand out URLs to missing or other bytes.
            "output_files": [],
            "log_files": [],
            "diagnostic_files": [],
            "file_errors": [],
        }
    )
    details = f"creating pod {current_name} (attempt {status.attempt}) for instance type {names[index]}"
    status = with_phase(status, JobPhase.PREPARING, details, events)
    actions.append(CreatePod(status.attempt, index, names[index]))
    fresh = PodView(
        name=current_name, attempt=status.attempt, instance_type=names[index], instance_type_index=index
    )
    status = _as_created(spec, status, fresh, now, settings)
    return Plan(status, tuple(actions), tuple(events), spec=spec)


def _retry_still_allowed(spec: ProjectJobSpec, status: ProjectJobStatus) -> bool:
    """Whether the retry decided (status.retried_failures counts it) is still in the job's policy,
    which a kubectl user may have changed since: `retryPolicy` is no job parameter."""
    policy = spec.retry_policy
    return policy is not None and status.retried_failures < policy.max_attempts


def gone_type_problem(name: str, invalid_types: Mapping[str, str]) -> str:
    if name in invalid_types:
        return f"InstanceType {name} is invalid, so no job runs on it: {invalid_types[name]}"
    return f"unknown instance type {name} (no longer in the catalog)"


def _as_created(
    spec: ProjectJobSpec, status: ProjectJobStatus, fresh: PodView, now: datetime, settings: OperatorSettings
) -> ProjectJobStatus:
    """The status as it will be once the planned pod exists (pending, no node yet).

    The glue writes the status after creating the pod; writing what the pod's own ADDED event
    would make of it saves a second status write (and its watch echo) per attempt.
    """
    return compute_status(spec, status, fresh, None, now, settings, instance_type=fresh.instance_type).status


def _plan_final(
    spec: ProjectJobSpec,
    status: ProjectJobStatus,
    pods: Sequence[PodView],
    now: datetime,
    settings: OperatorSettings,
    actions: list[Action],
    events: list[JobEvent],
) -> Plan:
    """A finished job: remove its pod (after the retention), finalize, clear data at its TTL."""
    if status.finished_at is None:
        # A final phase the operator did not write (a status edited by hand, restored by a backup
        # tool): its data would never expire, and a kept pod never be retired. When the Finished
        # condition says, else from now on, which is later, never earlier.
        finished = get_condition(status, COND_FINISHED)
        when = finished.last_transition_time if finished is not None else None
        status = status.model_copy(update={"finished_at": when or now})
    alive = [p for p in pods if p.alive]
    requeue = _retire_pods(status, alive, spec.finalized, now, settings, actions)
    if (
        not alive
        and not spec.finalized
        and any(p.gone for p in pods)
        and now < later(status.finished_at or now, timedelta(seconds=settings.finished_pod_retention_seconds))
    ):
        # The kept pod was removed by someone else (kubectl, the pod GC, a node removed): its
        # Secrets go as they would have with it. Seen while the operator remembers the deletion.
        actions.append(DeleteSecrets())
    if spec.finalized and get_condition(status, COND_FINALIZED) is None:
        if not alive:
            actions.append(DeleteSecrets())
        status = set_condition(status, COND_FINALIZED, "True", "Finalized", "pod and secrets removed", now)
        events.append(JobEvent("Normal", "Finalized", "the job's pod and secrets were removed"))

    status, expiry_wait, held = _data_lifetime(
        spec,
        status,
        status.finished_at,
        "data TTL expired",
        now,
        actions,
        events,
        _pods_in_the_way(pods, now),
    )
    if held:
        _delete_kept_pods(alive, actions)
    return Plan(
        status, tuple(actions), tuple(events), requeue_after=_min_delay(requeue, expiry_wait), spec=spec
    )


def _raw_data_expiry(
    raw: Mapping[str, Any], since: datetime | None, previous: datetime | None
) -> datetime | None:
    """A job whose spec the models cannot read: when its data expires, from the raw dataTtl when
    that is a valid TTL, else the last expiry known (none: the data is kept)."""
    try:
        ttl = parse_duration(raw.get("dataTtl", format_duration(DEFAULT_DATA_TTL)))
    except (ValueError, TypeError):
        return previous
    return ttl_expiry(ttl, since, previous)


def _plan_final_unreadable(
    job: JobView,
    status: ProjectJobStatus,
    pods: Sequence[PodView],
    now: datetime,
    settings: OperatorSettings,
    actions: list[Action],
    events: list[JobEvent],
) -> Plan:
    """A finished job whose spec the models cannot read (an edit after the start): what
    `_plan_final` does, from the raw fields it needs (finalized, clearData, dataTtl): its pod and
    Secrets go after the retention, its data at its expiry or on clearData."""
    raw = job.spec
    alive = [p for p in pods if p.alive]
    requeue = _retire_pods(status, alive, raw.get("finalized") is True, now, settings, actions)
    if status.data_cleared:
        return Plan(status, tuple(actions), tuple(events), requeue_after=requeue)
    begun = data_deletion_begun(status)
    if begun is not None:
        status = _clear_data(status, begun, now, actions, events)
        return Plan(status, tuple(actions), tuple(events), requeue_after=requeue)
    expires = _raw_data_expiry(raw, status.finished_at, status.data_expires_at)
    if expires != status.data_expires_at:
        status = status.model_copy(update={"data_expires_at": expires})
    clear = raw.get("clearData") is True
    if clear or (expires is not None and now >= expires):
        hold = _pods_in_the_way(pods, now)
        if hold is None:
            status = _clear_data(status, "requested" if clear else "data TTL expired", now, actions, events)
        else:
            _delete_kept_pods(alive, actions)
            requeue = _min_delay(requeue, hold)
    elif expires is not None:
        requeue = _min_delay(requeue, expires - now)
    return Plan(status, tuple(actions), tuple(events), requeue_after=requeue)


def _retire_pods(
    status: ProjectJobStatus,
    alive: Sequence[PodView],
    finalized: bool,
    now: datetime,
    settings: OperatorSettings,
    actions: list[Action],
) -> timedelta | None:
    """A finished job's live pods (and Secrets) go once it is finalized or the retention is over;
    the wait until then."""
    if not alive:
        return None
    keep_until = later(status.finished_at or now, timedelta(seconds=settings.finished_pod_retention_seconds))
    if not finalized and now < keep_until:
        return keep_until - now
    # The Secrets first: the status is final already, so once the pod is gone no later plan would
    # delete them, and an operator killed between the two would leave them.
    actions.append(DeleteSecrets())
    actions.extend(DeletePod(p.name, DELETION_GRACE_SECONDS, "the job has finished") for p in alive)
    return None


def _delete_kept_pods(alive: Sequence[PodView], actions: list[Action]) -> None:
    """The job's data is to be deleted: pods kept after its end go now (unless they go already)."""
    if alive and not any(isinstance(a, DeletePod) for a in actions):
        actions.append(DeleteSecrets())
        actions.extend(DeletePod(p.name, DELETION_GRACE_SECONDS, "the job's data is deleted") for p in alive)


def _pods_in_the_way(pods: Sequence[PodView], now: datetime) -> timedelta | None:
    """How long the job's stored data must still wait before it is deleted, None: not at all.

    A pod that reached a node and is not gone may still ship (a ship container shutting down
    uploads its last logs, its result): they would land under a prefix already deleted, and stay
    there with the job saying its data is cleared. A pod stuck terminating (its node lost) is
    waited for at most DELETE_POD_WAIT past its deletion, as for a deleted job."""
    waits = [
        DELETE_POD_WAIT if p.deleted_at is None else later(p.deleted_at, DELETE_POD_WAIT) - now
        for p in pods
        if p.scheduled and not p.gone
    ]
    longest = max(waits, default=None)
    return longest if longest is not None and longest > timedelta(0) else None


def _data_lifetime(
    spec: ProjectJobSpec,
    status: ProjectJobStatus,
    since: datetime | None,
    expired: str,
    now: datetime,
    actions: list[Action],
    events: list[JobEvent],
    hold: timedelta | None = None,
) -> tuple[ProjectJobStatus, timedelta | None, bool]:
    """The stored data's expiry, re-derived from `since` (SetDataTtl may have changed the TTL),
    and its clearing when requested or expired (`expired` says why then); the wait until the
    expiry. Data already cleared has nothing left to expire. With `hold` (`_pods_in_the_way`), data
    due to go waits that long, and the last item says so."""
    if status.data_cleared:
        return status, None, False
    begun = data_deletion_begun(status)
    if begun is not None:
        return _clear_data(status, begun, now, actions, events), None, False
    problem = data_ttl_problem(spec.data_ttl)
    expires = data_expiry(spec, since, status.data_expires_at)
    if problem is None:
        status = drop_conditions(status, COND_DATA_TTL_VALID)
    else:
        # Only kubectl gets such a TTL here (the API refuses it, and so does the first plan of an
        # execution): an edit after the start, or a job not executed yet. Not used (ttl_expiry):
        # the expiry stays the last valid TTL's (unset while none was derived yet), and the job
        # says why.
        message = f"spec.dataTtl {format_duration(spec.data_ttl)} is not used: it {problem} [data-ttl]; " + (
            f"the data expires at {format_datetime(expires)} as before"
            if expires
            else "the data does not expire"
        )
        previous = get_condition(status, COND_DATA_TTL_VALID)
        if previous is None or previous.message != message:
            events.append(JobEvent("Warning", "InvalidDataTtl", message))
        status = set_condition(status, COND_DATA_TTL_VALID, "False", "InvalidDataTtl", message, now)
    if expires != status.data_expires_at:
        status = status.model_copy(update={"data_expires_at": expires})
    if spec.clear_data or (expires is not None and now >= expires):
        if hold is not None:
            return status, hold, True
        why = "requested" if spec.clear_data else expired
        return _clear_data(status, why, now, actions, events), None, False
    return status, (expires - now if expires is not None else None), False


def _clear_data(
    status: ProjectJobStatus, why: str, now: datetime, actions: list[Action], events: list[JobEvent]
) -> ProjectJobStatus:
    """The step towards the deletion of the job's stored data: first the DATA_DELETING mark alone
    (written before any object goes, so that the deletion, once begun, ends whatever the spec says
    next), then the deletion and dataCleared."""
    if data_deletion_begun(status) is None:
        return set_condition(
            status, COND_DATA_CLEARED, "False", DATA_DELETING, f"stored data being deleted ({why})", now
        )
    actions.append(ClearData())
    status = status.model_copy(update={"data_cleared": True})
    status = set_condition(
        status, COND_DATA_CLEARED, "True", "DataCleared", f"stored data deleted ({why})", now
    )
    events.append(JobEvent("Normal", "DataCleared", f"the job's stored data was deleted ({why})"))
    return status


def _unreadable(exc: ValidationError) -> Problem:
    """A spec the models cannot read (edited after the start, past what the CRD checks): each
    error on one line naming its field, not pydantic's dump."""
    where = "; ".join(
        f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else f"spec: {e['msg']}"
        for e in exc.errors(include_url=False)
    )
    return Problem("", "unreadable", f"the spec cannot be read: {where}")


def _plan_delete(job: JobView, pods: Sequence[PodView], now: datetime) -> Plan:
    """The ProjectJob is being deleted: remove its pods, then its secrets and stored data, then
    let it go.

    The stored data goes once the pods that ran on a node are gone: a ship container shutting
    down uploads its last logs, which would otherwise land under a prefix already deleted (and
    nobody would delete them). A pod stuck terminating (its node lost) is waited for at most
    DELETE_POD_WAIT. A pod already terminating with a longer grace period (a graceful cancel, a
    namespace being deleted, `kubectl delete pod`) is asked again with the short one: within its
    own grace it would still be uploading when the data is deleted.
    """
    if FINALIZER not in job.finalizers:
        return Plan(job.status)
    actions: list[Action] = [
        DeletePod(p.name, DELETION_GRACE_SECONDS, "the job is deleted")
        for p in pods
        if p.alive
        or (
            p.deleting
            and not p.gone
            and p.deletion_grace_seconds is not None
            and p.deletion_grace_seconds > DELETION_GRACE_SECONDS
        )
    ]
    waited = now - (job.deleted_at or now)
    if any(not p.gone and p.scheduled for p in pods) and waited < DELETE_POD_WAIT:
        return Plan(job.status, tuple(actions), requeue_after=DELETE_POD_WAIT - waited)
    actions += [DeleteSecrets(), *_owned_by_reference(job.spec), ClearData(), RemoveFinalizer()]
    return Plan(job.status, tuple(actions))


def _owned_by_reference(raw: Mapping[str, Any]) -> list[Action]:
    """What else of a deleted job must go: the unpublished claims of its output datasets and the
    API's Secret of its registry password. Their owner reference would have the garbage collector
    delete them, but `kubectl delete --cascade=orphan` strips it first: they would stay for ever.
    From the raw spec (it may be unreadable); only for jobs that may have them, as each is one
    more request per deletion."""
    params = raw.get("jobParameters")
    if not isinstance(params, Mapping):
        return []
    found: list[Action] = []
    if params.get("outputDatasets"):
        found.append(DeleteDatasetClaims())
    env = params.get("env")
    image = env.get("dockerImageSpec") if isinstance(env, Mapping) else None
    if isinstance(image, Mapping) and image.get("passwordSecretRef"):
        found.append(DeleteRegistryPasswords())
    return found


# The Scheduled condition's reason while the API server refuses the attempt's pod.
REFUSED_REASON: Final = "FailedCreate"

# A ResourceQuota's refusal ends in the namespace's live usage ("exceeded quota: q, requested:
# cpu=4, used: cpu=8, limited: cpu=8"): it changes whenever another pod comes or goes.
_QUOTA_USAGE: Final = re.compile(r"(exceeded quota: [^,]*), requested: .*", re.DOTALL)


def same_refusal(old: str, new: str) -> bool:
    """Whether two refusals are the same one told again: the same text but for a quota's usage.

    A job waiting on a quota for hours got a FailedCreate Event per usage change (~60 an hour)."""
    return old == new or _QUOTA_USAGE.sub(r"\1", old) == _QUOTA_USAGE.sub(r"\1", new)


def scale_up_matters(
    type_names: Sequence[str], index: int, type_spec: InstanceTypeSpec | None, pod: PodView, now: datetime
) -> bool:
    """Whether an autoscaler's scale-up for the unschedulable `pod` would change the plan: another
    type is listed and the current one's budget is spent (the fallback it holds back). The glue
    lists the pod's Events for it only then: the API server keeps no cache of Events by default,
    and a change of the cluster rewrites many pending pods' scheduler messages at once."""
    if index + 1 >= len(type_names):
        return False
    return now - (pod.created_at or now) >= schedule_budget(type_spec)


def schedule_budget(type_spec: InstanceTypeSpec | None) -> timedelta:
    """How long a pod of this type may wait before the job falls back to its next type.

    A type deleted from the catalog while its pod waits keeps the field's default, so the job
    still moves on (to its next type, or, on its last, to ERROR) rather than waiting for a type
    that no longer exists.
    """
    if type_spec is None:
        default = InstanceTypeSpec.model_fields["schedule_timeout_seconds"].default
        return timedelta(seconds=default)
    return timedelta(seconds=type_spec.schedule_timeout_seconds)


def waiting_to_create(
    job: JobView,
    why: str,
    now: datetime,
    refused: CreatePod | None = None,
    names: Sequence[str] = (),
    budget: timedelta | None = None,
    instance_type: str = "",
) -> StatusUpdate:
    """The status of a job whose pod the API server refused for now (a ResourceQuota, an admission
    webhook's denial, missing RBAC): retried with backoff, as the Job controller does.

    The attempt stays as the job's status has it: the planned pod does not exist, so the status
    must not name it (the plan would take it for a pod deleted before it was seen). PREPARING with
    the API server's message; a Warning Event `FailedCreate` when the refusal is new (a quota's
    usage changing is not: `same_refusal`).

    `refused` is the pod's own CreatePod when the pod itself was refused (not a Secret or claim of
    it, not the wait for an earlier job's pod): a refusal may be its instance type's (a quota on
    GPUs, a missing PriorityClass, a policy on the node pool), so once the type's `budget` is
    spent the job falls back to the next of `names`, as it does when no node has room. The
    Scheduled condition (False, FailedCreate) keeps when the refusals began; `requeue_after` is
    when the budget runs out. `instance_type` is the type the pod is planned for: the status names
    it (`kubectl get pj` showed none for a first attempt waiting on a quota, while a pod waiting
    for a node shows its type).
    """
    events: list[JobEvent] = []
    status = _observed(job, now, events)
    if instance_type:
        status = status.model_copy(update={"actual_cloud_instance_type": instance_type})
    details = clip(f"waiting to create the job's pod: {why}")
    # The details show the latest message; the Event tells the refusal once.
    told = same_refusal(status.status_details, details)
    requeue: timedelta | None = None
    if refused is not None:
        old = get_condition(status, COND_SCHEDULED)
        if old is None or old.status != "False" or old.reason != REFUSED_REASON:
            # Another attempt's condition (or none): this type's refusals begin now.
            status = drop_conditions(status, COND_SCHEDULED)
        status = set_condition(status, COND_SCHEDULED, "False", REFUSED_REASON, why, now)
        cond = get_condition(status, COND_SCHEDULED)
        since = cond.last_transition_time if cond is not None and cond.last_transition_time else now
        following = refused.type_index + 1
        if budget is not None and following < len(names):
            if now - since >= budget:
                message = (
                    f"instance type {refused.instance_type} cannot be used: its pod was refused for "
                    f"{int(budget.total_seconds())}s ({why}); falling back to {names[following]}"
                )
                events.append(JobEvent("Warning", "FallingBack", clip(message, 1024)))
                status = drop_conditions(status, *ATTEMPT_CONDITIONS).model_copy(
                    update={
                        "attempt": refused.attempt,
                        "instance_type_index": following,
                        "pod_name": "",
                        "actual_cloud_instance_type": names[following],
                        # As _plan_start has it (the first attempt's status was never written).
                        "data_expires_at": None,
                    }
                )
                status = with_phase(status, JobPhase.PREPARING, message, events)
                return StatusUpdate(status, tuple(events), requeue_after=timedelta(0))
            requeue = budget - (now - since)
    # Nothing expires while the job waits, as while it runs (an unexecuted job's expiry goes).
    status = with_phase(
        status.model_copy(update={"data_expires_at": None}), JobPhase.PREPARING, details, events
    )
    if not told:
        events.append(JobEvent("Warning", "FailedCreate", clip(why, 1024)))
    return StatusUpdate(status, tuple(events), requeue_after=requeue)


def write_delay(
    job: JobView, step: Plan, status: ProjectJobStatus, since_last_write: float | None, interval: float
) -> timedelta | None:
    """How long to hold back writing `status` (the plan's) over the job's, or None: write now.

    Only what the pod reports on its way (scheduled, staging, executing, uploading) is paced, to
    one write per `interval` seconds per job: a trivial job passes four phases in a second, and
    every write costs the API server a write, an etcd commit and a watch event to every watcher.
    The status written later is computed then (its Event tells every phase passed since). A step
    that acted, a new attempt, a cancel, a deletion and a final phase are written at once, and so
    is the first change after a quiet `interval`.
    """
    if interval <= 0 or since_last_write is None or since_last_write >= interval:
        return None
    if step.actions or job.deleting or job.spec.get("cancel"):
        return None
    phase = status.phase
    if phase is None or phase.is_final or phase == JobPhase.CANCELLING:
        return None
    if (status.attempt, status.pod_name) != (job.status.attempt, job.status.pod_name):
        return None
    return timedelta(seconds=interval - since_last_write)
