"""The API's caches of the cluster on a miss: InstanceType names are read again when a job names one
they lack (an admin may have just added it), and a job id the watch does not know costs one LIST per
burst, however many callers ask for it (a fake cluster that answers LISTs by name, no watch)."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import grpc
import pytest
from test_api_logs import MemoryStore
from test_api_projects import job as projects_job

from dsjobs import backoff as backoff_module
from dsjobs.api import auth
from dsjobs.api import cluster as cluster_module
from dsjobs.api.cluster import MAX_LOCATE_LISTS, InstanceTypeCatalog, JobIndex, ProjectIndex
from dsjobs.api.core import Core
from dsjobs.api.errors import ApiError, KubeError
from dsjobs.api.kube import Kube, jobs_path, namespaces_path
from dsjobs.api.settings import Settings
from dsjobs.instancetypes import catalog_objects
from dsjobs.models import GROUP, INSTANCETYPE_PLURAL, VERSION

T = TypeVar("T")
INSTANCE_TYPES = f"/apis/{GROUP}/{VERSION}/{INSTANCETYPE_PLURAL}"
JOB = "0abcdefghijklmnopqrs"
OTHER = "1abcdefghijklmnopqrs"


def job(name: str, namespace: str = "team-a", project: str = "pa") -> dict[str, Any]:
    return projects_job(namespace, project, f"uid-{name}", name)


_C14 = next(o for o in catalog_objects() if o["metadata"]["name"] == "c1.4")


def _instance_type(name: str, invalid: bool = False) -> dict[str, Any]:
    body = copy.deepcopy(_C14)
    body["metadata"]["name"] = name
    if invalid:
        body["spec"]["resources"]["requests"]["cpu"] = "8"
    return body


class FakeKube:
    """The LISTs the caches make: InstanceTypes, project namespaces, ProjectJobs by name (a
    `metadata.name` field selector) and GETs of one job. Every call is counted; while `gate` is
    clear, calls wait for it (to have several callers at once)."""

    def __init__(self) -> None:
        self.instance_types = {"c1.4"}
        self.invalid_types: set[str] = set()  # among instance_types: their cpu request above the limit
        self.jobs: list[dict[str, Any]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.error: KubeError | None = None

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        params = dict(kwargs.get("params") or {})
        self.calls.append((path, params))
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        if self.error is not None:
            raise self.error
        if path == INSTANCE_TYPES:
            return {
                "items": [_instance_type(n, n in self.invalid_types) for n in sorted(self.instance_types)]
            }
        if path == namespaces_path():
            return {"items": [{"metadata": {"name": "team-a", "labels": {"dsjobs.dev/project-id": "pa"}}}]}
        if path == jobs_path() and "fieldSelector" in params:
            name = str(params["fieldSelector"]).removeprefix("metadata.name=")
            return {"items": [j for j in self.jobs if j["metadata"]["name"] == name]}
        for j in self.jobs:
            if path == jobs_path(j["metadata"]["namespace"], j["metadata"]["name"]):
                return j
        raise KubeError(404, "NotFound", path)

    def lists(self, path: str) -> int:
        return sum(1 for p, _ in self.calls if p == path)

    def job_lists(self) -> list[str]:
        return [str(params["fieldSelector"]) for p, params in self.calls if "fieldSelector" in params]


async def settle() -> None:
    """Let every task that can run do so until all of them wait."""
    for _ in range(50):
        await asyncio.sleep(0)


async def all_waiting(kube: FakeKube, *calls: Coroutine[Any, Any, T], expect: int) -> list[asyncio.Task[T]]:
    """Start `calls` with the cluster's answers held back; return once `expect` requests wait."""
    kube.gate.clear()
    tasks = [asyncio.ensure_future(c) for c in calls]
    await settle()
    assert kube.waiting == expect
    return tasks


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


# --- InstanceType names -------------------------------------------------------------------------


