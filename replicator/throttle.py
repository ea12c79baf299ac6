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
from collections.abc import Hashable

__all__ = ["Throttle"]


class Throttle:
    """``due(key)``: whether to say it now, and how many times it went unsaid since."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._said: dict[Hashable, float] = {}
        self._unsaid: collections.Counter[Hashable] = collections.Counter()

    def due(self, key: Hashable, interval: float | None = None) -> int | None:
        """None: keep quiet (counted); otherwise say it, adding that it recurred that many times unsaid."""
        now = time.monotonic()
        last = self._said.get(key)
        if last is not None and now - last < (self.interval if interval is None else interval):
            self._unsaid[key] += 1
            return None
        self._said[key] = now
        return self._unsaid.pop(key, 0)

    @staticmethod
    def since(unsaid: int, what: str = "") -> str:
        """The words to add to a line said after ``unsaid`` unsaid ones."""
        return f" ({unsaid} more{' ' + what if what else ''} since the last such line)" if unsaid else ""
