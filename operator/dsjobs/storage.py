"""Object storage for dsjobs: settings, the bucket's key layout, presigned URLs and transfers.

One bucket holds everything (see docs/contracts.md):

    projects/<project>/inputs/<sha256>                      content-addressed input cache
    projects/<project>/jobs/<job>/outputs/<path>            declared outputs
    projects/<project>/jobs/<job>/logs/...                  log records (dsjobs.logrecords)
    projects/<project>/jobs/<job>/result.json               the runner's full result

One-object calls are single signed requests (`dsjobs.s3http`); multipart uploads, listings, batch
deletes and presigned URLs go through botocore.

Why uploads never leave a half-written object that looks complete: S3 makes an object visible
only when its PutObject request has been received in full, and a multipart object only when
CompleteMultipartUpload succeeds. A transfer that fails midway either leaves the previous
version of the key (or nothing) visible, or an invisible incomplete multipart upload that
`_multipart_upload` aborts (and that a bucket lifecycle rule / ``delete_prefix`` cleans up if the
process died). So we write straight to the final key; a temp-key-then-copy dance would only double the
I/O. Downloads do need care on our side: they go to a temp file next to the destination and are
renamed into place only after size and sha256 were verified.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import errno
import functools
import hashlib
import http.client
import io
import logging
import os
import queue
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Protocol, TypeVar, cast

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from dsjobs.backoff import jittered
from dsjobs.records import Record, RecordError, rule
from dsjobs.s3http import (
    EMPTY_SHA256,
    Credentials,
    S3Http,
    S3HttpError,
    canonical_uri,
    listed_keys,
    presign_v4,
)
from dsjobs.s3http import TIMEOUT_SECONDS as S3HTTP_TIMEOUT
from dsjobs.syntax import escape_problem, join_segments

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

ENV_ENDPOINT = "DSJOBS_S3_ENDPOINT"
ENV_PUBLIC_ENDPOINT = "DSJOBS_S3_PUBLIC_ENDPOINT"
ENV_BUCKET = "DSJOBS_S3_BUCKET"
ENV_ACCESS_KEY = "DSJOBS_S3_ACCESS_KEY"
ENV_SECRET_KEY = "DSJOBS_S3_SECRET_KEY"
ENV_REGION = "DSJOBS_S3_REGION"
#: Every variable `StorageSettings.from_env` reads; the runner's Secret carries these keys.
STORAGE_ENV_VARS = (ENV_ENDPOINT, ENV_BUCKET, ENV_ACCESS_KEY, ENV_SECRET_KEY, ENV_REGION, ENV_PUBLIC_ENDPOINT)
#: A directory with one file per `STORAGE_ENV_VARS` name (a mounted Secret): read for the
#: variables the environment does not set.
ENV_FILES_DIR = "DSJOBS_S3_FILES_DIR"
#: The keys of the storage Secret's template (deploy/base/storage-credentials.yaml): applied as
#: they are, they would sign every request with a key no store knows.
TEMPLATE_PLACEHOLDER = "REPLACE-ME"

DEFAULT_PRESIGN_EXPIRY = timedelta(minutes=15)
MAX_PRESIGN_EXPIRY = timedelta(days=7)  # S3's own limit for X-Amz-Expires

_MiB = 1024 * 1024
#: Streaming reads/writes move this much at a time: memory use does not grow with object size.
IO_CHUNK = _MiB
#: Unfinished multipart uploads asked for per listing (S3's most).
UPLOADS_PAGE = 1000

#: Uploads above this size go multipart.
MULTIPART_THRESHOLD = 16 * _MiB
#: S3 allows 10,000 parts per upload and at least 5 MiB per part (but the last).
MAX_PARTS = 10_000
MIN_PART_SIZE = 8 * _MiB


#: Parts of one multipart upload sent at once.
DEFAULT_UPLOAD_CONCURRENCY: Final = 2
#: Memory the part buffers of one multipart upload may take, when parts are bigger than usual
#: (the runner's containers have 512 MiB by default).
PART_BUFFERS_BYTES: Final = 256 * _MiB


def part_buffers(part_size: int, concurrency: int = DEFAULT_UPLOAD_CONCURRENCY) -> int:
    """How many part buffers a multipart upload with parts of `part_size` holds."""
    return max(1, min(concurrency + 1, PART_BUFFERS_BYTES // part_size))


def part_buffers_bytes(size: int) -> int:
    """The memory of the part buffers of an upload of `size` bytes (the default concurrency)."""
    part = part_size_for(size)
    return part * part_buffers(part)


def part_size_for(size: int, minimum: int = MIN_PART_SIZE) -> int:
    """The multipart part size for an object of `size` bytes: `minimum`, or larger (whole MiB)
    when that many parts would exceed S3's 10,000-part limit."""
    needed = -(-size // MAX_PARTS)
    return max(minimum, -(-needed // _MiB) * _MiB)


def _with_content_md5(params: dict[str, Any], **_: Any) -> None:
    """DeleteObjects with a Content-MD5 header: botocore >= 1.36 sends only a CRC32 checksum, which
    several S3-compatible servers (older MinIO, Ceph RGW versions, OVH, cubefs) refuse with
    `MissingContentMD5`, and every prefix deletion (TTL, Delete, orphans) would fail there."""
    body = params.get("body")
    headers = params.setdefault("headers", {})
    if isinstance(body, bytes | bytearray) and "Content-MD5" not in headers:
        headers["Content-MD5"] = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


class StorageError(Exception):
    """A storage operation failed (after retries where they make sense)."""


class ObjectNotFoundError(StorageError):
    """The key does not exist."""


class IntegrityError(StorageError):
    """Downloaded bytes do not match the expected size or sha256."""


class StorageConfigError(StorageError):
    """Storage settings are missing or invalid."""


class TransferStopped(Exception):
    """A transfer its caller stopped (its `stop` event was set): nothing is left of it."""


class UnsafePathError(ValueError):
    """A user-supplied relative path is absolute, escapes its root or is otherwise unusable."""


def _check_http_url(v: str) -> str | None:
    if v == "":
        return None
    if not re.fullmatch(r"https?://[^/\s]+/?", v):
        raise ValueError(f"expected http(s)://host[:port], got {v!r}")
    return v.rstrip("/")


@dataclass(frozen=True, kw_only=True)
class StorageSettings(Record):
    """Where the bucket is and how to sign requests. Built from ``DSJOBS_S3_*`` variables."""

    #: http(s)://host[:port] the cluster reaches the S3 server at.
    endpoint: str = field(metadata=rule(check=_check_http_url))
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    #: The endpoint that clients outside the cluster use; presigned URLs are signed for it.
    public_endpoint: str | None = field(default=None, metadata=rule(check=_check_http_url))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageSettings:
        env = os.environ if environ is None else environ
        folder = env.get(ENV_FILES_DIR)
        if folder:
            env = {**_files_env(Path(folder)), **env}
        # A Secret made from files (`kubectl create secret --from-file`, an editor) ends its values
        # with a newline: no key, bucket or URL does, and kept it made an unclear error at the first
        # request ("Invalid header value").
        env = {k: v.rstrip("\r\n") if k in STORAGE_ENV_VARS else v for k, v in env.items()}
        missing = [k for k in (ENV_ENDPOINT, ENV_BUCKET, ENV_ACCESS_KEY, ENV_SECRET_KEY) if not env.get(k)]
        if missing:
            raise StorageConfigError(f"storage settings missing: {', '.join(missing)}")
        template = [k for k in (ENV_ACCESS_KEY, ENV_SECRET_KEY) if env[k] == TEMPLATE_PLACEHOLDER]
        if template:
            raise StorageConfigError(
                f"storage settings {', '.join(template)} still hold the template's placeholder "
                f"{TEMPLATE_PLACEHOLDER!r}: put the object store's keys in the dsjobs-storage Secret"
            )
        try:
            return cls(
                endpoint=env[ENV_ENDPOINT],
                bucket=env[ENV_BUCKET],
                access_key=env[ENV_ACCESS_KEY],
                secret_key=env[ENV_SECRET_KEY],
                region=env.get(ENV_REGION) or "us-east-1",
                public_endpoint=env.get(ENV_PUBLIC_ENDPOINT) or None,
            )
        except RecordError as exc:
            names = {"endpoint": ENV_ENDPOINT, "public_endpoint": ENV_PUBLIC_ENDPOINT}
            raise StorageConfigError(
                f"storage setting {names.get(exc.path, exc.path)}: {exc.message}"
            ) from None


def settings_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """Why the storage settings in `environ` (default: the process's) cannot work (none given, a
    missing key, placeholders, a bad URL), as lines; none when they may. The operator and the API
    refuse to start on them, told with their other wrong settings."""
    try:
        StorageSettings.from_env(environ)
    except StorageConfigError as exc:
        return [str(exc)]
    return []


def _files_env(folder: Path) -> dict[str, str]:
    """The storage variables stored as files in `folder` (a Secret volume: key = file name)."""
    found: dict[str, str] = {}
    for key in STORAGE_ENV_VARS:
        try:
            found[key] = (folder / key).read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageConfigError(f"storage setting {key}: cannot read {folder / key}: {exc}") from exc
    return found


# ---------------------------------------------------------------------------------------------
# Key layout (pure)
# ---------------------------------------------------------------------------------------------

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_id(kind: str, value: str) -> str:
    # Ids become key path segments: a "/" or ".." would let one project address another's data.
    if not _ID_RE.match(value) or value in {".", ".."}:
        raise ValueError(f"invalid {kind} id {value!r}")
    return value


def check_sha256(value: str) -> str:
    if not _SHA256_RE.match(value):
        raise ValueError(f"invalid sha256 {value!r}: expected 64 lowercase hex digits")
    return value


def normalize_relpath(path: str) -> str:
    """Normalize a job-relative path ("a/./b" -> "a/b", "a\\b" -> "a/b"); refuse absolute paths and ``..``.

    The rule (both separators, `C:` is absolute) is the validator's: dsjobs.syntax. The result
    is safe to join under a root directory or a key prefix.
    """
    if not path or "\x00" in path:
        raise UnsafePathError(f"empty or NUL-containing path {path!r}")
    problem = escape_problem(path)
    if problem is not None:
        raise UnsafePathError(f"path {path!r} {problem[1]}")
    norm = join_segments(path)
    if norm == ".":
        raise UnsafePathError(f"path {path!r} names no file")
    return norm


def project_prefix(project: str) -> str:
    return f"projects/{check_id('project', project)}/"


def input_key(project: str, sha256: str) -> str:
    return f"{project_prefix(project)}inputs/{check_sha256(sha256)}"


def is_stored_input(sha256: str, size_bytes: int) -> bool:
    """Whether an input's content lives in the store (under `input_key`).

    The empty file's does not: its hash says all there is, so nobody uploads or downloads it.
    Clients could not upload it anyway: `requests` (the official CLI's) sends a zero-byte body
    chunked, which S3 refuses with 411 Length Required.
    """
    return not (size_bytes == 0 and sha256 == EMPTY_SHA256)


def job_prefix(project: str, job: str) -> str:
    return f"{project_prefix(project)}jobs/{check_id('job', job)}/"


def output_prefix(project: str, job: str) -> str:
    return f"{job_prefix(project, job)}outputs/"


def output_key(project: str, job: str, path: str) -> str:
    return output_prefix(project, job) + normalize_relpath(path)


def log_prefix(project: str, job: str) -> str:
    return f"{job_prefix(project, job)}logs/"


def result_key(project: str, job: str) -> str:
    return f"{job_prefix(project, job)}result.json"


def forced_cancel_key(project: str, job: str) -> str:
    """Where the operator tells a job's runner that its cancel is forced (`{"attempt": N}`): the
    pod's deletion alone cannot say it, its grace period must leave the runner time to store the logs."""
    return f"{job_prefix(project, job)}forced-cancel.json"


# ---------------------------------------------------------------------------------------------
# Retry
# ---------------------------------------------------------------------------------------------

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "BadGateway",
        "GatewayTimeout",
    }
)
# Not transient: RequestTimeTooSkewed (403). A retry is signed with the same clock, so it is refused
# the same way; only fixing the node's clock helps.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Network trouble as an OSError without a class of its own (EHOSTUNREACH, ENETUNREACH, ...).
#: botocore retries any OSError of a connection (urllib3 wraps them); among ours an OSError can also
#: be local (no such file, disk full), so only these errnos count. Out of file descriptors or socket
#: buffers (a connection's socket not made) passes as the process's streams and connections close:
#: the API answered it INTERNAL with an incident number, which the CLI does not retry.
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENETUNREACH",
        "EHOSTUNREACH",
        "ENETDOWN",
        "EHOSTDOWN",
        "ENETRESET",
        "ECONNABORTED",
        "ECONNRESET",
        "ECONNREFUSED",
        "ETIMEDOUT",
        "EPIPE",
        "EADDRNOTAVAIL",
        "EMFILE",
        "ENFILE",
        "ENOBUFS",
    )
    if hasattr(errno, name)
)


