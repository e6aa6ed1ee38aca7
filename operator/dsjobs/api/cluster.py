"""What the API looks up in the cluster on almost every call: projects, where a job lives, instance types.

These are caches of cluster state, never state of their own: a miss always falls back to asking
the cluster, so a replica that just started (or one that has not seen a new job yet) answers the
same as any other.

- `ProjectIndex`: project id -> namespace (namespaces labelled `dsjobs.dev/project-id`), refreshed
  every 30 s and on a miss (at most once a second).
- `JobIndex`: job id -> namespace, plus a cache of the jobs. Requests name a job by id only
  (GetProjectJobRequest has no project), so the index follows a watch of all ProjectJobs; a miss
  asks the cluster with a `metadata.name` field selector (one LIST per id at a time, a few at once
  in all, and a miss remembered for a second).
- `InstanceTypeCatalog`: names of the cluster's InstanceTypes for validation, refreshed every 30 s
  and when asked about a name it does not hold (at most once a second).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

from dsjobs.api import metrics
from dsjobs.api.errors import KubeError
from dsjobs.api.kube import Kube, WatchIdle, jobs_path, namespaces_path
from dsjobs.backoff import Backoff
from dsjobs.controller.names import PROJECT_LABEL, project_holder
from dsjobs.kubemetrics import WATCH_IDLE_SECONDS
from dsjobs.models import GROUP, INSTANCETYPE_PLURAL, VERSION
from dsjobs.validation.instancetype import read_instance_type

log = logging.getLogger(__name__)

PROJECT_NAME_ANNOTATION = "dsjobs.dev/project-name"
PROJECT_DESCRIPTION_ANNOTATION = "dsjobs.dev/project-description"
COMMUNITY_ANNOTATION = "dsjobs.dev/community-id"
# Deleted jobs remembered to keep late reads from bringing them back (a few MiB at most).
MAX_TOMBSTONES = 10_000
# A job id the watch does not know is looked up with a cluster-wide LIST, before the caller can be
# authorized (its project is unknown until then), so any authenticated caller can ask for ids that
# do not exist. Such a LIST (the API server goes through every ProjectJob for it) runs once per id at
# a time, MAX_LOCATE_LISTS at once in all, and what it did not find is believed for LOCATE_MISS_TTL.
#
# The LIST stays because a job just created through another replica may not have reached this
# one's watch. Its miss is believed for a second from when the LIST began, so a job created after
# that is found by calls a second later; the official CLI asks about a job after its Create (or
# Execute) was answered and then polls every 5 s, so at worst one of its polls reads the cluster
# again.
LOCATE_MISS_TTL = 1.0
MAX_LOCATE_LISTS = 4
MAX_LOCATE_MISSES = 10_000
#: A watch that lasted this long proves the way to the API server works: the relists' back-off
#: starts anew at the next failure.
HEALTHY_WATCH_SECONDS = 60.0
#: A watch that ends before this without any event (not even a BOOKMARK) ended at once.
MIN_WATCH_SECONDS = 1.0


@dataclass(frozen=True)
class ProjectInfo:
    project_id: str
    namespace: str
    obj: Mapping[str, Any]  # the Namespace


class ProjectIndex:
    """Project id <-> namespace, from the labelled namespaces.

    Entries older than `max_age` are still served while one background LIST refreshes them, so a
    refresh never stalls the requests that arrive meanwhile (at 500 requests/s a 100 ms LIST
    held behind a lock put every one of them in the tail). Only a miss (a project or namespace not
    seen yet, e.g. created a moment ago) waits for a LIST, at most one per `min_refresh_interval`.
    """

    def __init__(self, kube: Kube, *, max_age: float = 30.0, min_refresh_interval: float = 1.0) -> None:
        self._kube = kube
        self._by_id: dict[str, ProjectInfo] = {}
        self._by_namespace: dict[str, str] = {}
        self._loaded_at = float("-inf")
        self._max_age = max_age
        self._min_interval = min_refresh_interval
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        # While LISTs fail: when the last was tried, how long until the next, and its error (what
        # a request that needs a LIST meanwhile is told: an API server in trouble got one more
        # LIST, and the log one more line, for every request).
        self._tried_at = float("-inf")
        self._retry_after = 0.0
        self._failure: KubeError | None = None
        self._retries = Backoff(first=min_refresh_interval, cap=30.0)

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            now = time.monotonic()
            age = now - self._loaded_at
            if age < self._min_interval or (not force and age < self._max_age):
                return
            if self._failure is not None and now - self._tried_at < self._retry_after:
                if force or self._loaded_at == float("-inf"):
                    raise dataclasses.replace(self._failure)  # a copy: awaited by many at once
                return
            self._tried_at = now
            try:
                result = await self._kube.request(
                    "GET", namespaces_path(), params={"labelSelector": PROJECT_LABEL}
                )
            except KubeError as exc:
                self._failure, self._retry_after = exc, self._retries.next_wait()
                raise
            self._failure = None
            self._retries.reset()
            by_id: dict[str, ProjectInfo] = {}
            for ns in result.get("items") or []:
                meta = ns.get("metadata") or {}
                pid = (meta.get("labels") or {}).get(PROJECT_LABEL)
                name = meta.get("name")
                # Two namespaces claiming one project: the operator's rule decides (project_holder).
                if pid and name and (pid not in by_id or project_holder([ns, by_id[pid].obj]) == name):
                    by_id[pid] = ProjectInfo(pid, name, ns)
            self._by_id = by_id
            self._by_namespace = {p.namespace: p.project_id for p in by_id.values()}
            self._loaded_at = time.monotonic()

    async def _fresh_enough(self) -> None:
        """Load once (waiting); afterwards, refresh stale entries in the background."""
        age = time.monotonic() - self._loaded_at
        if age < self._max_age:
            return
        if self._loaded_at == float("-inf"):
            await self._refresh(force=False)
        elif self._background is None or self._background.done():
            self._background = asyncio.create_task(self._refresh_quietly(), name="project-index")

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh(force=False)
        except KubeError as exc:
            log.warning(
                "cannot refresh projects (serving the ones known; tried again in %.0fs): %s",
                self._retry_after,
                exc,
            )

    async def get(self, project_id: str) -> ProjectInfo | None:
        await self._fresh_enough()
        info = self._by_id.get(project_id)
        if info is None:
            await self._refresh(force=True)
            info = self._by_id.get(project_id)
        return info

    async def all(self) -> list[ProjectInfo]:
        await self._refresh(force=False)
        return sorted(self._by_id.values(), key=lambda p: p.project_id)

    async def project_of_namespace(self, namespace: str) -> str | None:
        await self._fresh_enough()
        project_id = self._by_namespace.get(namespace)
        if project_id is None:
            await self._refresh(force=True)
            project_id = self._by_namespace.get(namespace)
        return project_id


class JobIndex:
    """job id (ProjectJob name) -> namespace, and a cache of the jobs themselves.

    Fed by one cluster-wide watch. Reads that may be a moment old (Get, OperationService.Get, a log
    stream noticing that its job ended) are served from here when the watch is in sync; writes
    always start from a fresh read, and what a write returns is put here at once, so a replica reads
    its own writes. Objects are kept as JSON bytes (a few KiB each; 10k jobs stay in tens of MiB)
    and parsed on use.
    """

    def __init__(self, kube: Kube) -> None:
        self._kube = kube
        self._where: dict[str, set[str]] = {}
        self._objects: dict[tuple[str, str], tuple[int, bytes]] = {}
        # Deleted jobs by the resourceVersion of their deletion: a read that began before the
        # deletion and answers after the watch told it must not bring the job back.
        self._deleted: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One event per job someone waits on (log streams); set and dropped at the job's next change,
        # or dropped with the last stream that held it.
        self._changes: weakref.WeakValueDictionary[tuple[str, str], asyncio.Event] = (
            weakref.WeakValueDictionary()
        )
        # Lookups of ids the watch does not know (see LOCATE_MISS_TTL): the one running per id, and
        # when the last LIST of each id found nowhere began (oldest first).
        self._lookups: dict[str, asyncio.Task[list[str]]] = {}
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._lists = asyncio.Semaphore(MAX_LOCATE_LISTS)
        # Callers waiting for each lookup, and the ids whose LIST is under way.
        self._waiting: dict[str, int] = {}
        self._listing: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-index")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def put(self, name: str, namespace: str) -> None:
        self._where.setdefault(name, set()).add(namespace)

    def next_change(self, namespace: str, name: str) -> asyncio.Event:
        """An event set when the job is next seen changed (or deleted); get it before reading the job."""
        event = self._changes.get((namespace, name))
        if event is None:
            event = self._changes[(namespace, name)] = asyncio.Event()
        return event

    def _changed(self, namespace: str, name: str) -> None:
        event = self._changes.pop((namespace, name), None)
        if event is not None:
            event.set()

    def remember(self, obj: Mapping[str, Any]) -> None:
        """Cache an object read or written just now (unless the cache already has a newer one)."""
        meta = obj.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
        if not name or not namespace:
            return
        version = _version(meta)
        tombstone = self._deleted.get((namespace, name))
        if tombstone is not None:
            if version <= tombstone:
                return
            del self._deleted[(namespace, name)]  # a new job of the same name
        current = self._objects.get((namespace, name))
        if current is None or version > current[0]:
            self._changed(namespace, name)
        if current is None or version >= current[0]:
            self._objects[(namespace, name)] = (version, json.dumps(obj, separators=(",", ":")).encode())
        self.put(name, namespace)

    def forget(self, name: str, namespace: str, deleted_version: int = 0) -> None:
        """Drop a job; `deleted_version` (of the watch's DELETED event) keeps older reads out."""
        if deleted_version:
            self._deleted[(namespace, name)] = deleted_version
            self._deleted.move_to_end((namespace, name))
            while len(self._deleted) > MAX_TOMBSTONES:
                self._deleted.popitem(last=False)
        self._changed(namespace, name)
        self._objects.pop((namespace, name), None)
        spaces = self._where.get(name)
        if spaces is not None:
            spaces.discard(namespace)
            if not spaces:
                del self._where[name]

    def cached(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The cached object, only while the watch is in sync (else the caller reads the cluster)."""
        if not self.synced.is_set():
            return None
        item = self._objects.get((namespace, name))
        return None if item is None else cast(dict[str, Any], json.loads(item[1]))

    def __len__(self) -> int:
        return len(self._where)

    async def locate(self, name: str) -> list[str]:
        """The namespaces that have a job of this name (sorted; usually one).

        Ids the API makes are unique; hand-applied jobs may share a name across namespaces, so the
        caller picks among them (Core.authorized_job: the one of a project it may use)."""
        spaces = self._where.get(name)
        if spaces:
            return sorted(spaces)
        if self._missed_lately(name):
            return []
        lookup = self._lookups.get(name)
        if lookup is None:
            lookup = self._lookups[name] = asyncio.create_task(self._look_up(name), name=f"locate {name}")
            lookup.add_done_callback(lambda task: self._lookup_done(name, task))
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            # Shielded: one caller giving up must not cancel the LIST the others wait for.
            return list(await asyncio.shield(lookup))
        finally:
            left = self._waiting.pop(name) - 1
            if left:
                self._waiting[name] = left
            elif not lookup.done() and name not in self._listing:
                # Nobody waits for it any more and its LIST has not begun: callers that give up at
                # once (a short deadline) would otherwise queue LISTs without end, and the lookup
                # of a job just created elsewhere would wait behind them.
                lookup.cancel()

    def _missed_lately(self, name: str) -> bool:
        now = time.monotonic()
        while self._misses and next(iter(self._misses.values())) <= now - LOCATE_MISS_TTL:
            self._misses.popitem(last=False)
        # By the LIST's own start: the entries are in the order the LISTs ended.
        return self._misses.get(name, -math.inf) > now - LOCATE_MISS_TTL

    def _lookup_done(self, name: str, task: asyncio.Task[list[str]]) -> None:
        if self._lookups.get(name) is task:
            del self._lookups[name]
        if not task.cancelled():
            task.exception()  # retrieved: its callers (if any still wait) were told

    async def _look_up(self, name: str) -> list[str]:
        async with self._lists:
            spaces = self._where.get(name)
            if spaces:  # the watch brought it while this waited for its turn
                return sorted(spaces)
            began = time.monotonic()
            self._listing.add(name)
            try:
                result = await self._kube.request(
                    "GET", jobs_path(), params={"fieldSelector": f"metadata.name={name}", "limit": 10}
                )
            finally:
                self._listing.discard(name)
        items = result.get("items") or []
        for item in items:
            self.remember(item)
        if not items:
            self._misses[name] = began
            self._misses.move_to_end(name)
            while len(self._misses) > MAX_LOCATE_MISSES:
                self._misses.popitem(last=False)
        return sorted({str((i.get("metadata") or {}).get("namespace", "")) for i in items})

    async def _run(self) -> None:
        # Reset only by a watch that lasted (a LIST that works proves nothing of the watch: one
        # refused or throttled each time made a full relist of the cluster's jobs every second).
        relists = Backoff(first=1.0, cap=30.0)
        while True:
            watching_since: float | None = None
            try:
                version = await self._list()
                self.synced.set()
                metrics.JOB_INDEX_SYNCED.set(1)
                watching_since = time.monotonic()
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.synced.clear()
                metrics.JOB_INDEX_SYNCED.set(0)
                if watching_since is not None and time.monotonic() - watching_since >= HEALTHY_WATCH_SECONDS:
                    relists.reset()
                if isinstance(exc, KubeError) and exc.status == 410 and relists.failures == 0:
                    # Our resourceVersion is too old (compacted): relist at once; a 410 again
                    # right after that waits like any failure.
                    relists.next_wait()
                    continue
                delay = relists.next_wait()
                if isinstance(exc, KubeError):
                    log.warning("job index: %s; retrying in %.0fs", exc, delay)
                else:
                    log.exception("job index failed; retrying in %.0fs", delay)
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        objects: dict[tuple[str, str], tuple[int, bytes]] = {}
        cont = ""
        while True:
            params: dict[str, str | int] = {"limit": 500}
            if cont:
                params["continue"] = cont
            result = await self._kube.request("GET", jobs_path(), params=params, timeout=120)
            for item in result.get("items") or []:
                meta = item.get("metadata") or {}
                key = (str(meta.get("namespace")), str(meta.get("name")))
                objects[key] = (_version(meta), json.dumps(item, separators=(",", ":")).encode())
            cont = str((result.get("metadata") or {}).get("continue") or "")
            if not cont:
                listed_at = _version(result.get("metadata") or {})
                self._objects = relisted(objects, listed_at, self._objects, self._deleted)
                self._where = {}
                for namespace, name in self._objects:
                    self._where.setdefault(name, set()).add(namespace)
                # What changed while the watch was down is unknown: every waiter looks again.
                changes, self._changes = self._changes, weakref.WeakValueDictionary()
                for event in list(changes.values()):
                    event.set()
                return str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, version: str) -> None:
        silent = False  # the last watch went silent before any event came
        empty = False  # the last watch ended at once without any event
        while True:
            params: dict[str, str | int] = {
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": 300,
            }
            started, events = time.monotonic(), 0
            try:
                async for event in self._kube.watch(
                    jobs_path(), params=params, idle_seconds=WATCH_IDLE_SECONDS
                ):
                    events += 1
                    kind = event.get("type")
                    obj = event.get("object") or {}
                    meta = obj.get("metadata") or {}
                    if kind == "ERROR":
                        raise KubeError(
                            int(obj.get("code") or 500),
                            str(obj.get("reason", "")),
                            str(obj.get("message", "")),
                        )
                    version = str(meta.get("resourceVersion") or version)
                    silent = False
                    if kind in ("ADDED", "MODIFIED"):
                        self.remember(obj)
                    elif kind == "DELETED":
                        self.forget(str(meta.get("name")), str(meta.get("namespace")), _version(meta))
            except WatchIdle:
                if silent:
                    # Twice in a row, not one event between: the API server is not serving the
                    # watch. Out of sync (reads go to the cluster) until a relist works.
                    raise
                silent = True
                # A new connection from where this one went silent; a 410 then relists.
                log.debug("job index: the watch was silent for %.0fs; watching again", WATCH_IDLE_SECONDS)
                continue
            if events or time.monotonic() - started >= MIN_WATCH_SECONDS:
                empty = False
                continue
            if empty:
                # Twice in a row (something between us and the API server ends each watch at once,
                # e.g. a proxy): watching again at once would spin; out of sync, relisted with back-off.
                raise KubeError(0, "Unavailable", "the watch ended at once without an event, twice in a row")
            empty = True


Cached = dict[tuple[str, str], tuple[int, bytes]]


def relisted(
    listed: Cached, listed_at: int, current: Cached, deleted: Mapping[tuple[str, str], int]
) -> Cached:
    """The index after a relist: the LIST's snapshot (at resourceVersion `listed_at`, 0 if not
    known), but not older than what this replica wrote or read meanwhile, which its readers have
    seen (a replica reads its own writes): a job `current` holds newer than the snapshot's, or
    written after the snapshot and so not in it, stays; one deleted since the snapshot's version
    of it (a tombstone) goes. The rest of `current` goes: deleted while the watch was away."""
    out = dict(listed)
    for key, (version, body) in current.items():
        seen = listed.get(key)
        if (seen is not None and version > seen[0]) or (seen is None and listed_at and version > listed_at):
            out[key] = (version, body)
    for key, version in deleted.items():
        item = out.get(key)
        if item is not None and item[0] <= version:
            del out[key]
    return out


def _version(meta: Mapping[str, Any]) -> int:
    # resourceVersions are opaque, but etcd-backed ones are increasing integers; anything else
    # sorts as 0 and is simply replaced by the next write.
    try:
        return int(str(meta.get("resourceVersion", "0")))
    except ValueError:
        return 0


class InstanceTypeCatalog:
    """Names of the cluster's InstanceTypes, for validating the jobs of Create and Clone: the valid
    ones, and what is wrong with each invalid one (the operator's check: it would fail a job
    naming one, after its inputs were uploaded).

    Refreshed when older than `max_age`, and when asked about a name it does not hold (an admin may
    have just added that InstanceType: every replica must then take it, not only those whose copy
    happens to be newer), at most once per `min_refresh_interval`; askers meanwhile share that LIST.
    """

    def __init__(self, kube: Kube, *, max_age: float = 30.0, min_refresh_interval: float = 1.0) -> None:
        self._kube = kube
        self._names: frozenset[str] | None = None  # every InstanceType's, valid or not
        self._invalid: dict[str, str] = {}
        self._loaded_at = float("-inf")
        self._tried_at = float("-inf")
        self._max_age = max_age
        self._min_interval = min_refresh_interval
        self._lock = asyncio.Lock()

    async def names(self, wanted: Collection[str] = ()) -> frozenset[str] | None:
        """The valid InstanceTypes' names, or None when they cannot be read (then validation skips
        the check, and the operator checks the job's types itself). `invalid()` tells the others.

        `wanted`: the names the caller is about to check; one not held makes this read the cluster
        again (unless it did within `min_refresh_interval`)."""
        names = self._valid()
        fresh = time.monotonic() - self._loaded_at < self._max_age
        # An invalid type asked for is read again too: an admin may have just fixed it.
        if fresh and names is not None and names.issuperset(wanted):
            return names
        async with self._lock:
            if time.monotonic() - self._tried_at >= self._min_interval:
                await self._refresh()
            return self._answer(wanted)

    async def _refresh(self) -> None:
        try:
            result = await self._kube.request("GET", f"/apis/{GROUP}/{VERSION}/{INSTANCETYPE_PLURAL}")
        except KubeError as exc:
            log.warning("cannot list instance types: %s", exc)
            self._tried_at = time.monotonic()
            return
        problems = {
            str((i.get("metadata") or {}).get("name")): read_instance_type(i)[1]
            for i in result.get("items") or []
        }
        self._names = frozenset(problems)
        self._invalid = {name: problem for name, problem in problems.items() if problem}
        self._loaded_at = self._tried_at = time.monotonic()

    def _valid(self) -> frozenset[str] | None:
        return None if self._names is None else self._names - self._invalid.keys()

    def _answer(self, wanted: Collection[str]) -> frozenset[str] | None:
        names = self._valid()
        failed = self._tried_at > self._loaded_at  # the last LIST did not answer
        if names is not None and failed and not names.issuperset(wanted):
            return None  # the cluster cannot say whether the name is new (or fixed): the operator judges
        return names

    def invalid(self) -> dict[str, str]:
        """What is wrong with each InstanceType of the last `names()` left out of it."""
        return dict(self._invalid)
