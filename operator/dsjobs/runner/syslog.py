"""Appends the runner's own messages to the job's system log file (shipped as `.system.log`)."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path


class SystemLog:
    """One line per message, ``<UTC time> <component>: <message>``, appended with O_APPEND.

    Several writers (stage-in, the entry script, ship) append to the same file; single small
    appends do not interleave.
    """

    def __init__(self, path: Path, component: str) -> None:
        self.path = path
        self.component = component
        self._log = logging.getLogger(f"dsjobs.runner.{component}")

    def __call__(self, message: str) -> None:
        self._log.info("%s", message)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"{stamp} {self.component}: {message}".replace("\n", " ") + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            self._log.warning("cannot write system log path=%s error=%s", self.path, exc)
