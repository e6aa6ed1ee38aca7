"""The job lifecycle as pure functions: plan() and compute_status(), one table row per state.

Every phase and every non-happy state: unschedulable, instance-type fallback, image pull errors
with the timeout, OOMKilled, evicted / DisruptionTarget, node lost, deadline exceeded, pod
deleted, non-zero exit, stage-in failure, cancel (before start, running, finished), retry,
finalize, data TTL, deletion, and adoption after a crash.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dsjobs.controller.names import (
    EXECUTE_REQUESTED_AT,
    FINALIZER,
    JOB_LABEL,
    PROJECT_LABEL,
    output_dataset_id,
)
from dsjobs.controller.plan import (
    NOMINATED_PATIENCE,
    SCALE_UP_PATIENCE,
    UNEXECUTED_DETAILS,
    ClearData,
    CreatePod,
    DeleteDatasetClaims,
    DeletePod,
    DeleteRegistryPasswords,
    DeleteSecrets,
    EnsureMetadata,
    ForceCancel,
    JobView,
    Plan,
    PublishDatasets,
    RemoveFinalizer,
    cancel_grace_seconds,
    plan,
    scale_up_matters,
    schedule_budget,
    waiting_to_create,
    write_delay,
)
from dsjobs.controller.podview import (
    ContainerView,
    PodCondition,
    PodView,
    latest_event_message,
    scale_up_message,
)
from dsjobs.controller.settings import OperatorSettings
from dsjobs.controller.status import (
    MAX_FILE_ERRORS_BYTES,
    MAX_FILE_ERRORS_LISTED,
    STORAGE_CHECK_AFTER,
    coalesce_transitions,
    data_deletion_begun,
    get_condition,
    storage_bound_since,
    with_passed_phases,
)
from dsjobs.instancetypes import CATALOG, instance_type_spec
from dsjobs.models import InstanceTypeSpec, JobPhase, ProjectJobSpec
from dsjobs.runner.contract import FORCED_CANCEL_WORD_CONTRACT, RUNNER_CONTRACT
from dsjobs.runner.entry import SETUP_FAILED_EXIT
from dsjobs.runner.result import (
    FileError,
    FileErrorType,
    LogFileResult,
    OutputResult,
    ProgressResult,
    ResultPointer,
    RunnerResult,
    RunnerStatus,
)
from dsjobs.validation.job import stored_json_bytes

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
CREATED = NOW - timedelta(minutes=1)
SETTINGS = OperatorSettings(image_pull_timeout_seconds=60, shutdown_grace_margin_seconds=15)
TYPES = {e.name: instance_type_spec(e, "local") for e in CATALOG}  # schedule timeout: 60 s
SHA = "c" * 64


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- builders ----------------------------------------------------------------------------------


def job(
    *,
    params: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    finalizers: tuple[str, ...] = (FINALIZER,),
    deleting: bool = False,
    name: str = "job-1",
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> JobView:
    body: dict[str, Any] = {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "metadata": {
            "name": name,
            "namespace": "project-a",
            "uid": "uid-1",
            "resourceVersion": "100",
            "generation": 1,
            "creationTimestamp": ts(CREATED),
            "finalizers": list(finalizers),
            "labels": dict(labels) if labels is not None else {PROJECT_LABEL: "proj-a", JOB_LABEL: name},
        },
        "spec": {
            "projectId": "proj-a",
            "execute": True,
            "jobParameters": {"cmd": "python main.py", **(params or {})},
            **spec,
        },
        "status": status or {},
    }
    if deleting:
        body["metadata"]["deletionTimestamp"] = ts(NOW)
    return JobView.from_body(body)


def started(
    phase: str = "PREPARING", attempt: int = 1, index: int = 0, type_name: str = "c1.4", **extra: Any
) -> dict[str, Any]:
    """The status of a job whose attempt's pod was created."""
    return {
        "phase": phase,
        "createdAt": ts(CREATED),
        "attempt": attempt,
        "podName": f"job-1-a{attempt}",
        "instanceTypeIndex": index,
        "actualCloudInstanceType": type_name,
        "observedGeneration": 1,
        **extra,
    }


def waiting(name: str, reason: str = "ContainerCreating", message: str = "") -> dict[str, Any]:
    return {"name": name, "state": {"waiting": {"reason": reason, "message": message}}}


def running(name: str, started_at: datetime = NOW - timedelta(seconds=20)) -> dict[str, Any]:
    return {"name": name, "state": {"running": {"startedAt": ts(started_at)}}}


def terminated(name: str, code: int = 0, reason: str = "Completed", message: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "state": {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "message": message,
                "startedAt": ts(NOW - timedelta(seconds=20)),
                "finishedAt": ts(NOW - timedelta(seconds=2)),
            }
        },
    }


def result(code: int | None = 0, status: RunnerStatus = RunnerStatus.EXITED, **extra: Any) -> RunnerResult:
    return RunnerResult(
        project_id="proj-a", job_id="job-1", attempt=1, status=status, return_code=code, **extra
    )


def pod(
    *,
    attempt: int = 1,
    phase: str = "Pending",
    node: str = "",
    conditions: list[dict[str, Any]] | None = None,
    init: list[dict[str, Any]] | None = None,
    containers: list[dict[str, Any]] | None = None,
    reason: str = "",
    message: str = "",
    deleting: bool = False,
    gone: bool = False,
    created: datetime = NOW - timedelta(seconds=5),
    type_name: str = "c1.4",
    index: int = 0,
    tolerations: list[dict[str, Any]] | None = None,
    attempt_label: int | None = None,
) -> PodView:
    meta: dict[str, Any] = {
        "name": f"job-1-a{attempt}",
        "uid": f"pod-uid-{attempt}",
        "creationTimestamp": ts(created),
        "labels": {
            "dsjobs.dev/job-id": "job-1",
            "dsjobs.dev/attempt": str(attempt if attempt_label is None else attempt_label),
            "dsjobs.dev/instance-type": type_name,
        },
        "annotations": {
            "dsjobs.dev/instance-type-index": str(index),
            "dsjobs.dev/runner-contract": str(RUNNER_CONTRACT),
        },
    }
    if deleting:
        meta["deletionTimestamp"] = ts(NOW)
    body = {
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "initContainers": [{"name": "stage-in", "image": "runner:1"}],
            "containers": [
                {"name": "job", "image": "python:3.11-slim", "resources": {"limits": {"memory": "16Gi"}}},
                {"name": "ship", "image": "runner:1", "resources": {"limits": {"memory": "256Mi"}}},
            ],
            "tolerations": tolerations or [],
        },
        "status": {
            "phase": phase,
            "reason": reason,
            "message": message,
            "conditions": conditions or [],
            "initContainerStatuses": init or [],
            "containerStatuses": containers or [],
        },
    }
    return PodView.from_pod(body, gone=gone)


def unschedulable(created: datetime, attempt: int = 1, type_name: str = "c1.4", index: int = 0) -> PodView:
    return pod(
        attempt=attempt,
        created=created,
        type_name=type_name,
        index=index,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
            }
        ],
    )


def never_located(name: str) -> dict[str, Any]:
    """A kubelet's status of a container it could not find when the pod ended (it never started)."""
    return {
        "name": name,
        "state": {
            "terminated": {
                "exitCode": 137,
                "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the pod was terminated",
            }
        },
    }


def executing_pod() -> PodView:
    return pod(
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[running("job"), running("ship")],
    )


def ended_pod(
    code: int = 0, *, job_reason: str = "Completed", phase: str | None = None, res: RunnerResult | None = None
) -> PodView:
    ship_message = (res or result(code)).to_json()
    return pod(
        phase=phase or ("Succeeded" if code == 0 else "Failed"),
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", code, job_reason), terminated("ship", 0, message=ship_message)],
    )


def step(
    j: JobView,
    pods: list[PodView] | None = None,
    res: RunnerResult | ResultPointer | None = None,
    now: datetime = NOW,
    settings: OperatorSettings = SETTINGS,
) -> Plan:
    return plan(j, pods or [], TYPES, res, now, settings)


def marked_then(
    j: JobView,
    pods: list[PodView] | None = None,
    res: RunnerResult | ResultPointer | None = None,
    now: datetime = NOW,
    settings: OperatorSettings = SETTINGS,
) -> Plan:
    """The step after the one that marks the job's stored data as being deleted (DataCleared
    False, Deleting: written before any object goes), planned from the marked status."""
    marked = step(j, pods, res, now, settings)
    assert ClearData() not in marked.actions and not marked.status.data_cleared
    assert data_deletion_begun(marked.status) is not None
    assert "DataCleared" not in [e.reason for e in marked.events]
    return step(replace(j, status=marked.status), pods, res, now, settings)


def kinds(p: Plan) -> list[str]:
    return [type(a).__name__ for a in p.actions]


# --- start ---------------------------------------------------------------------------------------


def test_new_job_without_execute_waits_in_creating() -> None:
    p = step(job(execute=False, finalizers=()))
    assert p.status.phase == JobPhase.CREATING
    assert p.status.created_at == CREATED
    assert p.actions == (EnsureMetadata(finalizer=True),)
    assert [e.reason for e in p.events] == ["Created"]


def test_a_job_not_executed_says_what_it_waits_for() -> None:
    # Applied by hand without `execute: true`, it sat in CREATING without a word.
    p = step(job(execute=False))
    assert p.status.phase == JobPhase.CREATING and p.status.status_details == UNEXECUTED_DETAILS
    assert "spec.execute: true" in UNEXECUTED_DETAILS
    assert step(job(execute=False, status=p.status.to_cr())).status == p.status  # nothing more to write
    executed = step(job(status=p.status.to_cr()))
    assert executed.status.phase == JobPhase.PREPARING
    assert executed.status.status_details == "waiting for a node for instance type c1.4"


def test_a_job_applied_without_labels_gets_them_with_the_finalizer() -> None:
    p = step(job(execute=False, finalizers=(), labels={"team": "x"}))
    assert p.actions == (
        EnsureMetadata(finalizer=True, labels=((JOB_LABEL, "job-1"), (PROJECT_LABEL, "proj-a"))),
    )
    # A wrong project label is corrected (the spec is the truth); a finalizer already there stays.
    p = step(job(execute=False, labels={PROJECT_LABEL: "other", JOB_LABEL: "job-1"}))
    assert p.actions == (EnsureMetadata(finalizer=False, labels=((PROJECT_LABEL, "proj-a"),)),)
    # Labels in place, finalizer in place: nothing to add.
    assert step(job(execute=False)).actions == ()


def test_execute_creates_attempt_one_on_the_first_type() -> None:
    p = step(job(params={"cloudInstanceTypes": [{"name": "g1.1"}, {"name": "c1.4"}]}))
    assert p.actions == (CreatePod(1, 0, "g1.1"),)
    assert p.status.phase == JobPhase.PREPARING
    assert (p.status.attempt, p.status.pod_name, p.status.actual_cloud_instance_type) == (
        1,
        "job-1-a1",
        "g1.1",
    )


@pytest.mark.parametrize("second_attempt", [False, True])
def test_the_status_written_with_a_new_pod_is_what_its_added_event_gives(second_attempt: bool) -> None:
    # One status write per attempt started, not two: the pod's own ADDED event (pending, no node)
    # changes nothing in the status written after creating it.
    if second_attempt:
        types = {"cloudInstanceTypes": [{"name": "g2.8"}, {"name": "g1.1"}]}
        status = {**started(attempt=2, index=1, type_name="g1.1"), "podName": ""}
        pods = [pod(gone=True, type_name="g2.8")]
    else:
        types, status, pods = {}, {}, []
    j = job(params=types, status=status)
    p = step(j, pods)
    assert kinds(p) == ["CreatePod"]
    attempt = p.status.attempt
    assert "waiting for a node for instance type" in p.status.status_details
    scheduled = get_condition(p.status, "Scheduled")
    assert scheduled is not None and (scheduled.status, scheduled.reason) == ("False", "Pending")
    if not second_attempt:  # the story keeps the step (a fallback told it in its own event)
        assert "creating pod job-1-a1" in " ".join(e.message for e in p.events)
    created = pod(attempt=attempt, created=NOW, type_name=p.status.actual_cloud_instance_type)
    echo = step(job(params=types, status=p.status.to_cr()), [*pods, created])
    assert echo.status == p.status and not echo.actions and not echo.events


def test_default_instance_type_is_c1_4() -> None:
    assert step(job()).actions == (CreatePod(1, 0, "c1.4"),)


@pytest.mark.parametrize(
    ("params", "reason", "needle"),
    [
        ({"cloudInstanceTypes": [{"name": "z9.9"}]}, "UnknownInstanceType", "z9.9"),
        ({"cmd": "python main.py ${NOPE}"}, "InvalidSpec", "NOPE"),
    ],
)
def test_invalid_jobs_fail_with_the_cause_named(params: dict[str, Any], reason: str, needle: str) -> None:
    p = step(job(params=params))
    assert p.status.phase == JobPhase.ERROR
    assert needle in p.status.status_details
    finished = get_condition(p.status, "Finished")
    assert finished is not None and finished.reason == reason
    assert not any(isinstance(a, CreatePod) for a in p.actions)
    assert p.status.finished_at == NOW


def test_invalid_spec_details_name_the_resource_field_and_the_rule() -> None:
    p = step(job(params={"outputFiles": [{"path": "../o"}]}))
    assert p.status.status_details.startswith(
        "invalid job: spec.jobParameters.outputFiles[0].path: must not contain a '..' segment"
    )
    assert p.status.status_details.endswith("[path-parent]")


def test_a_cluster_without_the_default_type_rejects_a_job_with_no_instance_types() -> None:
    no_c1_4 = {name: spec for name, spec in TYPES.items() if name != "c1.4"}
    p = plan(job(), [], no_c1_4, None, NOW, SETTINGS)
    finished = get_condition(p.status, "Finished")
    assert finished is not None and finished.reason == "UnknownInstanceType"
    assert (
        "unknown instance type c1.4: spec.jobParameters.cloudInstanceTypes: c1.4" in p.status.status_details
    )
    assert not any(isinstance(a, CreatePod) for a in p.actions)


def test_unreadable_spec_fails() -> None:
    j = job()
    body_spec = dict(j.spec)
    body_spec["jobParameters"] = {"cmd": 5}
    bad = JobView(**{**j.__dict__, "spec": body_spec})
    p = step(bad)
    assert p.status.phase == JobPhase.ERROR and "invalid job" in p.status.status_details


#: A spec value the models cannot read (a CRD of another version, or none, let it through).
UNREADABLE_POLICY = {"maxAttempts": "many"}


def test_a_started_job_whose_spec_became_unreadable_ends_and_stops_its_pod() -> None:
    # An edit after the start past what the CRD checks (a CRD of another version's): the job
    # ends naming the field, and its pod does not run on untracked.
    j = job(status=started("EXECUTING"), retryPolicy=UNREADABLE_POLICY)
    p = step(j, [pod(phase="Running", node="cpu-0")])
    assert p.status.phase == JobPhase.ERROR
    assert "spec.retryPolicy.maxAttempts: " in p.status.status_details and "\n" not in p.status.status_details
    assert p.actions == (
        DeleteSecrets(),
        DeletePod("job-1-a1", 15, "the job's spec cannot be read"),
    )
    # Its data expires as the raw dataTtl says (the default 14 days here).
    assert p.status.data_expires_at == NOW + timedelta(days=14)
    # Output datasets' claims (found by label) go with it, as for any job not ending in SUCCESS.
    with_datasets = job(
        params={"cmd": "x", "outputDatasets": [{"name": "d", "var": "D", "sizeGb": 1}]},
        status=started("EXECUTING"),
        retryPolicy=UNREADABLE_POLICY,
    )
    p = step(with_datasets, [pod(phase="Running", node="cpu-0")])
    assert p.status.phase == JobPhase.ERROR and DeleteDatasetClaims() in p.actions


def test_a_finished_job_whose_spec_became_unreadable_still_cleans_up() -> None:
    # A final job with an unreadable spec got no step at all: a kept pod and its Secrets (storage
    # credentials) stayed, the data never expired, clearData (DeleteData) never happened.
    retention = OperatorSettings(finished_pod_retention_seconds=600)
    status = started("SUCCESS", finishedAt=ts(NOW), returnCode=0)
    kept = step(job(status=status, retryPolicy=UNREADABLE_POLICY), [ended_pod(0)], settings=retention)
    assert not kept.actions and kept.requeue_after == timedelta(minutes=10)
    assert kept.status.data_expires_at == NOW + timedelta(days=14)
    later = step(
        job(status=status, retryPolicy=UNREADABLE_POLICY),
        [ended_pod(0)],
        now=NOW + timedelta(minutes=10),
        settings=retention,
    )
    assert later.actions == (DeleteSecrets(), DeletePod("job-1-a1", 1, "the job has finished"))
    finalized = step(
        job(status=status, retryPolicy=UNREADABLE_POLICY, finalized=True), [ended_pod(0)], settings=retention
    )
    assert kinds(finalized) == ["DeleteSecrets", "DeletePod"]
    # clearData: once the pod is gone.
    clear = job(status=status, retryPolicy=UNREADABLE_POLICY, clearData=True)
    assert kinds(step(clear, [ended_pod(0)], settings=retention)) == ["DeleteSecrets", "DeletePod"]
    cleared = marked_then(clear, [replace(ended_pod(0), gone=True)], settings=retention)
    assert cleared.actions == (ClearData(),) and cleared.status.data_cleared
    assert not step(job(status=cleared.status.to_cr(), retryPolicy=UNREADABLE_POLICY, clearData=True)).actions
    # The TTL: the raw one when valid, else the last expiry known.
    short = job(status=status, retryPolicy=UNREADABLE_POLICY, dataTtl="1h")
    assert marked_then(short, now=NOW + timedelta(hours=1)).actions == (ClearData(),)
    known = {**status, "dataExpiresAt": ts(NOW + timedelta(days=2))}
    typo = job(status=known, retryPolicy=UNREADABLE_POLICY, dataTtl="1m")
    assert not step(typo, now=NOW + timedelta(days=1)).actions
    assert marked_then(typo, now=NOW + timedelta(days=2)).actions == (ClearData(),)
    # A raw dataTtl that is no duration at all: the last expiry known still holds ...
    garbled = job(status=known, retryPolicy=UNREADABLE_POLICY, dataTtl="fortnight")
    waiting_p = step(garbled, now=NOW + timedelta(days=1))
    assert not waiting_p.actions and waiting_p.status.data_expires_at == NOW + timedelta(days=2)
    assert waiting_p.requeue_after == timedelta(days=1)
    assert marked_then(garbled, now=NOW + timedelta(days=2)).actions == (ClearData(),)
    # ... and with none known the data is kept (never deleted on a guess), with no timer set.
    never = step(
        job(status=status, retryPolicy=UNREADABLE_POLICY, dataTtl="fortnight"), now=NOW + timedelta(days=400)
    )
    assert never.status.data_expires_at is None and data_deletion_begun(never.status) is None
    assert not never.actions and never.requeue_after is None


def test_a_job_on_an_invalid_instance_type_says_which_and_why() -> None:
    params = {"cmd": "x", "cloudInstanceTypes": [{"name": "c1.8"}]}
    catalog = {k: v for k, v in TYPES.items() if k != "c1.8"}
    why = "spec.requests.cpu: 16 is above the limit 8 [request-above-limit]"
    p = plan(job(params=params), [], catalog, None, NOW, SETTINGS, invalid_types={"c1.8": why})
    assert p.status.phase == JobPhase.ERROR
    assert "InstanceType c1.8 is invalid" in p.status.status_details and why in p.status.status_details
    assert (
        "[instance-type-invalid]" in p.status.status_details
        and "not an instance type" not in p.status.status_details
    )


def test_too_long_name_fails() -> None:
    p = step(job(name="j" * 64))
    assert p.status.phase == JobPhase.ERROR and "63" in p.status.status_details


def test_a_name_that_is_no_dns_label_is_refused_before_its_first_pod() -> None:
    # Kubernetes takes `train.v2`, and so did the CRD before its rule: the job ran, but the API's
    # job ids are DNS labels, so neither it nor the CLI could ever fetch its outputs.
    for name in ("train.v2", "j" * 64):
        p = step(job(name=name))
        assert p.status.phase == JobPhase.ERROR
        assert not any(isinstance(a, CreatePod) for a in p.actions)
        finished = get_condition(p.status, "Finished")
        assert finished is not None and finished.reason == "InvalidSpec"
        assert p.status.status_details.startswith(f"invalid job: metadata.name: {name!r} must be a DNS label")
        assert "[job-name]" in p.status.status_details
    # One that started before the rule existed is not stopped for it.
    status = {**started("EXECUTING"), "podName": "train.v2-a1"}
    running_pod = replace(executing_pod(), name="train.v2-a1")
    p = step(job(name="train.v2", status=status), [running_pod])
    assert p.status.phase == JobPhase.EXECUTING and not p.actions


