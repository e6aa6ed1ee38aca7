"""`dsjobs download-files`: a finished job's files, whatever their size.

The official CLI's `download-files` skips files past a total of 1 GiB (DataSphere sends users to
its web UI for the rest, and dsjobs has none) and holds each file in memory while it downloads.
This command asks the same RPCs (Get, then DownloadJobFiles for each file's presigned URL just
before its transfer) and streams each file to disk, checking its size and SHA-256, then puts it
where the official CLI would: at its path relative to the current directory, or by its name in
`--output-dir`; a directory output (a ZIP) is extracted there, safely.

It imports dsjobs' own protobuf stubs, so it never shares a process with the official CLI
(`dsjobs.cli` imports this module only for this command).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import grpc

from dsjobs.cli import (
    Target,
    channel_options,
    is_loopback,
    rpc_error_line,
    secure_credentials,
    warn_plaintext,
)
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2, project_job_service_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs.project_job_service_pb2_grpc import ProjectJobServiceStub
from dsjobs.runner.zipsafe import UnsafeZipError, extract_zip

CHUNK_BYTES: Final = 8 << 20
RPC_TIMEOUT_SECONDS: Final = 60.0
READ_TIMEOUT_SECONDS: Final = 60.0
# The official CLI's answer for a job without files yet: it says so and downloads nothing.
_RUNNING: Final = frozenset(
    {jobs_pb2.JOB_STATUS_UNSPECIFIED, jobs_pb2.CREATING, jobs_pb2.EXECUTING, jobs_pb2.UPLOADING_OUTPUT}
)

USAGE_EXTRA = """
Downloads a finished job's outputs (and with the flags its logs and diagnostics) as the official
`datasphere project job download-files` does, without its 1 GiB total limit: each file is streamed
to disk and checked against its size and SHA-256. Our options (--endpoint, --token, --token-file,
--ca, --insecure) come first, as for `dsjobs datasphere`.
"""


class DownloadError(Exception):
    """A file that could not be downloaded; the message names it."""


class CallRefused(Exception):
    """The API refused a call; the message is the line for the user."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dsjobs download-files", description=USAGE_EXTRA)
    parser.add_argument("--id", required=True, help="ID of the job")
    parser.add_argument("--with-logs", action="store_true", help="download its log files too")
    parser.add_argument("--with-diagnostics", action="store_true", help="download its diagnostic files too")
    parser.add_argument("--output-dir", help="put every file in this directory (by its name)")
    return parser.parse_args(list(argv))


def destination(desc_path: str, output_dir: str | None) -> Path:
    """Where a file goes: as the official CLI puts it (its path under the current directory, or its
    name in `output_dir`), never outside them: a path the server gives that is absolute (a drive or
    root on Windows too) or climbs out with `..` is refused (DownloadError naming it)."""
    path = Path(desc_path)
    if output_dir:
        if path.name in ("", ".", ".."):
            raise DownloadError(f"{desc_path!r}: not a file name")
        return Path(output_dir) / path.name
    if path.is_absolute() or path.anchor or path.drive or ".." in path.parts or not path.parts:
        raise DownloadError(f"{desc_path!r}: outside the current directory (use --output-dir)")
    return path


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https to anything else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise urllib.error.HTTPError(
                newurl, code, f"redirect from https to {newurl} refused", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def opener(ca_file: str | None = None) -> urllib.request.OpenerDirector:
    """HTTP(S) only, trusting the system's CAs, certifi's where installed (as the official CLI's
    requests does), REQUESTS_CA_BUNDLE and `ca_file` (the API's CA: a company's object store often
    has the same)."""
    context = ssl.create_default_context()
    extra = [os.environ.get("REQUESTS_CA_BUNDLE"), ca_file]
    with contextlib.suppress(ImportError):
        import certifi

        extra.append(certifi.where())
    for cafile in extra:
        if cafile and Path(cafile).is_file():
            with contextlib.suppress(OSError, ssl.SSLError):
                context.load_verify_locations(cafile)
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _NoDowngrade(), urllib.request.ProxyHandler()
    )


