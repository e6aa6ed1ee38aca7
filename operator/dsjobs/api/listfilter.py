"""The `filter` of ListProjectJob: a small, documented subset of the Yandex Cloud filter syntax.

    filter    := condition ( AND condition )*
    condition := field ( "=" | "!=" ) value  |  field [NOT] IN "(" value ( "," value )* ")"
    field     := id | name | status | created_by_id | parent_job_id
    value     := "double-quoted string" | 'single-quoted' | bare-word

Examples: `status = "SUCCESS"`, `status IN ("ERROR", "CANCELLED") AND created_by_id = "alice"`.
Anything else is INVALID_ARGUMENT naming the position. Filters are evaluated by the API on the
jobs Kubernetes returns page by page (no index exists for these fields), so a filtered page may
hold fewer than page_size jobs while more follow (next_page_token is set).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dsjobs.models import JobPhase

MAX_FILTER_LENGTH = 1000
FIELDS = ("id", "name", "status", "created_by_id", "parent_job_id")
STATUSES = frozenset(phase.value for phase in JobPhase)

_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<op>!=|=|\(|\)|,)|(?P<word>[A-Za-z0-9_.:@-]+))"""
)


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Condition:
    field: str
    values: frozenset[str]
    negate: bool

    def matches(self, value: str) -> bool:
        return (value in self.values) != self.negate


@dataclass(frozen=True)
class Filter:
    conditions: tuple[Condition, ...] = ()

    def matches(self, fields: Mapping[str, str] | Callable[[str], str]) -> bool:
        get = fields if callable(fields) else fields.__getitem__
        return all(c.matches(get(c.field)) for c in self.conditions)

    def __bool__(self) -> bool:
        return bool(self.conditions)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            at = pos + len(text[pos:]) - len(text[pos:].lstrip())
            if text[at] in "\"'":
                raise FilterError(f"unterminated string at position {at}: no closing {text[at]}")
            raise FilterError(
                f"unexpected character {text[at]!r} at position {at}; a condition is field = value, "
                "field != value or field [NOT] IN (value, ...), joined by AND"
            )
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out.append((kind, value, m.start(kind)))
        pos = m.end()
    return out


def parse(text: str) -> Filter:
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"at most {MAX_FILTER_LENGTH} characters")
    toks = _tokens(text)
    i = 0
    conditions: list[Condition] = []

    def expect(kind: str, value: str | None = None) -> str:
        nonlocal i
        if i >= len(toks):
            raise FilterError(f"unexpected end, expected {value or kind}")
        k, v, p = toks[i]
        if k != kind or (value is not None and v.upper() != value):
            raise FilterError(f"expected {value or kind} at position {p}, found {v!r}")
        i += 1
        return v

    def value() -> str:
        nonlocal i
        if i >= len(toks) or toks[i][0] not in ("str", "word"):
            raise FilterError(
                "expected a value" + (f" at position {toks[i][2]}" if i < len(toks) else " at the end")
            )
        i += 1
        return toks[i - 1][1]

    if not toks:
        return Filter()
    while True:
        pos = toks[i][2] if i < len(toks) else len(text)
        if i < len(toks) and toks[i][0] != "word":
            raise FilterError(
                f"expected a field ({', '.join(FIELDS)}) at position {pos}, found {toks[i][1]!r}"
                + (
                    "; conditions are not grouped in parentheses, only joined by AND"
                    if toks[i][1] == "("
                    else ""
                )
            )
        name = expect("word").lower()
        if name not in FIELDS:
            raise FilterError(f"unknown field {name!r} at position {pos}; filterable: {', '.join(FIELDS)}")
        if i < len(toks) and toks[i][0] == "op" and toks[i][1] in ("=", "!="):
            negate = toks[i][1] == "!="
            i += 1
            values = {value()}
        else:
            negate = False
            if i < len(toks) and toks[i][0] == "word" and toks[i][1].upper() == "NOT":
                negate = True
                i += 1
            expect("word", "IN")
            expect("op", "(")
            values = {value()}
            while i < len(toks) and toks[i][:2] == ("op", ","):
                i += 1
                values.add(value())
            expect("op", ")")
        if name == "status":
            values = {v.upper() for v in values}
            if unknown := values - STATUSES:
                raise FilterError(
                    f"unknown status {sorted(unknown)[0]!r}; one of {', '.join(sorted(STATUSES))}"
                )
        conditions.append(Condition(name, frozenset(values), negate))
        if i >= len(toks):
            return Filter(tuple(conditions))
        expect("word", "AND")
