"""Say a recurring thing once in a while, and how often it recurred meanwhile.

A refused secondary retries every 30 s at most once backed off, for as long
as nobody fixes it; a log line per attempt buries everything else.  The
first occurrence of each kind is said at once; the same one again only
after ``interval`` seconds, with the count of those left unsaid.  Counters
in ``/status`` and ``/metrics`` still count every one.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable

__all__ = ["Throttle"]

#: A key is kept at least this long (seconds) after it was said, whatever its interval: a caller
#: may ask for a longer interval the next time.
MIN_KEEP = 60.0


class Throttle:
    """``due(key)``: whether to say it now, and how many times it went unsaid since.

    Keys come from the network (a refused host's address), so what is kept of
    them is bounded: a key whose interval (and ``MIN_KEEP``) has passed with
    nothing unsaid is forgotten (its next occurrence is said at once, as it
    would be anyway),
    and beyond ``max_keys`` the oldest go first, their unsaid counts with them.
    """

    def __init__(self, interval: float, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        #: When each key was last said, and the interval it was said with (insertion order: oldest first).
        self._said: dict[Hashable, tuple[float, float]] = {}
        self._unsaid: collections.Counter[Hashable] = collections.Counter()
        self._pruned = clock()

    def due(self, key: Hashable, interval: float | None = None) -> int | None:
        """None: keep quiet (counted); otherwise say it, adding that it recurred that many times unsaid."""
        now = self._clock()
        interval = self.interval if interval is None else interval
        last = self._said.get(key)
        if last is not None and now - last[0] < interval:
            self._unsaid[key] += 1
            return None
        self._said.pop(key, None)  # re-inserted last: the order stays oldest first
        self._said[key] = (now, interval)
        unsaid = self._unsaid.pop(key, 0)
        if now - self._pruned >= max(self.interval, MIN_KEEP):
            self._prune(now)
        while len(self._said) > self.max_keys:
            oldest = next(iter(self._said))
            del self._said[oldest]
            self._unsaid.pop(oldest, None)
        return unsaid

    def __len__(self) -> int:
        return len(self._said)

    def _prune(self, now: float) -> None:
        self._pruned = now
        for key, (said, interval) in list(self._said.items()):
            if now - said >= max(interval, MIN_KEEP) and not self._unsaid.get(key):
                del self._said[key]

    @staticmethod
    def since(unsaid: int, what: str = "") -> str:
        """The words to add to a line said after ``unsaid`` unsaid ones."""
        return f" ({unsaid} more{' ' + what if what else ''} since the last such line)" if unsaid else ""
