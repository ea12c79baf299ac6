"""Waking the primary's sessions: at once with idle CPUs, batched while they are saturated."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from replicator.config import Address, PrimaryConfig
from replicator.cpuload import CpuPressure, cpu_ticks
from replicator.errors import ConfigError
from replicator.primary import ChangeNotifier

STAT = """cpu  {u} 0 {s} {i} {w} 0 0 0 0 0
cpu0 {u} 0 {s} {i} {w} 0 0 0 0 0
cpu1 100 0 100 {i1} 0 0 0 0 0 0
intr 12345
"""


def write_stat(path, u, s, i, w=0, i1=0):
    path.write_text(STAT.format(u=u, s=s, i=i, w=w, i1=i1))


def test_cpu_ticks_sum_the_allowed_cpus_only():
    text = STAT.format(u=10, s=5, i=80, w=5, i1=1000)
    assert cpu_ticks(text, {0}) == (85, 100)
    assert cpu_ticks(text, {0, 1}) == (85 + 1000, 100 + 1200)
    assert cpu_ticks(text, {7}) is None


def test_pressure_follows_the_idle_share_between_samples(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, 0, 0, 0)
    pressure = CpuPressure(interval=0.0, path=str(stat), sustain=1)
    assert pressure.saturated() is False  # one sample says nothing yet
    write_stat(stat, 90, 5, 5)  # 5% idle since: saturated
    assert pressure.saturated() is True
    write_stat(stat, 120, 10, 65, w=5)  # 70 idle (iowait counts) of 100: not
    assert pressure.saturated() is False
    write_stat(stat, 120, 10, 65, w=5)  # no tick since: keeps its last answer
    assert pressure.saturated() is False


def test_pressure_must_last_before_it_counts(tmp_path):
    # A moderate load dips under the threshold now and then: only a streak
    # of saturated samples turns batching on, and one idle sample ends it.
    stat = tmp_path / "stat"
    ticks = [0, 0, 0]

    def sample(busy: int, idle: int) -> bool:
        ticks[0] += busy
        ticks[2] += idle
        write_stat(stat, ticks[0], ticks[1], ticks[2])
        return pressure.saturated()

    write_stat(stat, 0, 0, 0)
    pressure = CpuPressure(interval=0.0, path=str(stat), sustain=3)
    assert pressure.saturated() is False
    assert [sample(95, 5), sample(95, 5), sample(50, 50), sample(95, 5), sample(95, 5)] == [False] * 5
    assert sample(95, 5) is True  # the third in a row
    assert sample(95, 5) is True
    assert sample(60, 40) is False


def test_pressure_says_at_once_when_the_latest_sample_was_saturated(tmp_path):
    stat = tmp_path / "stat"
    ticks = [0, 0, 0]

    def sample(busy: int, idle: int) -> tuple[bool, bool]:
        ticks[0] += busy
        ticks[2] += idle
        write_stat(stat, ticks[0], ticks[1], ticks[2])
        return pressure.strained(), pressure.saturated()

    write_stat(stat, 0, 0, 0)
    pressure = CpuPressure(interval=0.0, path=str(stat), sustain=3)
    assert pressure.strained() is False
    assert sample(95, 5) == (True, False)  # strained from the first sample, saturated only from the third
    assert sample(50, 50) == (False, False)
    assert [sample(95, 5), sample(95, 5), sample(95, 5)] == [(True, False), (True, False), (True, True)]
    assert sample(60, 40) == (False, False)
    assert CpuPressure(interval=0.0, path=str(tmp_path / "missing")).strained() is False


def test_pressure_says_how_long_it_has_lasted(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    clock = [1000.0]
    monkeypatch.setattr("replicator.cpuload.time.monotonic", lambda: clock[0])
    write_stat(stat, 0, 0, 0)
    pressure = CpuPressure(interval=0.0, path=str(stat), sustain=2)
    assert pressure.saturated_for() is None
    write_stat(stat, 95, 0, 5)
    assert pressure.saturated_for() is None  # one saturated sample: not yet
    clock[0] += 0.25
    write_stat(stat, 190, 0, 10)
    assert pressure.saturated_for() == 0.0  # from the sample that made it count
    clock[0] += 1.5
    write_stat(stat, 285, 0, 15)
    assert pressure.saturated_for() == 1.5
    clock[0] += 0.25
    write_stat(stat, 300, 0, 100)  # an idle sample ends it
    assert pressure.saturated_for() is None
    clock[0] += 0.25
    write_stat(stat, 395, 0, 105)
    write_stat(stat, 395, 0, 105)
    assert pressure.saturated_for() is None
    clock[0] += 0.25
    write_stat(stat, 490, 0, 110)
    assert pressure.saturated_for() == 0.0  # a new saturation counts from its own start


def test_pressure_is_never_claimed_without_counters(tmp_path):
    pressure = CpuPressure(interval=0.0, path=str(tmp_path / "missing"))
    assert pressure.saturated() is False
    assert pressure.saturated() is False


def test_pressure_reads_the_counters_at_most_once_per_interval(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, 0, 0, 0)
    pressure = CpuPressure(interval=60.0, path=str(stat))
    pressure.saturated()
    write_stat(stat, 100, 0, 0)
    assert pressure.saturated() is False  # not read again yet


def test_pressure_on_this_machine_answers():
    assert CpuPressure(interval=0.0).saturated() in (True, False)


class Saturated:
    """A ``CpuPressure`` that says what it is told; saturated for ``lasted`` seconds so far."""

    def __init__(self, value: bool, lasted: float = 60.0, strain: bool = False) -> None:
        self.value = value
        self.lasted = lasted
        self.strain = strain  # the latest sample alone was saturated

    def saturated(self) -> bool:
        return self.value

    def strained(self) -> bool:
        return self.value or self.strain

    def saturated_for(self) -> float | None:
        return self.lasted if self.value else None


async def _wakeups(notifier: ChangeNotifier, commits: list[float]) -> list[float]:
    """Run ``notifier``'s loop; another thread notifies at the offsets in ``commits``; return wake times."""
    loop = asyncio.get_running_loop()
    notifier._loop = loop
    woken: list[float] = []
    start = time.monotonic()

    def committer() -> None:
        for offset in commits:
            time.sleep(max(0.0, start + offset - time.monotonic()))
            notifier.notify_threadsafe()

    thread = threading.Thread(target=committer)
    thread.start()
    seen = notifier.version
    deadline = start + commits[-1] + 2.0
    while time.monotonic() < deadline:
        seen = await notifier.wait(seen, 0.05)
        if len(woken) < seen:
            woken.append(time.monotonic() - start)
        if not thread.is_alive() and not notifier._wake_scheduled and not notifier._dirty:
            break
    thread.join()
    return woken


