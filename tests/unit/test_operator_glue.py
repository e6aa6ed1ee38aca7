"""The operator glue's own bookkeeping (handlers.Operator) between watch events and the plan.

No Kubernetes API is involved: the operator's caches are filled by hand as its watch handlers
would fill them, and the few calls a path makes are answered by stand-ins in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
from test_job_status import NOW, SETTINGS, SHA, job, pod, result, running, started, step, terminated

from dsjobs.controller.handlers import Operator, _current_pod
from dsjobs.controller.plan import ForceCancel
from dsjobs.models import JobPhase
from dsjobs.runner.result import OutputResult

KEY = ("project-a", "job-1")
REPO = Path(__file__).resolve().parents[2]


def test_a_pod_deleted_before_the_cache_saw_it_is_seen_gone() -> None:
    # Created by us, then deleted: the watch's ADDED and DELETED came before any reconcile read
    # the cache, so the create response (`_fresh`) is all the operator had of it.
    op = Operator(SETTINGS, environ={})
    op._fresh[KEY] = pod(created=NOW)
    op._gone[KEY]["job-1-a1"] = pod(gone=True)
    j = job(status=started("PREPARING"))
    pods = asyncio.run(op._pods_of(KEY, j))
    assert [(p.name, p.gone) for p in pods] == [("job-1-a1", True)]
    assert KEY not in op._fresh
    assert step(j, pods).status.phase == JobPhase.ERROR


def test_an_adopted_pod_gives_its_runner_result() -> None:
    # Killed after creating the pod, before writing the status; restarted after the job ended.
    res = result(0, outputs=[OutputResult(path="out.txt", key="k/out.txt", sha256=SHA, size_bytes=1)])
    ended = pod(
        phase="Succeeded",
        node="cpu-0",
        init=[terminated("stage-in")],
        containers=[terminated("job", 0), terminated("ship", 0, message=res.to_json())],
    )
    j = job(params={"outputFiles": [{"path": "out.txt"}]}, status={"phase": "CREATING"})
    got = asyncio.run(Operator(SETTINGS, environ={})._result_of(j, _current_pod(j, [ended])))
    assert got == res
    s = step(j, [ended], res=got).status
    assert s.phase == JobPhase.SUCCESS and [o.desc.path for o in s.output_files] == ["out.txt"]


def test_the_stored_result_of_a_pod_whose_node_went_silent_is_read() -> None:
    # The kubelet stopped reporting; the containers ran on and the ship stored result.json. The
    # pod, evicted (DeletionByTaintManager) or marked Failed by the pod GC, never shows its ship's
    # end: without the stored result the job ended NodeLost (a retry ran the program again).
    res = result(0, outputs=[OutputResult(path="out.txt", key="k/out.txt", sha256=SHA, size_bytes=1)])
    evicted = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
    silent = pod(
        phase="Running",
        node="gpu-0",
        deleting=True,
        conditions=[evicted],
        init=[terminated("stage-in")],
        containers=[terminated("job", 0), running("ship")],
    )
    collected = pod(
        phase="Failed",
        node="gpu-0",
        conditions=[{**evicted, "reason": "DeletionByPodGC"}],
        init=[terminated("stage-in")],
        containers=[running("job"), running("ship")],
    )
    j = job(params={"outputFiles": [{"path": "out.txt"}]}, status=started("EXECUTING"))
    op = Operator(SETTINGS, environ={})
    asked: list[int] = []

    async def stored_result(job: object, attempt: int, ended: object) -> object:
        asked.append(attempt)
        return res

    op.store.stored_result = stored_result  # type: ignore[method-assign]
    for p in (silent, collected):
        got = asyncio.run(op._result_of(j, _current_pod(j, [p])))
        assert got == res
        assert step(j, [p], res=got).status.phase == JobPhase.SUCCESS
    assert asked == [1, 1]
    # A running pod's result is not asked for.
    assert (
        asyncio.run(op._result_of(j, _current_pod(j, [pod(phase="Running", containers=[running("ship")])])))
        is None
    )
    assert asked == [1, 1]


def test_a_created_pod_no_watch_event_showed_and_the_resync_misses_is_gone() -> None:
    # The pod watch was away (410, Kopf lists again) while the pod was created and deleted: its
    # ADDED and DELETED never came, and the job waited for a pod event for ever (a cancel too).
    op = Operator(SETTINGS, environ={})
    op._fresh[KEY] = dataclasses.replace(pod(created=NOW), uid="u-made")
    reconciled: list[tuple[str, str]] = []
    looked_up: list[str] = []

    class Kube:
        async def pages(self, *args: object, **kw: object) -> AsyncIterator[list[dict[str, object]]]:
            yield []  # the LIST has no such pod

        async def get(self, resource: str, path: str) -> None:
            looked_up.append(path)
            if len(looked_up) == 1:
                raise ConnectionResetError("the API server's answer was lost")
            return None  # nor does a GET: it is gone

    async def reconcile(key: tuple[str, str]) -> None:
        reconciled.append(key)

    async def warm_up() -> None:
        return None

    op.kube = Kube()  # type: ignore[assignment]
    op.reconcile = reconcile  # type: ignore[method-assign]
    op.warm_up = warm_up  # type: ignore[method-assign]
    # A GET that fails tells nothing: the pod stays to be looked up by the next resync.
    assert asyncio.run(op.resync_pods()) == 0 and KEY in op._fresh
    assert asyncio.run(op.resync_pods()) == 1
    assert KEY not in op._fresh and op._gone[KEY]["job-1-a1"].gone
    assert looked_up == ["/api/v1/namespaces/project-a/pods/job-1-a1"] * 2 and reconciled == [KEY, KEY]
    j = job(status=started("PREPARING"))
    assert step(j, asyncio.run(op._pods_of(KEY, j))).status.phase == JobPhase.ERROR


def test_the_error_backoff_doubles_up_to_a_minute_and_never_overflows() -> None:
    from dsjobs.controller.handlers import MAX_ERROR_BACKOFF, error_backoff

    assert [error_backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert error_backoff(8) == MAX_ERROR_BACKOFF == error_backoff(1025) == error_backoff(10**6)


def test_a_reconcile_cancelled_while_waiting_for_the_lock_drops_no_later_trigger() -> None:
    async def scenario() -> None:
        op = Operator(SETTINGS, environ={})
        async with op._locked(KEY):  # another reconcile of the job is running
            waiting = asyncio.ensure_future(op.reconcile(KEY))
            await asyncio.sleep(0)
            assert KEY in op._waiting
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        assert KEY not in op._waiting  # else every later event of the job would be dropped

    asyncio.run(scenario())


def test_a_timer_keeps_nothing_of_the_handler_that_set_it() -> None:
    # A timer set inside a Kopf handler copied the handler's context, and with it Kopf's cause and
    # so the job's whole body: 10k waiting jobs with data expiry timers held ~16 KiB each. Only
    # the operator-wide parts of the context (auth vault, event queue) may go with a timer.
    import contextvars
    import gc
    import weakref
    from datetime import timedelta

    cause_var: contextvars.ContextVar[object] = contextvars.ContextVar("cause_var")
    vault_var: contextvars.ContextVar[object] = contextvars.ContextVar("vault_var")

    class Body:
        pass

    async def scenario() -> None:
        op = Operator(SETTINGS, environ={})
        vault = Body()
        vault_var.set(vault)
        body = Body()
        gone = weakref.ref(body)
        token = cause_var.set(body)
        op._schedule(("ns", "job-1"), timedelta(hours=1))
        cause_var.reset(token)
        del body
        gc.collect()
        assert gone() is None, "the timer keeps the handler's cause (the job's body) alive"
        handle = op._timers[("ns", "job-1")][1]
        assert handle._context.run(vault_var.get) is vault  # type: ignore[attr-defined]
        op._schedule(("ns", "job-2"), timedelta(hours=1))
        other = op._timers[("ns", "job-2")][1]
        assert other._context is handle._context  # type: ignore[attr-defined]  # one for all timers
        handle.cancel()
        other.cancel()

    asyncio.run(scenario())


def test_a_written_step_forgets_only_the_pod_deletions_it_planned_with() -> None:
    # A pod's DELETED (its last state: the cache has dropped it) came while a step of the same
    # job was writing its status: that step never saw it, the next one must.
    op = Operator(SETTINGS, environ={})
    planned = pod(gone=True)
    op._gone[KEY]["job-1-a1"] = planned
    seen = dict(op._gone[KEY])
    later = pod(attempt=2, gone=True)
    op._gone[KEY]["job-1-a2"] = later
    op._done_with_gone(KEY, seen)
    assert op._gone[KEY] == {"job-1-a2": later}
    # The same pod told again meanwhile (a newer last state) is kept too.
    again = pod(gone=True, phase="Succeeded")
    op._gone[KEY]["job-1-a1"] = again
    op._done_with_gone(KEY, {"job-1-a1": planned, "job-1-a2": later})
    assert op._gone[KEY] == {"job-1-a1": again}
    op._done_with_gone(KEY, {"job-1-a1": again})
    assert KEY not in op._gone


class DeletingKube:
    """Records the pod deletions the glue asks for."""

    def __init__(self) -> None:
        self.deleted: list[tuple[str, int]] = []

    async def delete(self, resource: str, path: str, *, grace_seconds: int, uid: str = "") -> bool:
        self.deleted.append((path.rsplit("/", 1)[-1], grace_seconds))
        return True


def test_a_forced_cancel_is_told_to_the_runner_once_or_else_the_pod_goes_with_1s() -> None:
    j = job(status=started("CANCELLING"), cancel={"graceful": False})
    action = ForceCancel("job-1-a1", 1)

    async def told_by(store_answers: bool) -> tuple[int, list[tuple[str, int]]]:
        op = Operator(SETTINGS, environ={})
        kube = DeletingKube()
        op.kube = kube  # type: ignore[assignment]
        words: list[int] = []

        async def tell(job: object, attempt: int) -> bool:
            words.append(attempt)
            return store_answers

        op.store.tell_forced_cancel = tell  # type: ignore[method-assign]
        for _ in range(2):  # planned again at the next step: told once
            await op._force_cancel(j, action)
        return len(words), kube.deleted

    assert asyncio.run(told_by(True)) == (1, [])
    # The store did not take the word: the program must stop all the same (its logs may be lost).
    assert asyncio.run(told_by(False)) == (1, [("job-1-a1", 1)])


CREATING: Final = {"phase": "CREATING", "createdAt": "2026-01-01T00:00:00Z"}


def _pod_step(
    op: Operator,
    attempt: int = 1,
    *,
    created: str = "2026-01-01T00:00:00Z",
    status: dict[str, Any] | None = None,
) -> tuple[Any, Any, Any, Any, datetime]:
    """A job of the catalog's first InstanceType, planned to its pod: (job, spec, CreatePod,
    status, now) for `op._create_pod`; `status` None: a job the operator has written none for."""
    import yaml

    from dsjobs.controller.plan import CreatePod, JobView, plan

    docs = yaml.safe_load_all((REPO / "deploy" / "base" / "instancetypes.yaml").read_text())
    instance_type = next(d for d in docs if d and d.get("kind") == "InstanceType")
    instance_type.setdefault("metadata", {})["resourceVersion"] = "5"
    body = {
        "metadata": {
            "name": "job-1",
            "namespace": "project-a",
            "uid": "uid-1",
            "resourceVersion": "100",
            "creationTimestamp": created,
            "finalizers": ["dsjobs.dev/cleanup"],
            "labels": {"dsjobs.dev/project-id": "proj-a", "dsjobs.dev/job-id": "job-1"},
        },
        "spec": {
            "projectId": "proj-a",
            "execute": True,
            "jobParameters": {
                "cmd": "true",
                "cloudInstanceTypes": [{"name": instance_type["metadata"]["name"]}],
            },
        },
    }
    if status is not None:
        body["status"] = status
    op.instance_types.apply(instance_type, deleted=False)
    job = JobView.from_body(body)
    now = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    planned = plan(job, [], op.instance_types.catalog(), None, now, op.settings)
    action = next(a for a in planned.actions if isinstance(a, CreatePod))
    return job, planned.spec, dataclasses.replace(action, attempt=attempt), planned.status, now


@pytest.mark.parametrize("pod_there", [True, False])
def test_a_first_pod_s_leftovers_are_cleared_only_when_no_pod_of_it_runs(pod_there: bool) -> None:
    # The runner Secret was there already (409): a replica that took over made it and its pod,
    # whose runner may be writing under the prefix (not cleared); or this operator made it before
    # a restart, and no pod exists yet (cleared, as a first try would).
    from dsjobs.controller.jobstore import JobStore
    from dsjobs.controller.settings import OperatorSettings

    class Kube:
        async def create(self, resource: str, path: str, obj: dict[str, Any]) -> None:
            return None  # every object is there already

        async def get(self, resource: str, path: str) -> dict[str, Any] | None:
            if resource != "pods" or not pod_there:
                return None
            meta = {
                "name": path.rsplit("/", 1)[1],
                "uid": "pod-uid",
                "labels": {"dsjobs.dev/job-id": "job-1", "dsjobs.dev/attempt": "1"},
                "ownerReferences": [
                    {"uid": "uid-1", "kind": "ProjectJob", "name": "job-1", "controller": True}
                ],
                "creationTimestamp": "2026-01-01T00:00:20Z",
            }
            return {"metadata": meta, "spec": {}, "status": {"phase": "Running"}}

        async def list(self, *args: object, **kw: object) -> list[dict[str, Any]]:
            return []

    decided: list[bool] = []

    class Store(JobStore):
        async def clear_leftovers(
            self, job: Any, project_id: str, first: Any, *, hold_for_restore: bool = False
        ) -> bool:
            decided.append(await first)
            return False

    op = Operator(OperatorSettings(), environ={})
    op.kube = Kube()  # type: ignore[assignment]
    op.store = Store({})
    asyncio.run(op._create_pod(*_pod_step(op, status=CREATING)))
    assert decided == [not pod_there]


@pytest.mark.parametrize("there_already", [False, True])
def test_a_refused_pod_takes_only_the_secrets_made_for_it_with_it(there_already: bool) -> None:
    # A quota refuses attempt 2's pod: the Secret made for it goes (nothing else would delete it),
    # as made (uid precondition); those of other attempts stay, and so does one that was there
    # already (a replica's, whose pod may run: quota admission answers before "already exists").
    from dsjobs.controller.handlers import Refused
    from dsjobs.controller.kube import Forbidden
    from dsjobs.controller.settings import OperatorSettings

    calls: list[str] = []

    class Kube:
        async def create(self, resource: str, path: str, obj: dict[str, Any]) -> dict[str, Any] | None:
            calls.append(f"POST {resource} {obj['metadata']['name']}")
            if resource == "pods":
                raise Forbidden({"message": "exceeded quota: pods"}, status=403, headers={})  # type: ignore[arg-type]
            if there_already:
                return None
            return {**obj, "metadata": {**obj["metadata"], "uid": "secret-uid"}}

        async def delete(self, resource: str, path: str, *, uid: str = "", **kw: Any) -> bool:
            calls.append(f"DELETE {path} uid={uid}")
            return True

        async def delete_collection(
            self, resource: str, path: str, selector: str, field_selector: str = ""
        ) -> None:
            calls.append(f"DELETE collection {path}?{selector}")

        async def get(self, resource: str, path: str) -> None:
            return None

        async def list(self, *args: object, **kw: object) -> list[dict[str, Any]]:
            return []

    op = Operator(OperatorSettings(), environ={})
    op.kube = Kube()  # type: ignore[assignment]
    refused = asyncio.run(op._create_pod(*_pod_step(op, attempt=2, status=CREATING)))
    assert isinstance(refused, Refused) and "exceeded quota" in refused.why
    made = (
        []
        if there_already
        else ["DELETE /api/v1/namespaces/project-a/secrets/job-1-a2-runner uid=secret-uid"]
    )
    assert calls == ["POST secrets job-1-a2-runner", "POST pods job-1-a2", *made]


@pytest.mark.parametrize(
    ("created", "status", "held"),
    [
        ("2026-01-01T00:00:00Z", None, True),  # no status, created a minute ago: maybe restored
        ("2025-12-31T23:00:00Z", None, False),  # no status for an hour: none is coming back
        ("2026-01-01T00:00:00Z", CREATING, False),  # the operator wrote its status: not restored
    ],
)
def test_a_new_job_whose_name_holds_a_stored_run_waits_for_a_restored_status(
    created: str, status: dict[str, Any] | None, held: bool
) -> None:
    # A restore (Velero, kubectl create + replace --subresource=status) makes the object, then
    # writes its status: a pod started in between cleared the restored run's outputs and logs as
    # "an earlier job's leftovers" (the job then read SUCCESS with its data gone).
    from dsjobs.controller.handlers import Held
    from dsjobs.controller.jobstore import JobStore
    from dsjobs.controller.plan import JobEvent
    from dsjobs.controller.settings import OperatorSettings

    calls: list[str] = []
    asked: list[bool] = []

    class Kube:
        async def create(self, resource: str, path: str, obj: dict[str, Any]) -> dict[str, Any]:
            calls.append(f"POST {resource} {obj['metadata']['name']}")
            return {**obj, "metadata": {**obj["metadata"], "uid": f"{resource}-uid"}}

        async def delete(self, resource: str, path: str, *, uid: str = "", **kw: Any) -> bool:
            calls.append(f"DELETE {path} uid={uid}")
            return True

        async def get(self, resource: str, path: str) -> None:
            return None

        async def list(self, *args: object, **kw: object) -> list[dict[str, Any]]:
            return []

    class Store(JobStore):
        async def clear_leftovers(
            self, job: Any, project_id: str, first: Any, *, hold_for_restore: bool = False
        ) -> bool:
            asked.append(hold_for_restore)
            return hold_for_restore  # the prefix holds a run's result.json

    op = Operator(OperatorSettings(), environ={})
    op.kube = Kube()  # type: ignore[assignment]
    op.store = Store({})
    job, spec, action, planned, now = _pod_step(op, created=created, status=status)
    outcome = asyncio.run(op._create_pod(job, spec, action, planned, now))
    assert asked == [held]
    if not held:
        assert calls == ["POST secrets job-1-a1-runner", "POST pods job-1-a1"]
        return
    assert outcome == Held(datetime(2026, 1, 1, 0, 2, tzinfo=UTC), "projects/proj-a/jobs/job-1/")
    # No pod; the Secret made for it goes again (nothing else would delete it).
    assert calls == [
        "POST secrets job-1-a1-runner",
        "DELETE /api/v1/namespaces/project-a/secrets/job-1-a1-runner uid=secrets-uid",
    ]

    # The reconcile writes nothing (a status write would make Velero's own conflict) and tells why.
    from dsjobs.controller.plan import Plan

    step = Plan(planned, (action,), (), spec=spec)
    _, kept, events, requeue = asyncio.run(op._act(job, {"metadata": {}}, step, now))
    assert kept.to_cr() == job.status.to_cr()
    assert requeue == timedelta(minutes=1)
    assert [(e.type, e.reason) for e in events] == [("Warning", "StoredRunFound")]
    assert isinstance(events[0], JobEvent) and "projects/proj-a/jobs/job-1/result.json" in events[0].message


def test_the_jobs_waiting_on_a_changed_type_are_planned_again_several_at_once() -> None:
    # One after another, the last of 200 waiting jobs got its new pod 36 s after the change.
    from dsjobs.controller.handlers import RECONCILE_ALL_CONCURRENCY
    from dsjobs.controller.settings import OperatorSettings

    op = Operator(OperatorSettings(), environ={})
    keys = [("project-a", f"job-{i}") for i in range(40)]
    op.pods.waiting_on = lambda name: keys if name == "g1.1" else []  # type: ignore[method-assign]
    running, peak, done = 0, 0, []

    async def reconcile(key: tuple[str, str]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        done.append(key)

    op.reconcile = reconcile  # type: ignore[method-assign]
    asyncio.run(op._type_changed("g1.1"))
    assert sorted(done) == sorted(keys) and peak == RECONCILE_ALL_CONCURRENCY
