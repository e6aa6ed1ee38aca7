"""In-memory stand-ins shared by the runner/log unit tests (not a test module)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from dsjobs.runner.config import RunnerConfig
from dsjobs.storage import (
    IntegrityError,
    ObjectInfo,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransferResult,
    TransferStopped,
)


class MemoryStore:
    """Implements dsjobs.storage.ObjectStore in memory, counting requests."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.requests = 0
        self.fail_puts = 0  # the next N puts raise ConnectionError (transient)
        self._lock = threading.Lock()

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> None:
        with self._lock:
            self.requests += 1
            if self.fail_puts > 0:
                self.fail_puts -= 1
                raise ConnectionError("injected failure")
            if if_none_match and key in self.objects and self.objects[key] != data:
                raise PreconditionFailedError(key)
            self.objects[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes | None:
        with self._lock:
            self.requests += 1
            return self.objects.get(key)

    def head(self, key: str) -> ObjectInfo | None:
        with self._lock:
            self.requests += 1
            data = self.objects.get(key)
            return None if data is None else ObjectInfo(key=key, size=len(data), etag="")

    def delete(self, key: str) -> None:
        with self._lock:
            self.requests += 1
            self.objects.pop(key, None)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block with this process umask (a container's usual one is 022)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


class Unseekable(io.RawIOBase):
    """A write-only stream without tell/seek, like the writing end of a pipe."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)


class FileStore(MemoryStore):
    """MemoryStore plus the file transfers of dsjobs.storage.Storage (what stage-in and ship use)."""

    def upload_file(
        self,
        path: str | os.PathLike[str] | io.BufferedReader,
        key: str,
        *,
        content_type: str = "application/octet-stream",
    ) -> TransferResult:
        if not isinstance(path, (str, os.PathLike)):
            return self._stored(key, path.read(), content_type)
        with open(path, "rb") as f:
            return self._stored(key, f.read(), content_type)

    def upload_stream(
        self,
        key: str,
        produce: Callable[[BinaryIO], None],
        *,
        content_type: str = "application/octet-stream",
        size_hint: int = 0,
    ) -> TransferResult:
        """As Storage.upload_stream: the producer writes to a file it cannot seek (a pipe there)."""
        out = Unseekable()
        produce(out)  # type: ignore[arg-type]  # a raw binary stream, as the pipe's
        return self._stored(key, bytes(out.data), content_type)

    def _stored(self, key: str, data: bytes, content_type: str) -> TransferResult:
        self.put_bytes(key, data, content_type=content_type)
        return TransferResult(key, len(data), hashlib.sha256(data).hexdigest())

    def download_file(
        self,
        key: str,
        dest: str | os.PathLike[str],
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        stop: threading.Event | None = None,
    ) -> TransferResult:
        """As Storage.download_file: ObjectNotFoundError, size and sha256 verified before `dest`;
        TransferStopped once `stop` is set."""
        data = self._read(key)
        if stop is not None and stop.is_set():
            raise TransferStopped(f"{key}: stopped")
        if data is None:
            raise ObjectNotFoundError(key)
        digest = hashlib.sha256(data).hexdigest()
        if expected_size is not None and len(data) != expected_size:
            raise IntegrityError(f"{key}: got {len(data)} bytes, expected {expected_size}")
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntegrityError(f"{key}: sha256 {digest} does not match expected {expected_sha256}")
        with open(dest, "wb") as f:
            f.write(data)
        return TransferResult(key, len(data), digest)

    def _read(self, key: str) -> bytes | None:
        """The bytes a download receives (a subclass may damage them on the way)."""
        with self._lock:
            self.requests += 1
            return self.objects.get(key)


def config(tmp: Path, cmd: str = "x", **kw: object) -> RunnerConfig:
    """A runner config with its working and shared dirs under ``tmp``, both made."""
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd=cmd,
        paths={"work_dir": str(tmp / "work"), "shared_dir": str(tmp / "shared")},
        **kw,  # type: ignore[arg-type]
    )
    cfg.layout.create()
    cfg.work_dir.mkdir(exist_ok=True)
    return cfg


def _where(path: Any, dir_fd: int | None = None) -> str:
    """The real path a scandir/open call names (a directory fd, or a name relative to one)."""
    if isinstance(path, int):
        return os.readlink(f"/proc/self/fd/{path}")
    name = os.fspath(path)
    if dir_fd is not None and not os.path.isabs(name):
        return os.path.normpath(os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name))
    return os.path.realpath(name)


def deny(monkeypatch: pytest.MonkeyPatch, *paths: Path, prefix: Path | None = None) -> None:
    """Listing or opening these paths (and, with `prefix`, any path starting with it) fails as
    for a uid without permission: root, running the tests, is not stopped by modes. Calls by a
    directory fd or relative to one count by the path they reach."""
    denied = {os.path.realpath(p) for p in paths}
    start = os.path.realpath(prefix) if prefix is not None else None
    real_scandir, real_open = os.scandir, os.open

    def refused(where: str) -> bool:
        return where in denied or (start is not None and where.startswith(start))

    def scandir(path: Any = ".") -> Any:
        where = _where(path)
        if refused(where):
            raise PermissionError(13, "Permission denied", where)
        return real_scandir(path)

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        where = _where(path, dir_fd)
        if refused(where):
            raise PermissionError(13, "Permission denied", where)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "open", open_)


def alive(pid: int) -> bool:
    """Whether the process runs: not gone, not a zombie (which holds no files any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
