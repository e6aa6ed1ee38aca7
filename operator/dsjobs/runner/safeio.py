"""Opening files the job could have tampered with, without following its symlinks.

The shared volume (logs, progress) and the working directory are writable by the job while the
ship container reads them, and the ship container also mounts the runner's config Secret (the
storage credentials). A job that replaced `logs/stderr.log` by a symlink to that Secret's file
would have the ship container upload the credentials as its log. So every path below such a root
is opened one component at a time with O_NOFOLLOW (a path-based check then open would race with
the job), and only a regular file is read (O_NONBLOCK: a FIFO would otherwise block the open).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence


class RefusedFile(OSError):
    """The path is a symlink, a special file or leaves its root: not read."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Directories only passed through: search permission is all they need (a 0711 parent).
_PASS_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_beneath(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> int:
    """A read-only fd of the regular file `path` below `root` (absolute, or relative to `root`);
    no symlink below `root` is followed.

    FileNotFoundError when something on the way is missing; RefusedFile when a component is a
    symlink, the file is not a regular file, or `path` is not plainly below `root`.
    """
    parts = _plain_parts(root, path)
    fd = _step(_through(_pass_root(root), parts[:-1]), parts[-1], _FILE_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RefusedFile(errno.EINVAL, f"{'/'.join(parts)} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir_beneath(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> int:
    """A read-only fd of the directory `path` below `root` (or of `root` itself), opened as
    `open_beneath` opens a file: no symlink below `root` is followed."""
    parts = _plain_parts(root, path, root_too=True)
    if not parts:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _step(_through(_pass_root(root), parts[:-1]), parts[-1], _DIR_FLAGS)


def open_below(dir_fd: int, parts: Sequence[str]) -> int:
    """A read-only fd of the directory `parts` names below the open directory `dir_fd` (its own
    when `parts` is empty; `dir_fd` stays open), no symlink followed."""
    if not parts:
        return os.open(".", _DIR_FLAGS, dir_fd=dir_fd)
    fd = _through(os.open(".", _PASS_FLAGS, dir_fd=dir_fd), parts[:-1])
    return _step(fd, parts[-1], _DIR_FLAGS)


def _plain_parts(
    root: str | os.PathLike[str], path: str | os.PathLike[str], *, root_too: bool = False
) -> list[str]:
    """The components of `path` below `root` (absolute, or relative to `root`); none for `root`
    itself with `root_too`. RefusedFile for anything but a plain path below it."""
    rel = os.fspath(path)
    if os.path.isabs(rel):
        rel = os.path.relpath(rel, root)
    if root_too and rel == ".":
        return []
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RefusedFile(errno.EINVAL, f"not a plain path below {os.fspath(root)}: {os.fspath(path)!r}")
    return parts


def _pass_root(root: str | os.PathLike[str]) -> int:
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _through(fd: int, parts: Sequence[str]) -> int:
    """From the open directory `fd` through the directories `parts` (search permission is all they
    need): the last one's fd. Each step closes the directory it opened from, whatever happens."""
    for part in parts:
        fd = _step(fd, part, _PASS_FLAGS)
    return fd


def _step(dir_fd: int, name: str, flags: int) -> int:
    """Open `name` in `dir_fd` and close `dir_fd` (it is replaced by the returned fd)."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: the component is a symlink (O_NOFOLLOW); ENOTDIR: a symlink or file where a
        # directory should be.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RefusedFile(exc.errno, f"{name} is a symlink or not a directory") from exc
        raise
    finally:
        os.close(dir_fd)


def read_beneath(
    root: str | os.PathLike[str], path: str | os.PathLike[str], limit: int = 1 << 16
) -> str | None:
    """The text (at most `limit` bytes) of the regular file `path` below `root`, opened as
    `open_beneath` does; None when it is missing, refused (the job put something else there) or
    kept from this uid (the job changed its mode: then it reads as not written yet)."""
    try:
        fd = open_beneath(root, path)
    except (FileNotFoundError, RefusedFile, PermissionError):
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit).decode(errors="replace")
