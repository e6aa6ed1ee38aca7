"""What every RPC needs: who is calling, where the project or job is, reading and writing jobs, storage.

The servicers (servicer.py) are thin layers over this; nothing here keeps state that the cluster
or the object store does not also have.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import grpc
from botocore.exceptions import ClientError
from pydantic import ValidationError

from dsjobs import storage as st
from dsjobs.api import errors
from dsjobs.api.auth import Authenticator, Identity, Verb
from dsjobs.api.cluster import (
    InstanceTypeCatalog,
    JobIndex,
    ProjectIndex,
    ProjectInfo,
)
from dsjobs.api.errors import ApiError, KubeError
from dsjobs.api.ids import RESOURCE_ID_RULE, is_job_id, is_resource_id
from dsjobs.api.kube import JSON, MERGE_PATCH, Kube, jobs_path, secrets_path
from dsjobs.api.operations import JobSnapshot
from dsjobs.api.settings import Settings
from dsjobs.api.streams import LogBudget, StreamSlots
from dsjobs.controller.names import (
    API_CREATED_BY,
    API_CREATED_BY_LABEL,
    JOB_LABEL,
    PROJECT_LABEL,
    PROJECT_STORAGE_SECRET_NAME,
)
from dsjobs.controller.secrets import project_storage_env
from dsjobs.controller.settings import PROJECT_CREDENTIALS, STORAGE_CREDENTIALS_ENV
from dsjobs.models import File
from dsjobs.s3http import S3HttpError

log = logging.getLogger(__name__)

T = TypeVar("T")
# Concurrent object-store calls of one request (HEADs of a job's inputs).
_STORAGE_FANOUT = 16


@dataclass(frozen=True)
class InputCheck:
    """One distinct input (by sha256) and what the store holds for it."""

    path: str  # request field path of its first occurrence
    file: File
    stored_size: int | None  # None: not stored

    @property
    def present(self) -> bool:
        return self.stored_size is not None and self.stored_size == self.file.size_bytes


#: How long one object-store request of the API may wait (to connect, then for each read), and
#: how many tries it makes: a client waits for the answer, and a store that hangs must give an
#: UNAVAILABLE within about half a minute, not the minute per try of a background transfer.
STORAGE_TIMEOUT_SECONDS: Final = 10.0
STORAGE_ATTEMPTS: Final = 3
#: The slowest link a transfer is planned for: 256 KiB/s (2 Mbit/s, an ADSL or mobile uplink: with
#: 1 MiB/s the second of two 5 GiB inputs found its URL expired there). See `transfer_ttl`.
SLOW_LINK_BYTES_PER_SECOND: Final = 256 << 10
MAX_TRANSFER_TTL: Final = timedelta(hours=12)


def transfer_ttl(base: timedelta, total_bytes: int) -> timedelta:
    """Validity of the URLs of one answer: `base` (DSJOBS_API_URL_TTL) plus the time all of its
    files take on a slow link.

    The official CLI moves the files one after another, and a URL must still be valid when its
    transfer starts: with 15 minutes flat, the last inputs of a 10 GiB job on an 80 Mbit/s link
    were refused (403) after the first ones had taken 15 minutes.
    """
    extra = timedelta(seconds=max(total_bytes, 0) / SLOW_LINK_BYTES_PER_SECOND)
    return min(base + extra, max(base, MAX_TRANSFER_TTL))


def storage_error(exc: BaseException) -> ApiError | None:
    """What a client is told when object storage failed a call (None: not storage's failure).

    UNAVAILABLE, which clients retry: the store's own retries gave up on an outage (connection
    refused, timeouts, 5xx), or the store failed in a way it names. botocore's messages can carry
    the internal endpoint, so only their type is told."""
    if isinstance(exc, st.StorageError):
        return errors.unavailable(f"object storage failed: {exc}")
    refused = _store_refusal(exc)
    if refused is not None:
        status, code = refused
        # The API's own keys or settings, as a cluster's 403 for its service account: INTERNAL
        # (logged where answered), in words rather than an incident number and a traceback.
        why = (
            ": the API's storage keys are wrong or may not use the bucket, or its clock is off "
            "(an admin: DSJOBS_S3_ACCESS_KEY/DSJOBS_S3_SECRET_KEY, the bucket's policy)"
            if status in (401, 403)
            else ""
        )
        key = f" for {exc.key}" if isinstance(exc, S3HttpError) and exc.key else ""
        return errors.internal(f"object storage refused the API's request{key}: {code} ({status}){why}")
    if type(exc).__module__.startswith(("botocore", "boto3", "urllib3")):
        return errors.unavailable(f"object storage is unavailable: {type(exc).__name__}")
    if st.is_transient(exc):
        return errors.unavailable(f"object storage is unavailable: {type(exc).__name__}: {exc}"[:300])
    return None


def _store_refusal(exc: BaseException) -> tuple[int, str] | None:
    """(HTTP status, S3 error code) of a store's 4xx answer that no retry changes, else None."""
    if st.is_transient(exc):
        return None
    if isinstance(exc, S3HttpError):
        status, code = exc.status, exc.code
    elif isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(exc.response.get("Error", {}).get("Code") or status)
    else:
        return None
    return (status, code) if 400 <= status < 500 else None


