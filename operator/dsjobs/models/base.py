"""Shared pieces of the models: the base class, durations, quantities, the field helper."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

from dsjobs.models.limits import DURATION_PARTS, DURATION_PATTERN, INFINITE_TTL
from dsjobs.quantity import QUANTITY_PATTERN


class CRModel(BaseModel):
    """Base of every model stored in a custom resource.

    Python attributes are snake_case, the CR carries Kubernetes camelCase (the alias); both are
    accepted on input. Unknown keys are rejected: the CRD is generated from these models, so an
    unknown key in what a user or the API writes is a bug (or a typo in a hand-written CR).
    Values are only type-checked here; `dsjobs.validation` checks the rules and reports all
    problems with their field paths.

    What is read back from the cluster is read with `read_stored`, which skips unknown keys: there
    they are fields of a newer dsjobs (a CRD applied before its operator, a rollback, a newer
    replica during a rollout), and refusing them made a finished job's status unreadable.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
    )

    def to_cr(self) -> dict[str, Any]:
        """The JSON-ready dict that goes into the custom resource."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


M = TypeVar("M", bound=CRModel)


def read_stored(model: type[M], data: Any) -> M:
    """`model` read from what the cluster stores, skipping keys this version does not know (at
    every depth); the values of known keys are checked as ever.

    Unknown keys are rare (versions meeting), so they are taken out of a copy only once the
    strict read named them: a validator doing it on every read cost every model a Python call."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        unknown = [e["loc"] for e in exc.errors(include_url=False) if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
    data = copy.deepcopy(data)
    drop_paths(data, unknown)
    return model.model_validate(data)


def drop_paths(data: Any, paths: Iterable[tuple[str | int, ...]]) -> None:
    """Delete each of `paths` (keys and list indices, as pydantic's error locations) from `data`,
    in place: the deepest and last first, so that the indices of entries still to go do not move.
    A path inside a part already deleted is skipped."""
    for path in sorted(set(paths), key=lambda p: [(isinstance(k, int), k) for k in p], reverse=True):
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue


def known_of(stored: Any, read: Any) -> Any:
    """`stored` (an object as the cluster holds it) without what is not in `read` (what a model
    read of it and gave back with `to_cr`): keys of a newer version, at every depth, and values
    the reader could not read. A merge patch computed from it and a new `to_cr` leaves those as
    they are. A list is compared entry by entry; one the reader left entries out of is taken as
    read (a patch leaves it alone unless it changes it, and then writes it whole, as a merge patch
    writes every list)."""
    if isinstance(stored, Mapping) and isinstance(read, Mapping):
        return {k: known_of(v, read[k]) for k, v in stored.items() if k in read}
    if isinstance(stored, list) and isinstance(read, list):
        if len(stored) != len(read):
            return read
        return [known_of(s, r) for s, r in zip(stored, read, strict=True)]
    return stored


def field(description: str, default: Any = ..., **schema: Any) -> Any:
    """A model field with its CRD description and extra (CRD-only) schema keywords.

    The keywords (maxLength, pattern, maxItems, x-kubernetes-validations, ...) go into the
    generated schema only; pydantic does not enforce them, the validator does.
    """
    if isinstance(default, list | dict):
        factory = type(default)
        return Field(default_factory=factory, description=description, json_schema_extra=schema or None)
    return Field(default, description=description, json_schema_extra=schema or None)


# --- durations --------------------------------------------------------------------------------

_UNITS: dict[str, timedelta] = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
    "us": timedelta(microseconds=1),
}
# Reading still takes a sign: an object stored before the CRD refused one must parse, so that
# the operator can tell what is wrong with it instead of failing on the whole object.
_DURATION_RE = re.compile(rf"^(infinity|-?{DURATION_PARTS})$")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|us|d|h|m|s)")


