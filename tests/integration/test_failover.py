"""Failover building blocks in one process: promotion, epochs, fencing a stale primary, fork and rewind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import ZODB
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError

from replicator.config import Address, PrimaryConfig, SecondaryConfig
from replicator.control import Refusal, call, primary_routes
from replicator.epoch import adopt_epoch, begin_epoch, load_epoch
from replicator.errors import ConfigError, DivergenceError, UsageError
from replicator.primary import Primary
from replicator.rewind import rewind_node
from replicator.secondary import Secondary
from replicator.tailer import Tailer
from replicator.verify import verify
from replicator.wrappers import PrimaryStorage
from tests.helpers import Workload
from tests.integration.test_replication import make_source, tls

Z64 = b"\0" * 8


@contextlib.asynccontextmanager
async def primary_on(tmp_path: Path, tls_dir: Path, name: str, port: int = 0):
    fs, blobs = str(tmp_path / f"{name}.fs"), str(tmp_path / f"{name}-blobs")
    config = PrimaryConfig(storage=fs, blob_dir=blobs, listen=Address("127.0.0.1", port),
                           tls=tls(tls_dir, "primary"), node=name, heartbeat_interval=0.2).validate()
    server = Primary(config, routes=primary_routes(lambda: server, lambda: Tailer(fs, blobs).open()))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def secondary_on(tmp_path: Path, tls_dir: Path, name: str, port: int, expect_failure: bool = False,
                       node: str | None = None):
    """A secondary on ``name``.fs, named ``node`` (default ``name``), following 127.0.0.1:``port``."""
    config = SecondaryConfig(storage=str(tmp_path / f"{name}.fs"), blob_dir=str(tmp_path / f"{name}-blobs"),
                             primary=Address("127.0.0.1", port), listen=Address("127.0.0.1", 0),
                             tls=tls(tls_dir, "secondary"), node=node or name, reconnect_min=0.05,
                             reconnect_max=0.3).validate()
    node = Secondary(config)
    await node.open()
    task = asyncio.create_task(node.run())
    try:
        yield node, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await node.close()


async def until(predicate, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not reached")


@contextlib.asynccontextmanager
async def b_in_step_with_a(tmp_path: Path, tls_dir: Path):
    """Primary ``a`` and its secondary ``b``, once b has applied all of a's transactions: ``(a, b, b's task)``."""
    async with primary_on(tmp_path, tls_dir, "a") as a:
        async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, task):
            await until(lambda: b.progress.applied_tid == a.head_tid and a.head_tid != Z64)
            yield a, b, task


def commit_blob_to(path: Path, blobs: Path) -> None:
    from ZODB.blob import Blob

    db = ZODB.DB(FileStorage(str(path), blob_dir=str(blobs)))
    with db.transaction() as conn:
        conn.root()["orphan blob"] = blob = Blob()
        with blob.open("w") as f:
            f.write(b"kept with the orphans")
    db.close()


def commit_to(path: Path, blobs: Path, n: int, seed: int) -> None:
    db = ZODB.DB(FileStorage(str(path), blob_dir=str(blobs)))
    work = Workload(db, seed=seed)
    work.commit_random(n)
    work.close()
    db.close()


def make_a(tmp_path: Path, transactions: int, seed: int) -> None:
    """Node a's storage (``a.fs``, ``a-blobs``) with ``transactions`` generated ones."""
    db, work = make_source(tmp_path, transactions, seed=seed)
    work.close()
    db.close()
    for suffix in ("fs", "fs.index"):
        src = tmp_path / f"src.{suffix}"
        if src.exists():
            src.rename(tmp_path / f"a.{suffix}")
    (tmp_path / "src-blobs").rename(tmp_path / "a-blobs")