class Core:
    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        store: st.Storage,
        auth: Authenticator,
        projects: ProjectIndex,
        jobs: JobIndex,
        catalog: InstanceTypeCatalog,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.store = store
        self.auth = auth
        self.projects = projects
        self.jobs = jobs
        self.catalog = catalog
        self.draining = asyncio.Event()
        self.streams = StreamSlots(settings.max_log_streams, settings.max_log_streams_per_caller)
        self.log_budget = LogBudget(settings.log_bytes_in_flight // settings.max_response_bytes)
        # Storage calls are blocking (boto3): they get their own threads so that a slow object
        # store never starves the default executor; the log streams' polls theirs, so that
        # thousands of followers (each asks about once a second) do not queue the calls'.
        self._io = ThreadPoolExecutor(max_workers=32, thread_name_prefix="dsjobs-api-io")
        self._log_io = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsjobs-api-logs")

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
        self._log_io.shutdown(wait=False, cancel_futures=True)

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._in(self._io, fn, *args, **kwargs)

    async def log_io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`io` in the log streams' own threads."""
        return await self._in(self._log_io, fn, *args, **kwargs)

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, lambda: fn(*args, **kwargs))
        except Exception as exc:
            err = storage_error(exc)
            if err is None:
                raise
            raise err from exc  # the call's failure is logged once, where it is answered

    # --- kubernetes ------------------------------------------------------------------------------

    async def k8s(self, verb: str, what: str, call: Awaitable[JSON]) -> JSON:
        """Run a Kubernetes call (timed by Kube.request), turning failures into gRPC errors about
        `what`."""
        try:
            return await call
        except KubeError as exc:
            # The call's failure is logged where it is answered (server._abort), once.
            log.debug("cluster call failed: %s %s: %s", verb, what, exc)
            raise errors.from_kube(exc, what) from exc

    # --- who and where ---------------------------------------------------------------------------

    async def identity(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        return await self.auth.authenticate(context.invocation_metadata())

    async def project(self, project_id: str, field: str = "project_id") -> ProjectInfo:
        if not project_id:
            raise errors.invalid_argument("is required", field)
        if not is_resource_id(project_id):
            raise errors.invalid_argument(
                f"{errors.quoted(project_id)} is not a project id ({RESOURCE_ID_RULE})", field
            )
        try:
            info = await self.projects.get(project_id)
        except KubeError as exc:
            raise errors.from_kube(exc, f"project {project_id!r}") from exc
        if info is None:
            raise errors.not_found(f"project {project_id!r} not found")
        return info

    async def authorized_project(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        project_id: str,
        verb: Verb,
        field: str = "project_id",
    ) -> tuple[Identity, ProjectInfo]:
        identity = await self.identity(context)
        info = await self.project(project_id, field)
        await self.auth.authorize(identity, verb, info.namespace, info.project_id)
        return identity, info

    async def locate(self, job_id: str, field: str = "job_id") -> list[tuple[str, str]]:
        """(namespace, project id) of each project namespace with a job of this id, or NOT_FOUND."""
        if not job_id:
            raise errors.invalid_argument("is required", field)
        if not is_job_id(job_id):
            raise errors.invalid_argument(
                f"{errors.quoted(job_id)} is not a job id ({RESOURCE_ID_RULE})", field
            )
        found: list[tuple[str, str]] = []
        try:
            for namespace in await self.jobs.locate(job_id):
                project_id = await self.projects.project_of_namespace(namespace)
                if project_id is not None:
                    found.append((namespace, project_id))
        except KubeError as exc:
            raise errors.from_kube(exc, f"job {job_id!r}") from exc
        if not found:
            raise errors.not_found(f"job {job_id!r} not found")
        return found

    async def read_job(self, namespace: str, job_id: str, *, fresh: bool = False) -> JobSnapshot | None:
        """The job, from the watch cache unless `fresh` (writes always start from a fresh read)."""
        if not fresh:
            cached = self.jobs.cached(namespace, job_id)
            if cached is not None:
                return snapshot(cached)
        try:
            obj = await self.kube.request("GET", jobs_path(namespace, job_id))
        except KubeError as exc:
            if exc.status == 404:
                self.jobs.forget(job_id, namespace)
                return None
            raise errors.from_kube(exc, f"job {job_id!r}") from exc
        self.jobs.remember(obj)
        return snapshot(obj)

    async def get_job(self, namespace: str, job_id: str, *, fresh: bool = False) -> JobSnapshot:
        job = await self.read_job(namespace, job_id, fresh=fresh)
        if job is None:
            raise errors.not_found(f"job {job_id!r} not found")
        return job

    async def authorized_job(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        job_id: str,
        verb: Verb,
        field: str = "job_id",
        *,
        fresh: bool = False,
    ) -> tuple[Identity, JobSnapshot]:
        """Authenticate, find the job's project, authorize `verb` there, then read the job.

        A job is its namespace's project's only when its spec says that project too: its data lives
        under the spec's project, so a job naming another project is no job of this one (the
        admission policy refuses such jobs; this holds where it is not installed). Should several
        namespaces have a job of this id, the first of a project the caller may use is the one.
        """
        identity = await self.identity(context)
        # One answer for a job that is not there and one the caller may not even read: a
        # PERMISSION_DENIED would tell anyone that another project ran a job of this id (an
        # Idempotency-Key's id can be computed from the key).
        hidden = errors.not_found(f"job {job_id!r} not found, or {identity.username} may not get it")
        try:
            located = await self.locate(job_id, field)
        except ApiError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise hidden from None
            raise
        denied: list[tuple[str, str]] = []
        for namespace, project_id in located:
            try:
                await self.auth.authorize(identity, verb, namespace, project_id)
            except ApiError as exc:
                if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                denied.append((namespace, project_id))
                continue
            job = await self.read_job(namespace, job_id, fresh=fresh)
            if job is not None and job.project_id == project_id:
                return identity, job
        if verb != Verb.GET:
            for namespace, project_id in denied:
                if await self.auth.allows(identity, Verb.GET, namespace, project_id):
                    # Not naming the project: the caller named a job id only.
                    raise errors.permission_denied(f"{identity.username} may not {verb.value} job {job_id!r}")
        raise hidden

    async def patch_job(
        self, job: JobSnapshot, patch: Mapping[str, Any], *, guard: bool = False
    ) -> JobSnapshot:
        """Merge-patch a job. `guard`: only if unchanged since it was read (else ABORTED)."""
        body = dict(patch)
        if guard:
            meta = dict(body.get("metadata") or {})
            meta["resourceVersion"] = job.resource_version
            body["metadata"] = meta
        obj = await self.k8s(
            "patch",
            f"job {job.name!r}",
            self.kube.request(
                "PATCH", jobs_path(job.namespace, job.name), body=body, content_type=MERGE_PATCH
            ),
        )
        self.jobs.remember(obj)
        return snapshot(obj)

    async def list_jobs(
        self, info: ProjectInfo, *, limit: int, continue_token: str = ""
    ) -> tuple[list[Mapping[str, Any]], str]:
        params: dict[str, str | int] = {"labelSelector": f"{PROJECT_LABEL}={info.project_id}", "limit": limit}
        if continue_token:
            params["continue"] = continue_token
        result = await self.k8s(
            "list",
            f"jobs of project {info.project_id!r}",
            self.kube.request("GET", jobs_path(info.namespace), params=params),
        )
        cont = str((result.get("metadata") or {}).get("continue") or "")
        return list(result.get("items") or []), cont

    async def all_jobs(self, info: ProjectInfo) -> ProjectJobs:
        out = ProjectJobs([], [])
        cont = ""
        while True:
            items, cont = await self.list_jobs(info, limit=500, continue_token=cont)
            # Reading a page of 500 jobs takes tens of ms of CPU: in a thread, so that the replica's
            # other calls are answered meanwhile (DeleteAllData's operation is polled with it).
            await asyncio.to_thread(read_jobs, items, out)
            if not cont:
                return out

    # --- storage ---------------------------------------------------------------------------------

    async def check_inputs(self, project_id: str, files: Sequence[tuple[str, File]]) -> list[InputCheck]:
        """HEAD each distinct input (by sha256) in the project's content-addressed store; the
        empty file is never stored, so it is always there."""
        first: dict[str, tuple[str, File]] = {}
        for path, f in files:
            first.setdefault(f.sha256, (path, f))
        gate = asyncio.Semaphore(_STORAGE_FANOUT)

        async def head(path: str, f: File) -> InputCheck:
            if not st.is_stored_input(f.sha256, f.size_bytes):
                return InputCheck(path, f, 0)
            async with gate:
                info = await self.io(self.store.head, st.input_key(project_id, f.sha256))
            return InputCheck(path, f, None if info is None else info.size)

        return list(await asyncio.gather(*(head(p, f) for p, f in first.values())))

    async def presign_put(self, namespace: str, files: Iterable[tuple[str, int]]) -> dict[str, str]:
        """`(key, size)` -> presigned PUT URL, valid long enough for all of them (`transfer_ttl`);
        signed with the project's own key pair when runners get it (DSJOBS_STORAGE_CREDENTIALS=
        project): a store that took a header the URL did not sign (x-amz-copy-source: a copy of
        any object the key may read) then reaches the project's own objects only."""
        wanted = dict(files)
        if not wanted:
            return {}
        credentials = await self.project_storage_keys(namespace)
        ttl = transfer_ttl(self.settings.url_ttl, sum(wanted.values()))
        urls = await self.io(
            lambda: [
                self.store.presign_put(k, expires=ttl, size=size, credentials=credentials)
                for k, size in wanted.items()
            ]
        )
        return dict(zip(wanted, urls, strict=True))

    async def project_storage_keys(self, namespace: str) -> tuple[str, str] | None:
        """The project's own storage key pair (its `dsjobs-project-storage` Secret) when the
        settings say runners use it, else None (the bucket-wide keys); FAILED_PRECONDITION naming
        the Secret when it cannot be used, as the operator would fail the job."""
        if self.settings.storage_credentials != PROJECT_CREDENTIALS:
            return None
        what = f"Secret {PROJECT_STORAGE_SECRET_NAME!r} in namespace {namespace}"
        try:
            secret: JSON | None = await self.k8s(
                "get", what, self.kube.request("GET", secrets_path(namespace, PROJECT_STORAGE_SECRET_NAME))
            )
        except ApiError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            secret = None
        env, problem = project_storage_env({}, secret)
        if env is None:
            raise errors.failed_precondition(
                f"project storage credentials: {what} {problem} (the API runs with "
                f"{STORAGE_CREDENTIALS_ENV}={PROJECT_CREDENTIALS}; runners and upload URLs use it)"
            )
        return env[st.ENV_ACCESS_KEY], env[st.ENV_SECRET_KEY]

    async def presign_get(self, files: Iterable[tuple[str, str, int]]) -> dict[str, str]:
        """`(key, download file name, size)` -> presigned GET URL, valid long enough for all of
        them (`transfer_ttl`)."""
        wanted = {k: (name, size) for k, name, size in files}
        if not wanted:
            return {}
        ttl = transfer_ttl(self.settings.url_ttl, sum(size for _, size in wanted.values()))
        urls = await self.io(
            lambda: [
                self.store.presign_get(k, expires=ttl, filename=n or None) for k, (n, _) in wanted.items()
            ]
        )
        return dict(zip(wanted, urls, strict=True))


@dataclass(frozen=True)
class ProjectJobs:
    """A project's jobs: those that read, and the names of those whose resource does not (a value
    its schema refuses, written by hand) and whose data is not known to be cleared."""

    jobs: list[JobSnapshot]
    unreadable: list[str]


def read_jobs(items: Iterable[Mapping[str, Any]], out: ProjectJobs) -> None:
    """Adds `items` (ProjectJob resources) to `out`: those that read, and the names of the others."""
    for item in items:
        job = try_snapshot(item)
        if job is not None:
            out.jobs.append(job)
        elif not (item.get("status") or {}).get("dataCleared"):
            out.unreadable.append(str((item.get("metadata") or {}).get("name", "?")))


def snapshot(obj: Mapping[str, Any]) -> JobSnapshot:
    try:
        return JobSnapshot.from_cr(obj)
    except ValidationError as exc:
        name = (obj.get("metadata") or {}).get("name", "?")
        raise errors.failed_precondition(
            f"job {name!r} cannot be read (its resource does not match the schema: "
            f"{exc.error_count()} problems, first: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})"
        ) from exc


def try_snapshot(obj: Mapping[str, Any]) -> JobSnapshot | None:
    try:
        return JobSnapshot.from_cr(obj)
    except ValidationError:
        log.warning("skipping unreadable job %s", (obj.get("metadata") or {}).get("name"))
        return None


def job_labels(project_id: str, job_id: str) -> dict[str, str]:
    return {PROJECT_LABEL: project_id, JOB_LABEL: job_id, API_CREATED_BY_LABEL: API_CREATED_BY}


def now() -> datetime:
    return datetime.now(UTC)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:40]
