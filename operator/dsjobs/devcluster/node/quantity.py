"""Kubernetes resource quantities ("500m", "64Gi", "1e3") as exact fractions.

Exact arithmetic matters because the downward API rounds *up* (`ceil(value / divisor)`),
and a float would turn "1" / "1m" into 999.9999 on a bad day.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_RE = re.compile(r"^([+-]?[0-9]*\.?[0-9]*)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")


class QuantityError(ValueError):
    pass


def parse_quantity(value: str | int | float) -> Fraction:
    """Parse a Kubernetes quantity; raises QuantityError on malformed input."""
    if isinstance(value, bool):
        raise QuantityError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value))
    text = value.strip()
    m = _RE.match(text)
    if not m or m.group(1) in ("", ".", "+", "-"):
        raise QuantityError(f"not a quantity: {value!r}")
    number = Fraction(m.group(1))
    suffix = m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    return number * _DECIMAL[suffix]


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
