"""What the operator tells about jobs when its API calls go wrong: a status write whose answer was
lost, reconciles that keep failing or never settle, a lost leadership (dsjobs.controller.handlers,
dsjobs.controller.__main__).

The API server is a small in-memory stand-in for the calls a reconcile of a job without pods makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from kopf._cogs.clients import errors as kopf_errors
from kube_fake import merged
from test_controller_metrics import Events, _transitions
from test_job_status import CREATED, SETTINGS, ts

from dsjobs.controller import __main__ as main
from dsjobs.controller import handlers, metrics
from dsjobs.controller.handlers import MAX_STEPS, Operator
from dsjobs.controller.kube import Conflict, Forbidden
from dsjobs.controller.plan import JobView, Plan
from dsjobs.controller.status import JobEvent
from dsjobs.models import JobPhase

KEY = ("project-a", "job-1")


def _body(status: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "metadata": {
            "name": "job-1",
            "namespace": "project-a",
            "uid": "uid-1",
            "resourceVersion": "100",
            "generation": 1,
            "creationTimestamp": ts(CREATED),
            "finalizers": ["dsjobs.dev/cleanup"],
            "labels": {"dsjobs.dev/project-id": "proj-a", "dsjobs.dev/job-id": "job-1"},
        },
        "spec": {"projectId": "proj-a", "execute": True, "jobParameters": {"cmd": "python main.py"}, **spec},
        "status": status,
    }


class FakeKube:
    """The job's object as the API server keeps it: merge patches guarded by resourceVersion.

    `lose_answers`: status writes that are stored but whose answer is lost, the client's retry
    (same resourceVersion) then answered 409, as Kube._timed does after a timeout or a 5xx.
    `interfere`: status writes refused because another writer changed the job just before."""

    def __init__(self, body: dict[str, Any], *, lose_answers: int = 0, interfere: int = 0) -> None:
        self.body = copy.deepcopy(body)
        self.lose_answers = lose_answers
        self.interfere = interfere
        self.status_writes = 0

    async def pages(self, *_: Any, **__: Any) -> Any:
        for page in ():
            yield page

    async def list(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        return []

    async def get(self, resource: str, path: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.body) if resource == "projectjobs" else None

    async def delete_collection(self, *_: Any, **__: Any) -> None:
        return None  # the job's Secrets and claims: none here

    def _store(self, patch: dict[str, Any]) -> None:
        self.body = merged(self.body, {k: v for k, v in patch.items() if k != "metadata"})
        self.body["metadata"]["resourceVersion"] = str(int(self.body["metadata"]["resourceVersion"]) + 1)

    async def merge_patch(self, resource: str, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        if path.endswith("/status"):
            self.status_writes += 1
            if self.interfere:
                self.interfere -= 1
                self._store({"metadata": {}, "spec": {"dataTtl": "14d"}})  # e.g. SetDataTtl
        if patch["metadata"]["resourceVersion"] != self.body["metadata"]["resourceVersion"]:
            raise Conflict({"message": "the object has been modified"}, status=409, headers={})  # type: ignore[arg-type]
        # As the status subresource does: a write of /status changes the status only, any other
        # write all but the status.
        if path.endswith("/status"):
            self._store({"status": patch.get("status") or {}})
        else:
            self._store({k: v for k, v in patch.items() if k != "status"})
        if path.endswith("/status") and self.lose_answers:
            self.lose_answers -= 1
            raise Conflict({"message": "the object has been modified"}, status=409, headers={})  # type: ignore[arg-type]
        return copy.deepcopy(self.body)


def _operator(kube: FakeKube, settings: Any = SETTINGS) -> tuple[Operator, Events]:
    op = Operator(settings, environ={})
    op.kube = kube  # type: ignore[assignment]
    events = Events()
    op.events = events  # type: ignore[assignment]
    return op, events


def _status_writes() -> float:
    return sum(
        s.value for m in metrics.STATUS_WRITES.collect() for s in m.samples if s.name.endswith("_total")
    )


def _reconcile_errors(kind: str) -> float:
    return sum(
        s.value
        for m in metrics.RECONCILE_ERRORS.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["kind"] == kind
    )


async def _reconciled(op: Operator, times: int = 1) -> None:
    for _ in range(times):
        await op._reconcile_locked(KEY)
    for _, handle in op._timers.values():
        handle.cancel()


# A job cancelled before its pod was made: one step takes it from CREATING to CANCELLED.
CANCELLED_EARLY = _body({"phase": "CREATING", "createdAt": ts(CREATED)}, cancel={"reason": "not needed"})


@pytest.mark.parametrize("lost", [0, 1], ids=["answered", "answer-lost"])
def test_a_status_write_whose_answer_was_lost_is_told_once(
    lost: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The PATCH landed, its answer did not; the client's retry carried the old resourceVersion and
    # got 409. The next step finds the status it wrote and has nothing to write: the phase Event,
    # the transition, the written-status count and the "a -> b" line were lost with the answer.
    kube = FakeKube(CANCELLED_EARLY, lose_answers=lost)
    op, events = _operator(kube)
    op._remember(copy.deepcopy(kube.body))
    transitions, writes = _transitions(), _status_writes()
    with caplog.at_level(logging.INFO, logger="dsjobs.controller"):
        asyncio.run(_reconciled(op, times=2))  # twice: as a later event of the job would
    assert kube.body["status"]["phase"] == "CANCELLED" and kube.status_writes == 1
    assert [(e.reason, e.message.partition(":")[0]) for e in events.posted] == [
        ("Cancelled", "CREATING -> CANCELLED")
    ]
    assert _transitions() - transitions == Counter({("CREATING", "CANCELLED"): 1})
    assert _status_writes() - writes == 1
    assert [r.getMessage() for r in caplog.records if "->" in r.getMessage()] == [
        "project-a/job-1: CREATING -> CANCELLED (Cancelled)"
    ]
    assert op.phases._phases[KEY] == "CANCELLED"
    assert not op._unconfirmed  # nothing kept once told


def test_a_refused_status_write_is_told_by_the_write_that_follows_it_only() -> None:
    # A real conflict (another writer came first): the write did not land, the step plans again on
    # the fresh object and writes; its Event tells the phases held back before, once.
    kube = FakeKube(CANCELLED_EARLY, interfere=1)
    op, events = _operator(kube)
    op._remember(copy.deepcopy(kube.body))
    op._passed[KEY] = ["PREPARING"]  # seen by a paced step, never written
    conflicts = metrics.STATUS_CONFLICTS._value.get()  # type: ignore[attr-defined]
    asyncio.run(_reconciled(op))
    assert kube.body["status"]["phase"] == "CANCELLED" and kube.status_writes == 2
    assert metrics.STATUS_CONFLICTS._value.get() - conflicts == 1  # type: ignore[attr-defined]
    assert [e.message.partition(":")[0] for e in events.posted] == ["CREATING -> PREPARING -> CANCELLED"]
    assert not op._unconfirmed and KEY not in op._passed


def test_a_body_older_than_an_unconfirmed_write_decides_nothing() -> None:
    # A watch event that lags behind the operator's own GET neither shows nor refutes the write.
    kube = FakeKube(CANCELLED_EARLY, lose_answers=1)
    op, events = _operator(kube)
    before = copy.deepcopy(kube.body)
    view = JobView.from_body(before)
    told = [JobEvent("Normal", "Cancelled", "CREATING -> CANCELLED: not needed")]
    cancelled = view.status.model_copy(update={"phase": JobPhase.CANCELLED})
    assert asyncio.run(op._write_status(KEY, view, before, cancelled, told)) is None
    assert KEY in op._unconfirmed
    op._post(before, [])
    assert KEY in op._unconfirmed and not events.posted
    op._post(kube.body, [])  # the job as stored now: the write landed
    assert KEY not in op._unconfirmed
    assert events.posted == told and op.phases._phases[KEY] == "CANCELLED"


def test_a_failing_job_is_logged_once_per_error_and_told_to_its_users_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A thousand jobs failing every minute were a thousand WARNING lines a minute, and nothing in
    # `kubectl describe`.
    down = RuntimeError("admission webhook dsjobs.example.com: connection refused")
    server = kopf_errors.APIServerError({"message": "etcdserver: request timed out"}, status=500, headers={})  # type: ignore[arg-type]
    outcomes: list[BaseException | None] = [down, down, down, down, server, server, None, down]
    op, events = _operator(FakeKube(CANCELLED_EARLY))
    op._remember(copy.deepcopy(CANCELLED_EARLY))

    async def reconcile(key: Any) -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    op._reconcile = reconcile  # type: ignore[method-assign]
    counted = _reconcile_errors("RuntimeError"), _reconcile_errors("APIServerError")
    with caplog.at_level(logging.DEBUG, logger="dsjobs.controller"):
        asyncio.run(_reconciled(op, times=8))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "reconcile" in r.getMessage()]
    assert [level for level, _ in lines] == [
        "WARNING",  # the first failure
        "DEBUG",
        "DEBUG",
        "DEBUG",
        "WARNING",  # another error
        "DEBUG",
        "INFO",  # succeeded after 6 failures: the streak is over
        "WARNING",  # a new streak
    ]
    assert "(1 in a row)" in lines[0][1] and "connection refused" in lines[0][1]
    assert "succeeded after 6 failures" in lines[6][1]
    told = [(e.type, e.reason, e.message) for e in events.posted]
    assert [t[:2] for t in told] == [("Warning", "ReconcileFailed")] * 2
    assert "3 times in a row (RuntimeError: admission webhook" in told[0][2]
    assert "5 times in a row (APIServerError: 500 etcdserver: request timed out)" in told[1][2]
    assert (_reconcile_errors("RuntimeError"), _reconcile_errors("APIServerError")) == (
        counted[0] + 5,
        counted[1] + 2,
    )
    assert op._errors[KEY].count == 1
    op._forget(KEY)
    assert KEY not in op._errors


def test_a_plan_that_never_settles_is_an_error_once_and_counted_every_time(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube = FakeKube(_body({"phase": "CREATING", "createdAt": ts(CREATED)}, execute=False))
    op, _ = _operator(kube, dataclasses.replace(SETTINGS, status_write_interval_seconds=0))
    real_plan = handlers.plan
    steps = iter(range(10**6))

    def restless(job: Any, *_: Any, **__: Any) -> Plan:
        # A bug: every step changes what the previous one wrote.
        return Plan(job.status.model_copy(update={"status_details": f"step {next(steps)}"}))

    monkeypatch.setattr(handlers, "plan", restless)
    counted = _reconcile_errors("NotSettled")
    with caplog.at_level(logging.DEBUG, logger="dsjobs.controller"):
        asyncio.run(_reconciled(op, times=3))
        assert kube.status_writes == 3 * MAX_STEPS
        monkeypatch.setattr(handlers, "plan", real_plan)
        asyncio.run(_reconciled(op))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "settle" in r.getMessage()]
    assert [level for level, _ in lines] == ["ERROR", "DEBUG", "DEBUG", "INFO"]
    assert lines[0][1] == f"project-a/job-1: did not settle after {MAX_STEPS} steps (1 reconciles in a row)"
    assert lines[3][1] == "project-a/job-1: settled after 3 reconciles that did not"
    assert _reconcile_errors("NotSettled") - counted == 3
    assert KEY not in op._unsettled


def test_a_lost_leadership_posts_the_queued_events_before_the_exit(monkeypatch: pytest.MonkeyPatch) -> None:

    done: list[str] = []

    class Poster:
        def drain_from_thread(self, timeout: float) -> bool:
            done.append(f"drained within {timeout}s")
            return True

    class Exited(Exception):
        pass

    def exit_now(code: int) -> None:
        done.append(f"exit {code}")
        raise Exited

    monkeypatch.setattr(main.os, "_exit", exit_now)
    monkeypatch.setattr(main.logging, "shutdown", lambda: None)
    op = Operator(SETTINGS, environ={})
    op.events = Poster()  # type: ignore[assignment]
    with pytest.raises(Exited):
        main.stand_down("the lease is held by other", op)
    assert done == [f"drained within {main.LOST_LEADERSHIP_DRAIN}s", "exit 1"]
    assert main.LOST_LEADERSHIP_DRAIN <= 2
    # No reconcile starts any more: another replica may be acting on the jobs.
    assert op.standing_down
    asyncio.run(op._reconcile_locked(KEY))  # no kube: it would fail if it tried
    assert not op._errors

    # Kopf not started yet (no poster): straight out.
    done.clear()
    with pytest.raises(Exited):
        main.stand_down("could not renew", Operator(SETTINGS, environ={}))
    assert done == ["exit 1"]


@pytest.mark.parametrize("lease", [3, 4, 5, 6, 10, 15, 60])
def test_a_replica_that_lost_the_lease_is_gone_before_a_standby_may_take_it(lease: int) -> None:
    # Gone by the renew deadline (2/3 of the Lease) plus the drain and the poster's stop; a
    # standby takes the Lease once a whole Lease passed unrenewed. With a fixed 1.5 s drain a
    # Lease of 3 to 5 s had both acting at once for up to 0.74 s.
    drain = main.lost_leadership_drain(lease)
    assert 0 <= drain <= main.LOST_LEADERSHIP_DRAIN
    assert lease * 2 / 3 + drain + main.EVENTS_STOP_SECONDS <= lease - 0.5
    assert main.lost_leadership_drain(15) == main.LOST_LEADERSHIP_DRAIN


def test_the_rest_of_a_plan_is_not_acted_on_once_the_lease_is_lost() -> None:
    # The watchdog stood the replica down while the plan's first action was under way: the
    # Secrets' and claims' deletions went on regardless, while another replica may lead already.
    from dsjobs.controller.handlers import StoodDown
    from dsjobs.controller.plan import DeleteDatasetClaims, DeletePod, DeleteSecrets

    op = Operator(SETTINGS, environ={})
    calls: list[str] = []

    class Kube:
        async def delete(self, resource: str, path: str, **kw: Any) -> bool:
            calls.append(f"DELETE {path}")
            op.standing_down = True  # the lease is lost while this request is in flight
            return True

        async def delete_collection(
            self, resource: str, path: str, selector: str, field_selector: str = ""
        ) -> None:
            calls.append(f"DELETE collection {path}")

    op.kube = Kube()  # type: ignore[assignment]
    body = {
        "metadata": {"name": "job-1", "namespace": "ns", "uid": "u", "resourceVersion": "1"},
        "spec": {"projectId": "p"},
        "status": {},
    }
    job = JobView.from_body(body)
    plan = Plan(job.status, (DeletePod("job-1-a1", 1, "x"), DeleteSecrets(), DeleteDatasetClaims()))
    with pytest.raises(StoodDown):
        asyncio.run(op._act(job, body, plan, datetime.now(UTC)))
    assert calls == ["DELETE /api/v1/namespaces/ns/pods/job-1-a1"]


FINISHED = {
    "phase": "SUCCESS",
    "createdAt": ts(CREATED),
    "startedAt": ts(CREATED),
    "finishedAt": ts(CREATED),
    "returnCode": 0,
    "attempt": 1,
    "podName": "job-1-a1",
}


def test_a_newer_versions_status_keys_are_read_past_and_kept() -> None:
    # A rollback, or a newer replica's write mid-rollout: the finished job is neither run again
    # nor stripped of what the newer version recorded.
    kube = FakeKube(_body({**FINISHED, "newerField": {"kept": True}}))
    op, _ = _operator(kube)
    asyncio.run(_reconciled(op, times=2))
    status = kube.body["status"]
    assert status["phase"] == "SUCCESS" and status["attempt"] == 1
    assert status["newerField"] == {"kept": True}


def test_a_status_value_this_version_cannot_read_is_left_for_someone_to_mend() -> None:
    # A phase of a newer version: the job waits, saying why, and its writes do not remove what
    # they cannot read (the newer version, or a person, finds it as it was).
    kube = FakeKube(_body({**FINISHED, "phase": "PAUSED"}))
    op, events = _operator(kube)
    asyncio.run(_reconciled(op, times=3))
    status = kube.body["status"]
    assert status["phase"] == "PAUSED" and status["attempt"] == 1 and status["returnCode"] == 0
    readable = [c for c in status["conditions"] if c["type"] == "StatusReadable"]
    assert readable and readable[0]["status"] == "False" and "PAUSED" in readable[0]["message"]
    assert kube.status_writes == 1  # told once, then left alone
    assert [e.reason for e in events.posted] == ["UnreadableStatus"]
    # Mended: the job goes on from its status, without the report.
    kube._store({"status": {"phase": "SUCCESS"}})
    op._remember(copy.deepcopy(kube.body))  # its watch event
    asyncio.run(_reconciled(op))
    assert kube.body["status"]["phase"] == "SUCCESS"
    assert not [c for c in kube.body["status"]["conditions"] if c["type"] == "StatusReadable"]


class NamespaceKube(FakeKube):
    """The job's namespace too: labelled with `project`, or unreadable (403) with `forbid`;
    `older` namespaces labelled with the same project (made before it), or not listable (403)
    with `forbid_list`."""

    def __init__(
        self,
        body: dict[str, Any],
        project: str,
        *,
        forbid: bool = False,
        older: tuple[str, ...] = (),
        forbid_list: bool = False,
    ) -> None:
        super().__init__(body)
        self.project, self.forbid, self.namespace_gets = project, forbid, 0
        self.older, self.forbid_list, self.namespace_lists = older, forbid_list, 0

    async def list(
        self, resource: str, path: str, label_selector: str = "", *, background: bool = False
    ) -> list[dict[str, Any]]:
        if resource != "namespaces":
            return await super().list(resource, path, label_selector, background=background)
        self.namespace_lists += 1
        if self.forbid_list:
            raise Forbidden({"message": "namespaces is forbidden"}, status=403, headers={})  # type: ignore[arg-type]
        assert label_selector == f"dsjobs.dev/project-id={self.project}", label_selector
        made = [(name, "2026-01-01T00:00:00Z") for name in self.older] + [(KEY[0], "2026-06-01T00:00:00Z")]
        return [{"metadata": {"name": n, "creationTimestamp": c}} for n, c in made]

    async def get(self, resource: str, path: str) -> dict[str, Any] | None:
        if resource != "namespaces":
            return await super().get(resource, path)
        self.namespace_gets += 1
        if self.forbid:
            raise Forbidden({"message": "namespaces is forbidden"}, status=403, headers={})  # type: ignore[arg-type]
        return {
            "metadata": {"name": path.rsplit("/", 1)[-1], "labels": {"dsjobs.dev/project-id": self.project}}
        }


def test_a_job_is_checked_against_its_namespaces_project_before_its_first_pod(
    caplog: pytest.LogCaptureFixture,
) -> None:
    just_now = ts(datetime.now(UTC))  # a job of 2025 would find its data expired
    new_job = _body({"phase": "CREATING", "createdAt": just_now})
    new_job["metadata"]["creationTimestamp"] = just_now
    # Another project's namespace: the job ends without a pod (the fake makes no pods).
    kube = NamespaceKube(new_job, "proj-b")
    op, _ = _operator(kube)
    asyncio.run(_reconciled(op))
    assert kube.body["status"]["phase"] == "ERROR" and "ProjectMismatch" in str(kube.body["status"])
    # Looked up once a minute per namespace, not per job or step, also by jobs asking at once.
    assert asyncio.run(op._namespace_project("project-a")).project == "proj-b" and kube.namespace_gets == 1

    async def burst(op: Operator) -> list[str | None]:
        found = await asyncio.gather(*(op._namespace_project("project-b") for _ in range(20)))
        return [f.project for f in found]

    assert asyncio.run(burst(op)) == ["proj-b"] * 20 and kube.namespace_gets == 2
    # An operator that may not read namespaces (scoped with RoleBindings) leaves it to the
    # admission policy, and says so once.
    forbidden = NamespaceKube(new_job, "", forbid=True)
    op, _ = _operator(forbidden)
    with caplog.at_level(logging.WARNING, logger="dsjobs.controller"):
        assert asyncio.run(op._namespace_project("project-a")).project is None
        assert asyncio.run(op._namespace_project("project-a")).project is None
    assert forbidden.namespace_gets == 1  # a refusal is remembered too
    assert [r.getMessage() for r in caplog.records].count(
        "namespace project-a cannot be read (403 namespaces is forbidden): its jobs' projectId is not "
        "checked against its project label here, only by the admission policy"
    ) == 1


def test_a_job_of_a_second_namespace_labelled_with_its_project_is_refused_and_deletes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    just_now = ts(datetime.now(UTC))
    new_job = _body({"phase": "CREATING", "createdAt": just_now})
    new_job["metadata"]["creationTimestamp"] = just_now
    project = new_job["spec"]["projectId"]
    kube = NamespaceKube(new_job, project, older=("staging-copied-from",))
    op, _ = _operator(kube)
    asyncio.run(_reconciled(op))
    assert kube.body["status"]["phase"] == "ERROR" and "ProjectMismatch" in str(kube.body["status"])
    assert "project is namespace staging-copied-from's" in kube.body["status"]["statusDetails"]
    assert kube.namespace_lists == 1
    with caplog.at_level(logging.WARNING, logger="dsjobs.controller"):
        asyncio.run(op._clear_data(JobView.from_body(kube.body)))  # returns before any store is needed
    assert any("no stored data deleted" in r.getMessage() for r in caplog.records)
    # The namespace holds the project (the oldest), or namespaces cannot be listed: as ever.
    for holds in (NamespaceKube(new_job, project), NamespaceKube(new_job, project, forbid_list=True)):
        found = asyncio.run(_operator(holds)[0]._namespace_project(KEY[0]))
        assert found.project == project and found.holder in (KEY[0], None)


def test_the_data_of_a_job_naming_another_project_is_not_deleted(caplog: pytest.LogCaptureFixture) -> None:
    # Its data prefix is the other project's: the same name there is that project's job.
    kube = NamespaceKube(_body(FINISHED), "proj-b")
    op, _ = _operator(kube)
    view = JobView.from_body(kube.body)
    with caplog.at_level(logging.WARNING, logger="dsjobs.controller"):
        asyncio.run(op._clear_data(view))  # returns before any store is needed
    assert any("no stored data deleted" in r.getMessage() for r in caplog.records)
    assert not op.input_refs.is_clearing(KEY, view.uid)


class TtlSetAt(NamespaceKube):
    """SetDataTtl (or a kubectl edit) to infinity just before the operator's status write `at`."""

    def __init__(self, body: dict[str, Any], at: int) -> None:
        super().__init__(body, "proj-a")
        self.at = at

    async def merge_patch(self, resource: str, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        if path.endswith("/status") and self.status_writes + 1 == self.at:
            self._store({"metadata": {}, "spec": {"dataTtl": "infinity"}})
        return await super().merge_patch(resource, path, patch)


@pytest.mark.parametrize("at", [1, 2], ids=["before-the-mark", "after-the-mark"])
def test_a_data_ttl_set_as_the_data_expires_deletes_all_of_it_or_nothing(
    monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    # The deletion was done, then its dataCleared write conflicted with a SetDataTtl: planned
    # again from the new TTL, the job said its data stays (DownloadJobFiles handing out URLs of
    # deleted objects, an unexecuted job's Execute failing on its inputs).
    deleted: list[str] = []

    async def recorded(
        storage: Any, project: str, job: str, unused: Any, *, with_inputs: bool = True
    ) -> None:
        deleted.append(job)

    monkeypatch.setattr(handlers, "delete_job_data", recorded)
    kube = TtlSetAt(_body(FINISHED, dataTtl="1h"), at)
    op, _ = _operator(kube)
    op._remember(copy.deepcopy(kube.body))
    asyncio.run(_reconciled(op, times=2))
    status = kube.body["status"]
    cleared = [c for c in status.get("conditions", []) if c["type"] == "DataCleared"]
    if at == 1:  # the TTL came first: nothing is deleted, nothing marked
        assert deleted == [] and not status.get("dataCleared") and cleared == []
        assert status.get("dataExpiresAt") is None  # infinity
    else:  # the mark came first: the deletion ends, whatever the TTL says since (done again
        # after the conflict: deleting what is gone deletes nothing)
        assert deleted == ["job-1", "job-1"] and status["dataCleared"] is True
        assert [(c["status"], c["reason"]) for c in cleared] == [("True", "DataCleared")]
    # An operator restarted between the mark and the deletion ends it too.
    marked = {
        **FINISHED,
        "conditions": [
            {
                "type": "DataCleared",
                "status": "False",
                "reason": "Deleting",
                "message": "stored data being deleted (data TTL expired)",
                "lastTransitionTime": ts(CREATED),
            }
        ],
    }
    deleted.clear()
    kube = NamespaceKube(_body(marked, dataTtl="infinity"), "proj-a")
    op, _ = _operator(kube)
    asyncio.run(_reconciled(op))
    assert deleted == ["job-1"] and kube.body["status"]["dataCleared"] is True


def test_a_newer_versions_keys_deeper_in_the_status_are_kept_too() -> None:
    # The finished job's data expires: the write that records it leaves a newer version's keys in
    # the objects it does not change (a list it changes, conditions here, is written whole).
    stored = {**FINISHED, "progress": {"progress": 50, "message": "half", "newerNested": 1}}
    kube = NamespaceKube(_body(stored), "proj-a")
    op, _ = _operator(kube)
    asyncio.run(_reconciled(op))
    status = kube.body["status"]
    assert status["dataCleared"] is True  # a write happened
    assert status["progress"]["newerNested"] == 1


def test_an_unreadable_condition_is_left_in_place() -> None:
    # A merge patch writes a list whole: adding StatusReadable would delete the entry that did not
    # read. The details and a Warning Event tell it; nothing else is done.
    naive = {
        "type": "Finished",
        "status": "True",
        "reason": "Succeeded",
        "message": "",
        "lastTransitionTime": "2025-06-01T12:00:00",
    }
    kube = NamespaceKube(_body({**FINISHED, "conditions": [naive]}), "proj-a")
    op, events = _operator(kube)
    asyncio.run(_reconciled(op, times=3))
    status = kube.body["status"]
    assert status["conditions"] == [naive] and status["phase"] == "SUCCESS"
    assert "status.conditions[0].lastTransitionTime" in status["statusDetails"]
    assert "dataCleared" not in status or status["dataCleared"] is False
    assert kube.status_writes == 1 and [e.reason for e in events.posted] == ["UnreadableStatus"]
    # Mended: the details go.
    kube._store({"status": {"conditions": [{**naive, "lastTransitionTime": "2025-06-01T12:00:00Z"}]}})
    op._remember(copy.deepcopy(kube.body))
    asyncio.run(_reconciled(op))
    assert not kube.body["status"]["statusDetails"].startswith("the stored status cannot be read")


def test_a_pod_that_left_the_watch_and_cannot_be_looked_up_is_taken_as_deleted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The GET that tells a pod whose job label was removed from a deleted one failed: the
    # exception lost the DELETED event until the next resync (10 min) and logged an ERROR.
    class Down(FakeKube):
        async def get(self, resource: str, path: str) -> dict[str, Any] | None:
            raise ConnectionRefusedError(111, "Connection refused")

    op, _ = _operator(Down(_body({})))
    body = {"metadata": {"name": "job-1-a1", "uid": "pod-uid", "namespace": "project-a"}}
    with caplog.at_level(logging.WARNING, logger="dsjobs.controller"):
        assert asyncio.run(op._still_there_or_gone(KEY, body)) is False
    assert "pod job-1-a1 left the pod watch and cannot be looked up: [Errno 111]" in caplog.text


def test_a_pod_that_lost_its_job_label_is_told_once_and_decides_no_pending_write() -> None:
    # The Warning went through the step Events' path, which takes its body for the job as stored:
    # the stand-in made from the pod (no resourceVersion, no status) took a status write awaiting
    # its confirmation for refused, and forgot it.
    op, events = _operator(FakeKube(_body({})))
    pending = handlers._Unconfirmed(
        status={"phase": "EXECUTING"},
        job=None,
        events=(),
        passed=(),
        base=100,
        at=0.0,  # type: ignore[arg-type]
    )
    op._unconfirmed[KEY] = pending
    pod = {
        "metadata": {
            "name": "job-1-a1",
            "uid": "pod-uid",
            "namespace": "project-a",
            "ownerReferences": [{"kind": "ProjectJob", "uid": "uid-1", "controller": True}],
        }
    }
    for _ in range(2):  # a resync finds it each time
        op._unlabelled(KEY, pod)
    assert [e.reason for e in events.posted] == ["PodUnlabelled"]
    assert "kubectl -n project-a label pod job-1-a1 dsjobs.dev/job-id=job-1" in events.posted[0].message
    assert op._unconfirmed[KEY] is pending
    assert [p.name for p in op.pods.get(KEY)] == ["job-1-a1"]  # kept as the job's


def test_a_deleted_job_whose_data_the_store_will_not_delete_says_why_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A prune while the object store hung: the job stayed Terminating for minutes, its Events and
    # status telling nothing (the first ReconcileFailed came after three failures).
    deleting = _body(FINISHED)
    deleting["metadata"]["deletionTimestamp"] = ts(datetime.now(UTC))
    kube = NamespaceKube(deleting, "proj-a")
    op, events = _operator(kube)

    async def store_hangs(*_: Any, **__: Any) -> None:
        raise TimeoutError("the object store did not answer in 30 s")

    monkeypatch.setattr(handlers, "delete_job_data", store_hangs)
    asyncio.run(_reconciled(op, times=3))
    told = [e for e in events.posted if e.reason == "DataNotDeleted"]
    assert len(told) == 1 and told[0].type == "Warning", events.posted
    assert "TimeoutError('the object store did not answer in 30 s')" in told[0].message
    assert "the job is deleted once it is" in told[0].message
    assert kube.body["metadata"]["finalizers"] == ["dsjobs.dev/cleanup"]  # still held


class MetadataKube(NamespaceKube):
    """Keeps what metadata patches write (finalizers, labels), and every revision's body: the
    watch's echoes of the operator's own writes."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body, "proj-a")
        self.revisions: dict[str, dict[str, Any]] = {}

    async def merge_patch(self, resource: str, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        if not path.endswith("/status"):
            meta = {k: v for k, v in patch["metadata"].items() if k != "resourceVersion"}
            if patch["metadata"]["resourceVersion"] != self.body["metadata"]["resourceVersion"]:
                raise Conflict({"message": "the object has been modified"}, status=409, headers={})  # type: ignore[arg-type]
            self.body["metadata"] = merged(self.body["metadata"], meta)
            self._store({})
        else:
            await super().merge_patch(resource, path, patch)
        rv = self.body["metadata"]["resourceVersion"]
        self.revisions[rv] = copy.deepcopy(self.body)
        return copy.deepcopy(self.body)


def test_the_echo_of_the_operator_s_own_write_after_it_dropped_the_body_is_not_news() -> None:
    # A job applied without execute: its finalizer patch's echo came after the operator had
    # dropped the job's body (idle in CREATING) and was reconciled as news: `new -> CREATING`
    # written again (409), then counted, logged and posted as an Event twice.
    applied = _body({})
    applied["metadata"]["creationTimestamp"] = ts(datetime.now(UTC))
    applied["metadata"]["finalizers"] = []
    applied["metadata"]["labels"] = {}
    applied["spec"]["execute"] = False
    kube = MetadataKube(applied)
    op, events = _operator(kube)
    writes = _status_writes()
    asyncio.run(op.on_job_event("ADDED", copy.deepcopy(applied)))
    assert kube.body["status"]["phase"] == "CREATING" and KEY not in op._jobs  # dropped: idle
    # The watch now brings the operator's own writes, the finalizer patch's first.
    for rv in sorted(kube.revisions, key=int):
        asyncio.run(op.on_job_event("MODIFIED", copy.deepcopy(kube.revisions[rv])))
    for _, handle in op._timers.values():
        handle.cancel()
    assert [e.reason for e in events.posted] == ["Created"]
    assert _status_writes() - writes == 1 and kube.status_writes == 1


def test_a_deleted_job_whose_data_is_kept_says_so_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    # Its namespace no longer the project's (a label removed): the data stays for good, and the
    # job with its Events goes with the finalizer: the log was the one place left to tell it.
    body = _body(FINISHED)
    body["metadata"]["deletionTimestamp"] = ts(CREATED)
    body["metadata"]["finalizers"] = ["dsjobs.dev/cleanup"]
    kube = NamespaceKube(body, "proj-b")
    op, _ = _operator(kube)
    with caplog.at_level(logging.WARNING, logger="dsjobs.controller"):
        asyncio.run(_reconciled(op, times=3))
    kept = [r.getMessage() for r in caplog.records if "deleted with its stored data kept" in r.getMessage()]
    assert kept and "is not the project of namespace project-a" in kept[0], caplog.text


def test_a_job_without_a_status_counts_as_creating() -> None:
    # Its first step keeps failing (a webhook refusing pods with 500): the API answers CREATING,
    # and the phase series summed to fewer jobs than there are.
    body = _body({})
    del body["status"]
    op, _ = _operator(NamespaceKube(body, "proj-a"))
    told: list[str] = []

    class Book(metrics.PhaseBook):
        def set(self, key: tuple[str, str], phase: str) -> None:
            told.append(phase)
            super().set(key, phase)

    op.phases = Book()

    async def seen() -> None:
        await op.on_job_event("ADDED", body)
        for _, handle in op._timers.values():
            handle.cancel()

    asyncio.run(seen())
    assert told[:1] == ["CREATING"]  # before its first step (whose write then tells its phase)


@pytest.mark.parametrize(
    ("stored_on_read", "disruption", "reads", "found"),
    [
        (2, None, 2, True),  # stored a moment after the pod left the API: waited for
        (None, None, None, False),  # never stored: the wait is bounded, however slow each read
        (2, "DeletionByPodGC", 1, False),  # its node is gone: no runner will store it
    ],
)
def test_the_result_of_a_pod_deleted_with_force_is_waited_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
    stored_on_read: int | None,
    disruption: str | None,
    reads: int | None,
    found: bool,
) -> None:
    from dsjobs.controller.podview import PodView
    from dsjobs.runner.result import RunnerResult, RunnerStatus

    monkeypatch.setattr(handlers, "FORCED_RESULT_WAIT_SECONDS", 2.5)
    op, _ = _operator(NamespaceKube(_body(FINISHED), "proj-a"))
    result = RunnerResult(
        project_id="proj-a", job_id="job-1", attempt=1, status=RunnerStatus.EXITED, return_code=0
    )
    read: list[int] = []

    async def stored_result(job: Any, attempt: int, ended: Any) -> RunnerResult | None:
        read.append(attempt)
        await asyncio.sleep(0.3)  # a slow store
        return result if stored_on_read is not None and len(read) >= stored_on_read else None

    monkeypatch.setattr(op.store, "stored_result", stored_result)
    status: dict[str, Any] = {
        "phase": "Running",
        "containerStatuses": [{"name": "ship", "state": {"running": {"startedAt": ts(CREATED)}}}],
    }
    if disruption:
        status["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": disruption}]
    pod = PodView.from_pod({"metadata": {"name": "job-1-a1"}, "status": status}, gone=True)

    async def timed() -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        got = await op._result_of(JobView.from_body(_body(FINISHED)), pod)
        return got, loop.time() - began

    got, took = asyncio.run(timed())
    assert (got == result) is found and took < 2.5 + 0.3 + 0.5, took
    if reads is not None:
        assert len(read) == reads


def test_a_pod_resync_the_api_server_does_not_answer_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    # During an API server's restart each resync logged 20 lines of aiohttp traceback at WARNING.
    import aiohttp

    op, _ = _operator(FakeKube(CANCELLED_EARLY), dataclasses.replace(SETTINGS, pod_resync_seconds=0.01))
    refused = aiohttp.ClientConnectionError("Cannot connect to host 127.0.0.1:6443")
    tries: list[str] = []

    async def resync() -> None:
        tries.append("resync")
        raise refused if len(tries) == 1 else RuntimeError("a bug")

    op.resync_pods = resync  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.create_task(op.resync_pods_forever())
        while len(tries) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="dsjobs"):
        asyncio.run(run())
    told = [r for r in caplog.records if "resync of pods and InstanceTypes failed" in r.getMessage()]
    assert told[0].getMessage() == (
        "resync of pods and InstanceTypes failed (tried again in 0.01s): "
        "ClientConnectionError: Cannot connect to host 127.0.0.1:6443"
    )
    assert told[0].exc_info is None
    assert told[1].exc_info is not None  # anything else is a bug: its traceback is kept


def test_the_first_data_deletion_lists_jobs_in_pages_of_the_watch_chunk_size() -> None:
    # Its LIST took 500 whole jobs a page (up to ~900 KiB each): a page of big ones passed the
    # operator's memory limit at its first deletion, after each restart again.
    sizes: list[int] = []

    class Paged(FakeKube):
        async def pages(
            self, resource: str, path: str, label_selector: str = "", page_size: int = 500, **_: Any
        ) -> Any:
            sizes.append(page_size)
            yield [copy.deepcopy(self.body)]

    kube = Paged(_body({}))
    op, _ = _operator(kube, dataclasses.replace(SETTINGS, watch_chunk_size=10))
    asyncio.run(op._warm_input_refs())
    assert sizes and set(sizes) == {10}
