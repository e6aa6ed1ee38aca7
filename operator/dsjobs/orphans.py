"""Stored data that no ProjectJob owns any more: listed, and deleted on request.

    python -m dsjobs.orphans [--project P ...] [--grace 1d] [--delete]

The operator deletes a job's data when the job is deleted (its finalizer) and when its data TTL
passes. It never learns of a ProjectJob whose finalizer was removed by hand, as happens when a
namespace is deleted after dsjobs was uninstalled: that job's prefix stays in the bucket. Telling
such data apart needs every ProjectJob of the cluster and the whole bucket, and deciding that data
belongs to nobody is the admin's call (a bucket may be shared with another cluster's dsjobs), so
this is a command the admin runs, with the operator's storage settings (`DSJOBS_S3_*`) and a
kubeconfig that may list ProjectJobs cluster-wide. It lists by default; `--delete` deletes.

What counts as orphaned (decided by `find_orphans`, pure):
- `projects/<p>/jobs/<job>/...`: no ProjectJob of project <p> named <job> exists, or its data is
  cleared (what a pod on a node that stopped reporting wrote after the clear);
- `projects/<p>/inputs/<sha256>`: no ProjectJob of project <p> whose data is not cleared uses it;
- and nothing under it was written (or begun as a multipart upload) within the grace period
  (default 1 day), so that data of a job being created or written by a pod this cluster does not
  know of is left alone.
Unfinished multipart uploads count as data (invisible, but their parts take space) and are
aborted with it. Keys of any other shape are never touched. Right before deleting, the
ProjectJobs are listed again and whatever a job now owns is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

from dsjobs.controller.cleanup import raw_input_hashes
from dsjobs.controller.names import PROJECT_LABEL
from dsjobs.models import GROUP, PROJECTJOB_PLURAL, VERSION, format_duration, parse_duration

if TYPE_CHECKING:
    from dsjobs.storage import Storage

DEFAULT_GRACE: Final = timedelta(days=1)
PROJECTS_PREFIX: Final = "projects/"
_PAGE: Final = 500

#: The longest --grace: data older than a century is not waited for.
MAX_GRACE: Final = timedelta(days=36500)


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: datetime  # an unfinished upload's: when it was begun
    upload: bool = False  # an unfinished multipart upload (its size unknown: 0)


Kind = Literal["job", "input"]


@dataclass(frozen=True)
class Owners:
    """What the cluster's ProjectJobs own: job prefixes by (project, job), inputs by (project, sha256)."""

    jobs: frozenset[tuple[str, str]] = frozenset()
    inputs: frozenset[tuple[str, str]] = frozenset()

    def own(self, kind: Kind, project: str, name: str) -> bool:
        return (project, name) in (self.jobs if kind == "job" else self.inputs)


@dataclass(frozen=True)
class Orphan:
    kind: Kind
    project: str
    key: str  # a job's prefix (ending in '/') or an input's key
    objects: int
    size: int
    newest: datetime
    uploads: int = 0  # unfinished multipart uploads among `objects`

    @property
    def name(self) -> str:
        """The job's name or the input's sha256: the key's last segment."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]


def owners_of(bodies: Iterable[Mapping[str, Any]]) -> Owners:
    """The Owners of these ProjectJob bodies. A job owns its prefix (one being deleted cleans up
    after itself) and its inputs while its data is not cleared, as for the operator's own
    deletions. What lies under a cleared job's prefix was written after the clear, by a pod the
    operator no longer waited for (on a node that stopped reporting, force-deleted): nobody's."""
    jobs: set[tuple[str, str]] = set()
    inputs: set[tuple[str, str]] = set()
    for body in bodies:
        project = str((body.get("spec") or {}).get("projectId") or "")
        name = str((body.get("metadata") or {}).get("name") or "")
        if not project or not name or (body.get("status") or {}).get("dataCleared"):
            continue
        jobs.add((project, name))
        inputs |= {(project, sha) for sha in raw_input_hashes(body)}
    return Owners(frozenset(jobs), frozenset(inputs))


