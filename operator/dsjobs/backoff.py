"""Back-off for loops that watch or poll a server: waits that double with jitter up to a cap.

Replicas and nodes that lost the same server retry together when it comes back; the jitter
(0.5x..1.5x) spreads them, the cap bounds how late a loop notices the server is back.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """The wait after each failure in a row: `first`, doubled each time up to `cap`, jittered."""

    first: float = 1.0
    cap: float = 30.0
    #: A number in [0, 1) (random.random when None).
    jitter: Callable[[], float] | None = None
    #: Failures since the last success (`reset`).
    failures: int = field(default=0, init=False)

    def next_wait(self) -> float:
        """Count a failure; the seconds to wait before the next try."""
        base = min(self.first * 2**self.failures, self.cap) if self.failures < 64 else self.cap
        self.failures += 1
        return base * (0.5 + (self.jitter or random.random)())

    def reset(self) -> None:
        """A success: the next failure waits `first` again."""
        self.failures = 0


def jittered(delay: float) -> float:
    """`delay` shortened by up to half, at random: retriers that failed together (every runner
    that met one storage outage) do not retry in step."""
    return delay * (0.5 + random.random() / 2)
