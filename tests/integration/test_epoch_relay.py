"""A secondary connected through a relay joins the relay's new epoch without a restart of its own.

A relay (a secondary serving its storage onward) changes epoch when it is
promoted or when it follows a newer primary.  A secondary that stayed in
the old epoch would, promoted in its turn, begin an epoch number that
already exists elsewhere, and fencing by epoch could no longer tell the two
primaries apart.  Real nodes, real TLS on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

import pytest

from replicator.control import call
from replicator.epoch import begin_epoch, load_epoch
from tests.helpers import free_port
from tests.integration.test_failover import commit_to, primary_on, secondary_on, until
from tests.integration.test_replication import tls


def test_a_secondary_behind_a_promoted_relay_joins_the_new_epoch(tmp_path, tls_dir, caplog):
    caplog.set_level(logging.INFO, logger="replicator.secondary")
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 5, seed=1)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, _):
                async with secondary_on(tmp_path, tls_dir, "c", b.port) as (c, _):
                    await until(lambda: c.progress.applied_tid == a.head_tid and c.progress.connected)
                    a.fence("this test's failover")  # b, still connected to a, is promoted only once a is fenced
                    promoted = await call(f"127.0.0.1:{b.port}", "POST", "/promote", tls(tls_dir, "primary"))
                    assert promoted["epoch"] == 1
                    await until(lambda: c.progress.epoch == 1 and c.progress.connected, timeout=10)
                    record = load_epoch(str(tmp_path / "c.fs")).history[-1]
                    assert (record.epoch, record.node) == (1, "b")

    asyncio.run(scenario())
    # c was told why its link closed, and that there is nothing to do.
    said = [r.getMessage() for r in caplog.records if "said goodbye (epoch)" in r.getMessage()]
    assert said and all("follows into the new epoch" in m and "check that the peer" not in m for m in said), said


def test_a_secondary_behind_a_relay_joins_the_epoch_the_relay_follows_into(tmp_path, tls_dir):
    """The relay's upstream address comes back as a newer epoch's primary (a failover there)."""
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 5, seed=2)
    # q: a standby of a that was promoted (its copy of a's history, epoch 1 begun on it).
    shutil.copy(tmp_path / "a.fs", tmp_path / "q.fs")
    shutil.copytree(tmp_path / "a-blobs", tmp_path / "q-blobs")
    port = free_port()

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(primary_on(tmp_path, tls_dir, "a", port))
            b, _ = await stack.enter_async_context(secondary_on(tmp_path, tls_dir, "b", port))
            c, _ = await stack.enter_async_context(secondary_on(tmp_path, tls_dir, "c", b.port))
            await until(lambda: c.progress.applied_tid == a.head_tid and c.progress.connected)
            await a.stop()
            begin_epoch(str(tmp_path / "q.fs"), a.head_tid, "q")
            async with primary_on(tmp_path, tls_dir, "q", port):
                await until(lambda: b.progress.epoch == 1 and b.progress.connected, timeout=15)
                await until(lambda: c.progress.epoch == 1 and c.progress.connected, timeout=10)
                assert load_epoch(str(tmp_path / "c.fs")).epoch == 1

    asyncio.run(scenario())


def test_promoting_a_node_behind_a_relay_is_refused_while_the_chain_top_takes_writes(tmp_path, tls_dir):
    """c follows the relay b, which follows the primary a: a still takes writes, so promoting c
    would make two primaries, though c's own upstream (b) is no primary."""
    from replicator.control import Refusal

    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 3, seed=81)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, _):
                async with secondary_on(tmp_path, tls_dir, "c", b.port) as (c, _):
                    await until(lambda: c.progress.applied_tid == a.head_tid and c.progress.connected)
                    with pytest.raises(Refusal, match=rf"connected \(through 127.0.0.1:{b.port}\) to the primary a "
                                                      rf"\(epoch 0\) at 127.0.0.1:{a.port} which still takes writes"):
                        await call(f"127.0.0.1:{c.port}", "POST", "/promote", tls(tls_dir, "secondary"))
                    assert not c.promoted

    asyncio.run(scenario())
