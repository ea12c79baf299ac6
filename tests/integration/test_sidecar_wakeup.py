"""How a sidecar primary learns of commits it did not make: timed looks, and file events.

A session that reads while a transaction is voted but not finished stops
before it.  The finish flips one status byte: the file's size stays the
same, and its mtime comes from a coarse clock, so the poller's stamp need
not change.  With timed looks the session asks the poller to wake it at its
next look anyway (``ChangeNotifier.recheck``), on the poller's timer rather
than a timer of its own, so that under load a look is one wake-up.  While
the file is quiet the poller sleeps on inotify instead, and the finishing
write itself wakes it.  In these tests the finish's mtime is set back, so
only the recheck, or the event, can ship the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import time

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.serialize import referencesf
from ZODB.utils import z64

import replicator.primary as primary_module
from replicator.fswatch import FileWatch
from tests.integration.test_fence_settle import vote_one
from tests.integration.test_replication import running_primary, running_secondary, wait_equal_tid

POLL = 0.2


async def finish_unstamped(fs: FileStorage, path: str, txn) -> bytes:
    """Finish a voted ``txn`` and set the file's mtime back to what the vote left."""
    voted = os.stat(path)
    tid = await asyncio.to_thread(fs.tpc_finish, txn)
    os.utime(path, ns=(voted.st_atime_ns, voted.st_mtime_ns))
    finished = os.stat(path)
    assert (finished.st_size, finished.st_mtime_ns) == (voted.st_size, voted.st_mtime_ns)
    return tid


def commit_one(fs: FileStorage, value: bytes = b"0") -> bytes:
    return fs.tpc_finish(vote_one(fs, value))


def commit_root(fs: FileStorage) -> bytes:
    """Store the root object, which a pack starts from."""
    txn = TransactionMetaData()
    fs.tpc_begin(txn)
    # A record is two pickles, the class and the state; this state refers to nothing.
    fs.store(z64, z64, pickle.dumps((object, None), 3) + pickle.dumps({}, 3), "", txn)
    fs.tpc_vote(txn)
    return fs.tpc_finish(txn)


@pytest.fixture
def source(tmp_path):
    """The path of a FileStorage this test process writes, and the storage."""
    (tmp_path / "src-blobs").mkdir()
    path = str(tmp_path / "src.fs")
    fs = FileStorage(path, create=True)
    yield path, fs
    fs.close()


@contextlib.asynccontextmanager
async def replicating(tmp_path, tls_dir, **primary_options):
    """A sidecar primary on ``src.fs`` and a secondary following it."""
    options = {"poll_interval": 0.05, "heartbeat_interval": 30.0, **primary_options}
    async with running_primary(tmp_path, tls_dir, **options) as primary:
        async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
            yield primary, secondary


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_commit_seen_under_way_ships_on_the_next_look(source, tmp_path, tls_dir):
    path, fs = source

    async def scenario() -> None:
        async with replicating(tmp_path, tls_dir, poll_interval=POLL, file_events=False) as (primary, secondary):
            first = await asyncio.to_thread(commit_one, fs)
            await wait_equal_tid(primary, secondary, target=first, timeout=10)
            for n in range(3):
                txn = await asyncio.to_thread(vote_one, fs, b"%d" % n)
                # The session reads and stops at the vote.
                primary.notifier.notify()
                await asyncio.sleep(2 * POLL)
                assert primary.sessions and next(iter(primary.sessions.values())).sent_tid == first
                first = await finish_unstamped(fs, path, txn)
                await wait_equal_tid(primary, secondary, target=first, timeout=3 * POLL + 1)
            assert primary.notifier.sleeps == 0 and primary.notifier.event_wakeups == 0

    asyncio.run(scenario())


@pytest.fixture
def no_safety_net(monkeypatch):
    """While asleep on file events the poller looks only once a minute: only an event can ship a commit."""
    monkeypatch.setattr(primary_module, "SAFETY_LOOK", 60.0)


