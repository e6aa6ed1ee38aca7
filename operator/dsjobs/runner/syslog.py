"""Appends the runner's own messages to the job's system log file (shipped as `.system.log`)."""

from __future__ import annotations

import errno
import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

#: Mode of the log files that several uids append to: stage-in and ship run as the runner
#: image's uid, the entry script as whatever uid the job image has.
SHARED_FILE_MODE = 0o666


def open_shared(path: Path) -> int:
    """An O_APPEND descriptor of ``path``; a file this call creates is made 0666.

    O_CREAT's mode is cut by the umask (0644 with the usual 022), which would lock out the other
    uids, so a created file gets fchmod. O_EXCL tells whether this call created it: a file
    someone else made is never chmod'ed (it is not ours to change, and fchmod would fail).
    """
    # O_NOFOLLOW: the job can replace the file by a symlink; the runner's containers must not
    # append to whatever it points to in theirs. O_NONBLOCK: nor by a FIFO, whose open would wait
    # for a reader for good (ENXIO instead); only a regular file is written to.
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        return _regular(os.open(path, flags), path)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, SHARED_FILE_MODE)
    except FileExistsError:
        return _regular(os.open(path, flags), path)  # another writer created it meanwhile
    try:
        os.fchmod(fd, SHARED_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def _regular(fd: int, path: Path) -> int:
    """`fd`, in blocking mode again, when it is a regular file's; else closed and OSError."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def create_shared(path: Path) -> None:
    """Create ``path`` (when missing) so that any uid can append to it."""
    os.close(open_shared(path))


class SystemLog:
    """One line per message, ``<UTC time> <component>: <message>``, appended with O_APPEND.

    Several writers (stage-in, the entry script, ship) append to the same file; single small
    appends do not interleave.
    """

    def __init__(self, path: Path, component: str) -> None:
        self.path = path
        self.component = component
        self._log = logging.getLogger(f"dsjobs.runner.{component}")
        self._failing = False

    def __call__(self, message: str) -> None:
        self._log.info("%s", message)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"{stamp} {self.component}: {message}".replace("\n", " ") + "\n"
        try:
            fd = open_shared(self.path)
            try:
                # A message may carry a file name that is not UTF-8 (surrogate escapes): the line
                # is still written, the name escaped.
                os.write(fd, line.encode(errors="backslashreplace"))
            finally:
                os.close(fd)
        except OSError as exc:
            # Once until it works again: a program that made the file a symlink or filled the disk
            # would have each of this writer's messages warn again (the message itself is logged).
            if not self._failing:
                self._log.warning("cannot write system log path=%s error=%s", self.path, exc)
            self._failing = True
        else:
            self._failing = False