def test_a_name_not_held_is_read_again_so_a_new_instance_type_is_taken_at_once() -> None:
    async def scenario() -> tuple[frozenset[str] | None, frozenset[str] | None, int]:
        kube = FakeKube()
        catalog = InstanceTypeCatalog(cast(Kube, kube), min_refresh_interval=0)
        before = await catalog.names(["c1.4"])
        kube.instance_types.add("g1.1")  # an admin applies a new InstanceType
        after = await catalog.names(["g1.1"])
        await catalog.names(["c1.4", "g1.1"])  # held: no LIST
        await catalog.names()
        return before, after, kube.lists(INSTANCE_TYPES)

    before, after, lists = run(scenario)
    assert before == frozenset({"c1.4"})
    assert after == frozenset({"c1.4", "g1.1"})
    assert lists == 2


def test_invalid_instance_types_are_told_apart_from_valid_ones() -> None:
    """The operator leaves an invalid InstanceType out of its catalog and fails a job naming it:
    Create accepted that job, whose user then uploaded its inputs to see it fail."""

    async def scenario() -> tuple[frozenset[str] | None, dict[str, str], frozenset[str] | None, int]:
        kube = FakeKube()
        kube.instance_types |= {"c1.bad"}
        kube.invalid_types.add("c1.bad")
        catalog = InstanceTypeCatalog(cast(Kube, kube), min_refresh_interval=0)
        names = await catalog.names(["c1.bad"])
        invalid = catalog.invalid()
        kube.invalid_types.clear()  # an admin fixes it: asked for again, it is read again
        fixed = await catalog.names(["c1.bad"])
        return names, invalid, fixed, kube.lists(INSTANCE_TYPES)

    names, invalid, fixed, lists = run(scenario)
    assert names == frozenset({"c1.4"}) and fixed == frozenset({"c1.4", "c1.bad"}) and lists == 2
    assert list(invalid) == ["c1.bad"] and "cpu request is above its limit" in invalid["c1.bad"]


def test_names_not_held_are_read_again_at_most_once_per_interval() -> None:
    async def scenario() -> tuple[frozenset[str] | None, int]:
        kube = FakeKube()
        catalog = InstanceTypeCatalog(cast(Kube, kube), min_refresh_interval=3600)
        await catalog.names()
        kube.instance_types.add("g1.1")
        for name in ("g1.1", "nope.1", "nope.2"):
            await catalog.names([name])
        return await catalog.names(["g1.1"]), kube.lists(INSTANCE_TYPES)

    names, lists = run(scenario)
    assert names == frozenset({"c1.4"})  # the rate limit: a name not held answered from the copy
    assert lists == 1


def test_askers_of_a_name_not_held_share_one_list() -> None:
    async def scenario() -> tuple[list[frozenset[str] | None], int]:
        kube = FakeKube()
        kube.instance_types.add("g1.1")
        catalog = InstanceTypeCatalog(cast(Kube, kube), min_refresh_interval=3600)
        tasks = await all_waiting(kube, *(catalog.names(["g1.1"]) for _ in range(5)), expect=1)
        kube.gate.set()
        return list(await asyncio.gather(*tasks)), kube.lists(INSTANCE_TYPES)

    answers, lists = run(scenario)
    assert answers == [frozenset({"c1.4", "g1.1"})] * 5
    assert lists == 1


def test_a_name_not_held_is_not_refused_while_the_cluster_cannot_be_read() -> None:
    """The copy cannot tell whether the name was added since: validation skips the check, and the
    operator checks the job's instance types itself. Names the copy holds are still checked."""

    async def scenario() -> tuple[frozenset[str] | None, frozenset[str] | None]:
        kube = FakeKube()
        catalog = InstanceTypeCatalog(cast(Kube, kube), min_refresh_interval=0)
        await catalog.names()
        kube.error = KubeError(503, "ServiceUnavailable", "etcd")
        return await catalog.names(["g1.1"]), await catalog.names(["c1.4"])

    unknown, known = run(scenario)
    assert unknown is None
    assert known == frozenset({"c1.4"})


# --- projects ------------------------------------------------------------------------------------


