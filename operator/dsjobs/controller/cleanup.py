"""Deleting a job's stored data: what to delete (pure) and doing it (object storage, in a thread).

A job's data is its prefix `projects/<project>/jobs/<job>/` (outputs, logs, result.json) plus its
inputs in the project's content-addressed cache `projects/<project>/inputs/<sha256>`. The cache
is shared: an input is deleted only when no other ProjectJob of the project that still has its
data references the same sha256 (a job being deleted, or whose data is cleared or asked to be,
does not count).

Known race, documented in docs/operator.md: a job created just before the deletion but not yet
seen by the operator may find an input gone that the API told its client not to upload; its
stage-in then fails with a clear "input missing" error.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, TypeVar

from dsjobs.controller.status import deletion_marked
from dsjobs.models import FINAL_PHASES, ProjectJobSpec
from dsjobs.models.limits import RESOURCE_ID_PATTERN, SHA256_PATTERN

if TYPE_CHECKING:  # boto3 is imported only when data is actually deleted (memory, start-up time)
    from dsjobs.storage import Storage

log = logging.getLogger("dsjobs.controller.cleanup")


def input_hashes(spec: ProjectJobSpec) -> set[str]:
    """sha256 of every input and local module the job uses from the project cache."""
    params = spec.job_parameters
    hashes = {f.sha256 for f in params.input_files}
    if params.env is not None and params.env.python_env is not None:
        hashes |= {m.sha256 for m in params.env.python_env.local_modules}
    return hashes


def raw_input_hashes(body: Mapping[str, Any]) -> set[str]:
    """The same from a raw ProjectJob body, without parsing it (cheap enough for every event)."""
    params = (body.get("spec") or {}).get("jobParameters") or {}
    found = {str(f.get("sha256")) for f in params.get("inputFiles") or () if isinstance(f, dict)}
    python_env = (params.get("env") or {}).get("pythonEnv") or {}
    found |= {str(m.get("sha256")) for m in python_env.get("localModules") or () if isinstance(m, dict)}
    return found


def stored_data_of(spec: Mapping[str, Any]) -> tuple[str, set[str]] | None:
    """(project, input sha256s) of a raw spec, for deleting its data even when the models cannot
    read the rest of it (an edit after the start); None without a valid projectId."""
    project = str(spec.get("projectId") or "")
    if not re.fullmatch(RESOURCE_ID_PATTERN, project):
        return None
    return project, {sha for sha in raw_input_hashes({"spec": spec}) if re.fullmatch(SHA256_PATTERN, sha)}


class InputRefs:
    """Which live jobs use which cached inputs, to delete an input only when nobody else does.

    Fed from every ProjectJob event (by an index function, so that Kopf has fed it every listed
    job before any handler runs: no deletion decides on a partial picture after a restart). A job
    that is being deleted or whose data is cleared does not count. Inputs are kept as 64-bit hashes
    of (project, sha256): a collision could only keep an input that could have been deleted, and
    10k jobs with 5 inputs each take ~5 MB instead of ~36 MB as a Kopf index.
    """

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], tuple[int, ...]] = {}
        self._counts: dict[int, int] = {}
        # Jobs the watch told about before the start-up LIST was applied (None once it was): the
        # LIST is older than what the watch said of them, deleted ones included.
        self._watched: set[tuple[str, str]] | None = set()
        # Jobs whose data is being cleared, by uid (a job re-created under the name is another).
        self._clearing: dict[tuple[str, str], str] = {}

    @staticmethod
    def _token(project: str, sha: str) -> int:
        return hash((project, sha))

    def update(self, key: tuple[str, str], body: Mapping[str, Any]) -> None:
        """Record (or replace) what one job uses, from its latest body (a watch event)."""
        if self._watched is not None:
            self._watched.add(key)
        self._apply(key, body)

    def seed(self, key: tuple[str, str], body: Mapping[str, Any]) -> None:
        """What the start-up LIST says of a job, unless the watch has told since (newer)."""
        if self._watched is None or key not in self._watched:
            self._apply(key, body)

    def seeded(self) -> None:
        self._watched = None

    def _apply(self, key: tuple[str, str], body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        spec, status = body.get("spec") or {}, body.get("status") or {}
        # A job being deleted, with its data cleared, asked to clear it or clearing it (its TTL
        # ran out) uses nothing: it can never run again (Execute is refused, the operator fails
        # it DataCleared), and jobs that share an input and are cleared together must not keep
        # it for each other. But clearData on a job still to run or running (kubectl: the API
        # refuses it) waits for its end: its stage-in still needs its inputs.
        settled = status.get("phase") in FINAL_PHASES or not spec.get("execute")
        live = (
            not meta.get("deletionTimestamp")
            and not (key in self._clearing and self._clearing[key] == meta.get("uid", ""))
            and not status.get("dataCleared")
            and not deletion_marked(status)
            and not (spec.get("clearData") and settled)
        )
        project = str((body.get("spec") or {}).get("projectId", ""))
        tokens = tuple(sorted({self._token(project, sha) for sha in raw_input_hashes(body)})) if live else ()
        if self._jobs.get(key, ()) == tokens:
            return
        self._drop(key)
        if tokens:
            self._jobs[key] = tokens
            for token in tokens:
                self._counts[token] = self._counts.get(token, 0) + 1

    def clearing(self, key: tuple[str, str], uid: str) -> None:
        """The job's data is being cleared: it uses nothing from now on, before its
        `dataCleared` comes back through the watch (two jobs whose TTLs run out together would
        each see the other as a user of their shared input, and keep it for ever)."""
        self._clearing[key] = uid
        self._drop(key)

    def is_clearing(self, key: tuple[str, str], uid: str) -> bool:
        """Whether the data of this job (this uid) has begun to be deleted in this process."""
        return bool(uid) and self._clearing.get(key) == uid

    def discard(self, key: tuple[str, str]) -> None:
        if self._watched is not None:
            self._watched.add(key)
        self._clearing.pop(key, None)
        self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        for token in self._jobs.pop(key, ()):
            left = self._counts.get(token, 0) - 1
            if left > 0:
                self._counts[token] = left
            else:
                self._counts.pop(token, None)

    def unused(self, key: tuple[str, str], project: str, hashes: Iterable[str]) -> list[str]:
        """Those of `hashes` that no job but `key` uses (sorted)."""
        mine = set(self._jobs.get(key, ()))
        result = []
        for sha in hashes:
            token = self._token(project, sha)
            if self._counts.get(token, 0) - (1 if token in mine else 0) <= 0:
                result.append(sha)
        return sorted(result)


_T = TypeVar("_T")

#: Deletions of stored data run in threads of their own: one may take minutes (a store slowing
#: down or not answering, 100k log chunks), and a batch of them (DeleteAllData, TTL expiries) in
#: the loop's default executor (6 threads on 2 CPUs) made the short store calls queue behind
#: them: a forced cancel's word to the runner, a job's result, the storage check.
_DELETIONS: Final = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dsjobs-deletion")


async def in_deletion_thread(func: Callable[..., _T], *args: Any) -> _T:
    """`func(*args)` in a deletion thread (as asyncio.to_thread, context variables with it)."""
    call = functools.partial(contextvars.copy_context().run, func, *args)
    return await asyncio.get_running_loop().run_in_executor(_DELETIONS, call)


async def delete_job_data(
    storage: Storage | None,
    project: str,
    job: str,
    unused: Callable[[], list[str]],
    *,
    with_inputs: bool = True,
) -> None:
    """Delete the job's prefix, then the inputs `unused()` names when the prefix is gone (not
    `with_inputs`: the prefix only); a no-op (logged) without storage settings.

    `unused` is asked on the event loop after the prefix (thousands of log chunks, a queue of
    clears before it, S3 slowing it down) is deleted: a job seen meanwhile that uses an input
    keeps it. Only a job not yet seen by the operator can miss (module docstring)."""
    from dsjobs.storage import input_key, job_prefix

    if storage is None:
        log.warning("no object storage configured (DSJOBS_S3_*): not deleting data of %s/%s", project, job)
        return
    count = await in_deletion_thread(storage.delete_prefix, job_prefix(project, job))
    if with_inputs:
        for sha in unused():
            # Asked again before each: a slow store makes the loop long, and a job seen meanwhile
            # that uses one of them keeps it.
            if sha in unused():
                await in_deletion_thread(storage.delete, input_key(project, sha))
                count += 1
    log.info(
        "deleted %d stored objects of job %s/%s", count, project, job, extra={"project": project, "job": job}
    )