def test_a_quiet_sidecar_sleeps_and_each_write_wakes_it(source, tmp_path, tls_dir, no_safety_net):
    path, fs = source

    async def scenario() -> None:
        async with replicating(tmp_path, tls_dir) as (primary, secondary):
            notifier = primary.notifier
            last = await asyncio.to_thread(commit_one, fs)
            await wait_equal_tid(primary, secondary, target=last, timeout=10)
            for n in range(3):
                await until(lambda: notifier.poller is not None and notifier.poller.sleeping)
                woken = notifier.event_wakeups
                # The vote's write wakes the poller, and the session stops at the vote ...
                txn = await asyncio.to_thread(vote_one, fs, b"%d" % n)
                await until(lambda woken=woken: notifier.event_wakeups > woken)
                await asyncio.sleep(0.3)
                assert next(iter(primary.sessions.values())).sent_tid == last
                # ... and the finishing write ships it, with no timer running.
                last = await finish_unstamped(fs, path, txn)
                await wait_equal_tid(primary, secondary, target=last, timeout=10)
            # A commit now and then is no burst: it slept through all three.
            assert notifier.sleeps == 1 and notifier.poller.sleeping
            assert primary.status()["file_event_wakeups"] == notifier.event_wakeups

    asyncio.run(scenario())


def test_a_burst_of_commits_turns_the_timer_back_on(source, tmp_path, tls_dir, no_safety_net):
    _, fs = source

    async def scenario() -> None:
        async with replicating(tmp_path, tls_dir) as (primary, secondary):
            notifier = primary.notifier
            await until(lambda: notifier.poller is not None and notifier.poller.sleeping)
            sleeps = notifier.sleeps
            seen_awake = False

            def burst() -> bytes:
                # A steady stream, 10 ms apart, whatever the machine's speed: back to back on a
                # fast disk, the 40 could be over before the loop had read the four events
                # (EVENT_BURST) that wake the poller, and the sampling below saw none of it.
                for n in range(40):
                    tid = commit_one(fs, b"%d" % n)
                    time.sleep(0.01)
                return tid

            task = asyncio.create_task(asyncio.to_thread(burst))
            while not task.done():
                seen_awake |= not notifier.poller.sleeping
                await asyncio.sleep(0.005)
            await wait_equal_tid(primary, secondary, target=task.result(), timeout=10)
            assert seen_awake
            # Once the commits stop, the quiet looks put it back to sleep.
            await until(lambda: notifier.sleeps > sleeps and notifier.poller.sleeping)

    asyncio.run(scenario())


def test_a_pack_while_asleep_is_followed_to_the_new_file(source, tmp_path, tls_dir, no_safety_net):
    path, fs = source

    async def scenario() -> None:
        async with replicating(tmp_path, tls_dir) as (primary, secondary):
            notifier = primary.notifier
            await asyncio.to_thread(commit_root, fs)
            for n in range(3):
                last = await asyncio.to_thread(commit_one, fs, b"%d" % n)
            await wait_equal_tid(primary, secondary, target=last, timeout=10)
            await until(lambda: notifier.poller is not None and notifier.poller.sleeping)
            inode = os.stat(path).st_ino
            await asyncio.to_thread(fs.pack, time.time() + 1, referencesf)
            assert os.stat(path).st_ino != inode
            await until(lambda: notifier.poller.sleeping)
            last = await asyncio.to_thread(commit_one, fs, b"after the pack")
            await wait_equal_tid(primary, secondary, target=last, timeout=10)

    asyncio.run(scenario())


class DeafWatch(FileWatch):
    """Stands in for a file system whose writes the kernel does not report (NFS written elsewhere)."""

    def changed(self) -> bool:
        super().changed()
        return False


def test_changes_without_events_turn_file_events_off(source, tmp_path, tls_dir, monkeypatch, caplog):
    monkeypatch.setattr(primary_module, "SAFETY_LOOK", 0.1)
    monkeypatch.setattr(primary_module, "FileWatch", DeafWatch)
    _, fs = source

    async def scenario() -> None:
        async with replicating(tmp_path, tls_dir) as (primary, secondary):
            notifier = primary.notifier
            for n in range(2):
                await until(lambda: notifier.poller.watch is None or notifier.poller.sleeping)
                # The safety look finds each one, and the second unexplained change ends the watch.
                last = await asyncio.to_thread(commit_one, fs, b"%d" % n)
                await wait_equal_tid(primary, secondary, target=last, timeout=10)
            await until(lambda: notifier.poller.watch is None)
            assert not notifier.poller.sleeping
            last = await asyncio.to_thread(commit_one, fs, b"polled")
            await wait_equal_tid(primary, secondary, target=last, timeout=10)

    with caplog.at_level(logging.WARNING, logger="replicator.primary"):
        asyncio.run(scenario())
    assert "changed twice without a file event" in caplog.text