def test_while_namespaces_cannot_be_listed_requests_do_not_each_list_them(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The API server answered 503 (or RBAC refused the LIST): every request then made one more
    # LIST of the namespaces and logged one more WARNING (an API server in trouble got more load
    # with each call the API served: up to 500 a second).
    import logging

    monkeypatch.setattr(backoff_module.random, "random", lambda: 0.0)  # retry after 0.5 s

    async def scenario() -> tuple[int, list[ApiError | KubeError | None], int]:
        kube = FakeKube()
        index = ProjectIndex(cast(Kube, kube), max_age=0.0, min_refresh_interval=1.0)
        assert (await index.get("pa")) is not None
        index._loaded_at -= 2  # stale, past the interval
        kube.error = KubeError(503, "ServiceUnavailable", "etcd")
        told: list[ApiError | KubeError | None] = []
        for _ in range(50):  # known and unknown projects, at once
            await index.get("pa")
            try:
                await index.get("pb")
                told.append(None)
            except KubeError as exc:
                told.append(exc)
            await settle()
        during = kube.lists(namespaces_path())
        kube.error = None
        await asyncio.sleep(0.6)  # the retry is due
        assert (await index.get("pb")) is None  # listed again: none has it
        return during, told, kube.lists(namespaces_path())

    with caplog.at_level(logging.WARNING, logger="dsjobs"):
        during, told, after = run(scenario)
    assert during == 2  # the first load, and one failed try for all 100 requests
    assert all(isinstance(t, KubeError) and t.status == 503 for t in told)  # not "no such project"
    assert after == 3
    assert caplog.text.count("cannot refresh projects") <= 1


# --- locating a job the watch does not know -----------------------------------------------------


def test_a_burst_of_calls_for_an_unknown_job_id_costs_one_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_module, "LOCATE_MISS_TTL", 3600.0)

    async def scenario() -> tuple[list[list[str]], list[str]]:
        kube = FakeKube()
        index = JobIndex(cast(Kube, kube))
        tasks = await all_waiting(kube, *(index.locate(JOB) for _ in range(20)), expect=1)
        kube.gate.set()
        found = list(await asyncio.gather(*tasks))
        found += [await index.locate(JOB) for _ in range(20)]  # the miss is remembered
        return found, kube.job_lists()

    found, lists = run(scenario)
    assert found == [[]] * 40
    assert lists == [f"metadata.name={JOB}"]


def test_a_job_created_through_another_replica_is_found_once_the_miss_is_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cluster_module, "LOCATE_MISS_TTL", 0.0)

    async def scenario() -> tuple[list[str], list[str], int]:
        kube = FakeKube()
        index = JobIndex(cast(Kube, kube))
        before = await index.locate(JOB)
        kube.jobs.append(job(JOB))  # created through another replica, not in this one's watch yet
        after = await index.locate(JOB)
        await index.locate(JOB)  # found: known from now on, no LIST
        return before, after, len(kube.job_lists())

    before, after, lists = run(scenario)
    assert before == []
    assert after == ["team-a"]
    assert lists == 2


def test_callers_of_one_job_id_share_its_list_and_one_giving_up_does_not_end_it() -> None:
    async def scenario() -> tuple[list[str], bool, list[str]]:
        kube = FakeKube()
        kube.jobs.append(job(JOB))
        index = JobIndex(cast(Kube, kube))
        quitter, stayer = await all_waiting(kube, index.locate(JOB), index.locate(JOB), expect=1)
        quitter.cancel()
        await settle()
        kube.gate.set()
        found = await stayer
        return found, quitter.cancelled(), kube.job_lists()

    found, cancelled, lists = run(scenario)
    assert found == ["team-a"]
    assert cancelled
    assert lists == [f"metadata.name={JOB}"]


def test_lists_for_unknown_job_ids_run_a_few_at_once() -> None:
    ids = [f"{i}bcdefghijklmnopqrs" for i in range(10)]

    async def scenario() -> tuple[int, list[list[str]], int]:
        kube = FakeKube()
        index = JobIndex(cast(Kube, kube))
        tasks = await all_waiting(kube, *(index.locate(i) for i in ids), expect=MAX_LOCATE_LISTS)
        at_once = kube.waiting
        kube.gate.set()
        return at_once, list(await asyncio.gather(*tasks)), len(kube.job_lists())

    at_once, found, lists = run(scenario)
    assert at_once == MAX_LOCATE_LISTS
    assert found == [[]] * len(ids)
    assert lists == len(ids)  # the others waited their turn, none was refused


