"""Kopf glue: watch ProjectJobs and their pods, fetch what the pure core needs, write what it says.

Shape (docs/operator.md explains the choices):

- Kopf *watching* handlers (`@kopf.on.event`) for ProjectJobs, for pods labelled
  `dsjobs.dev/job-id` (server-side label selector) and for InstanceTypes. No change-detection
  handlers (they would make Kopf write progress and diff-base annotations on every job) and no
  Kopf indexes (their start-up barrier is quadratic in the number of objects, see caches.py). All
  durable state is the job's status, written by us with optimistic concurrency (resourceVersion).
- Every event for a job, or for one of its pods, runs `reconcile(job)`: under a per-job lock it
  plans (pure, plan.py), performs the planned actions, and patches the status when it changed.
- Timers (instance-type fallback, image pull timeout, retry backoff, pod retention, data TTL)
  are `requeue_after` values re-derived from timestamps on every reconcile, kept as asyncio
  TimerHandles (no task or thread per job). A restart loses nothing: Kopf lists every job and
  pod at start, and the first reconcile derives the timers again.
- Before the first plan, the pod and InstanceType caches are filled from one LIST each, so a
  restarted operator sees the pods it created before it was killed and adopts instead of
  duplicating.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import kopf

from dsjobs.controller import fastjson, metrics
from dsjobs.controller.caches import InstanceTypeCache, PodCache, job_key_of_pod, revision
from dsjobs.controller.cleanup import InputRefs, delete_job_data, stored_data_of
from dsjobs.controller.events import EventPoster, clip_message
from dsjobs.controller.joblog import jlog, log
from dsjobs.controller.jobstore import JobStore
from dsjobs.controller.kube import (
    JOBS_PATH,
    APIError,
    Conflict,
    Forbidden,
    Invalid,
    Kube,
    NotFound,
    core_path,
    job_path,
    merge_diff,
    message_of,
    shrink_tls_read_buffers,
    with_query,
)
from dsjobs.controller.names import (
    DOCKER_IMAGES_CONFIGMAP,
    FINALIZER,
    JOB_LABEL,
    PROJECT_LABEL,
    PROJECT_STORAGE_SECRET_NAME,
    api_registry_password_selector,
    operator_secrets_selector,
    output_dataset_claim_name,
    pending_output_datasets_selector,
    pod_name,
    project_holder,
    registry_secret_name,
    runner_secret_name,
)
from dsjobs.controller.plan import (
    DELETION_GRACE_SECONDS,
    ClearData,
    CreatePod,
    DeleteDatasetClaims,
    DeletePod,
    DeleteRegistryPasswords,
    DeleteSecrets,
    EnsureMetadata,
    ForceCancel,
    JobView,
    Plan,
    PublishDatasets,
    RemoveFinalizer,
    current_pod_name,
    foreign_project,
    plan,
    read_status,
    scale_up_matters,
    schedule_budget,
    waiting_to_create,
    without_lost_datasets,
    write_delay,
)
from dsjobs.controller.podview import SCALE_UP_SELECTOR, PodView, latest_event_message, scale_up_message
from dsjobs.controller.prepare import (
    PodInputs,
    needs_docker_images,
    needs_project_storage,
    needs_storage_classes,
    prepare_pod,
    registry_password_source,
    spark_secret_name,
)
from dsjobs.controller.refusals import refusal_hint, refused_by_type
from dsjobs.controller.render import (
    JobRef,
    PvcView,
    output_dataset_claims,
    published_dataset_patch,
    pvc_selectors,
)
from dsjobs.controller.settings import OperatorSettings
from dsjobs.controller.status import (
    COND_FINISHED,
    COND_RETRYING,
    COND_SCHEDULED,
    JobEvent,
    StatusUpdate,
    deleted_for_its_node,
    evicted_from_lost_node,
    fail,
    get_condition,
    phase_hops,
    with_passed_phases,
)
from dsjobs.kubeconfig import KubeConfig, Refresh, from_kubeconfig
from dsjobs.kubemetrics import WATCH_IDLE_SECONDS
from dsjobs.models import (
    FINAL_PHASES,
    GROUP,
    INSTANCETYPE_PLURAL,
    PROJECTJOB_PLURAL,
    VERSION,
    InstanceTypeSpec,
    JobPhase,
    ProjectJobSpec,
    ProjectJobStatus,
)
from dsjobs.models.base import known_of, read_stored
from dsjobs.runner.contract import SHIP_CONTAINER
from dsjobs.runner.result import ResultPointer, RunnerResult, parse_termination_message, settled
from dsjobs.storage import STORAGE_ENV_VARS, job_prefix

Key = tuple[str, str]  # (namespace, job name)


class StoodDown(Exception):
    """The replica lost the leadership in the middle of a reconcile: it stops there."""


# A reconcile plans again after a status-only step; this bounds a (buggy) plan that never settles.
MAX_STEPS: Final = 8
MAX_ERROR_BACKOFF: Final = 60.0
#: Failed reconciles of a job in a row before its users are told (a Warning Event ReconcileFailed):
#: one or two are an API server's hiccup, retried within seconds.
FAILURES_BEFORE_EVENT: Final = 3
#: How long a namespace's project label is taken as known: it matters before a job's first pod
#: only, and is relabelled by admins alone (rarely); a burst of a namespace's jobs costs one GET.
NAMESPACE_PROJECT_SECONDS: Final = 60.0
#: Namespaces whose project is remembered before the stale ones are dropped.
NAMESPACE_PROJECTS_KEPT: Final = 1024
STORAGE_CLASSES_PATH: Final = "/apis/storage.k8s.io/v1/storageclasses"


def _listed_types(job: JobView) -> list[str]:
    """The instance type names the job's spec lists, as stored (the plan reads the parsed spec)."""
    params = job.spec.get("jobParameters") or {}
    types = params.get("cloudInstanceTypes") or ()
    return [t["name"] for t in types if isinstance(t, dict) and isinstance(t.get("name"), str)]


#: Jobs planned again at once when many are woken together (an InstanceType changed, a resync);
#: their requests queue on the client's own bound (DSJOBS_KUBE_CONCURRENCY) as well.
RECONCILE_ALL_CONCURRENCY: Final = 16


@dataclasses.dataclass(frozen=True)
class Refused:
    """The API server forbade creating the job's pod (or a claim of it) for now; its message."""

    why: str
    # The pod itself was refused (not a Secret or claim of it): maybe by its instance type.
    pod: bool = False


@dataclasses.dataclass(frozen=True)
class Held:
    """The job was not started: it has no status yet and the object store holds a run under its
    name, so it may be that run's ProjectJob being restored; it waits until `until` for its status."""

    until: datetime
    prefix: str


@dataclasses.dataclass
class _FailureStreak:
    """A job's reconciles failing in a row (forgotten at the first that succeeds)."""

    count: int = 0
    said: str = ""  # the error last logged at WARNING
    told: str = ""  # the exception class of the last ReconcileFailed Event
    data_told: bool = False  # a DataNotDeleted Event was posted


@dataclasses.dataclass(frozen=True)
class _Unconfirmed:
    """A status write answered 409 Conflict, which may be our own write's: a PATCH whose answer
    was lost (a timeout, a 5xx) is sent again by the client with the resourceVersion its own
    landing made stale. The next body newer than `base` tells which: it holds `status` or not."""

    status: dict[str, Any]  # what was written (the whole status, as `to_cr` gives it)
    job: JobView  # what the write was planned with
    events: tuple[JobEvent, ...]
    passed: tuple[str, ...]  # the phases passed unwritten before it
    base: int  # the resourceVersion the write was guarded by
    at: float  # loop time of the write


def error_backoff(failures: int) -> float:
    """Seconds before retrying a job whose reconcile failed `failures` times in a row: 0.5, 1, 2, ...
    up to MAX_ERROR_BACKOFF (the exponent is bounded: 2**1024 is no float)."""
    return min(MAX_ERROR_BACKOFF, 0.5 * 2.0 ** min(failures - 1, 16))


def _now() -> datetime:
    return datetime.now(UTC)


def _current_pod(job: JobView, pods: Sequence[PodView]) -> PodView | None:
    """The current attempt's pod of a job that has not ended (None: ended, or no such pod)."""
    if job.status.phase is not None and job.status.phase.is_final:
        return None
    name = current_pod_name(job.status, pods)
    return next((p for p in pods if p.name == name), None)


def _earlier_pod(pod: PodView) -> str:
    """Why a job's pod is not made while a pod of an earlier ProjectJob of its name exists."""
    where = f" on node {pod.node_name}" if pod.node_name else ""
    state = "being deleted" if pod.deleting else "not deleted yet"
    return (
        f"pod {pod.name}{where}, left by an earlier ProjectJob of the same name, still exists "
        f"({state}); this job's pod starts once it is gone (they would share names and stored data)"
    )


def _queued_since(job: JobView, status: ProjectJobStatus) -> datetime | None:
    """When the job's wait for its pod began: its execute request (the API creates jobs not
    executed, and Execute comes after the client's uploads, or hours later), else its creation
    (a job applied with `execute: true`); never before its creation (a copied annotation)."""
    created = status.created_at or job.created_at
    requested = job.execute_requested_at
    if requested is None or created is None:
        return requested or created
    return max(requested, created)


@dataclasses.dataclass(frozen=True)
class NamespaceProject:
    """A namespace's project label ("" none) and the namespace holding that project; None: not
    known (not readable, not listable)."""

    project: str | None = None
    holder: str | None = None


def data_not_deleted(deleting: bool, exc: BaseException) -> JobEvent:
    """The Warning Event of a job whose stored data could not be deleted now: a deleted job stays
    (Terminating) until it is, and a GitOps prune or `kubectl delete` showed nothing of why."""
    then = "the job is deleted once it is" if deleting else "its data is marked cleared once it is"
    return JobEvent(
        "Warning",
        "DataNotDeleted",
        f"the job's stored data could not be deleted now ({clip_message(repr(exc), 300)}); the operator "
        f"tries again, at least once a minute, and {then}",
    )


def _may_start_or_clear(job: JobView) -> bool:
    """Whether this step may create the job's first pod or delete its stored data: both wait on
    its namespace's project (looked up once per NAMESPACE_PROJECT_SECONDS and namespace), which
    the plan checks. A job whose data is cleared can neither: it never starts without its data."""
    return job.deleting or not job.status.data_cleared


