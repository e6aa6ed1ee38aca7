"""The RPCs: ProjectJobService, OperationService, ProjectService.

Each one authenticates, authorizes, validates, converts and writes the ProjectJob; the operator
does the work. Errors are raised as `ApiError` and turned into statuses by the server's
interceptor. Semantics and deviations from DataSphere: docs/api.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import empty_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

from dsjobs import convert, logrecords
from dsjobs import storage as st
from dsjobs.api import errors, ids, listfilter, operations, pagetoken
from dsjobs.api.auth import Identity, Verb
from dsjobs.api.clientpaths import as_seen_by, is_creator, spec_as_seen_by
from dsjobs.api.cluster import (
    COMMUNITY_ANNOTATION,
    PROJECT_DESCRIPTION_ANNOTATION,
    PROJECT_NAME_ANNOTATION,
    ProjectInfo,
)
from dsjobs.api.core import Core, InputCheck, digest, job_labels, now, snapshot, try_snapshot
from dsjobs.api.errors import ApiError, KubeError
from dsjobs.api.kube import jobs_path, secrets_path
from dsjobs.api.metrics import LOG_RECORDS_SENT
from dsjobs.api.operations import JobSnapshot, OpKind, OpRef
from dsjobs.controller.names import EXECUTE_REQUESTED_AT, FINALIZER, REGISTRY_PASSWORD_ROLE, SECRET_ROLE_LABEL
from dsjobs.controller.podview import parse_time
from dsjobs.controller.secrets import (
    REGISTRY_HOSTS_ANNOTATION,
    is_registry_password,
    registry_of,
    registry_password_source_problem,
)
from dsjobs.convert import params as params_conv
from dsjobs.convert.common import ConversionError, file_to_proto, from_duration, timestamp
from dsjobs.convert.listsizes import oversized_lists
from dsjobs.models import (
    API_VERSION,
    PROJECTJOB_KIND,
    CancelRequest,
    File,
    JobParameters,
    Progress,
    ProjectJobSpec,
    SecretKeyRef,
    StoredFile,
    format_duration,
)
from dsjobs.models.limits import MAX_DATA_TTL, MAX_REGISTRY_PASSWORD_BYTES, MIN_DATA_TTL
from dsjobs.models.paths import last_name
from dsjobs.pb.yandex.cloud.datasphere.v2 import project_pb2, project_service_pb2, project_service_pb2_grpc
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2, project_job_service_pb2_grpc
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.pb.yandex.cloud.operation import operation_pb2, operation_service_pb2, operation_service_pb2_grpc
from dsjobs.validation import (
    Problem,
    cancel_reason_problems,
    problems_from_validation_error,
    validate_job_spec,
)

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

IDEMPOTENCY_KEY = "idempotency-key"
REQUEST_DIGEST_ANNOTATION = "dsjobs.dev/request-digest"
IDEMPOTENCY_ANNOTATION = "dsjobs.dev/idempotency-key-digest"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
MAX_DOWNLOAD_FILES = 1000
# A filtered List looks at this many Kubernetes pages at most before answering a short page.
MAX_FILTER_ROUNDS = 10
# A List page ends before its jobs pass this many bytes (a job may be ~1 MB): clients receive at
# most 4 MiB by default (grpc's and the official CLI's channel), and a page they cannot receive
# would break listing the project for everyone.
MAX_LIST_RESPONSE_BYTES = 3 * 1024 * 1024
# How often a following log stream re-reads the job to notice that it ended.
JOB_RECHECK_SECONDS = 1.0
#: How often a log stream reads the store while its job's pod has no node (status said so): it
#: cannot hold records then; the job's change wakes the stream. Not never: a status that lags (the
#: operator down) must not hold back what a running pod stores.
UNPLACED_POLL_SECONDS = 15.0
# Where a Clone that may not inherit the source's registry password gives its own.
CLONE_PASSWORD_FIELD = "job_parameters_overrides.env.docker_image_spec.password_plain_text"


# --- conversions --------------------------------------------------------------------------------


def job_proto(job: JobSnapshot) -> jobs_pb2.Job:
    return convert.job_to_proto(job.name, job.spec, job.status, created_at=job.created_at)


def job_metadata_proto(job: JobSnapshot) -> jobs_pb2.JobMetadata:
    return convert.job_metadata_to_proto(job.name, job.spec, job.status, created_at=job.created_at)


def _storage_file(f: File | StoredFile, url: str) -> jobs_pb2.StorageFile:
    return jobs_pb2.StorageFile(file=file_to_proto(f), url=url)


def _inputs(params: JobParameters, prefix: str = "job_parameters") -> list[tuple[str, File]]:
    """Every file the client uploads: input files and Python local modules, with their field paths."""
    files = [(f"{prefix}.input_files[{i}]", f) for i, f in enumerate(params.input_files)]
    if params.env is not None and params.env.python_env is not None:
        files += [
            (f"{prefix}.env.python_env.local_modules[{i}]", f)
            for i, f in enumerate(params.env.python_env.local_modules)
        ]
    return files


# A log stream of such a job answered nothing at all, as if the job had printed nothing.
_LOGS_WENT: Final = ", its logs with it"


def _refuse_unavailable_data(job: JobSnapshot, more: str = "") -> None:
    """FAILED_PRECONDITION when the job's stored data is deleted or going (operations.data_unavailable)."""
    if operations.data_unavailable(job):
        raise errors.failed_precondition(
            f"the data of job {job.name!r} {operations.data_deletion_words(job.status)}{more}"
        )


def _missing_message(missing: Sequence[InputCheck], *, clone: bool = False) -> str:
    lines = []
    for c in missing[:20]:
        have = "not uploaded" if c.stored_size is None else f"stored with {c.stored_size} bytes"
        lines.append(
            f"{c.path} {c.file.desc.path!r} (sha256 {c.file.sha256[:12]}..., {c.file.size_bytes} bytes): {have}"
        )
    more = f"\n... and {len(missing) - 20} more" if len(missing) > 20 else ""
    if clone:
        return "inputs of the source job missing from storage:\n" + "\n".join(lines) + more
    return (
        "inputs are missing from storage; upload them to the URLs Create returned (an input Create "
        "gave no URL for was stored then, and deleted since with the last job that used it: create "
        "the job again):\n" + "\n".join(lines) + more
    )