def _group_of(key: str) -> tuple[Kind, str, str, str] | None:
    """(kind, project, name, group key) of a key in dsjobs' layout (ids and sha256s as dsjobs
    makes them); None for any other key."""
    from dsjobs.storage import check_id, check_sha256

    parts = key.split("/")
    if len(parts) < 4 or parts[0] != "projects":
        return None
    try:
        check_id("project", parts[1])
        if parts[2] == "jobs" and len(parts) >= 5:
            return "job", parts[1], check_id("job", parts[3]), "/".join(parts[:4]) + "/"
        if parts[2] == "inputs" and len(parts) == 4:
            return "input", parts[1], check_sha256(parts[3]), key
    except ValueError:
        return None
    return None


def find_orphans(
    objects: Iterable[StoredObject],
    owners: Owners,
    *,
    now: datetime,
    grace: timedelta,
    projects: frozenset[str] | None = None,
) -> list[Orphan]:
    """The job prefixes and cached inputs nobody owns, untouched for `grace`, in key order.
    `projects` limits the search to those projects."""
    groups: dict[str, Orphan] = {}
    for obj in objects:
        found = _group_of(obj.key)
        if found is None:
            continue
        kind, project, name, key = found
        if (projects is not None and project not in projects) or owners.own(kind, project, name):
            continue
        seen = groups.get(key)
        groups[key] = (
            Orphan(kind, project, key, 1, obj.size, obj.modified, int(obj.upload))
            if seen is None
            else replace(
                seen,
                objects=seen.objects + 1,
                size=seen.size + obj.size,
                newest=max(seen.newest, obj.modified),
                uploads=seen.uploads + obj.upload,
            )
        )
    cutoff = now - grace
    return [o for _, o in sorted(groups.items()) if o.newest <= cutoff]


def still_orphaned(orphans: Iterable[Orphan], owners: Owners) -> list[Orphan]:
    """Those of `orphans` that `owners` (listed afresh) still does not own."""
    return [o for o in orphans if not owners.own(o.kind, o.project, o.name)]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe(orphan: Orphan, projects_with_namespace: frozenset[str] | None) -> str:
    what = "no ProjectJob, or its data was cleared" if orphan.kind == "job" else "no ProjectJob uses it"
    if projects_with_namespace is not None and orphan.project not in projects_with_namespace:
        what += f"; no namespace is labelled {PROJECT_LABEL}={orphan.project}"
    stored = orphan.objects - orphan.uploads
    objects = f"{stored} object{'s' if stored != 1 else ''}"
    if orphan.uploads:
        objects += f" and {orphan.uploads} unfinished upload{'s' if orphan.uploads != 1 else ''}"
    newest = orphan.newest.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{orphan.kind:5}  {orphan.key}  {objects}, {_size(orphan.size)}, last written {newest} ({what})"


# --- the cluster and the store ------------------------------------------------------------------


def _api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def list_projectjobs(api: Any) -> list[dict[str, Any]]:
    """Every ProjectJob of the cluster (paged)."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    bodies: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": _PAGE}
        if token:
            kwargs["_continue"] = token
        page = custom.list_cluster_custom_object(GROUP, VERSION, PROJECTJOB_PLURAL, **kwargs)
        bodies.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return bodies


def projects_with_namespace(api: Any) -> frozenset[str] | None:
    """Project ids of the cluster's project namespaces; None when the caller may not list them."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        items = client.CoreV1Api(api).list_namespace(label_selector=PROJECT_LABEL).items
    except ApiException as exc:
        if exc.status == 403:
            return None
        raise
    return frozenset(str((ns.metadata.labels or {}).get(PROJECT_LABEL, "")) for ns in items)


def stored_objects(storage: Storage, projects: frozenset[str] | None) -> Iterator[StoredObject]:
    from dsjobs.storage import project_prefix

    prefixes = [project_prefix(p) for p in sorted(projects)] if projects is not None else [PROJECTS_PREFIX]
    for prefix in prefixes:
        for info in storage.iter_objects(prefix):
            if info.modified is None:
                raise RuntimeError(f"the object store listed {info.key} without its LastModified")
            yield StoredObject(info.key, info.size, info.modified)
        for upload in storage.iter_uploads(prefix):
            if upload.initiated is None:
                raise RuntimeError(f"the object store listed an upload of {upload.key} without its Initiated")
            yield StoredObject(upload.key, 0, upload.initiated, upload=True)


def _short(exc: Exception) -> str:
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    return f"{status} {reason}" if status else str(exc)


