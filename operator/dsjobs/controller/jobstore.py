"""The operator's own use of the object store, beside what the jobs' runners move.

It reads a job's result.json when the pod could not report it (a full disk, an overflowing
termination message, a pod gone while the operator was away), checks whether the store answers
when a runner seems stuck on it, and clears what an earlier ProjectJob of the same name left under
a job's prefix. Every call runs in a worker thread: the store's client blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from dsjobs.controller import metrics
from dsjobs.controller.cleanup import in_deletion_thread
from dsjobs.controller.joblog import jlog, log
from dsjobs.controller.plan import JobView
from dsjobs.controller.podview import PodView
from dsjobs.controller.status import STORAGE_CHECK_AFTER, storage_bound_since
from dsjobs.runner.result import RunnerResult

#: How long an unreadable result.json (object store down) holds the job's end back, from the
#: operator's first failed read; then the job ends without the outputs and logs that only
#: result.json records.
RESULT_PATIENCE: Final = timedelta(minutes=10)
#: Attempts whose result.json the operator waits for, remembered at most (the oldest go first, and
#: their wait starts again): a whole cluster's jobs ending during a store outage fit (~10 MiB).
_RESULT_WAITS_KEPT: Final = 100_000
#: Seconds the check for what an earlier job of the same name left may take: it is on every
#: job's way to its first pod, and a store that hangs must not hold them all back.
LEFTOVER_CHECK_TIMEOUT: Final = 3.0
#: What the operator's check of the object store asks for: a HEAD of an object that need not exist.
STORAGE_CHECK_KEY: Final = "projects/.dsjobs-check"
#: Seconds the operator's check of the object store waits to connect and then for each read,
#: tried once: it is on a job's reconcile, which a store that hangs must not hold for minutes (a
#: cancel waits behind it).
STORE_CALL_TIMEOUT: Final = 5.0
#: The same for reading a runner's result.json, with a few tries: a pod gone before the operator
#: saw it end has nothing else to tell its outputs, logs and return code, and no patience applies.
RESULT_READ_TIMEOUT: Final = 10.0
RESULT_READ_ATTEMPTS: Final = 3
#: The same for deleting a job's stored data (its deletion, TTL, DeleteData): a request of a batch
#: deletion (1000 keys) is answered in seconds; with the client's 60 s and 5 tries a store that
#: hangs held a deleted job (Terminating) 5 minutes before anything told why.
DELETE_TIMEOUT: Final = 30.0
DELETE_ATTEMPTS: Final = 3


class ResultUnavailable(Exception):
    """The runner's result.json could not be read for now (the object store is down)."""


