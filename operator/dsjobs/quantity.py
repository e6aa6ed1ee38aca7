"""Kubernetes resource quantities ("500m", "64Gi", "1e3") as exact fractions: the one parser.

The CRD schemas, the validation of InstanceTypes and the process node's resource accounting all
read quantities through `parse_quantity`, so they agree on what a quantity is and what it is worth.
Exact arithmetic matters because the downward API rounds *up* (`ceil(value / divisor)`), and a
float would turn "1" / "1m" into 999.9999 on a bad day. No imports beyond the standard library:
the process node uses it without loading the product's models.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Final

#: Kubernetes' own pattern for a quantity (the CRD schemas use it as is).
QUANTITY_PATTERN: Final = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_PARTS_RE = re.compile(r"([+-]?[0-9.]+)([eE].*|[KMGTPE]i|[numkMGTPE])?")
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


class QuantityError(ValueError):
    pass


class QuantityRangeError(QuantityError):
    """A quantity whose exponent is out of MAX_EXPONENT's range."""


#: The largest exponent a quantity may have ("1e100"): far past any resource.
MAX_EXPONENT = 100


def parse_quantity(value: str | int | float) -> Fraction:
    """The exact value of a quantity (`500m` -> 1/2, `32Gi` -> 34359738368); YAML numbers too.

    Raises QuantityError (a ValueError) naming the text when it is not a quantity. Like the API
    server, an exponent must be a whole number even where the pattern would allow "1e1.5".
    """
    if isinstance(value, bool):
        raise QuantityError(f"not a Kubernetes quantity: {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QuantityError(f"not a Kubernetes quantity: {value!r}")
        return Fraction(str(value))
    if not isinstance(value, str) or not _QUANTITY_RE.fullmatch(value):
        raise QuantityError(f"not a Kubernetes quantity: {value!r}")
    parts = _PARTS_RE.fullmatch(value)
    if parts is None:  # pragma: no cover - QUANTITY_PATTERN already matched
        raise QuantityError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = Fraction(parts.group(1)), parts.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        exponent = suffix[1:]
        if not re.fullmatch(r"[+-]?[0-9]+", exponent):
            raise QuantityError(f"not a Kubernetes quantity: {value!r} (the exponent must be a whole number)")
        # The exact power of 1e10000000 takes seconds (1e2000000000, gigabytes): no resource is
        # that big or that small.
        if len(exponent.lstrip("+-").lstrip("0")) > 3 or abs(int(exponent)) > MAX_EXPONENT:
            raise QuantityRangeError(
                f"not a usable Kubernetes quantity: {value!r} (the exponent must be within ±{MAX_EXPONENT})"
            )
        return number * Fraction(10) ** int(exponent)
    return number * _DECIMAL[suffix]