def _certificate_failure(exc: BaseException) -> bool:
    """True if `exc`, or an error it wraps, is a failed certificate verification (or hostname
    check). botocore's SSLError keeps urllib3's error in ``kwargs["error"]``, which keeps ssl's."""
    todo: list[object] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError) or type(e).__name__ == "CertificateError":
            return True
        text = str(e)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return True
        kwargs = getattr(e, "kwargs", None)
        todo += [e.__cause__, e.__context__, *e.args, *(kwargs.values() if isinstance(kwargs, dict) else ())]
    return False


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: connection trouble, timeouts, 5xx, throttling.

    The same failure counts the same whether it came through botocore or `dsjobs.s3http`: a DNS
    lookup that failed, an unreachable network or host, a TLS connection cut short are retried
    (botocore retries them as connection errors); a certificate that fails verification is not.
    """
    if isinstance(exc, (SSLError, ssl.SSLError)):
        # A TLS connection cut short (EOF, reset, bad record) is network trouble; a certificate
        # problem does not go away by retrying.
        return not _certificate_failure(exc)
    if isinstance(exc, socket.gaierror):
        return True  # name resolution: botocore's EndpointConnectionError
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    if isinstance(
        exc,
        (
            BotoConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ResponseStreamingError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    if isinstance(exc, S3HttpError):
        return exc.code in _TRANSIENT_CODES or exc.status in _TRANSIENT_STATUS
    if isinstance(exc, http.client.HTTPException):
        return True  # a response cut short or garbled (IncompleteRead, RemoteDisconnected, ...)
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code", "") in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    # s3transfer wraps the underlying error; judge by the cause.
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and type(exc).__name__ == "S3UploadFailedError":
        return is_transient(cause)
    return False


T = TypeVar("T")


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    patience: float = 0.0,
    base_delay: float = 0.5,
    max_delay: float = 20.0,
    transient: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures with jittered exponential backoff.

    It gives up after ``attempts`` tries, but not before ``patience`` seconds have passed since the
    first failure: a job's runner waits out a storage outage of minutes rather than lose the job's
    inputs or outputs to it. ``attempts <= 0`` retries forever (the log shipper uses that while the
    program runs: the data is safe in files, so waiting out a storage outage loses nothing).
    """
    backoff = Backoff(attempts, patience, base_delay=base_delay, max_delay=max_delay, clock=clock)
    while True:
        try:
            return fn()
        except Exception as exc:
            delay = backoff.failed() if transient(exc) else None
            if delay is None:
                raise
            delay = jittered(delay)
            log.info(
                "storage retry what=%s attempt=%d delay=%.2fs error=%s",
                what,
                backoff.failures,
                delay,
                _short(exc),
            )
            (sleep or time.sleep)(delay)