def test_promotion_epochs_fencing_fork_and_rewind(tmp_path, tls_dir):
    """A primary "a" and its secondary "b"; b is promoted; a comes back with orphans and is rewound."""
    make_a(tmp_path, 40, seed=21)
    t = tls(tls_dir, "secondary")

    async def scenario() -> None:
        async with b_in_step_with_a(tmp_path, tls_dir) as (a, b, b_task):
            # a still takes writes, and b is connected to it: promoting b would make two primaries.
            with pytest.raises(Refusal, match=r"HTTP 409\): not promoted: this node is connected to the "
                                              r"primary a \(epoch 0\) at 127.0.0.1:\d+ which still takes "
                                              "writes") as refused:
                await call(f"127.0.0.1:{b.port}", "POST", "/promote", t)
            assert "promote with --force" in str(refused.value)
            assert not b.promoted and b.progress.connected
            # Unless forced (a is about to go away, say).
            promoted = await call(f"127.0.0.1:{b.port}", "POST", "/promote?force=1", t)
            assert promoted["role"] == "primary" and promoted["epoch"] == 1
            assert promoted["last_tid"] == a.head_tid.hex()
            await asyncio.wait_for(b_task, 10)  # it stopped following
            # Promoting it again is harmless, but says so when fenced (it would not take writes).
            assert (await call(f"127.0.0.1:{b.port}", "POST", "/promote", t))["epoch"] == 1
            b.downstream.fence("this test")
            with pytest.raises(Refusal, match="already the primary of epoch 1, and fenced"):
                await call(f"127.0.0.1:{b.port}", "POST", "/promote", t)
            b.downstream.unfence()
            assert load_epoch(str(tmp_path / "b.fs")).epoch == 1

            # c follows the new primary b and joins epoch 1 ...
            async with secondary_on(tmp_path, tls_dir, "c", b.port) as (c, _):
                await until(lambda: c.progress.applied_tid == b.progress.applied_tid and c.progress.epoch == 1)
            assert load_epoch(str(tmp_path / "c.fs")).epoch == 1
            # ... and never follows the stale primary a; a learns it was superseded.
            async with secondary_on(tmp_path, tls_dir, "c", a.port, expect_failure=True) as (_, c_task):
                with pytest.raises(DivergenceError, match="stale"):
                    await asyncio.wait_for(c_task, 10)
            assert a.stale and not a.writable
            status = await call(f"127.0.0.1:{a.port}", "GET", "/status", t)
            assert status["stale"] is True and status["fenced"]

    asyncio.run(scenario())

    # Meanwhile a had committed transactions b never got (orphans), and b, the new primary, went on.
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 6, seed=22)
    commit_blob_to(tmp_path / "a.fs", tmp_path / "a-blobs")  # so that one orphan surely has a blob
    commit_to(tmp_path / "b.fs", tmp_path / "b-blobs", 9, seed=23)
    a_before = [t.tid for t in FileStorage(str(tmp_path / "a.fs"), read_only=True).iterator()]

    async def come_back() -> None:
        async with primary_on(tmp_path, tls_dir, "b") as b:
            assert b.epoch == 1
            # a, as a secondary of b, is refused: its history forks.
            async with secondary_on(tmp_path, tls_dir, "a", b.port, expect_failure=True) as (_, task):
                with pytest.raises(DivergenceError) as info:
                    await asyncio.wait_for(task, 10)
            assert "histories fork after" in str(info.value)
            assert "this node has 7 transaction(s)" in str(info.value)
            assert "replicator rewind" in str(info.value)
            # Aimed at a secondary of b, rewind refuses before it reads or changes anything.
            async with secondary_on(tmp_path, tls_dir, "c", b.port) as (c, _):
                await until(lambda: c.progress.applied_tid == b.head_tid)
                for dry_run in (True, False):
                    with pytest.raises(UsageError, match="is not a primary: it is a secondary c following") as no:
                        await rewind_node(str(tmp_path / "a.fs"), str(tmp_path / "a-blobs"), f"127.0.0.1:{c.port}",
                                          t, False, dry_run=dry_run)
                    assert no.value.hint == f"give --primary 127.0.0.1:{b.port}, the node it follows, if that is " \
                                            "the new primary"
            assert [t.tid for t in FileStorage(str(tmp_path / "a.fs"), read_only=True).iterator()] == a_before
            # Without the blob directory the orphans' blobs would be lost: refused, dry or not.
            for dry_run in (True, False):
                with pytest.raises(ConfigError, match=r"give --blob-dir"):
                    await rewind_node(str(tmp_path / "a.fs"), None, f"127.0.0.1:{b.port}", t, False,
                                      dry_run=dry_run)
            dry = await rewind_node(str(tmp_path / "a.fs"), str(tmp_path / "a-blobs"), f"127.0.0.1:{b.port}",
                                    t, False, dry_run=True)
            assert "this node has 7 transaction(s)" in dry and "Without --dry-run they would be saved to" in dry
            assert [t.tid for t in FileStorage(str(tmp_path / "a.fs"), read_only=True).iterator()] == a_before
            # Rewind: saves the 7 orphans, truncates a, which then follows b and ends equal.
            report = await rewind_node(str(tmp_path / "a.fs"), str(tmp_path / "a-blobs"), f"127.0.0.1:{b.port}",
                                       t, False)
            assert "7 transaction(s)" in report
            async with secondary_on(tmp_path, tls_dir, "a", b.port) as (a, _):
                await until(lambda: a.progress.applied_tid == b.head_tid)

    asyncio.run(come_back())
    result = verify(str(tmp_path / "a.fs"), str(tmp_path / "b.fs"), str(tmp_path / "a-blobs"),
                    str(tmp_path / "b-blobs"))
    assert result.equal, result
    saved = list(tmp_path.glob("a.fs.orphans-*"))
    saved_fs = [p for p in saved if not p.name.endswith((".blobs", ".index"))]
    assert len(saved_fs) == 1, saved  # no lock or temporary file left beside it
    orphans = [t.tid for t in FileStorage(str(saved_fs[0]), read_only=True).iterator()]
    assert orphans == a_before[-7:]