def _metadata_value(context: Context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k.lower() == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return ""


def _check_data_ttl(d: Duration | None, field: str) -> None:
    if d is None:
        return
    try:
        ttl = from_duration(d, field)
    except ConversionError as exc:
        raise _conversion_error(exc) from exc
    if not MIN_DATA_TTL <= ttl <= MAX_DATA_TTL:
        # One problem, as every other of a request is told (`field: message [rule]`).
        raise errors.from_problems(
            [
                Problem(
                    field,
                    "data-ttl",
                    "must be between 1h and 365d (unset: keep the data forever, the CLI's --days infinity)",
                )
            ]
        )


def _fingerprint(request: svc.CreateProjectJobRequest | svc.CloneProjectJobRequest) -> str:
    """The digest a retry with the same Idempotency-Key must match: the request without its
    registry password (never stored, not even hashed)."""
    copy = type(request).FromString(request.SerializeToString())
    params = (
        copy.job_parameters
        if isinstance(copy, svc.CreateProjectJobRequest)
        else copy.job_parameters_overrides
    )
    # Only a docker_image_spec has a password; touching that field otherwise would select it in
    # the oneof and drop docker_image_resource_id from the digest.
    if params.env.WhichOneof("docker_image") == "docker_image_spec":
        params.env.docker_image_spec.ClearField("password_plain_text")
    return digest(copy.SerializeToString(deterministic=True))


def _adopt_password_ref(spec: ProjectJobSpec, secret_name: str) -> SecretKeyRef | None:
    """Point a clone's registry password at its own Secret; the source's ref if it inherited one.

    The source's Secret belongs to the source job (and goes with it), so the clone stores a copy.
    """
    docker = spec.job_parameters.docker_image()
    ref = docker.password_secret_ref if docker is not None else None
    if docker is None or ref is None or ref.name == secret_name:
        return None  # no password in a Secret, or the overrides' own plain-text one
    docker.password_secret_ref = SecretKeyRef(name=secret_name, key=params_conv.DOCKER_PASSWORD_KEY)
    return ref


def _log_cleanup_failure(task: asyncio.Task[None]) -> None:
    """Log how a cleanup whose call ended meanwhile failed (its own KubeErrors it logs itself)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a cleanup failed after its call ended", exc_info=task.exception())


def _outcome_unknown(exc: KubeError) -> bool:
    """Whether a write that failed so may have been stored all the same: no answer at all (a
    timeout, a reset connection: status 0) or a server-side failure that can come after the
    write reached etcd (5xx, a 504 or `Timeout` of the API server). Other answers are refusals."""
    return exc.status == 0 or exc.status >= 500 or exc.reason == "Timeout"


def _retried_with_the_key(exc: BaseException) -> bool:
    """Whether a keyed Create that failed so leaves its job to the key's retry: the call was given
    up (cancelled: its client's deadline passed) or a write of it got no answer (UNAVAILABLE),
    which the client retries with the key. Such a retry may already have found the job and been
    answered with it while this call was still storing the password Secret: removing the job
    would take it from under that answer. Refusals (and a leftover Secret of an earlier attempt,
    which the retry must not take) remove it."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    cause = exc.__cause__
    return isinstance(exc, ApiError) and isinstance(cause, KubeError) and _outcome_unknown(cause)


def _conversion_error(exc: Exception, prefix: str = "") -> ApiError:
    if isinstance(exc, ConversionError):
        return errors.from_problems([Problem(exc.path, "type", str(exc).split(": ", 1)[-1])])
    if isinstance(exc, ValidationError):
        return errors.from_problems(problems_from_validation_error(exc, prefix or "job_parameters"))
    raise exc


def _check_list_sizes(params: jobs_pb2.JobParameters, path: str) -> None:
    # Before the conversion: its cost grows with the entries of lists the count alone refuses.
    problems = oversized_lists(params, path)
    if problems:
        raise errors.from_problems(problems)
    docker = params.env.docker_image_spec
    size = len(docker.password_plain_text.encode())
    if size > MAX_REGISTRY_PASSWORD_BYTES:
        # Never in the spec, so no rule of the validator sees it: the operator's registry Secret
        # holds it twice (plain and in base64), and one past a Secret's 1 MiB failed the job's
        # every reconcile after its uploads.
        raise errors.invalid_argument(
            f"must be at most {MAX_REGISTRY_PASSWORD_BYTES} bytes (UTF-8), not {size}",
            f"{path}.env.docker_image_spec.password_plain_text",
        )


@dataclass(frozen=True)
class _NewJob:
    """What Create and Clone work out before they write the ProjectJob."""

    job_id: str
    key: str  # the Idempotency-Key; "" without one
    spec: ProjectJobSpec
    password: str | None  # a plain-text registry password, for the job's Secret
    kind: OpKind
    fingerprint: str  # see _fingerprint
    checks: Sequence[InputCheck]  # the job's inputs in the store


# --- ProjectJobService --------------------------------------------------------------------------


#: When a job POST without an answer found no job, the pauses before looking again: the API
#: server may store it still (its request timeout is 60 s, ours gave up at 20), and a job stored
#: then stayed CREATING for ever, beside the one the CLI's retry made.
UNANSWERED_RECHECKS: Final = (2.0, 8.0, 20.0, 40.0)


class ProjectJobService(project_job_service_pb2_grpc.ProjectJobServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core
        # Cleanups that outlive a cancelled call (see _shielded): referenced until they end.
        self.cleanups: set[asyncio.Task[None]] = set()
        self.unanswered_rechecks: tuple[float, ...] = UNANSWERED_RECHECKS
        # Set at a shutdown: cleanups waiting to look again look now, and schedule no more.
        self.hurrying = asyncio.Event()

    # Create / Clone ----------------------------------------------------------------------------

    async def Create(self, request: svc.CreateProjectJobRequest, context: Context) -> operation_pb2.Operation:
        identity, info = await self.core.authorized_project(context, request.project_id, Verb.CREATE)
        key, job_id = self._job_id(context, identity, info, "Create")
        _check_list_sizes(request.job_parameters, "job_parameters")
        try:
            spec = params_conv.spec_from_create_request(
                request,
                created_by_id=identity.username,
                docker_password_secret_name=params_conv.docker_password_secret_name(job_id),
            )
        except (ConversionError, ValidationError) as exc:
            raise _conversion_error(exc) from exc
        await self._validate(spec, OpKind.CREATE)
        checks = await self.core.check_inputs(info.project_id, _inputs(spec.job_parameters))
        new = _NewJob(
            job_id=job_id,
            key=key,
            spec=spec,
            password=params_conv.docker_password_from_proto(request.job_parameters),
            kind=OpKind.CREATE,
            fingerprint=_fingerprint(request),
            checks=checks,
        )
        return await self._create(identity, info, new)

    async def Clone(self, request: svc.CloneProjectJobRequest, context: Context) -> operation_pb2.Operation:
        identity, source = await self.core.authorized_job(
            context, request.source_job_id, Verb.GET, "source_job_id"
        )
        info = await self.core.project(source.project_id)
        await self.core.auth.authorize(identity, Verb.CREATE, info.namespace, info.project_id)
        key, job_id = self._job_id(context, identity, info, "Clone")
        _check_list_sizes(request.job_parameters_overrides, "job_parameters_overrides")
        unapplied = params_conv.clone_override_problems(
            source.spec.job_parameters, request.job_parameters_overrides
        )
        if unapplied:
            raise errors.from_problems(unapplied)
        secret_name = params_conv.docker_password_secret_name(job_id)
        try:
            # Outputs inherited from another user's job get the paths that user's Get shows: the
            # clone's Execute has the cloner's CLI write them.
            spec = params_conv.spec_from_clone_request(
                spec_as_seen_by(source.spec, identity.username),
                request,
                created_by_id=identity.username,
                docker_password_secret_name=secret_name,
            )
        except (ConversionError, ValidationError) as exc:
            raise _conversion_error(exc, prefix="job_parameters_overrides") from exc
        inherited = _adopt_password_ref(spec, secret_name)
        await self._validate(spec, OpKind.CLONE)
        password = params_conv.docker_password_from_proto(request.job_parameters_overrides)
        if inherited is not None:
            password = await self._read_password(source, inherited, identity.username)
        checks = await self.core.check_inputs(info.project_id, _inputs(spec.job_parameters))
        # Inputs the clone inherits must still be stored: the client only has files for its overrides.
        new_shas = {f.sha256 for f in request.job_parameters_overrides.input_files}
        gone = [c for c in checks if not c.present and c.file.sha256 not in new_shas]
        if gone:
            raise errors.failed_precondition(
                f"source job {source.name!r} no longer has all its inputs stored (its data was deleted or "
                "expired); create a new job instead.\n" + _missing_message(gone, clone=True)
            )
        new = _NewJob(
            job_id=job_id,
            key=key,
            spec=spec,
            password=password,
            kind=OpKind.CLONE,
            fingerprint=_fingerprint(request),
            checks=checks,
        )
        return await self._create(identity, info, new)

    def _job_id(
        self, context: Context, identity: Identity, info: ProjectInfo, method: str
    ) -> tuple[str, str]:
        """(Idempotency-Key, job id): the id is derived from the key when there is one."""
        key = _metadata_value(context, IDEMPOTENCY_KEY)
        if len(key) > ids.MAX_IDEMPOTENCY_KEY_LENGTH:
            raise errors.invalid_argument(
                f"must be at most {ids.MAX_IDEMPOTENCY_KEY_LENGTH} characters", "Idempotency-Key"
            )
        if key:
            return key, ids.idempotent_job_id(info.project_id, identity.username, method, key)
        return "", ids.new_job_id()

    async def _validate(self, spec: ProjectJobSpec, kind: OpKind) -> None:
        catalog = self.core.catalog
        known = await catalog.names(spec.job_parameters.instance_type_names())
        invalid = catalog.invalid() if known is not None else {}
        # In a thread: a spec at its limits takes hundreds of ms (a 256 KiB conda_yaml to load),
        # which every other call of this replica would otherwise wait out.
        problems = await asyncio.to_thread(
            validate_job_spec,
            spec,
            known_instance_types=known,
            invalid_instance_types=invalid,
            infinity_writable=False,
        )
        if problems:
            raise errors.from_problems(problems, errors.CLONE_SUBJECT if kind == OpKind.CLONE else "")

    async def _read_password(self, source: JobSnapshot, ref: SecretKeyRef, username: str) -> str:
        """The source job's registry password, for the clone's own Secret: only for the source
        job's creator, and only from a Secret the operator would send to that job's registry
        itself (the API reads Secrets its callers may not: a source job applied with kubectl may
        name any Secret of the namespace)."""
        fix = "pass the docker image with its password in the overrides"
        if not is_creator(source.spec, username):
            # The clone, and so its Secret, would be the caller's: editing the clone's image
            # before executing it, they would pull anything of that registry with the creator's
            # credential.
            creator = repr(source.spec.created_by_id) if source.spec.created_by_id else "not named in the job"
            raise errors.failed_precondition(
                f"{CLONE_PASSWORD_FIELD}: the registry password of the source job {source.name!r} is "
                f"its creator's ({creator}) and goes only into their own clones; give your own: pass "
                "the docker image in the overrides with your password (password_plain_text, or "
                "password_ds_secret_name for a project secret: the CLI's fork takes --docker-image-url "
                "with --docker-image-password-secret-id)"
            )
        # One answer for a missing Secret and one not labelled as a registry password (as the
        # operator's): a member who may not read the namespace's Secrets would otherwise learn
        # which names exist, by cloning jobs of theirs naming them.
        unusable = errors.failed_precondition(
            f"the source job's registry password: no Secret {ref.name!r} labelled "
            f"{SECRET_ROLE_LABEL}={REGISTRY_PASSWORD_ROLE} in its namespace (only such Secrets are "
            f"used as passwords); {fix}"
        )
        try:
            secret = await self.core.kube.request("GET", secrets_path(source.namespace, ref.name))
        except KubeError as exc:
            if exc.status == 404:
                raise unusable from exc
            raise errors.from_kube(exc, f"secret {ref.name!r}") from exc
        if not is_registry_password(secret):
            raise unusable
        image = source.spec.job_parameters.docker_image()
        problem = registry_password_source_problem(
            secret, by_ref=True, job_uid=source.uid, image_url=image.image_url if image else ""
        )
        if problem:
            raise errors.failed_precondition(
                f"the registry password Secret {ref.name!r} of the source job {problem}; {fix}"
            )
        raw = (secret.get("data") or {}).get(ref.key)
        if not raw:
            raise errors.failed_precondition(f"the Secret {ref.name!r} has no key {ref.key!r}; {fix}")
        return base64.b64decode(raw).decode(errors="replace")

    async def _create(self, identity: Identity, info: ProjectInfo, new: _NewJob) -> operation_pb2.Operation:
        # What can fail without leaving anything behind goes first.
        uploads = await self._upload_files(info.namespace, info.project_id, new.checks)
        obj, created = await self._post_job(info, new)
        try:
            job = snapshot(obj)
            self.core.jobs.remember(obj)
            if new.password is not None:
                await self._store_password(job, new.password, created=created)
            operation = operations.create_operation(job.ref(new.kind), job, uploads)
        except BaseException as exc:
            if created and not (new.key and _retried_with_the_key(exc)):
                # Nothing half-created: the caller learns no job id, and the official CLI retries
                # UNAVAILABLE without an Idempotency-Key, which would leave one job per attempt.
                await self._shielded(self._discard(obj))
            raise
        if created:
            log.info(
                "job created",
                extra={
                    "job": job.name,
                    "project": job.project_id,
                    "user": identity.username,
                    "kind": new.kind.value,
                },
            )
        return operation

    async def _post_job(self, info: ProjectInfo, new: _NewJob) -> tuple[Mapping[str, Any], bool]:
        """(the ProjectJob, whether this call created it): a retry with the same Idempotency-Key
        gets the job the first call made."""
        annotations = {REQUEST_DIGEST_ANNOTATION: new.fingerprint}
        if new.key:
            annotations[IDEMPOTENCY_ANNOTATION] = digest(new.key.encode())
        body = {
            "apiVersion": API_VERSION,
            "kind": PROJECTJOB_KIND,
            "metadata": {
                "name": new.job_id,
                "namespace": info.namespace,
                "labels": job_labels(info.project_id, new.job_id),
                "annotations": annotations,
                # Set here rather than by the operator: the job's inputs are uploaded before any
                # operator acts on it, so a deletion in between would leave them behind; and it
                # saves the operator one write (and its watch echo) per job.
                "finalizers": [FINALIZER],
            },
            "spec": new.spec.to_cr(),
        }
        try:
            return await self.core.kube.request("POST", jobs_path(info.namespace), body=body), True
        except asyncio.CancelledError:
            # The POST may have reached the cluster before the call was cancelled.
            if not new.key:
                await self._shielded(self._remove_unanswered(info.namespace, new))
            raise
        except KubeError as exc:
            if not new.key and _outcome_unknown(exc):
                await self._shielded(self._remove_unanswered(info.namespace, new))
            if exc.status != 409 or exc.reason != "AlreadyExists" or not new.key:
                raise errors.from_kube(
                    exc, f"the new job (not created; its id would have been {new.job_id!r})"
                ) from exc
            conflict = exc
        obj = await self.core.k8s(
            "get",
            f"job {new.job_id!r}",
            self.core.kube.request("GET", jobs_path(info.namespace, new.job_id)),
        )
        meta = obj.get("metadata") or {}
        if (meta.get("annotations") or {}).get(REQUEST_DIGEST_ANNOTATION) != new.fingerprint:
            raise ApiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"Idempotency-Key {errors.quoted(new.key)} was already used for a different request "
                f"(job {new.job_id!r}); use a new key for a new job",
            ) from conflict
        if meta.get("deletionTimestamp"):
            # An earlier attempt failed and removed its job; it is gone once the operator let go.
            raise errors.unavailable(
                f"job {new.job_id!r} of this Idempotency-Key is being removed after a failed attempt; "
                "retry the call"
            ) from conflict
        return obj, False

    async def _shielded(self, cleanup: Coroutine[Any, Any, None]) -> None:
        """Run `cleanup` to its end even if this call is cancelled meanwhile (the client gave up,
        the server drains): the call then stops waiting for it, the cleanup goes on."""
        task = asyncio.ensure_future(cleanup)
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The call is gone, and shield() drops what the cleanup raises from now on: say it here.
            task.add_done_callback(_log_cleanup_failure)
            raise

    async def _remove_unanswered(
        self, namespace: str, new: _NewJob, rechecks: tuple[float, ...] | None = None
    ) -> None:
        """Delete the job a POST without an answer may have stored (best effort; see _outcome_unknown).
        Not found, it is looked for again after each of `rechecks` (UNANSWERED_RECHECKS), in the
        background: the call's answer does not wait for them.

        Only for calls without an Idempotency-Key: their retries get new random ids, so the job
        would stay CREATING for ever (listed, counted against the project's quota), while a keyed
        retry finds its job. A random id is this call's alone; but the job is listed, so someone
        may have executed it meanwhile: it is deleted only as read here, not executed (uid and
        resourceVersion preconditions; on a conflict it is read again).
        """
        path = jobs_path(namespace, new.job_id)
        what = f"job {new.job_id!r}, whose creation got no answer,"
        for _ in range(3):
            try:
                obj = await self.core.kube.request("GET", path)
                meta = obj.get("metadata") or {}
                ours = (meta.get("annotations") or {}).get(REQUEST_DIGEST_ANNOTATION) == new.fingerprint
                if not ours or (obj.get("spec") or {}).get("execute") or meta.get("deletionTimestamp"):
                    return  # not this call's job, executed by someone who found it, or going already
                await self._delete_job(
                    namespace,
                    new.job_id,
                    {"uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
                )
            except KubeError as exc:
                later = self.unanswered_rechecks if rechecks is None else rechecks
                if (exc.status == 404 or _outcome_unknown(exc)) and later and not self.hurrying.is_set():
                    # Not stored (yet), or no answer now (the API server that lost the POST's
                    # answer is slow): looked for again. (A 404 may also be a job gone already.)
                    again = functools.partial(self._remove_unanswered, namespace, new, later[1:])
                    self._in_background(later[0], again)
                    return
                if exc.status == 404:
                    return
                if exc.status == 409:
                    continue  # changed since it was read (the operator's first status): look again
                log.error(
                    "could not remove %s: it stays CREATING until deleted (its inputs go at its data TTL)",
                    what,
                    extra={"job": new.job_id},
                    exc_info=True,
                )
                return
            log.info("job removed after its creation got no answer", extra={"job": new.job_id})
            self.core.jobs.forget(new.job_id, namespace)
            return
        log.error(
            "could not remove %s: it kept changing; it stays CREATING until deleted",
            what,
            extra={"job": new.job_id},
        )

    def _in_background(self, delay: float, cleanup: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `cleanup()` after `delay` seconds as one of the cleanups (see _shielded)."""

        async def later() -> None:
            # At a shutdown (`hurry`) at once: a last look within its grace, not a wait that
            # outlasts it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hurrying.wait(), delay)
            await cleanup()

        task = asyncio.ensure_future(later())
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)
        task.add_done_callback(_log_cleanup_failure)

    async def _delete_job(self, namespace: str, name: str, preconditions: Mapping[str, Any]) -> None:
        """DELETE one ProjectJob only as the caller saw it (uid, and resourceVersion when given)."""
        await self.core.kube.request(
            "DELETE",
            jobs_path(namespace, name),
            body={"preconditions": dict(preconditions), "propagationPolicy": "Background"},
        )

    async def _discard(self, obj: Mapping[str, Any]) -> None:
        """Delete a job this call created and could not finish (only that one: uid precondition)."""
        meta = obj.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
        try:
            await self._delete_job(namespace, name, {"uid": meta.get("uid")})
        except KubeError as exc:
            if exc.status not in (404, 409):  # gone already, or no longer ours
                log.error("could not remove job %s after its creation failed", name, exc_info=True)
        self.core.jobs.forget(name, namespace)

    async def _store_password(self, job: JobSnapshot, password: str, *, created: bool) -> None:
        name = params_conv.docker_password_secret_name(job.name)
        image = job.spec.job_parameters.docker_image()
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": job.namespace,
                # The registry the user gave it for: a project member editing the job's image
                # before it runs must not have the operator send it elsewhere.
                "annotations": {REGISTRY_HOSTS_ANNOTATION: registry_of(image.image_url) if image else ""},
                "labels": {
                    **job_labels(job.project_id, job.name),
                    SECRET_ROLE_LABEL: REGISTRY_PASSWORD_ROLE,
                },
                "ownerReferences": [
                    {
                        "apiVersion": API_VERSION,
                        "kind": PROJECTJOB_KIND,
                        "name": job.name,
                        "uid": job.uid,
                        "controller": True,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "type": "Opaque",
            "immutable": True,
            "stringData": {params_conv.DOCKER_PASSWORD_KEY: password},
        }
        try:
            await self.core.kube.request("POST", secrets_path(job.namespace), body=secret)
        except KubeError as exc:
            if exc.status == 409 and exc.reason == "AlreadyExists":
                # Also when this call found the job made before (a retry of its key): the Secret
                # may be an earlier job's of the name (kept by a call that could not tell), which
                # the garbage collector is removing, not the one its answer may point at.
                if await self._owns_secret(job, name):
                    return  # a call with this Idempotency-Key that found the job stored it
                # Left by an earlier attempt whose job was removed; Kubernetes' garbage collector
                # deletes it (its owner is gone). Taking it over could keep an older password.
                raise errors.unavailable(
                    f"the registry password Secret of job {job.name!r} from an earlier attempt is "
                    "still being removed; retry the call"
                ) from exc
            raise errors.from_kube(exc, f"registry password Secret of job {job.name!r}") from exc

    async def _owns_secret(self, job: JobSnapshot, name: str) -> bool:
        """Whether the Secret `name` is this very job's (its owner's uid), not an earlier job's.

        A concurrent call with the same Idempotency-Key finds this job, and may store the Secret
        before this call does. Its content needs no check: such a call matched the job's request
        digest, so it is the same request; the password is the one thing that may differ, and the
        digest leaves it out on purpose (a retry with another password is the same request, and
        the immutable Secret keeps the first one stored, as it does for retries one after another).
        """
        what = f"registry password Secret of job {job.name!r}"
        try:
            secret = await self.core.k8s(
                "get", what, self.core.kube.request("GET", secrets_path(job.namespace, name))
            )
        except ApiError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return False  # an earlier attempt's, removed just now: the retry stores this one
            raise
        owners = (secret.get("metadata") or {}).get("ownerReferences") or []
        return any(isinstance(o, Mapping) and o.get("uid") == job.uid for o in owners)

    async def _upload_files(
        self, namespace: str, project_id: str, checks: Sequence[InputCheck]
    ) -> list[jobs_pb2.StorageFile]:
        """A presigned PUT URL for every input the store does not hold with its declared size."""
        missing = [c for c in checks if not c.present]
        keys = {c.file.sha256: st.input_key(project_id, c.file.sha256) for c in missing}
        urls = await self.core.presign_put(
            namespace, ((keys[c.file.sha256], c.file.size_bytes) for c in missing)
        )
        return [_storage_file(c.file, urls[keys[c.file.sha256]]) for c in missing]

    async def create_operation(
        self, job: JobSnapshot, kind: OpKind, *, with_uploads: bool = True
    ) -> operation_pb2.Operation:
        """The Create/Clone operation; its upload URLs (presigned PUTs into the project's input
        store) only `with_uploads`, for a caller who may create jobs."""
        uploads: list[jobs_pb2.StorageFile] = []
        if with_uploads:
            checks = await self.core.check_inputs(job.project_id, _inputs(job.spec.job_parameters))
            uploads = await self._upload_files(job.namespace, job.project_id, checks)
        return operations.create_operation(job.ref(kind), job, uploads)

    # Execute ------------------------------------------------------------------------------------

    async def Execute(
        self, request: svc.ExecuteProjectJobRequest, context: Context
    ) -> operation_pb2.Operation:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.UPDATE, fresh=True)
        for attempt in range(1, 4):
            if job.spec.execute or job.is_final:
                break
            # Checked again after every re-read: a DeleteData may have landed meanwhile.
            await self._check_executable(job)
            requested_at = now().isoformat().replace("+00:00", "Z")
            try:
                # Guarded by the resourceVersion: a concurrent Execute must not move the request time.
                job = await self.core.patch_job(
                    job,
                    {
                        "metadata": {"annotations": {EXECUTE_REQUESTED_AT: requested_at}},
                        "spec": {"execute": True},
                    },
                    guard=True,
                )
                log.info("job execution requested", extra={"job": job.name, "user": identity.username})
            except ApiError as exc:
                if exc.code != grpc.StatusCode.ABORTED or attempt == 3:
                    raise
                # Changed meanwhile (another Execute, the operator's status): look again.
                job = await self.core.get_job(job.namespace, job.name, fresh=True)
        # Already requested, running or finished: that execution's operation (the CLI's `attach`).
        return await execute_operation(self.core, job, identity.username)

    async def _check_executable(self, job: JobSnapshot) -> None:
        """FAILED_PRECONDITION when a job not yet executed cannot be: being deleted, its data
        deleted (or expiring: createdAt + dataTtl), or an input not uploaded."""
        if job.deleting:
            raise errors.failed_precondition(f"job {job.name!r} is being deleted")
        if operations.data_unavailable(job):
            raise errors.failed_precondition(
                f"the data of job {job.name!r} was deleted before it was executed (DeleteData or its "
                "data TTL, counted from its creation); create the job again (or clone it with new inputs)"
            )
        checks = await self.core.check_inputs(job.project_id, _inputs(job.spec.job_parameters))
        missing = [c for c in checks if not c.present]
        if missing:
            raise errors.failed_precondition(_missing_message(missing))

    # Cancel, Finalize, SetDataTtl ---------------------------------------------------------------

    async def Cancel(self, request: svc.CancelProjectJobRequest, context: Context) -> empty_pb2.Empty:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.UPDATE, fresh=True)
        if problems := cancel_reason_problems(request.reason):
            raise errors.from_problems(problems)
        await cancel_job(self.core, job, request.reason, request.graceful, identity)
        return empty_pb2.Empty()

    async def Finalize(
        self, request: svc.FinalizeProjectJobRequest, context: Context
    ) -> svc.FinalizeProjectJobResponse:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.UPDATE, fresh=True)
        if not job.is_final:
            raise errors.failed_precondition(
                f"job {job.name!r} is {job.phase.value}; finalize it after it has finished"
            )
        if not job.spec.finalized:
            await self.core.patch_job(job, {"spec": {"finalized": True}})
            log.info("job finalized", extra={"job": job.name, "user": identity.username})
        return svc.FinalizeProjectJobResponse(job_id=job.name)

    async def SetDataTtl(
        self, request: svc.SetProjectJobDataTtlRequest, context: Context
    ) -> svc.SetProjectJobDataTtlResponse:
        _, job = await self.core.authorized_job(context, request.job_id, Verb.UPDATE, fresh=True)
        _check_data_ttl(request.ttl if request.HasField("ttl") else None, "ttl")
        # No ttl: keep forever (the CLI's `set-data-ttl --days infinity`).
        ttl = params_conv.data_ttl_from_set_request(request)

        def set_ttl(j: JobSnapshot) -> dict[str, Any] | None:
            if j.spec.data_ttl == ttl:
                return None  # already so (a retry of a call that took effect): nothing changes
            # Too late once it goes: the deletion ends whatever the TTL becomes (the operator's mark).
            _refuse_unavailable_data(j, " (DeleteData or its data TTL): its TTL can no longer change")
            return {"spec": {"dataTtl": format_duration(ttl)}}

        # Guarded: a TTL written after the operator marked the data's deletion would say the data
        # stays while it goes.
        await patch_guarded(self.core, job, set_ttl)
        return svc.SetProjectJobDataTtlResponse()

    # Delete, DeleteData, DeleteAllData ----------------------------------------------------------

    async def Delete(self, request: svc.DeleteProjectJobRequest, context: Context) -> operation_pb2.Operation:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.DELETE, fresh=True)
        ref = job.ref(OpKind.DELETE)
        for attempt in range(1, 4):
            # Checked again after every re-read: an Execute may have landed meanwhile.
            if job.spec.execute and not job.is_final:
                raise errors.failed_precondition(
                    f"job {job.name!r} is {job.phase.value}; cancel it and wait until it has stopped "
                    "before deleting it"
                )
            if job.deleting:
                break  # deleted already, going once the operator has removed its data
            try:
                # Only the job as checked (uid and resourceVersion): an Execute landing after the
                # check (another replica) must not get a job deleted that was just asked to run.
                await self._delete_job(
                    job.namespace, job.name, {"uid": job.uid, "resourceVersion": job.resource_version}
                )
                break
            except KubeError as exc:
                if exc.status == 404:
                    break  # gone already
                if exc.status != 409 or attempt == 3:
                    raise errors.from_kube(exc, f"job {job.name!r}") from exc
            # Changed meanwhile (an Execute, the operator's status): look again.
            fresh = await self.core.read_job(job.namespace, job.name, fresh=True)
            if fresh is None or fresh.uid != job.uid:
                break  # gone already (a new job of this name is not the one asked for)
            job = fresh
        log.info("job deleted", extra={"job": job.name, "user": identity.username})
        return operations.delete_operation(
            ref, await self.core.read_job(job.namespace, job.name, fresh=True), now()
        )

    async def DeleteData(
        self, request: svc.DeleteProjectJobDataRequest, context: Context
    ) -> operation_pb2.Operation:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.UPDATE, fresh=True)
        job, marked = await self._mark_data_deletion(job)
        if marked:
            log.info("job data deletion requested", extra={"job": job.name, "user": identity.username})
        return operations.delete_data_operation(job.ref(OpKind.DELETE_DATA), job, now())

    async def _mark_data_deletion(self, job: JobSnapshot) -> tuple[JobSnapshot, bool]:
        """Set spec.clearData on a finished or never-executed job: (the job, whether this call set it).

        Guarded by the resourceVersion: an Execute landing after the check (another replica) must
        not find clearData set on the job it just started (the operator would fail it DataCleared).
        On a conflict the job is read and checked again. FAILED_PRECONDITION for a job asked to
        run; NOT_FOUND for one that is gone.
        """

        def clear_data(j: JobSnapshot) -> dict[str, Any] | None:
            if j.spec.execute and not j.is_final:
                raise errors.failed_precondition(
                    f"job {j.name!r} is {j.phase.value}; its data can be deleted once it has finished"
                )
            return None if j.spec.clear_data else {"spec": {"clearData": True}}

        return await patch_guarded(self.core, job, clear_data)

    async def DeleteAllData(
        self, request: svc.DeleteAllProjectJobDataRequest, context: Context
    ) -> operation_pb2.Operation:
        identity, info = await self.core.authorized_project(context, request.project_id, Verb.UPDATE)
        found = await self.core.all_jobs(info)
        jobs = found.jobs
        # Running jobs keep their data (it is being written); everything else is marked for deletion.
        todo = [j for j in jobs if not j.spec.clear_data and (j.is_final or not j.spec.execute)]
        gate = asyncio.Semaphore(16)

        async def mark(j: JobSnapshot) -> bool:
            """Whether `j`'s data deletion is pending now (each job guarded on its own)."""
            async with gate:
                try:
                    marked, _ = await self._mark_data_deletion(j)
                except ApiError as exc:
                    # Gone, or asked to run since the listing: a running job keeps its data.
                    if exc.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                        raise
                    return False
                return not marked.status.data_cleared

        results = await asyncio.gather(*(mark(j) for j in todo))
        log.info(
            "project data deletion requested",
            extra={
                "project": info.project_id,
                "jobs": len(todo),
                "unreadable": len(found.unreadable),
                "user": identity.username,
            },
        )
        listed = {j.name for j in todo}
        pending = sum(results) + sum(
            1 for j in jobs if j.name not in listed and operations.data_deletion_pending(j)
        )
        return operations.delete_all_data_operation(
            OpRef(OpKind.DELETE_ALL_DATA, info.project_id), pending, now(), found.unreadable
        )

    # Get, List ----------------------------------------------------------------------------------

    async def Get(self, request: svc.GetProjectJobRequest, context: Context) -> jobs_pb2.Job:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.GET)
        return job_proto(as_seen_by(job, identity.username))

    async def List(self, request: svc.ListProjectJobRequest, context: Context) -> svc.ListProjectJobResponse:
        identity, info = await self.core.authorized_project(context, request.project_id, Verb.LIST)
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise errors.invalid_argument(
                f"must be between 0 and {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})", "page_size"
            )
        size = request.page_size or DEFAULT_PAGE_SIZE
        try:
            flt = listfilter.parse(request.filter)
        except listfilter.FilterError as exc:
            raise errors.invalid_argument(str(exc), "filter") from exc
        cont, after = "", ""
        if request.page_token:
            try:
                state = pagetoken.decode(
                    request.page_token,
                    self.core.settings.page_token_key,
                    project_id=info.project_id,
                    filter_expr=request.filter,
                )
            except pagetoken.PageTokenError as exc:
                raise errors.invalid_argument(str(exc), "page_token") from exc
            cont, after = state.continue_token, state.after
        out: list[jobs_pb2.Job] = []
        size_bytes = 0
        rounds = 0
        while True:
            rounds += 1
            # Asking for exactly what is still missing consumes every Kubernetes page whole, so its
            # continue token says where the next page starts; only a page its byte budget cuts
            # short ends inside one: its token names that page's start and the last job it gave,
            # and the next page skips the jobs up to that name (the listing's order), so that a job
            # created or deleted meanwhile neither repeats nor hides one.
            items, next_cont = await self.core.list_jobs(info, limit=size - len(out), continue_token=cont)
            for item in items:
                job = try_snapshot(item)
                if job is None or (after and job.name <= after) or not flt.matches(_filter_fields(job)):
                    continue
                proto = job_proto(as_seen_by(job, identity.username))
                size_bytes += proto.ByteSize()
                if out and size_bytes > MAX_LIST_RESPONSE_BYTES:
                    return self._list_page(info, request.filter, out, cont, out[-1].id)
                out.append(proto)
            cont = next_cont
            if not cont or len(out) >= size or rounds >= MAX_FILTER_ROUNDS:
                break
        return self._list_page(info, request.filter, out, cont, "")

    def _list_page(
        self, info: ProjectInfo, filter_expr: str, jobs: list[jobs_pb2.Job], cont: str, after: str
    ) -> svc.ListProjectJobResponse:
        """A page of `jobs`; the next starts at the Kubernetes page `cont` starts (the first page
        when empty), after the job named `after` when that is set."""
        token = ""
        if cont or after:
            token = pagetoken.encode(
                pagetoken.PageState(info.project_id, pagetoken.filter_digest(filter_expr), cont, after),
                self.core.settings.page_token_key,
            )
        return svc.ListProjectJobResponse(jobs=jobs, next_page_token=token)

    # Logs ---------------------------------------------------------------------------------------

    async def ReadLogs(
        self, request: svc.ReadProjectJobLogsRequest, context: Context
    ) -> AsyncIterator[svc.ReadProjectJobLogsResponse]:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.GET)
        _refuse_unavailable_data(job, _LOGS_WENT)
        allowed = self._still_allowed(context, job)
        with self.core.streams.hold(identity.username, request.offset):
            async for records, offset in follow_logs(
                self.core, job, request.offset, None, allowed, identity.username
            ):
                logs = [
                    _log_message(r, piece) for r in records for piece in logrecords.utf8_pieces(r.content)
                ]
                yield svc.ReadProjectJobLogsResponse(logs=logs, offset=offset)

    async def ReadStdLogs(
        self, request: svc.ReadProjectJobStdLogsRequest, context: Context
    ) -> AsyncIterator[svc.ReadProjectJobStdLogsResponse]:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.GET)
        _refuse_unavailable_data(job, _LOGS_WENT)
        streams = (logrecords.Stream.OUT, logrecords.Stream.ERR)
        allowed = self._still_allowed(context, job)
        with self.core.streams.hold(identity.username, request.offset):
            async for records, offset in follow_logs(
                self.core, job, request.offset, streams, allowed, identity.username
            ):
                logs = [
                    svc.StdLog(
                        content=piece,
                        type=svc.StdLog.Type.OUT
                        if r.stream == logrecords.Stream.OUT
                        else svc.StdLog.Type.ERR,
                    )
                    for r in records
                    for piece in logrecords.utf8_pieces(r.content)
                ]
                yield svc.ReadProjectJobStdLogsResponse(logs=logs, offset=offset)

    def _still_allowed(self, context: Context, job: JobSnapshot) -> Callable[[], Awaitable[None]]:
        """A stream's check that its caller may still read the job: a stream may follow a job for
        days, past the caller's token or RoleBinding (the auth caches keep decisions 10 s)."""

        async def check() -> None:
            identity = await self.core.identity(context)
            await self.core.auth.authorize(identity, Verb.GET, job.namespace, job.project_id)

        return check

    # Downloads ----------------------------------------------------------------------------------

    async def DownloadJobFiles(
        self, request: svc.DownloadProjectJobFilesRequest, context: Context
    ) -> svc.DownloadProjectJobFilesResponse:
        identity, job = await self.core.authorized_job(context, request.job_id, Verb.GET)
        if not request.files:
            # The CLI's download-files asks for the job's output_files, none for a job without outputs.
            return svc.DownloadProjectJobFilesResponse()
        if len(request.files) > MAX_DOWNLOAD_FILES:
            raise errors.invalid_argument(f"at most {MAX_DOWNLOAD_FILES} files per call", "files")
        try:
            # Paths as this caller got them from Get, and as its CLI will write them.
            chosen = _chosen_files(as_seen_by(job, identity.username), request.files)
        except ApiError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            # This replica's copy of the job may lag a moment behind the one that told the caller
            # the job ended (its watch): a file not found is looked for in the stored job again.
            job = await self.core.get_job(job.namespace, job.name, fresh=True)
            chosen = _chosen_files(as_seen_by(job, identity.username), request.files)
        urls = await self.core.presign_get((f.key, last_name(f.desc.path), f.size_bytes) for f in chosen)
        return svc.DownloadProjectJobFilesResponse(
            download_files=[_storage_file(f, urls[f.key]) for f in chosen]
        )

    async def DownloadStdLogs(
        self, request: svc.DownloadProjectJobStdLogsRequest, context: Context
    ) -> svc.DownloadProjectJobStdLogsResponse:
        _, job = await self.core.authorized_job(context, request.job_id, Verb.GET)
        if not job.is_final:
            # Maybe only in this replica's copy, lagging the one that told the caller it ended.
            job = await self.core.get_job(job.namespace, job.name, fresh=True)
        _refuse_unavailable_data(job)
        if not job.is_final:
            # Files there now are an earlier attempt's (a retry), or being written.
            raise errors.failed_precondition(
                f"job {job.name!r} is {job.phase.value}: its stdout/stderr files are stored when it ends; "
                "use ReadLogs meanwhile"
            )
        keys = {
            name: logrecords.log_file_key(job.project_id, job.name, name)
            for name in ("stdout.txt", "stderr.txt")
        }
        present = await asyncio.gather(*(self.core.io(self.core.store.head, k) for k in keys.values()))
        if not any(present):
            raise errors.not_found(f"job {job.name!r} has no stored stdout/stderr")
        urls = await self.core.presign_get(
            (k, f"{job.name}-{n}", p.size)
            for (n, k), p in zip(keys.items(), present, strict=True)
            if p is not None
        )
        return svc.DownloadProjectJobStdLogsResponse(
            stdout_url=urls.get(keys["stdout.txt"], ""), stderr_url=urls.get(keys["stderr.txt"], "")
        )