def test_commits_wake_the_sessions_at_once_while_the_cpus_have_idle_time():
    notifier = ChangeNotifier("unused", 1.0, batch_delay=0.2, pressure=Saturated(False))
    woken = asyncio.run(_wakeups(notifier, [0.0, 0.05, 0.1]))
    assert len(woken) == 3
    assert all(w < c + 0.04 for w, c in zip(woken, [0.0, 0.05, 0.1], strict=True)), woken
    assert notifier.batched_wakeups == 0


def test_commits_share_a_wakeup_while_the_cpus_are_saturated():
    notifier = ChangeNotifier("unused", 1.0, batch_delay=0.2, pressure=Saturated(True))
    woken = asyncio.run(_wakeups(notifier, [0.0, 0.05, 0.1]))
    # The first at once; the two others together, batch_delay after it.
    assert len(woken) == 2, woken
    assert woken[0] < 0.04
    assert woken[1] >= woken[0] + 0.19
    assert notifier.batched_wakeups == 1


def test_a_saturated_burst_ends_with_a_wakeup_after_its_last_commit():
    # The committing thread and the batch tick hand off without a lock: after
    # any burst, the sessions must be woken after the last commit.
    import random

    rng = random.Random(5)
    for _ in range(20):
        notifier = ChangeNotifier("unused", 1.0, batch_delay=0.003, pressure=Saturated(True))
        commits = sorted(rng.uniform(0, 0.03) for _ in range(rng.randint(1, 30)))
        woken = asyncio.run(_wakeups(notifier, commits))
        assert woken and woken[-1] >= commits[-1], (commits, woken)
        assert not notifier._dirty


def test_batching_stops_once_the_commits_stop():
    notifier = ChangeNotifier("unused", 1.0, batch_delay=0.05, pressure=Saturated(True))
    woken = asyncio.run(_wakeups(notifier, [0.0, 0.5]))
    # The tick after the first commit finds nothing to ship: the second wakes at once.
    assert len(woken) == 2, woken
    assert woken[1] < 0.54, woken
    assert notifier.batched_wakeups == 0


def test_no_batching_without_a_delay():
    notifier = ChangeNotifier("unused", 1.0, batch_delay=0.0)
    assert notifier.pressure is None
    woken = asyncio.run(_wakeups(notifier, [0.0, 0.05]))
    assert len(woken) == 2 and notifier.batched_wakeups == 0