class Backoff:
    """The retry rule of one request: give up after ``attempts`` failed tries (never when
    ``attempts <= 0``), but not before ``patience`` seconds have passed since the first failure;
    wait ``base_delay`` doubling up to ``max_delay`` between tries."""

    def __init__(
        self,
        attempts: int,
        patience: float = 0.0,
        *,
        base_delay: float = 0.5,
        max_delay: float = 20.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.attempts, self.patience = attempts, patience
        self.base_delay, self.max_delay = base_delay, max_delay
        self.clock = clock or time.monotonic
        self.failures = 0
        self._first_failure: float | None = None

    def failed(self) -> float | None:
        """Count a transient failure: the delay before the next try, or None to give up."""
        self.failures += 1
        now = self.clock()
        if self._first_failure is None:
            self._first_failure = now
        if (
            self.attempts > 0
            and self.failures >= self.attempts
            and now - self._first_failure >= self.patience
        ):
            return None
        return min(self.max_delay, self.base_delay * 2.0 ** min(self.failures - 1, 32))  # no overflow


def _short(exc: BaseException) -> str:
    s = f"{type(exc).__name__}: {exc}"
    return s if len(s) <= 300 else s[:297] + "..."


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: datetime | None = None  # LastModified, where a listing tells it


@dataclass(frozen=True)
class UploadInfo:
    """An unfinished multipart upload: invisible as an object, but its parts take space."""

    key: str
    upload_id: str
    initiated: datetime | None


@dataclass(frozen=True)
class TransferResult:
    key: str
    size: int
    sha256: str


class ObjectStore(Protocol):
    """The small-object operations the log format needs; `Storage` implements it, tests fake it."""

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = ..., if_none_match: bool = ...
    ) -> None: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None: ...


class PreconditionFailedError(StorageError):
    """A conditional write found the key already present."""


class _OrderedWriter:
    """Writes chunks to a file in order, in a thread of its own: a download then reads and hashes
    the next chunk while the last one is written (both release the GIL), instead of doing the
    three one after the other. At most `depth` chunks wait, so memory stays constant."""

    def __init__(self, f: Any, depth: int = 4) -> None:
        self._f = f
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dsjobs-download-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:
                    return
                if self._error is None:  # after a failure, chunks are only taken (no deadlock)
                    self._f.write(chunk)
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, chunk: bytes) -> None:
        self._check()
        self._queue.put(chunk)

    def flush(self) -> None:
        """Wait until every chunk given so far is written (raises the writer's error)."""
        self._queue.join()
        self._check()

    def __enter__(self) -> _OrderedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()