def test_cancel_before_start_never_starts() -> None:
    for execute in (False, True):
        p = step(job(execute=execute, cancel={"reason": "changed my mind"}))
        assert p.status.phase == JobPhase.CANCELLED
        assert not any(isinstance(a, CreatePod) for a in p.actions)
        # Asked to run, its first pod's Secrets may be there: an operator killed between making
        # them and writing attempt 1 left them (seen in the chaos e2e test), and no later step
        # of a final job would delete them.
        assert p.actions == ((DeleteSecrets(),) if execute else ())
        assert not step(job(execute=execute, status=p.status.to_cr(), cancel={"reason": "x"})).actions


def test_crash_after_pod_creation_adopts_the_pod() -> None:
    # The status write after creating the pod was lost: the pod is found and adopted, not duplicated.
    p = step(job(status={"phase": "CREATING", "createdAt": ts(CREATED)}), [pod()])
    assert not any(isinstance(a, CreatePod) for a in p.actions)
    assert (p.status.attempt, p.status.pod_name) == (1, "job-1-a1")


def test_a_running_pod_relabelled_as_a_later_attempt_keeps_running() -> None:
    # `kubectl label --overwrite pod job-1-a1 dsjobs.dev/attempt=5`: the pod is still attempt 1
    # (its name); believing the label, the plan deleted it as superseded and ran attempt 5.
    relabelled = pod(
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[running("job"), running("ship")],
        attempt_label=5,
    )
    p = step(job(status=started("EXECUTING")), [relabelled])
    assert (p.status.phase, p.status.attempt, p.status.pod_name) == (JobPhase.EXECUTING, 1, "job-1-a1")
    assert not p.actions


def test_a_final_phase_written_by_hand_gets_its_finish_time() -> None:
    # `kubectl edit --subresource=status` to SUCCESS without finishedAt (or a backup restored so):
    # the data never expired and a kept pod was never retired.
    p = step(job(status=started("SUCCESS")), [executing_pod()])
    assert p.status.finished_at == NOW
    assert p.status.data_expires_at == NOW + timedelta(days=14)
    finished = {
        **started("SUCCESS"),
        "conditions": [
            {
                "type": "Finished",
                "status": "True",
                "reason": "Succeeded",
                "message": "",
                "lastTransitionTime": ts(CREATED),
            }
        ],
    }
    assert step(job(status=finished), []).status.finished_at == CREATED


def test_plan_is_idempotent() -> None:
    j = job(status=started("EXECUTING"))
    first = step(j, [executing_pod()])
    again = step(JobView(**{**j.__dict__, "status": first.status}), [executing_pod()])
    assert again.status == first.status and not again.actions and not again.events


# --- preparing: scheduling, fallback, images ------------------------------------------------------


def test_unschedulable_waits_with_the_scheduler_message() -> None:
    p = step(job(status=started()), [unschedulable(NOW - timedelta(seconds=10))])
    assert p.status.phase == JobPhase.PREPARING
    assert "Insufficient nvidia.com/gpu" in p.status.status_details
    assert p.requeue_after == timedelta(seconds=50)  # the type's 60 s budget
    scheduled = get_condition(p.status, "Scheduled")
    assert scheduled is not None and scheduled.status == "False" and scheduled.reason == "Unschedulable"
    assert "Unschedulable" in [e.reason for e in p.events]


def test_a_pod_waiting_for_its_volumes_says_so_not_capacity() -> None:
    waiting = pod(
        created=NOW - timedelta(seconds=10),
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
            }
        ],
    )
    p = step(job(status=started()), [waiting])
    assert p.status.phase == JobPhase.PREPARING
    assert p.status.status_details == (
        "waiting for the job's volumes (instance type c1.4): "
        "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    )
    gpu = step(job(status=started()), [unschedulable(NOW - timedelta(seconds=10))])
    assert gpu.status.status_details.startswith("waiting for capacity for instance type c1.4: ")


def test_a_claim_the_ephemeral_volume_controller_cannot_make_is_told_why() -> None:
    # The scheduler only says it waits for the controller; the controller's FailedBinding Event
    # (looked up by the glue) says why the claim never comes.
    waiting = pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/2 nodes are available: waiting for ephemeral volume controller to create the "
                'persistentvolumeclaim "job-1-a1-dsjobs-work". not found',
            }
        ],
    )
    assert waiting.waits_for_ephemeral_claim and not pod().waits_for_ephemeral_claim
    assert waiting.events_to_ask(NOW) == "reason=FailedBinding"
    events = [
        {"message": "old", "lastTimestamp": "2025-06-01T11:59:00Z"},
        {"message": QUOTA_ON_CLAIMS, "lastTimestamp": "2025-06-01T11:59:50Z"},
        {"message": "no time"},
    ]
    told = dataclasses.replace(waiting, warning=latest_event_message(events, NOW))
    p = step(job(status=started()), [told])
    assert p.status.status_details == (
        f"waiting for the job's volumes (instance type c1.4): its claim cannot be made: {QUOTA_ON_CLAIMS}"
    )
    assert latest_event_message([], NOW) == ""
    # A trouble last seen long ago (the kubelet repeats one that lasts) tells nothing now.
    assert latest_event_message(events, NOW + timedelta(minutes=4)) == QUOTA_ON_CLAIMS
    assert latest_event_message(events, NOW + timedelta(minutes=6)) == ""
    # Seen by the API server's clock when it says: a kubelet 10 minutes behind is not old news.
    behind = {
        "message": "node behind",
        "lastTimestamp": "2025-06-01T11:49:50Z",
        "metadata": {"managedFields": [{"manager": "kubelet", "time": "2025-06-01T11:59:55Z"}]},
    }
    assert latest_event_message([*events, behind], NOW) == "node behind"
    assert p.requeue_after is not None and p.requeue_after <= timedelta(seconds=20)  # asked again


def test_a_pod_whose_node_cannot_set_it_up_is_told_why_from_its_events() -> None:
    # Scheduled, no container started: a kubelet names no reason while it mounts the volumes.
    scheduled_at = NOW - timedelta(seconds=30)
    cond = {"type": "PodScheduled", "status": "True", "lastTransitionTime": ts(scheduled_at)}
    creating = [waiting("stage-in", "PodInitializing")]
    mounting = pod(phase="Pending", node="cpu-0", conditions=[cond], init=creating)
    assert mounting.events_to_ask(NOW) == "type=Warning,reason!=FailedScheduling"
    assert mounting.events_to_ask(scheduled_at + timedelta(seconds=5)) is None  # give it time
    mount_failed = 'MountVolume.SetUp failed for volume "s3-data": driver name ru.yandex.s3.csi not found'
    told = dataclasses.replace(mounting, warning=mount_failed)
    p = step(job(status=started()), [told])
    assert p.status.status_details == f"starting on node cpu-0: {mount_failed}"
    assert p.requeue_after == timedelta(seconds=20)
    # Started: nothing to ask (a warning looked up before is not shown either).
    running_pod = executing_pod()
    assert running_pod.events_to_ask(NOW) is None
    assert (
        "MountVolume"
        not in step(
            job(status=started()), [dataclasses.replace(running_pod, warning=mount_failed)]
        ).status.status_details
    )


QUOTA_ON_CLAIMS = (
    'ephemeral volume dsjobs-work: create PVC job-1-a1-dsjobs-work: persistentvolumeclaims "job-1-a1-dsjobs-work" '
    "is forbidden: exceeded quota: no-pvc, requested: persistentvolumeclaims=1, used: persistentvolumeclaims=0, "
    "limited: persistentvolumeclaims=0"
)


def test_fallback_to_the_second_type_after_the_budget() -> None:
    types = {"cloudInstanceTypes": [{"name": "g2.8"}, {"name": "g1.1"}]}
    j = job(params=types, status=started(type_name="g2.8"))
    old = unschedulable(NOW - timedelta(seconds=61), type_name="g2.8")
    # 1: the intent is recorded first (status only).
    p1 = step(j, [old])
    assert not p1.actions
    assert (p1.status.attempt, p1.status.instance_type_index, p1.status.pod_name) == (2, 1, "")
    assert p1.status.actual_cloud_instance_type == "g1.1"
    assert "FallingBack" in [e.reason for e in p1.events]
    # 2: the old pod is deleted; the new one waits until it is gone (never two at once).
    j2 = JobView(**{**j.__dict__, "status": p1.status})
    p2 = step(j2, [old])
    assert p2.actions == (DeletePod("job-1-a1", 1, "superseded by a newer attempt"),)
    # 3: the old pod is gone: attempt 2 is created on g1.1.
    p3 = step(j2, [pod(gone=True, type_name="g2.8")])
    assert p3.actions == (CreatePod(2, 1, "g1.1"),)
    assert p3.status.pod_name == "job-1-a2" and p3.status.actual_cloud_instance_type == "g1.1"


def test_a_pod_waiting_on_a_type_deleted_meanwhile_ends_when_no_type_is_left() -> None:
    # Nothing will make room for a type an admin took away: the job ends instead of waiting for
    # ever (with a next type listed, the budget's fallback moves on as for any lack of capacity).
    # Its own budget is gone with it: the field's default (300 s) applies.
    j = job(status=started(type_name="c1.4"))
    old = unschedulable(NOW - timedelta(seconds=301))
    without = {k: v for k, v in TYPES.items() if k != "c1.4"}
    p = plan(j, [old], without, None, NOW, SETTINGS)
    assert p.status.phase == JobPhase.ERROR
    assert p.status.status_details.startswith(
        "unknown instance type c1.4 (no longer in the catalog), and pod job-1-a1 could not be scheduled within 300s"
    )
    assert DeletePod("job-1-a1", 1, "its instance type is gone") in p.actions
    # Still in the catalog: it waits, as before.
    assert step(j, [old]).status.phase == JobPhase.PREPARING
    # Deleted, but its pod is still within the budget: it may yet be scheduled.
    young = unschedulable(NOW - timedelta(seconds=100))
    assert plan(j, [young], without, None, NOW, SETTINGS).status.phase == JobPhase.PREPARING


def test_a_claim_deleted_while_the_pod_waits_ends_the_job_as_a_missing_volume() -> None:
    # PVC protection holds only claims of scheduled pods: an S3 mount's claim deleted meanwhile
    # leaves the scheduler saying so for ever. Not a lack of capacity: no fallback, no waiting.
    types = {"cloudInstanceTypes": [{"name": "g2.8"}, {"name": "g1.1"}]}
    j = job(params=types, status=started(type_name="g2.8"))

    def waiting(message: str, age: int = 31) -> PodView:
        cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        return pod(created=NOW - timedelta(seconds=age), type_name="g2.8", conditions=[cond])

    verdict = '0/3 nodes are available: persistentvolumeclaim "raw-data-bucket" not found. preemption: ...'
    # Not at once: an output dataset's claim, made just before the pod, may be unknown to a
    # scheduler whose informer lags.
    young = step(j, [waiting(verdict, age=5)])
    assert young.status.phase == JobPhase.PREPARING and young.requeue_after == timedelta(seconds=25)
    gone = waiting(verdict)
    p = step(j, [gone])
    assert p.status.phase == JobPhase.ERROR
    finished = get_condition(p.status, "Finished")
    assert finished is not None and finished.reason == "MissingVolume"
    assert (
        "volume claim 'raw-data-bucket' of the job was deleted while its pod waited"
        in p.status.status_details
    )
    assert DeletePod("job-1-a1", 1, "its volume claim is gone") in p.actions
    going = waiting('0/3 nodes are available: persistentvolumeclaim "raw-data-bucket" is being deleted.')
    assert step(j, [going]).status.phase == JobPhase.ERROR
    # The pod's own ephemeral claim (working storage), made after it: just not there yet.
    own = waiting('0/3 nodes are available: persistentvolumeclaim "job-1-a1-dsjobs-work" not found.')
    assert step(j, [own]).status.phase == JobPhase.PREPARING


def test_a_pod_waiting_on_a_type_an_admin_changed_is_made_again() -> None:
    # Its nodeSelector was wrong and is fixed: the waiting pod still asks for the old one.
    from dsjobs.controller.render import instance_type_digest

    j = job(status=started(type_name="c1.4"))
    old_type = TYPES["c1.4"]
    waiting = replace(
        unschedulable(NOW - timedelta(seconds=10)), instance_type_digest=instance_type_digest(old_type)
    )
    same = step(j, [waiting])
    assert same.status.attempt == 1 and "InstanceTypeChanged" not in [e.reason for e in same.events]
    fixed = {**TYPES, "c1.4": old_type.model_copy(update={"node_selector": {"pool": "cpu-fixed"}})}
    p = plan(j, [waiting], fixed, None, NOW, SETTINGS)
    assert (p.status.attempt, p.status.pod_name, p.status.instance_type_index) == (2, "", 0)
    assert p.status.retried_failures == 0  # no failure: not counted against maxAttempts
    [told] = [e for e in p.events if e.reason == "InstanceTypeChanged"]
    assert "instance type c1.4 changed while pod job-1-a1 waited for a node" in told.message
    # Then as for a fallback: the old pod goes, and the new one is rendered from the new spec.
    j2 = JobView(**{**j.__dict__, "status": p.status})
    assert plan(j2, [waiting], fixed, None, NOW, SETTINGS).actions == (
        DeletePod("job-1-a1", 1, "superseded by a newer attempt"),
    )
    assert plan(j2, [pod(gone=True)], fixed, None, NOW, SETTINGS).actions == (CreatePod(2, 0, "c1.4"),)
    # A pod of an older operator (no digest): left alone.
    assert (
        plan(j, [unschedulable(NOW - timedelta(seconds=10))], fixed, None, NOW, SETTINGS).status.attempt == 1
    )


def test_no_fallback_while_the_scheduler_preempts_pods_for_the_job_s_pod() -> None:
    # Unschedulable, but nominated to a node whose lower-priority pods are being preempted for it
    # (their grace runs, minutes for a job's pod): falling back at the budget killed them for
    # nothing. It waits NOMINATED_PATIENCE more, then falls back as any.
    types = {"cloudInstanceTypes": [{"name": "g2.8"}, {"name": "g1.1"}]}
    j = job(params=types, status=started(type_name="g2.8"))
    nominated = dataclasses.replace(
        unschedulable(NOW - timedelta(seconds=61), type_name="g2.8"), nominated_node="gpu-0"
    )
    p = step(j, [nominated])
    assert p.status.attempt == 1 and not p.actions and "FallingBack" not in [e.reason for e in p.events]
    assert p.requeue_after == NOMINATED_PATIENCE - timedelta(seconds=1)
    late = step(j, [nominated], now=NOW + NOMINATED_PATIENCE)
    assert (late.status.attempt, late.status.instance_type_index) == (2, 1)
    assert PodView.from_pod({"status": {"nominatedNodeName": "gpu-0"}}).nominated_node == "gpu-0"


SCALE_UP = "pod triggered scale-up: [{gpu-v100-pool 0->1 (max: 4)}]"


def test_no_fallback_while_a_node_autoscaler_adds_a_node_for_the_job_s_pod() -> None:
    # A GPU node with its drivers takes minutes, more than the type's budget: falling back left
    # the node the autoscaler bought idle, and the next type started a scale-up of its own.
    types = {"cloudInstanceTypes": [{"name": "g2.8"}, {"name": "g1.1"}]}
    j = job(params=types, status=started(type_name="g2.8"))
    waiting = unschedulable(NOW - timedelta(seconds=61), type_name="g2.8")
    assert waiting.events_to_ask(NOW) == "type=Normal"
    events = [
        {"reason": "TriggeredScaleUp", "message": "old", "lastTimestamp": "2025-06-01T11:30:00Z"},
        {"reason": "TriggeredScaleUp", "message": SCALE_UP, "lastTimestamp": "2025-06-01T11:45:00Z"},
        {"reason": "Scheduled", "message": "not a scale-up", "lastTimestamp": "2025-06-01T11:59:00Z"},
    ]
    # Said once per scale-up, minutes ago: still the word.
    assert scale_up_message(events) == SCALE_UP and scale_up_message(events[2:]) == ""
    karpenter = {"reason": "Nominated", "message": "Pod should schedule on: nodeclaim/default-x4k2p"}
    assert scale_up_message([karpenter]) == karpenter["message"]
    # A scale-up that brought no node (a stockout): cluster-autoscaler says so after it.
    failed = {
        "reason": "NotTriggerScaleUp",
        "message": "pod didn't trigger scale-up: 1 in backoff after failed scale-up",
        "lastTimestamp": "2025-06-01T11:50:00Z",
    }
    assert scale_up_message([*events, failed]) == ""
    assert scale_up_message([{**failed, "lastTimestamp": "2025-06-01T11:40:00Z"}, *events]) == SCALE_UP
    # Asked only when it would hold a fallback back: another type listed, the budget spent.
    g28 = TYPES["g2.8"]
    assert scale_up_matters(["g2.8", "g1.1"], 0, g28, waiting, NOW)  # created 61 s ago, budget 60
    assert not scale_up_matters(["g2.8"], 0, g28, waiting, NOW)
    assert not scale_up_matters(["g2.8", "g1.1"], 1, g28, waiting, NOW)
    assert not scale_up_matters(["g2.8", "g1.1"], 0, g28, waiting, NOW - timedelta(seconds=5))
    coming = dataclasses.replace(waiting, scale_up=SCALE_UP)
    p = step(j, [coming])
    assert p.status.attempt == 1 and not p.actions and "FallingBack" not in [e.reason for e in p.events]
    assert p.status.status_details == (
        "waiting for capacity for instance type g2.8: 0/2 nodes are available: 2 Insufficient "
        f"nvidia.com/gpu.; a node is being added for it: {SCALE_UP}"
    )
    assert p.requeue_after == SCALE_UP_PATIENCE - timedelta(seconds=1)
    # Bounded: a scale-up that never brings a node (quota, stockout) falls back then.
    late = step(j, [coming], now=NOW + SCALE_UP_PATIENCE)
    assert (late.status.attempt, late.status.instance_type_index) == (2, 1)
    # Without the word, the budget as before.
    assert step(j, [waiting]).status.attempt == 2
    # A claim the controller cannot make is still asked about (FailedBinding), not scale-ups.
    assert (
        pod(
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "waiting for ephemeral volume controller to create the persistentvolumeclaim",
                }
            ]
        ).events_to_ask(NOW)
        == "reason=FailedBinding"
    )
    assert pod(gone=True).events_to_ask(NOW) is None


def test_no_fallback_before_the_scheduler_finds_the_pod_unschedulable() -> None:
    # The scheduler is down (or still working through a backlog): the pod has waited past the
    # budget, but nobody found that the type has no capacity.
    types = {"cloudInstanceTypes": [{"name": "g2.8"}, {"name": "g1.1"}]}
    j = job(params=types, status=started(type_name="g2.8"))
    unseen = pod(created=NOW - timedelta(hours=1), type_name="g2.8")
    p = step(j, [unseen])
    assert (p.status.attempt, p.status.instance_type_index) == (1, 0) and not p.actions
    assert "FallingBack" not in [e.reason for e in p.events]
    assert p.status.status_details == (
        "waiting for a node for instance type g2.8: no scheduler has placed or refused pod job-1-a1 "
        "in 60s (is kube-scheduler running, or working through a backlog?)"
    )
    within = step(j, [pod(created=NOW - timedelta(seconds=59), type_name="g2.8")])
    assert within.status.status_details == "waiting for a node for instance type g2.8"
    # The scheduler's verdict comes (a pod update): the budget is long spent, so it falls back now.
    p2 = step(j, [unschedulable(NOW - timedelta(hours=1), type_name="g2.8")])
    assert (p2.status.attempt, p2.status.instance_type_index) == (2, 1)
    assert "FallingBack" in [e.reason for e in p2.events]