def test_promotion_tells_a_former_primary_it_can_reach_or_says_it_could_not(tmp_path, tls_dir):
    """Not connected to its primary when promoted (the failover promote is for), a node still tries
    to tell it of the new epoch; when it cannot, the answer says so, for promote to warn."""
    make_a(tmp_path, 5, seed=31)
    t = tls(tls_dir, "secondary")

    async def scenario() -> None:
        async with b_in_step_with_a(tmp_path, tls_dir) as (a, b, _):
            await b.stop_following()  # a link that broke: a is still there, b no longer connected
            assert not b.progress.connected
            promoted = await call(f"127.0.0.1:{b.port}", "POST", "/promote", t)
            assert promoted["epoch"] == 1
            assert promoted["former_primary"] == {"address": f"127.0.0.1:{a.port}", "told": True,
                                                  "detail": "it takes no writes any more"}
            assert a.stale and not a.writable
            port = a.port
        # a gone: c, which followed it, is promoted all the same, and says a was not told.
        async with primary_on(tmp_path, tls_dir, "b") as b:
            async with secondary_on(tmp_path, tls_dir, "c", b.port) as (c, _):
                await until(lambda: c.progress.applied_tid == b.head_tid and c.progress.epoch == 1)
                b_port = b.port
                await b.stop()
                await until(lambda: not c.progress.connected)
                promoted = await call(f"127.0.0.1:{c.port}", "POST", "/promote", t)
                assert promoted["epoch"] == 2
                former = promoted["former_primary"]
                assert former["address"] == f"127.0.0.1:{b_port}" and former["told"] is False, former
                assert "did not answer as a primary" in former["detail"], former
        assert port != b_port

    asyncio.run(scenario())


