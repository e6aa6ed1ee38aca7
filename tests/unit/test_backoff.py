from __future__ import annotations

from dsjobs.backoff import Backoff


def test_waits_double_with_jitter_up_to_the_cap_and_start_again_after_a_success() -> None:
    low, high = (
        Backoff(first=1.0, cap=8.0, jitter=lambda: 0.0),
        Backoff(first=1.0, cap=8.0, jitter=lambda: 0.999),
    )
    assert [low.next_wait() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [round(high.next_wait(), 2) for _ in range(5)] == [1.5, 3.0, 6.0, 11.99, 11.99]
    assert low.failures == 6
    low.reset()
    assert low.failures == 0 and low.next_wait() == 0.5


def test_a_long_outage_never_overflows() -> None:
    b = Backoff(first=1.0, cap=30.0, jitter=lambda: 0.5)
    for _ in range(2000):
        wait = b.next_wait()
    assert wait == 30.0