def test_last_type_keeps_waiting_and_says_so() -> None:
    types = {"cloudInstanceTypes": [{"name": "g2.8"}, {"name": "g1.1"}]}
    j = job(params=types, status=started(attempt=2, index=1, type_name="g1.1"))
    p = step(j, [unschedulable(NOW - timedelta(hours=1), attempt=2, type_name="g1.1", index=1)])
    assert p.status.phase == JobPhase.PREPARING and not p.actions
    assert p.status.status_details.startswith(
        "no capacity for any of the instance types g2.8, g1.1; still waiting for capacity for instance type g1.1: "
    )
    told = [e for e in p.events if e.reason == "InstanceTypesExhausted"]
    assert [(e.type, e.message) for e in told] == [
        ("Warning", "no capacity for any of the instance types g2.8, g1.1; waiting for g1.1")
    ]
    # Told once: planned again with that status stored, no second Event.
    again = step(
        job(params=types, status=p.status.to_cr()),
        [unschedulable(NOW - timedelta(hours=1), attempt=2, type_name="g1.1", index=1)],
    )
    assert again.status.status_details == p.status.status_details
    assert "InstanceTypesExhausted" not in [e.reason for e in again.events]


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff"])
def test_image_pull_errors_fail_after_the_timeout(reason: str) -> None:
    bad = pod(
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[waiting("job", reason, 'pull access denied for "nope/img"'), running("ship")],
    )
    p1 = step(job(status=started()), [bad])
    assert p1.status.phase == JobPhase.PREPARING
    assert "python:3.11-slim" in p1.status.status_details
    assert p1.requeue_after == timedelta(seconds=60)
    assert reason in [e.reason for e in p1.events]
    # 61 s later it is still failing: ERROR naming the image.
    j2 = job(status=p1.status.to_cr())
    p2 = step(j2, [bad], now=NOW + timedelta(seconds=61))
    assert p2.status.phase == JobPhase.ERROR
    assert (
        "could not be pulled" in p2.status.status_details and "python:3.11-slim" in p2.status.status_details
    )


def test_invalid_image_name_fails_at_once() -> None:
    bad = pod(node="cpu-0", init=[waiting("stage-in", "InvalidImageName", "bad ref")])
    p = step(job(status=started()), [bad])
    assert p.status.phase == JobPhase.ERROR and "InvalidImageName" in p.status.status_details


def test_staging_inputs_is_preparing() -> None:
    p = step(job(status=started()), [pod(node="cpu-0", init=[running("stage-in")])])
    assert p.status.phase == JobPhase.PREPARING and p.status.status_details == "staging inputs on node cpu-0"
    # Planned again now and then: the operator checks the object store while the runner waits on it.
    assert p.requeue_after == STORAGE_CHECK_AFTER


def test_a_storage_problem_seen_by_the_operator_is_told_while_the_runner_moves_files() -> None:
    problem = "ConnectionRefusedError: [Errno 111] Connection refused"
    staging = pod(node="cpu-0", init=[running("stage-in")])
    p = plan(job(status=started()), [staging], TYPES, None, NOW, SETTINGS, storage_problem=problem)
    assert p.status.status_details == (
        f"staging inputs on node cpu-0; the object store does not answer the operator either ({problem}): "
        "the runner keeps trying for up to 5 minutes"
    )
    uploading = pod(
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job"), running("ship")],
    )
    p = plan(
        job(status=started("EXECUTING")), [uploading], TYPES, None, NOW, SETTINGS, storage_problem=problem
    )
    assert p.status.phase == JobPhase.UPLOADING_OUTPUT
    assert p.status.status_details.startswith("the program exited with code 0; uploading outputs and logs; ")
    assert problem in p.status.status_details and p.requeue_after == STORAGE_CHECK_AFTER


def test_what_waits_on_the_object_store() -> None:
    assert storage_bound_since(pod(init=[running("stage-in")])) == NOW - timedelta(seconds=20)
    uploading = pod(init=[terminated("stage-in")], containers=[terminated("job"), running("ship")])
    assert storage_bound_since(uploading) == NOW - timedelta(seconds=2)  # the program's end
    assert (
        storage_bound_since(pod(init=[terminated("stage-in")], containers=[running("job"), running("ship")]))
        is None
    )
    assert storage_bound_since(pod(containers=[terminated("job"), terminated("ship")])) is None


# --- running and ending ---------------------------------------------------------------------------


def test_running_is_executing_with_start_time() -> None:
    p = step(job(status=started()), [executing_pod()])
    assert p.status.phase == JobPhase.EXECUTING
    assert p.status.started_at == NOW - timedelta(seconds=20)
    assert "Executing" in [e.reason for e in p.events]


# What the API server adds to every pod (DefaultTolerationSeconds).
DEFAULT_TOLERATIONS = [
    {
        "key": "node.kubernetes.io/not-ready",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
    {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
]


def running_on_a_silent_node(
    ready: str = "False", tolerations: list[dict[str, Any]] | None = None
) -> PodView:
    """A running pod as the node lifecycle controller leaves it when the node stops reporting:
    Ready False, ContainersReady still True (the kubelet's last word)."""
    return pod(
        phase="Running",
        node="gpu-0",
        init=[terminated("stage-in")],
        containers=[running("job"), running("ship")],
        conditions=[
            {
                "type": "ContainersReady",
                "status": "True",
                "lastTransitionTime": ts(NOW - timedelta(seconds=20)),
            },
            {"type": "Ready", "status": ready, "lastTransitionTime": ts(NOW - timedelta(seconds=5))},
        ],
        tolerations=DEFAULT_TOLERATIONS if tolerations is None else tolerations,
    )


def test_a_running_job_whose_node_stops_reporting_says_so_once_and_again_when_it_is_back() -> None:
    p = step(job(status=started("EXECUTING")), [running_on_a_silent_node()])
    assert p.status.phase == JobPhase.EXECUTING and not p.actions
    told = (
        "node gpu-0 stopped reporting at 2025-06-01T11:59:55Z; Kubernetes evicts the pod 300s after that "
        "unless the node comes back; the program may still be running there"
    )
    assert p.status.status_details == f"running on node gpu-0; {told}"
    cond = get_condition(p.status, "NodeReachable")
    assert cond is not None and (cond.status, cond.reason, cond.message) == ("False", "NodeNotReady", told)
    assert [(e.type, e.reason, e.message) for e in p.events] == [("Warning", "NodeNotReady", told)]
    # Observed again (later reconciles): the same status, no second Event.
    again = step(job(status=p.status.to_cr()), [running_on_a_silent_node()], now=NOW + timedelta(seconds=30))
    assert again.status.to_cr() == p.status.to_cr() and not again.events
    # The node is back: told, and the details are the plain ones again.
    back = step(job(status=p.status.to_cr()), [running_on_a_silent_node(ready="True")])
    cond = get_condition(back.status, "NodeReachable")
    assert cond is not None and (cond.status, cond.reason) == ("True", "NodeReady")
    assert back.status.status_details == "running on node gpu-0"
    assert [(e.type, e.reason) for e in back.events] == [("Normal", "NodeReady")]
    # A job whose node never went silent has no such condition at all.
    assert (
        get_condition(step(job(status=started("EXECUTING")), [executing_pod()]).status, "NodeReachable")
        is None
    )


def test_a_cancel_waiting_for_a_silent_node_says_so() -> None:
    # The pod is being deleted, its node silent: the program's end cannot be confirmed until the
    # node reports or Kubernetes evicts the pod (then the job is CANCELLED).
    deleting = dataclasses.replace(running_on_a_silent_node(), deleting=True)
    j = job(status=started("CANCELLING"), cancel={"reason": "stop"})
    p = step(j, [deleting])
    assert p.status.phase == JobPhase.CANCELLING and not p.actions
    assert p.status.status_details.startswith("cancelling: stop; node gpu-0 stopped reporting at ")
    cond = get_condition(p.status, "NodeReachable")
    assert cond is not None and cond.status == "False"
    # Nor is a deleted pod's node said to be back while it is silent (a pod deleted by someone).
    silent = step(job(status=started("EXECUTING")), [running_on_a_silent_node()]).status
    running = step(job(status=silent.to_cr()), [deleting])
    assert running.status.phase == JobPhase.EXECUTING
    assert not any(e.reason == "NodeReady" for e in running.events)
    cond = get_condition(running.status, "NodeReachable")
    assert cond is not None and cond.status == "False"


@pytest.mark.parametrize(
    ("tolerations", "then"),
    [
        ([], "Kubernetes evicts the pod;"),
        ([{"operator": "Exists"}], "the pod stays bound to it (it tolerates an unreachable node for ever);"),
        (
            [
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 60,
                }
            ],
            "Kubernetes evicts the pod 60s after that unless the node comes back;",
        ),
        (  # a NoSchedule toleration keeps no pod on a node: the NoExecute one after it decides
            [
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoSchedule"},
                {"operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "tolerationSeconds": 30},
            ],
            "Kubernetes evicts the pod 30s after that unless the node comes back;",
        ),
        ([{"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}], "Kubernetes evicts the pod;"),
    ],
)
def test_a_silent_node_is_told_with_the_pods_own_toleration(
    tolerations: list[dict[str, Any]], then: str
) -> None:
    p = step(job(status=started("EXECUTING")), [running_on_a_silent_node(tolerations=tolerations)])
    assert then in p.status.status_details


def test_a_pod_not_ready_for_its_own_reasons_is_no_silent_node() -> None:
    # Before its containers run (or after the program ended) Ready and ContainersReady are both False.
    starting = pod(
        phase="Pending",
        node="cpu-0",
        init=[running("stage-in")],
        conditions=[
            {"type": "ContainersReady", "status": "False"},
            {"type": "Ready", "status": "False"},
        ],
    )
    assert not starting.node_not_ready
    assert get_condition(step(job(status=started()), [starting]).status, "NodeReachable") is None


def test_a_job_never_ends_before_it_started_when_its_node_s_clock_is_ahead() -> None:
    # startedAt comes from the node (the container started 20 s before NOW by its clock),
    # finishedAt from the operator, whose clock says 30 s before NOW.
    behind = NOW - timedelta(seconds=30)
    done = step(job(status=started("EXECUTING")), [ended_pod(0)], now=behind)
    assert done.status.phase == JobPhase.SUCCESS
    assert done.status.started_at == done.status.finished_at == behind
    in_step = step(job(status=started("EXECUTING")), [ended_pod(0)])
    assert in_step.status.started_at == NOW - timedelta(seconds=20)


def test_observations_of_the_pod_are_paced_outcomes_and_requests_are_not() -> None:
    j = job(status=started())
    running = step(j, [executing_pod()])
    assert running.status.phase == JobPhase.EXECUTING and not running.actions
    # Written 0.3 s ago: held back for the rest of the second; never written: at once.
    assert write_delay(j, running, running.status, 0.3, 1.0) == timedelta(seconds=0.7)
    assert write_delay(j, running, running.status, None, 1.0) is None
    assert write_delay(j, running, running.status, 1.0, 1.0) is None
    assert write_delay(j, running, running.status, 0.3, 0) is None  # pacing off
    # Nothing is lost by holding it back: the next step plans from the same stored status (the
    # start time comes from the pod), and its Event tells the phases seen in between.
    done = step(j, [ended_pod(0)])
    assert done.status.phase == JobPhase.SUCCESS and done.status.started_at == running.status.started_at
    assert write_delay(j, done, done.status, 0.3, 1.0) is None  # the outcome: at once
    (told,) = with_passed_phases(done.events, ["EXECUTING", "UPLOADING_OUTPUT"])
    assert told.reason == "Succeeded"
    assert told.message.startswith("PREPARING -> EXECUTING -> UPLOADING_OUTPUT -> SUCCESS"), told
    assert with_passed_phases(done.events, ["SUCCESS"]) == list(done.events)  # no phase twice
    # A step that acts, a new attempt and a cancel are written at once.
    assert write_delay(job(), step(job()), step(job()).status, 0.3, 1.0) is None  # creates the pod
    cancelled = job(status=started("EXECUTING"), cancel={"reason": "stop"})
    c = step(cancelled, [executing_pod()])
    assert write_delay(cancelled, c, c.status, 0.3, 1.0) is None
    retry = dataclasses.replace(
        running, status=running.status.model_copy(update={"attempt": 2, "pod_name": ""})
    )
    assert write_delay(j, retry, retry.status, 0.3, 1.0) is None


def test_program_ended_ship_running_is_uploading_output() -> None:
    up = pod(
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", 3), running("ship")],
    )
    p = step(job(status=started("EXECUTING")), [up])
    assert p.status.phase == JobPhase.UPLOADING_OUTPUT and p.status.return_code == 3


def test_a_failed_setup_leaves_no_return_code_though_the_container_exited() -> None:
    # While the ship uploads, the job container's exit code is all there is: the runner's own
    # 120 when the setup failed, which the result then says is no return code of the program.
    up = pod(
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", SETUP_FAILED_EXIT), running("ship")],
    )
    uploading = step(job(status=started("EXECUTING")), [up]).status
    # Not told as the program's exit meanwhile (it said "the program exited with code 120").
    assert uploading.return_code is None
    assert uploading.status_details.startswith(
        "the job container exited with code 120 (its setup failed, or the program returned it)"
    )
    res = result(None, RunnerStatus.SETUP_FAILED, reason="pip install failed with exit code 1")
    p = step(job(status=uploading), [ended_pod(SETUP_FAILED_EXIT, res=res)], res)
    assert p.status.phase == JobPhase.ERROR and p.status.return_code is None
    assert p.status.status_details == (
        "the job's environment could not be set up: pip install failed with exit code 1"
    )


@pytest.mark.parametrize(
    ("count", "text"), [(2100, "x"), (300, "y" * 4000), (300, "<&>" * 1000)], ids=["many", "long", "escaped"]
)
def test_file_errors_a_status_lists_are_bounded_and_the_rest_counted(count: int, text: str) -> None:
    """A result naming thousands of file errors (or long ones) must not make a status etcd refuses:
    the job would never be written finished."""
    outs = [{"path": f"out{k}"} for k in range(100)]
    res = result(
        0,
        file_errors=[
            FileError(type=FileErrorType.UPLOAD_FAILED, description=f"{text} {i}", path=f"out{i % 100}")
            for i in range(count)
        ],
    )
    p = step(job(params={"outputFiles": outs}, status=started("EXECUTING")), [ended_pod(0, res=res)], res=res)
    errors = p.status.file_errors
    assert p.status.phase == JobPhase.SUCCESS
    assert len(errors) < count and len(errors) <= MAX_FILE_ERRORS_LISTED
    # As stored: Go's JSON takes 6 bytes for each of <, & and > (raw bytes let them grow 6 times).
    assert sum(stored_json_bytes(e.description) for e in errors) <= MAX_FILE_ERRORS_BYTES
    assert errors[-1].description == f"{count - len(errors) + 1} more file errors are not listed here"
    assert errors[-1].output_file_desc is not None
    assert [e.description for e in errors[:3]] == [f"{text} {i}" for i in range(3)]


def test_file_errors_within_the_bound_are_all_listed() -> None:
    errors = [
        FileError(type=FileErrorType.NOT_FOUND, description="missing", path=f"o{i}") for i in range(250)
    ]
    res = result(0, file_errors=errors)
    outs = [{"path": f"o{i}"} for i in range(100)]
    p = step(job(params={"outputFiles": outs}, status=started("EXECUTING")), [ended_pod(0, res=res)], res=res)
    assert [e.description for e in p.status.file_errors] == ["missing"] * 250


def test_outputs_only_a_result_pointer_tells_of_are_each_a_file_error() -> None:
    """The result.json the termination message points to was never stored (the store was down at
    the very end): the job's outputs must not go missing without a word."""
    pointer = ResultPointer(
        result_key="k",
        project_id="proj-a",
        job_id="job-1",
        attempt=1,
        status=RunnerStatus.EXITED,
        return_code=0,
        outputs_count=2,
    )
    j = job(
        params={"outputFiles": [{"path": "a.txt"}, {"path": "b", "var": "B"}]}, status=started("EXECUTING")
    )
    s = step(j, [ended_pod(0)], res=pointer).status
    assert s.phase == JobPhase.SUCCESS and s.output_files == []
    assert [(e.output_file_desc.path if e.output_file_desc else None, e.type) for e in s.file_errors] == [
        ("a.txt", FileErrorType.UPLOAD_FAILED),
        ("b", FileErrorType.UPLOAD_FAILED),
    ]
    assert "result.json" in s.file_errors[0].description


def test_success_records_outputs_logs_and_expiry() -> None:
    res = result(
        0,
        outputs=[
            OutputResult(
                path="out/r.txt", key="projects/proj-a/jobs/job-1/outputs/out/r.txt", sha256=SHA, size_bytes=5
            )
        ],
        log_files=[LogFileResult(name="stdout.txt", key="k/stdout.txt", sha256=SHA, size_bytes=9)],
        diagnostic_files=[
            LogFileResult(name="docker_stats.tsv", key="k/docker_stats.tsv", sha256=SHA, size_bytes=7)
        ],
        file_errors=[FileError(type=FileErrorType.NOT_FOUND, description="missing", path="gone.txt")],
    )
    j = job(
        params={"outputFiles": [{"path": "./out/r.txt"}, {"path": "gone.txt"}]},
        status=started("EXECUTING"),
        dataTtl="2d",
    )
    p = step(j, [ended_pod(0, res=res)], res=res)
    s = p.status
    assert s.phase == JobPhase.SUCCESS and s.return_code == 0
    assert s.output_files[0].desc.path == "./out/r.txt"  # as the client declared it
    assert s.output_files[0].key.endswith("out/r.txt") and s.output_files[0].sha256 == SHA
    assert s.log_files[0].desc.path == "stdout.txt"
    assert [(f.desc.path, f.key, f.size_bytes) for f in s.diagnostic_files] == [
        ("docker_stats.tsv", "k/docker_stats.tsv", 7)
    ]
    assert (
        s.file_errors[0].output_file_desc is not None and s.file_errors[0].output_file_desc.path == "gone.txt"
    )
    # When its containers ended (2 s before the operator looked), the expiry counting from then.
    ended = NOW - timedelta(seconds=2)
    assert s.finished_at == ended and s.data_expires_at == ended + timedelta(days=2)
    assert "Succeeded" in [e.reason for e in p.events]


def test_finished_at_is_when_the_pod_ended_not_when_the_operator_saw_it() -> None:
    # An operator away for a minute (a crash, a rollout, a standby waiting on the Lease): its
    # downtime went into finishedAt, the run time the CLI shows, the data expiry and the metrics.
    j = job(status=started("EXECUTING"))
    late = step(j, [ended_pod(0)], now=NOW + timedelta(minutes=1))
    assert late.status.finished_at == NOW - timedelta(seconds=2)
    # A node clock ahead of the operator's does not end a job in the future.
    ahead = step(j, [ended_pod(0)], now=NOW - timedelta(seconds=10))
    assert ahead.status.finished_at == NOW - timedelta(seconds=10)


def test_the_stored_data_size_counts_inputs_outputs_and_logs_until_cleared() -> None:
    other = "b" * 64
    inputs = {
        "inputFiles": [
            {"desc": {"path": "a.csv"}, "sha256": SHA, "sizeBytes": 100},
            # The same content twice is one object in the project's cache.
            {"desc": {"path": "copy-of-a.csv"}, "sha256": SHA, "sizeBytes": 100},
        ],
        "env": {
            "pythonEnv": {"localModules": [{"desc": {"path": "m.zip"}, "sha256": other, "sizeBytes": 20}]}
        },
        "outputFiles": [{"path": "r.txt"}],
    }
    # An unexecuted job holds its uploaded inputs.
    created = step(job(execute=False, params=inputs, status={"phase": "CREATING", "createdAt": ts(CREATED)}))
    assert created.status.data_size_bytes == 120
    res = result(
        0,
        outputs=[OutputResult(path="r.txt", key="k/r.txt", sha256=SHA, size_bytes=5)],
        log_files=[LogFileResult(name="stdout.txt", key="k/stdout.txt", sha256=SHA, size_bytes=9)],
    )
    done = step(job(params=inputs, status=started("EXECUTING")), [ended_pod(0, res=res)], res=res)
    assert done.status.phase == JobPhase.SUCCESS and done.status.data_size_bytes == 134
    cleared = marked_then(job(params=inputs, status=done.status.to_cr(), clearData=True))
    assert cleared.status.data_cleared and cleared.status.data_size_bytes == 0


def test_infinite_ttl_never_expires() -> None:
    p = step(job(status=started("EXECUTING"), dataTtl="infinity"), [ended_pod(0)], res=result(0))
    assert p.status.phase == JobPhase.SUCCESS and p.status.data_expires_at is None


_STOPPED = result(143, cancelled=True)


@dataclass
class Ending:
    name: str
    pod: PodView
    res: RunnerResult | ResultPointer | None
    reason: str
    code: int | None
    needle: str
    phase: JobPhase = JobPhase.ERROR
    extra: dict[str, Any] = field(default_factory=dict)


def _stopped_pod(**state: Any) -> PodView:
    """A pod whose runner saw SIGTERM: the job container ended 143, ship reported the stop."""
    return pod(
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", 143, "Error"), terminated("ship", 0, message=_STOPPED.to_json())],
        **state,
    )


ENDINGS = [
    Ending(
        "non-zero exit", ended_pod(3, res=result(3)), result(3), "NonZeroExit", 3, "Program returned code 3"
    ),
    Ending(
        "killed by signal",
        ended_pod(137, res=result(137)),
        result(137),
        "NonZeroExit",
        137,
        "Program returned code 137 (killed by signal 9)",
        extra={"exact": True},
    ),
    Ending(  # 128 itself is no signal's code
        "exit 128",
        ended_pod(128, res=result(128)),
        result(128),
        "NonZeroExit",
        128,
        "Program returned code 128",
        extra={"exact": True},
    ),
    Ending(  # nor are codes above 128 + SIGRTMAX (64): exit(255) is no "signal 127"
        "exit 255",
        ended_pod(255, res=result(255)),
        result(255),
        "NonZeroExit",
        255,
        "Program returned code 255",
        extra={"exact": True},
    ),
    Ending(
        "oom killed",
        ended_pod(137, job_reason="OOMKilled", res=result(None, RunnerStatus.LOST)),
        result(None, RunnerStatus.LOST),
        "OOMKilled",
        137,
        "ran out of memory (OOMKilled; the job container's memory limit of instance type c1.4 is 16Gi)",
    ),
    Ending(  # The kernel killed a process of the job (its cgroup's OOM), the program went on and
        # exited 0: a successful job, as a program that succeeded is on DataSphere (the operation
        # said "success, code 0" while the job said ERROR).
        "a child oom killed, the program succeeded",
        ended_pod(0, job_reason="OOMKilled", res=result(0)),
        result(0),
        "Succeeded",
        0,
        "",
        phase=JobPhase.SUCCESS,
    ),
    Ending(
        "evicted",
        pod(phase="Failed", node="cpu-0", reason="Evicted", message="The node was low on resource: memory."),
        None,
        "Evicted",
        None,
        "low on resource",
    ),
    Ending(
        "working dir full",
        pod(
            phase="Failed",
            node="cpu-0",
            reason="Evicted",
            message='Usage of EmptyDir volume "dsjobs-work" exceeds the limit "20Gi". ',
            containers=[
                terminated("job", 137),
                terminated("ship", 0, message=result(137, cancelled=True).to_json()),
            ],
        ),
        result(137, cancelled=True),
        "WorkingDirFull",
        137,
        "working directory outgrew the 20Gi limit",
    ),
    Ending(
        "disruption target",
        pod(
            phase="Failed",
            node="cpu-0",
            conditions=[
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": "drain",
                }
            ],
        ),
        None,
        "Evicted",
        None,
        "the pod was evicted (kubectl drain, a scale-down, a descheduler): drain",  # the condition's message said why
    ),
    Ending(
        "node shutdown",
        pod(
            phase="Failed",
            node="cpu-0",
            reason="Terminated",
            message="Pod was terminated in response to imminent node shutdown.",
            conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}],
        ),
        None,
        "NodeShutdown",
        None,
        "imminent node shutdown",
    ),
    Ending(
        "node-pressure eviction",
        pod(
            phase="Failed",
            node="cpu-0",
            reason="Evicted",
            message="The node was low on resource: memory.",
            conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}],
        ),
        None,
        "Evicted",
        None,
        "low on resource",
    ),
    Ending(
        "node lost",
        pod(
            phase="Running",
            node="cpu-0",
            deleting=True,
            containers=[running("job"), running("ship")],
            conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}],
        ),
        None,
        "NodeLost",
        None,
        "unreachable",
    ),
    Ending(
        "deadline exceeded",
        pod(phase="Failed", node="cpu-0", reason="DeadlineExceeded", message="Pod was active too long"),
        None,
        "DeadlineExceeded",
        None,
        "active deadline",
    ),
    Ending("pod deleted", pod(gone=True), None, "PodDeleted", None, "was deleted"),
    # What a kubelet reports for containers that never started when the pod was deleted after
    # stage-in (its image still pulling): read as the program's exit 137, it was "killed by signal
    # 9", a failure of the program, which never ran.
    Ending(
        "pod deleted before the job started (kubelet)",
        pod(
            phase="Failed",
            node="cpu-0",
            gone=True,
            init=[terminated("stage-in")],
            containers=[never_located("job"), never_located("ship")],
        ),
        None,
        "PodDeleted",
        None,
        "was deleted before the job finished",
    ),
    # A node rebooted (or its container runtime restarted without its shims): CRI's recovery ends
    # every running container "Unknown" with exit code 255. A stage-in so ended was "staging
    # inputs failed: Unknown" (never retried), a program "returned code 255 (killed by signal 127)".
    Ending(
        "node restarted during stage-in",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[terminated("stage-in", 255, "Unknown")],
            containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
        ),
        None,
        "NodeRestarted",
        None,
        "the node cpu-0 or its container runtime restarted while the job ran: the state of its "
        "containers (stage-in) was lost",
    ),
    Ending(
        "node restarted during the program",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[terminated("stage-in")],
            containers=[terminated("job", 255, "Unknown"), terminated("ship", 255, "Unknown")],
        ),
        None,
        "NodeRestarted",
        None,
        "containers (job, ship) was lost",
    ),
    Ending(
        "stage-in failed",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[terminated("stage-in", 1, "Error", "input x.csv: sha256 mismatch")],
        ),
        None,
        "StageInFailed",
        None,
        "sha256 mismatch",
    ),
    Ending(
        "setup failed",
        ended_pod(120, res=result(120, RunnerStatus.SETUP_FAILED, reason="pip install failed")),
        result(120, RunnerStatus.SETUP_FAILED, reason="pip install failed"),
        "SetupFailed",
        None,
        "pip install failed",
    ),
    Ending(
        "truncated result",
        ended_pod(0),
        ResultPointer(
            result_key="k", project_id="proj-a", job_id="job-1", status=RunnerStatus.EXITED, return_code=0
        ),
        "Succeeded",
        0,
        "",
        phase=JobPhase.SUCCESS,
    ),
    Ending(
        "succeeded while the object store failed its uploads",
        ended_pod(0, res=result(0, storage_unavailable=True)),
        result(0, storage_unavailable=True),
        "Succeeded",
        0,
        "the object store kept failing while its outputs and logs were stored",
        phase=JobPhase.SUCCESS,
    ),
    Ending(
        "succeeded, the result lost but for its pointer",
        ended_pod(0),
        ResultPointer(
            result_key="k",
            project_id="proj-a",
            job_id="job-1",
            status=RunnerStatus.EXITED,
            return_code=0,
            outputs_count=3,
        ),
        "Succeeded",
        0,
        "result.json) could not be read",
        phase=JobPhase.SUCCESS,
    ),
    Ending("no runner result", ended_pod(0), None, "Succeeded", 0, "", phase=JobPhase.SUCCESS),
    # The runner reports `cancelled` whenever its container got SIGTERM; without a cancel request
    # that was Kubernetes (a drain, an eviction, a preemption) or somebody deleting the pod.
    Ending(
        "evicted while running (the runner saw SIGTERM)",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[terminated("stage-in")],
            containers=[terminated("job", 143, "Error"), terminated("ship", 0, message=_STOPPED.to_json())],
            conditions=[
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": "drain",
                }
            ],
        ),
        _STOPPED,
        "Evicted",
        143,
        "the pod was evicted (kubectl drain",
    ),
    Ending(
        "pod deleted while running (the runner saw SIGTERM)",
        _stopped_pod(gone=True, phase="Running"),
        _STOPPED,
        "PodDeleted",
        143,
        "was deleted before the job finished",
    ),
    Ending(
        "pod stopped, not cancelled (the runner saw SIGTERM)",
        _stopped_pod(deleting=True, phase="Failed"),
        _STOPPED,
        "PodStopped",
        143,
        "not cancelled",
    ),
    Ending(
        # `kill $PPID` in the job: nobody deleted or disrupted the pod. It was PodStopped, an
        # infrastructure failure that a retry policy ran again.
        "stop signal from inside the job container",
        ended_pod(143, res=_STOPPED),
        _STOPPED,
        "NonZeroExit",
        143,
        "Program returned code 143 (killed by signal 15) (the job's entry script was sent a stop signal "
        "from inside its container)",
    ),
    Ending(
        "stop signal from inside the job container during setup",
        ended_pod(143, res=result(None, status=RunnerStatus.CANCELLED, cancelled=True)),
        result(None, status=RunnerStatus.CANCELLED, cancelled=True),
        "StoppedFromInside",
        None,
        "the job's entry script was sent a stop signal from inside its container before the program ran",
    ),
    Ending(
        # The program had exited 0 when the entry script got the signal: its success stands.
        "stop signal from inside the job container after the program succeeded",
        ended_pod(143, res=result(0, cancelled=True)),
        result(0, cancelled=True),
        "Succeeded",
        0,
        "",
        phase=JobPhase.SUCCESS,
    ),
    Ending(
        # Failed before any container ran, with no word of the kubelet's: the pod is named.
        "pod failed with no exit code and no message",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[waiting("stage-in", "PodInitializing")],
            containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
        ),
        None,
        "PodFailed",
        None,
        "pod job-1-a1 failed: the pod ended before the job's program ran",
        extra={"exact": True},
    ),
    Ending(
        # A stage-in's stderr that merely looks like JSON is told as it is, not dropped.
        "stage-in failed with a message that is not a runner result",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[terminated("stage-in", 1, "Error", "{not json: input data.csv: sha256 mismatch")],
            containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
        ),
        None,
        "StageInFailed",
        None,
        "staging inputs failed: {not json: input data.csv: sha256 mismatch",
        extra={"exact": True},
    ),
    Ending(
        "ship container died (no runner result)",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[terminated("stage-in")],
            containers=[terminated("job", 0), terminated("ship", 137, "OOMKilled")],
        ),
        None,
        "RunnerFailed",
        0,
        "ship container failed (OOMKilled, exit code 137) without reporting",
    ),
    Ending(
        "stage-in failed with a runner result as its message",
        pod(
            phase="Failed",
            node="cpu-0",
            init=[
                terminated(
                    "stage-in",
                    1,
                    "Error",
                    result(
                        None, RunnerStatus.STAGE_IN_FAILED, reason="input data.csv: sha256 mismatch"
                    ).to_json(),
                )
            ],
            containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
        ),
        None,
        "StageInFailed",
        None,
        "staging inputs failed: input data.csv: sha256 mismatch",
        extra={"exact": True},
    ),
]