def _chosen_files(job: JobSnapshot, wanted_files: Sequence[jobs_pb2.File]) -> list[StoredFile]:
    """The job's stored files that `wanted_files` name; NOT_FOUND naming the first it lacks."""
    _refuse_unavailable_data(job)
    stored = [
        f
        for f in (*job.status.output_files, *job.status.log_files, *job.status.diagnostic_files)
        if operations.is_own_key(job, f.key)
    ]
    # By path and content first: an output may have a log's path (`stdout.txt`), and the CLI
    # asks with the File records Get gave it, sha256 included.
    by_path: dict[str, StoredFile] = {}
    by_content: dict[tuple[str, str], StoredFile] = {}
    for f in stored:
        by_path.setdefault(f.desc.path, f)
        by_content.setdefault((f.desc.path, f.sha256), f)
    chosen = []
    for i, wanted in enumerate(wanted_files):
        found = by_content.get((wanted.desc.path, wanted.sha256)) or by_path.get(wanted.desc.path)
        if found is None or not found.key:
            raise errors.not_found(f"files[{i}]: job {job.name!r} has no stored file {wanted.desc.path!r}")
        chosen.append(found)
    return chosen


def _filter_fields(job: JobSnapshot) -> Mapping[str, str]:
    return {
        "id": job.name,
        "name": job.spec.name,
        "status": job.phase.value,
        "created_by_id": job.spec.created_by_id,
        "parent_job_id": job.spec.parent_job_id,
    }