def test_a_node_that_followed_another_nodes_epoch_does_not_start_as_a_primary(tmp_path, tls_dir):
    """After a switchover the old primary follows the standby's epoch; restarted as a primary
    by mistake (its configuration unchanged), it must not take writes: that would fork the
    history with no epoch to fence either side."""
    x_fs, x_blobs = tmp_path / "x.fs", tmp_path / "x-blobs"
    commit_to(x_fs, x_blobs, 3, seed=31)
    adopt_epoch(str(x_fs), 1, "standby")  # as x did when it followed the promoted standby
    t = tls(tls_dir, "secondary")

    async def sidecar() -> None:
        async with primary_on(tmp_path, tls_dir, "x") as x:
            assert x.stale and not x.writable
            status = await call(f"127.0.0.1:{x.port}", "GET", "/status", t)
            assert status["stale"] is True and "following node 'standby'" in status["fenced"]
            # It streams to nobody: a secondary is refused, told why, and keeps its storage.
            async with secondary_on(tmp_path, tls_dir, "c", x.port, expect_failure=True) as (_, task):
                with pytest.raises(DivergenceError) as info:
                    await asyncio.wait_for(task, 10)
            assert "following node 'standby'" in str(info.value)
            assert "storage is intact" in info.value.hint and "start it anew" not in info.value.hint

    asyncio.run(sidecar())

    # Embedded in a ZEO server: read-only from the start, writes refused with the reason.
    config = PrimaryConfig(storage=str(x_fs), blob_dir=str(x_blobs), listen=Address("127.0.0.1", 0),
                           tls=tls(tls_dir, "primary"), node="x").validate()
    storage = PrimaryStorage(FileStorage(str(x_fs), blob_dir=str(x_blobs)), config)
    try:
        assert storage.isReadOnly()
        with pytest.raises(ReadOnlyError, match="following node 'standby'"):
            storage.tpc_begin(TransactionMetaData())
    finally:
        storage.close()

    # The node that began the epoch itself (a promoted standby) is a primary as before.
    y_fs, y_blobs = tmp_path / "y.fs", tmp_path / "y-blobs"
    commit_to(y_fs, y_blobs, 3, seed=32)
    begin_epoch(str(y_fs), Z64, "y")
    config = dataclasses.replace(config, storage=str(y_fs), blob_dir=str(y_blobs), node="y")
    storage = PrimaryStorage(FileStorage(str(y_fs), blob_dir=str(y_blobs)), config)
    try:
        assert not storage.isReadOnly()
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()["after"] = 1
        db.close()
    finally:
        storage.close()


def test_a_promoted_node_restarted_as_a_secondary_is_told_it_is_the_primary(tmp_path, tls_dir):
    """After a promotion the roles must be made lasting in the configurations; a promoted node
    restarted with its old one follows the old primary again, and nothing took writes.  The
    refusal now says that this node is the primary, not only to follow the current one."""
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 4, seed=47)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, _):
                await until(lambda: b.progress.applied_tid == a.head_tid and b.progress.connected)
            begin_epoch(str(tmp_path / "b.fs"), a.head_tid, "b")  # b was promoted, then stopped
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, task):
                with pytest.raises(DivergenceError) as info:
                    await asyncio.wait_for(task, 10)
        assert "(stale)" in str(info.value)
        assert "this node (b) began epoch 1 itself" in info.value.hint, info.value.hint
        assert "Start it as the primary" in info.value.hint

    asyncio.run(scenario())


def test_a_promoted_node_restarted_to_follow_a_node_that_follows_it_is_told_it_is_the_primary(
        tmp_path, tls_dir, caplog):
    """The same after a switchover: the old primary follows the promoted node now, so the promoted
    node, restarted with its old configuration, is refused as a loop, and retries for ever."""
    commit_to(tmp_path / "b.fs", tmp_path / "b-blobs", 4, seed=48)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "b") as b:  # b, promoted, was the primary
            # a, the old primary, follows b (and serves its own port, as a relay).
            async with secondary_on(tmp_path, tls_dir, "a", b.port) as (a, _):
                await until(lambda: a.progress.applied_tid == b.head_tid and a.progress.connected)
                shutil.copy(tmp_path / "b.fs", tmp_path / "b2.fs")
                shutil.copytree(tmp_path / "b-blobs", tmp_path / "b2-blobs")
                begin_epoch(str(tmp_path / "b2.fs"), b.head_tid, "b")
                # b, restarted with its configuration from before the switchover, follows a.
                async with secondary_on(tmp_path, tls_dir, "b2", a.port, node="b") as (b2, task):
                    await until(lambda: b2.progress.last_error is not None)
                    error = b2.progress.last_error
                    assert not task.done()  # refused, retrying: someone may fix the other node
        assert "(loop)" in error and "this node (b) began epoch 1 itself" in error, error

    with caplog.at_level(logging.INFO, logger="replicator"):
        asyncio.run(scenario())