def test_synchronous_commits_are_never_held_back(tmp_path):
    from replicator.primary import Primary

    (tmp_path / "Data.fs").write_bytes(b"FS21")
    common = {"storage": str(tmp_path / "Data.fs"), "listen": Address("127.0.0.1", 0), "insecure": True}
    assert Primary(PrimaryConfig(**common)).notifier.batch_delay == 0.1
    assert Primary(PrimaryConfig(**common, sync_count=1)).notifier.batch_delay == 0.0


@pytest.mark.parametrize("delay", [-0.1, 1.5])
def test_batch_delay_is_checked(tmp_path, delay):
    (tmp_path / "Data.fs").write_bytes(b"FS21")
    config = PrimaryConfig(storage=str(tmp_path / "Data.fs"), listen=Address("127.0.0.1", 0), insecure=True,
                           batch_delay=delay)
    with pytest.raises(ConfigError, match="batch-delay"):
        config.validate()


def test_the_poller_looks_every_batch_delay_only_while_the_cpus_are_saturated():
    pressure = Saturated(False)
    notifier = ChangeNotifier("unused", 0.01, batch_delay=0.05, pressure=pressure)
    assert notifier.poll_delay() == 0.01
    pressure.value = True
    assert notifier.poll_delay() == 0.05
    assert notifier.batched_wakeups == 1  # shown in /status
    # A batch delay no longer than the poll interval changes nothing.
    assert ChangeNotifier("unused", 0.01, batch_delay=0.01, pressure=pressure).poll_delay() == 0.01
    assert ChangeNotifier("unused", 0.01, batch_delay=0.0, pressure=pressure).poll_delay() == 0.01


def test_one_saturated_sample_holds_wakeups_back_a_little():
    # Before a saturation has lasted long enough to count, a wake-up per
    # commit costs the server the most: one saturated sample is enough to
    # ship at most every FIRST_BATCH_DELAY; the ramp waits for a lasting one.
    pressure = Saturated(False, strain=True)
    notifier = ChangeNotifier("unused", 0.01, batch_delay=0.1, pressure=pressure)
    assert notifier.current_batch_delay() == pytest.approx(0.01)
    assert notifier.poll_delay() == 0.01  # the sidecar's poll already waits that long
    assert notifier.batched_wakeups == 0
    pressure.strain = False
    assert notifier.current_batch_delay() == 0.0
    # Never longer than batch_delay, and never with batching off (synchronous primaries).
    pressure.strain = True
    assert ChangeNotifier("unused", 0.01, batch_delay=0.005, pressure=pressure).current_batch_delay() == 0.005
    assert ChangeNotifier("unused", 0.01, batch_delay=0.0, pressure=pressure).current_batch_delay() == 0.0


def test_the_delay_grows_while_the_saturation_lasts():
    # A moment of saturation (a moderate load's peak) holds commits back only
    # a little; a lasting one, ever longer, up to batch_delay.
    pressure = Saturated(True, lasted=0.0)
    notifier = ChangeNotifier("unused", 0.01, batch_delay=0.1, pressure=pressure)
    delays = []
    for lasted in (0.0, 0.4, 0.5, 1.0, 1.5, 2.0, 3600.0 * 24 * 365):
        pressure.lasted = lasted
        delays.append(notifier.current_batch_delay())
    assert delays == pytest.approx([0.01, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1])
    pressure.value = False
    assert notifier.current_batch_delay() == 0.0
    # The first step is never longer than batch_delay itself.
    pressure.value, pressure.lasted = True, 0.0
    assert ChangeNotifier("unused", 0.01, batch_delay=0.005, pressure=pressure).current_batch_delay() == 0.005


def test_the_poller_slows_down_step_by_step_under_a_lasting_saturation():
    pressure = Saturated(True, lasted=0.0)
    notifier = ChangeNotifier("unused", 0.01, batch_delay=0.1, pressure=pressure)
    assert notifier.poll_delay() == 0.01  # the first step is the poll interval itself
    assert notifier.batched_wakeups == 0
    pressure.lasted = 1.0
    assert notifier.poll_delay() == pytest.approx(0.04)
    assert notifier.batched_wakeups == 1


def test_a_batch_tick_waits_the_current_delay():
    pressure = Saturated(True, lasted=0.0)
    notifier = ChangeNotifier("unused", 1.0, batch_delay=0.4, pressure=pressure)
    woken = asyncio.run(_wakeups(notifier, [0.0, 0.002]))
    # 10 ms into a saturation, the second commit waits for a tick 10 ms after the first, not 400.
    assert len(woken) == 2, woken
    assert woken[1] < 0.2, woken