# --- shared by ProjectJobService and OperationService ---------------------------------------------


async def execute_operation(core: Core, job: JobSnapshot, username: str) -> operation_pb2.Operation:
    """The job's Execute operation as `username` may see it (clientpaths)."""
    job = as_seen_by(job, username)
    by_key = {f.key: f for f in job.status.output_files}
    urls = await core.presign_get(
        # The name a browser or curl saves it as: `C:\Users\me\result.csv` is result.csv too.
        (k, last_name(by_key[k].desc.path), by_key[k].size_bytes)
        for k in operations.output_keys(job)
    )
    if job.status.progress is None and not job.is_final and job.spec.execute:
        # The runner keeps the latest progress in storage; the operator copies it to the status
        # now and then. Fresher here, for the CLI's job_progress.jsonl.
        try:
            progress = await core.io(logrecords.read_progress, core.store, job.project_id, job.name)
        except (ApiError, ValueError):
            progress = None
        if progress is not None:
            status = job.status.model_copy(
                update={
                    "progress": Progress(
                        progress=progress.progress, message=progress.message, create_time=progress.create_time
                    )
                }
            )
            job = JobSnapshot(**{**job.__dict__, "status": status})
    return operations.execute_operation(job, job_proto(job), job_metadata_proto(job), urls, now())