def test_a_lookup_whose_callers_all_gave_up_before_its_list_makes_none() -> None:
    # Callers with a tiny deadline once queued LISTs without end: a job just created elsewhere
    # then waited behind thousands of them.
    busy = [f"{i}bcdefghijklmnopqrs" for i in range(MAX_LOCATE_LISTS)]

    async def scenario() -> tuple[list[str], list[str]]:
        kube = FakeKube()
        index = JobIndex(cast(Kube, kube))
        slots = await all_waiting(kube, *(index.locate(i) for i in busy), expect=MAX_LOCATE_LISTS)
        quitters = [asyncio.ensure_future(index.locate(JOB)) for _ in range(3)]
        await settle()
        for q in quitters:
            q.cancel()
        await settle()
        kube.jobs.append(job(OTHER))
        wanted = asyncio.ensure_future(index.locate(OTHER))
        kube.gate.set()
        await asyncio.gather(*slots)
        return await wanted, kube.job_lists()

    found, lists = run(scenario)
    assert found == ["team-a"]
    assert f"metadata.name={JOB}" not in lists
    assert lists == [f"metadata.name={i}" for i in [*busy, OTHER]]


def test_a_miss_is_believed_for_its_time_from_when_its_list_began(monkeypatch: pytest.MonkeyPatch) -> None:
    # The misses are kept in the order their LISTs ended: a slow one behind a fast one.
    clock = [100.0]
    monkeypatch.setattr(cluster_module.time, "monotonic", lambda: clock[0])
    index = JobIndex(cast(Kube, FakeKube()))
    index._misses[JOB] = 97.0  # began at 97, ended last
    index._misses[OTHER] = 99.5
    index._misses.move_to_end(JOB)
    assert index._missed_lately(OTHER)
    assert not index._missed_lately(JOB)


def test_a_failed_list_is_told_to_every_caller_and_not_remembered() -> None:
    async def scenario() -> tuple[list[BaseException | list[str]], list[str], int]:
        kube = FakeKube()
        kube.error = KubeError(503, "ServiceUnavailable", "etcd")
        index = JobIndex(cast(Kube, kube))
        tasks = await all_waiting(kube, index.locate(JOB), index.locate(JOB), expect=1)
        kube.gate.set()
        failed = list(await asyncio.gather(*tasks, return_exceptions=True))
        kube.error = None
        kube.jobs.append(job(JOB))
        return failed, await index.locate(JOB), len(kube.job_lists())

    failed, found, lists = run(scenario)
    assert [type(f) for f in failed] == [KubeError, KubeError]
    assert found == ["team-a"]
    assert lists == 2