def test_a_stage_in_the_object_store_failed_is_retried_as_infrastructure() -> None:
    policy = {"maxAttempts": 2, "backoffSeconds": 0}
    down = result(
        None,
        RunnerStatus.STAGE_IN_FAILED,
        reason="the object store kept failing while the inputs were staged: ConnectionRefusedError",
        storage_unavailable=True,
    )
    failed = pod(
        phase="Failed",
        node="cpu-0",
        init=[terminated("stage-in", 1, "Error", down.to_json())],
        containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
    )
    p = step(job(status=started("PREPARING"), retryPolicy=policy), [failed], res=down)
    assert p.status.phase == JobPhase.PREPARING and p.status.attempt == 2  # retried
    # What the glue has then: no result.json (the store was down), no ship: the stage-in's own
    # termination message tells it (it was taken for the inputs' fault, never retried).
    p = step(job(status=started("PREPARING"), retryPolicy=policy), [failed], res=None)
    assert p.status.phase == JobPhase.PREPARING and p.status.attempt == 2
    missing = dataclasses.replace(
        failed,
        init_containers=(
            ContainerView.from_status(
                terminated(
                    "stage-in",
                    1,
                    "Error",
                    result(
                        None, RunnerStatus.STAGE_IN_FAILED, reason="input a.csv: not in storage"
                    ).to_json(),
                )
            ),
        ),
    )
    assert (
        step(job(status=started("PREPARING"), retryPolicy=policy), [missing]).status.phase == JobPhase.ERROR
    )
    p = step(job(status=started("PREPARING")), [failed], res=down)
    finished = get_condition(p.status, "Finished")
    assert (
        p.status.phase == JobPhase.ERROR and finished is not None and finished.reason == "StorageUnavailable"
    )
    assert "the object store kept failing" in p.status.status_details
    # The inputs' own fault stays permanent: not retried.
    bad = result(None, RunnerStatus.STAGE_IN_FAILED, reason="input a.csv: not in storage")
    p = step(job(status=started("PREPARING"), retryPolicy=policy), [failed], res=bad)
    assert p.status.phase == JobPhase.ERROR


@pytest.mark.parametrize("ending", ENDINGS, ids=lambda e: e.name)
def test_endings(ending: Ending) -> None:
    p = step(job(status=started("EXECUTING")), [ending.pod], res=ending.res)
    assert p.status.phase == ending.phase
    assert p.status.return_code == ending.code
    assert ending.needle in p.status.status_details
    if ending.extra.get("exact"):
        assert p.status.status_details == ending.needle
    finished = get_condition(p.status, "Finished")
    assert finished is not None and finished.reason == ending.reason
    assert finished.status == ("True" if ending.phase == JobPhase.SUCCESS else "False")


_SCHEDULED = [{"type": "PodScheduled", "status": "True"}]


@pytest.mark.parametrize(
    ("the_pod", "details"),
    [
        (
            pod(phase="Unknown", node="cpu-0", conditions=_SCHEDULED),
            "the node cpu-0 of pod job-1-a1 is not responding",
        ),
        (
            pod(
                node="cpu-0",
                conditions=_SCHEDULED,
                init=[waiting("stage-in", "PodInitializing")],
                containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
            ),
            "starting on node cpu-0",
        ),
        (  # a reason of the runtime's that is no known failure: told as it is, without a message
            pod(
                node="cpu-0",
                conditions=_SCHEDULED,
                init=[waiting("stage-in", "SandboxCreating")],
                containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
            ),
            "container stage-in: SandboxCreating",
        ),
    ],
    ids=["node-silent", "starting", "waiting-reason"],
)
def test_what_a_pod_that_has_not_started_the_job_waits_for(the_pod: PodView, details: str) -> None:
    p = step(job(status=started()), [the_pod])
    assert p.status.phase == JobPhase.PREPARING
    assert p.status.status_details == details
    assert get_condition(p.status, "Finished") is None


def test_a_pod_known_only_to_be_gone_keeps_where_it_ran() -> None:
    # The operator was away when it went: nothing says where it ran but the status itself.
    scheduled = {
        "type": "Scheduled",
        "status": "True",
        "reason": "Scheduled",
        "message": "on node cpu-0",
        "lastTransitionTime": ts(CREATED),
    }
    p = step(job(status=started("EXECUTING", conditions=[scheduled])), [pod(gone=True)], res=_STOPPED)
    assert p.status.phase == JobPhase.ERROR and p.status.return_code == _STOPPED.return_code
    kept = get_condition(p.status, "Scheduled")
    assert kept is not None and (kept.status, kept.message) == ("True", "on node cpu-0")


def _never_ran(message: str) -> tuple[PodView, Plan]:
    """A pod whose job container ended StartError with `message`: the pod and the plan for it."""
    stuck = pod(
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", 128, "StartError", message), running("ship")],
    )
    return stuck, step(job(status=started("EXECUTING")), [stuck])


def test_a_job_container_that_could_not_run_fails_the_job() -> None:
    # No /bin/sh in the image: the entry script never runs, so the ship sidecar would wait forever.
    message = 'exec: "/bin/sh": stat /bin/sh: no such file or directory'
    stuck, p = _never_ran(message)
    assert p.status.phase == JobPhase.ERROR
    assert p.status.status_details == f"container job (image python:3.11-slim) could not run: {message}"
    finished = get_condition(p.status, "Finished")
    assert finished is not None and finished.reason == "StartError"
    # The pod goes with the final status (retention 0), ship and all.
    j = job(status=p.status.to_cr())
    assert any(isinstance(a, DeletePod) for a in step(j, [stuck], settings=OperatorSettings()).actions)


def test_a_runner_container_that_could_not_run_is_the_node_s_trouble_not_the_inputs() -> None:
    # An arm64 node for the amd64-only runner image: stage-in never ran, and was told as "staging
    # inputs failed", never retried.
    message = "failed to create containerd task: exec /usr/local/bin/python: exec format error"
    stuck = pod(
        phase="Failed",
        node="arm-0",
        init=[terminated("stage-in", 128, "StartError", message)],
        containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
    )
    p = step(job(status=started("PREPARING")), [stuck])
    assert p.status.phase == JobPhase.ERROR
    assert p.status.status_details.startswith("container stage-in (the runner's image ")
    assert p.status.status_details.endswith(f"could not run on node arm-0: {message}")
    finished = get_condition(p.status, "Finished")
    assert finished is not None and finished.reason == "StartError"
    # A retry policy retries it, as it does a node's other troubles.
    policy = {"maxAttempts": 2}
    retried = step(job(status=started("PREPARING"), retryPolicy=policy), [stuck])
    assert (retried.status.phase, retried.status.attempt) == (JobPhase.PREPARING, 2)


def test_a_job_container_with_an_oversized_environment_names_the_project_secrets() -> None:
    # A project secret over 128 KiB (the job's own variables are capped at 32 KiB): exec fails
    # with E2BIG, which says nothing of which variable.
    message = 'exec: "/bin/sh": argument list too long: unknown'
    _, p = _never_ran(message)
    assert p.status.phase == JobPhase.ERROR
    details = p.status.status_details
    assert details.startswith(f"container job (image python:3.11-slim) could not run: {message}; ")
    assert "128 KiB per variable" in details and "Secret dsjobs-project-secrets" in details


def test_final_job_deletes_its_pod_after_the_status_is_written() -> None:
    j = job(status=started("SUCCESS", finishedAt=ts(NOW), returnCode=0))
    p = step(j, [ended_pod(0)])
    assert p.actions == (DeleteSecrets(), DeletePod("job-1-a1", 1, "the job has finished"))
    retained = step(j, [ended_pod(0)], settings=OperatorSettings(finished_pod_retention_seconds=600))
    assert not retained.actions and retained.requeue_after == timedelta(minutes=10)


def test_a_kept_pod_removed_by_someone_else_takes_its_secrets_along() -> None:
    retention = OperatorSettings(finished_pod_retention_seconds=3600)
    j = job(status=started("SUCCESS", finishedAt=ts(NOW), returnCode=0))
    removed = step(j, [pod(gone=True, node="cpu-0")], now=NOW + timedelta(minutes=5), settings=retention)
    assert removed.actions == (DeleteSecrets(),)
    # The operator's own deletions (retention over, Finalize) already deleted them: not again.
    assert not step(
        j, [pod(gone=True, node="cpu-0")], now=NOW + timedelta(hours=2), settings=retention
    ).actions
    finalized = job(
        status=started("SUCCESS", finishedAt=ts(NOW), returnCode=0, conditions=[]), finalized=True
    )
    done = step(finalized, [ended_pod(0)], settings=retention)
    assert DeleteSecrets() in done.actions
    again = step(job(status=done.status.to_cr(), finalized=True), [pod(gone=True)], settings=retention)
    assert not again.actions


def test_a_cancel_during_a_retry_s_backoff_deletes_the_secrets_of_the_failed_attempt() -> None:
    policy = {"maxAttempts": 3, "backoffSeconds": 60, "retryOnExitCodes": [3]}
    failed = step(job(status=started("EXECUTING"), retryPolicy=policy), [ended_pod(3)], res=result(3))
    assert (failed.status.phase, failed.status.attempt) == (JobPhase.PREPARING, 2)
    waiting = job(status=failed.status.to_cr(), retryPolicy=policy, cancel={"reason": "stop"})
    cancelled = step(waiting, [pod(gone=True)], now=NOW + timedelta(seconds=10))
    assert cancelled.status.phase == JobPhase.CANCELLED and cancelled.actions == (DeleteSecrets(),)
    assert not step(
        job(status=cancelled.status.to_cr(), retryPolicy=policy, cancel={"reason": "stop"})
    ).actions


CLEANUP = (DeletePod, DeleteSecrets, DeleteDatasetClaims, DeleteRegistryPasswords, ClearData, RemoveFinalizer)
NO_RETENTION = OperatorSettings(finished_pod_retention_seconds=0)


# What the garbage collector would delete with the job, but not after `--cascade=orphan`.
ORPHANABLE = {
    "outputDatasets": [{"name": "models", "var": "MODELS", "sizeGb": 1}],
    "env": {
        "dockerImageSpec": {
            "imageUrl": "cr.example.com/team/train:1",
            "username": "robot",
            "passwordSecretRef": {"name": "job-1-docker-password", "key": "password"},
        }
    },
}