async def cancel_job(
    core: Core, job: JobSnapshot, reason: str, graceful: bool, identity: Identity
) -> JobSnapshot:
    """Request cancellation. Finished jobs are left alone; a second, forceful request escalates.

    Guarded by the resourceVersion: two requests on different replicas (the CLI's graceful Ctrl-C,
    someone's forceful cancel) both find no cancel, and a graceful one landing second would undo
    the forceful one's (the operator would wait out the shutdown timeout instead of killing the
    job). On a conflict the job is read and judged again. NOT_FOUND for a job that is gone.
    """
    escalation = False

    def decide(j: JobSnapshot) -> dict[str, Any] | None:
        nonlocal escalation
        escalation = j.spec.cancel is not None
        return _cancel_patch(j, reason, graceful)

    job, written = await patch_guarded(core, job, decide)
    if written:
        log.info(
            "job cancel escalated" if escalation else "job cancel requested",
            extra={"job": job.name, "user": identity.username, "graceful": graceful},
        )
    return job


async def patch_guarded(
    core: Core, job: JobSnapshot, decide: Callable[[JobSnapshot], dict[str, Any] | None], *, tries: int = 3
) -> tuple[JobSnapshot, bool]:
    """Write `decide(job)` guarded by the job's resourceVersion: (the job, whether written). On a
    conflict (another replica's write, the operator's status) the job is read and decided again, up
    to `tries` times, then ABORTED; NOT_FOUND once it is another job of the name. `decide` returns
    None when there is nothing to write, or raises when the job may not be changed so."""
    attempt = 0
    while True:
        attempt += 1
        patch = decide(job)
        if patch is None:
            return job, False
        try:
            return await core.patch_job(job, patch, guard=True), True
        except ApiError as exc:
            if exc.code != grpc.StatusCode.ABORTED or attempt == tries:
                raise
        fresh = await core.get_job(job.namespace, job.name, fresh=True)
        if fresh.uid != job.uid:
            raise errors.not_found(f"job {job.name!r} was deleted")
        job = fresh


