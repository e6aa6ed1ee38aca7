"""The process node's arithmetic on quantities (parsing is dsjobs.quantity's, tested in test_models)."""

from __future__ import annotations

from fractions import Fraction

import pytest

import dsjobs.quantity
from dsjobs.devcluster.node.quantity import QuantityError, ceil_div, format_plain, parse_quantity


def test_the_node_reads_quantities_with_the_products_parser() -> None:
    assert parse_quantity is dsjobs.quantity.parse_quantity
    assert parse_quantity("250u") == Fraction(1, 4000)


def test_ceil_div_and_format() -> None:
    assert ceil_div(Fraction(1, 2), Fraction(1)) == 1
    assert ceil_div(Fraction(1024), Fraction(1000)) == 2
    assert format_plain(Fraction(16)) == "16"
    assert format_plain(Fraction(1, 2)) == "500m"
    with pytest.raises(QuantityError, match="divisor"):
        ceil_div(Fraction(1), Fraction(0))
