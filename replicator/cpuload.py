"""Is this process's share of the machine saturated?  (Linux ``/proc/stat``; elsewhere: never.)

The embedded primary ships each commit the moment it is finished, which is
what keeps its lag under a millisecond.  Each shipment wakes the replication
thread, reads, encrypts and sends: a few hundred microseconds of CPU, most of
it the cost of waking a thread whose caches the server and its clients have
just evicted.  That is free while the CPUs have idle time, and comes out of
the server's commit throughput once they have none.  ``CpuPressure`` tells
the two cases apart, so that commits are batched only when the CPUs this
process may run on are busy all the time.

A moment of saturation is not enough: a moderate load on a busy machine
dips under the threshold now and then, and batching there would add lag
without giving the server anything (an open-loop load has idle time to
spare on average).  Only ``SUSTAIN`` saturated samples in a row, a second,
count: at 200 commits/s keeping the server's core 70% busy on average, half
a second still let stretches of saturation batch 46-69 wake-ups in 20 s,
which made the p99 of the lag 7.5-8.2 ms; a second, 0-23 wake-ups and
1.4-3.8 ms (2026-11-30, two runs each).  Under a lasting saturation it
starts batching half a second later, which the cost benchmark could not
tell from its noise.  ``saturated_for`` says how long a saturation has
lasted, so that the primary can wait the longer between wake-ups the
longer it lasts (``ChangeNotifier.current_batch_delay``).

``strained`` says whether the latest sample alone was saturated.  The
embedded primary then already ships at most every 10 ms (the sidecar's poll
never looks more often anyway): in the second a saturation took to count,
a wake-up per commit cost the server a few hundred microseconds of CPU per
commit, the larger part of what replication cost it over the benchmark's
6-second saturating window (2026-12-05, six alternating rounds: the
embedded primary's threads 40 against 61 us per commit, the server's
throughput ratio 0.966 against 0.942).  A moderate load's peak that one
sample mistakes for saturation is held back by at most those 10 ms.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["CpuPressure", "SATURATED_IDLE", "SAMPLE_INTERVAL", "SUSTAIN", "cpu_ticks"]

#: How often the CPUs' counters are read again (they count in 10 ms ticks).
SAMPLE_INTERVAL = 0.25
#: Saturated: less than this share of the CPUs' time was idle (or waiting for the disk)
#: since the last sample.  A server committing as fast as its clients let it
#: still idles 5-10% of the time, in the gaps while it waits for fsync.
SATURATED_IDLE = 0.2
#: Saturated samples in a row before ``saturated()`` says so (4 x 0.25 s).
SUSTAIN = 4

PROC_STAT = "/proc/stat"


def cpu_ticks(text: str, cpus: set[int]) -> tuple[int, int] | None:
    """(idle, total) jiffies of ``cpus`` summed from ``/proc/stat``'s text; None if none is listed.

    Idle counts ``idle`` and ``iowait``; total counts user, nice, system,
    idle, iowait, irq, softirq and steal (guest time is already in user).
    """
    idle = total = 0
    seen = False
    for line in text.splitlines():
        if not line.startswith("cpu") or line[3:4] == " ":
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
        except ValueError:
            continue
        if cpu not in cpus or len(fields) < 8:
            continue
        values = [int(v) for v in fields[:8]]
        idle += values[3] + values[4]
        total += sum(values)
        seen = True
    return (idle, total) if seen else None


class CpuPressure:
    """``saturated()``: whether the CPUs this process may use had (almost) no idle time lately.

    Reads ``/proc/stat`` at most every ``interval`` seconds, from whichever
    thread asks; between reads it answers from the last one.  True once
    ``sustain`` samples in a row were saturated, False from the first one
    that was not.  Where the counters cannot be read it always answers False
    (never batch).
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL, threshold: float = SATURATED_IDLE,
                 path: str = PROC_STAT, sustain: int = SUSTAIN) -> None:
        self.interval = interval
        self.threshold = threshold
        self.path = path
        self.sustain = sustain
        self._streak = 0  # saturated samples in a row
        self._lock = threading.Lock()
        self._next = 0.0
        self._last: tuple[int, int] | None = None
        self._saturated = False
        #: When ``saturated()`` last turned True (monotonic seconds), None while it is False.
        self._since: float | None = None

    def saturated(self) -> bool:
        now = time.monotonic()
        if now < self._next or not self._lock.acquire(blocking=False):
            return self._saturated
        try:
            self._next = now + self.interval
            self._sample()
        finally:
            self._lock.release()
        return self._saturated

    def strained(self) -> bool:
        """Whether the latest sample was saturated, lasting or not (``saturated()`` waits for ``sustain``)."""
        self.saturated()
        return self._streak > 0

    def saturated_for(self) -> float | None:
        """Seconds ``saturated()`` has said True without a break; None while it says False."""
        if not self.saturated():
            return None
        since = self._since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def _sample(self) -> None:
        try:
            with open(self.path, encoding="ascii") as fh:
                text = fh.read()
            ticks = cpu_ticks(text, os.sched_getaffinity(0))
        except (OSError, ValueError, AttributeError):
            ticks = None
        if ticks is None:
            self._next = float("inf")  # no counters here: never read again, never saturated
            self._saturated, self._since = False, None
            return
        last, self._last = self._last, ticks
        if last is None:
            return
        total = ticks[1] - last[1]
        if total <= 0:
            return  # no tick since the last look: keep the last answer
        if (ticks[0] - last[0]) / total < self.threshold:
            self._streak += 1
        else:
            self._streak = 0
        saturated = self._streak >= self.sustain
        if saturated and not self._saturated:
            self._since = time.monotonic()
        elif not saturated:
            self._since = None
        self._saturated = saturated
