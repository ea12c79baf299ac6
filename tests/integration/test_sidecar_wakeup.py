"""A sidecar primary ships a commit its session saw under way on the poller's next look.

A session that reads while a transaction is voted but not finished stops
before it.  The finish flips one status byte: the file's size stays the
same, and its mtime comes from a coarse clock, so the poller's stamp need
not change.  The session asks the poller to wake it at its next look
anyway (``ChangeNotifier.recheck``), on the poller's timer rather than a
timer of its own, so that under load a look is one wake-up.  Here the
finish's mtime is set back, so only that request can ship the commit.
"""

from __future__ import annotations

import asyncio
import os

from ZODB.FileStorage import FileStorage

from tests.integration.test_fence_settle import vote_one
from tests.integration.test_replication import running_primary, running_secondary, wait_equal_tid

POLL = 0.2


def test_a_commit_seen_under_way_ships_on_the_next_look(tmp_path, tls_dir):
    path = str(tmp_path / "src.fs")
    (tmp_path / "src-blobs").mkdir()
    fs = FileStorage(path, create=True)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir, poll_interval=POLL, heartbeat_interval=30.0) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                first = await asyncio.to_thread(lambda: fs.tpc_finish(vote_one(fs, b"0")))
                await wait_equal_tid(primary, secondary, target=first, timeout=10)
                for n in range(3):
                    txn = await asyncio.to_thread(vote_one, fs, b"%d" % n)
                    # The session reads and stops at the vote.
                    primary.notifier.notify()
                    await asyncio.sleep(2 * POLL)
                    assert primary.sessions and next(iter(primary.sessions.values())).sent_tid == first
                    voted = os.stat(path)
                    first = await asyncio.to_thread(fs.tpc_finish, txn)
                    os.utime(path, ns=(voted.st_atime_ns, voted.st_mtime_ns))
                    finished = os.stat(path)
                    assert (finished.st_size, finished.st_mtime_ns) == (voted.st_size, voted.st_mtime_ns)
                    await wait_equal_tid(primary, secondary, target=first, timeout=3 * POLL + 1)

    try:
        asyncio.run(scenario())
    finally:
        fs.close()