def _key(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


class Operator:
    """The operator's in-memory state: caches and timers only; the truth is in the cluster."""

    def __init__(self, settings: OperatorSettings, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.settings = settings
        self.kube: Kube | None = None
        self.events: EventPoster | None = None
        self.storage_env = {k: env[k] for k in STORAGE_ENV_VARS if env.get(k)}
        self.store = JobStore(self.storage_env)
        self.pods = PodCache()
        self.instance_types = InstanceTypeCache()
        # Set once the pods and InstanceTypes that existed at start are in the caches.
        self._warm = asyncio.Event()
        self._warming: asyncio.Lock | None = None
        self._refs_warm = False
        self._refs_warming: asyncio.Lock | None = None
        # Latest known bodies of jobs that are active (or have pods): pod events and timers need
        # them without a GET. Finished jobs without pods are dropped (memory at 10k jobs).
        self._jobs: dict[Key, dict[str, Any]] = {}
        # Pods just created by us, until the watch delivers them to the cache.
        self._fresh: dict[Key, PodView] = {}
        # Pods we asked to delete, until the watch shows them deleting: no second DELETE meanwhile.
        self._deleted: dict[Key, set[str]] = defaultdict(set)
        # Last states of pods whose deletion we saw, until a reconcile consumed them.
        self._gone: dict[Key, dict[str, PodView]] = defaultdict(dict)
        # Pods (uids) whose lost job label was told (once each: a resync finds them every time).
        self._told_unlabelled: set[str] = set()
        # The forced cancel told to each job's runner (job uid, attempt): once each.
        self._forced_told: dict[Key, tuple[str, int]] = {}
        self.resync: asyncio.Future[None] | None = None
        self.store_check: asyncio.Future[None] | None = None
        self._locks: dict[Key, asyncio.Lock] = {}
        self._lock_users: dict[Key, int] = defaultdict(int)
        self._timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self._operator_context: contextvars.Context | None = None
        self._errors: dict[Key, _FailureStreak] = {}
        # Reconciles in a row that did not settle within MAX_STEPS, per job (logged once).
        self._unsettled: dict[Key, int] = {}
        # A status write per job that got a 409 and may have landed all the same (_Unconfirmed),
        # until a later body tells: its Events and metrics are told then, exactly once.
        self._unconfirmed: dict[Key, _Unconfirmed] = {}
        # Set (from the lease watchdog's thread) when the leadership is lost: no more reconciles
        # while the process posts its last Events and exits.
        self.standing_down = False
        # Why check_served stopped the operator (its main says it and exits 2), and how.
        self.startup_problem: str | None = None
        # An asyncio.Event (bound to Kopf's loop when Kopf first waits on it): Kopf waits on a
        # threading.Event in an executor thread, which then held the loop's shutdown, and with it
        # the Lease's release, for ever.
        self.stop_flag = asyncio.Event()
        self.served_check: asyncio.Future[None] | None = None
        # Namespace -> (loop time, its project label): the check of a job's projectId at its start.
        self._namespace_projects: dict[str, tuple[float, NamespaceProject]] = {}
        self._namespace_lookups: dict[str, asyncio.Future[NamespaceProject]] = {}
        self._namespace_unreadable: set[str] = set()
        self._namespaces_unlistable = False
        #: Pod creations the API server forbade in a row, per job (their retry backoff).
        self._refused: dict[Key, int] = {}
        # Jobs with a reconcile waiting for the lock: a further trigger adds nothing (the waiting
        # one reads the latest state), so it is dropped. Coalesces bursts of pod events.
        self._waiting: set[Key] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        # The resourceVersion of our last write to each job, to recognise its watch echo.
        self._own: dict[Key, int] = {}
        # When (loop time) each job's status was last written, to pace observation-only writes,
        # and the phases seen in held-back steps since (told in the next write's Event).
        self._written_at: dict[Key, float] = {}
        self._passed: dict[Key, list[str]] = {}
        # When the operator first saw a job's execute request (monotonic), for the pod creation
        # latency metric; only for jobs without a pod yet.
        self._seen: dict[Key, float] = {}
        self.phases = metrics.PhaseBook()
        self.waits = metrics.WaitBook()
        metrics.WAITS.book = self.waits
        self.input_refs = InputRefs()

    # --- Kopf entry points -------------------------------------------------------------------

    async def on_job_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        key = _key(body)
        if event_type == "DELETED":
            self.input_refs.discard(key)
            self._forget(key)
            return
        self.input_refs.update(key, body)
        status = body.get("status") or {}
        # No phase yet (no status written: a first step that keeps failing) is CREATING, as the
        # API answers it: left out, the phase series summed to fewer jobs than there are.
        self.phases.set(key, status.get("phase") or JobPhase.CREATING.value)
        self.waits.update(key, status)
        if not status.get("attempt") and (body.get("spec") or {}).get("execute") and key not in self._seen:
            self._seen[key] = time.monotonic()
        if 0 <= revision(body) <= self._own.get(key, -1):
            # The echo of our own write (or older): the reconcile that made that write planned on
            # this state or a newer one; nothing to do.
            return
        self._remember(body)
        await self.reconcile(key)

    async def on_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        if event_type == "DELETED" and not meta.get("deletionTimestamp"):
            # A pod that leaves the watch's label selector (its job label removed) comes as
            # DELETED with its last labelled state; a deletion has marked it first (its graceful
            # deletion), but for a pod deleted at once (never scheduled, or ended), so one GET
            # tells. Not for those: an ended pod's last state is its outcome either way, and the
            # operator's own deletions are known.
            key = job_key_of_pod(body)
            phase = (body.get("status") or {}).get("phase")
            if (
                key is not None
                and phase not in ("Succeeded", "Failed")
                and str(meta.get("name", "")) not in self._deleted.get(key, ())
                and await self._still_there_or_gone(key, body)
            ):
                await self.reconcile(key)
                return
        seen = self.pods.apply(body, deleted=event_type == "DELETED")
        if seen is None:
            return
        key, view = seen
        if view.gone:
            self._gone[key][view.name] = view
        await self.reconcile(key)

    async def on_instance_type_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if self.instance_types.apply(body, deleted=event_type == "DELETED"):
            await self._type_changed(str((body.get("metadata") or {}).get("name", "")))

    async def _type_changed(self, name: str) -> None:
        """A type changed, was deleted or made invalid: the jobs whose pods wait for it plan again
        (a waiting pod of a changed type is made again; one that waited past its budget on a
        deleted last type ends; neither sets a timer, and nothing else would wake them)."""
        await self._reconcile_all(self.pods.waiting_on(name))

    async def _reconcile_all(self, keys: Iterable[Key]) -> None:
        """Plan these jobs again, several at once: one after another, the last of 200 jobs waiting
        on a changed type got its new pod after every other job's round trips (36 s)."""
        slots = asyncio.Semaphore(RECONCILE_ALL_CONCURRENCY)

        async def one(key: Key) -> None:
            async with slots:
                await self.reconcile(key)

        await asyncio.gather(*(one(key) for key in keys))

    async def warm_up(self) -> None:
        """Fill the caches with what existed before the watches started (once, before any plan).

        Without it a restarted operator could plan a job before the watch delivered the job's
        pod, and create a second attempt beside it.
        """
        if self._warm.is_set():
            return
        if self._warming is None:
            self._warming = asyncio.Lock()
        async with self._warming:
            if self._warm.is_set():
                return
            assert self.kube is not None
            async for page in self._job_pod_pages():
                self.pods.seed(page)
            self.pods.seeded()
            types = await self.kube.list(INSTANCETYPE_PLURAL, f"{JOBS_PATH}/{INSTANCETYPE_PLURAL}")
            self.instance_types.seed(types)
            log.info("caches warm: %d job pods, %d instance types", len(self.pods), len(types))
            self._warm.set()

    async def resync_pods(self) -> int:
        """One LIST of the job pods against the cache: a pod deleted while the pod watch was
        away (a resume with 410 Gone makes Kopf list again, which tells no deletion) is handled
        as its DELETED event would have been. Returns how many were found so."""
        assert self.kube is not None
        await self.warm_up()
        before = self.pods.snapshot()
        # Pods this operator made that no watch event has shown yet: a gap of the watch may have
        # taken their ADDED and DELETED both, and such a job waited for a pod event for ever.
        fresh_before = dict(self._fresh)
        listed: set[str] = set()
        async for page in self._job_pod_pages(background=True):
            listed.update(str((p.get("metadata") or {}).get("uid", "")) for p in page)
        # (key, pod, whether it is a `_fresh` one)
        candidates = [(key, view, False) for key, view in self.pods.vanished(before, listed)] + [
            (key, dataclasses.replace(view, gone=True), True)
            for key, view in fresh_before.items()
            if view.uid and view.uid not in listed and self._fresh.get(key) is view
        ]
        gone = 0
        for key, view, fresh in candidates:
            body = {"metadata": {"name": view.name, "uid": view.uid}}
            if fresh:
                # Still `_fresh` until known gone: a GET that fails leaves it for the next resync.
                try:
                    there = await self._still_there(key, body)
                except Exception as exc:
                    jlog(logging.WARNING, key, "pod %s could not be looked up: %r", view.name, exc)
                    continue
                if self._fresh.get(key) is fresh_before[key]:
                    self._fresh.pop(key, None)
            else:
                # Out of the cache already: a failed GET is taken as the deletion it looks like.
                there = await self._still_there_or_gone(key, body)
            if there:
                continue
            jlog(logging.INFO, key, "pod %s was deleted while the pod watch was away", view.name)
            self._gone[key][view.name] = view
            gone += 1
        await self._reconcile_all({key for key, _, _ in candidates})
        return gone

    async def _still_there_or_gone(self, key: Key, body: Mapping[str, Any]) -> bool:
        """`_still_there`, and False when the API server cannot tell now: the event is then taken
        as the deletion it says (an exception would lose it until the next resync)."""
        try:
            return await self._still_there(key, body)
        except Exception as exc:  # any failure of the one GET
            name = str((body.get("metadata") or {}).get("name", ""))
            jlog(logging.WARNING, key, "pod %s left the pod watch and cannot be looked up: %s", name, exc)
            return False

    async def _still_there(self, key: Key, body: Mapping[str, Any]) -> bool:
        """Whether a pod of the job that the watch or a LIST by label lost still exists (the same
        pod, by uid); then it is kept as `_unlabelled` says."""
        assert self.kube is not None
        meta = body.get("metadata") or {}
        raw = await self.kube.get("pods", core_path(key[0], "pods", str(meta.get("name", ""))))
        if raw is None or str((raw.get("metadata") or {}).get("uid", "")) != str(meta.get("uid", "")):
            self._told_unlabelled.discard(str(meta.get("uid", "")))
            return False
        self._unlabelled(key, raw)
        return True

    def _unlabelled(self, key: Key, raw: Mapping[str, Any]) -> None:
        """A job's pod that the LIST by label missed but that exists: its job label was removed
        (`kubectl label pod ... dsjobs.dev/job-id-`, the idiom that takes a pod out of a
        ReplicaSet). Taken for deleted, it ended the job ERROR with its program still running, or
        with a retry policy made the next attempt beside it. It stays the job's, seen as this GET
        saw it: the watch (by label) no longer tells, so each resync looks again; its users are
        told to put the label back."""
        labels = (raw.get("metadata") or {}).get("labels") or {}
        view = self.pods.keep(key, raw)
        if labels.get(JOB_LABEL) == key[1]:
            self._told_unlabelled.discard(view.uid)
            return  # labelled again since the LIST: the watch has it
        if view.uid in self._told_unlabelled:
            return
        self._told_unlabelled.add(view.uid)
        name = view.name
        message = (
            f"pod {name} no longer carries the label {JOB_LABEL}={key[1]} by which the operator "
            f"follows it: seen only every {self.settings.pod_resync_seconds:.0f}s until it is back "
            f"(kubectl -n {key[0]} label pod {name} {JOB_LABEL}={key[1]})"
        )
        jlog(logging.WARNING, key, "%s", message)
        if self.events is None:  # not started by Kopf (tests): nothing to post to
            return
        # Straight to the poster, not `_post`: that takes its body for the job as stored, and this
        # stand-in (the job's name and uid, from the pod) would decide a pending status write.
        job = self._jobs.get(key) or {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ProjectJob",
            "metadata": {"namespace": key[0], "name": key[1], "uid": view.owner_uid},
        }
        self.events.post(job, JobEvent("Warning", "PodUnlabelled", message))

    async def resync_instance_types(self) -> list[str]:
        """One LIST of the InstanceTypes against the catalog, as `resync_pods` for pods: a type
        deleted while the watch was away would otherwise stay in the catalog until a restart."""
        assert self.kube is not None
        await self.warm_up()
        before = self.instance_types.snapshot()
        items = await self.kube.list(
            INSTANCETYPE_PLURAL, f"{JOBS_PATH}/{INSTANCETYPE_PLURAL}", background=True
        )
        gone = self.instance_types.drop_vanished(
            before, (str((i.get("metadata") or {}).get("name", "")) for i in items)
        )
        for name in gone:
            log.info("InstanceType %s was deleted while the watch was away", name)
            await self._type_changed(name)
        return gone

    async def check_served(self) -> None:
        """Stop the operator (CrashLoopBackOff, as the pod's restarts go) while its CRDs are not
        served: Kopf resolved them once, at its start, and without them serves nothing. Asked
        again each SERVED_CHECK_SECONDS: a CRD deleted later fails Kopf's watch of it, which has
        ended the process, but a watcher task may also end alone and leave the process up."""
        assert self.kube is not None
        first = True
        while True:
            try:
                problem = served_problem(await self.kube.get("discovery", f"/apis/{GROUP}/{VERSION}"))
            except (APIError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Not known (an API server restarting, refusing): asked again at the next period;
                # Kopf's watches tell their own failures. (Only APIError was caught: a refused
                # connection ended the check for good, silently.)
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "cannot tell whether the CRDs are served: %s",
                    exc,
                )
                problem = None
            if problem is not None:
                log.error("%s", problem)
                self.startup_problem = problem
                self.stop_flag.set()
                return
            first = False
            await asyncio.sleep(SERVED_CHECK_SECONDS)

    async def resync_pods_forever(self) -> None:
        interval = self.settings.pod_resync_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.resync_pods()
                await self.resync_instance_types()
            except asyncio.CancelledError:
                raise
            except (APIError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                # The API server away or refusing: healed by the next period (the watch is the
                # main source); its traceback tells nothing.
                what = (
                    f"{exc.status} {message_of(exc)}"
                    if isinstance(exc, APIError)
                    else f"{type(exc).__name__}: {exc}"
                )
                log.warning(
                    "resync of pods and InstanceTypes failed (tried again in %ss): %s", interval, what
                )
            except Exception:
                log.warning("resync of pods and InstanceTypes failed", exc_info=True)

    async def _job_pod_pages(self, *, background: bool = False) -> AsyncIterator[list[dict[str, Any]]]:
        """Every job pod the operator serves, a LIST page at a time (`Kube.pages`' background)."""
        assert self.kube is not None
        for path in self._scoped_paths("/api/v1/pods", lambda ns: core_path(ns, "pods")):
            async for page in self.kube.pages("pods", path, label_selector=JOB_LABEL, background=background):
                yield page

    def _scoped_paths(self, cluster_wide: str, in_namespace: Callable[[str], str]) -> list[str]:
        """Where to LIST: the operator's namespaces, or the whole cluster when it has none."""
        if not self.settings.namespaces:
            return [cluster_wide]
        return [in_namespace(ns) for ns in self.settings.namespaces]

    async def _warm_input_refs(self) -> None:
        """Before the first input deletion: every job's inputs, from one paginated LIST.

        The job watch feeds the references from then on; until the operator has seen every job it
        must not decide that an input is unused. Jobs seen by the LIST and by events in any order
        can only be over-counted (an executed job's inputs cannot change, a CEL rule of the CRD;
        deletion is one-way): safe. Only a draft edited by kubectl meanwhile could be counted with
        its old inputs; Execute checks that the inputs exist.
        """
        if self._refs_warm:
            return
        assert self.kube is not None
        if self._refs_warming is None:
            self._refs_warming = asyncio.Lock()
        async with self._refs_warming:  # one LIST, however many deletions are waiting for it
            if self._refs_warm:
                return
            # Pages as Kopf's start-up listing takes them (DSJOBS_WATCH_CHUNK_SIZE): a page holds
            # whole jobs, up to ~900 KiB each, and 500 of them passed the operator's memory limit.
            size = self.settings.watch_chunk_size or 500
            for path in self._scoped_paths(f"{JOBS_PATH}/{PROJECTJOB_PLURAL}", job_path):
                async for page in self.kube.pages(PROJECTJOB_PLURAL, path, page_size=size):
                    for body in page:
                        self.input_refs.seed(_key(body), body)
            self.input_refs.seeded()
            self._refs_warm = True

    # --- reconcile ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, key: Key) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._lock_users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[key] -= 1
            if self._lock_users[key] <= 0:
                self._lock_users.pop(key, None)
                self._locks.pop(key, None)

    async def reconcile(self, key: Key) -> None:
        if key in self._waiting:
            return
        self._waiting.add(key)
        locked = False
        try:
            async with self._locked(key):
                locked = True
                self._waiting.discard(key)
                await self._reconcile_locked(key)
        finally:
            if not locked:  # cancelled while waiting: later triggers must not be dropped
                self._waiting.discard(key)

    async def _reconcile_locked(self, key: Key) -> None:
        if self.standing_down:
            return  # another replica may act on the job already
        unsettled = self._unsettled.get(key, 0)
        try:
            requeue = await self._reconcile(key)
        except asyncio.CancelledError:
            raise
        except StoodDown:
            return
        except Exception as exc:
            if isinstance(exc, NotFound) and await self._job_gone(key):
                # The job was deleted meanwhile (without our finalizer, or it was already let go):
                # nothing to retry, and nothing of it to keep.
                self._forget(key)
                return
            self._schedule(key, timedelta(seconds=self._failed(key, exc)))
            return
        streak = self._errors.pop(key, None)
        if streak is not None and streak.count > 1:  # its repeats may not have been logged
            jlog(logging.INFO, key, "reconcile succeeded after %d failures in a row", streak.count)
        if unsettled and self._unsettled.get(key) == unsettled:  # this one settled
            del self._unsettled[key]
            jlog(logging.INFO, key, "settled after %d reconciles that did not", unsettled)
        self._schedule(key, requeue)

    def _failed(self, key: Key, exc: Exception) -> float:
        """Count a failed reconcile and tell it; the seconds until it is tried again.

        A job can fail for as long as its cause lasts (an admission webhook down, an object the
        plan chokes on), retried every minute: with a thousand such jobs a WARNING per retry was a
        thousand lines a minute. The log gets a job's first failure and each change of error; the
        job's users, who cannot read the operator's log, one Warning Event once it failed
        FAILURES_BEFORE_EVENT times in a row, and another only for another kind of error."""
        streak = self._errors.setdefault(key, _FailureStreak())
        streak.count += 1
        delay = error_backoff(streak.count)
        kind = type(exc).__name__
        metrics.RECONCILE_ERRORS.labels(kind=kind).inc()
        said = repr(exc)
        level = logging.WARNING if said != streak.said else logging.DEBUG
        streak.said = said
        jlog(level, key, "reconcile failed (%d in a row), retrying in %.1fs: %s", streak.count, delay, said)
        body = self._jobs.get(key)
        if streak.count >= FAILURES_BEFORE_EVENT and kind != streak.told and body is not None:
            streak.told = kind
            why = f"{exc.status} {message_of(exc)}" if isinstance(exc, APIError) else str(exc)
            message = (
                f"the operator failed to handle the job {streak.count} times in a row ({kind}: "
                f"{clip_message(why, 300)}); it keeps trying, at least once a minute"
            )
            self._post(body, [JobEvent("Warning", "ReconcileFailed", message)])
        return delay

    def _not_settled(self, key: Key) -> timedelta:
        """A reconcile whose plan kept changing the status it had just written (a bug): counted
        every time, logged at ERROR once until the job settles (not every 5 s for as long as it
        lasts)."""
        count = self._unsettled.get(key, 0) + 1
        self._unsettled[key] = count
        metrics.RECONCILE_ERRORS.labels(kind="NotSettled").inc()
        level = logging.ERROR if count == 1 else logging.DEBUG
        jlog(level, key, "did not settle after %d steps (%d reconciles in a row)", MAX_STEPS, count)
        return timedelta(seconds=5)

    async def _reconcile(self, key: Key) -> timedelta | None:
        assert self.kube is not None
        await self.warm_up()
        requeue: timedelta | None = None
        for _step in range(MAX_STEPS):
            if self.standing_down:  # the leadership was lost: another replica may act already
                return None
            metrics.RECONCILES.inc()
            body = self._jobs.get(key) or await self._fetch_job(key)
            if body is None:
                self._forget(key)
                return None
            job = JobView.from_body(body)
            if _may_start_or_clear(job):
                own = await self._namespace_project(job.namespace)
                job = dataclasses.replace(job, namespace_project=own.project, project_namespace=own.holder)
            now = _now()
            # The deletions this step plans with: only these are done with once it is written (a
            # pod deleted meanwhile is the next step's, its last state is nowhere else).
            seen_gone = dict(self._gone.get(key, {}))
            pods = await self._with_warning(job, await self._pods_of(key, job), now)
            current = _current_pod(job, pods)
            result = await self._result_of(job, current)
            problem = await self.store.problem(current, now)
            catalog = await self._catalog_for(job)
            step = plan(
                job,
                pods,
                catalog,
                result,
                now,
                self.settings,
                storage_problem=problem,
                invalid_types=self.instance_types.invalid(),
            )
            body, status, events, requeue = await self._act(job, body, step, now)
            if body is None:  # the finalizer was removed: the job is gone
                self._forget(key)
                return None
            if status.to_cr() == job.status.to_cr():
                self._done_with_gone(key, seen_gone)
                self._post(body, events)
                self._evict(key, body, pods)
                return requeue
            wait = self._pace(key, job, step, status)
            if wait is not None:
                # Written later from the state then; the Events of this step are derived from the
                # stored status again, and the phases passed meanwhile are told in them.
                metrics.STATUS_WRITES_PACED.inc()
                if status.phase is not None and status.phase != job.status.phase:
                    passed = self._passed.setdefault(key, [])
                    if status.phase.value not in passed:
                        passed.append(status.phase.value)
                return wait if requeue is None else min(requeue, wait)
            written = await self._write_status(key, job, body, status, events)
            if written is None:
                continue  # conflict: somebody else changed the job, plan again on the fresh object
            self._after_write(key, job, written, events)
            self._done_with_gone(key, seen_gone)
            ended = (
                status.phase is not None
                and status.phase.is_final
                and not (job.status.phase is not None and job.status.phase.is_final)
            )
            if step.actions and not ended:
                self._evict(key, written, pods)
                return requeue
            # A status-only step (e.g. a new attempt decided), or the step that ended the job (its
            # actions, such as publishing its datasets, bring no event that would come back here):
            # plan again to act on it - a finished job's pod and Secrets go now.
        return self._not_settled(key)

    def _done_with_gone(self, key: Key, used: Mapping[str, PodView]) -> None:
        """Forget the pod deletions a written step planned with, not those that came since."""
        gone = self._gone.get(key)
        if gone is None:
            return
        for name, view in used.items():
            if gone.get(name) is view:
                del gone[name]
        if not gone:
            self._gone.pop(key, None)

    async def _namespace_project(self, namespace: str) -> NamespaceProject:
        """The `dsjobs.dev/project-id` label of `namespace` ("" when it has none) and the
        namespace holding that project, remembered for NAMESPACE_PROJECT_SECONDS and looked up
        once for all the jobs asking meanwhile; None when it cannot be read: RBAC without
        namespaces (an operator scoped with RoleBindings: the admission policy is the check then)
        or no such namespace. Other failures raise: the reconcile is retried."""
        assert self.kube is not None
        now = asyncio.get_running_loop().time()
        known = self._namespace_projects.get(namespace)
        if known is not None and now - known[0] < NAMESPACE_PROJECT_SECONDS:
            return known[1]
        pending = self._namespace_lookups.get(namespace)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up_namespace(namespace))
            self._namespace_lookups[namespace] = pending
            pending.add_done_callback(lambda _: self._namespace_lookups.pop(namespace, None))
        return await asyncio.shield(pending)

    async def _look_up_namespace(self, namespace: str) -> NamespaceProject:
        assert self.kube is not None
        found = NamespaceProject()  # unreadable (403): remembered as unknown
        try:
            obj = await self.kube.get("namespaces", f"/api/v1/namespaces/{namespace}")
        except Forbidden as exc:
            if namespace not in self._namespace_unreadable:
                self._namespace_unreadable.add(namespace)
                log.warning(
                    "namespace %s cannot be read (%s %s): its jobs' projectId is not checked against "
                    "its project label here, only by the admission policy",
                    namespace,
                    exc.status,
                    message_of(exc),
                )
        else:
            if obj is None:  # no such namespace (being deleted): nothing known, asked again
                return NamespaceProject()
            labels = (obj.get("metadata") or {}).get("labels") or {}
            project = str(labels.get(PROJECT_LABEL) or "")
            found = NamespaceProject(project, await self._project_holder(project) if project else None)
        now = asyncio.get_running_loop().time()
        if len(self._namespace_projects) >= NAMESPACE_PROJECTS_KEPT:  # namespaces come and go
            self._namespace_projects = {
                ns: seen
                for ns, seen in self._namespace_projects.items()
                if now - seen[0] < NAMESPACE_PROJECT_SECONDS
            }
        self._namespace_projects[namespace] = (now, found)
        return found

    async def _project_holder(self, project: str) -> str | None:
        """The namespace holding `project` (names.project_holder), None when namespaces cannot
        be listed (an operator without the `list` of the RBAC in deploy/: not checked then)."""
        assert self.kube is not None
        try:
            labelled = await self.kube.list("namespaces", "/api/v1/namespaces", f"{PROJECT_LABEL}={project}")
        except Forbidden as exc:
            if not self._namespaces_unlistable:
                self._namespaces_unlistable = True
                log.warning(
                    "namespaces cannot be listed (%s %s): a second namespace labelled with a "
                    "project's id is not refused",
                    exc.status,
                    message_of(exc),
                )
            return None
        return project_holder(labelled)

    async def _job_gone(self, key: Key) -> bool:
        """True when the API server says the job does not exist (any doubt: False)."""
        try:
            return await self._fetch_job(key) is None
        except Exception:
            return False

    def _pace(self, key: Key, job: JobView, step: Plan, status: ProjectJobStatus) -> timedelta | None:
        last = self._written_at.get(key)
        since = None if last is None else asyncio.get_running_loop().time() - last
        return write_delay(job, step, status, since, self.settings.status_write_interval_seconds)

    async def _fetch_job(self, key: Key) -> dict[str, Any] | None:
        assert self.kube is not None
        body = await self.kube.get(PROJECTJOB_PLURAL, job_path(*key))
        if body is not None:
            self._remember(body)
        return body

    def _remember(self, body: dict[str, Any]) -> None:
        key = _key(body)
        old = self._jobs.get(key)
        if old is not None and 0 <= revision(body) < revision(old):
            return  # a stale watch event after our own newer write
        self._jobs[key] = body

    def _evict(self, key: Key, body: Mapping[str, Any], pods: Sequence[PodView]) -> None:
        """Keep a job's body only while its pods may send events about it (started, not finished).

        Jobs waiting for execute and finished jobs without pods are only ever touched by their
        own watch events, which carry the body; a timer that fires for one GETs it. This is what
        keeps the operator's memory flat in the number of jobs (10k jobs, ~10 KiB each).
        """
        status = body.get("status") or {}
        phase = status.get("phase")
        idle = phase is None or phase == JobPhase.CREATING or phase in FINAL_PHASES
        if idle and not any(not p.gone for p in pods) and key not in self._fresh:
            self._drop_body(key)
            if phase != JobPhase.CREATING:
                self._seen.pop(key, None)

    def _drop_body(self, key: Key) -> None:
        """The job's body and the pacing of our writes of it. Not the revision of our last write:
        the watch may still bring that write's echo (a job applied without execute is dropped
        right after its first status write, before the echo of its finalizer patch), and taken
        for news it was reconciled again on a body without status: a second `new -> CREATING`
        write refused (409) and then counted, logged and posted as an Event twice."""
        self._jobs.pop(key, None)
        self._written_at.pop(key, None)
        self._passed.pop(key, None)

    def _forget(self, key: Key) -> None:
        self._drop_body(key)
        self._own.pop(key, None)
        self._seen.pop(key, None)
        self._deleted.pop(key, None)
        self._fresh.pop(key, None)
        self._gone.pop(key, None)
        self._errors.pop(key, None)
        self._unsettled.pop(key, None)
        self._unconfirmed.pop(key, None)
        self._refused.pop(key, None)
        self._forced_told.pop(key, None)
        self.phases.forget(key)
        self.waits.forget(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()

    async def _catalog_for(self, job: JobView) -> dict[str, InstanceTypeSpec]:
        """The InstanceType catalog; for a job about to start, types the cache does not know yet
        are fetched (an InstanceType created just before the job must not fail it)."""
        assert self.kube is not None
        catalog = self.instance_types.catalog()
        if job.status.attempt or (job.status.phase is not None and job.status.phase.is_final):
            return catalog
        for name in _listed_types(job):
            if name and name not in catalog and "/" not in name:
                raw = await self.kube.get(INSTANCETYPE_PLURAL, f"{JOBS_PATH}/{INSTANCETYPE_PLURAL}/{name}")
                if raw is not None:
                    self.instance_types.apply(raw, deleted=False)
                    found = self.instance_types.catalog().get(name)
                    if found is not None:
                        catalog[name] = found
        return catalog

    async def _pods_of(self, key: Key, job: JobView) -> list[PodView]:
        """The job's pods: the cache, our fresh creations, pods seen deleted; and when the status
        names a pod none of those know, the API server's word on it (one GET)."""
        # Pods left by an earlier ProjectJob of the same name (deleted while its pod was stuck
        # on a lost node) are not this job's: never adopted, never its outcome (_create_pod
        # waits for them to go when they hold the name of the pod to create).
        pods: dict[str, PodView] = {
            p.name: p for p in self.pods.get(key) if p.owned_by(job.uid, job.created_at)
        }
        gone = {n: v for n, v in self._gone.get(key, {}).items() if v.owned_by(job.uid, job.created_at)}
        fresh = self._fresh.get(key)
        if fresh is not None:
            if fresh.name in pods or fresh.name in gone:
                # The watch has shown the pod (its deletion counts: a DELETED event can be the
                # first the cache hears of a pod it never saw added).
                self._fresh.pop(key, None)
            else:
                pods[fresh.name] = fresh
        for name, view in gone.items():
            if name not in pods or pods[name].gone:
                pods[name] = view
        requested = self._deleted.get(key)
        if requested:
            # Forget deletions the watch has caught up with (the pod shows it, or is gone); the
            # others are shown to the plan as deleting already, so that it does not ask again.
            requested.intersection_update(n for n, p in pods.items() if not p.deleting and not p.gone)
            if not requested:
                self._deleted.pop(key, None)
            for name in requested:
                pods[name] = dataclasses.replace(pods[name], deleting=True)
        wanted = job.status.pod_name
        final = job.status.phase is not None and job.status.phase.is_final
        if wanted and wanted not in pods and not final and not job.deleting:
            assert self.kube is not None
            raw = await self.kube.get("pods", core_path(job.namespace, "pods", wanted))
            found = PodView.from_pod(raw) if raw is not None else None
            if found is not None and found.owned_by(job.uid, job.created_at):
                pods[wanted] = found
            else:
                pods[wanted] = PodView(name=wanted, attempt=job.status.attempt, gone=True)
        return list(pods.values())

    async def _with_warning(self, job: JobView, pods: list[PodView], now: datetime) -> list[PodView]:
        """The pods, the current one with its newest Warning Event while it waits on what only
        Events tell, or an autoscaler's scale-up for it while it is unschedulable
        (PodView.events_to_ask): one LIST of its Events, in those states only."""
        pod = _current_pod(job, pods)
        selector = pod.events_to_ask(now) if pod is not None and pod.uid else None
        if pod is None or selector is None:
            return pods
        if selector == SCALE_UP_SELECTOR:
            names = _listed_types(job)
            index = job.status.instance_type_index
            current = self.instance_types.catalog().get(names[index]) if index < len(names) else None
            if not scale_up_matters(names, index, current, pod, now):
                return pods
        assert self.kube is not None
        # resourceVersion=0: an API server with a cache of Events answers from it (none by default:
        # then etcd). An aid to the details, asked on reconciles of such a pod.
        query = with_query(
            core_path(job.namespace, "events"),
            fieldSelector=f"involvedObject.uid={pod.uid},{selector}",
            resourceVersion="0",
        )
        try:
            found = await self.kube.get("events", query)
        except APIError as exc:  # an aid to the details only
            jlog(
                logging.DEBUG,
                (job.namespace, job.name),
                "could not list the events of pod %s: %r",
                pod.name,
                exc,
            )
            return pods
        items = (found or {}).get("items") or ()
        if selector == SCALE_UP_SELECTOR:
            told = dataclasses.replace(pod, scale_up=scale_up_message(items))
        else:
            told = dataclasses.replace(pod, warning=latest_event_message(items, now))
        return [told if p is pod else p for p in pods]

    async def _force_cancel(self, job: JobView, action: ForceCancel) -> None:
        """Tell the runner of `action.pod` that the cancel is forced, once; should the store not take
        the word, delete the pod with 1 s instead (its program dies, its log files may be lost)."""
        told = (job.uid, action.attempt)
        key = (job.namespace, job.name)
        if self._forced_told.get(key) == told:
            return
        if await self.store.tell_forced_cancel(job, action.attempt):
            jlog(logging.INFO, key, "told the runner of pod %s that the cancel is forced", action.pod)
        else:
            await self._delete_pod(job, action.pod, DELETION_GRACE_SECONDS)
            jlog(
                logging.WARNING,
                key,
                "deleted pod %s with %ss: the forced cancel could not be told to its runner through "
                "the object store (its log files may be lost)",
                action.pod,
                DELETION_GRACE_SECONDS,
            )
        self._forced_told[key] = told

    async def _delete_pod(self, job: JobView, name: str, grace_seconds: int) -> bool:
        """Delete the job's pod `name` (the one the cache knows, by its uid) with that grace."""
        assert self.kube is not None
        uid = next((p.uid for p in self.pods.get((job.namespace, job.name)) if p.name == name), "")
        path = core_path(job.namespace, "pods", name)
        return await self.kube.delete("pods", path, grace_seconds=grace_seconds, uid=uid)

    async def _forced_result(self, job: JobView, attempt: int) -> RunnerResult | None:
        """The attempt's result.json once stored (asked each second; the caller bounds the wait)."""
        while not self.standing_down:
            await asyncio.sleep(1)
            stored = await self.store.stored_result(job, attempt, None)
            if stored is not None:
                return stored
        return None

    async def _result_of(self, job: JobView, pod: PodView | None) -> RunnerResult | ResultPointer | None:
        """The runner's result from the current pod's ship container (or result.json if it overflowed,
        or if the message was lost)."""
        if pod is None:
            return None
        ship = pod.container(SHIP_CONTAINER)
        unseen_end = ship is None or ship.state != "terminated"
        if unseen_end and (pod.gone or pod.terminal or evicted_from_lost_node(pod, datetime.now(UTC))):
            # The pod went, or ended, without the operator seeing its ship end: a drain evicted it
            # with the operator, someone deleted it, its node went silent (the kubelet reports
            # nothing more, while the containers may well have finished and stored their work)
            # or was deleted (the pod GC marks it Failed). The runner stored result.json on its
            # way out, with the job's logs and outputs. Not waited for: nothing says when it ended.
            stored = await self.store.stored_result(job, pod.attempt, None)
            if (
                stored is None
                and pod.gone
                and ship is not None
                and ship.state == "running"
                and not deleted_for_its_node(pod)  # no runner of it stores anything any more
            ):
                # Deleted with --force while its ship ran: the node stops the containers only
                # now, and the runner stores result.json a moment later on its way out. Read at
                # once only, the job ended listing no log file that the store then held.
                with contextlib.suppress(TimeoutError):
                    stored = await asyncio.wait_for(
                        self._forced_result(job, pod.attempt), FORCED_RESULT_WAIT_SECONDS
                    )
            return settled(None, stored)
        if ship is None or ship.state != "terminated":
            return None
        if not ship.message:
            # The ship stores result.json before it writes its termination message, which a full
            # disk on the node (the job filled it, most likely) can swallow: the outputs and logs
            # need not be lost with it. Asked once the pod has ended: its outcome is then decided.
            if not pod.terminal:
                return None
            return settled(None, await self.store.stored_result(job, pod.attempt, ship.finished_at))
        try:
            result = parse_termination_message(ship.message)
        except ValueError:
            jlog(logging.WARNING, (job.namespace, job.name), "unreadable runner result in pod %s", ship.name)
            return None
        if isinstance(result, ResultPointer):
            return settled(result, await self.store.stored_result(job, result.attempt, ship.finished_at))
        return result

    # --- actions -----------------------------------------------------------------------------

    async def _act(
        self, job: JobView, body: dict[str, Any], step: Plan, now: datetime
    ) -> tuple[dict[str, Any] | None, ProjectJobStatus, list[JobEvent], timedelta | None]:
        """Perform the plan's actions in order. Returns the (possibly updated) body, the status to
        write (the plan's, an ERROR when a pod could not be made, or PREPARING while the API server
        refuses it for now), the events to post and when to plan again."""
        assert self.kube is not None
        status = step.status
        events = list(step.events)
        for action in step.actions:
            if self.standing_down:
                # The leadership was lost while an action of the plan was under way: another
                # replica may act on the job already, and the rest of the plan is its to decide.
                raise StoodDown
            if isinstance(action, EnsureMetadata):
                meta: dict[str, Any] = {"resourceVersion": job.resource_version}
                if action.finalizer:
                    meta["finalizers"] = [*job.finalizers, FINALIZER]
                if action.labels:
                    meta["labels"] = dict(action.labels)
                body = await self.kube.merge_patch(
                    PROJECTJOB_PLURAL, job_path(job.namespace, job.name), {"metadata": meta}
                )
                self._remember(body)
                self._own[(job.namespace, job.name)] = revision(body)
                job = JobView.from_body(body)
            elif isinstance(action, CreatePod):
                assert step.spec is not None
                failure = await self._create_pod(job, step.spec, action, status, now)
                key = (job.namespace, job.name)
                if isinstance(failure, Held):
                    # Nothing written: the restore's status write must find the object as it made it.
                    jlog(
                        logging.INFO,
                        key,
                        "not started: the object store holds a run under %s; waiting until %s for a restored status",
                        failure.prefix,
                        failure.until.isoformat(timespec="seconds"),
                    )
                    told = (
                        f"not started yet: the object store holds a run of a job of this name "
                        f"({failure.prefix}result.json) and this job has no status, as a restored one "
                        f"before its status is written back; it runs at "
                        f"{failure.until.isoformat(timespec='seconds')} unless a status arrives, "
                        f"deleting that run's outputs and logs"
                    )
                    held = [JobEvent("Warning", "StoredRunFound", told)]
                    return body, job.status, held, failure.until - now
                if isinstance(failure, Refused):
                    waiting = await self._refused_pod(job, step.spec, action, failure, now)
                    if waiting.status.instance_type_index != action.type_index:
                        self._refused.pop(key, None)  # the next type's pod is tried at once
                        return body, waiting.status, list(waiting.events), waiting.requeue_after
                    count = self._refused.get(key, 0) + 1
                    self._refused[key] = count
                    delay = timedelta(seconds=error_backoff(count))
                    if waiting.requeue_after is not None:
                        delay = min(delay, waiting.requeue_after)  # the type's budget runs out
                    # Told once; the status and an Event tell the user.
                    level = logging.INFO if count == 1 else logging.DEBUG
                    jlog(
                        level,
                        key,
                        "pod refused, trying again in %.1fs: %s",
                        delay.total_seconds(),
                        failure.why,
                    )
                    return body, waiting.status, list(waiting.events), delay
                self._refused.pop(key, None)
                if isinstance(failure, str):
                    if status.image != failure:
                        status = status.model_copy(update={"image": failure})
                else:
                    if failure.status.phase is not None and failure.status.phase.is_final:
                        # An attempt after the first may fail before its pod (a mount gone, the
                        # registry Secret deleted): the earlier attempt's Secrets and claims stay
                        # otherwise, as no plan of a final job without pods deletes them.
                        await self._delete_secrets(job)
                        if step.spec.job_parameters.output_datasets:
                            await self._delete_dataset_claims(job)
                    return body, failure.status, [*events, *failure.events], step.requeue_after
            elif isinstance(action, DeletePod):
                key = (job.namespace, job.name)
                if action.name in self._deleted.get(key, ()):
                    continue  # asked already; the watch has not shown it yet
                if await self._delete_pod(job, action.name, action.grace_seconds):
                    self._deleted[key].add(action.name)
                    jlog(logging.INFO, key, "deleted pod %s (%s)", action.name, action.why)
            elif isinstance(action, ForceCancel):
                await self._force_cancel(job, action)
            elif isinstance(action, DeleteSecrets):
                await self._delete_secrets(job)
            elif isinstance(action, PublishDatasets):
                lost = await self._publish_datasets(job, action.dataset_ids)
                status, events = without_lost_datasets(status, events, lost)
            elif isinstance(action, DeleteDatasetClaims):
                await self._delete_dataset_claims(job)
            elif isinstance(action, DeleteRegistryPasswords):
                await self.kube.delete_collection(
                    "secrets", core_path(job.namespace, "secrets"), api_registry_password_selector(job.name)
                )
            elif isinstance(action, ClearData):
                await self._clear_data(job)
            elif isinstance(action, RemoveFinalizer):
                kept = foreign_project(job)
                if kept and not job.status.data_cleared:
                    # Said nowhere else: the job and its Events go with this write.
                    jlog(
                        logging.WARNING,
                        (job.namespace, job.name),
                        "deleted with its stored data kept: %s (python -m dsjobs.orphans lists it)",
                        kept,
                    )
                finalizers = [f for f in job.finalizers if f != FINALIZER]
                try:
                    await self.kube.merge_patch(
                        PROJECTJOB_PLURAL,
                        job_path(job.namespace, job.name),
                        {"metadata": {"finalizers": finalizers, "resourceVersion": job.resource_version}},
                    )
                except Conflict:
                    self._jobs.pop((job.namespace, job.name), None)
                    raise
                return None, status, events, step.requeue_after
        return body, status, events, step.requeue_after

    async def _refused_pod(
        self, job: JobView, spec: ProjectJobSpec, action: CreatePod, refused: Refused, now: datetime
    ) -> StatusUpdate:
        """The job's status while its pod is refused; past the type's budget, the next type."""
        if not refused.pod or not refused_by_type(refused.why):
            return waiting_to_create(job, refused.why, now, instance_type=action.instance_type)
        budget = schedule_budget((await self._catalog_for(job)).get(action.instance_type))
        names = spec.job_parameters.instance_type_names()
        return waiting_to_create(job, refused.why, now, action, names, budget, action.instance_type)

    async def _create_pod(
        self, job: JobView, spec: ProjectJobSpec, action: CreatePod, status: ProjectJobStatus, now: datetime
    ) -> StatusUpdate | Refused | Held | str:
        """Fetch what the pod needs, have prepare_pod (pure) check it and render the objects, and
        create them; the job container's image when it exists. A StatusUpdate (ERROR naming the cause) when the job cannot run: missing
        volume, unknown image, registry credentials. Refused when the API server forbids the pod
        or a claim for now (quota, admission, RBAC): the Secrets made for it are deleted again,
        the job waits and tries again. Held (its Secrets deleted too) when it may be a restored
        job whose status is yet to be written back."""
        assert self.kube is not None
        ns = job.namespace
        # Any pod an earlier ProjectJob of this name left: it holds this job's pod names and
        # writes under this job's prefix in the object store.
        earlier = next(
            (p for p in self.pods.get((ns, job.name)) if not p.owned_by(job.uid, job.created_at)), None
        )
        if earlier is not None:
            return Refused(_earlier_pod(earlier))
        ref = JobRef(job.name, ns, job.uid, spec.project_id)
        inputs = await self._pod_inputs(job, spec, action, status)
        prepared = prepare_pod(ref, spec, action, status, inputs, self.settings, self.storage_env, now)
        if isinstance(prepared, StatusUpdate):
            return prepared
        pod, secret, registry_body, image = (
            prepared.pod,
            prepared.runner_secret,
            prepared.registry_secret,
            prepared.image,
        )
        if self._refused.get((ns, job.name)):
            # Waiting on a quota or an admission policy: ask with a dry run first, which makes
            # nothing. Each try made and deleted the job's Secrets and listed its stored data, for
            # as long as the refusal lasted (every minute, hours on end). A dry run that fails
            # otherwise (a webhook without dry-run support) leaves the verdict to the real try.
            try:
                await self.kube.create("pods", with_query(core_path(ns, "pods"), dryRun="All"), pod)
            except Forbidden as exc:
                return Refused(refusal_hint(message_of(exc), self.settings.job_pod_security), pod=True)
            except APIError as exc:
                jlog(logging.DEBUG, (ns, job.name), "dry run of pod %s: %r", pod["metadata"]["name"], exc)
        # Meanwhile, not before: it is a request to the object store on every job's way to its pod.
        secret_made: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # A job the operator has not written a status for yet, created moments ago: a restore
        # creates the object and writes its status back right after (a write in between would
        # also make Velero's status update conflict).
        hold_until = (job.created_at or now) + timedelta(seconds=self.settings.restore_grace_seconds)
        may_be_restored = action.attempt == 1 and job.status.phase is None and now < hold_until
        clearing = (
            asyncio.ensure_future(
                self.store.clear_leftovers(
                    job, spec.project_id, secret_made, hold_for_restore=may_be_restored
                )
            )
            if action.attempt == 1
            else None
        )
        try:
            # Made only now: a job that fails one of the checks above leaves no Secret behind (a
            # failed job without a pod has nothing that would delete it).
            # The Secrets this call made (name, uid): all a refusal deletes. One there already is
            # this attempt's from before a restart, or a replica's whose pod may be running.
            made: list[tuple[str, str]] = []
            if registry_body is not None:
                try:
                    _remember(
                        made, await self.kube.create("secrets", core_path(ns, "secrets"), registry_body)
                    )
                except Forbidden as exc:
                    return Refused(message_of(exc))
            try:
                for claim in output_dataset_claims(ref, spec, self.settings):
                    # Before the pod that mounts them; every attempt writes to the same ones.
                    await self.kube.create(
                        "persistentvolumeclaims", core_path(ns, "persistentvolumeclaims"), claim
                    )
            except Forbidden as exc:
                # The registry Secret may exist already; the claims made stay for the next try (a
                # job that ends without its pod deletes them).
                await self._delete_made_secrets(ns, made)
                return Refused(message_of(exc))
            except Invalid as exc:
                await self._delete_made_secrets(ns, made)
                await self._delete_dataset_claims(job)
                why = message_of(exc)
                return fail(
                    spec, status, "PodRejected", f"an output dataset's claim was rejected: {why}", now
                )
            # The Secret before the pod: a pod whose Secret was refused (a quota on Secrets) would wait
            # for it for ever, and deleting it again would reuse its name for the next try.
            creating_pod = False
            try:
                runner_made = await self.kube.create("secrets", core_path(ns, "secrets"), secret)
                _remember(made, runner_made)
                made_here = runner_made is not None
                if not made_here and clearing is not None:
                    # There already: this operator's before a restart, or a POST retried after
                    # its answer was lost, as well as a replica's that took over. Only the last
                    # may have a runner writing: its pod exists.
                    name = pod["metadata"]["name"]
                    there = await self.kube.get("pods", core_path(ns, "pods", name))
                    made_here = there is None and not self.standing_down
                secret_made.set_result(made_here)
                if clearing is not None and await clearing:
                    await self._delete_made_secrets(ns, made)
                    return Held(hold_until, job_prefix(spec.project_id, job.name))
                creating_pod = True
                created = await self.kube.create("pods", core_path(ns, "pods"), pod)
            except (Forbidden, Invalid) as exc:
                # Without the pod nothing would ever delete the Secrets made for it.
                await self._delete_made_secrets(ns, made)
                why = message_of(exc)
                if isinstance(exc, Forbidden):
                    return Refused(refusal_hint(why, self.settings.job_pod_security), pod=creating_pod)
                if spec.job_parameters.output_datasets:
                    await self._delete_dataset_claims(job)
                return fail(spec, status, "PodRejected", f"the job's pod was rejected: {why}", now)
            if created is None:
                # It exists: ours from before a crash, or one an earlier ProjectJob of the same name
                # left that the cache has not shown yet.
                name = pod["metadata"]["name"]
                raw = await self.kube.get("pods", core_path(ns, "pods", name))
                holder = PodView.from_pod(raw) if raw is not None else None
                if holder is not None and not holder.owned_by(job.uid, job.created_at):
                    await self._delete_made_secrets(ns, made)
                    return Refused(_earlier_pod(holder))
            else:
                self._fresh[(ns, job.name)] = PodView.from_pod(created)
                seen = self._seen.pop((ns, job.name), None)
                if seen is not None and action.attempt == 1:
                    metrics.POD_CREATE_LATENCY.observe(time.monotonic() - seen)
                jlog(logging.INFO, (ns, job.name), "created pod %s", pod["metadata"]["name"])
                if action.attempt > 1:
                    await self._delete_superseded_secrets(job, action.attempt - 1)
            return image
        finally:
            if not secret_made.done():  # no Secret made here: nothing is cleared
                secret_made.set_result(False)
            if clearing is not None:
                await clearing

    async def _delete_made_secrets(self, namespace: str, made: Sequence[tuple[str, str]]) -> None:
        """The Secrets one pod's creation made, each only as made (uid precondition): a refused pod
        leaves those of other attempts, and those of its own attempt that a replica made."""
        assert self.kube is not None
        for name, uid in made:
            await self.kube.delete("secrets", core_path(namespace, "secrets", name), uid=uid)

    async def _delete_superseded_secrets(self, job: JobView, attempt: int) -> None:
        """The Secrets of the attempt before, once its successor's pod exists (its own pod is gone
        by then: never two attempts at once). They stayed until the job ended: one more per
        fallback, retry, or InstanceType change while pods waited. By name and role label (a
        user's Secret of that name stays)."""
        assert self.kube is not None
        old = pod_name(job.name, attempt)
        for name in (runner_secret_name(old), registry_secret_name(old)):
            try:
                await self.kube.delete_collection(
                    "secrets",
                    core_path(job.namespace, "secrets"),
                    operator_secrets_selector(job.name),
                    field_selector=f"metadata.name={name}",
                )
            except APIError as exc:  # the pod is made: the job's end deletes them all anyway
                jlog(logging.WARNING, (job.namespace, job.name), "could not delete Secret %s: %r", name, exc)

    async def _delete_secrets(self, job: JobView) -> None:
        """The Secrets the operator made for the job (runner config, registry), in one call."""
        assert self.kube is not None
        await self.kube.delete_collection(
            "secrets", core_path(job.namespace, "secrets"), operator_secrets_selector(job.name)
        )

    async def _publish_datasets(self, job: JobView, dataset_ids: Sequence[str]) -> list[str]:
        """Label each output dataset's claim with its id and drop the job's ownership (idempotent).
        The ids whose claim is gone or going: somebody deleted the operator's claim meanwhile."""
        assert self.kube is not None
        key = (job.namespace, job.name)
        lost: list[str] = []
        for dataset_id in dataset_ids:
            path = core_path(job.namespace, "persistentvolumeclaims", output_dataset_claim_name(dataset_id))
            try:
                claim = await self.kube.merge_patch(
                    "persistentvolumeclaims", path, published_dataset_patch(dataset_id)
                )
            except NotFound:
                claim = None
            if claim is None or (claim.get("metadata") or {}).get("deletionTimestamp"):
                jlog(logging.WARNING, key, "the claim of dataset %s is gone: not published", dataset_id)
                lost.append(dataset_id)
            else:
                jlog(logging.INFO, key, "published dataset %s", dataset_id)
        return lost

    async def _delete_dataset_claims(self, job: JobView) -> None:
        assert self.kube is not None
        await self.kube.delete_collection(
            "persistentvolumeclaims",
            core_path(job.namespace, "persistentvolumeclaims"),
            pending_output_datasets_selector(job.name),
        )

    async def _pod_inputs(
        self, job: JobView, spec: ProjectJobSpec, action: CreatePod, status: ProjectJobStatus
    ) -> PodInputs:
        """Read what prepare_pod needs for this job's pod: only what the job needs (the
        prepare.needs_* functions), nothing past an unknown instance type."""
        assert self.kube is not None
        ns = job.namespace
        instance_type = (await self._catalog_for(job)).get(action.instance_type)
        if instance_type is None:
            return PodInputs(None, self.instance_types.invalid())

        async def secret(name: str) -> dict[str, Any] | None:
            assert self.kube is not None
            return await self.kube.get("secrets", core_path(ns, "secrets", name))

        pvcs: list[PvcView] = []
        for selector in pvc_selectors(spec):
            items = await self.kube.list(
                "persistentvolumeclaims", core_path(ns, "persistentvolumeclaims"), selector
            )
            pvcs.extend(PvcView.from_pvc(p) for p in items)
        docker_images: dict[str, str] = {}
        if needs_docker_images(spec, status):
            cm = await self.kube.get("configmaps", core_path(ns, "configmaps", DOCKER_IMAGES_CONFIGMAP))
            docker_images = dict((cm or {}).get("data") or {})
        spark = spark_secret_name(spec)
        source = registry_password_source(spec)
        return PodInputs(
            instance_type,
            pvcs=pvcs,
            docker_images=docker_images,
            spark_secret=await secret(spark) if spark is not None else None,
            storage_classes=(
                await self.kube.list("storageclasses", STORAGE_CLASSES_PATH)
                if needs_storage_classes(spec)
                else ()
            ),
            project_storage_secret=(
                await secret(PROJECT_STORAGE_SECRET_NAME) if needs_project_storage(self.settings) else None
            ),
            registry_password_secret=await secret(source[0]) if source is not None else None,
        )

    async def _clear_data(self, job: JobView) -> None:
        assert self.kube is not None
        # From the raw spec: a spec the models cannot read (an edit after the start) must not
        # keep a deleted job's data for ever; the project and the inputs are all that is needed.
        found = stored_data_of(job.spec)
        if found is None:
            jlog(logging.WARNING, (job.namespace, job.name), "no valid projectId: no stored data deleted")
            return
        project, wanted = found
        own = await self._namespace_project(job.namespace)
        foreign = foreign_project(
            dataclasses.replace(job, namespace_project=own.project, project_namespace=own.holder)
        )
        if foreign:
            # Another project's prefix, or another namespace's: deleting there would delete that
            # project's (namespace's) job of the same name.
            jlog(logging.WARNING, (job.namespace, job.name), "no stored data deleted: %s", foreign)
            return
        await self._warm_input_refs()
        key = (job.namespace, job.name)
        self.input_refs.clearing(key, job.uid)
        try:
            await delete_job_data(
                self.store.deletion_client(),
                project,
                job.name,
                lambda: self.input_refs.unused(key, project, wanted),
                # Cleared before (a deleted job whose data had expired): its inputs were dealt with
                # then, and a job not seen yet may have uploaded one again since. The prefix still
                # goes: a pod may have shipped into it after.
                with_inputs=not job.status.data_cleared,
            )
        except Exception as exc:
            # Told once per streak of failed reconciles (which this failure begins or goes on).
            streak = self._errors.setdefault(key, _FailureStreak())
            body = self._jobs.get(key)
            if not streak.data_told and body is not None:
                streak.data_told = True
                self._post(body, [data_not_deleted(job.deleting, exc)])
            raise

    # --- writing -----------------------------------------------------------------------------

    async def _write_status(
        self,
        key: Key,
        job: JobView,
        body: dict[str, Any],
        status: ProjectJobStatus,
        events: Sequence[JobEvent] = (),
    ) -> dict[str, Any] | None:
        """Patch the status (merge patch of the difference) guarded by resourceVersion.
        None on a conflict (the cached body is dropped so that the next step reads afresh); the
        write is then remembered with the step's `events` until a later body tells whether it
        landed (`_settle_unconfirmed`)."""
        assert self.kube is not None
        self._settle_unconfirmed(key, body)
        new = status.to_cr()
        # What this version cannot read is left as it is: a newer version's keys (a rollback, a
        # newer replica's write), at any depth, and in a status that does not read, the values that
        # do not (for a person, or that version, to mend: the plan waits for it). A list the
        # new status changes is written whole, as a merge patch does.
        stored = known_of(body.get("status") or {}, job.status.to_cr())
        patch = merge_diff(stored, new)
        meta = body.get("metadata") or {}
        payload = {
            "metadata": {"resourceVersion": meta.get("resourceVersion", job.resource_version)},
            "status": patch,
        }
        try:
            written = await self.kube.merge_patch(
                PROJECTJOB_PLURAL, job_path(*key, subresource="status"), payload
            )
        except Conflict:
            metrics.STATUS_CONFLICTS.inc()
            self._jobs.pop(key, None)
            if key not in self._unconfirmed:
                # One still undecided was guarded by a newer resourceVersion than this one (this
                # step planned on an older body): this write cannot have landed, that one may.
                self._unconfirmed[key] = _Unconfirmed(
                    new,
                    job,
                    tuple(events),
                    tuple(self._passed.pop(key, ())),
                    revision(payload),
                    asyncio.get_running_loop().time(),
                )
            return None
        metrics.STATUS_WRITES.inc()
        self._written_at[key] = asyncio.get_running_loop().time()
        self._remember(written)
        self._own[key] = revision(written)
        return written

    def _settle_unconfirmed(self, key: Key, body: Mapping[str, Any]) -> None:
        """Decide a write that got a 409 (`_Unconfirmed`) by `body`, the job as stored now: holding
        exactly that status, it landed, and what follows a write happens now (the next step plans
        nothing to write, so nothing else would); otherwise it was refused and forgotten. A body
        not newer than the write's guard tells nothing yet (a watch event behind our GET)."""
        pending = self._unconfirmed.get(key)
        if pending is None:
            return
        version = revision(body)
        if 0 <= version <= pending.base:
            return
        del self._unconfirmed[key]
        try:
            stored = read_status(body.get("status") or {})[0].to_cr()
        except ValueError:
            stored = None
        if stored != pending.status:
            if pending.passed:  # still unwritten: told by the next write
                later = [p for p in self._passed.get(key, ()) if p not in pending.passed]
                self._passed[key] = [*pending.passed, *later]
            return
        metrics.STATUS_WRITES.inc()
        self._written_at[key] = max(self._written_at.get(key, pending.at), pending.at)
        self._after_write(key, pending.job, body, list(pending.events), passed=pending.passed)

    def _after_write(
        self,
        key: Key,
        job: JobView,
        written: Mapping[str, Any],
        events: list[JobEvent],
        passed: Sequence[str] | None = None,
    ) -> None:
        """The work of a written status (`job` the write was planned with): log the phase change,
        observe the metrics, post the step's Events (with the phases passed unwritten before it:
        `passed`, by default those held back since the last write)."""
        old = job.status
        new_status = written.get("status") or {}
        new_phase = str(new_status.get("phase") or "")
        old_phase = old.phase.value if old.phase is not None else ""
        try:
            fresh = read_stored(ProjectJobStatus, new_status)
        except ValueError:
            fresh = None
        if new_phase and new_phase != old_phase:
            self.phases.set(key, new_phase)
            ended = fresh is not None and fresh.phase is not None and fresh.phase.is_final
            if ended and fresh is not None:
                # Why it ended, in the line itself: triage from the logs alone.
                finished = get_condition(fresh, COND_FINISHED)
                reason = finished.reason if finished is not None else ""
                code = "" if fresh.return_code is None else f", return code {fresh.return_code}"
                jlog(
                    logging.INFO,
                    key,
                    "%s -> %s (%s%s)",
                    old_phase or "new",
                    new_phase,
                    reason or "no reason",
                    code,
                    reason=reason,
                    return_code=fresh.return_code,
                )
            else:
                jlog(logging.INFO, key, "%s -> %s", old_phase or "new", new_phase)
        if fresh is not None:
            # Once per job: a retry's attempt starts afresh (startedAt reset), and its wait would
            # count the failed attempt's run and the backoff. Before any retried failure no earlier
            # attempt can have started (a fallback to another type comes before any start); the
            # write that decides the first retry still holds the first attempt's startedAt.
            first_start = old.started_at is None and old.retried_failures == 0
            since = _queued_since(job, fresh)
            phase = fresh.phase
            if fresh.started_at and first_start and since is not None:
                metrics.QUEUE_TIME.labels(outcome="started").observe(
                    max(0.0, (fresh.started_at - since).total_seconds())
                )
            elif (
                since is not None
                and job.spec.get("execute") is True  # a job never executed was never queued
                and phase is not None
                and phase.is_final
                and not (old.phase is not None and old.phase.is_final)
                and fresh.finished_at
                and fresh.started_at is None
                and first_start
                and fresh.retried_failures == 0
            ):
                # It never started: a wait that only the end told (no capacity, an image never
                # pulled, a cancel while queued) counts too, or the queue looks best when it is worst.
                # Not a job refused before it queued (a type that does not exist, a missing mount):
                # it waited for no pod, and its near-zero "wait" made the queue look better.
                outcome = "cancelled" if phase == JobPhase.CANCELLED else "failed"
                if outcome == "cancelled" or fresh.pod_name or get_condition(fresh, COND_SCHEDULED):
                    metrics.QUEUE_TIME.labels(outcome=outcome).observe(
                        max(0.0, (fresh.finished_at - since).total_seconds())
                    )
            if (
                phase is not None
                and phase.is_final
                and fresh.finished_at
                and not old.finished_at
                and fresh.started_at
                # A retry taken back (its policy changed during the backoff): that attempt's run
                # was observed as RETRIED when the retry was decided.
                and fresh.retried_failures >= old.retried_failures
            ):
                metrics.RUN_TIME.labels(outcome=phase.value).observe(
                    max(0.0, (fresh.finished_at - fresh.started_at).total_seconds())
                )
            elif fresh.retried_failures > old.retried_failures and fresh.started_at:
                # The failed attempt's run: its startedAt is reset only with the next attempt's pod.
                retrying = get_condition(fresh, COND_RETRYING)
                failed_at = (retrying.last_transition_time if retrying is not None else None) or _now()
                metrics.RUN_TIME.labels(outcome="RETRIED").observe(
                    max(0.0, (failed_at - fresh.started_at).total_seconds())
                )
        self._post(written, events, self._passed.pop(key, ()) if passed is None else passed)

    def _post(self, body: Mapping[str, Any], events: Sequence[JobEvent], passed: Sequence[str] = ()) -> None:
        """Post the step's Events: phase changes as one chain, with the phases passed unwritten.
        The transitions counter counts the hops of these very Events: it and `kubectl describe`
        tell the same. `body` is the job as stored: it may tell that an earlier write landed,
        whose Events come first."""
        self._settle_unconfirmed(_key(body), body)
        told = with_passed_phases(events, passed)
        for before, after in phase_hops(told):
            metrics.TRANSITIONS.labels(from_phase=before, to_phase=after).inc()
        for event in told:
            if self.events is None:  # not started by Kopf (tests): nothing to post to
                log.debug("event not posted: %s %s", event.reason, event.message)
            else:
                self.events.post(body, event)

    # --- timers ------------------------------------------------------------------------------

    def _schedule(self, key: Key, delay: timedelta | None) -> None:
        """The job's one wake-up: what the latest reconcile asked for (None: no timer).

        Every reconcile derives all of a job's timers afresh from its timestamps, so its answer
        replaces the previous one (e.g. a fallback timer of a job that has since been scheduled).
        """
        existing = self._timers.pop(key, None)
        if existing is not None:
            existing[1].cancel()
        if delay is None:
            return
        seconds = min(max(delay.total_seconds(), 0.0), self.settings.max_requeue_seconds)
        loop = asyncio.get_running_loop()
        due = loop.time() + seconds

        def fire() -> None:
            self._timers.pop(key, None)
            # The callback's context goes on into the task.
            task = asyncio.ensure_future(self.reconcile(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._timers[key] = (due, loop.call_later(seconds + 0.05, fire, context=self._timer_context()))

    def _timer_context(self) -> contextvars.Context:
        """One context for all timers (half a timer's memory): built once Kopf's operator-wide
        variables are there, which they are in every handler and every timer's task."""
        if self._operator_context is not None:
            return self._operator_context
        ctx = operator_context()
        if any(var.name == _VAULT_VAR for var in ctx):
            self._operator_context = ctx
        return ctx


# Kopf's context variables of one handler invocation. The cause holds the event's whole body.
_HANDLER_VARS: Final = frozenset(
    {
        "cause_var",
        "handler_var",
        "subregistry_var",
        "subexecuted_var",
        "sublifecycle_var",
        "subsettings_var",
        "subrefs_var",
    }
)


# Kopf's auth vault: present once Kopf runs the operator.
_VAULT_VAR: Final = "vault_var"


def operator_context() -> contextvars.Context:
    """The current context without Kopf's per-handler variables: what a timer needs (the auth
    vault and event queue, operator-wide) and nothing that would keep the job's body alive for as
    long as the timer waits (14 days of data TTL, for 10k jobs)."""
    ctx = contextvars.Context()
    for var, value in contextvars.copy_context().items():
        if var.name not in _HANDLER_VARS:
            ctx.run(var.set, value)
    return ctx


# --- registration ------------------------------------------------------------------------------


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf builds a diff base (a deep copy of the whole body) on every event for its
    change-detection handlers. The operator has none, so that copy was a third of its CPU per job."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _remember(made: list[tuple[str, str]], created: Mapping[str, Any] | None) -> None:
    """Note a Secret `kube.create` made (None: it was there already)."""
    if created is not None:
        meta = created.get("metadata") or {}
        made.append((str(meta.get("name", "")), str(meta.get("uid", ""))))


#: Credentials read from a kubeconfig, by its paths: a login again (Kopf's, after a 401; the
#: leader election's each minute) refreshes their token instead of reading the files again.
#: No expiration is given to Kopf: each expiry closes its session (every watch cut), and an
#: expiration that differs at each login would defeat Kopf's refusal of credentials a 401 refused
#: (it compares them whole): a revoked token would be retried in a loop.
_KUBECONFIG_LOGINS: dict[str, tuple[KubeConfig, Refresh]] = {}


def login_info(kwargs: Mapping[str, Any]) -> kopf.ConnectionInfo | None:
    """$KUBECONFIG when set (development, tests, an operator outside its cluster), else the pod's
    service account, else ~/.kube/config.

    Kubeconfigs are read by dsjobs.kubeconfig, as the API reads them (token files, exec and
    auth-provider plugins, relative paths, several files): Kopf's own reader takes only a
    static token, so an operator run with an EKS or GKE kubeconfig was anonymous. Kopf's
    service-account login assumes `https://kubernetes.default.svc`; we use
    KUBERNETES_SERVICE_HOST/PORT like every in-cluster client (they also work where cluster DNS or
    Service routing does not, e.g. on the local process nodes).
    """
    paths = os.environ.get("KUBECONFIG")
    if paths:
        return _kubeconfig_login(paths)
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if info is not None and host:
        host = f"[{host}]" if ":" in host else host
        info = dataclasses.replace(info, server=f"https://{host}:{port}")
    default = Path.home() / ".kube" / "config"
    if info is None and default.exists():
        info = _kubeconfig_login(str(default))
    return info


def _kubeconfig_login(paths: str) -> kopf.ConnectionInfo:
    known = _KUBECONFIG_LOGINS.get(paths)
    if known is None:
        cfg, refresh = from_kubeconfig(paths)
    else:
        cfg, refresh = known
        if refresh is not None:
            cfg = refresh(cfg)
    _KUBECONFIG_LOGINS[paths] = (cfg, refresh)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ca_file,
        insecure=not cfg.verify,
        token=cfg.token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        proxy_url=cfg.proxy_url,
    )


#: How often the operator asks whether its CRDs are still served (one discovery GET).
SERVED_CHECK_SECONDS: Final = 60.0


#: How long a reconcile waits for the result.json of a pod deleted with --force while its ship
#: ran (the node gives the runner about 2 s on its way out; a slow store more).
FORCED_RESULT_WAIT_SECONDS: Final = 15


def served_problem(discovery: Mapping[str, Any] | None) -> str | None:
    """Why the operator cannot serve anything, from the API server's discovery document of
    dsjobs.dev/v1 (None: the group is not served at all); None when both CRDs are. Kopf
    resolves its resources once (no CRD scanning: fewer rights), so an operator started without
    them stayed up, healthy and idle for good, the CRDs applied again or not."""
    names = {str(r.get("name")) for r in (discovery or {}).get("resources") or () if isinstance(r, Mapping)}
    missing = [
        f"{plural}.{GROUP}" for plural in (PROJECTJOB_PLURAL, INSTANCETYPE_PLURAL) if plural not in names
    ]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)}: no such CustomResourceDefinition served by the API server; "
        "apply the CRDs (kubectl apply -k crds): the operator exits until they are served"
    )


def register(registry: kopf.OperatorRegistry, op: Operator) -> None:
    """Register the operator's handlers on a Kopf registry."""
    fastjson.install()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        shrink_tls_read_buffers()
        # Our Events go through events.EventPoster; Kopf posts none of its own.
        settings.posting.enabled = False
        # Server-side filtering: only our pods come over the wire (and into memory).
        settings.watching.label_selectors["pods"] = JOB_LABEL
        # Reconnect watches regularly; one silent past the API server's minutely BOOKMARK (a dead
        # connection: a vanished API server instance) is reconnected after WATCH_IDLE_SECONDS.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.inactivity_timeout = WATCH_IDLE_SECONDS
        settings.watching.connect_timeout = 10
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 10
        # No CRD/namespace observation: fewer RBAC rights; the resources exist before we start.
        settings.scanning.disabled = True
        settings.persistence.diffbase_storage = NoDiffBase()
        # Memory: list in pages, and let Kopf's per-object workers (each holding the last body it
        # saw) exit soon after their last event. A restart with 10k jobs then peaks at ~105 MB RSS
        # instead of ~235 MB (the whole list parsed at once).
        settings.watching.chunk_size = op.settings.watch_chunk_size or None
        settings.queueing.idle_timeout = op.settings.worker_idle_seconds
        metrics.serve(op.settings.metrics_port, op.settings.bind_address)
        metrics.LEADER.set(1)
        op.kube = Kube(settings, concurrency=op.settings.kube_concurrency)
        op.events = EventPoster(op.kube, op.settings.event_component)
        # Not awaited here: Kopf logs in only once its startup handlers are done.
        op.served_check = asyncio.ensure_future(op.check_served())
        op.resync = asyncio.ensure_future(op.resync_pods_forever())
        op.store_check = asyncio.ensure_future(op.store.check_access())

    @kopf.on.cleanup(registry=registry)
    async def flush_events(**_: Any) -> None:
        for task in (op.resync, op.store_check, op.served_check):
            if task is not None:
                task.cancel()
        if op.events is not None:
            await op.events.drain(timeout=5)
        # Stopped by a signal, Kopf still waits for its task watching our stop flag, for its 5 s
        # of leftover tasks: the Lease was released (and a standby took over) 5 s late.
        op.stop_flag.set()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return login_info(kwargs)

    @kopf.on.event(GROUP, VERSION, INSTANCETYPE_PLURAL, registry=registry)
    async def instance_type_event(event: kopf.RawEvent, **_: Any) -> None:
        await op.on_instance_type_event(event.get("type"), event["object"])

    @kopf.on.event(GROUP, VERSION, PROJECTJOB_PLURAL, registry=registry)
    async def job_event(event: kopf.RawEvent, **_: Any) -> None:
        await op.on_job_event(event.get("type"), dict(event["object"]))

    @kopf.on.event("pods", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    async def pod_event(event: kopf.RawEvent, **_: Any) -> None:
        await op.on_pod_event(event.get("type"), event["object"])