class JobStore:
    """The object store as the operator uses it; None of it without DSJOBS_S3_ENDPOINT."""

    def __init__(self, storage_env: Mapping[str, str]) -> None:
        self.env = dict(storage_env)
        self._storage: Any = None
        # The store with shorter waits than the client's, by (timeout, attempts).
        self._variants: dict[tuple[float, int], Any] = {}
        # The last check of the object store (loop time, problem or None) and its lock: one check
        # at a time, shared by every job that waits on it.
        self._check: tuple[float, str | None] | None = None
        self._check_lock: asyncio.Lock | None = None
        self._leftover_checks_off_until = 0.0
        # When a read of an attempt's result.json first failed (monotonic), by (job uid, attempt):
        # the patience counts on the operator's own clock, not from the ship's end, which the
        # node's clock tells (one minutes behind would leave no patience at all).
        self._result_waits: dict[tuple[str, int], float] = {}
        self.clock = time.monotonic

    def client(self) -> Any:
        """The store's client (dsjobs.storage.Storage), made on first use; None without one."""
        # Any storage setting given means a store is meant: one missing then is named, not taken
        # for "no store" (whose runners would get empty settings).
        if self._storage is None and any(self.env.values()):
            from dsjobs.storage import Storage

            self._storage = Storage.from_env(self.env)
        return self._storage

    async def check_access(self) -> None:
        """Log at once when the object store refuses or does not answer the operator's settings
        (a start-up check: the runner Secrets the operator writes carry them)."""
        storage = self._client_with(STORE_CALL_TIMEOUT, 1)
        if storage is None:
            return
        problem = await asyncio.to_thread(storage.access_problem)
        if problem is not None:
            log.error("%s; jobs cannot stage files until it does (the dsjobs-storage Secret)", problem)

    def deletion_client(self) -> Any:
        """The store's client for deleting a job's data (DELETE_TIMEOUT); None without a store."""
        return self._client_with(DELETE_TIMEOUT, DELETE_ATTEMPTS)

    def _client_with(self, timeout: float, attempts: int) -> Any:
        """The store's client waiting `timeout` per request, `attempts` tries (made once each);
        None without a store."""
        full = self.client()
        if full is None:
            return None
        made = self._variants.get((timeout, attempts))
        if made is None:
            made = self._variants[(timeout, attempts)] = full.with_timeout(timeout).with_attempts(attempts)
        return made

    async def stored_result(self, job: JobView, attempt: int, ended: datetime | None) -> RunnerResult | None:
        """The attempt's result.json, or None (no storage configured, not stored, or unreadable).

        Without it the job's outputs and logs go unrecorded for good (the final status is not
        planned again), so when the ship container has `ended` an outage of the object store is
        waited out for RESULT_PATIENCE from the first failed read: ResultUnavailable, and the
        reconcile is retried with backoff. A pod gone without a known end is not waited for."""
        storage = self._client_with(RESULT_READ_TIMEOUT, RESULT_READ_ATTEMPTS)
        if storage is None:
            return None
        from dsjobs.runner.result import load_result
        from dsjobs.storage import is_transient

        key = (job.uid, attempt)
        try:
            spec_project = str(job.spec.get("projectId", ""))
            full = await asyncio.to_thread(load_result, storage, spec_project, job.name)
        except Exception as exc:
            if is_transient(exc) and ended is not None and self._still_waiting(key):
                raise ResultUnavailable(f"the runner's result.json cannot be read now: {exc!r}") from exc
            self._result_waits.pop(key, None)
            jlog(logging.WARNING, (job.namespace, job.name), "could not load result.json: %r", exc)
            return None
        self._result_waits.pop(key, None)
        return full if full is not None and full.attempt == attempt else None

    def _still_waiting(self, key: tuple[str, int]) -> bool:
        """Whether a failed read of `key`'s result.json is within its patience (its first failure
        starts it)."""
        now = self.clock()
        first = self._result_waits.setdefault(key, now)
        while len(self._result_waits) > _RESULT_WAITS_KEPT:
            del self._result_waits[next(iter(self._result_waits))]
        return now - first < RESULT_PATIENCE.total_seconds()

    async def tell_forced_cancel(self, job: JobView, attempt: int) -> bool:
        """Store the word that the cancel of the job's `attempt` is forced (`forced_cancel_key`),
        which its runner's ship looks for while the pod is being deleted. False when it could not
        be stored (no store configured, or it did not answer)."""
        storage = self._client_with(STORE_CALL_TIMEOUT, 2)
        if storage is None:
            return False
        from dsjobs.storage import forced_cancel_key

        key = forced_cancel_key(str(job.spec.get("projectId", "")), job.name)
        body = json.dumps({"attempt": attempt}).encode()
        try:
            await asyncio.to_thread(storage.put_bytes, key, body, content_type="application/json")
        except Exception as exc:
            jlog(
                logging.WARNING, (job.namespace, job.name), "could not store the forced-cancel word: %r", exc
            )
            return False
        return True

    async def problem(self, pod: PodView | None, now: datetime) -> str | None:
        """What is wrong with the object store, checked by the operator itself, once the current
        pod's runner has been moving files for a while (`storage_bound_since`): its own retries
        are invisible from outside the pod. None when the store answers or nothing waits on it."""
        since = storage_bound_since(pod) if pod is not None else None
        if since is None or now - since < STORAGE_CHECK_AFTER:
            return None
        storage = self._client_with(STORE_CALL_TIMEOUT, 1)
        if storage is None:
            return None
        from dsjobs.storage import is_transient

        if self._check_lock is None:
            self._check_lock = asyncio.Lock()
        async with self._check_lock:
            loop = asyncio.get_running_loop()
            last = self._check
            if last is not None and loop.time() - last[0] < STORAGE_CHECK_AFTER.total_seconds():
                return last[1]
            problem = None
            try:
                await asyncio.to_thread(storage.head, STORAGE_CHECK_KEY)
            except Exception as exc:
                # Only "does not answer" (connection trouble, timeouts, 5xx) is the runner's
                # trouble too; a refusal of the operator's own request says nothing of the job's.
                if is_transient(exc):
                    problem = f"{type(exc).__name__}: {exc}"[:300]
            if problem != (last[1] if last is not None else None):
                if problem is None:
                    log.info("the object store answers again")
                else:
                    where = f"{storage.settings.endpoint} (bucket {storage.settings.bucket})"
                    log.warning("the object store %s does not answer: %s", where, problem)
            self._check = (loop.time(), problem)
            metrics.object_store_checked(problem is None)
            return problem

    async def clear_leftovers(
        self, job: JobView, project_id: str, first: Awaitable[bool], *, hold_for_restore: bool = False
    ) -> bool:
        """Objects under a job's prefix before its first pod exists were left by an earlier
        ProjectJob of the same name: its pod, stuck on a lost node when that job was deleted,
        wrote them after that job's data was deleted. This job's runner would take them for its
        own (continue the log stream after them, read that result.json), so they go first.
        Best effort: a store that does not answer now is the stage-in's to wait out.

        Deleted only once `first` says so: this call made the attempt's runner Secret, or found
        it without the attempt's pod (its own of before a restart); else another actor got there
        first, a replica that took over while this one was stalled, whose pod's runner may
        already be writing under the prefix.

        With `hold_for_restore` (a job without status, created moments ago), a prefix holding a
        run's result.json is kept and True returned: the job is likely that run's ProjectJob
        restored from a backup, whose status is written back right after its creation."""
        full = self.client()
        storage = self._client_with(LEFTOVER_CHECK_TIMEOUT, 1)
        if full is None or storage is None:
            return False
        from dsjobs.storage import job_prefix, result_key

        key = (job.namespace, job.name)
        prefix = job_prefix(project_id, job.name)

        def check() -> tuple[bool, bool]:
            """(anything under the prefix, a run's result among it)."""
            # Decided when the thread gets to it: checks queued behind one that found the store
            # not answering are skipped, not each waited out.
            if time.monotonic() < self._leftover_checks_off_until:
                return False, False
            try:
                if not storage.first_keys(prefix):
                    return False, False
                return True, hold_for_restore and storage.exists(result_key(project_id, job.name))
            except Exception:
                # A store that does not answer now would make every job wait out the timeout:
                # the checks pause for a while (the jobs' runners wait for the store anyway).
                self._leftover_checks_off_until = time.monotonic() + LEFTOVER_CHECK_TIMEOUT * 10
                raise

        try:
            found, a_run = await asyncio.to_thread(check)
            if a_run:
                return True
            if not found or not await first:
                return False
            deleted = await in_deletion_thread(full.delete_prefix, prefix)
        except Exception as exc:
            jlog(logging.DEBUG, key, "could not clear what an earlier job left under %s: %r", prefix, exc)
            return False
        jlog(
            logging.INFO,
            key,
            "deleted %d stored objects an earlier ProjectJob of the same name left under %s",
            deleted,
            prefix,
        )
        return False
