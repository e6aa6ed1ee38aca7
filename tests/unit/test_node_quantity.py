"""Kubernetes quantities as exact fractions."""

from __future__ import annotations

from fractions import Fraction

import pytest

from dsjobs.devcluster.node.quantity import QuantityError, ceil_div, format_plain, parse_quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", Fraction(1)),
        ("500m", Fraction(1, 2)),
        ("1.5", Fraction(3, 2)),
        ("64Gi", Fraction(64 * 2**30)),
        ("100M", Fraction(10**8)),
        ("1e3", Fraction(1000)),
        ("2E-1", Fraction(1, 5)),
        ("250u", Fraction(1, 4000)),
        (".5", Fraction(1, 2)),
        (8, Fraction(8)),
    ],
)
def test_parse(text: str | int, value: Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("bad", ["", "abc", "1Zi", "--1", ".", True])
def test_parse_rejects(bad: object) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(bad)  # type: ignore[arg-type]


def test_ceil_div_and_format() -> None:
    assert ceil_div(Fraction(1, 2), Fraction(1)) == 1
    assert ceil_div(Fraction(1024), Fraction(1000)) == 2
    assert format_plain(Fraction(16)) == "16"
    assert format_plain(Fraction(1, 2)) == "500m"