def test_a_secondary_of_epoch_0_started_as_a_primary_takes_no_writes(tmp_path, tls_dir, caplog):
    """No promotion ever happened, and the replica is started as a primary beside the real one
    (a configuration copied by mistake): it refuses, as it followed the real primary."""
    db, work = make_source(tmp_path, 10, seed=41)
    work.close()
    db.close()
    for suffix in ("fs", "fs.index"):
        if (tmp_path / f"src.{suffix}").exists():
            (tmp_path / f"src.{suffix}").rename(tmp_path / f"a.{suffix}")
    (tmp_path / "src-blobs").rename(tmp_path / "a-blobs")

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            assert not a.stale
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, _):
                await until(lambda: b.progress.applied_tid == a.head_tid and a.head_tid != Z64)
        assert [(r.epoch, r.node) for r in load_epoch(str(tmp_path / "b.fs")).history] == [(0, "a")]
        async with primary_on(tmp_path, tls_dir, "b") as b_as_primary:
            assert b_as_primary.stale and "following node 'a'" in b_as_primary.stale_reason
        async with primary_on(tmp_path, tls_dir, "a") as a:  # the real primary is as it was
            assert a.writable

    asyncio.run(scenario())
    assert "Configure it as a secondary of a " in caplog.text
    assert "old name" not in caplog.text  # it followed 'a'; it was never 'a'


def test_a_renamed_primary_is_told_the_name_it_began_its_epoch_under(tmp_path, tls_dir, caplog):
    commit_to(tmp_path / "r.fs", tmp_path / "r-blobs", 2, seed=51)
    begin_epoch(str(tmp_path / "r.fs"), Z64, "old-name")

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "r") as r:
            assert r.stale and "was begun by node 'old-name'" in r.stale_reason

    asyncio.run(scenario())
    assert "give it its old name again ('old-name')" in caplog.text


def test_rewind_refuses_a_primary_of_an_older_epoch(tmp_path, tls_dir):
    """Aimed by mistake at a superseded primary (it came back, say, at epoch 0), rewind would cut
    away the newer epochs this node holds: refused, the storage untouched."""
    commit_to(tmp_path / "old.fs", tmp_path / "old-blobs", 3, seed=41)
    commit_to(tmp_path / "node.fs", tmp_path / "node-blobs", 5, seed=42)
    adopt_epoch(str(tmp_path / "node.fs"), 2, "current")
    before = (tmp_path / "node.fs").read_bytes()
    t = tls(tls_dir, "secondary")

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "old") as old:
            assert old.epoch == 0
            for dry_run in (True, False):
                with pytest.raises(UsageError, match="at epoch 2: that primary was superseded, and rewinding to "
                                                     "it would cut away this node's history of epoch 1 to 2"):
                    await rewind_node(str(tmp_path / "node.fs"), str(tmp_path / "node-blobs"),
                                      f"127.0.0.1:{old.port}", t, False, dry_run=dry_run)

    asyncio.run(scenario())
    assert (tmp_path / "node.fs").read_bytes() == before


def test_rewind_without_blob_dir_does_not_take_a_node_in_step_for_a_diverged_one(tmp_path, tls_dir):
    """Blob files are part of a transaction's identity: without --blob-dir a node in step with
    its primary was told its history forked, with made-up orphans.  Now it is told to give it."""
    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 2, seed=71)
    commit_blob_to(tmp_path / "a.fs", tmp_path / "a-blobs")  # the newest transaction has a blob
    t = tls(tls_dir, "secondary")

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, _):
                await until(lambda: b.progress.applied_tid == a.head_tid)
            with pytest.raises(ConfigError, match="has blob records: give --blob-dir"):
                await rewind_node(str(tmp_path / "b.fs"), None, f"127.0.0.1:{a.port}", t, False, dry_run=True)
            report = await rewind_node(str(tmp_path / "b.fs"), str(tmp_path / "b-blobs"), f"127.0.0.1:{a.port}",
                                       t, False, dry_run=True)
            assert report.startswith("no fork"), report

    asyncio.run(scenario())


