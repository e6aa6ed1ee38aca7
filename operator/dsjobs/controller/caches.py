"""In-memory views of the cluster fed by the watches: job pods (as PodViews) and InstanceTypes.

Why not Kopf indexes: Kopf makes every object's handler wait until all indexes are filled, and it
does so with one shared condition that wakes every waiting worker whenever any indexed object is
done. At start-up with N jobs that is O(N x indexed objects) wake-ups; with 10k jobs the operator
spent minutes doing nothing else. These caches are filled by the watch handlers plus one paginated
LIST each at start (`seed`), and reconciles wait for that LIST (a single asyncio.Event): the same
guarantee (a restarted operator sees the pods it made before deciding anything) at O(N).

Events and the LIST may arrive in any order; the newest resourceVersion wins, and pods deleted
while the LIST was in flight are remembered (tombstones) so that the LIST does not revive them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from dsjobs.controller import metrics
from dsjobs.controller.names import JOB_LABEL
from dsjobs.controller.podview import PodView
from dsjobs.models import InstanceTypeSpec
from dsjobs.validation.instancetype import read_instance_type

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, job name)


def revision(body: Mapping[str, Any]) -> int:
    """resourceVersion as a number (etcd revision); -1 when it is not one."""
    value = str((body.get("metadata") or {}).get("resourceVersion", ""))
    return int(value) if value.isdigit() else -1


def job_key_of_pod(body: Mapping[str, Any]) -> Key | None:
    meta = body.get("metadata") or {}
    job = (meta.get("labels") or {}).get(JOB_LABEL)
    return (str(meta.get("namespace", "")), str(job)) if job else None


class PodCache:
    """The pods of every job, by job."""

    def __init__(self) -> None:
        self._by_job: dict[Key, dict[str, tuple[int, PodView]]] = {}
        self._tombstones: set[str] | None = set()  # None once seeded: no LIST can revive a pod then

    def apply(self, body: Mapping[str, Any], *, deleted: bool) -> tuple[Key, PodView] | None:
        """Take a watch event; returns the job and the pod's view (gone=True when deleted)."""
        key = job_key_of_pod(body)
        if key is None:
            return None
        view = PodView.from_pod(body, gone=deleted)
        pods = self._by_job.get(key)
        if deleted:
            if pods is not None:
                pods.pop(view.name, None)
                if not pods:
                    del self._by_job[key]
            if self._tombstones is not None and view.uid:
                self._tombstones.add(view.uid)
            return key, view
        rev = revision(body)
        if pods is None:
            pods = self._by_job[key] = {}
        old = pods.get(view.name)
        if old is None or rev < 0 or rev >= old[0] or old[1].uid != view.uid:
            pods[view.name] = (rev, view)
        return key, view

    def keep(self, key: Key, body: Mapping[str, Any]) -> PodView:
        """Hold a job's pod as read by name, whatever its labels say now (`Operator._unlabelled`)."""
        view = PodView.from_pod(body)
        self._by_job.setdefault(key, {})[view.name] = (revision(body), view)
        return view

    def seed(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Add what a LIST returned, unless the watch already knows better."""
        tombstones = self._tombstones or set()
        for body in items:
            meta = body.get("metadata") or {}
            if meta.get("uid") in tombstones:
                continue
            key = job_key_of_pod(body)
            if key is None:
                continue
            name = str(meta.get("name", ""))
            pods = self._by_job.setdefault(key, {})
            if name not in pods:
                pods[name] = (revision(body), PodView.from_pod(body))

    def seeded(self) -> None:
        self._tombstones = None

    def snapshot(self) -> dict[tuple[Key, str], tuple[int, PodView]]:
        """Every cached pod's entry, for `vanished` after a LIST."""
        return {(key, name): entry for key, pods in self._by_job.items() for name, entry in pods.items()}

    def vanished(
        self, before: Mapping[tuple[Key, str], tuple[int, PodView]], listed_uids: Collection[str]
    ) -> list[tuple[Key, PodView]]:
        """Drop the pods cached `before` a LIST that it did not return and that no event touched
        since: deleted while the watch was away. A watch that resumes with 410 Gone is re-listed
        by Kopf, which tells what exists, not what went; without this, such a pod would stay
        "running" here for ever and its job with it. Returns them (gone=True)."""
        out: list[tuple[Key, PodView]] = []
        for (key, name), entry in before.items():
            pods = self._by_job.get(key)
            if entry[1].uid in listed_uids or pods is None or pods.get(name) is not entry:
                continue
            del pods[name]
            if not pods:
                del self._by_job[key]
            out.append((key, dataclasses.replace(entry[1], gone=True)))
        return out

    def waiting_on(self, instance_type: str) -> list[Key]:
        """The jobs with a pod of this instance type that no node took yet."""
        return [
            key
            for key, pods in self._by_job.items()
            if any(v.instance_type == instance_type and v.alive and not v.scheduled for _, v in pods.values())
        ]

    def get(self, key: Key) -> list[PodView]:
        return [view for _, view in (self._by_job.get(key) or {}).values()]

    def __len__(self) -> int:
        return sum(len(p) for p in self._by_job.values())


class InstanceTypeCache:
    """The InstanceType catalog by name; invalid ones are left out of it, with what is wrong."""

    def __init__(self) -> None:
        self._types: dict[str, tuple[int, InstanceTypeSpec | None, str]] = {}
        # Counted at each scrape from the cache itself (the operator makes one cache), in
        # prometheus_client's thread while the event loop changes the dict: from a copy of its
        # values (one C-level step under the GIL), never by iterating the dict itself.
        metrics.INSTANCE_TYPES_INVALID.set_function(
            lambda: sum(1 for _, spec, _ in list(self._types.values()) if spec is None)
        )

    def apply(self, body: Mapping[str, Any], *, deleted: bool) -> bool:
        """Take a watch event; True when it changed the type (not the echo of what a LIST or an
        earlier event already gave)."""
        name = str((body.get("metadata") or {}).get("name", ""))
        if deleted:
            return self._types.pop(name, None) is not None
        rev = revision(body)
        old = self._types.get(name)
        if old is None or rev < 0 or rev >= old[0]:
            self._store(name, rev, body)
            return old is None or rev != old[0]
        return False

    def seed(self, items: Iterable[Mapping[str, Any]]) -> None:
        for body in items:
            name = str((body.get("metadata") or {}).get("name", ""))
            if name not in self._types:
                self._store(name, revision(body), body)

    def snapshot(self) -> dict[str, int]:
        """Name -> revision of every type known now (before a LIST, for `vanished`)."""
        return {name: rev for name, (rev, _, _) in self._types.items()}

    def drop_vanished(self, before: Mapping[str, int], listed: Iterable[str]) -> list[str]:
        """Forget the types known at `before` that a LIST begun after it did not return and that
        no event changed since: deleted while the watch was away (a resume with 410 Gone lists
        again, which tells no deletion). Returns their names."""
        names = set(listed)
        gone = [
            name
            for name, rev in before.items()
            if name not in names and name in self._types and self._types[name][0] == rev
        ]
        for name in gone:
            del self._types[name]
        return gone

    def _store(self, name: str, rev: int, body: Mapping[str, Any]) -> None:
        spec, problem = read_instance_type(body)
        old = self._types.get(name)
        fields = {"instance_type": name}
        if problem and (old is None or old[2] != problem):
            log.warning("InstanceType %s is invalid, no job gets it: %s", name, problem, extra=fields)
        elif not problem and old is not None and old[2]:
            log.info("InstanceType %s is valid again", name, extra=fields)
        self._types[name] = (rev, spec, problem)

    def catalog(self) -> dict[str, InstanceTypeSpec]:
        return {name: spec for name, (_, spec, _) in self._types.items() if spec is not None}

    def invalid(self) -> dict[str, str]:
        """What is wrong with each InstanceType left out of the catalog."""
        return {name: problem for name, (_, spec, problem) in self._types.items() if spec is None}