def test_gets_of_random_job_ids_by_a_caller_without_rights_cost_one_list_each_per_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through Core: the lookup comes before any authorization (the project is unknown until the
    job is found), so this is what any authenticated caller can make the API do."""
    monkeypatch.setattr(cluster_module, "LOCATE_MISS_TTL", 3600.0)

    async def review_token(token: str) -> auth.Identity:
        return auth.Identity(token)

    async def nobody(who: auth.Identity, verb: auth.Verb, namespace: str, project: str) -> auth.Decision:
        return auth.Decision(False, "no RBAC rule")

    class Ctx:
        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("authorization", "Bearer eve")]

    async def scenario() -> tuple[set[grpc.StatusCode], list[str]]:
        kube = FakeKube()
        k = cast(Kube, kube)
        core = Core(
            Settings(),
            k,
            cast(Any, MemoryStore()),
            auth.Authenticator(review_token, nobody),
            ProjectIndex(k),
            JobIndex(k),
            InstanceTypeCatalog(k),
        )
        codes: set[grpc.StatusCode] = set()
        for job_id in [JOB, OTHER] * 25:
            with pytest.raises(ApiError) as info:
                await core.authorized_job(cast(Any, Ctx()), job_id, auth.Verb.GET)
            codes.add(info.value.code)
        return codes, kube.job_lists()

    codes, lists = run(scenario)
    assert codes == {grpc.StatusCode.NOT_FOUND}
    assert lists == [f"metadata.name={JOB}", f"metadata.name={OTHER}"]


def test_a_relist_keeps_what_this_replica_wrote_meanwhile() -> None:
    """A replica reads its own writes: an Execute answered at resourceVersion 7 while the index
    relisted (a snapshot at 5) was undone by the snapshot until the watch caught up, and a job
    deleted through this replica meanwhile came back."""

    def entry(version: int) -> tuple[int, bytes]:
        return version, f"v{version}".encode()

    listed = {("ns", "executed"): entry(5), ("ns", "deleted"): entry(4), ("ns", "kept"): entry(3)}
    current = {
        ("ns", "executed"): entry(7),  # written through this replica during the LIST
        ("ns", "created"): entry(8),  # created after the snapshot
        ("ns", "stale"): entry(2),  # deleted while the watch was away: not listed
        ("ns", "kept"): entry(3),
    }
    after = cluster_module.relisted(listed, 6, current, {("ns", "deleted"): 6})
    assert after == {("ns", "executed"): entry(7), ("ns", "created"): entry(8), ("ns", "kept"): entry(3)}
    # The snapshot's version unknown: what it lacks cannot be told new from deleted; it goes.
    assert ("ns", "created") not in cluster_module.relisted(listed, 0, current, {})


def _versioned(version: int, phase: str) -> dict[str, Any]:
    body = job(JOB)
    body["metadata"]["resourceVersion"] = str(version)
    body["status"] = {"phase": phase}
    return body


def _index_against(
    answer_watch: str, check: Callable[[JobIndex, list[str]], bool], answered: list[float] | None = None
) -> tuple[list[str], list[str], list[bool]]:
    """A real JobIndex and Kube client against an HTTP server whose LIST holds the job at
    version 5 and whose watches `answer_watch`: "one event" (then the connection goes dark),
    "one big event" (a job of 1.4 MiB, then dark), "headers only" (then dark), "nothing" (not
    even headers). Runs until `check(index, lists)`
    (a hang guard of 10 s); the watches' resourceVersions, the LISTs made, and whether the index
    said it was in sync as each LIST came."""
    from aiohttp import web

    from dsjobs.kubeconfig import KubeConfig

    watches: list[str] = []
    lists: list[str] = []
    list_times: list[float] = []
    synced_at_list: list[bool] = []
    indexes: list[JobIndex] = []
    done = asyncio.Event()

    async def jobs(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            lists.append(request.query_string)
            list_times.append(time.monotonic())
            synced_at_list.append(indexes[0].synced.is_set())
            return web.json_response(
                {"items": [_versioned(5, "CREATING")], "metadata": {"resourceVersion": "5"}}
            )
        watches.append(request.query["resourceVersion"])
        if answer_watch == "forbidden":
            return web.json_response({"kind": "Status", "code": 403, "reason": "Forbidden"}, status=403)
        resp = web.StreamResponse()
        if answer_watch != "nothing":
            await resp.prepare(request)
        if answer_watch == "ends at once":
            return resp
        if answer_watch == "gone":
            gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
            await resp.write(json.dumps(gone).encode() + b"\n")
            return resp
        if answer_watch in ("one event", "one big event"):
            phase = "EXECUTING" if len(watches) == 1 else "SUCCESS"
            event = {"type": "MODIFIED", "object": _versioned(5 + len(watches), phase)}
            if answer_watch == "one big event":
                event["object"]["spec"]["config"] = "x" * (1400 * 1024)
            data = json.dumps(event).encode() + b"\n"
            for at in range(0, len(data), 100_000):  # as a TCP stream: in pieces
                await resp.write(data[at : at + 100_000])
        await done.wait()  # nothing more: the connection went dark
        return resp

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get(jobs_path(), jobs)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        kube = Kube(KubeConfig(f"http://127.0.0.1:{port}", None, None, None, False, None))
        await kube.start()
        index = JobIndex(kube)
        indexes.append(index)
        index.start()
        try:
            for _ in range(200):
                if check(index, lists):
                    break
                await asyncio.sleep(0.05)
            assert check(index, lists), (watches, lists)
        finally:
            await index.stop()
            await kube.close()
            done.set()
            await runner.cleanup()

    asyncio.run(scenario())
    if answered is not None:
        answered.extend(list_times)
    return watches, lists, synced_at_list


def test_a_watch_gone_silent_is_watched_again_from_where_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that goes dark (a vanished API server instance, a dropped conntrack entry) is
    no longer trusted for the server's 300 s timeout: the API server sends a BOOKMARK every minute,
    so silence past WATCH_IDLE_SECONDS means a new watch from the last version, no relist."""
    monkeypatch.setattr(cluster_module, "WATCH_IDLE_SECONDS", 0.3)

    def succeeded(index: JobIndex, lists: list[str]) -> bool:
        cached = index.cached("team-a", JOB)
        return cached is not None and cached["status"]["phase"] == "SUCCESS" and index.synced.is_set()

    watches, lists, _ = _index_against("one event", succeeded)
    assert watches[:2] == ["5", "6"] and len(lists) == 1


