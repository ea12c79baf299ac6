"""The log throttle: said at once, then once per interval with the count left unsaid; bounded."""

from __future__ import annotations

from replicator.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_said_at_once_then_once_per_interval_with_the_count_left_unsaid():
    clock = Clock()
    throttle = Throttle(300, clock=clock)
    assert throttle.due("a") == 0
    assert throttle.due("a") is None and throttle.due("a") is None
    assert throttle.due("b") == 0  # another key is its own
    clock.now += 300
    assert throttle.due("a") == 2
    assert throttle.due("a", interval=10) is None
    clock.now += 10
    assert throttle.due("a", interval=10) == 1


def test_keys_from_the_network_are_forgotten_once_their_interval_passed():
    """A refused host's address is a key: a scan from 30,000 addresses must not stay in memory."""
    clock = Clock()
    throttle = Throttle(300, clock=clock)
    for n in range(30_000):
        assert throttle.due(("10.0.0.1", n)) == 0
    assert len(throttle) == 4096  # the newest: beyond the bound the oldest go first
    throttle.due("recurring")
    throttle.due("recurring")  # one unsaid: kept past its interval so that the count is said
    clock.now += 301
    assert throttle.due("new") == 0
    assert len(throttle) == 2, len(throttle)
    assert throttle.due("recurring") == 1
    assert throttle.due(("10.0.0.1", 29_999)) == 0  # forgotten, so said at once, as it was due anyway