def multipart_etag(parts: Sequence[Mapping[str, Any]]) -> str | None:
    """The ETag S3 gives an object completed from these parts: the MD5 of their MD5s, "-<count>";
    None when a part's ETag is no MD5 (a store that makes its own: nothing to compare)."""
    try:
        digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
    except ValueError:
        return None
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"


def content_disposition(filename: str) -> str:
    """`attachment` naming the file, in a header value S3 accepts.

    S3 refuses a GET whose response-content-disposition holds characters outside ISO-8859-1
    (400 InvalidArgument): `filename` is an ASCII stand-in, and a name that is not ASCII goes in
    RFC 6266's `filename*` (UTF-8, percent-encoded), which browsers and curl prefer.
    """
    name = "".join(ch for ch in filename if ch.isprintable() and ch not in '"\\')
    plain = "".join(ch if ch.isascii() else "_" for ch in name).strip() or "download"
    value = f'attachment; filename="{plain}"'
    if name and plain != name:
        value += "; filename*=UTF-8''" + urllib.parse.quote(name, safe="")
    return value


class Storage:
    """The bucket. Thread-safe (botocore clients are, and `S3Http` keeps a connection per thread);
    one instance per process is enough."""

    def __init__(
        self,
        settings: StorageSettings,
        *,
        attempts: int = 5,
        patience: float = 0.0,
        upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
        part_size: int = MIN_PART_SIZE,
    ) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.attempts = attempts
        self.patience = patience
        # Clients are made on first use: importing botocore and building a client costs ~0.2 s
        # of CPU, which a runner process should pay only when it needs botocore (multipart,
        # listings, batch deletes, presigning); one-object calls go through `_http`.
        self._clients: dict[str, S3Client] = {}
        self._clients_lock = threading.Lock()
        # Parts in flight per upload: with the one being read, memory is (this + 1) x part size.
        # Two keep a local S3 busy at the raw client's throughput (docs/benchmarks.md).
        self.upload_concurrency = max(1, upload_concurrency)
        self.part_size = max(5 * _MiB, part_size)
        self._conditional_writes = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Storage:
        return cls(StorageSettings.from_env(environ))

    def with_attempts(self, attempts: int, patience: float = 0.0) -> Storage:
        """The same bucket and clients, making ``attempts`` tries per request and riding out
        ``patience`` seconds of failures (`retry`). One try and no patience for a caller that
        retries on its own (two nested retry loops would multiply each other's waits)."""
        _ = self._http  # made here, or each copy would make (and connect) its own
        other = copy.copy(self)
        other.attempts = attempts
        other.patience = patience
        return other

    def with_timeout(self, seconds: float) -> Storage:
        """The same bucket, whose one-request calls wait `seconds` to connect and then for each
        read, instead of a minute: for a caller that answers someone who waits."""
        other = copy.copy(self)
        other.__dict__["_http"] = self._new_http(seconds)
        return other

    def connect(self) -> Storage:
        """Make the S3 clients now instead of on first use (a server's first request should not
        pay for importing botocore)."""
        _ = self._client, self._presign_client, self._http
        return self

    @property
    def _client(self) -> S3Client:
        return self._lazy_client(self.settings.endpoint)

    @property
    def _presign_client(self) -> S3Client:
        if not self.settings.public_endpoint:
            return self._client
        return self._lazy_client(self.settings.public_endpoint)

    @functools.cached_property
    def _http(self) -> S3Http:
        """One-request calls (head, get, put, delete, list a few, single-part upload, download)."""
        return self._new_http(S3HTTP_TIMEOUT)

    def _new_http(self, timeout: float) -> S3Http:
        s = self.settings
        return S3Http(
            s.endpoint, s.bucket, Credentials(s.access_key, s.secret_key, s.region), timeout=timeout
        )

    def _lazy_client(self, endpoint: str) -> S3Client:
        client = self._clients.get(endpoint)
        if client is None:
            with self._clients_lock:
                client = self._clients.get(endpoint)
                if client is None:
                    client = self._clients[endpoint] = self._make_client(endpoint)
        return client

    def _make_client(self, endpoint: str) -> S3Client:
        # botocore's own session: boto3 would add only its transfer helpers (which we do not
        # use) and ~40 ms of imports to every process that talks to storage.
        import botocore.session
        from botocore.config import Config as BotoConfig

        cfg = BotoConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # One try per call: `retry` wraps every call this client makes (its retries inside ours
            # sent 30 requests per listing to a server asking us to slow down).
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            # Only checksums the API demands: S3-compatible servers vary in what else they accept.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=self.settings.access_key,
            aws_secret_access_key=self.settings.secret_key,
            region_name=self.settings.region,
            config=cfg,
        )
        client.meta.events.register("before-call.s3.DeleteObjects", _with_content_md5)
        return cast("S3Client", client)

    # -- presigned URLs -------------------------------------------------------------------------

    @staticmethod
    def _expiry_seconds(expires: timedelta) -> int:
        if expires <= timedelta(0) or expires > MAX_PRESIGN_EXPIRY:
            raise ValueError(f"presigned URL expiry must be in (0, {MAX_PRESIGN_EXPIRY}], got {expires}")
        return int(expires.total_seconds())

    def presign_put(
        self,
        key: str,
        *,
        expires: timedelta = DEFAULT_PRESIGN_EXPIRY,
        size: int | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> str:
        """A URL that accepts a plain ``PUT`` of the object body (no extra headers needed). With
        `size`, only a body of that many bytes: the Content-Length is signed (every HTTP client
        sends it for a file or bytes body), so the URL of an input cannot store more, or other
        bytes of another size, under its sha256 key. `credentials` (access key, secret key): sign
        with that key pair instead of this store's (a project's own, limited to its prefix)."""
        if credentials is not None:
            return self._presigned_with(credentials, "PUT", key, expires, size)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if size is not None:
            params["ContentLength"] = size
        return self._presign_client.generate_presigned_url(
            "put_object", Params=params, ExpiresIn=self._expiry_seconds(expires)
        )

    def _presigned_with(
        self, credentials: tuple[str, str], method: str, key: str, expires: timedelta, size: int | None
    ) -> str:
        """A path-style presigned URL, as botocore's client makes them here, signed with another
        key pair (`s3http.presign_v4`): a client per key pair would cost ~0.2 s of CPU and
        megabytes each."""
        endpoint = urllib.parse.urlsplit(self.settings.public_endpoint or self.settings.endpoint)
        path = f"{endpoint.path.rstrip('/')}/{self.bucket}/{key}"
        headers = {"content-length": str(size)} if size is not None else {}
        creds = Credentials(credentials[0], credentials[1], self.settings.region)
        query = presign_v4(
            method, endpoint.netloc, path, creds, datetime.now(UTC), self._expiry_seconds(expires), headers
        )
        return f"{endpoint.scheme}://{endpoint.netloc}{canonical_uri(path)}?{query}"

    def presign_get(
        self, key: str, *, expires: timedelta = DEFAULT_PRESIGN_EXPIRY, filename: str | None = None
    ) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        return self._presign_client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self._expiry_seconds(expires)
        )

    def _retry(self, fn: Callable[[], T], *, what: str) -> T:
        """`retry` with this store's attempts: the one retry layer of every request it makes."""
        return retry(fn, what=what, attempts=self.attempts, patience=self.patience)

    # -- small objects --------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        def call() -> ObjectInfo | None:
            try:
                r = self._http.request("HEAD", key)
            except S3HttpError as exc:
                if exc.status == 404:
                    return None
                raise
            return ObjectInfo(
                key=key, size=int(r.headers.get("content-length", 0)), etag=r.headers.get("etag", "")
            )

        return self._retry(call, what=f"head {key}")

    def exists(self, key: str, *, size: int | None = None) -> bool:
        """True if the key exists (and, when ``size`` is given, has exactly that many bytes).

        The size check is what makes the content-addressed input cache safe to trust for
        deduplication: a truncated or wrong-size upload is not "already there".
        """
        info = self.head(key)
        return info is not None and (size is None or info.size == size)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> None:
        """PUT a small object. ``if_none_match`` refuses to replace an existing key.

        A conditional PUT that is retried after a lost response finds its own object: that
        counts as success when the stored bytes are ours, else PreconditionFailedError.
        """
        attempt = 0

        def call() -> None:
            nonlocal attempt
            attempt += 1
            headers = {"content-type": content_type}
            if if_none_match and self._conditional_writes:
                headers["if-none-match"] = "*"
            try:
                self._http.request("PUT", key, body=data, headers=headers)
            except S3HttpError as exc:
                if exc.code == "NotImplemented" and "if-none-match" in headers:
                    # Older S3-compatible servers: fall back to plain PUTs (single writer anyway).
                    log.info("storage conditional writes unsupported; using plain PUT")
                    self._conditional_writes = False
                    self._http.request("PUT", key, body=data, headers={"content-type": content_type})
                    return
                if exc.status == 412 or exc.code == "PreconditionFailed":
                    stored = self.get_bytes(key)
                    if stored == data:
                        return
                    if stored is None:
                        # There, yet not readable (a store whose reads lag its writes): no other
                        # content seen, so no other writer; asked again after the backoff.
                        raise S3HttpError(
                            503, "SlowDown", "refused as existing, read as missing", key
                        ) from exc
                    raise PreconditionFailedError(f"{key} already exists with other content") from exc
                raise

        self._retry(call, what=f"put {key}")

    def get_bytes(self, key: str) -> bytes | None:
        """The whole object, or None if it does not exist. For small objects only."""

        def call() -> bytes | None:
            try:
                return self._http.request("GET", key).body
            except S3HttpError as exc:
                if exc.status == 404:
                    return None
                raise

        return self._retry(call, what=f"get {key}")

    def delete(self, key: str) -> None:
        def call() -> None:
            try:
                self._http.request("DELETE", key)
            except S3HttpError as exc:
                if exc.status != 404:  # some servers say so for a key that is already gone
                    raise

        self._retry(call, what=f"delete {key}")

    def first_keys(self, prefix: str, limit: int = 1) -> list[str]:
        """Up to `limit` keys under `prefix`, in key order: one request, without botocore."""
        query = {"list-type": "2", "prefix": prefix, "max-keys": str(limit)}
        return self._retry(
            lambda: listed_keys(self._http.request("GET", "", query=query).body)[:limit],
            what=f"list {prefix}",
        )

    def access_problem(self) -> str | None:
        """What keeps these settings from using the bucket, found by one LIST of one key; None
        when it answered. A server's start-up check: a wrong endpoint, bucket or key is named in
        its log at once, not at the first upload or stage-in."""
        s = self.settings
        try:
            self.first_keys("projects/", 1)
        except Exception as exc:
            if isinstance(exc, S3HttpError):
                cause = f"{exc.code} (HTTP {exc.status})"
                if exc.status in (401, 403):
                    cause += f": check {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}"
                elif exc.code == "NoSuchBucket":
                    cause += f": check {ENV_BUCKET}"
            else:
                cause = f"{type(exc).__name__}: {exc}"
            how = "does not answer" if is_transient(exc) else "refuses the bucket's listing"
            return f"the object store {s.endpoint} (bucket {s.bucket}) {how}: {cause}"[:600]
        return None

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._retry(
                lambda kw=kwargs: self._client.list_objects_v2(**kw),  # type: ignore[misc]
                what=f"list {prefix}",
            )
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    key=obj["Key"],
                    size=int(obj["Size"]),
                    etag=str(obj.get("ETag", "")),
                    modified=obj.get("LastModified"),
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def delete_prefix(
        self, prefix: str, *, written_until: datetime | None = None, uploads: bool = True
    ) -> int:
        """Delete every object under ``prefix`` (and, with ``uploads``, abort its unfinished
        multipart uploads); with ``written_until``, only those last written (uploads started) by
        then.

        Returns the number of objects deleted.
        """
        if not prefix or not prefix.endswith("/"):
            # A prefix like "projects/p1" would also match "projects/p10/...".
            raise ValueError(f"prefix must be non-empty and end with '/': {prefix!r}")
        batch: list[str] = []
        deleted = 0

        def flush() -> None:
            nonlocal deleted
            if not batch:
                return
            objs: list[Any] = [{"Key": k} for k in batch]
            r = self._retry(
                lambda: self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objs, "Quiet": True}
                ),
                what=f"delete {len(batch)} under {prefix}",
            )
            errors = r.get("Errors", [])
            if errors:
                raise StorageError(f"delete under {prefix} failed for {len(errors)} keys: {errors[0]}")
            deleted += len(batch)
            batch.clear()

        for obj in self.iter_objects(prefix):
            if written_until is not None and (obj.modified is None or obj.modified > written_until):
                continue
            batch.append(obj.key)
            if len(batch) >= 1000:
                flush()
        flush()
        if uploads:
            self.abort_uploads(prefix, started_until=written_until)
        return deleted

    def iter_uploads(self, prefix: str) -> Iterator[UploadInfo]:
        """Every unfinished multipart upload of a key under ``prefix``, in key order (paged: a
        store lists at most 1000 at a time)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxUploads": UPLOADS_PAGE}
        while True:
            page = self._retry(
                lambda kw=dict(kwargs): self._client.list_multipart_uploads(**kw),  # type: ignore[misc]
                what=f"list uploads {prefix}",
            )
            listed = page.get("Uploads", [])
            for u in listed:
                key, started = str(u.get("Key", "")), u.get("Initiated")
                if key.startswith(prefix):
                    yield UploadInfo(
                        key, str(u["UploadId"]), started if isinstance(started, datetime) else None
                    )
            asked = (kwargs.get("KeyMarker"), kwargs.get("UploadIdMarker"))
            key_marker, id_marker = page.get("NextKeyMarker"), page.get("NextUploadIdMarker")
            if page.get("IsTruncated") and not key_marker and listed:
                # A store that leaves the markers out of a truncated page (as S3 may for the
                # objects' listing): the next one starts after the last upload listed.
                key_marker, id_marker = str(listed[-1].get("Key", "")), str(listed[-1].get("UploadId", ""))
            # A store that says "truncated" without moving its marker would be asked for ever.
            if not page.get("IsTruncated") or not key_marker or (key_marker, id_marker) == asked:
                return
            kwargs["KeyMarker"] = key_marker
            kwargs.pop("UploadIdMarker", None)
            if id_marker:
                kwargs["UploadIdMarker"] = id_marker

    def abort_uploads(
        self, prefix: str, *, started_until: datetime | None = None, key: str | None = None
    ) -> int:
        """Abort the unfinished multipart uploads under ``prefix`` (of ``key`` only, with it),
        with ``started_until`` only those started by then; best effort (a listing or abort that
        fails is logged): the number aborted."""
        aborted = 0
        try:
            for u in self.iter_uploads(prefix):
                if key is not None and u.key != key:
                    continue
                if started_until is not None and (u.initiated is None or u.initiated > started_until):
                    continue
                try:
                    self._abort_upload(u.key, u.upload_id)
                    aborted += 1
                except (ClientError, BotoCoreError) as exc:
                    log.warning(
                        "storage abort upload failed: its parts stay until a lifecycle rule or a later "
                        "clear aborts it key=%s error=%s",
                        u.key,
                        _short(exc),
                    )
        except (ClientError, BotoCoreError) as exc:
            log.warning(
                "storage list multipart uploads failed: unfinished uploads under it stay until a "
                "lifecycle rule or a later clear aborts them prefix=%s error=%s",
                prefix,
                _short(exc),
            )
        return aborted

    def _abort_upload(self, key: str, upload_id: str) -> None:
        self._retry(
            lambda: self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id),
            what=f"abort upload {key}",
        )

    # -- streaming transfers ---------------------------------------------------------------------

    def upload_file(
        self,
        path: str | os.PathLike[str] | io.BufferedReader,
        key: str,
        *,
        content_type: str = "application/octet-stream",
    ) -> TransferResult:
        """Stream a local file to ``key`` (multipart above 16 MiB), hashing it on the way.

        ``path`` may be a file opened for reading at its start (the runner opens what the job could
        have replaced by a symlink itself); it is not closed. The file is read once, in order, up
        to the size it has when this begins (a file a leftover process keeps appending to is not
        followed), and the sha256 is of exactly the bytes sent. Memory is bounded by ``upload_concurrency + 1``
        parts whatever the file size. Each request is retried by itself (a part that fails is sent
        again, not the whole file); an upload that still fails is aborted (nothing half-written
        becomes visible).
        """
        opened = (
            contextlib.nullcontext(path) if not isinstance(path, (str, os.PathLike)) else open(path, "rb")  # noqa: SIM115 - the with below closes it
        )
        with opened as f:
            size = os.fstat(f.fileno()).st_size
            if size <= MULTIPART_THRESHOLD:
                return self._put_whole(key, f.read(size), content_type)
            return self._multipart_upload(_Bounded(f, size), key, content_type, size)

    def _put_whole(self, key: str, data: bytes, content_type: str) -> TransferResult:
        """One PUT of a small upload (`upload_file`, `upload_stream`), hashed as sent."""
        digest = hashlib.sha256(data).hexdigest()
        self._retry(
            lambda: self._http.request(
                "PUT", key, body=data, headers={"content-type": content_type}, body_sha256=digest
            ),
            what=f"upload {key}",
        )
        return TransferResult(key=key, size=len(data), sha256=digest)

    def upload_stream(
        self,
        key: str,
        produce: Callable[[BinaryIO], None],
        *,
        content_type: str = "application/octet-stream",
        size_hint: int = 0,
    ) -> TransferResult:
        """Upload what ``produce`` writes to the file it is given (a zip made on the fly), with no
        local copy: the bytes go through a pipe from a producer thread to the upload.

        ``size_hint`` is an upper estimate of the size (0: unknown). Above 16 MiB the upload is
        multipart in full parts, of the size `upload_file` would take for that size; else up to
        16 MiB are read ahead, and go as one PUT if that was all. Memory and retries are
        `upload_file`'s. Nothing is stored unless ``produce`` returned: its exception is raised
        here (a multipart upload is aborted), and a failed upload stops it (its writes raise
        BrokenPipeError).
        """
        read_fd, write_fd = os.pipe()
        failures: list[BaseException] = []

        def run() -> None:
            try:
                with os.fdopen(write_fd, "wb", buffering=IO_CHUNK) as out:
                    produce(out)
            except BaseException as exc:
                failures.append(exc)

        producer = threading.Thread(target=run, name="dsjobs-upload-producer", daemon=True)
        with io.FileIO(read_fd, "rb") as pipe:
            producer.start()
            try:
                source = _Produced(pipe, producer, failures)
                if size_hint > MULTIPART_THRESHOLD:
                    return self._multipart_upload(source, key, content_type, size_hint)
                # Small or unknown: read ahead to find out.
                head = bytearray(MULTIPART_THRESHOLD + 1)
                n = source.readinto(head)
                if n <= MULTIPART_THRESHOLD:
                    source.readinto(bytearray(1))  # the end: raises the producer's failure
                    data = bytes(memoryview(head)[:n])
                    del head
                    return self._put_whole(key, data, content_type)
                source.unread(memoryview(head)[:n])
                del head  # the source lets go of it once read: memory stays upload_file's
                return self._multipart_upload(source, key, content_type, max(size_hint, n))
            finally:
                pipe.close()  # a producer still writing gets BrokenPipeError
                producer.join()

    def _multipart_upload(self, f: _Readable, key: str, content_type: str, size: int) -> TransferResult:
        part_size = part_size_for(size, self.part_size)
        upload_id = self._retry(
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type
            )["UploadId"],
            what=f"start upload {key}",
        )
        h = hashlib.sha256()
        total = 0
        etags: list[CompletedPartTypeDef] = []
        # A fixed set of part buffers, refilled in place: memory stays at (concurrency + 1) parts
        # and no 8 MiB block is allocated (and page-faulted in) per part. Parts grow past 8 MiB
        # for objects over 78 GiB (10,000 parts): then fewer buffers, down to one part read and
        # sent at a time, so that a 1.5 TiB checkpoint (158 MiB parts) fits the runner's memory.
        buffers = part_buffers(part_size, self.upload_concurrency)
        workers = max(1, min(self.upload_concurrency, buffers - 1))
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(buffers):
            free.put(bytearray(part_size))

        def put(number: int, buf: bytearray, n: int) -> CompletedPartTypeDef:
            try:
                if n < len(buf):
                    del buf[n:]  # the last part: shrunk in place, not copied
                body = buf
                r = self._retry(
                    lambda: self._client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,  # type: ignore[arg-type]  # botocore takes bytearray too
                    ),
                    what=f"upload {key} part {number}",
                )
                return {"PartNumber": number, "ETag": r["ETag"]}
            finally:
                free.put(buf)

        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="upload") as pool:
                inflight: deque[Future[CompletedPartTypeDef]] = deque()
                try:
                    number = 0
                    while True:
                        buf = free.get()  # waits while every buffer is in an upload
                        n = f.readinto(buf)
                        if not n:
                            break
                        h.update(memoryview(buf)[:n])
                        total += n
                        number += 1
                        if number > MAX_PARTS:
                            raise ValueError(f"{key}: the file grew past {MAX_PARTS} parts while uploading")
                        inflight.append(pool.submit(put, number, buf, n))
                        while inflight and inflight[0].done():
                            etags.append(inflight.popleft().result())  # a failed part stops us here
                    while inflight:
                        etags.append(inflight.popleft().result())
                except BaseException:
                    for pending in inflight:
                        pending.cancel()
                    raise
            self._complete_upload(key, upload_id, etags, total)
        except BaseException:
            # After the pool has drained: no part lands after the abort.
            try:
                self._abort_upload(key, upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.info("storage abort upload failed key=%s error=%s", key, _short(exc))
            raise
        return TransferResult(key=key, size=total, sha256=h.hexdigest())

    def _complete_upload(
        self, key: str, upload_id: str, parts: list[CompletedPartTypeDef], size: int
    ) -> None:
        """CompleteMultipartUpload, retried. A retry after an answer that was lost (the upload
        completed, the response timed out) finds the upload gone (NoSuchUpload): the object is
        then checked to be this very upload (its size, and the multipart ETag its parts make)."""
        try:
            self._retry(
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
                what=f"complete upload {key}",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            stored, expected = self.head(key), multipart_etag(parts)
            if (
                stored is None
                or expected is None
                or (stored.size, stored.etag.strip('"')) != (size, expected)
            ):
                raise
            log.info("storage upload completed although its answer was lost key=%s", key)

    def download_file(
        self,
        key: str,
        dest: str | os.PathLike[str],
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        stop: threading.Event | None = None,
    ) -> TransferResult:
        """Stream ``key`` into ``dest`` with constant memory, verifying size and sha256.

        Setting ``stop`` (another download of the same job failed) ends it at the next chunk or
        retry wait with TransferStopped.

        Interrupted reads resume with a Range request, and the answer is used only if it continues
        the same object where we stopped (206, Content-Range from the bytes we have, same ETag);
        otherwise (object replaced, Range ignored) the download starts over, at most ``attempts``
        times. ``dest`` appears only when the content is verified; nothing is left behind on failure.
        """
        dest_path = Path(dest)
        # Of a fixed length: a name near NAME_MAX (255 bytes) that the job may have must not fail
        # for its temporary one. Hashed, so that two downloads into one directory do not meet.
        tag = hashlib.sha256(dest_path.name.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        tmp = dest_path.with_name(f".dsjobs-partial-{tag}")
        h = hashlib.sha256()
        written = 0
        etag = ""
        backoff = Backoff(self.attempts, self.patience)
        restarts = 0
        try:
            with open(tmp, "wb") as f, _OrderedWriter(f) as sink:

                def start_over(why: str) -> None:
                    nonlocal h, written, restarts
                    restarts += 1
                    if restarts > self.attempts:
                        raise StorageError(f"{key}: download started over {self.attempts} times, last: {why}")
                    log.info("storage download restart key=%s at=%d reason=%s", key, written, why)
                    sink.flush()
                    f.seek(0)
                    f.truncate()
                    h, written = hashlib.sha256(), 0

                while True:
                    resuming = written > 0
                    headers = {"range": f"bytes={written}-"} if resuming else None
                    try:
                        try:
                            r = self._http.open_get(key, headers)
                        except S3HttpError as exc:
                            if exc.status == 404:
                                raise ObjectNotFoundError(f"object {key} not found") from exc
                            if resuming and (exc.status == 416 or exc.code == "InvalidRange"):
                                # Nothing past our bytes: done if the object is still the one we
                                # read them from, and exactly that long.
                                if self._has_size_and_etag(key, written, etag):
                                    break
                                start_over("range not satisfiable and the object changed")
                                continue
                            raise
                        if resuming:
                            why = _resume_problem(r.status, r.headers, written, etag)
                            if why is not None:
                                try:
                                    start_over(why)
                                except BaseException:
                                    r.close()
                                    raise
                                if r.status != 200:
                                    r.close()
                                    continue
                                # A 200 is the whole current object: read it from its first byte.
                        if not written:
                            etag = r.headers.get("etag", "")
                        for chunk in r.iter_chunks(IO_CHUNK):
                            if stop is not None and stop.is_set():
                                r.close()
                                raise TransferStopped(f"{key}: stopped at {written} bytes")
                            if expected_size is not None and written + len(chunk) > expected_size:
                                # Replaced by a larger object: not a byte more onto the job's disk.
                                r.close()
                                raise IntegrityError(f"{key}: more than the expected {expected_size} bytes")
                            sink.write(chunk)  # written by the sink's thread while we hash
                            h.update(chunk)
                            written += len(chunk)
                        break
                    except (ObjectNotFoundError, TransferStopped):
                        raise
                    except Exception as exc:
                        delay = backoff.failed() if is_transient(exc) else None
                        if delay is None:
                            raise
                        log.info(
                            "storage download resume key=%s at=%d attempt=%d error=%s",
                            key,
                            written,
                            backoff.failures,
                            _short(exc),
                        )
                        delay = jittered(delay)
                        if stop is None:
                            time.sleep(delay)
                        elif stop.wait(delay):
                            raise TransferStopped(f"{key}: stopped at {written} bytes") from exc
                sink.flush()
            digest = h.hexdigest()
            if expected_size is not None and written != expected_size:
                raise IntegrityError(f"{key}: got {written} bytes, expected {expected_size}")
            if expected_sha256 is not None and digest != expected_sha256:
                raise IntegrityError(f"{key}: sha256 {digest} does not match expected {expected_sha256}")
            os.replace(tmp, dest_path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return TransferResult(key=key, size=written, sha256=digest)

    def _has_size_and_etag(self, key: str, size: int, etag: str) -> bool:
        """Is ``key`` ``size`` bytes with this ETag?"""
        info = self.head(key)
        if info is None:
            raise ObjectNotFoundError(f"object {key} not found")
        return info.size == size and info.etag == etag


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", re.IGNORECASE)


class _Readable(Protocol):
    def readinto(self, buf: bytearray, /) -> int: ...


class _Bounded:
    """The first `limit` bytes of a file, read with `readinto`."""

    def __init__(self, f: _Readable, limit: int) -> None:
        self._f, self._left = f, limit

    def readinto(self, buf: bytearray, /) -> int:
        if self._left <= 0:
            return 0
        if len(buf) <= self._left:
            n = self._f.readinto(buf)
        else:
            view = memoryview(buf)[: self._left]
            n = self._f.readinto(view)  # type: ignore[arg-type]  # a writable buffer is all it needs
        self._left -= n
        return n


class _Produced:
    """The reading end of `Storage.upload_stream`'s pipe. Every read fills the buffer but at the
    end (multipart parts must be full), and the end is only reported once the producer has
    returned; its failure is raised instead."""

    def __init__(self, pipe: io.RawIOBase, producer: threading.Thread, failures: list[BaseException]) -> None:
        self._pipe = pipe
        self._producer = producer
        self._failures = failures
        self._head = memoryview(b"")

    def unread(self, data: memoryview) -> None:
        """Read ``data`` again first (bytes already taken from the pipe)."""
        self._head = data

    def readinto(self, buf: bytearray, /) -> int:
        view = memoryview(buf)
        n = 0
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            # An empty slice would still hold the whole buffer.
            self._head = self._head[n:] if n < len(self._head) else memoryview(b"")
        while n < len(view):
            got = self._pipe.readinto(view[n:])
            if not got:
                break
            n += got
        if n == 0:
            self._producer.join()
            if self._failures:
                raise self._failures[0]
        return n


def single_try(store: ObjectStore) -> ObjectStore:
    """``store`` trying each request once, where it retries at all (`Storage`; test fakes do not)."""
    return store.with_attempts(1) if isinstance(store, Storage) else store


def _resume_problem(status: int, headers: Mapping[str, str], written: int, etag: str) -> str | None:
    """Why the answer to ``Range: bytes=<written>-`` does not continue what we have (None: it does)."""
    if status != 206:
        return f"the Range request was answered with {status}, not 206"
    if headers.get("etag", "") != etag:
        return f"the object changed (ETag {etag} -> {headers.get('etag', '')})"
    cr = headers.get("content-range", "")
    m = _CONTENT_RANGE.match(cr.strip())
    if m is None or int(m.group(1)) != written:
        return f"Content-Range {cr!r} does not start at byte {written}"
    return None