def _crash_scenarios() -> dict[str, tuple[JobView, list[PodView], OperatorSettings]]:
    success = started("SUCCESS", finishedAt=ts(NOW), returnCode=0)
    deleted = job(status=started("EXECUTING"), deleting=True)
    return {
        "finished, pod retention over": (job(status=success), [ended_pod(0)], NO_RETENTION),
        "failed, pod retention over": (
            job(status=started("ERROR", finishedAt=ts(NOW), returnCode=3)),
            [ended_pod(3)],
            NO_RETENTION,
        ),
        "finalized": (
            job(status=success, finalized=True),
            [ended_pod(0)],
            OperatorSettings(finished_pod_retention_seconds=3600),
        ),
        "deleted, pod gone": (deleted, [pod(gone=True, node="cpu-0")], SETTINGS),
        "deleted, pod never ran": (deleted, [unschedulable(NOW)], SETTINGS),
        "deleted with claims and a registry password": (
            job(params=ORPHANABLE, status=started("EXECUTING"), deleting=True),
            [pod(gone=True, node="cpu-0")],
            SETTINGS,
        ),
    }


@pytest.mark.parametrize("scenario", list(_crash_scenarios()))
def test_an_operator_killed_between_two_actions_plans_the_rest_again(scenario: str) -> None:
    """Killing the operator at any moment leaves nothing behind: after any prefix of a step's
    actions (and no status write), the next plan still holds the cleanup actions not yet done.
    (A finished job's pod deleted before its Secrets once left the Secrets: with the pod gone and
    the status final, no later plan deleted them.)"""
    j, pods, settings = _crash_scenarios()[scenario]
    p = step(j, pods, settings=settings)
    assert any(isinstance(a, CLEANUP) for a in p.actions), p.actions
    for done in range(1, len(p.actions)):
        deleted = {a.name for a in p.actions[:done] if isinstance(a, DeletePod)}
        # A deleted pod that had ended (or never ran) is gone at once; the status is the same.
        left = [v for v in pods if v.name not in deleted]
        again = step(j, left, settings=settings)
        missing = [a for a in p.actions[done:] if isinstance(a, CLEANUP) and a not in again.actions]
        assert not missing, f"killed after {p.actions[:done]}: never again {missing}"


OUTPUT_DATASETS = {
    "cmd": "python main.py ${MODELS}",
    "outputDatasets": [{"name": "models", "description": "weights", "var": "MODELS", "sizeGb": 2}],
}


def test_a_successful_job_publishes_its_output_datasets_before_it_says_so() -> None:
    j = job(params=OUTPUT_DATASETS, status=started("EXECUTING"))
    p = step(j, [ended_pod(0)], res=result(0))
    dataset_id = output_dataset_id("uid-1", "MODELS")
    assert p.status.phase == JobPhase.SUCCESS
    assert [(d.id, d.desc.name, d.desc.size_gb) for d in p.status.output_datasets] == [
        (dataset_id, "models", 2)
    ]
    assert p.actions == (PublishDatasets((dataset_id,)),)
    told = next(e for e in p.events if e.reason == "DatasetsCreated")
    assert told.message == f"created datasets {dataset_id} (models)"
    # Written: the next steps neither publish again nor drop the record.
    done = step(job(params=OUTPUT_DATASETS, status=p.status.to_cr()), [ended_pod(0)])
    assert not any(isinstance(a, PublishDatasets | DeleteDatasetClaims) for a in done.actions)
    assert done.status.output_datasets == p.status.output_datasets
    # Not written (a crash, a conflict): the same step again.
    assert step(j, [ended_pod(0)], res=result(0)).actions == p.actions


@pytest.mark.parametrize(
    ("pods", "res", "extra", "phase"),
    [
        ([ended_pod(1)], result(1), {}, JobPhase.ERROR),
        ([executing_pod()], None, {"cancel": {"reason": "stop"}}, JobPhase.CANCELLING),
        ([], None, {"cancel": {"reason": "stop"}}, JobPhase.CANCELLED),
    ],
    ids=["error", "cancelling", "cancelled"],
)
def test_a_job_that_does_not_succeed_deletes_its_dataset_claims_once_final(
    pods: list[PodView], res: RunnerResult | None, extra: dict[str, Any], phase: JobPhase
) -> None:
    j = job(params=OUTPUT_DATASETS, status=started("EXECUTING"), **extra)
    p = step(j, pods, res=res)
    assert p.status.phase == phase and p.status.output_datasets == []
    assert (DeleteDatasetClaims() in p.actions) == phase.is_final
    assert not any(isinstance(a, PublishDatasets) for a in p.actions)


def test_jobs_without_output_datasets_touch_no_claims() -> None:
    plain = step(job(status=started("EXECUTING")), [ended_pod(0)], res=result(0))
    assert plain.status.phase == JobPhase.SUCCESS and not plain.actions and not plain.status.output_datasets
    # A job cancelled before any pod ran may have claims: made for a pod the API server refused.
    never_ran = step(job(params=OUTPUT_DATASETS, cancel={"reason": "no"}))
    assert never_ran.status.phase == JobPhase.CANCELLED
    assert never_ran.actions == (DeleteSecrets(), DeleteDatasetClaims())  # (Secrets: see cancel_before_start)


QUOTA = 'pods "job-1-a1" is forbidden: exceeded quota: q1, requested: pods=1, used: pods=4, limited: pods=4'


def test_a_refused_pod_leaves_the_attempt_as_it_was_and_says_why() -> None:
    new = job()
    waiting = waiting_to_create(new, QUOTA, NOW)
    s = waiting.status
    assert (s.phase, s.attempt, s.pod_name, s.created_at) == (JobPhase.PREPARING, 0, "", CREATED)
    assert s.status_details == f"waiting to create the job's pod: {QUOTA}"
    assert [(e.type, e.reason) for e in waiting.events] == [
        ("Normal", "Created"),
        ("Normal", "Preparing"),
        ("Warning", "FailedCreate"),
    ]
    # Planned again from that status: the same pod is attempted, nothing is adopted or lost.
    again = step(job(status=s.to_cr()))
    assert again.actions == (CreatePod(1, 0, "c1.4"),)
    # The same refusal once more: no new Event, no change to write.
    same = waiting_to_create(job(status=s.to_cr()), QUOTA, NOW)
    assert same.status == s and not same.events
    # A retry's attempt stays the retry's (its pod name is not written until the pod exists).
    retry = job(status=started("PREPARING", attempt=2, podName=""))
    assert waiting_to_create(retry, QUOTA, NOW).status.attempt == 2
    assert waiting_to_create(retry, QUOTA, NOW).status.pod_name == ""
    # Cancelled while it waits: it never starts.
    cancelled = step(job(status=s.to_cr(), cancel={"reason": "no quota"}))
    # Its refused pod's Secrets went with it; a kill before that would have left them.
    assert cancelled.status.phase == JobPhase.CANCELLED and cancelled.actions == (DeleteSecrets(),)


def test_a_job_waiting_on_a_refused_pod_names_its_planned_instance_type() -> None:
    # `kubectl get pj` showed no INSTANCE TYPE for a first attempt waiting on a quota, where a pod
    # waiting for a node shows its type.
    waiting = waiting_to_create(job(), QUOTA, NOW, instance_type="c1.4")
    assert waiting.status.actual_cloud_instance_type == "c1.4" and waiting.status.attempt == 0
    first = CreatePod(1, 0, "g1.1")
    w = waiting_to_create(
        job(params=TWO_TYPES), PRIORITY, NOW, first, ["g1.1", "c1.4"], timedelta(seconds=60), "g1.1"
    )
    assert w.status.actual_cloud_instance_type == "g1.1"


def test_a_job_waiting_for_its_pod_longer_than_its_data_ttl_keeps_its_data() -> None:
    # Executed at once (Create + Execute) while the project's pod quota is full: the wait is not
    # the abandoned-upload case, whose inputs expire from the creation.
    created = {
        "phase": "CREATING",
        "createdAt": ts(CREATED),
        "dataExpiresAt": ts(CREATED + timedelta(hours=1)),
    }
    waiting = waiting_to_create(job(status=created, dataTtl="1h"), QUOTA, NOW)
    assert waiting.status.phase == JobPhase.PREPARING and waiting.status.data_expires_at is None
    later = step(job(status=waiting.status.to_cr(), dataTtl="1h"), now=CREATED + timedelta(hours=5))
    assert later.actions == (CreatePod(1, 0, "c1.4"),) and not later.status.data_cleared
    # DeleteData while it waits still stops it: the data is gone then.
    cleared = marked_then(job(status=waiting.status.to_cr(), dataTtl="1h", clearData=True))
    assert cleared.status.phase == JobPhase.ERROR and ClearData() in cleared.actions
    # Not executed before its TTL ran out: the inputs are gone, it does not start.
    late = step(job(status=created, dataTtl="1h"), now=CREATED + timedelta(hours=1))
    assert late.status.phase == JobPhase.ERROR and "data TTL expired" in late.status.status_details


PRIORITY = 'pods "job-1-a1" is forbidden: no PriorityClass with name gpu-nodes was found'
TWO_TYPES = {"cloudInstanceTypes": [{"name": "g1.1"}, {"name": "c1.4"}]}


def test_a_type_whose_pod_is_refused_past_its_budget_falls_back_to_the_next() -> None:
    # A refusal may be the instance type's (a GPU quota, a PriorityClass the cluster lacks): like
    # a type with no room, it is given its schedule timeout, then the next type is tried.
    budget = timedelta(seconds=60)
    names = ["g1.1", "c1.4"]
    first = CreatePod(1, 0, "g1.1")
    w = waiting_to_create(job(params=TWO_TYPES), PRIORITY, NOW, first, names, budget)
    s = w.status
    assert (s.phase, s.attempt, s.instance_type_index) == (JobPhase.PREPARING, 0, 0)
    assert s.status_details == f"waiting to create the job's pod: {PRIORITY}"
    cond = next(c for c in s.conditions if c.type == "Scheduled")
    assert (cond.status, cond.reason, cond.message, cond.last_transition_time) == (
        "False",
        "FailedCreate",
        PRIORITY,
        NOW,
    )
    assert w.requeue_after == budget  # the glue's backoff is cut to it
    # Refused again within the budget: the clock is the condition's, kept.
    later = NOW + timedelta(seconds=59)
    w = waiting_to_create(job(params=TWO_TYPES, status=s.to_cr()), PRIORITY, later, first, names, budget)
    assert w.status.instance_type_index == 0 and w.requeue_after == timedelta(seconds=1)
    assert not w.events
    # The budget is spent: the next type, written before its pod is made (the same attempt: the
    # refused pod never existed), planned again at once.
    spent = NOW + budget
    w = waiting_to_create(job(params=TWO_TYPES, status=s.to_cr()), PRIORITY, spent, first, names, budget)
    f = w.status
    assert (f.phase, f.attempt, f.pod_name, f.instance_type_index, f.actual_cloud_instance_type) == (
        JobPhase.PREPARING,
        1,
        "",
        1,
        "c1.4",
    )
    assert f.data_expires_at is None and w.requeue_after == timedelta(0)
    assert not any(c.type == "Scheduled" for c in f.conditions)  # the next type's clock is its own
    assert f.status_details == (
        f"instance type g1.1 cannot be used: its pod was refused for 60s ({PRIORITY}); falling back to c1.4"
    )
    assert [(e.type, e.reason) for e in w.events] == [("Warning", "FallingBack")]
    nxt = step(job(params=TWO_TYPES, status=f.to_cr()), now=spent)
    assert nxt.actions == (CreatePod(1, 1, "c1.4"),)
    assert nxt.status.pod_name == "job-1-a1" and nxt.status.actual_cloud_instance_type == "c1.4"
    # The last type refused: it keeps waiting (no budget left to count down), saying why.
    w = waiting_to_create(
        job(params=TWO_TYPES, status=f.to_cr()), QUOTA, spent, CreatePod(1, 1, "c1.4"), names, budget
    )
    assert w.status.instance_type_index == 1 and w.requeue_after is None
    assert w.status.status_details == f"waiting to create the job's pod: {QUOTA}"
    cond = next(c for c in w.status.conditions if c.type == "Scheduled")
    assert cond.last_transition_time == spent


def test_a_type_gone_from_the_catalog_still_has_a_budget() -> None:
    # Deleted while its pod waits (refused or unschedulable): the field's default, as for a type
    # created without one, so the job still moves on to its next type.
    default = InstanceTypeSpec.model_fields["schedule_timeout_seconds"].default
    assert schedule_budget(None) == timedelta(seconds=default) == timedelta(seconds=300)
    assert schedule_budget(TYPES["c1.4"]) == timedelta(seconds=60)


def test_a_refusal_that_is_not_the_pod_s_never_falls_back() -> None:
    # A quota on Secrets, the wait for an earlier job's pod: no other type would change them.
    s = job(params=TWO_TYPES, status=started("PREPARING", attempt=1, podName=""))
    w = waiting_to_create(s, QUOTA, NOW + timedelta(days=1))
    assert w.status.instance_type_index == 0 and w.requeue_after is None
    assert not any(c.type == "Scheduled" for c in w.status.conditions)


def test_a_retry_s_refusal_starts_its_own_clock() -> None:
    # The previous attempt's pod was never scheduled (Scheduled False for long): that is not this
    # attempt's refusal time.
    old = {
        "type": "Scheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/2 nodes are available",
        "lastTransitionTime": ts(NOW - timedelta(hours=1)),
    }
    s = started("PREPARING", attempt=2, podName="", conditions=[old])
    w = waiting_to_create(
        job(params=TWO_TYPES, status=s),
        PRIORITY,
        NOW,
        CreatePod(2, 0, "g1.1"),
        ["g1.1", "c1.4"],
        timedelta(seconds=60),
    )
    assert w.status.instance_type_index == 0 and w.requeue_after == timedelta(seconds=60)
    cond = next(c for c in w.status.conditions if c.type == "Scheduled")
    assert (cond.reason, cond.last_transition_time) == ("FailedCreate", NOW)


# --- cancel ---------------------------------------------------------------------------------------


def test_graceful_cancel_deletes_the_pod_with_the_job_timeout() -> None:
    params = {"gracefulShutdownParameters": {"signal": 10, "timeout": "10s"}}
    j = job(params=params, status=started("EXECUTING"), cancel={"reason": "stop", "graceful": True})
    p = step(j, [executing_pod()])
    assert p.actions == (DeletePod("job-1-a1", 25, "cancelled"),)
    assert p.status.phase == JobPhase.CANCELLING and "stop" in p.status.status_details
    # While the pod shuts down: CANCELLING; no second delete.
    j2 = JobView(**{**j.__dict__, "status": p.status})
    shutting = pod(phase="Running", node="cpu-0", deleting=True, containers=[running("job"), running("ship")])
    p2 = step(j2, [shutting])
    assert p2.status.phase == JobPhase.CANCELLING and not p2.actions
    # The pod is gone: CANCELLED.
    p3 = step(j2, [pod(gone=True, node="cpu-0")])
    assert p3.status.phase == JobPhase.CANCELLED and p3.status.finished_at == NOW


def test_a_forced_cancel_tells_the_runner_before_the_pod_goes_with_the_grace_for_its_logs() -> None:
    params = {"gracefulShutdownParameters": {"signal": 10, "timeout": "40s"}}
    forceful = job(params=params, status=started("EXECUTING"), cancel={"reason": "now", "graceful": False})
    p = step(forceful, [executing_pod()])
    # The word first: the pod's SIGTERM must find it (ship looks for it from then on).
    assert p.actions == (ForceCancel("job-1-a1", 1), DeletePod("job-1-a1", 55, "cancelled"))
    # Without graceful-shutdown parameters the runner kills at once anyway: no word.
    plain = job(status=started("EXECUTING"), cancel={"reason": "now", "graceful": False})
    assert step(plain, [executing_pod()]).actions == (DeletePod("job-1-a1", 15, "cancelled"),)


def test_a_forceful_cancel_after_a_graceful_one_tells_the_runner_to_kill_now() -> None:
    # The CLI's second Ctrl-C: spec.cancel.graceful became false, and the pod, deleted with the
    # job's timeout already, went on for all of it. Deleting it again with 1 s killed the ship too
    # (no log files); the runner is told instead, and the pod keeps its grace for the logs.
    params = {"gracefulShutdownParameters": {"signal": 10, "timeout": "40s"}}
    graceful = job(params=params, status=started("CANCELLING"), cancel={"reason": "stop", "graceful": True})
    forceful = job(params=params, status=started("CANCELLING"), cancel={"reason": "stop", "graceful": False})
    shutting = replace(
        pod(phase="Running", node="cpu-0", deleting=True, containers=[running("job"), running("ship")]),
        deletion_grace_seconds=55,
    )
    assert not step(graceful, [shutting]).actions
    p = step(forceful, [shutting])
    assert p.actions == (ForceCancel("job-1-a1", 1),)
    assert p.status.phase == JobPhase.CANCELLING
    assert not step(forceful, [replace(shutting, deletion_grace_seconds=1)]).actions
    # The program ended meanwhile (the ship uploads): nothing to kill.
    uploading = replace(
        pod(
            phase="Running", node="cpu-0", deleting=True, containers=[terminated("job", 143), running("ship")]
        ),
        deletion_grace_seconds=55,
    )
    assert uploading.program_ended and not step(forceful, [uploading]).actions
    view = PodView.from_pod(
        {"metadata": {"name": "x", "deletionTimestamp": ts(NOW), "deletionGracePeriodSeconds": 55}}
    )
    assert (
        view.deletion_grace_seconds == 55
        and PodView.from_pod({"metadata": {}}).deletion_grace_seconds is None
    )


def test_a_forced_cancel_of_a_pod_whose_runner_reads_no_word_deletes_it_with_1_s() -> None:
    # A pod rendered before an upgrade runs the runner of its day, whose ship never reads the
    # forced-cancel word: told it, the program got its whole graceful timeout (up to an hour).
    params = {"gracefulShutdownParameters": {"signal": 10, "timeout": "40s"}}
    forceful = job(params=params, status=started("EXECUTING"), cancel={"reason": "now", "graceful": False})
    older = replace(executing_pod(), runner_contract=1)
    assert step(forceful, [older]).actions == (
        DeletePod("job-1-a1", 1, "cancelled (forced; its runner reads no word)"),
    )
    # The CLI's second Ctrl-C, after a graceful cancel: the pod's grace is shortened.
    cancelling = job(params=params, status=started("CANCELLING"), cancel={"reason": "now", "graceful": False})
    shutting = replace(older, deleting=True, deletion_grace_seconds=55)
    assert step(cancelling, [shutting]).actions == (
        DeletePod("job-1-a1", 1, "cancelled (forced; its runner reads no word)"),
    )
    assert not step(cancelling, [replace(shutting, deletion_grace_seconds=1)]).actions
    # The contract is the pod's annotation; a pod without one is an older operator's.
    assert PodView.from_pod({"metadata": {}}).runner_contract == 1
    rendered = {"metadata": {"annotations": {"dsjobs.dev/runner-contract": str(RUNNER_CONTRACT)}}}
    assert PodView.from_pod(rendered).runner_contract == RUNNER_CONTRACT >= FORCED_CANCEL_WORD_CONTRACT


def test_a_cancel_removed_while_cancelling_does_not_kill_a_graceful_shutdown() -> None:
    # `kubectl apply` of a manifest without spec.cancel (before the CRD refused it): the pod, deleted
    # with the job's timeout, was deleted again with 1 s, killing the program saving its checkpoint.
    params = {"gracefulShutdownParameters": {"signal": 10, "timeout": "40s"}}
    uncancelled = job(params=params, status=started("CANCELLING"))
    shutting = replace(
        pod(phase="Running", node="cpu-0", deleting=True, containers=[running("job"), running("ship")]),
        deletion_grace_seconds=55,
    )
    p = step(uncancelled, [shutting])
    assert p.status.phase == JobPhase.CANCELLING and not p.actions
    # A delete decided but lost (a crash): issued again with the graceful grace, not the kill's.
    assert step(uncancelled, [executing_pod()]).actions == (DeletePod("job-1-a1", 55, "cancelled"),)
    # It still ends CANCELLED when the pod is gone.
    assert step(uncancelled, [pod(gone=True, node="cpu-0")]).status.phase == JobPhase.CANCELLED


