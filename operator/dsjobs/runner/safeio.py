"""Opening files the job could have tampered with, without following its symlinks.

The shared volume (logs, progress) and the working directory are writable by the job while the
ship container reads them, and the ship container also mounts the runner's config Secret (the
storage credentials). A job that replaced `logs/stderr.log` by a symlink to that Secret's file
would have the ship container upload the credentials as its log. So every path below such a root
is opened one component at a time with O_NOFOLLOW (a path-based check then open would race with
the job), and only a regular file is read (O_NONBLOCK: a FIFO would otherwise block the open).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from collections.abc import Sequence


class RefusedFile(OSError):
    """The path is a symlink, a special file or leaves its root: not read."""


# Linux's flags (the runner's containers are Linux); 0 elsewhere, so that modules importing this one
# (the ZIP extractor, which `dsjobs download-files` uses on a laptop) import on macOS and Windows.
_O_DIRECTORY, _O_NOFOLLOW, _O_CLOEXEC, _O_NONBLOCK, _O_PATH = (
    getattr(os, name, 0) for name in ("O_DIRECTORY", "O_NOFOLLOW", "O_CLOEXEC", "O_NONBLOCK", "O_PATH")
)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
# Directories only passed through: search permission is all they need (a 0711 parent).
_PASS_FLAGS = _O_PATH | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
#: A regular file's open: no symlink followed, no FIFO waited on.
FILE_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC


def open_beneath(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> int:
    """A read-only fd of the regular file `path` below `root` (absolute, or relative to `root`);
    no symlink below `root` is followed.

    FileNotFoundError when something on the way is missing; RefusedFile when a component is a
    symlink, the file is not a regular file, or `path` is not plainly below `root`.
    """
    parts = _plain_parts(root, path)
    fd = _step(_through(_pass_root(root), parts[:-1]), parts[-1], FILE_FLAGS)
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


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# x86_64, arm64 and the other architectures of the generic table (alpha, ia64 and mips number it
# otherwise: there the call fails with ENOSYS and no link is followed).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def open_file_resolved_beneath(root_fd: int, path: str) -> int:
    """A read-only fd of the regular file `path` (relative) names below the open directory
    `root_fd`, following the symlinks on its way, its last component's too, as long as each
    resolves below `root_fd` (the kernel's RESOLVE_BENEATH: no absolute link, no `..` above it, no
    /proc magic link), so the file is one the job could have written anyway.

    FileNotFoundError for a dangling path; RefusedFile when it leaves `root_fd`, is not a regular
    file, or the kernel cannot resolve it that way (openat2 missing or forbidden by seccomp).
    """
    if _libc is None:
        raise RefusedFile(errno.ENOSYS, "symlinks are followed on Linux only")
    how = _OpenHow(flags=os.O_PATH | os.O_CLOEXEC, mode=0, resolve=_RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    for _ in range(8):
        fd = int(
            _libc.syscall(
                ctypes.c_long(_SYS_OPENAT2),
                ctypes.c_int(root_fd),
                ctypes.c_char_p(os.fsencode(path)),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
        )
        if fd >= 0:
            break
        err = ctypes.get_errno()
        if err == errno.EAGAIN:  # a rename raced the lookup: the kernel asks to try again
            continue
        if err in (errno.ENOENT, errno.ENOTDIR):  # ENOTDIR: a link through a file (`f/sub`)
            raise FileNotFoundError(err, f"{path}: dangling symlink or missing file")
        if err == errno.EXDEV:
            raise RefusedFile(err, f"{path} resolves outside the directory it is looked up in")
        if err == errno.ELOOP:
            raise RefusedFile(err, f"{path}: a symlink loop, or a /proc magic link")
        if err in (errno.ENOSYS, errno.EPERM):
            raise RefusedFile(err, "this kernel cannot follow a symlink safely (no openat2)")
        raise OSError(err, os.strerror(err), path)
    else:
        raise RefusedFile(errno.EAGAIN, f"{path} kept being renamed while it was resolved")
    try:
        # O_PATH opens nothing (a device or FIFO is not touched); the regular file it found is
        # then opened through that very fd, not by its path again.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RefusedFile(errno.EINVAL, f"{path} is not a regular file")
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


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
