"""The operator's logger, and log lines about one job."""

from __future__ import annotations

import logging

log = logging.getLogger("dsjobs.controller")


def jlog(level: int, key: tuple[str, str], message: str, *args: object) -> None:
    """A log line about one job: `namespace/name: message` plus the two as structured fields."""
    log.log(level, "%s/%s: " + message, key[0], key[1], *args, extra={"namespace": key[0], "job": key[1]})
