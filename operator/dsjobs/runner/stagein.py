"""Stage-in (the init container): inputs and local modules into place, then the entry script.

Only for jobs that have something to fetch or write (`contract.stages_in_python`); for the others
the init container is a POSIX sh script doing what `prepare` does (`contract.shell_stage_in`).

- each input ``projects/<project>/inputs/<sha256>`` is streamed to ``<work_dir>/<path>`` with its
  size and sha256 verified (the cache is content-addressed, but clients upload through presigned
  URLs: the content is checked, not trusted); ZIP inputs are extracted (zip-slip safe) into the
  parent of ``path``, the DataSphere CLI's layout, once the sizes their entries declare are known
  to fit in the free space there, and never beyond those sizes (an emptyDir's sizeLimit is only
  enforced by eviction, later: a zip bomb would first fill the node's disk). A stored input whose
  bytes do not hash to its key (read twice to be sure) is deleted, so that the next job with that
  file uploads it again.
  The empty file is never stored (`is_stored_input`): it is created here;
- local modules are extracted into ``<shared>/python/modules/<i>`` (put on PYTHONPATH);
- the requirements file and ``<shared>/entry.sh`` are written.

Its messages go to the system log and are shipped as log records right away, so a failed
stage-in is visible to ReadLogs. On failure it also writes the final log marker, ``result.json``
(status STAGE_IN_FAILED) and the termination message, and exits non-zero: the pod fails and the
operator reads the init container's termination message.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from dsjobs.runner.config import Compression, InputFile, LocalModule, RunnerConfig
from dsjobs.runner.entry import render_entry_script
from dsjobs.runner.memlimit import memory_limit
from dsjobs.runner.result import RunnerResult, RunnerStatus, store_result, termination_message
from dsjobs.runner.ship import LogShipper, human_size, write_termination_message
from dsjobs.runner.syslog import SystemLog, create_shared
from dsjobs.runner.zipsafe import UnsafeZipError, declared_size, entry_count, extract_zip, make_dirs
from dsjobs.storage import (
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    Storage,
    TransferStopped,
    input_key,
    is_stored_input,
    is_transient,
)

log = logging.getLogger(__name__)

#: Parallel downloads: network-bound, and the init container gets little CPU.
DOWNLOAD_WORKERS = 4


class StageInError(Exception):
    """A user-facing reason why the job cannot start."""


class MissingInputError(StageInError):
    """An input (or local module) the store does not hold."""

    def __init__(self, what: str, sha256: str) -> None:
        super().__init__(f"{what}: not in storage (sha256 {sha256}); was it uploaded?")
        self.what = what


class NoSpaceError(StageInError):
    """The job's disk filled up while this input was staged, or (an archive) lacks the room for what
    it unpacks to. ``str()`` names the input; ``detail``, when set, says why it does not fit."""

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(what)
        self.detail = detail


def free_bytes(path: Path) -> int:
    """The bytes an unprivileged writer may still put on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


#: What reading and extracting an archive holds per entry (its central directory's records, the
#: checked paths), measured ~1.1 KiB, and what the stage-in process holds besides.
ZIP_ENTRY_BYTES = 1536
STAGE_IN_BASE_BYTES = 96 << 20
#: Archives with more entries than this are extracted one at a time (their memory would add up
#: across the parallel downloads) and checked against the container's memory limit first.
MANY_ENTRIES = 10_000
_MANY_ENTRIES_LOCK = threading.Lock()


