"""dsjobs.records: coercion and checks by annotation, error paths, serialization."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import ClassVar, Literal

import pytest

from dsjobs.records import Record, RecordError, format_datetime, rule
from dsjobs.runner.result import RunnerResult


class Color(StrEnum):
    RED = "RED"
    BLUE = "BLUE"


def _even(v: int) -> int:
    if v % 2:
        raise ValueError(f"{v} is odd")
    return v


@dataclass(frozen=True, kw_only=True)
class Leaf(Record):
    name: str = field(metadata=rule(min_length=1, check=str.strip))
    count: int = field(default=0, metadata=rule(ge=0, check=_even))
    ratio: float = field(default=0.5, metadata=rule(gt=0, le=1))


@dataclass(frozen=True, kw_only=True)
class Tree(Record):
    v: Literal[1] = 1
    color: Color = Color.RED
    leaves: list[Leaf] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    best: Leaf | None = None
    at: datetime | None = None
    on: bool = False

    def _validate(self) -> None:
        if len({leaf.name for leaf in self.leaves}) != len(self.leaves):
            raise ValueError("leaf names must be unique")


@dataclass(frozen=True, kw_only=True)
class Lenient(Record):
    extra_forbidden: ClassVar[bool] = False
    a: int


def test_nested_dicts_lists_enums_and_datetimes_are_coerced() -> None:
    t = Tree(
        color="BLUE",  # type: ignore[arg-type]
        leaves=[{"name": " a ", "count": 2, "ratio": 1}],  # type: ignore[list-item]
        best={"name": "b"},  # type: ignore[arg-type]
        at="2026-01-02T03:04:05Z",  # type: ignore[arg-type]
    )
    assert t.color is Color.BLUE
    assert t.leaves == [Leaf(name="a", count=2, ratio=1.0)]
    assert isinstance(t.leaves[0].ratio, float)
    assert t.best == Leaf(name="b")
    assert t.at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"leaves": [{"name": "a"}, {"name": "b", "count": -2}]}, "leaves[1].count: must be >= 0, got -2"),
        ({"leaves": [{"name": "a", "count": 3}]}, "leaves[0].count: 3 is odd"),
        ({"leaves": [{"name": ""}]}, "leaves[0].name: must have at least 1 character(s)"),
        ({"leaves": [{"name": "a", "ratio": 0}]}, "leaves[0].ratio: must be > 0, got 0.0"),
        ({"leaves": [{"name": "a", "ratio": 1.5}]}, "leaves[0].ratio: must be <= 1, got 1.5"),
        ({"leaves": [{"count": 2}]}, "leaves[0].name: field required"),
        ({"leaves": [{"name": "a", "count": True}]}, "leaves[0].count: expected int, got bool"),
        ({"leaves": [{"name": "a", "count": "2"}]}, "leaves[0].count: expected int, got str"),
        ({"leaves": {"name": "a"}}, "leaves: expected a list, got dict"),
        ({"best": {"name": "a", "colour": 1}}, "best.colour: unknown field"),
        ({"best": 3}, "best: expected an object, got int"),
        ({"labels": {"k": 1}}, "labels['k']: expected str, got int"),
        ({"color": "GREEN"}, "color: expected one of ['RED', 'BLUE'], got 'GREEN'"),
        ({"v": 2}, "v: expected one of [1], got 2"),
        ({"v": True}, "v: expected one of [1], got True"),
        ({"on": 1}, "on: expected bool, got int"),
        ({"on": None}, "on: expected bool, got null"),
        ({"at": "yesterday"}, "at: expected an ISO 8601 date-time, got 'yesterday'"),
        ({"leaves": [{"name": "a"}, {"name": " a"}]}, "leaf names must be unique"),
    ],
)
def test_every_violation_names_its_field_and_rule(data: dict[str, object], message: str) -> None:
    with pytest.raises(RecordError) as e:
        Tree.from_dict(data)
    assert str(e.value).startswith(message), str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_fields_are_refused_or_ignored_per_record() -> None:
    with pytest.raises(RecordError, match=r"^extra: unknown field \(known: a\)"):

        @dataclass(frozen=True, kw_only=True)
        class Strict(Record):
            a: int

        Strict.from_dict({"a": 1, "extra": 2})
    assert Lenient.from_dict({"a": 1, "extra": 2}) == Lenient(a=1)
    with pytest.raises(RecordError, match=r"^a: field required"):
        Lenient.from_dict({})
    with pytest.raises(RecordError, match="expected an object, got list"):
        Lenient.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="invalid JSON"):
        Lenient.from_json("{")


def test_direct_construction_and_replace_validate_too() -> None:
    with pytest.raises(RecordError, match="count: must be >= 0"):
        Leaf(name="a", count=-2)
    leaf = Leaf(name="a")
    assert leaf.replace(count=4).count == 4
    with pytest.raises(RecordError, match="count: 5 is odd"):
        leaf.replace(count=5)
    with pytest.raises(AttributeError):
        leaf.count = 2  # type: ignore[misc]


def test_serialization_leaves_out_defaults_or_nulls_on_request() -> None:
    t = Tree(leaves=[Leaf(name="a")], best=Leaf(name="b", count=2), labels={"x": "y"})
    assert (
        t.to_json(exclude_defaults=True)
        == '{"leaves":[{"name":"a"}],"labels":{"x":"y"},"best":{"name":"b","count":2}}'
    )
    assert t.to_dict(exclude_none=True) == {
        "v": 1,
        "color": "RED",
        "leaves": [{"name": "a", "count": 0, "ratio": 0.5}],
        "labels": {"x": "y"},
        "best": {"name": "b", "count": 2, "ratio": 0.5},
        "on": False,
    }
    assert Tree.from_json(t.to_json()) == t
    assert Tree.from_json(t.to_json(exclude_defaults=True)) == t


def test_datetimes_are_written_as_pydantic_wrote_them() -> None:
    assert format_datetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert format_datetime(datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)) == "2026-01-02T03:04:05.000678Z"
    plus3 = timezone(timedelta(hours=3))
    assert format_datetime(datetime(2026, 1, 2, tzinfo=plus3)) == "2026-01-02T00:00:00+03:00"


def test_runner_result_json_is_unchanged_from_the_pydantic_models() -> None:
    """Operators and runners of the pydantic era read and write exactly this (captured from it),
    plus `diagnostic_files`, added since (an older operator ignores it, as it ignores any field
    a newer runner adds)."""
    result = RunnerResult.from_dict(
        {
            "project_id": "p",
            "job_id": "j",
            "attempt": 1,
            "status": "EXITED",
            "return_code": 3,
            "reason": "r\u00e9",
            "outputs": [{"path": "a", "key": "k", "sha256": "s", "size_bytes": 1}],
            "file_errors": [{"type": "NOT_FOUND", "description": "d", "path": "x"}],
            "progress": {"progress": 5, "message": "m", "create_time": "2026-01-02T03:04:05.000678Z"},
            "finished_at": "2026-01-02T00:00:00Z",
            "logs_complete": True,
            "log_end_offset": 7,
            "added_by_a_newer_runner": {"ignored": True},
        }
    )
    assert result.to_json() == (
        '{"v":1,"project_id":"p","job_id":"j","attempt":1,"status":"EXITED","return_code":3,'
        '"cancelled":false,"reason":"r\u00e9","outputs":[{"path":"a","index":0,"key":"k","sha256":"s",'
        '"size_bytes":1,"compression":"NONE"}],"file_errors":[{"type":"NOT_FOUND","description":"d",'
        '"path":"x"}],"log_files":[],"diagnostic_files":[],"progress":{"progress":5,"message":"m",'
        '"create_time":"2026-01-02T03:04:05.000678Z"},"log_end_offset":7,"logs_complete":true,'
        '"finished_at":"2026-01-02T00:00:00Z"}'
    )