def test_a_cancel_requested_at_a_time_without_a_zone_is_read_as_utc() -> None:
    # The CRD's date-time format may let `kubectl patch` write one: the spec became unreadable and
    # a running job ended ERROR instead of being cancelled.
    naive = {"reason": "stop", "requestedAt": "2024-01-01T10:00:00"}
    p = step(job(status=started("EXECUTING"), cancel=naive), [executing_pod()])
    assert p.status.phase == JobPhase.CANCELLING
    assert p.actions == (DeletePod("job-1-a1", 15, "cancelled"),)
    spec = ProjectJobSpec.model_validate({"projectId": "p", "jobParameters": {"cmd": "x"}, "cancel": naive})
    assert spec.cancel is not None and spec.cancel.requested_at == datetime(2024, 1, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    "when", ["0000-01-01T00:00:00Z", "2024-01-01T10:00:00x5Z", "2024-01-01T12:00:00+99:99"]
)
def test_a_cancel_requested_at_no_time_still_cancels_gracefully(when: str) -> None:
    # The CRD's date-time format lets these through; the field only informs. The spec became
    # unreadable: a graceful cancel written by hand ended the job ERROR, its program killed.
    graceful = {"reason": "stop", "graceful": True, "requestedAt": when}
    params = {"cmd": "x", "gracefulShutdownParameters": {"timeout": "60s"}}
    p = step(job(params=params, status=started("EXECUTING"), cancel=graceful), [executing_pod()])
    assert p.status.phase == JobPhase.CANCELLING
    assert p.actions == (DeletePod("job-1-a1", 75, "cancelled"),)


def test_cancel_ends_with_the_runner_result_when_the_pod_reports_it() -> None:
    j = job(status=started("CANCELLING"), cancel={"graceful": False})
    res = result(143, cancelled=True)
    p = step(j, [ended_pod(143, res=res)], res=res)
    assert p.status.phase == JobPhase.CANCELLED and p.status.return_code == 143


def test_a_job_cancelled_during_its_setup_has_no_return_code() -> None:
    # pip was running: the job container's 143 is the entry script's, not a program's.
    j = job(status=started("CANCELLING"), cancel={"graceful": False})
    res = result(None, status=RunnerStatus.CANCELLED, cancelled=True)
    p = step(j, [ended_pod(143, res=res)], res=res)
    assert p.status.phase == JobPhase.CANCELLED and p.status.return_code is None


@pytest.mark.parametrize(
    ("params", "graceful", "grace"),
    [
        ({}, False, 15),  # no graceful parameters: the runner kills at once; ship gets the margin
        ({}, True, 15),
        ({"gracefulShutdownParameters": {"timeout": "10s"}}, True, 25),
        ({"gracefulShutdownParameters": {}}, True, 45),  # default timeout 30 s
        # A forced cancel: the same grace, for the logs; the runner is told to kill at once.
        ({"gracefulShutdownParameters": {"timeout": "10s"}}, False, 25),
    ],
)
def test_cancel_grace(params: dict[str, Any], graceful: bool, grace: int) -> None:
    spec = ProjectJobSpec.model_validate(
        {"projectId": "p", "jobParameters": {"cmd": "x", **params}, "cancel": {"graceful": graceful}}
    )
    assert cancel_grace_seconds(spec, SETTINGS) == grace


def test_cancelling_a_finished_job_is_a_no_op() -> None:
    j = job(status=started("SUCCESS", finishedAt=ts(NOW), returnCode=0), cancel={"reason": "late"})
    p = step(j)
    assert p.status.phase == JobPhase.SUCCESS and not p.actions and not p.events


def test_cancel_after_the_program_ended_reports_the_real_outcome() -> None:
    j = job(status=started("EXECUTING"), cancel={"reason": "late"})
    p = step(j, [ended_pod(0)], res=result(0))
    assert p.status.phase == JobPhase.SUCCESS
    assert not any(isinstance(a, DeletePod) and a.why == "cancelled" for a in p.actions)
    # `kubectl describe` says why a cancelled job did not end CANCELLED, once: the next step
    # (the job already SUCCESS) posts nothing.
    late = [e for e in p.events if e.reason == "CancelTooLate"]
    assert [(e.type, e.message) for e in late] == [
        (
            "Normal",
            "the cancel came after the program had exited with code 0: "
            "its outputs and logs were kept and the job ended SUCCESS",
        )
    ]
    again = step(job(status=p.status.to_cr(), cancel={"reason": "late"}), [ended_pod(0)], res=result(0))
    assert not [e for e in again.events if e.reason == "CancelTooLate"]
    failed = step(j, [ended_pod(3)], res=result(3))
    assert failed.status.phase == JobPhase.ERROR
    assert [e.message for e in failed.events if e.reason == "CancelTooLate"] == [
        "the cancel came after the program had exited with code 3: "
        "its outputs and logs were kept and the job ended ERROR"
    ]


def test_a_cancel_while_the_outputs_upload_leaves_the_pod_alone() -> None:
    params = {"gracefulShutdownParameters": {"timeout": "10s"}}
    uploading = pod(
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", 0), running("ship")],
    )
    for phase in ("UPLOADING_OUTPUT", "CANCELLING"):  # CANCELLING: a delete decided, then a crash
        j = job(params=params, status=started(phase), cancel={"graceful": False})
        p = step(j, [uploading])
        assert not any(isinstance(a, DeletePod) for a in p.actions), phase
    # ... and the job ends with the program's outcome, even when CANCELLING was written already.
    done = ended_pod(0)
    p = step(job(status=started("CANCELLING"), cancel={"graceful": False}), [done], res=result(0))
    assert p.status.phase == JobPhase.SUCCESS and p.status.return_code == 0
    assert [e.reason for e in p.events if e.reason == "CancelTooLate"] == ["CancelTooLate"]


def test_a_cancel_the_operator_did_not_write_down_still_ends_cancelled() -> None:
    # Crash after the pod's deletion, before CANCELLING was written: the runner says cancelled.
    j = job(status=started("EXECUTING"), cancel={"reason": "stop"})
    p = step(j, [ended_pod(143, res=_STOPPED)], res=_STOPPED)
    assert p.status.phase == JobPhase.CANCELLED and p.status.return_code == 143


def test_a_cancelled_job_whose_pod_is_gone_tells_each_phase_and_drops_its_secrets() -> None:
    j = job(status=started("EXECUTING"), cancel={"reason": "stop"})
    p = step(j, [pod(gone=True, node="cpu-0")])
    assert p.status.phase == JobPhase.CANCELLED
    assert [e.message for e in coalesce_transitions(p.events)] == [
        "EXECUTING -> CANCELLING -> CANCELLED: the job was cancelled: stop"
    ]
    assert DeleteSecrets() in p.actions
    assert p.status.status_details == "the job was cancelled: stop"  # the reason stays told
    finished = get_condition(p.status, "Finished")
    assert finished is not None and finished.message == "the job was cancelled: stop"
    # A job that ends while its pod is still there deletes the Secrets with the pod (later).
    ended = step(job(status=started("EXECUTING")), [ended_pod(0)], res=result(0))
    assert ended.status.phase == JobPhase.SUCCESS and not ended.actions


def test_cancelling_reissues_a_lost_delete() -> None:
    j = job(status=started("CANCELLING"), cancel={"graceful": False})
    p = step(j, [executing_pod()])
    assert p.actions == (DeletePod("job-1-a1", 15, "cancelled"),)


# --- retry ----------------------------------------------------------------------------------------


EVICTED_DURING_STAGE_IN = pod(
    phase="Failed",
    node="cpu-0",
    conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
    init=[terminated("stage-in", 143, "Error")],
    containers=[waiting("job", "PodInitializing"), waiting("ship", "PodInitializing")],
)


def test_a_stage_in_stopped_from_outside_is_the_disruption_and_is_retried() -> None:
    # The stage-in's SIGTERM exit is no fault of the inputs: evicted, not StageInFailed.
    policy = {"maxAttempts": 3}
    p = step(job(status=started("PREPARING"), retryPolicy=policy), [EVICTED_DURING_STAGE_IN])
    assert (p.status.phase, p.status.attempt) == (JobPhase.PREPARING, 2)
    assert "evicted" in p.status.status_details
    final = step(job(status=started("PREPARING")), [EVICTED_DURING_STAGE_IN])
    assert final.status.phase == JobPhase.ERROR
    finished = get_condition(final.status, "Finished")
    assert finished is not None and finished.reason == "Evicted"
    # `kubectl delete pod` while the inputs came in: the pod was deleted.
    deleted = pod(phase="Failed", node="cpu-0", deleting=True, init=[terminated("stage-in", 143, "Error")])
    gone = step(job(status=started("PREPARING")), [deleted])
    assert gone.status.phase == JobPhase.ERROR and "was deleted" in gone.status.status_details
    # The stage-in's own failures stay its own, in a pod being deleted or evicted since too.
    for init in (
        terminated("stage-in", 1, "Error", "input x.csv: sha256 mismatch"),
        terminated("stage-in", 137, "OOMKilled"),
        terminated("stage-in", 139, "Error"),  # its own crash, not the stop's signal
    ):
        evicted_since = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        failed = step(
            job(status=started("PREPARING"), retryPolicy=policy),
            [pod(phase="Failed", node="cpu-0", deleting=True, conditions=[evicted_since], init=[init])],
        )
        assert failed.status.phase == JobPhase.ERROR and failed.status.attempt == 1
        cond = get_condition(failed.status, "Finished")
        assert cond is not None and cond.reason == "StageInFailed"


def test_a_cancelled_job_is_not_retried_whatever_its_exit_code() -> None:
    # The runner's SIGTERM may make the program exit with a code the policy retries on.
    policy = {"maxAttempts": 3, "retryOnExitCodes": [143]}
    cancelling = job(status=started("CANCELLING"), retryPolicy=policy, cancel={"reason": "stop"})
    stopped = result(143, cancelled=True)
    p = step(cancelling, [ended_pod(143, res=stopped)], res=stopped)
    assert p.status.phase == JobPhase.CANCELLED and p.status.attempt == 1
    # Nor when the runner did not get to say it was stopped.
    q = step(cancelling, [ended_pod(143, res=result(143))], res=result(143))
    assert q.status.phase.is_final and q.status.attempt == 1
    assert not any(isinstance(a, CreatePod) for a in q.actions)
    assert not any(isinstance(a, CreatePod) for a in p.actions)
    # Without the cancel the same ending is retried.
    running = job(status=started("EXECUTING"), retryPolicy=policy)
    retried = step(running, [ended_pod(143, res=result(143))], res=result(143))
    assert (retried.status.phase, retried.status.attempt) == (JobPhase.PREPARING, 2)


def test_retry_after_eviction_uses_a_fresh_pod_after_the_backoff() -> None:
    policy = {"maxAttempts": 2, "backoffSeconds": 30}
    j = job(status=started("EXECUTING"), retryPolicy=policy)
    evicted = pod(phase="Failed", node="cpu-0", reason="Evicted", message="disk pressure")
    p1 = step(j, [evicted])
    assert p1.status.phase == JobPhase.PREPARING and not p1.actions
    assert (p1.status.attempt, p1.status.pod_name) == (2, "")
    assert "AttemptFailed" in [e.reason for e in p1.events]
    j2 = JobView(**{**j.__dict__, "status": p1.status})
    p2 = step(j2, [evicted])
    assert p2.actions == (DeletePod("job-1-a1", 1, "superseded by a newer attempt"),)
    p3 = step(j2, [pod(gone=True)], now=NOW + timedelta(seconds=10))
    assert not p3.actions and p3.requeue_after == timedelta(seconds=20)
    p4 = step(j2, [pod(gone=True)], now=NOW + timedelta(seconds=31))
    assert p4.actions == (CreatePod(2, 0, "c1.4"),)
    assert get_condition(p4.status, "Retrying") is None
    # The second failure exhausts the attempts: ERROR.
    j3 = JobView(**{**j.__dict__, "status": p4.status})
    p5 = step(j3, [pod(attempt=2, phase="Failed", node="cpu-0", reason="Evicted")])
    assert p5.status.phase == JobPhase.ERROR


def test_status_times_near_the_end_of_time_make_no_failing_reconcile() -> None:
    # A status is anyone's to write who may write it, and the CRD lets 9999-12-31T23:59:30Z in:
    # its time plus the pod retention, a retry's backoff or the image-pull limit overflowed, and
    # every reconcile of the job failed (its kept pod never retired, its data TTL never reached).
    end = "9999-12-31T23:59:30Z"
    keep = replace(SETTINGS, finished_pod_retention_seconds=3600)
    for pods in ([ended_pod()], [replace(ended_pod(), gone=True)]):
        p = step(job(status={**started("SUCCESS"), "finishedAt": end}), pods, settings=keep)
        assert not any(isinstance(a, DeletePod) for a in p.actions)
    policy = {"maxAttempts": 2, "backoffSeconds": 7200}
    retrying = started("PREPARING") | {
        "attempt": 2,
        "podName": "",
        "conditions": [
            {"type": "Retrying", "status": "True", "reason": "Evicted", "lastTransitionTime": end}
        ],
    }
    p = step(job(status=retrying, retryPolicy=policy), [pod(gone=True)])
    assert not p.actions and p.requeue_after is not None
    pulling = started("PREPARING") | {
        "conditions": [
            {
                "type": "ContainersCreated",
                "status": "False",
                "reason": "ImagePullBackOff",
                "lastTransitionTime": end,
            }
        ]
    }
    backoff = pod(node="cpu-0", containers=[waiting("job", "ImagePullBackOff", "pull failed")])
    p = step(job(status=pulling), [backoff])
    assert p.status.phase == JobPhase.PREPARING and p.requeue_after is not None


def test_a_retry_onto_a_type_deleted_meanwhile_falls_back_to_the_next_one_listed() -> None:
    # g1.1 evicted, then deleted (or broken) by an admin during the backoff: c1.4 still runs it.
    policy = {"maxAttempts": 2, "backoffSeconds": 0}
    params = {"cmd": "x", "cloudInstanceTypes": [{"name": "g1.1"}, {"name": "c1.4"}]}
    j = job(params=params, status=started("EXECUTING", type_name="g1.1"), retryPolicy=policy)
    evicted = pod(phase="Failed", node="gpu-0", reason="Evicted", message="disk pressure", type_name="g1.1")
    retrying = step(j, [evicted]).status
    assert (retrying.attempt, retrying.pod_name) == (2, "")
    without = {k: v for k, v in TYPES.items() if k != "g1.1"}
    j2 = JobView(**{**j.__dict__, "status": retrying})
    p = plan(j2, [pod(gone=True)], without, None, NOW, SETTINGS)
    assert p.actions == (CreatePod(2, 1, "c1.4"),)
    assert p.status.actual_cloud_instance_type == "c1.4" and p.status.instance_type_index == 1
    [told] = [e for e in p.events if e.reason == "FallingBack"]
    assert told.message == "unknown instance type g1.1 (no longer in the catalog); falling back to c1.4"
    # Made invalid instead: the reason is told, as it is before a job starts.
    why = "spec.requests.cpu: 16 is above the limit 8 [request-above-limit]"
    p = plan(j2, [pod(gone=True)], without, None, NOW, SETTINGS, invalid_types={"g1.1": why})
    assert p.actions == (CreatePod(2, 1, "c1.4"),)
    assert [e.message for e in p.events if e.reason == "FallingBack"] == [
        f"InstanceType g1.1 is invalid, so no job runs on it: {why}; falling back to c1.4"
    ]
    # None left: ERROR naming it.
    only = job(status=started("EXECUTING", type_name="c1.4"), retryPolicy=policy)
    again = JobView(**{**only.__dict__, "status": step(only, [evicted]).status})
    p = plan(again, [pod(gone=True)], {}, None, NOW, SETTINGS)
    assert p.status.phase == JobPhase.ERROR
    assert "unknown instance type c1.4 (no longer in the catalog)" in p.status.status_details


def test_a_taint_eviction_from_a_node_that_reports_is_not_a_lost_node() -> None:
    # The taint manager evicts for any NoExecute taint (not-ready with the kubelet alive, an
    # admin's): the kubelet stops the pod within its grace. Taken at once for a silent node, the
    # job ended NodeLost with its pod running on, and its stored result never read.
    evicted = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
    reporting = dataclasses.replace(
        pod(
            phase="Running",
            node="gpu-0",
            deleting=True,
            containers=[running("job"), running("ship")],
            conditions=[
                evicted,
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
            ],
        ),
        deleted_at=NOW + timedelta(seconds=330),  # the eviction's request plus the pod's grace
    )
    j = job(status=started("EXECUTING"))
    p = step(j, [reporting])
    assert p.status.phase == JobPhase.EXECUTING
    assert "evicted by a NoExecute taint of its node" in p.status.status_details
    assert p.requeue_after == timedelta(seconds=331)  # its grace's end: a silent node says nothing
    # The grace passed and the pod is still there: no kubelet ends it, the node is silent.
    late = step(j, [reporting], now=NOW + timedelta(seconds=331))
    assert late.status.phase == JobPhase.ERROR
    finished = get_condition(late.status, "Finished")
    assert finished is not None and finished.reason == "NodeLost"
    # The node lifecycle controller's mark (Ready False, ContainersReady True) says so at once.
    marked = dataclasses.replace(
        reporting,
        conditions=(
            ("DisruptionTarget", PodCondition(status="True", reason="DeletionByTaintManager")),
            ("Ready", PodCondition(status="False")),
            ("ContainersReady", PodCondition(status="True")),
        ),
    )
    assert step(j, [marked]).status.phase == JobPhase.ERROR


def test_a_retry_waits_for_a_pod_left_on_a_lost_node_and_says_why() -> None:
    policy = {"maxAttempts": 2, "backoffSeconds": 5}
    j = job(status=started("EXECUTING"), retryPolicy=policy)
    lost = pod(
        phase="Running",
        node="gpu-0",
        deleting=True,  # evicted, but its node cannot confirm: it stays until the node is back or gone
        containers=[running("job"), running("ship")],
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}],
    )
    p1 = step(j, [lost])
    assert (p1.status.attempt, p1.status.phase) == (2, JobPhase.PREPARING)
    assert p1.status.status_details.endswith("attempt 2 starts in 5s")
    j2 = JobView(**{**j.__dict__, "status": p1.status})
    # Within the backoff nothing changes: the next look is when it ends.
    early = step(j2, [lost], now=NOW + timedelta(seconds=2))
    assert early.status == p1.status and not early.actions and early.requeue_after == timedelta(seconds=3)
    # After it the job says what it waits for, once; it never starts a second attempt beside it.
    p2 = step(j2, [lost], now=NOW + timedelta(seconds=6))
    assert not p2.actions and p2.status.pod_name == ""
    assert p2.status.status_details == (
        "attempt 2 starts once pod job-1-a1 of attempt 1 is gone (never two attempts at once); its node "
        "gpu-0 stopped reporting and the program may still run there, so the pod goes only when the "
        "node reports again or leaves the cluster"
    )
    assert [(e.type, e.reason) for e in p2.events] == [("Warning", "WaitingForLostNode")]
    j3 = JobView(**{**j.__dict__, "status": p2.status})
    again = step(j3, [lost], now=NOW + timedelta(minutes=30))
    assert again.status == p2.status and not again.events and not again.actions
    # The node leaves the cluster (PodGC deletes the pod): attempt 2 starts.
    p3 = step(j3, [pod(gone=True)], now=NOW + timedelta(minutes=31))
    assert p3.actions == (CreatePod(2, 0, "c1.4"),)


def test_an_active_deadline_is_not_retried_and_a_shutting_down_node_s_refusal_is() -> None:
    # A deadline (a cluster policy's activeDeadlineSeconds) ends every attempt alike: retried, each
    # burnt the whole deadline. A kubelet >= 1.22 refusing pods while its node shuts down says
    # NodeShutdown (1.21 said Shutdown): it was "pod failed", now the node's shutdown.
    j = job(status=started("EXECUTING"), retryPolicy={"maxAttempts": 3})
    late = pod(phase="Failed", node="cpu-0", reason="DeadlineExceeded", message="Pod was active too long")
    p = step(j, [late])
    assert p.status.phase == JobPhase.ERROR and p.status.attempt == 1
    refused = pod(
        phase="Failed",
        node="cpu-0",
        reason="NodeShutdown",
        message="Pod was rejected as the node is shutting down.",
    )
    p = step(j, [refused])
    assert p.status.attempt == 2 and "the pod's node was shutting down" in p.status.status_details