def _cancel_patch(job: JobSnapshot, reason: str, graceful: bool) -> dict[str, Any] | None:
    """The write a cancel request makes to the job as read; None when it changes nothing: the job
    has finished, or is being cancelled as forcefully already (a forceful request escalates a
    graceful one, never the reverse)."""
    if job.is_final:
        return None
    current = job.spec.cancel
    if current is None:
        request = CancelRequest(reason=reason, graceful=graceful, requested_at=now())
        return {"spec": {"cancel": request.to_cr()}}
    if current.graceful and not graceful:
        return {"spec": {"cancel": {"graceful": False}}}
    return None


async def follow_logs(
    core: Core,
    job: JobSnapshot,
    offset: int,
    streams: Sequence[logrecords.Stream] | None,
    still_allowed: Callable[[], Awaitable[None]] | None = None,
    caller: str = "",
) -> AsyncIterator[tuple[list[logrecords.LogRecord], int]]:
    """Batches of records from `offset` (-1: from now) until the job has ended and all were sent.
    `still_allowed` is asked every JOB_RECHECK_SECONDS, records flowing or not (it raises when the
    caller may no longer read the job). Each batch holds a permit of the log budget (`caller`'s)
    from its read until the consumer asks for the next."""
    if offset < -1:
        raise errors.invalid_argument(
            "must be -1 (from now) or a non-negative offset from a previous response", "offset"
        )
    settings = core.settings
    if offset == -1:
        offset = (
            await core.log_io(logrecords.read_records, core.store, job.project_id, job.name, -1)
        ).next_offset
        # Say at once where "now" is: a client that reconnects before any record arrives resumes
        # from there instead of from a later "now" (which would skip what came in between).
        yield [], offset
    ended = job.is_final  # once the job has ended, one more empty read finishes the stream
    # A change of the job (a new phase, the end) wakes the stream at once: the runner stores the
    # last records before the job ends, and the official CLI stops reading logs as soon as it sees
    # the operation done, so the stream must not sit out a poll interval then.
    changed = core.jobs.next_change(job.namespace, job.name)
    checked = time.monotonic()
    # Idle streams poll less often (up to 3x the base interval); new records reset the pace.
    interval = settings.log_poll_interval
    allowed_at = time.monotonic()
    while True:
        if core.draining.is_set():
            raise errors.server_restarting(offset)
        async with core.log_budget.hold(caller, offset, core.draining):
            # Asked once the permit is here, just before a read: it may have been long in coming.
            if still_allowed is not None and time.monotonic() - allowed_at >= JOB_RECHECK_SECONDS:
                await still_allowed()
                allowed_at = time.monotonic()
            try:
                result = await core.log_io(
                    logrecords.read_records,
                    core.store,
                    job.project_id,
                    job.name,
                    offset,
                    max_bytes=settings.max_response_bytes,
                    streams=streams,
                    check_complete=job.is_final,  # it ends the stream only then
                )
            except logrecords.LogFormatError as exc:
                raise errors.internal(
                    f"the stored logs of job {job.name!r} are damaged at offset {offset}"
                ) from exc
            advanced = result.next_offset != offset
            offset = result.next_offset
            if result.records:
                LOG_RECORDS_SENT.inc(len(result.records))
                # Held across the yield: the batch, its message and gRPC's copies live until the
                # client takes it (one that does not read keeps them).
                yield result.records, offset
        if advanced:
            interval = settings.log_poll_interval
            continue
        if ended or (result.complete and job.is_final):
            return
        if changed.is_set() or time.monotonic() - checked >= JOB_RECHECK_SECONDS:
            changed = core.jobs.next_change(job.namespace, job.name)
            checked = time.monotonic()
            fresh = await core.read_job(job.namespace, job.name)
            if fresh is None or fresh.uid != job.uid:
                raise errors.not_found(f"job {job.name!r} was deleted")
            job = fresh
            if job.is_final:
                ended = True
                continue  # read once more: the last records may have landed with the final status
        # A job waiting for a node (queued behind others for hours) stores no record: its
        # followers look now and then, not every second, and its change (scheduled) wakes them.
        await _first_of(interval if job.logs_may_flow else UNPLACED_POLL_SECONDS, core.draining, changed)
        interval = min(interval * 1.5, settings.log_poll_interval * 3)


