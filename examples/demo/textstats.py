"""A local module of the demo job: the CLI zips it and the job imports it as usual."""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def top_words(text: str, n: int) -> list[tuple[str, int]]:
    return Counter(w for w in words(text) if len(w) > 3).most_common(n)


def summary(text: str) -> dict[str, int]:
    ws = words(text)
    return {
        "lines": len(text.splitlines()),
        "words": len(ws),
        "distinct words": len(set(ws)),
    }
