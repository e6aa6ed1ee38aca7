"""Quiet key=value logging: `ts=... level=INFO node=gpu-0 msg="pod finished" pod=ns/name phase=Succeeded`."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _value(v: Any) -> str:
    text = str(v)
    if not text or any(ch in text for ch in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [
            f"ts={ts}",
            f"level={record.levelname}",
            f"node={_value(self.node)}",
            f"msg={_value(record.getMessage())}",
        ]
        kv = getattr(record, "kv", None)
        if isinstance(kv, dict):
            # node= is written once, first (callers name the node in their fields too).
            parts.extend(f"{k}={_value(v)}" for k, v in kv.items() if (k, v) != ("node", self.node))
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str, node: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(node))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access/server chatter is not ours to print at INFO.
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