def test_a_watch_event_of_a_job_past_half_a_mebibyte_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's line reader refuses lines past 512 KiB: each event of such a job (valid: the spec
    may be 896 KiB) failed the watch, and the index listed every job again."""
    monkeypatch.setattr(cluster_module, "WATCH_IDLE_SECONDS", 0.3)

    def succeeded(index: JobIndex, lists: list[str]) -> bool:
        cached = index.cached("team-a", JOB)
        return cached is not None and cached["status"]["phase"] == "SUCCESS"

    watches, lists, _ = _index_against("one big event", succeeded)
    assert watches[:2] == ["5", "6"] and len(lists) == 1


@pytest.mark.parametrize("answer", ["headers only", "nothing"])
def test_a_watch_the_server_never_serves_puts_the_index_out_of_sync(
    monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    # Watched again and again (no headers ever, or headers and then silence each time), the index
    # said it was in sync for good while serving what it last saw: now it lists again, reads
    # meanwhile going to the cluster.
    monkeypatch.setattr(cluster_module, "WATCH_IDLE_SECONDS", 0.2)
    monkeypatch.setattr(backoff_module.random, "random", lambda: 0.0)  # the shortest retry delay
    _, _, synced_at_list = _index_against(answer, lambda index, lists: len(lists) >= 2)
    assert synced_at_list[:2] == [False, False]  # the second LIST: no longer in sync, not in sync yet


def test_a_watch_that_ends_at_once_is_not_watched_again_and_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # Something between the API and the API server (a proxy) answered each watch and ended it at
    # once: the index watched again at once, some 3,000 watches a second at a full core, logging
    # nothing and saying it was in sync. Twice in a row: out of sync, relisted with back-off.
    monkeypatch.setattr(backoff_module.random, "random", lambda: 0.0)  # the shortest retry delay
    watches, lists, synced_at_list = _index_against("ends at once", lambda index, lists: len(lists) >= 3)
    assert len(watches) <= 2 * len(lists)
    assert synced_at_list[1:3] == [False, False]


@pytest.mark.parametrize("answer", ["gone", "forbidden"])
def test_a_watch_failing_each_time_relists_with_back_off(
    monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    # Each watch answered 410 (relisted at once, every time) or refused while LISTs worked (the
    # back-off was reset by each LIST): every replica listed all the cluster's jobs in a loop.
    monkeypatch.setattr(backoff_module.random, "random", lambda: 0.0)  # waits of 0.5, 1, 2 s
    times: list[float] = []
    _index_against(answer, lambda index, lists: len(lists) >= 4, times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[1] >= 0.9 and gaps[2] >= 1.9, gaps  # doubling (a sleep never ends early)
