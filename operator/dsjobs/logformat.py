"""The log line formats of the dsjobs processes (the API server and the operator alike): one JSON
object per line, `ts`, `level`, `logger`, `msg`, then the record's structured fields (`extra=`),
or, for local development, readable text with those fields appended."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

# Not fields of a line: the record's own attributes, and what Kopf's object loggers add for their
# own use (all its settings, ~2 KB; a flag for its Event poster). Their object reference, `k8s_ref`,
# is one: the object a line of Kopf's is about.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "k8s_skip", "settings"}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.converter = time.gmtime  # the `Z` in `ts`

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local development, with the structured fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        return f"{line} {fields}" if fields else line


class LogThrottle:
    """At most one line per key every `interval` seconds: a failure every call shares (an outage
    of the cluster or the object store at hundreds of calls a second) is told, not repeated.
    `admit` says whether to log now, and how many like it were held back since the last."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """None: hold this one back; else the number held back since the last line of `key`."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0