def parse_duration(value: object) -> timedelta:
    """Parse `14d`, `1h30m`, `1.5s`, `infinity` (or seconds as a number) into a timedelta.

    `infinity` is `timedelta.max` (see limits.INFINITE_TTL). A duration too long for a timedelta
    ('99999999999d', which the CRD's pattern lets through) is the longest finite one (the shortest negative one): a value the
    range checks then refuse, naming the field, where an error here would make the whole spec
    unreadable (a started job's TTL typo would end it; see docs/operator.md).
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration must be a string like '14d' or a number of seconds")
    try:
        return _parse_duration(value)
    except OverflowError:
        negative = value.startswith("-") if isinstance(value, str) else float(value) < 0  # type: ignore[arg-type]
        return timedelta.min if negative else INFINITE_TTL - timedelta(microseconds=1)


def _parse_duration(value: object) -> timedelta:
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if not isinstance(value, str) or not _DURATION_RE.fullmatch(value):
        raise ValueError("a duration must look like '14d', '1h30m', '90s', '500ms' or 'infinity'")
    if value == "infinity":
        return INFINITE_TTL
    negative = value.startswith("-")
    total = timedelta()
    for number, unit in _DURATION_PART_RE.findall(value):
        # Decimal keeps '1.5s' exact; timedelta rounds to microseconds anyway.
        micros = Decimal(number) * Decimal(_UNITS[unit] // timedelta(microseconds=1))
        total += timedelta(microseconds=int(micros))
    return -total if negative else total


def format_duration(value: timedelta) -> str:
    """The canonical string of a duration: largest units first, `0s` for zero."""
    if value == INFINITE_TTL:
        return "infinity"
    # Integer microseconds: `-timedelta.min` would overflow.
    micros = value // timedelta(microseconds=1)
    sign, micros = ("-", -micros) if micros < 0 else ("", micros)
    parts: list[str] = []
    for unit in ("d", "h", "m", "s", "ms", "us"):
        size = _UNITS[unit] // timedelta(microseconds=1)
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + ("".join(parts) or "0s")


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "maxLength": 64}),
]


# --- Kubernetes quantities --------------------------------------------------------------------


def _quantity_to_str(value: object) -> object:
    # YAML turns `cpu: 4` into an int; Kubernetes accepts both, we keep the string form.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


def optional_pattern(pattern: str) -> str:
    """`^X$` -> `^(X)?$`: the same rule, but the empty string (proto's "unset") also matches."""
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise ValueError(f"pattern must be anchored: {pattern}")
    return f"^({pattern[1:-1]})?$"


def cel(rule: str, message: str, *more: dict[str, str], field_path: str = "") -> dict[str, Any]:
    """Schema keywords for CEL rules (`x-kubernetes-validations`) checked by the API server: one
    rule and its message (and the field it is about, so that the refusal names it), then more
    rules as whole entries (e.g. `kept_once_set`)."""
    first = {"rule": rule, "message": message} | ({"fieldPath": field_path} if field_path else {})
    return {"x-kubernetes-validations": [first, *more]}


def never_reset(name: str) -> dict[str, str]:
    """A rule for an object: its optional boolean field `name`, once true, stays true (neither
    set false nor removed: a rule on the field itself would not see it removed, and a removed
    `execute` would lift every rule that depends on it)."""
    return {
        "rule": f"!has(oldSelf.{name}) || !oldSelf.{name} || (has(self.{name}) && self.{name})",
        "message": f"{name} cannot be reset or removed once true",
        "fieldPath": f".{name}",
    }


def kept_once_set(name: str) -> dict[str, str]:
    """A rule for an object: its optional field `name` keeps its value once it has one (neither
    changed nor removed: a rule on the field itself would not see it removed)."""
    return {
        "rule": f"!has(oldSelf.{name}) || (has(self.{name}) && self.{name} == oldSelf.{name})",
        "message": f"{name} cannot change once set",
        "fieldPath": f".{name}",
    }