async def _first_of(timeout: float, *events: asyncio.Event) -> None:
    """Wait until one of `events` is set, at most `timeout` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _log_message(r: logrecords.LogRecord, content: bytes) -> svc.LogMessage:
    """The record (`content`: all of its content or a piece of it) as a LogMessage."""
    ts = Timestamp()
    ts.FromNanoseconds(r.created_ns)
    msg = svc.LogMessage(content=content, created_at=ts)
    if r.stream == logrecords.Stream.OUT:
        msg.standard_stream = svc.StandardStream.OUT
    elif r.stream == logrecords.Stream.ERR:
        msg.standard_stream = svc.StandardStream.ERR
    else:
        msg.file_path = r.file_path or ""
    return msg


# --- OperationService ---------------------------------------------------------------------------


class OperationService(operation_service_pb2_grpc.OperationServiceServicer):
    def __init__(self, core: Core, jobs: ProjectJobService) -> None:
        self.core = core
        self.jobs = jobs

    async def _resolve(
        self, operation_id: str, context: Context, verb: Verb
    ) -> tuple[Identity, OpRef, ProjectInfo]:
        identity = await self.core.identity(context)
        if not operation_id:
            raise errors.invalid_argument("is required", "operation_id")
        try:
            ref = operations.decode_op_id(operation_id)
        except operations.OperationIdError as exc:
            raise errors.not_found(f"operation {errors.quoted(operation_id)} not found") from exc
        try:
            info = await self.core.project(ref.project_id)
        except ApiError as exc:
            # No such project (or not even a project id): no such operation. Anything else, e.g. an
            # unreachable cluster, keeps its code: the CLI retries UNAVAILABLE, not NOT_FOUND.
            if exc.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            raise errors.not_found(f"operation {errors.quoted(operation_id)} not found") from exc
        await self.core.auth.authorize(identity, verb, info.namespace, info.project_id)
        return identity, ref, info

    async def _operation(
        self, ref: OpRef, info: ProjectInfo, operation_id: str, identity: Identity
    ) -> operation_pb2.Operation:
        if ref.kind == OpKind.DELETE_ALL_DATA:
            found = await self.core.all_jobs(info)
            pending = sum(1 for j in found.jobs if operations.data_deletion_pending(j))
            return operations.delete_all_data_operation(ref, pending, now(), found.unreadable)
        job = _of_operation(await self.core.read_job(info.namespace, ref.job_id), ref, info)
        if ref.kind == OpKind.DELETE:
            return operations.delete_operation(ref, job, now())
        if ref.kind == OpKind.DELETE_DATA:
            return operations.delete_data_operation(ref, job, now())
        if job is None:
            # A final answer ends the CLI's polling: not from a watch cache that may still hold an
            # earlier job of that name (or lag behind a new one).
            job = _of_operation(await self.core.read_job(info.namespace, ref.job_id, fresh=True), ref, info)
        if job is None:
            return operations.gone_job_operation(ref, now())
        if ref.kind == OpKind.EXECUTE:
            return await execute_operation(self.core, job, identity.username)
        # Upload URLs write into the project's input store: for those who may create jobs, not
        # for a viewer reading the operation.
        try:
            await self.core.auth.authorize(identity, Verb.CREATE, info.namespace, info.project_id)
            may_upload = True
        except ApiError as exc:
            if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                raise
            may_upload = False
        return await self.jobs.create_operation(job, ref.kind, with_uploads=may_upload)

    async def Get(
        self, request: operation_service_pb2.GetOperationRequest, context: Context
    ) -> operation_pb2.Operation:
        identity, ref, info = await self._resolve(request.operation_id, context, Verb.GET)
        return await self._operation(ref, info, request.operation_id, identity)

    async def Cancel(
        self, request: operation_service_pb2.CancelOperationRequest, context: Context
    ) -> operation_pb2.Operation:
        identity, ref, info = await self._resolve(request.operation_id, context, Verb.UPDATE)
        if ref.kind == OpKind.EXECUTE:
            job = _of_operation(await self.core.read_job(info.namespace, ref.job_id, fresh=True), ref, info)
            if job is not None:
                await cancel_job(self.core, job, "operation cancelled", False, identity)
        # Other operations finish on their own (creation is immediate, deletion cannot be undone).
        return await self._operation(ref, info, request.operation_id, identity)


def _of_operation(job: JobSnapshot | None, ref: OpRef, info: ProjectInfo) -> JobSnapshot | None:
    """The operation's job, or None: another job under the same name (uid), or a job in the
    project's namespace whose spec names another project (see Core.authorized_job)."""
    if job is None or (ref.job_uid and job.uid != ref.job_uid) or job.project_id != info.project_id:
        return None
    return job