def _beside(dest: Path, suffix: str) -> Path:
    """A file of this process beside `dest` (`.<tag>.<suffix>`): of a fixed length, so that an
    output named near NAME_MAX (255 bytes) does not fail for its helper file's name; hashed with
    the pid, so that two downloads into one directory do not meet."""
    tag = hashlib.sha256(f"{dest.name}\0{os.getpid()}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return dest.with_name(f".{tag}.{suffix}")


def fetch(
    url: str, dest: Path, size: int, sha256: str, web: urllib.request.OpenerDirector | None = None
) -> None:
    """Streams `url` into `dest` (through a partial file beside it, removed whatever happens),
    checking its size (never more is written) and SHA-256."""
    if not url.startswith(("https://", "http://")):
        raise DownloadError(f"{dest}: not an http(s) URL: {url[:40]!r}")
    partial = _beside(dest, "download")
    digest = hashlib.sha256()
    got = 0
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with (web or opener()).open(url, timeout=READ_TIMEOUT_SECONDS) as resp, partial.open("wb") as out:
            while chunk := resp.read(CHUNK_BYTES):
                got += len(chunk)
                if got > size:
                    raise DownloadError(f"{dest}: more than the {size} bytes the job's record says")
                out.write(chunk)
                digest.update(chunk)
        if got != size or (sha256 and digest.hexdigest() != sha256):
            raise DownloadError(
                f"{dest}: got {got} bytes (sha256 {digest.hexdigest()}), the job's record says {size} bytes"
                + (f" (sha256 {sha256})" if sha256 else "")
            )
        partial.replace(dest)
    except DownloadError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise DownloadError(f"{dest}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)


def place(
    storage_file: jobs_pb2.StorageFile,
    output_dir: str | None,
    web: urllib.request.OpenerDirector | None = None,
) -> str:
    """Downloads one file and puts it in place; what was done, for the user."""
    f = storage_file.file
    dest = destination(f.desc.path, output_dir)  # before anything is fetched
    if f.compression_type == jobs_pb2.ZIP:
        # A name of its own: the user's `results.zip` beside a `results` output stays as it is.
        archive = _beside(dest, "zip")
        try:
            fetch(storage_file.url, archive, f.size_bytes, f.sha256, web)
            count = extract_zip(archive, dest.parent, private=True)
        except (UnsafeZipError, OSError) as exc:
            raise DownloadError(f"{dest}: {exc}") from exc
        finally:
            archive.unlink(missing_ok=True)
        return f"{dest}/ ({count} files, {f.size_bytes} bytes zipped)"
    if f.sha256 and _holds(dest, f.size_bytes, f.sha256):
        # A run again after a failure (an expired token, the API restarting) fetches only the rest.
        return f"{dest} ({f.size_bytes} bytes, already there)"
    fetch(storage_file.url, dest, f.size_bytes, f.sha256, web)
    return f"{dest} ({f.size_bytes} bytes)"


def _holds(path: Path, size: int, sha256: str) -> bool:
    """Whether `path` is a regular file of exactly this size and SHA-256."""
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == sha256


def download_each(
    files: Sequence[jobs_pb2.File],
    ask_url: Callable[[jobs_pb2.File], jobs_pb2.StorageFile],
    place_one: Callable[[jobs_pb2.StorageFile], str],
) -> int:
    """Downloads `files` one after another, each with a URL asked for just before its transfer
    (`ask_url`: DownloadJobFiles for that file alone, CallRefused if refused); how many were not
    downloaded.

    One answer's URLs live at most 12 hours (the API's cap) and serve their files one after
    another: past ~10 GiB the last ones were refused (403) when their turn came. A URL asked for
    its own file is valid when its transfer starts, whatever came before. A refused call (no
    access, the job's data cleared) would refuse every file alike: it ends the command.
    """
    failed = 0
    for i, f in enumerate(files):
        try:
            storage_file = ask_url(f)
        except CallRefused as exc:
            print(f"{exc} (asking for {f.desc.path})", file=sys.stderr)
            return failed + len(files) - i
        try:
            print(f"downloaded {place_one(storage_file)}", flush=True)
        except DownloadError as exc:
            failed += 1
            print(f"dsjobs: cannot download {exc}", file=sys.stderr)
    return failed


def run_download(target: Target, argv: Sequence[str]) -> int:
    args = parse_args(argv)
    warn_plaintext(target)
    creds = secure_credentials(target)
    options = channel_options((), "dsjobs-download", direct=creds is None and is_loopback(target.endpoint))
    channel = (
        grpc.secure_channel(target.endpoint, creds, options=options)
        if creds is not None
        else grpc.insecure_channel(target.endpoint, options=options)
    )
    with channel:
        stub = ProjectJobServiceStub(channel)

        def md() -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {target.current_token()}"),)

        try:
            job = stub.Get(
                project_job_service_pb2.GetProjectJobRequest(job_id=args.id),
                metadata=md(),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as exc:
            print(rpc_error_line(exc.code(), exc.details() or "", target), file=sys.stderr)
            return 1
        if job.status in _RUNNING:
            print(f"dsjobs: job {args.id} has not finished yet: nothing to download", file=sys.stderr)
            return 1
        files = list(job.output_files)
        if args.with_logs:
            files += job.log_files
        if args.with_diagnostics:
            files += job.diagnostic_files
        if not files:
            print(f"job {args.id} has no files to download")
            return 0

        def ask_url(f: jobs_pb2.File) -> jobs_pb2.StorageFile:
            try:
                resp = stub.DownloadJobFiles(
                    project_job_service_pb2.DownloadProjectJobFilesRequest(job_id=args.id, files=[f]),
                    metadata=md(),
                    timeout=RPC_TIMEOUT_SECONDS,
                )
            except grpc.RpcError as exc:
                raise CallRefused(rpc_error_line(exc.code(), exc.details() or "", target)) from exc
            if len(resp.download_files) != 1:
                raise CallRefused(f"dsjobs: the API answered {len(resp.download_files)} URLs for one file")
            return resp.download_files[0]

        web = opener(target.ca_file)
        failed = download_each(files, ask_url, lambda sf: place(sf, args.output_dir, web))
    if failed:
        print(f"dsjobs: {failed} of {len(files)} files were not downloaded", file=sys.stderr)
        return 1
    return 0


__all__ = ["destination", "download_each", "fetch", "place", "run_download"]