def delete(storage: Storage, orphan: Orphan) -> int:
    """Delete what was judged: a job prefix's objects written (uploads begun) by the newest one
    listed (a job of that name created since writes newer ones), an input's key (and its uploads);
    the number of objects deleted and uploads aborted."""
    if orphan.kind == "job":
        aborted = storage.abort_uploads(orphan.key, started_until=orphan.newest)
        return aborted + storage.delete_prefix(orphan.key, written_until=orphan.newest, uploads=False)
    aborted = storage.abort_uploads(orphan.key, key=orphan.key, started_until=orphan.newest)
    if orphan.objects == orphan.uploads:
        return aborted
    storage.delete(orphan.key)
    return aborted + 1


#: How old the owners' listing may be when an orphan is deleted: the API may have created a job
#: that reuses a cached input (no upload, so the input's LastModified stays old) meanwhile.
RECHECK_SECONDS: Final = 30.0


def delete_all(
    storage: Storage,
    orphans: Sequence[Orphan],
    list_owners: Callable[[], Owners],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, int]:
    """Delete the orphans still owned by nobody, the owners listed again every RECHECK_SECONDS;
    (objects deleted, orphans deleted)."""
    owners, listed = list_owners(), clock()
    objects = count = 0
    for orphan in orphans:
        if clock() - listed > RECHECK_SECONDS:
            owners, listed = list_owners(), clock()
        if still_orphaned([orphan], owners):
            objects += delete(storage, orphan)
            count += 1
    return objects, count


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsjobs.orphans",
        description="List (and with --delete, delete) stored data that no ProjectJob of the cluster "
        "owns: job prefixes of deleted jobs whose cleanup never ran, cached inputs no job uses. "
        "Storage settings from DSJOBS_S3_*; the cluster from KUBECONFIG (or in-cluster).",
    )
    parser.add_argument(
        "--project", action="append", default=[], help="only this project (repeatable); default: all"
    )
    parser.add_argument(
        "--grace",
        default=format_duration(DEFAULT_GRACE),
        help="leave data written within this long alone (default %(default)s; e.g. 12h, 0s)",
    )
    parser.add_argument("--delete", action="store_true", help="delete what is listed")
    args = parser.parse_args(argv)
    try:
        grace = parse_duration(args.grace)
    except ValueError as exc:
        parser.error(f"--grace: {exc}")
    if not timedelta(0) <= grace <= MAX_GRACE:
        # More would reach before year 1 from now: the whole listing, then an OverflowError.
        parser.error(f"--grace: must be a duration from 0s to {format_duration(MAX_GRACE)}")
    args.grace = grace
    from dsjobs.storage import project_prefix

    for project in args.project:
        try:
            project_prefix(project)
        except ValueError as exc:
            parser.error(f"--project: {exc}")
    return args


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    from dsjobs.storage import Storage, StorageConfigError

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    projects = frozenset(args.project) if args.project else None
    try:
        storage = Storage.from_env(dict(os.environ if environ is None else environ))
    except StorageConfigError as exc:
        print(f"dsjobs.orphans: {exc}", file=sys.stderr)
        return 2
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    try:
        api = _api_client()
        owners = owners_of(list_projectjobs(api))
        labelled = projects_with_namespace(api)
    except (ConfigException, ApiException) as exc:
        # Without every ProjectJob of the cluster nothing can be called orphaned.
        print(f"dsjobs.orphans: cannot list the cluster's ProjectJobs: {_short(exc)}", file=sys.stderr)
        return 2
    orphans = find_orphans(
        stored_objects(storage, projects), owners, now=datetime.now(UTC), grace=args.grace, projects=projects
    )
    if labelled is None and orphans:
        # describe() then cannot say which projects lost their namespace: say why it does not.
        print(
            "dsjobs.orphans: namespaces cannot be listed (403): whether a project still has a "
            "namespace is not shown",
            file=sys.stderr,
        )
    for orphan in orphans:
        print(describe(orphan, labelled))
    total = sum(o.size for o in orphans)
    print(f"{len(orphans)} orphaned ({_size(total)}) in bucket {storage.bucket}")
    if not args.delete or not orphans:
        return 0
    # A job created since the first listing may own some of them now, or while they go.
    deleted, count = delete_all(storage, orphans, lambda: owners_of(list_projectjobs(api)))
    print(f"deleted {deleted} objects and unfinished uploads of {count} orphaned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
