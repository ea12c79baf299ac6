"""An embedded primary ships a commit its session saw under way as soon as it finishes.

A session that reads while a transaction is voted but not finished stops
before it.  The sidecar looks again by itself after one poll; an embedded
primary relies on the wrapper's ``tpc_finish`` to wake it, so this checks
that the wake-up comes and ships the commit well within the slow poller's
interval (set to 30 s here, so the poller cannot be what ships it).
"""

from __future__ import annotations

import time

import pytest
from ZODB.FileStorage import FileStorage

from replicator.config import Address, PrimaryConfig, SecondaryConfig
from replicator.wrappers import PrimaryStorage, SecondaryStorage
from tests.integration.test_fence_settle import vote_one
from tests.integration.test_replication import tls


@pytest.fixture
def pair(tmp_path, tls_dir):
    base = FileStorage(str(tmp_path / "p.fs"), create=True)
    primary = PrimaryStorage(base, PrimaryConfig(
        storage=str(tmp_path / "p.fs"), listen=Address("127.0.0.1", 0), tls=tls(tls_dir, "primary"), node="p",
        poll_interval=30.0, heartbeat_interval=30.0).validate())
    secondary = SecondaryStorage(FileStorage(str(tmp_path / "s.fs"), create=True), SecondaryConfig(
        storage=str(tmp_path / "s.fs"), primary=Address("127.0.0.1", primary.port or 0),
        tls=tls(tls_dir, "secondary"), node="s", reconnect_min=0.05, reconnect_max=0.5))
    secondary.start()
    yield primary, secondary
    secondary.close()
    primary.close()


def applied(secondary: SecondaryStorage, tid: bytes, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if secondary.lastTransaction() == tid:
            return True
        time.sleep(0.01)
    return False


def test_a_commit_seen_under_way_ships_when_it_finishes(pair):
    primary, secondary = pair
    first = primary.tpc_finish(vote_one(primary, b"1"))
    assert applied(secondary, first, 10), "the secondary never caught up"
    for n in range(5):
        txn = vote_one(primary, b"%d" % n)
        primary.primary.notifier.notify_threadsafe()  # the session reads and stops at the vote
        time.sleep(0.1)
        assert primary.status()["secondaries"][0]["sent_tid"] == first.hex()
        first = primary.tpc_finish(txn)
        assert applied(secondary, first, 2.0), f"commit {n}, finished after the session saw it under way, " \
                                               "was not shipped within 2 s"