def entries_problem(entries: int, limit: int | None) -> str | None:
    """Why an archive of `entries` cannot be unpacked within the memory `limit` (None: no limit
    known), or None when it can."""
    need = STAGE_IN_BASE_BYTES + entries * ZIP_ENTRY_BYTES
    if limit is None or entries <= MANY_ENTRIES or need <= limit:
        return None
    most = max((limit - STAGE_IN_BASE_BYTES) // ZIP_ENTRY_BYTES, 0)
    return (
        f"{entries} files in its archive: unpacking them takes about {human_size(need)} of the runner's "
        f"memory, over its limit of {human_size(limit)} (about {most} files fit; the admin's "
        "DSJOBS_RUNNER_MEMORY_LIMIT): zip fewer, larger files (a tar of the many small ones) or ask "
        "for a higher limit"
    )


def _extract_archive(archive: Path, dest_root: Path, what: str) -> int:
    """Extract a downloaded ZIP input into ``dest_root``; returns the files written.

    Refused before anything is written when its entries declare more than the free space, or are
    more than the container's memory can unpack (it was OOM-killed, naming nothing); capped at
    what they declare: an archive whose data holds more stops there."""
    make_dirs(dest_root)
    entries = entry_count(archive) or 0
    problem = entries_problem(entries, memory_limit())
    if problem is not None:
        raise StageInError(f"{what}: {problem}")
    if entries <= MANY_ENTRIES:
        return _extract_checked(archive, dest_root, what)
    with _MANY_ENTRIES_LOCK:
        return _extract_checked(archive, dest_root, what)


def _extract_checked(archive: Path, dest_root: Path, what: str) -> int:
    declared = declared_size(archive)
    free = free_bytes(dest_root)
    if declared > free:
        raise NoSpaceError(what, f"{what} unpacks to {human_size(declared)}, {human_size(free)} free")
    return extract_zip(archive, dest_root, max_total_bytes=declared)


def _describe(kind: str, f: InputFile | LocalModule) -> str:
    return f"{kind} {f.path or f.var or f.sha256[:12]}"


def _stage_file(
    config: RunnerConfig,
    store: Storage,
    f: InputFile | LocalModule,
    dest_root: Path,
    target_name: str,
    kind: str,
    stop: threading.Event | None = None,
) -> int:
    key = input_key(config.project_id, f.sha256)
    what = _describe(kind, f)
    if not is_stored_input(f.sha256, f.size_bytes):
        # The empty file: nothing to fetch (an empty ZIP, which Create refuses, unpacks to nothing).
        make_dirs(dest_root)
        if f.compression == Compression.ZIP:
            return 0
        dest = dest_root / target_name
        with open(dest, "wb"):
            pass
        os.chmod(dest, 0o666)
        return 1

    def fetch() -> int:
        if f.compression == Compression.ZIP:
            tmp = config.layout.tmp_dir / f"stage-{f.sha256}-{os.getpid()}-{id(f)}.zip"
            try:
                store.download_file(key, tmp, expected_size=f.size_bytes, expected_sha256=f.sha256, stop=stop)
                return _extract_archive(tmp, dest_root, what)
            finally:
                if tmp.exists():
                    tmp.unlink()
        dest = dest_root / target_name
        make_dirs(dest.parent)
        store.download_file(key, dest, expected_size=f.size_bytes, expected_sha256=f.sha256, stop=stop)
        os.chmod(dest, 0o666)
        return 1

    try:
        try:
            return fetch()
        except IntegrityError as exc:
            verdict = _discard_mismatched(config, store, key, f)
            if verdict == "deleted":
                raise StageInError(
                    f"{what}: stored content is corrupt: {exc}; removed it from storage, "
                    "so the next job created with this file uploads it again"
                ) from exc
            if verdict == "unknown":
                raise StageInError(f"{what}: stored content is corrupt: {exc}") from exc
            # Intact on a second read: only the first read was damaged on the way.
            log.warning("input read again after a damaged read key=%s", key)
            return fetch()
    except ObjectNotFoundError as exc:
        raise MissingInputError(what, f.sha256) from exc
    except IntegrityError as exc:
        raise StageInError(f"{what}: stored content is corrupt: {exc} (read twice, damaged twice)") from exc
    except UnsafeZipError as exc:
        raise StageInError(f"{what}: archive refused: {exc}") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpaceError(what) from exc
        raise


def _discard_mismatched(
    config: RunnerConfig, store: Storage, key: str, f: InputFile | LocalModule
) -> Literal["deleted", "intact", "unknown"]:
    """After a failed integrity check: delete the stored input if its bytes really do not hash to
    its key ("deleted"); "intact" when a second read finds them right (the first was damaged on
    the way: reading it again stages it), "unknown" otherwise.

    A client may upload other bytes than it hashed (a file edited in place, same size, between
    hashing and upload). Create trusts the cache by key and size, so it would never ask for that
    file again and every job using it would fail until the data expires. One more read tells a
    bad object from bytes damaged on the way (then it stays); it is deleted only if it is still
    the object we read (same ETag).
    """
    tmp = config.layout.tmp_dir / f"verify-{f.sha256}-{os.getpid()}-{id(f)}"
    try:
        before = store.head(key)
        if before is None:
            return "unknown"
        if before.size == f.size_bytes:
            stored_sha256 = store.download_file(key, tmp, expected_size=f.size_bytes).sha256
            if stored_sha256 == f.sha256:
                log.warning("stored input is intact on a second read key=%s", key)
                return "intact"
        else:
            # Wrong by its size alone: not read again (it may be any size, on the job's disk).
            stored_sha256 = f"(not read: {before.size} bytes)"
        after = store.head(key)
        if after is None or after.etag != before.etag:
            return "unknown"  # replaced meanwhile: not the object we found wrong
        store.delete(key)
        log.warning(
            "deleted stored input whose content does not match its key key=%s sha256=%s", key, stored_sha256
        )
        return "deleted"
    except Exception as exc:
        log.warning("cannot check the stored input key=%s error=%s", key, exc)
        return "unknown"
    finally:
        tmp.unlink(missing_ok=True)


def stage_inputs(config: RunnerConfig, store: Storage, syslog: SystemLog) -> None:
    work = config.work_dir
    layout = config.layout
    jobs: list[tuple[InputFile | LocalModule, Path, str, str]] = []
    for inp in config.inputs:
        rel = Path(inp.path)
        if inp.compression == Compression.ZIP:
            jobs.append((inp, work / rel.parent, "", "input"))
        else:
            jobs.append((inp, work / rel.parent, rel.name, "input"))
    for i, mod in enumerate(config.local_modules):
        name = os.path.basename(mod.path.replace("\\", "/")) or f"module_{i}.py"
        jobs.append((mod, layout.module_dir(i), name, "local module"))

    started = time.monotonic()
    total = sum(f.size_bytes for f, *_ in jobs)
    # The first failure stops the rest: queued files are not fetched, and those on their way stop
    # at their next chunk (a missing input no longer waited for a big one before it to arrive).
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        futures = [
            pool.submit(_stage_file, config, store, f, root, name, kind, stop) for f, root, name, kind in jobs
        ]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(not fut.cancelled() and fut.done() and fut.exception() is not None for fut in futures):
            stop.set()
            for fut in futures:
                fut.cancel()
        wait(futures)
        # Of the failures, the first declared (not a transfer stopped for it) is told.
        first_error = next(
            (
                exc
                for fut in futures
                if not fut.cancelled()
                and (exc := fut.exception()) is not None
                and not isinstance(exc, TransferStopped)
            ),
            None,
        )
        if isinstance(first_error, NoSpaceError):
            where = first_error.detail or f"full while staging {first_error}"
            raise StageInError(
                f"no space left on the job's disk for its inputs ({human_size(total)} in all; {where}): "
                "declare working-storage, or a larger one, for more room"
            ) from first_error
        if isinstance(first_error, MissingInputError):
            raise _all_missing(config, store, jobs, first_error) from first_error
        if first_error is not None:
            raise first_error
    for inp in config.inputs:
        # A directory input is there even when the CLI zipped it empty (an archive without
        # entries): the job's `${VAR}` names it.
        if inp.compression == Compression.ZIP and not os.path.lexists(work / inp.path):
            make_dirs(work / inp.path)
    if jobs:
        syslog(
            f"staged {len(config.inputs)} inputs and {len(config.local_modules)} local modules "
            f"({human_size(total)}) in {time.monotonic() - started:.1f}s"
        )


def make_alive_fifo(path: Path) -> None:
    """The entry script's liveness FIFO (`SharedLayout.alive`), 0666 for any job uid; without it
    (a file system without FIFOs) ship judges by the heartbeat alone."""
    try:
        os.mkfifo(path, 0o666)
        os.chmod(path, 0o666)  # past the umask
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("cannot make the liveness FIFO path=%s error=%s", path, exc)


#: Missing inputs a stage-in failure names one by one; the rest are counted.
MAX_MISSING_NAMED = 10


def _all_missing(
    config: RunnerConfig,
    store: Storage,
    jobs: list[tuple[InputFile | LocalModule, Path, str, str]],
    first: MissingInputError,
) -> StageInError:
    """Every input the store lacks, told at once (a kubectl-applied job's inputs are checked by
    nobody before): asked of the store only once one was found missing."""
    missing = [first.what]
    asked: set[str] = set()
    for f, _, _, kind in jobs:
        what = _describe(kind, f)
        if what == first.what or f.sha256 in asked or not is_stored_input(f.sha256, f.size_bytes):
            continue
        asked.add(f.sha256)
        try:
            if store.head(input_key(config.project_id, f.sha256)) is None:
                missing.append(what)
        except Exception as exc:  # the first one is still worth telling
            log.warning("cannot check a stored input key=%s error=%s", f.sha256, exc)
    if len(missing) == 1:
        return first
    named = ", ".join(missing[:MAX_MISSING_NAMED])
    more = f" and {len(missing) - MAX_MISSING_NAMED} more" if len(missing) > MAX_MISSING_NAMED else ""
    return StageInError(f"{len(missing)} inputs are not in storage: {named}{more}; were they uploaded?")


def prepare(config: RunnerConfig) -> None:
    """Directories, shared log files, requirements file and entry script (no storage access).
    A disk with no room for these few files was full before the job wrote anything: said so."""
    try:
        _prepare(config)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise StageInError(
            f"no space left on the node's disk for the job's working files{where}: it was full "
            "before the job wrote anything (an admin: free the node's disk)"
        ) from exc


def _prepare(config: RunnerConfig) -> None:
    layout = config.layout
    layout.create()
    for f in layout.shared_files:
        create_shared(f)
    make_alive_fifo(layout.alive)
    for d in config.work_dirs():
        make_dirs(d)
    if config.python_env is not None and config.python_env.requirements:
        layout.requirements.write_text("\n".join(config.python_env.requirements) + "\n")
    script = render_entry_script(config)
    tmp = layout.entry_script.with_suffix(".tmp")
    tmp.write_text(script)
    os.chmod(tmp, 0o755)
    os.replace(tmp, layout.entry_script)


def run_stage_in(config: RunnerConfig, store: Storage, *, termination_log: str | None = None) -> bool:
    """Stage everything. Returns False (after reporting) when the job cannot start."""
    layout = config.layout
    layout.create()
    syslog = SystemLog(layout.system_log, "stage-in")
    shipper = LogShipper(store, config)
    try:
        if not (config.inputs or config.local_modules):
            # Nothing to fetch and nothing said: no storage request at all (the ship sidecar
            # ships the logs from the start); a failure below still reports through storage.
            prepare(config)
            return True
        shipper.resume()
        prepare(config)
        stage_inputs(config, store, syslog)
        shipper.pump(final=True, deadline=time.monotonic() + 60)
        return True
    except Exception as exc:
        # The store's own trouble after the retries' patience: not the inputs' fault.
        storage_unavailable = not isinstance(exc, StageInError) and is_transient(exc)
        if isinstance(exc, StageInError):
            reason = str(exc)
        elif storage_unavailable:
            reason = (
                "the object store kept failing while the inputs were staged (past the runner's "
                f"retries): {type(exc).__name__}: {exc}"
            )
        else:
            reason = f"stage-in failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, StageInError) or storage_unavailable:
            # An input missing, corrupt or refused, or the store away: told, not a bug to trace.
            log.error("%s", reason)
        else:
            log.exception("stage-in failed")
        syslog(reason)
        deadline = time.monotonic() + 60
        try:
            # ship, not pump: it retries the resume that failed above and writes nothing before
            # it succeeds (chunk 0 of a retried attempt would meet the earlier attempt's).
            complete = shipper.ship(final=True, deadline=deadline) and shipper.finalize(
                reason, deadline=deadline
            )
        except PreconditionFailedError as race:
            # Another writer's chunk where ours goes: the result below must still be written.
            log.warning("cannot ship the stage-in's log error=%s", race)
            complete = False
        result = RunnerResult(
            project_id=config.project_id,
            job_id=config.job_id,
            attempt=config.attempt,
            status=RunnerStatus.STAGE_IN_FAILED,
            reason=reason[:2000],
            storage_unavailable=storage_unavailable or None,
            log_end_offset=shipper.end_offset,
            logs_complete=complete,
            finished_at=datetime.now(UTC),
        )
        try:
            store_result(store, result)
        except Exception as store_exc:
            log.warning("cannot store result.json error=%s", store_exc)
        write_termination_message(termination_message(result), termination_log)
        return False
