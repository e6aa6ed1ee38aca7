"""The node's arithmetic on quantities; parsing is dsjobs.quantity's (one parser for all)."""

from __future__ import annotations

import math
from fractions import Fraction

from dsjobs.quantity import QuantityError, parse_quantity

__all__ = ["QuantityError", "ceil_div", "format_plain", "parse_quantity"]


def ceil_div(value: Fraction, divisor: Fraction) -> int:
    if divisor <= 0:
        raise QuantityError("divisor must be positive")
    return math.ceil(value / divisor)


def format_plain(value: Fraction) -> str:
    """A canonical rendering used for node capacity: integers stay integers, else milli-units."""
    if value.denominator == 1:
        return str(value.numerator)
    milli = value * 1000
    if milli.denominator == 1:
        return f"{milli.numerator}m"
    return f"{math.ceil(milli)}m"