def test_a_job_that_filled_its_working_dir_is_not_retried() -> None:
    # Evicted for its own writes, not for a disruption: another attempt would do the same.
    j = job(status=started("EXECUTING"), retryPolicy={"maxAttempts": 3})
    full = pod(
        phase="Failed",
        node="cpu-0",
        reason="Evicted",
        message='Usage of EmptyDir volume "dsjobs-work" exceeds the limit "4Mi". ',
    )
    p = step(j, [full])
    assert p.status.phase == JobPhase.ERROR and p.status.attempt == 1
    assert "working-storage" in p.status.status_details
    logs = dataclasses.replace(
        full, message='Usage of EmptyDir volume "dsjobs-shared" exceeds the limit "4Mi". '
    )
    p = step(j, [logs])
    assert p.status.phase == JobPhase.ERROR and "logs and Python packages outgrew" in p.status.status_details
    assert (
        "print less" in p.status.status_details and "declare working-storage" not in p.status.status_details
    )
    # Any other emptyDir of the pod is not the job's system disk: a disruption as before.
    other = dataclasses.replace(full, message='Usage of EmptyDir volume "x" exceeds the limit "4Mi". ')
    assert step(j, [other]).status.attempt == 2
    # An ephemeral-storage limit of the instance type: its own doing too, not retried. The kubelet
    # tells the job container's (its writable layer) or the pod's total (volumes included).
    for message, told in (
        (
            'Container job exceeded its local ephemeral storage limit "10Gi". ',
            "files outside its working directory (/tmp, $HOME: the image's writable layer) outgrew "
            "the 10Gi ephemeral-storage limit",
        ),
        (
            "Pod ephemeral local storage usage exceeds the total limit of containers 10Gi. ",
            "local files (working directory, logs and Python packages, and files outside them such as "
            "/tmp) outgrew the 10Gi ephemeral-storage limit of the pod",
        ),
    ):
        p = step(j, [dataclasses.replace(full, message=message)])
        assert p.status.phase == JobPhase.ERROR and told in p.status.status_details, message
    ship = dataclasses.replace(
        full, message='Container ship exceeded its local ephemeral storage limit "1Gi". '
    )
    assert step(j, [ship]).status.attempt == 2  # the runner's: not the job's doing


def test_a_new_attempt_does_not_show_the_last_ones_progress_and_files() -> None:
    policy = {"maxAttempts": 2, "retryOnExitCodes": [3]}
    res = result(
        3,
        progress=ProgressResult(progress=90, message="epoch 9/10"),
        outputs=[OutputResult(path="r.txt", key="k/r.txt", sha256=SHA, size_bytes=5)],
    )
    p1 = step(job(status=started("EXECUTING"), retryPolicy=policy), [ended_pod(3, res=res)], res=res)
    assert p1.status.attempt == 2 and p1.status.progress is not None and p1.status.output_files
    j2 = job(status=p1.status.to_cr(), retryPolicy=policy)
    p2 = step(j2, [pod(gone=True)], now=NOW + timedelta(minutes=10))  # after the backoff
    assert p2.actions == (CreatePod(2, 0, "c1.4"),)
    assert p2.status.progress is None and p2.status.return_code is None
    # Its files neither: the new attempt overwrites the outputs and deletes the raw logs.
    assert not (p2.status.output_files or p2.status.log_files or p2.status.file_errors)


def test_a_drained_node_retries_the_job_instead_of_cancelling_it() -> None:
    j = job(status=started("EXECUTING"), retryPolicy={"maxAttempts": 3})
    drained = pod(
        phase="Failed",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", 143, "Error"), terminated("ship", 0, message=_STOPPED.to_json())],
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
    )
    p = step(j, [drained], res=_STOPPED)
    assert p.status.phase == JobPhase.PREPARING and p.status.attempt == 2


def test_program_failures_retry_only_for_listed_codes() -> None:
    policy = {"maxAttempts": 3, "retryOnExitCodes": [75]}
    assert (
        step(
            job(status=started("EXECUTING"), retryPolicy=policy), [ended_pod(1, res=result(1))], res=result(1)
        ).status.phase
        == JobPhase.ERROR
    )
    p = step(
        job(status=started("EXECUTING"), retryPolicy=policy), [ended_pod(75, res=result(75))], res=result(75)
    )
    assert p.status.phase == JobPhase.PREPARING and p.status.attempt == 2


def test_max_attempts_counts_program_runs_also_after_a_fallback_from_a_refused_pod() -> None:
    # g1.1's pod was refused past its budget: the job moved to c1.4 still at attempt 1 (that pod
    # never existed), so the attempt number no longer tells how many runs failed.
    policy = {"maxAttempts": 2, "backoffSeconds": 0, "retryOnExitCodes": [3]}
    on_c14 = started("EXECUTING", attempt=1, index=1, type_name="c1.4")
    first = step(job(params=TWO_TYPES, status=on_c14, retryPolicy=policy), [ended_pod(3)], res=result(3))
    assert (first.status.phase, first.status.attempt, first.status.retried_failures) == (
        JobPhase.PREPARING,
        2,
        1,
    )
    second = {**started("EXECUTING", attempt=2, index=1, type_name="c1.4"), "retriedFailures": 1}
    pod2 = replace(ended_pod(3), name="job-1-a2", attempt=2)
    last = step(job(params=TWO_TYPES, status=second, retryPolicy=policy), [pod2], res=result(3))
    assert last.status.phase == JobPhase.ERROR and last.status.return_code == 3


# --- finished jobs: finalize, data ------------------------------------------------------------------


def test_data_ttl_expiry_clears_data() -> None:
    j = job(status=started("SUCCESS", finishedAt=ts(NOW - timedelta(hours=2))), dataTtl="1h")
    # First the mark alone, written before any object goes: once begun, the deletion ends (an
    # operator restarted meanwhile, a SetDataTtl or an Execute that crossed it), and the API
    # refuses what would need the data.
    marked = step(j)
    assert not marked.actions and not marked.events and not marked.status.data_cleared
    cond = get_condition(marked.status, "DataCleared")
    assert cond is not None and (cond.status, cond.reason, cond.message) == (
        "False",
        "Deleting",
        "stored data being deleted (data TTL expired)",
    )
    assert data_deletion_begun(marked.status) == "data TTL expired"
    # Then the deletion, whatever the TTL has become meanwhile.
    for ttl in ("1h", "infinity", "30d"):
        p = step(replace(j, status=marked.status, spec={**j.spec, "dataTtl": ttl}))
        assert p.actions == (ClearData(),)
        assert p.status.data_cleared and "DataCleared" in [e.reason for e in p.events]
        cond = get_condition(p.status, "DataCleared")
        assert cond is not None and (cond.status, cond.message) == (
            "True",
            "stored data deleted (data TTL expired)",
        )
        assert data_deletion_begun(p.status) is None
    early = step(job(status=started("SUCCESS", finishedAt=ts(NOW - timedelta(minutes=20))), dataTtl="1h"))
    assert not early.actions and early.requeue_after == timedelta(minutes=40)
    assert early.status.data_expires_at == NOW + timedelta(minutes=40)


def test_changed_ttl_moves_the_expiry() -> None:
    status = started("ERROR", finishedAt=ts(NOW), dataExpiresAt=ts(NOW + timedelta(days=14)))
    p = step(job(status=status, dataTtl="3d"))
    assert p.status.data_expires_at == NOW + timedelta(days=3)


@pytest.mark.parametrize("ttl", ["-1d", "1m", "400d"])
def test_a_ttl_out_of_range_set_after_the_start_deletes_nothing(ttl: str) -> None:
    # kubectl edits of a finished job are not validated by the API: a typo must not delete data.
    expiry = NOW + timedelta(days=14)
    status = started("SUCCESS", finishedAt=ts(NOW - timedelta(hours=2)), dataExpiresAt=ts(expiry))
    p = step(job(status=status, dataTtl=ttl))
    assert not p.actions and not p.status.data_cleared
    assert p.status.data_expires_at == expiry  # the last valid TTL's
    (cond,) = [c for c in p.status.conditions if c.type == "DataTtlValid"]
    assert (cond.status, cond.reason) == ("False", "InvalidDataTtl")
    assert cond.message == (
        f"spec.dataTtl {ttl} is not used: it must be between 1h and 365d, or infinity [data-ttl]; "
        "the data expires at 2025-06-15T12:00:00Z as before"
    )
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "InvalidDataTtl")]
    again = step(job(status=p.status.to_cr(), dataTtl=ttl))
    assert not again.events and again.status == p.status  # told once
    # A valid TTL again: used, and the condition goes.
    fixed = step(job(status=p.status.to_cr(), dataTtl="3d"))
    assert fixed.status.data_expires_at == NOW - timedelta(hours=2) + timedelta(days=3)
    assert not [c for c in fixed.status.conditions if c.type == "DataTtlValid"]


@pytest.mark.parametrize("ttl", ["-1d", "0s", "1m"])
def test_a_ttl_out_of_range_set_while_the_job_runs_deletes_nothing_when_it_ends(ttl: str) -> None:
    # The typo came before the end: the job's end must not turn it into an expiry either.
    p = step(job(status=started("EXECUTING"), dataTtl=ttl), [ended_pod(0)], res=result(0))
    assert p.status.phase == JobPhase.SUCCESS and p.status.data_expires_at is None
    for later in (timedelta(0), timedelta(minutes=2), timedelta(days=400)):
        after = step(job(status=p.status.to_cr(), dataTtl=ttl), now=NOW + later)
        assert not after.actions and not after.status.data_cleared
        assert after.status.data_expires_at is None
        (cond,) = [c for c in after.status.conditions if c.type == "DataTtlValid"]
        assert cond.message.endswith("[data-ttl]; the data does not expire")
    fixed = step(job(status=p.status.to_cr(), dataTtl="3d"))
    assert fixed.status.data_expires_at == p.status.finished_at + timedelta(days=3)


def test_clear_data_request() -> None:
    p = marked_then(job(status=started("ERROR", finishedAt=ts(NOW)), clearData=True))
    assert p.actions == (ClearData(),) and p.status.data_cleared
    again = step(job(status=p.status.to_cr(), clearData=True))
    assert not again.actions


def test_data_goes_once_the_job_s_pod_is_gone() -> None:
    # A kept pod's ship container (or one shutting down) may still upload its last logs: they
    # would land under a prefix already deleted and stay, the job saying its data was cleared.
    retention = OperatorSettings(finished_pod_retention_seconds=3600)
    j = job(status=started("SUCCESS", finishedAt=ts(NOW), returnCode=0), clearData=True)
    kept = step(j, [ended_pod(0)], settings=retention)
    assert kept.actions == (DeleteSecrets(), DeletePod("job-1-a1", 1, "the job's data is deleted"))
    assert not kept.status.data_cleared and kept.requeue_after == timedelta(seconds=30)
    terminating = replace(ended_pod(0), deleting=True, deleted_at=NOW + timedelta(seconds=1))
    waiting = step(j, [terminating], now=NOW + timedelta(seconds=2), settings=retention)
    assert not waiting.actions and not waiting.status.data_cleared
    assert waiting.requeue_after == timedelta(seconds=29)
    gone = marked_then(
        j, [replace(terminating, gone=True)], now=NOW + timedelta(seconds=3), settings=retention
    )
    # (DeleteSecrets again: within the retention a gone pod's Secrets go with it; a no-op here.)
    assert gone.actions == (DeleteSecrets(), ClearData()) and gone.status.data_cleared
    # A pod stuck terminating (its node lost) is waited for 30 s past its deletion, no longer.
    stuck = marked_then(j, [terminating], now=NOW + timedelta(seconds=32), settings=retention)
    assert stuck.actions == (ClearData(),) and stuck.status.data_cleared
    # Expiry waits the same way; a pod that never reached a node is in nobody's way.
    expired = job(status=started("SUCCESS", finishedAt=ts(NOW - timedelta(hours=2))), dataTtl="1h")
    assert kinds(step(expired, [ended_pod(0)], settings=retention)) == ["DeleteSecrets", "DeletePod"]
    assert marked_then(expired, [pod(deleting=True)], settings=retention).actions == (ClearData(),)


def test_a_pod_deleted_at_the_end_of_time_fails_no_reconcile() -> None:
    # Anyone's pod object may say so (found by property testing): an OverflowError failed every step.
    far = replace(pod(node="cpu-0", deleting=True), deleted_at=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
    first = step(job(status=started("CREATING")), [pod(gone=True), far])
    again = step(job(status=first.status.to_cr()), [pod(gone=True), far])
    assert again.status.phase == first.status.phase and again.requeue_after is not None


def test_clear_data_of_a_job_that_never_ran() -> None:
    # DeleteData / DeleteAllData mark jobs that were created (inputs uploaded) but never executed.
    j = job(execute=False, status={"phase": "CREATING", "createdAt": ts(CREATED)}, clearData=True)
    p = marked_then(j)
    assert p.actions == (ClearData(),) and p.status.data_cleared and p.status.phase == JobPhase.CREATING
    assert not step(job(execute=False, status=p.status.to_cr(), clearData=True)).actions


def test_the_inputs_of_a_job_never_executed_expire_with_its_data_ttl() -> None:
    # A job abandoned after Create (the CLI stopped while uploading) keeps its inputs no longer
    # than a finished job would: createdAt + dataTtl.
    created = NOW - timedelta(minutes=20)
    waiting = step(job(execute=False, status={"phase": "CREATING", "createdAt": ts(created)}, dataTtl="1h"))
    assert not waiting.actions and waiting.requeue_after == timedelta(minutes=40)
    assert waiting.status.data_expires_at == created + timedelta(hours=1)
    expired = marked_then(
        job(execute=False, status=waiting.status.to_cr(), dataTtl="1h"), now=created + timedelta(hours=1)
    )
    assert expired.actions == (ClearData(),) and expired.status.data_cleared
    assert expired.status.phase == JobPhase.CREATING
    assert "data TTL expired before the job was executed" in expired.events[-1].message
    assert not step(job(execute=False, status=expired.status.to_cr(), dataTtl="1h")).actions


def test_execution_drops_the_expiry_of_the_job_s_unexecuted_data() -> None:
    status = {
        "phase": "CREATING",
        "createdAt": ts(CREATED),
        "dataExpiresAt": ts(CREATED + timedelta(days=14)),
    }
    p = step(job(status=status))
    assert p.status.phase == JobPhase.PREPARING and p.status.data_expires_at is None


def test_a_job_whose_data_was_deleted_before_it_ran_does_not_run() -> None:
    cleared = {"phase": "CREATING", "createdAt": ts(CREATED), "dataCleared": True}
    p = step(job(status=cleared))
    assert not any(isinstance(a, CreatePod) for a in p.actions)
    assert p.status.phase == JobPhase.ERROR
    assert "was deleted before it was executed" in p.status.status_details
    assert p.status.data_expires_at is None  # nothing left to expire


@pytest.mark.parametrize(
    ("extra", "created", "why"),
    [
        # DeleteData and Execute crossed: the clearing is still to be done.
        ({"clearData": True}, CREATED, "DeleteData"),
        # Executed after its data expired but before the operator cleared it.
        ({"dataTtl": "1h"}, NOW - timedelta(hours=2), "data TTL expired before the job was executed"),
    ],
)
def test_a_job_executed_as_its_data_goes_does_not_run(
    extra: dict[str, Any], created: datetime, why: str
) -> None:
    j = job(status={"phase": "CREATING", "createdAt": ts(created)}, **extra)
    failed = step(j)
    assert not failed.actions and data_deletion_begun(failed.status) == why
    assert failed.status.phase == JobPhase.ERROR and why in failed.status.status_details
    p = step(replace(j, status=failed.status))
    assert p.actions == (ClearData(),)
    assert p.status.phase == JobPhase.ERROR and p.status.data_cleared
    assert why in p.status.status_details


def test_an_execute_accepted_before_the_expiry_runs_though_the_operator_sees_it_after() -> None:
    # The API accepted Execute at createdAt + 59 min (TTL 1h); the operator, restarted or behind,
    # planned it at + 2h: the job failed DataCleared and lost inputs that were there when accepted.
    created = NOW - timedelta(hours=2)
    j = job(status={"phase": "CREATING", "createdAt": ts(created)}, dataTtl="1h")
    accepted = replace(j, execute_requested_at=created + timedelta(minutes=59))
    p = step(accepted)
    assert p.status.phase == JobPhase.PREPARING and not p.status.data_cleared
    assert any(isinstance(a, CreatePod) for a in p.actions)
    late = replace(j, execute_requested_at=created + timedelta(minutes=61))
    assert step(late).status.phase == JobPhase.ERROR
    # A time from the future counts as now.
    assert step(replace(j, execute_requested_at=NOW + timedelta(days=1))).status.phase == JobPhase.ERROR
    # Unless the operator had begun to delete the data (its mark written before the Execute
    # landed: kubectl, as the API refuses it then): the job must not start without its inputs.
    begun = step(replace(j, spec={**j.spec, "execute": False}), now=created + timedelta(hours=1)).status
    assert data_deletion_begun(begun) == "data TTL expired before the job was executed"
    crossed = step(replace(accepted, status=begun))
    assert crossed.status.phase == JobPhase.ERROR and crossed.status.data_cleared
    assert crossed.actions == (ClearData(),)
    assert "data TTL expired before the job was executed" in crossed.status.status_details
    annotated = {"metadata": {"annotations": {EXECUTE_REQUESTED_AT: ts(created)}}}
    assert JobView.from_body(annotated).execute_requested_at == created


def test_a_ttl_shortened_after_the_execute_does_not_fail_the_job_before_it_starts() -> None:
    # Created 3 h ago with the CLI's 14d; the operator recorded its expiry. Executed now, and a
    # SetDataTtl of 1h (the API takes an executed job's TTL as counted from its end) landed before
    # the operator's step: counted from createdAt, the job failed DataCleared, its inputs deleted.
    created = NOW - timedelta(hours=3)
    j = job(status={"phase": "CREATING", "createdAt": ts(created)}, dataTtl="14d")
    unexecuted = step(replace(j, spec={**j.spec, "execute": False}), now=created + timedelta(minutes=1))
    assert unexecuted.status.data_expires_at == created + timedelta(days=14)
    executed = replace(j, status=unexecuted.status, execute_requested_at=NOW - timedelta(seconds=1))
    shortened = replace(executed, spec={**executed.spec, "dataTtl": "1h"})
    p = step(shortened)
    assert p.status.phase == JobPhase.PREPARING and not p.status.data_cleared
    assert any(isinstance(a, CreatePod) for a in p.actions)
    # Without an expiry recorded (a job applied executed), the spec's TTL judges, as before.
    fresh = job(status={"phase": "CREATING", "createdAt": ts(created)}, dataTtl="1h")
    assert step(replace(fresh, execute_requested_at=NOW)).status.phase == JobPhase.ERROR


@pytest.mark.parametrize("ttl", ["1m", "0s", "-1d"])
def test_a_ttl_out_of_range_deletes_nothing_when_the_job_is_executed(ttl: str) -> None:
    # Before Execute the job said "not used: the data does not expire"; the Execute then judged
    # the expiry by that very TTL, deleted the data and failed the job DataCleared.
    created = NOW - timedelta(minutes=2)
    p = step(job(status={"phase": "CREATING", "createdAt": ts(created)}, dataTtl=ttl))
    assert ClearData() not in p.actions and not p.status.data_cleared
    assert p.status.phase == JobPhase.ERROR and "[data-ttl]" in p.status.status_details


def test_finalize_removes_pod_and_secrets_once() -> None:
    status = started("SUCCESS", finishedAt=ts(NOW))
    p = step(
        job(status=status, finalized=True),
        [ended_pod(0)],
        settings=OperatorSettings(finished_pod_retention_seconds=3600),
    )
    assert kinds(p) == ["DeleteSecrets", "DeletePod"]
    assert get_condition(p.status, "Finalized") is not None
    again = step(job(status=p.status.to_cr(), finalized=True))
    assert not again.actions
    # No pod left (retired, or removed by someone while the operator was away): the Secrets are
    # still deleted, as the condition then says they are.
    podless = step(job(status=status, finalized=True))
    assert podless.actions == (DeleteSecrets(),)
    done = get_condition(podless.status, "Finalized")
    assert done is not None and (done.status, done.message) == ("True", "pod and secrets removed")
    assert [e.reason for e in podless.events] == ["Finalized"]


def test_deletion_cleans_up_then_lets_go() -> None:
    deleted = job(status=started("EXECUTING"), deleting=True)
    # The pod first: its ship may still upload logs while it shuts down.
    p = step(deleted, [executing_pod()])
    assert p.actions == (DeletePod("job-1-a1", 1, "the job is deleted"),)
    assert p.requeue_after == timedelta(seconds=30)
    shutting = dataclasses.replace(executing_pod(), deleting=True)
    p = step(deleted, [shutting], now=NOW + timedelta(seconds=10))
    assert not p.actions and p.requeue_after == timedelta(seconds=20)
    # Gone (or still terminating after 30 s, e.g. on a lost node): secrets, data, finalizer.
    rest = (DeleteSecrets(), ClearData(), RemoveFinalizer())
    assert step(deleted, [pod(gone=True, node="cpu-0")]).actions == rest
    assert step(deleted, [shutting], now=NOW + timedelta(seconds=30)).actions == rest
    # Terminating already with a long grace (a graceful cancel, `kubectl delete pod`, the namespace
    # going): asked again with the short one, else it would upload into the deleted prefix.
    graceful = replace(shutting, deletion_grace_seconds=615)
    p = step(deleted, [graceful], now=NOW + timedelta(seconds=1))
    assert p.actions == (DeletePod("job-1-a1", 1, "the job is deleted"),)
    assert p.requeue_after == timedelta(seconds=29)
    assert not step(deleted, [replace(shutting, deletion_grace_seconds=1)], now=NOW).actions
    # A pod that never reached a node ran nothing: no wait.
    assert step(deleted, [unschedulable(NOW)]).actions == (
        DeletePod("job-1-a1", 1, "the job is deleted"),
        *rest,
    )
    assert not step(job(deleting=True, finalizers=())).actions


def test_a_deleted_job_deletes_what_its_owner_reference_would_have() -> None:
    # `kubectl delete pj --cascade=orphan` strips the owner references: the unpublished claims of
    # its output datasets and the API's Secret of its registry password would stay for ever.
    deleted = job(params=ORPHANABLE, status=started("EXECUTING"), deleting=True)
    assert step(deleted, [pod(gone=True, node="cpu-0")]).actions == (
        DeleteSecrets(),
        DeleteDatasetClaims(),
        DeleteRegistryPasswords(),
        ClearData(),
        RemoveFinalizer(),
    )
    # Only after the pods: a claim in use is held by its pod.
    assert step(deleted, [executing_pod()]).actions == (DeletePod("job-1-a1", 1, "the job is deleted"),)
    # From the raw spec: one the models cannot read is no reason to leave them.
    unreadable = job(params={**ORPHANABLE, "cmd": 5}, status=started("ERROR"), deleting=True)
    assert DeleteRegistryPasswords() in step(unreadable).actions
    assert DeleteDatasetClaims() in step(unreadable).actions


def test_phase_changes_of_one_step_become_one_event() -> None:
    from dsjobs.controller.status import JobEvent, coalesce_transitions

    events = [
        JobEvent("Normal", "Created", "new -> CREATING"),
        JobEvent("Normal", "Preparing", "CREATING -> PREPARING: creating pod j-1 for instance type c1.4"),
    ]
    assert coalesce_transitions(events) == [
        JobEvent(
            "Normal", "Preparing", "new -> CREATING -> PREPARING: creating pod j-1 for instance type c1.4"
        )
    ]
    finished = [
        JobEvent("Normal", "Executing", "PREPARING -> EXECUTING: running"),
        JobEvent("Normal", "UploadingOutput", "EXECUTING -> UPLOADING_OUTPUT: uploading"),
        JobEvent("Warning", "Failed", "UPLOADING_OUTPUT -> ERROR: exit code 3"),
    ]
    assert coalesce_transitions(finished) == [
        JobEvent("Warning", "Failed", "PREPARING -> EXECUTING -> UPLOADING_OUTPUT -> ERROR: exit code 3")
    ]
    # Other events, and changes that do not chain, stay as they are.
    other = [
        JobEvent("Normal", "Created", "new -> CREATING"),
        JobEvent("Warning", "Unschedulable", "0/3 nodes are available"),
        JobEvent("Normal", "Preparing", "CREATING -> PREPARING"),
        JobEvent("Normal", "Cancelled", "EXECUTING -> CANCELLED"),
    ]
    assert coalesce_transitions(other) == other
    assert coalesce_transitions([]) == []


# --- conditions a kubectl user waits for -------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "res", "extra", "phase", "finished", "reason"),
    [
        ([ended_pod(0)], result(0), {}, "SUCCESS", "True", "Succeeded"),
        ([ended_pod(3)], result(3), {}, "ERROR", "False", "Failed"),
        (
            [pod(gone=True, node="cpu-0")],
            None,
            {"cancel": {"reason": "stop"}},
            "CANCELLED",
            "False",
            "Cancelled",
        ),
    ],
)
def test_every_end_sets_ended_true(
    pods: list[PodView],
    res: RunnerResult | None,
    extra: dict[str, Any],
    phase: str,
    finished: str,
    reason: str,
) -> None:
    # `kubectl wait --for=condition=Finished` hangs on a job that fails (Finished=False): Ended is
    # True on every final phase, its reason the phase's.
    p = step(job(status=started("EXECUTING"), **extra), pods, res=res)
    assert p.status.phase == JobPhase(phase)
    ended, done = get_condition(p.status, "Ended"), get_condition(p.status, "Finished")
    assert ended is not None and done is not None
    assert (ended.status, ended.reason, done.status) == ("True", reason, finished)
    assert ended.message == done.message