def test_a_node_promoted_after_a_refusal_reports_no_error(tmp_path, tls_dir):
    """Inside a ZEO server a refused replica holds, saying why; promoted then, that reason is
    over: its status and metrics must not go on reporting an error (an alert that never clears)."""
    import shutil

    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 3, seed=95)
    shutil.copy(tmp_path / "a.fs", tmp_path / "b.fs")
    shutil.copytree(tmp_path / "a-blobs", tmp_path / "b-blobs")
    commit_to(tmp_path / "b.fs", tmp_path / "b-blobs", 2, seed=96)  # b holds what a never had
    operator = tls(tls_dir, "primary")

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            a.fence("this test's failover")
            config = SecondaryConfig(storage=str(tmp_path / "b.fs"), blob_dir=str(tmp_path / "b-blobs"),
                                     primary=Address("127.0.0.1", a.port), listen=Address("127.0.0.1", 0),
                                     tls=tls(tls_dir, "secondary"), node="b", reconnect_min=0.05,
                                     reconnect_max=0.3).validate()
            b = Secondary(config)
            task = asyncio.create_task(b.serve(hold=True))
            try:
                await until(lambda: b.stopped is not None)
                address = f"127.0.0.1:{b.port}"
                held = await call(address, "GET", "/status", operator)
                assert "ahead" in held["error"] and held["last_error"]
                await call(address, "POST", "/promote", operator)
                status = await call(address, "GET", "/status", operator)
                assert status["role"] == "primary"
                assert status["error"] is None and status["last_error"] is None, status
                from tests.integration.test_metrics import scrape, value

                assert value(await scrape(b.port, tls_dir), "replicator_error") == 0
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                await b.close()

    asyncio.run(scenario())


def test_a_former_primary_that_comes_back_after_the_promotion_is_told_then(tmp_path, tls_dir, caplog):
    """Promoted while its former primary was down, a node keeps trying its address: restarted
    there with its old configuration, the former primary is fenced for good within seconds,
    instead of taking commits beside the new one until someone notices."""
    caplog.set_level(logging.INFO, logger="replicator.control")
    make_a(tmp_path, 4, seed=33)
    t = tls(tls_dir, "secondary")

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            port = a.port
            async with secondary_on(tmp_path, tls_dir, "b", port) as (b, _):
                await until(lambda: b.progress.applied_tid == a.head_tid and a.head_tid != Z64)
                await a.stop()
                await until(lambda: not b.progress.connected)
                promoted = await call(f"127.0.0.1:{b.port}", "POST", "/promote", t)
                assert promoted["former_primary"]["told"] is False
                await asyncio.sleep(1.5)  # a try or two while it is down
                async with primary_on(tmp_path, tls_dir, "a", port) as again:
                    assert again.writable and not again.stale  # its old configuration, at epoch 0
                    await until(lambda: again.stale, timeout=20)
                    assert not again.writable
                status = await call(f"127.0.0.1:{b.port}", "GET", "/status", t)
                assert status["role"] == "primary" and status["epoch"] == 1

    asyncio.run(scenario())
    told = [r.getMessage() for r in caplog.records if "came back and was told of epoch 1" in r.getMessage()]
    assert len(told) == 1, told


def test_a_secondary_promoted_while_connected_says_goodbye_to_its_primary(tmp_path, tls_dir, caplog):
    """A switchover promotes the standby while it still follows the fenced primary: the primary's
    log must tell that planned end (INFO, naming the promotion) from a secondary it lost (WARNING)."""
    caplog.set_level(logging.INFO, logger="replicator.primary")
    make_a(tmp_path, 3, seed=35)
    t = tls(tls_dir, "secondary")

    async def scenario() -> None:
        async with b_in_step_with_a(tmp_path, tls_dir) as (a, b, _):
            a.fence("switchover")
            promoted = await call(f"127.0.0.1:{b.port}", "POST", "/promote", t)
            assert promoted["epoch"] == 1
            await until(lambda: not a.sessions)

    asyncio.run(scenario())
    ended = [r for r in caplog.records if "session with secondary b " in r.getMessage()]
    assert len(ended) == 1, [r.getMessage() for r in ended]
    assert ended[0].levelno == logging.INFO
    assert "said goodbye (shutdown): secondary stopping to be promoted" in ended[0].getMessage()
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "secondar" in r.getMessage()]
    assert not lost, lost
