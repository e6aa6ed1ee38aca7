"""Process states -> PodStatus (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from dsjobs.devcluster.node.status import (
    ContainerSnapshot,
    Kind,
    PodSnapshot,
    Terminated,
    compute_status,
    pod_phase,
    reported_view,
    status_patch,
    tail_for_message,
    termination_message,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(seconds=10)

POD: dict[str, Any] = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": 1}, "spec": {}}


def snap(
    init: list[ContainerSnapshot] | None = None, main: list[ContainerSnapshot] | None = None, **kw: Any
) -> PodSnapshot:
    return PodSnapshot(host_ip="127.0.0.1", start_time=T0, init=init or [], main=main or [], **kw)


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def running(name: str, kind: Kind = "main") -> ContainerSnapshot:
    return ContainerSnapshot(
        name, "img", kind, state="running", running_since=T0, container_id="process://42", ready=True
    )


def done(name: str, code: int, kind: Kind = "main", message: str | None = None) -> ContainerSnapshot:
    term = Terminated(
        exit_code=code,
        reason="Completed" if code == 0 else "Error",
        finished_at=T1,
        started_at=T0,
        message=message,
        container_id="process://42",
    )
    return ContainerSnapshot(name, "img", kind, state="terminated", terminated=term)


def waiting(name: str, kind: Kind = "main", reason: str = "ContainerCreating") -> ContainerSnapshot:
    return ContainerSnapshot(name, "img", kind, waiting_reason=reason)


def test_pending_while_init_runs() -> None:
    s = snap(
        init=[running("init", "init")], main=[waiting("main", reason="PodInitializing")], sandbox_ready=True
    )
    st = compute_status(POD, s, T1)
    assert st["phase"] == "Pending"
    init = cond(st, "Initialized")
    assert init["status"] == "False"
    assert init["reason"] == "ContainersNotInitialized"
    assert init["message"] == "containers with incomplete status: [init]"
    assert cond(st, "PodReadyToStartContainers")["status"] == "True"
    assert st["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
    assert st["containerStatuses"][0]["imageID"] == ""
    assert st["initContainerStatuses"][0]["state"] == {"running": {"startedAt": "2026-01-02T03:04:05Z"}}
    assert st["initContainerStatuses"][0]["containerID"] == "process://42"
    assert st["podIP"] == "127.0.0.1"
    assert st["startTime"] == "2026-01-02T03:04:05Z"


def test_running_and_ready_with_stable_transition_times() -> None:
    s = snap(init=[done("init", 0, "init")], main=[running("a"), running("b")], sandbox_ready=True)
    st = compute_status(POD, s, T1)
    assert st["phase"] == "Running"
    for ctype in ("Initialized", "ContainersReady", "Ready", "PodScheduled"):
        assert cond(st, ctype)["status"] == "True", ctype
        assert cond(st, ctype)["reason"] is None  # explicit null clears a stale reason
    assert st["containerStatuses"][0]["started"] is True
    # Recomputing later with the written conditions as "previous" changes nothing.
    again = compute_status(POD, s, T1 + timedelta(minutes=5), st["conditions"])
    assert again == st


def test_one_container_not_ready() -> None:
    s = snap(main=[running("a"), waiting("b")], sandbox_ready=True)
    st = compute_status(POD, s, T1)
    assert st["phase"] == "Running"
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "False",
        "ContainersNotReady",
        "containers with unready status: [b]",
    )


def test_succeeded_pod() -> None:
    s = snap(main=[done("a", 0, message="ok")], terminal_phase="Succeeded")
    st = compute_status(POD, s, T1)
    assert st["phase"] == "Succeeded"
    assert cond(st, "Ready")["reason"] == "PodCompleted"
    assert cond(st, "PodReadyToStartContainers")["status"] == "False"
    term = st["containerStatuses"][0]["state"]["terminated"]
    assert term == {
        "exitCode": 0,
        "reason": "Completed",
        "finishedAt": "2026-01-02T03:04:15Z",
        "startedAt": "2026-01-02T03:04:05Z",
        "message": "ok",
        "containerID": "process://42",
    }
    assert st["containerStatuses"][0]["started"] is False


def test_failed_pod_with_reason_and_restart_history() -> None:
    c = done("a", 3)
    c.restart_count = 2
    c.last_terminated = Terminated(exit_code=1, reason="Error", finished_at=T0)
    s = snap(main=[c], terminal_phase="Failed", reason="DeadlineExceeded", message="too long")
    st = compute_status(POD, s, T1)
    assert (st["phase"], st["reason"], st["message"]) == ("Failed", "DeadlineExceeded", "too long")
    cs = st["containerStatuses"][0]
    assert cs["restartCount"] == 2
    assert cs["lastState"] == {
        "terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2026-01-02T03:04:05Z"}
    }
    assert cs["state"]["terminated"]["exitCode"] == 3


def test_a_node_shutdown_is_a_disruption_as_the_kubelet_reports_it() -> None:
    why = "Pod was terminated in response to imminent node shutdown."
    st = compute_status(
        POD, snap(main=[done("a", 0)], terminal_phase="Failed", reason="Terminated", message=why), T1
    )
    assert (st["phase"], st["reason"]) == ("Failed", "Terminated")
    target = cond(st, "DisruptionTarget")
    assert (target["status"], target["reason"], target["message"]) == ("True", "TerminationByKubelet", why)
    other = compute_status(
        POD, snap(main=[done("a", 3)], terminal_phase="Failed", reason="DeadlineExceeded"), T1
    )
    assert all(c["type"] != "DisruptionTarget" for c in other["conditions"])


def test_crash_loop_back_off_is_running_phase() -> None:
    c = waiting("a", reason="CrashLoopBackOff")
    c.restart_count = 1
    c.last_terminated = Terminated(exit_code=1, reason="Error", finished_at=T0)
    assert pod_phase(snap(main=[c], sandbox_ready=True)) == "Running"


def test_sidecar_counts_as_initialized_once_started() -> None:
    side = running("proxy", "sidecar")
    s = snap(init=[done("init", 0, "init"), side], main=[running("app")], sandbox_ready=True)
    st = compute_status(POD, s, T1)
    assert cond(st, "Initialized")["status"] == "True"
    assert st["phase"] == "Running"
    side.ready = False
    st = compute_status(POD, s, T1)
    assert cond(st, "ContainersReady")["message"] == "containers with unready status: [proxy]"
    assert pod_phase(snap(init=[waiting("proxy", "sidecar")], main=[waiting("app")])) == "Pending"


def test_readiness_gates() -> None:
    pod = {**POD, "spec": {"readinessGates": [{"conditionType": "example.com/lb"}]}}
    s = snap(main=[running("a")], sandbox_ready=True)
    st = compute_status(pod, s, T1, [])
    assert cond(st, "ContainersReady")["status"] == "True"
    assert cond(st, "Ready")["status"] == "False"
    assert cond(st, "Ready")["reason"] == "ReadinessGatesNotReady"
    gate = {"type": "example.com/lb", "status": "True"}
    assert cond(compute_status(pod, s, T1, [gate]), "Ready")["status"] == "True"


def test_transition_time_changes_only_on_status_change() -> None:
    s = snap(main=[running("a")], sandbox_ready=True)
    first = compute_status(POD, s, T0)
    s.main[0] = done("a", 0)
    s.terminal_phase = "Succeeded"
    later = compute_status(POD, s, T1, first["conditions"])
    assert cond(later, "Ready")["lastTransitionTime"] == "2026-01-02T03:04:15Z"
    assert cond(later, "PodScheduled")["lastTransitionTime"] == "2026-01-02T03:04:05Z"


def test_status_patch_is_the_status_stanza_with_the_uid_as_precondition() -> None:
    st = compute_status(POD, snap(main=[running("a")]), T1)
    assert status_patch(st, "u") == {"metadata": {"uid": "u"}, "status": st}


def test_reported_view_survives_the_api_round_trip_and_sees_others_writes() -> None:
    st = compute_status(POD, snap(main=[running("a")], sandbox_ready=True), T0)
    echo = dict(st, conditions=[{k: v for k, v in c.items() if v is not None} for c in st["conditions"]])
    # A later transition time, a gate's condition and the phase are not what tells them apart.
    echo["conditions"] = [dict(c, lastTransitionTime="2030-01-01T00:00:00Z") for c in echo["conditions"]]
    echo["conditions"].append({"type": "example.com/gate", "status": "False"})
    echo["phase"] = "Failed"
    assert reported_view(echo) == reported_view(st)
    marked = dict(
        echo, conditions=[dict(c, status="False") if c["type"] == "Ready" else c for c in echo["conditions"]]
    )
    assert reported_view(marked) != reported_view(st)
    restarted = dict(st, containerStatuses=[dict(st["containerStatuses"][0], restartCount=1)])
    assert reported_view(restarted) != reported_view(st)


def test_termination_message_rules() -> None:
    assert termination_message(b"done", "log", "File", 1) == "done"
    assert termination_message(b"", "log tail", "File", 1) is None
    assert termination_message(b"", "log tail", "FallbackToLogsOnError", 1) == "log tail"
    assert termination_message(b"", "log tail", "FallbackToLogsOnError", 0) is None
    assert termination_message(b"x" * 5000, None, "File", 0) == "x" * 4096


def test_tail_for_message_limits() -> None:
    lines = [f"line {i}\n" for i in range(200)]
    tail = tail_for_message(lines)
    assert tail.startswith("line 120\n")
    assert tail.endswith("line 199\n")
    big = ["y" * 1000 + "\n"] * 5
    assert len(tail_for_message(big).encode()) == 2048