def test_a_job_that_ends_before_its_pod_is_ended_too() -> None:
    for p in (step(job(params={"cmd": "python main.py ${NOPE}"})), step(job(cancel={"reason": "no"}))):
        ended = get_condition(p.status, "Ended")
        assert p.status.phase is not None and p.status.phase.is_final
        assert ended is not None and ended.status == "True"


# --- a status the models cannot read -----------------------------------------------------------


NAIVE = "2025-06-01T12:00:00"  # no zone: the CRD's date-time format lets it through


def test_an_unreadable_status_of_a_finished_job_does_not_run_it_again() -> None:
    # The plan started from scratch: a SUCCESS job whose pod was gone got a new attempt 1.
    finished = {
        "type": "Finished",
        "status": "True",
        "reason": "Succeeded",
        "message": "done",
        "lastTransitionTime": ts(NOW - timedelta(hours=1)),
    }
    bad = started("SUCCESS", finishedAt=NAIVE, returnCode=0, conditions=[finished])
    j = job(status=bad)
    assert "status.finishedAt: Input should have timezone info" in j.status_problem
    p = step(j, [pod(gone=True, node="cpu-0")])
    assert not p.actions
    assert p.status.phase == JobPhase.SUCCESS and (p.status.attempt, p.status.return_code) == (1, 0)
    cond = get_condition(p.status, "StatusReadable")
    assert cond is not None and (cond.status, cond.reason) == ("False", "UnreadableStatus")
    assert f"status.finishedAt: Input should have timezone info (stored: '{NAIVE}')" in cond.message
    assert p.status.status_details.startswith("the stored status cannot be read: status.finishedAt")
    assert [e.reason for e in p.events] == ["UnreadableStatus"]
    # Nor a pod kept after its end deleted, nor its data cleared.
    assert not step(job(status=bad, clearData=True), [ended_pod(0)], now=NOW + timedelta(days=30)).actions
    # The glue leaves the unreadable value in place; mended by removing it (what the readable
    # rest is), the job goes on from there, without the report.
    again = step(job(status=p.status.to_cr()), [pod(gone=True, node="cpu-0")])
    assert again.status.phase == JobPhase.SUCCESS and not any(isinstance(a, CreatePod) for a in again.actions)
    assert get_condition(again.status, "StatusReadable") is None
    assert again.status.status_details == "done"
    # Its data still expires: counted from when it finished, as the Finished condition says.
    assert again.status.finished_at == NOW - timedelta(hours=1)
    assert again.status.data_expires_at == NOW - timedelta(hours=1) + timedelta(days=14)


def test_an_unreadable_status_of_a_running_job_leaves_its_pod_alone() -> None:
    j = job(status=started("EXECUTING", startedAt=NAIVE))
    p = step(j, [executing_pod()])
    assert not p.actions and p.status.phase == JobPhase.EXECUTING
    assert "status.startedAt" in p.status.status_details
    # A condition (an entry of a list) that cannot be read is named by its index.
    cond = {"type": "Scheduled", "status": "True", "reason": "Scheduled", "lastTransitionTime": NAIVE}
    listed = job(status=started("EXECUTING", conditions=[cond]))
    assert "status.conditions[0].lastTransitionTime" in listed.status_problem
    assert not step(listed, [executing_pod()]).actions
    # Written without it, the job goes on.
    resumed = step(job(status=p.status.to_cr()), [executing_pod()])
    assert resumed.status.phase == JobPhase.EXECUTING
    assert resumed.status.status_details.startswith("running on node cpu-0")


def test_a_status_without_a_readable_phase_waits_for_one() -> None:
    # A phase this version does not know (a newer one's): the job may have ended before its pod, so
    # a job with no phase left is not taken for a new one.
    j = job(status={"phase": "QUEUED", "createdAt": ts(CREATED)})
    p = step(j)
    assert not p.actions and p.status.phase is None
    assert "status.phase: " in p.status.status_details and "'QUEUED'" in p.status.status_details
    written = step(job(status=p.status.to_cr()))
    assert not written.actions and written.status == p.status
    # Once somebody sets the phase, the job goes on from it.
    fixed = {**p.status.to_cr(), "phase": "CANCELLED"}
    done = step(job(status=fixed))
    assert not done.actions and done.status.phase == JobPhase.CANCELLED
    assert get_condition(done.status, "StatusReadable") is None


def test_a_hand_edited_status_of_a_job_not_started_yet_waits_then_goes_on() -> None:
    j = job(status={"phase": "CREATING", "createdAt": NAIVE})
    p = step(j)
    assert not p.actions and p.status.phase == JobPhase.CREATING
    # The rest written, it starts as any executed job (its creation time from its metadata).
    resumed = step(job(status=p.status.to_cr()))
    assert resumed.actions == (CreatePod(1, 0, "c1.4"),) and resumed.status.created_at == CREATED


def test_fields_of_a_newer_version_in_the_status_are_skipped_silently() -> None:
    cond = {"type": "Started", "status": "True", "reason": "Started", "since": "later"}
    j = job(status=started("EXECUTING", newerField={"x": 1}, conditions=[cond]))
    assert j.status_problem == "" and j.status.phase == JobPhase.EXECUTING
    assert [c.type for c in j.status.conditions] == ["Started"]
    p = step(j, [executing_pod()])
    assert p.status.phase == JobPhase.EXECUTING and get_condition(p.status, "StatusReadable") is None


@pytest.mark.parametrize(
    "changed", [None, {"maxAttempts": 1, "backoffSeconds": 600}], ids=["policy-removed", "attempts-lowered"]
)
def test_a_retry_policy_changed_during_the_backoff_stops_the_retry(changed: dict[str, Any] | None) -> None:
    # retryPolicy is no job parameter: a kubectl user removes or lowers it to stop retrying. The
    # decided attempt must not start (without a policy it started at once, skipping the backoff).
    policy = {"maxAttempts": 3, "backoffSeconds": 600, "retryOnExitCodes": [3]}
    failed = step(job(status=started("EXECUTING"), retryPolicy=policy), [ended_pod(3)], res=result(3))
    assert (failed.status.phase, failed.status.attempt) == (JobPhase.PREPARING, 2)
    edited = job(status=failed.status.to_cr(), **({"retryPolicy": changed} if changed else {}))
    ended = step(edited, [pod(gone=True)], now=NOW + timedelta(seconds=10))
    assert not [a for a in ended.actions if isinstance(a, CreatePod)]
    assert ended.status.phase == JobPhase.ERROR and ended.status.return_code == 3
    assert (ended.status.attempt, ended.status.pod_name, ended.status.retried_failures) == (1, "job-1-a1", 0)
    assert "not retried: spec.retryPolicy" in ended.status.status_details
    retrying = get_condition(failed.status, "Retrying")
    assert retrying is not None and ended.status.finished_at == retrying.last_transition_time
    # Raised instead, it goes on after the backoff.
    raised = job(status=failed.status.to_cr(), retryPolicy={**policy, "maxAttempts": 5})
    assert not step(raised, [pod(gone=True)], now=NOW + timedelta(seconds=10)).actions
    later = step(raised, [pod(gone=True)], now=NOW + timedelta(seconds=601))
    assert [a for a in later.actions if isinstance(a, CreatePod)]


@pytest.mark.parametrize("label", ["proj-b", ""], ids=["another-project", "unlabelled"])
def test_a_job_naming_another_project_than_its_namespaces_never_gets_a_pod(label: str) -> None:
    # The admission policy refuses such a job; on a cluster without it the job would run in the
    # other project's storage prefix (its cached inputs, and its data cleared on delete).
    view = dataclasses.replace(job(), namespace_project=label)
    s = step(view)
    assert not [a for a in s.actions if isinstance(a, CreatePod)]
    assert s.status.phase == JobPhase.ERROR
    finished = get_condition(s.status, "Finished")
    assert finished is not None and finished.reason == "ProjectMismatch"
    assert "spec.projectId" in s.status.status_details and "[project-namespace]" in s.status.status_details
    # Its own project, or a namespace the operator could not read (None): it starts.
    for known in (view.spec["projectId"], None):
        ok = step(dataclasses.replace(job(), namespace_project=known))
        assert [a for a in ok.actions if isinstance(a, CreatePod)]


def test_a_job_of_a_second_namespace_labelled_with_its_project_never_gets_a_pod() -> None:
    # A `staging` overlay copying the namespace with its project label: the same-named job there
    # overwrote the first namespace's job's outputs, and its deletion deleted them.
    second = dataclasses.replace(job(), namespace_project="proj-a", project_namespace="proj-a-first")
    s = step(second)
    assert not [a for a in s.actions if isinstance(a, CreatePod)]
    finished = get_condition(s.status, "Finished")
    assert s.status.phase == JobPhase.ERROR and finished is not None and finished.reason == "ProjectMismatch"
    assert "but that project is namespace proj-a-first's" in s.status.status_details
    # Its data prefix is the first namespace's job's: its expiry and deletion delete nothing.
    done = started("SUCCESS", finishedAt=ts(NOW - timedelta(days=30)), returnCode=0)
    expired = dataclasses.replace(
        job(status=done), namespace_project="proj-a", project_namespace="proj-a-first"
    )
    assert not [a for a in marked_then(expired, [pod(gone=True)]).actions if isinstance(a, ClearData)]
    # The holder's own jobs, or a holder not known (namespaces not listable): as ever.
    for holder in (second.namespace, None):
        ok = step(dataclasses.replace(second, project_namespace=holder))
        assert [a for a in ok.actions if isinstance(a, CreatePod)]


def test_the_oldest_namespace_labelled_with_a_project_holds_it() -> None:
    from dsjobs.controller.names import project_holder

    def ns(name: str, created: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "creationTimestamp": created}}

    assert project_holder([ns("b", "2026-01-02T00:00:00Z"), ns("a-later", "2026-03-01T00:00:00Z")]) == "b"
    assert project_holder([ns("z", "2026-01-02T00:00:00Z"), ns("y", "2026-01-02T00:00:00Z")]) == "y"
    assert project_holder([]) == ""


def test_a_job_naming_another_project_deletes_none_of_that_projects_data() -> None:
    # Its data prefix is the other project's: the same name there is that project's job. Its
    # expiry and its deletion go on without deleting it, and its status says so.
    done = started("SUCCESS", finishedAt=ts(NOW - timedelta(days=30)), returnCode=0)
    expired = marked_then(dataclasses.replace(job(status=done), namespace_project="proj-b"), [pod(gone=True)])
    assert not [a for a in expired.actions if isinstance(a, ClearData)]
    cleared = get_condition(expired.status, "DataCleared")
    assert expired.status.data_cleared and cleared is not None and "nothing was deleted" in cleared.message
    assert [e.message for e in expired.events if e.reason == "DataCleared"] == [
        f"the job's stored data is cleared: {cleared.message}"
    ]
    deleting = dataclasses.replace(job(status=done), namespace_project="", deleting=True)
    assert not [a for a in step(deleting, [pod(gone=True)]).actions if isinstance(a, ClearData)]
    # Its own project's, or not known: deleted as ever.
    for own in ("proj-a", None):
        mine = dataclasses.replace(job(status=done), namespace_project=own)
        assert [a for a in marked_then(mine, [pod(gone=True)]).actions if isinstance(a, ClearData)]


def test_a_container_that_cannot_be_created_fails_after_the_timeout() -> None:
    # A restricted pod security level and an image that runs as root: waited on for ever if not
    # counted among the failing waits.
    bad = pod(
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[
            waiting(
                "job", "CreateContainerConfigError", "container has runAsNonRoot and image will run as root"
            ),
            running("ship"),
        ],
    )
    p1 = step(job(status=started()), [bad])
    assert p1.status.phase == JobPhase.PREPARING
    p2 = step(job(status=p1.status.to_cr()), [bad], now=NOW + timedelta(seconds=61))
    assert p2.status.phase == JobPhase.ERROR and "runAsNonRoot" in p2.status.status_details


def test_an_image_never_to_be_pulled_fails_at_once() -> None:
    from dsjobs.controller.status import _PHASE_REASONS

    bad = pod(node="cpu-0", init=[waiting("stage-in", "ErrImageNeverPull", "never pull")])
    p = step(job(status=started()), [bad])
    assert p.status.phase == JobPhase.ERROR
    # `kubectl get events --field-selector type=Warning` shows the failure.
    assert [e.type for e in p.events if e.reason == _PHASE_REASONS[JobPhase.ERROR]] == ["Warning"]


def test_progress_is_kept_in_the_crd_s_range() -> None:
    # The CRD says maximum 100: a runner's 150 made the whole status write Invalid.
    from dsjobs.controller.status import apply_result
    from dsjobs.models import ProjectJobStatus
    from dsjobs.runner.result import ProgressResult, RunnerResult, RunnerStatus

    s = ProjectJobSpec.model_validate({"projectId": "p", "jobParameters": {"cmd": "x"}})
    r = RunnerResult(
        project_id="p",
        job_id="j",
        attempt=1,
        status=RunnerStatus.EXITED,
        return_code=0,
        progress=ProgressResult(progress=150, message="m"),
    )
    progress = apply_result(s, ProjectJobStatus(), r).progress
    assert progress is not None and progress.progress == 100


def test_a_pod_held_by_scheduling_gates_is_not_unschedulable() -> None:
    # Kueue holds pods so: counted as "no capacity", the job fell back to its next type.
    gated = pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "SchedulingGated",
                "message": "Scheduling is blocked due to non-empty scheduling gates",
            }
        ]
    )
    assert not gated.unschedulable


def test_a_pod_of_the_decided_attempt_is_adopted_not_made_again() -> None:
    # A crash between deciding the retry and writing its pod's name: the pod is this attempt's.
    status = started(attempt=2, podName="", retriedFailures=1)
    second = pod(
        attempt=2,
        phase="Running",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[running("job"), running("ship")],
    )
    p = step(job(status=status), [second])
    assert p.status.pod_name == "job-1-a2"
    assert "CreatePod" not in [type(a).__name__ for a in p.actions]


def test_datasets_whose_claims_were_deleted_are_not_told_created() -> None:
    from dsjobs.controller.plan import without_lost_datasets
    from dsjobs.controller.status import JobEvent
    from dsjobs.models import OutputDataset, OutputDatasetDesc, ProjectJobStatus

    def ds(name: str) -> OutputDataset:
        return OutputDataset(desc=OutputDatasetDesc(name=name, var=name.upper(), size_gb=1), id=f"ds{name}")

    final = ProjectJobStatus(phase=JobPhase.SUCCESS, output_datasets=[ds("a"), ds("b")])
    events = [
        JobEvent("Normal", "Succeeded", "x"),
        JobEvent("Normal", "DatasetsCreated", "created datasets dsa (a), dsb (b)"),
    ]
    status, told = without_lost_datasets(final, events, ["dsb"])
    assert [d.id for d in status.output_datasets] == ["dsa"]
    assert (
        status.status_details == "dataset dsb (b) not created: its volume claim was deleted while the job ran"
    )
    assert [(e.type, e.reason, e.message) for e in told[1:]] == [
        ("Normal", "DatasetsCreated", "created datasets dsa (a)"),
        ("Warning", "DatasetLost", status.status_details),
    ]
    assert without_lost_datasets(final, events, []) == (final, events)
    # Every claim gone: no "created datasets" at all (an empty list told as created), only the loss.
    status, told = without_lost_datasets(final, events, ["dsa", "dsb"])
    assert status.output_datasets == []
    assert [(e.reason, e.message) for e in told] == [
        ("Succeeded", "x"),
        (
            "DatasetLost",
            "dataset dsa (a), dsb (b) not created: its volume claim was deleted while the job ran",
        ),
    ]
