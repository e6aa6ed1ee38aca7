"""A pod worker's lifecycle against a fake API: host processes run for real, without mounts."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import shlex
import signal
import uuid
from collections.abc import AsyncIterator, Coroutine
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dsjobs.devcluster.node import worker as worker_mod
from dsjobs.devcluster.node.gpu import GpuAllocator
from dsjobs.devcluster.node.kubeapi import ApiError
from dsjobs.devcluster.node.mounts import Tools
from dsjobs.devcluster.node.podspec import ContainerPlan, NodeContext
from dsjobs.devcluster.node.runtime import Notifier
from dsjobs.devcluster.node.worker import PodWorker

T = TypeVar("T")
Obj = dict[str, Any]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def no_mount_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers run their argv directly: these tests are about lifecycle and status."""

    def argv(plan: ContainerPlan, tools: Tools, joins: Any = ()) -> list[str]:
        return list(plan.argv)

    monkeypatch.setattr(worker_mod, "launch_argv", argv)


class FakeApi:
    """Records calls; `fail` maps a method to the exceptions its next calls raise, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.fail: dict[str, list[Exception]] = {}
        self.pod: Obj | None = None

    async def request(self, method: str, path: str, **kw: Any) -> Obj:
        self.calls.append((method, path, kw.get("body")))
        pending = self.fail.get(method)
        if pending:
            raise pending.pop(0)
        return {}

    async def get(self, path: str, params: Any = None) -> Obj:
        return {}

    async def get_or_none(self, path: str) -> Obj | None:
        return self.pod

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.calls if m == method)


class Ctx:
    def __init__(self, state_dir: Path) -> None:
        self.api: Any = FakeApi()
        self.node = NodeContext(
            "n1", "127.0.0.1", {"cpu": Fraction(4), "memory": Fraction(2**33)}, "127.0.0.1", 6443, "/usr/bin"
        )
        self.tools = Tools(
            unshare="/usr/bin/unshare", sh="/bin/sh", mount="/bin/mount", mkdir="/bin/mkdir", setpriv=None
        )
        self.gpus = GpuAllocator(0)
        self.gpu_released = Notifier()
        self.memory = None
        self.state_dir = str(state_dir)
        self.restart_backoff = 0.2
        self.max_restart_backoff = 1.0
        self.events: list[tuple[str, str]] = []

    def record_event(
        self, pod: Obj, etype: str, reason: str, message: str, container: str | None = None
    ) -> None:
        self.events.append((reason, message))


def make_pod(init: list[Obj] | None = None, containers: list[Obj] | None = None, grace: int = 2) -> Obj:
    return {
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": str(uuid.uuid4()), "generation": 1},
        "spec": {
            "restartPolicy": "Never",
            "initContainers": init or [],
            "containers": containers or [],
            "terminationGracePeriodSeconds": grace,
        },
        "status": {},
    }


def container(name: str, script: str, **extra: Any) -> Obj:
    return {"name": name, "image": "img", "command": ["/bin/sh", "-c", script], **extra}


def deleted(pod: Obj, grace: int) -> Obj:
    out = copy.deepcopy(pod)
    out["metadata"].update(deletionTimestamp="2026-01-02T03:04:05Z", deletionGracePeriodSeconds=grace)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_of(w: PodWorker, name: str) -> int:
    snap = w.snap.get(name)
    assert snap is not None and snap.container_id is not None
    return int(snap.container_id.removeprefix("process://"))


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def started(ctx: Ctx, pod: Obj, pids: list[int] | None = None) -> AsyncIterator[PodWorker]:
    """A started worker for the pod, shut (with what it left behind) whatever the test did."""
    w = PodWorker(ctx, pod)
    w.start()
    try:
        yield w
    finally:
        await shut(w, pids or [])


async def shut(w: PodWorker, pids: list[int] = []) -> None:  # noqa: B006 - read only
    """End the pod and anything it left behind, so that a failing test leaks no process."""
    if not w.finished.is_set():
        w.request_stop("Deleted", 0)
        await asyncio.wait_for(w.finished.wait(), 10)
    for pid in pids:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
    for proc in list(w.procs.values()):
        proc.signal(signal.SIGKILL)
    await w.close()


def api_echo(status: Obj) -> Obj:
    """A written status as the API server returns it: the nulls of the patch are dropped."""
    out = copy.deepcopy(status)
    out["conditions"] = [{k: v for k, v in c.items() if v is not None} for c in out["conditions"]]
    return out


# ---------------------------------------------------------------------------


def test_failed_init_container_stops_the_native_sidecars(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        pod = make_pod(
            init=[
                container("side", "exec sleep 300", restartPolicy="Always"),
                container("init", "sleep 0.3; exit 3"),
            ],
            containers=[container("main", "true")],
        )
        leftovers: list[int] = []  # killed at the end if the test fails
        async with started(ctx, pod, leftovers) as w:
            await wait_for(lambda: "side" in w.procs)
            side = pid_of(w, "side")
            leftovers.append(side)
            await asyncio.wait_for(w.finished.wait(), 15)
            assert w.snap.terminal_phase == "Failed"
            assert not w.procs
            assert not alive(side)
            snap = w.snap.get("side")
            assert snap is not None and snap.state == "terminated"

    run(main())


def test_final_delete_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        api.fail["DELETE"] = [OSError("connection refused"), ApiError(503, "unavailable", "DELETE", "/")]
        pod = make_pod(containers=[container("main", "exec sleep 30")], grace=1)
        async with started(ctx, pod) as w:
            await wait_for(lambda: "main" in w.procs)
            w.update(deleted(pod, 1))
            await asyncio.wait_for(w.finished.wait(), 10)
            await wait_for(lambda: api.count("DELETE") == 3, 5)
            await asyncio.sleep(0.5)
            assert api.count("DELETE") == 3
            body = next(b for m, _, b in api.calls if m == "DELETE")
            assert body["gracePeriodSeconds"] == 0
            assert body["preconditions"] == {"uid": pod["metadata"]["uid"]}

    run(main())


def test_final_delete_stops_on_a_replaced_pod(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        api.fail["DELETE"] = [ApiError(409, {"reason": "Conflict"}, "DELETE", "/")]
        pod = make_pod(containers=[container("main", "true")])
        async with started(ctx, pod) as w:
            await asyncio.wait_for(w.finished.wait(), 10)
            w.update(deleted(pod, 2))
            await asyncio.sleep(1.0)
            assert api.count("DELETE") == 1

    run(main())


def test_final_delete_refused_for_good_is_not_retried_until_the_next_update(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        api.fail["DELETE"] = [ApiError(403, "forbidden", "DELETE", "/") for _ in range(5)]
        pod = make_pod(containers=[container("main", "true")], grace=1)
        async with started(ctx, pod) as w:
            await asyncio.wait_for(w.finished.wait(), 10)
            w.update(deleted(pod, 1))
            await asyncio.sleep(1.5)
            assert api.count("DELETE") == 1  # a 403 is an answer: no retry loop
            w.update(deleted(pod, 1))  # the pod's next update tries again
            await wait_for(lambda: api.count("DELETE") == 2, 3)

    run(main())


def test_force_deletion_still_gives_sigterm_a_second(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        ready = tmp_path / "trap-set"
        script = (
            f"trap 'sleep 0.3; exit 0' TERM; touch {shlex.quote(str(ready))}; while :; do sleep 0.05; done"
        )
        pod = make_pod(containers=[container("main", script)], grace=30)
        async with started(ctx, pod) as w:
            await wait_for(lambda: "main" in w.procs)
            await wait_for(ready.exists, 30)  # a TERM before the trap would end it with 143
            # The DELETED event of `kubectl delete --force --grace-period=0`.
            w.api_deleted(deleted(pod, 0))
            await asyncio.wait_for(w.finished.wait(), 10)
            term = w.snap.main[0].terminated
            assert term is not None and term.exit_code == 0

    run(main())


def test_grace_period_floor_and_the_grace_of_a_pod_gone_from_the_api(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        loop = asyncio.get_running_loop()
        pod = make_pod(grace=30)

        # Each deadline is the grace period from the moment of the call: between the loop's time
        # just before the call and just after it, whatever the call took.
        force = PodWorker(ctx, pod)
        before = loop.time()
        force.request_stop("Deleted", 0)
        after = loop.time()
        assert force.stop is not None
        assert (
            before + worker_mod.MIN_GRACE_SECONDS
            <= force.stop.deadline
            <= after + worker_mod.MIN_GRACE_SECONDS
        )

        # Gone without a deletion seen (a relist found it missing): the spec's grace period.
        missed = PodWorker(ctx, pod)
        before = loop.time()
        missed.api_deleted()
        after = loop.time()
        assert missed.stop is not None and missed.gone
        assert before + 30 <= missed.stop.deadline <= after + 30
        for w in (force, missed):
            await w.close()

    run(main())


def test_status_patch_names_the_pod_instance(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        pod = make_pod(containers=[container("main", "exec sleep 30")])
        async with started(ctx, pod):
            await wait_for(lambda: api.count("PATCH") > 0)
            body = next(b for m, _, b in api.calls if m == "PATCH")
            assert body["metadata"] == {"uid": pod["metadata"]["uid"]}

    run(main())


@pytest.mark.parametrize("code", [409, 422])
def test_status_write_refused_for_a_recreated_pod_ends_the_writes(tmp_path: Path, code: int) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        api.fail["PATCH"] = [ApiError(code, {"reason": "Conflict"}, "PATCH", "/")]
        api.pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "the-new-pod"}}
        pod = make_pod(containers=[container("main", "exec sleep 30")])
        async with started(ctx, pod) as w:
            await wait_for(lambda: w.gone, 5)
            patches = api.count("PATCH")
            await asyncio.sleep(0.5)  # the container started meanwhile: more to write, were it ours
            assert api.count("PATCH") == patches == 1

    run(main())


def test_status_conflict_on_the_same_pod_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        api.fail["PATCH"] = [ApiError(409, {"reason": "Conflict"}, "PATCH", "/")]
        pod = make_pod(containers=[container("main", "exec sleep 30")])
        api.pod = pod
        async with started(ctx, pod) as w:
            await wait_for(lambda: api.count("PATCH") >= 2, 5)
            assert not w.gone

    run(main())


def test_a_pod_update_before_the_first_echo_sends_no_second_write(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        async with started(ctx, make_pod(containers=[container("main", "exec sleep 30")])) as w:
            await wait_for(lambda: "main" in w.procs)
            await w.flush(5)
            patches = api.count("PATCH")
            w._changed()  # an unrelated update; the API's copy still has the pod's first status
            await asyncio.sleep(0.3)
            assert api.count("PATCH") == patches

    run(main())


def test_ready_overwritten_by_another_writer_is_reported_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_mod, "RECONCILE_SECONDS", 1.0)

    async def main() -> None:
        ctx = Ctx(tmp_path)
        api: FakeApi = ctx.api
        pod = make_pod(containers=[container("main", "exec sleep 30")])
        async with started(ctx, pod) as w:
            await wait_for(lambda: "main" in w.procs)
            await w.flush(5)
            written = w.current_status()

            def seen_from_api(status: Obj) -> Obj:
                p = copy.deepcopy(pod)
                p["status"] = status
                return p

            # The echo of its own write: nothing to do.
            patches = api.count("PATCH")
            w.update(seen_from_api(api_echo(written)))
            await asyncio.sleep(0.3)
            assert api.count("PATCH") == patches

            # The node lifecycle controller's MarkPodsNotReady: Ready=False, all else kept.
            marked = api_echo(written)
            for c in marked["conditions"]:
                if c["type"] == "Ready":
                    c.update(status="False", lastTransitionTime="2030-01-01T00:00:00Z")
            w.update(seen_from_api(marked))
            await wait_for(lambda: api.count("PATCH") == patches + 1, 2)
            resent = [b for m, _, b in api.calls if m == "PATCH"][-1]["status"]
            ready = next(c for c in resent["conditions"] if c["type"] == "Ready")
            assert ready["status"] == "True"

            # Marked again at once: answered, but not before RECONCILE_SECONDS.
            w.update(seen_from_api(marked))
            await asyncio.sleep(0.2)
            assert api.count("PATCH") == patches + 1
            await wait_for(lambda: api.count("PATCH") == patches + 2, 3)

    run(main())


def test_an_image_that_cannot_be_pulled_waits_in_back_off_until_the_pod_stops(tmp_path: Path) -> None:
    ctx = Ctx(tmp_path)

    async def main() -> None:
        pod = make_pod(containers=[container("main", "true", image="registry.invalid/nope/img:1")])
        async with started(ctx, pod) as w:

            def reason() -> str | None:
                snap = w.snap.get("main")
                return snap.waiting_reason if snap is not None else None

            await wait_for(lambda: reason() == "ErrImagePull")
            snap = w.snap.get("main")
            assert snap is not None and snap.state == "waiting"
            assert "lookup registry.invalid: no such host" in (snap.waiting_message or "")
            await wait_for(lambda: reason() == "ImagePullBackOff")
            assert snap.waiting_message == 'Back-off pulling image "registry.invalid/nope/img:1"'
            assert not w.procs and not w.finished.is_set()
        assert snap.state != "running" and not w.procs

    run(main())
    assert ("Pulling", 'Pulling image "registry.invalid/nope/img:1"') in ctx.events
    assert ("Failed", "Error: ErrImagePull") in ctx.events
    assert ("Failed", "Error: ImagePullBackOff") in ctx.events


def test_close_lets_a_request_whose_answer_is_on_its_way_finish_a_moment(tmp_path: Path) -> None:
    # The pod's DELETED event can come before the DELETE's own answer: cancelled at once, the
    # request was aborted, and the API server logged it as an error.
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        w = PodWorker(Ctx(tmp_path), make_pod(containers=[container("main", "true")]))
        w._in_flight = 1  # the final DELETE
        loop.call_later(0.1, setattr, w, "_in_flight", 0)
        began = loop.time()
        await w.close(patience=2.0)
        answered = loop.time() - began
        w._in_flight = 1  # a PATCH never answered: given up after the patience
        began = loop.time()
        await w.close(patience=0.2)
        return answered, loop.time() - began

    answered, gave_up = run(main())
    assert 0.1 <= answered < 1.0 and 0.2 <= gave_up < 1.0
