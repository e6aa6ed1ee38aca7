"""The operator's logger, and log lines about one job."""

from __future__ import annotations

import logging

log = logging.getLogger("dsjobs.controller")


def jlog(level: int, key: tuple[str, str], message: str, *args: object, **fields: object) -> None:
    """A log line about one job: `namespace/name: message` plus the two, and `fields`, as
    structured fields."""
    extra = {"namespace": key[0], "job": key[1], **fields}
    log.log(level, "%s/%s: " + message, key[0], key[1], *args, extra=extra)