# --- ProjectService -----------------------------------------------------------------------------


def project_proto(info: ProjectInfo, community_id: str) -> project_pb2.Project:
    meta = info.obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    project = project_pb2.Project(
        id=info.project_id,
        name=annotations.get(PROJECT_NAME_ANNOTATION) or info.project_id,
        description=annotations.get(PROJECT_DESCRIPTION_ANNOTATION, ""),
        community_id=annotations.get(COMMUNITY_ANNOTATION) or community_id,
    )
    created = parse_time(meta.get("creationTimestamp"))
    if created:
        project.created_at.CopyFrom(timestamp(created))
    return project


class ProjectService(project_service_pb2_grpc.ProjectServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def Get(
        self, request: project_service_pb2.GetProjectRequest, context: Context
    ) -> project_pb2.Project:
        _, info = await self.core.authorized_project(context, request.project_id, Verb.GET)
        return project_proto(info, self.core.settings.community_id)

    async def List(
        self, request: project_service_pb2.ListProjectsRequest, context: Context
    ) -> project_service_pb2.ListProjectsResponse:
        identity = await self.core.identity(context)
        if not request.community_id:
            raise errors.invalid_argument("is required", "community_id")
        try:
            projects = await self.core.projects.all()
        except KubeError as exc:
            raise errors.from_kube(exc, "projects") from exc
        out = []
        for info in projects:
            proto = project_proto(info, self.core.settings.community_id)
            if proto.community_id != request.community_id:
                continue
            if request.project_name_pattern and request.project_name_pattern not in proto.name:
                continue
            try:
                await self.core.auth.authorize(identity, Verb.GET, info.namespace, info.project_id)
            except ApiError as exc:
                if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                    raise  # a review the cluster did not answer: not a project to leave out silently
                continue  # only the projects the caller may see
            out.append(proto)
        return project_service_pb2.ListProjectsResponse(projects=out)
