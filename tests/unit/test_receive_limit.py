"""``ReceiveLimit``'s arithmetic, on a clock of the test's own (the link itself: test_max_rate)."""

from __future__ import annotations

import pytest

from replicator.transport import ReceiveLimit

RATE = 1 << 20
MESSAGE = 64 << 10


class NoSocket:
    """A connection whose kernel counters cannot be read: the messages' sizes count."""

    def get_extra_info(self, name: str, default=None):
        return default


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def read(limit: ReceiveLimit, clock: Clock, total: int, work: float = 0.0005) -> float:
    """Read ``total`` bytes in messages as a secondary does (sleeping each delay); seconds taken."""
    start = clock.now
    for _ in range(total // MESSAGE):
        clock.now += work  # receiving and applying the message
        clock.now += limit.delay(MESSAGE)
    return clock.now - start


def test_a_long_stream_goes_at_the_rate_after_one_seconds_worth():
    clock = Clock()
    limit = ReceiveLimit(NoSocket(), RATE, clock=clock)
    took = read(limit, clock, 20 * RATE)
    # The bucket starts full: the first second's worth goes at once, the other 19 at the rate.
    assert took == pytest.approx(19.0, rel=0.01)


def test_after_a_quiet_spell_at_most_one_seconds_worth_goes_at_full_speed():
    clock = Clock()
    limit = ReceiveLimit(NoSocket(), RATE, clock=clock)
    read(limit, clock, 4 * RATE)
    clock.now += 60.0  # nothing for a minute: the bucket refills, but only to one second's worth
    assert read(limit, clock, RATE, work=0.0) == pytest.approx(0.0, abs=1e-9)
    assert read(limit, clock, 4 * RATE, work=0.0) == pytest.approx(4.0, rel=0.01)


def test_a_slow_reader_is_not_held_back():
    """A reader slower than the rate (its own work takes longer) never waits on the limit."""
    clock = Clock()
    limit = ReceiveLimit(NoSocket(), RATE, clock=clock)
    slow = MESSAGE / RATE * 2  # half the rate
    took = read(limit, clock, 8 * RATE, work=slow)
    assert took == pytest.approx(8 * RATE // MESSAGE * slow, rel=1e-6)
