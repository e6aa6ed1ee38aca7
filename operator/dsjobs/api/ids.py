"""Job ids.

A job id is the ProjectJob's name: 20 characters of lowercase base32 (a DNS label, a valid label
value and S3 key segment). Ids made for plain Create/Clone calls start with the creation time
counted *down* (9 characters, millisecond resolution), so the cluster's name order, which is the
order List pages through, is newest first; 11 random characters follow.

Calls with an `Idempotency-Key` get an id derived from (project, caller, RPC, key), so a retry
lands on the same name and the cluster itself refuses a second job (AlreadyExists) - no lock, no
state in the API. Those ids start with `z` (sorted after the time-ordered ones).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

from dsjobs.models.limits import RESOURCE_ID_PATTERN

_ALPHABET = "0123456789abcdefghijklmnopqrstuv"  # base32hex, lowercase: sorts like its numbers
_TIME_DIGITS = 9
_TIME_SPAN = 32**_TIME_DIGITS  # ~1100 years of milliseconds
JOB_ID_LENGTH = 20
_RESOURCE_ID = re.compile(RESOURCE_ID_PATTERN)  # a DNS label: any ProjectJob or project name
MAX_IDEMPOTENCY_KEY_LENGTH = 256


def _base32(value: int, digits: int) -> str:
    out = []
    for _ in range(digits):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_job_id(now_ms: int | None = None) -> str:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    countdown = (_TIME_SPAN - 1 - now) % _TIME_SPAN
    return _base32(countdown, _TIME_DIGITS) + "".join(secrets.choice(_ALPHABET) for _ in range(11))


def idempotent_job_id(project_id: str, caller: str, method: str, key: str) -> str:
    digest = hashlib.sha256("\0".join((project_id, caller, method, key)).encode()).digest()
    return "z" + _base32(int.from_bytes(digest[:15], "big"), JOB_ID_LENGTH - 1)


def is_resource_id(value: str) -> bool:
    """Whether `value` can be a project id or name a ProjectJob (ids of hand-applied jobs are any
    DNS label)."""
    return bool(_RESOURCE_ID.fullmatch(value))


is_job_id = is_resource_id

#: The rule is_resource_id checks, as an error message says it.
RESOURCE_ID_RULE = (
    "lowercase letters, digits and '-', 1 to 63 characters, beginning and ending with a letter or digit"
)
