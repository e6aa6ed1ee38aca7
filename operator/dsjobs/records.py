"""`Record`: frozen dataclasses that validate and coerce their fields on construction.

For the runner's contract (its config, its result) and the storage settings: every job pod starts
the runner, and importing pydantic and building its models cost each of those processes about
0.09 s of CPU, half of the ship sidecar's start-up. The ProjectJob models stay pydantic (the
CRD schema is generated from them); these records are the runner's own and need no schema.

What a field accepts follows its annotation: ``str``, ``int`` (not ``bool``), ``float`` (an
``int`` too), ``bool``, ``None`` in a union, ``list[...]``, ``dict[str, ...]``, ``Literal[...]``,
a ``StrEnum`` (or its value), ``datetime`` (or an ISO 8601 string) and a nested record (or a
dict of its fields). Bounds and checks come from the field's metadata (`rule`); cross-field
rules from `Record._validate`. A violation raises `RecordError` (a ValueError) naming the field
path, e.g. ``inputs[0].sha256: invalid sha256 'x'``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, ClassVar, Literal, Self

_CHECK = "dsjobs.check"
_BOUNDS = ("ge", "gt", "le", "min_length")


class RecordError(ValueError):
    """A record field's value breaks its rule; ``path`` names the field (``a.b[0].c``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message

    def within(self, prefix: str) -> RecordError:
        sep = "" if not self.path or self.path.startswith("[") else "."
        return RecordError(f"{prefix}{sep}{self.path}", self.message)


def rule(
    *,
    check: Callable[[Any], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    min_length: int | None = None,
) -> dict[str, Any]:
    """Field metadata: ``field(metadata=rule(ge=0))``. ``check`` gets the coerced value and returns
    the value to keep (it may normalize it) or raises ValueError with the rule broken."""
    pairs = (("ge", ge), ("gt", gt), ("le", le), ("min_length", min_length))
    meta: dict[str, Any] = {k: v for k, v in pairs if v is not None}
    if check is not None:
        meta[_CHECK] = check
    return meta


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    found = _HINTS.get(cls)
    if found is None:
        found = _HINTS[cls] = typing.get_type_hints(cls)
    return found


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def parse_datetime(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise RecordError("", f"expected an ISO 8601 date-time, got {value!r}") from None


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as an instance of the annotation `tp`, or RecordError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise RecordError("", "must not be null")
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0])
        errors: list[str] = []
        for arg in options:
            try:
                return _coerce(value, arg)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError("", "; ".join(errors))
    if value is None:
        raise RecordError("", f"expected {_type_name(tp)}, got null")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise RecordError("", f"expected one of {list(allowed)!r}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise RecordError("", f"expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item))
            except RecordError as exc:
                raise exc.within(f"[{i}]") from None
        return out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecordError("", f"expected an object, got {type(value).__name__}")
        key_tp, value_tp = typing.get_args(tp)
        result = {}
        for k, v in value.items():
            try:
                result[_coerce(k, key_tp)] = _coerce(v, value_tp)
            except RecordError as exc:
                raise exc.within(f"[{k!r}]") from None
        return result
    if isinstance(tp, type):
        if issubclass(tp, Record):
            if isinstance(value, tp):
                return value
            if isinstance(value, Mapping):
                return tp.from_dict(value)
            raise RecordError("", f"expected an object, got {type(value).__name__}")
        if issubclass(tp, Enum):
            try:
                return tp(value)
            except ValueError:
                raise RecordError("", f"expected one of {[m.value for m in tp]}, got {value!r}") from None
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        elif tp is datetime:
            if isinstance(value, datetime):
                return value
            if isinstance(value, str):
                return parse_datetime(value)
        elif isinstance(value, tp):
            return value
        raise RecordError("", f"expected {_type_name(tp)}, got {type(value).__name__}")
    raise TypeError(f"records do not support the annotation {tp!r}")


def _bounds(value: Any, meta: Mapping[str, Any]) -> None:
    if "min_length" in meta and len(value) < meta["min_length"]:
        raise RecordError("", f"must have at least {meta['min_length']} character(s)")
    if "ge" in meta and value < meta["ge"]:
        raise RecordError("", f"must be >= {meta['ge']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise RecordError("", f"must be > {meta['gt']}, got {value!r}")
    if "le" in meta and value > meta["le"]:
        raise RecordError("", f"must be <= {meta['le']}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of the records. Subclasses are ``@dataclass(frozen=True, kw_only=True)``."""

    #: Unknown keys in `from_dict`: an error (a config we must understand fully) or ignored (a
    #: result a newer runner may have extended).
    extra_forbidden: ClassVar[bool] = True

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            try:
                new = _coerce(value, hints[f.name])
                if new is not None:
                    if any(k in f.metadata for k in _BOUNDS):
                        _bounds(new, f.metadata)
                    check = f.metadata.get(_CHECK)
                    if check is not None:
                        new = check(new)
            except RecordError as exc:
                raise exc.within(f.name) from None
            except ValueError as exc:
                raise RecordError(f.name, str(exc)) from None
            if new is not value:
                object.__setattr__(self, f.name, new)
        try:
            self._validate()
        except RecordError:
            raise
        except ValueError as exc:
            raise RecordError("", str(exc)) from None

    def _validate(self) -> None:
        """Rules across fields; raise ValueError. Runs after every field was coerced."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise RecordError("", f"expected an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown and cls.extra_forbidden:
            raise RecordError(unknown[0], f"unknown field (known: {', '.join(sorted(names))})")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise RecordError(missing[0], "field required")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RecordError("", f"invalid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self, *, exclude_defaults: bool = False, exclude_none: bool = False) -> dict[str, Any]:
        """JSON-ready: enums as values, date-times as ISO 8601 (UTC as ``Z``), records as dicts."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if exclude_none and value is None:
                continue
            if exclude_defaults and _is_default(f, value):
                continue
            out[f.name] = _plain(value, exclude_defaults, exclude_none)
        return out

    def to_json(self, *, exclude_defaults: bool = False, exclude_none: bool = False) -> str:
        return json.dumps(
            self.to_dict(exclude_defaults=exclude_defaults, exclude_none=exclude_none),
            separators=(",", ":"),
            ensure_ascii=False,
        )

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated like a new record."""
        return dataclasses.replace(self, **changes)


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def _plain(value: Any, exclude_defaults: bool, exclude_none: bool) -> Any:
    if isinstance(value, Record):
        return value.to_dict(exclude_defaults=exclude_defaults, exclude_none=exclude_none)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, list | tuple):
        return [_plain(v, exclude_defaults, exclude_none) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, exclude_defaults, exclude_none) for k, v in value.items()}
    return value


def format_datetime(value: datetime) -> str:
    """ISO 8601 as pydantic wrote it before: a zero UTC offset is ``Z``."""
    text = value.isoformat()
    if value.utcoffset() == timedelta(0) and text.endswith("+00:00"):
        return text[: -len("+00:00")] + "Z"
    return text


__all__ = ["Record", "RecordError", "format_datetime", "parse_datetime", "rule"]
