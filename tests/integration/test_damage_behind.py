"""Damage in an old transaction (here a blob file of an old revision deleted on the primary):
the secondaries already past it go on receiving new commits; one that must read it is refused,
keeps what it has, and the primary says so in its status, instead of stopping for all."""

from __future__ import annotations

import asyncio

from tests.integration.test_failover import commit_blob_to, commit_to, primary_on, secondary_on, until


def test_a_missing_old_blob_refuses_only_the_secondaries_that_must_read_it(tmp_path, tls_dir):
    a_fs, a_blobs = tmp_path / "a.fs", tmp_path / "a-blobs"
    commit_to(a_fs, a_blobs, 2, seed=51)
    commit_blob_to(a_fs, a_blobs)
    commit_to(a_fs, a_blobs, 2, seed=52)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, _):
                await until(lambda: b.progress.applied_tid == a.head_tid)
                blob_files = [p for p in a_blobs.rglob("*.blob")]
                assert blob_files
                for path in blob_files:  # lost on the primary's disk, after b got them
                    path.unlink()
                async with secondary_on(tmp_path, tls_dir, "c", a.port) as (c, c_task):
                    await until(lambda: "is missing" in (c.progress.last_error or ""), timeout=20)
                    assert not c_task.done()  # it retries: the file may be repaired
                    assert a.fatal is None
                    status = a.status()
                    assert "is missing" in (status["error"] or "") and status["refusals"]["corrupted"] >= 1
                    assert c.progress.applied_tid < a.head_tid
                    # New commits still reach b.
                    await asyncio.to_thread(commit_to, a_fs, a_blobs, 3, 53)
                    await until(lambda: b.progress.applied_tid == a.head_tid, timeout=20)
                    assert b.progress.connected

    asyncio.run(scenario())


def test_an_embedded_secondary_refused_for_good_keeps_its_status_port_to_say_so(tmp_path, tls_dir):
    """Inside a ZEO server the replica goes on being served as it is; the refusal must stay
    visible on the node's port (it used to close, and the node looked merely unreachable)."""
    from ZEO.StorageServer import StorageServer
    from ZODB.FileStorage import FileStorage

    from replicator.config import Address, SecondaryConfig
    from replicator.control import call
    from replicator.wrappers import SecondaryStorage
    from tests.integration.test_replication import tls

    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 2, seed=61)
    commit_to(tmp_path / "b.fs", tmp_path / "b-blobs", 3, seed=62)  # another history: diverged or ahead

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            replica = SecondaryStorage(FileStorage(str(tmp_path / "b.fs"), blob_dir=str(tmp_path / "b-blobs")),
                                       SecondaryConfig(storage=str(tmp_path / "b.fs"),
                                                       blob_dir=str(tmp_path / "b-blobs"),
                                                       primary=Address("127.0.0.1", a.port),
                                                       listen=Address("127.0.0.1", 0),
                                                       tls=tls(tls_dir, "secondary"), node="b").validate())
            server = await asyncio.to_thread(StorageServer, ("127.0.0.1", 0), {"1": replica})
            server.start_thread()
            try:
                await until(lambda: replica.secondary.stopped is not None, timeout=20)
                await asyncio.sleep(0.3)
                status = await call(f"127.0.0.1:{replica.secondary.port}", "GET", "/status", tls(tls_dir, "secondary"))
                assert "primary refused this secondary" in (status["error"] or ""), status
                assert replica.error is None  # the service holds instead of ending
            finally:
                await asyncio.to_thread(server.close)

    asyncio.run(scenario())


def test_a_primary_with_no_secondary_stops_when_its_file_loses_committed_transactions(tmp_path, tls_dir):
    """Truncated below what it had read, with nobody connected to meet it: exit status 3's error,
    not a head naming a transaction the file no longer has."""
    import os

    from replicator.errors import SourceRewrittenError

    commit_to(tmp_path / "a.fs", tmp_path / "a-blobs", 4, seed=91)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            os.truncate(tmp_path / "a.fs", os.path.getsize(tmp_path / "a.fs") - 10)
            await until(lambda: a.fatal is not None, timeout=10)
            assert isinstance(a.fatal, SourceRewrittenError), a.fatal

    asyncio.run(scenario())


def test_an_embedded_primary_stopped_by_damage_keeps_its_port_to_say_so(tmp_path, tls_dir):
    """A primary inside a ZEO server stopped by damage cannot exit, and its server goes on taking
    writes that no secondary receives: its port stays open, its status shows the error, and
    secondaries are refused with it (the port used to close, and the node looked unreachable)."""
    import ZODB
    from ZODB.FileStorage import FileStorage

    from replicator.config import Address, PrimaryConfig
    from replicator.control import call
    from replicator.wrappers import PrimaryStorage
    from tests.integration.test_replication import tls

    a_fs, a_blobs = tmp_path / "a.fs", tmp_path / "a-blobs"
    commit_to(a_fs, a_blobs, 2, seed=71)
    commit_blob_to(a_fs, a_blobs)  # the newest transaction has a blob ...
    for path in a_blobs.rglob("*.blob"):
        path.unlink()  # ... whose file is lost before any secondary read it
    storage = PrimaryStorage(FileStorage(str(a_fs), blob_dir=str(a_blobs)),
                             PrimaryConfig(storage=str(a_fs), listen=Address("127.0.0.1", 0),
                                           tls=tls(tls_dir, "primary"), node="a").validate())
    db = ZODB.DB(storage)

    async def scenario() -> None:
        address = f"127.0.0.1:{storage.port}"
        async with secondary_on(tmp_path, tls_dir, "b", storage.port) as (b, task):
            await until(lambda: storage.primary is not None and storage.primary.fatal is not None, timeout=20)
            await asyncio.sleep(0.3)
            status = await call(address, "GET", "/status", tls(tls_dir, "secondary"))
            assert status["role"] == "primary" and "is missing" in (status["error"] or ""), status
            # The secondary keeps what it has and retries, told why each time.
            await until(lambda: "stopped replicating" in (b.progress.last_error or ""), timeout=20)
            assert "is missing" in b.progress.last_error and not task.done()
            status = await call(address, "GET", "/status", tls(tls_dir, "secondary"))
            assert status["refusals"].get("corrupted", 0) >= 1, status
        # The server takes writes all the same (nothing stops it), and the port still answers.
        with db.transaction() as conn:
            conn.root()["after"] = 1
        status = await call(address, "GET", "/status", tls(tls_dir, "secondary"))
        assert "is missing" in (status["error"] or "")
        assert storage._service.error is None  # the service holds instead of ending

    try:
        asyncio.run(scenario())
    finally:
        db.close()


def test_an_embedded_secondary_resumes_after_a_crash_mid_commit(tmp_path, tls_dir):
    """A replica killed between a vote and its finish: ZODB then names the unfinished transaction
    as the last one.  Opened by a ZEO server's <replicated-secondary> (not by the replicator), it
    used to resume from that phantom and be refused for ever ("transaction already covered")."""
    import shutil

    from ZODB.Connection import TransactionMetaData
    from ZODB.FileStorage import FileStorage

    from replicator.config import Address, SecondaryConfig
    from replicator.wrappers import SecondaryStorage
    from tests.integration.test_replication import tls

    a_fs, b_fs, b_blobs = tmp_path / "a.fs", tmp_path / "b.fs", tmp_path / "b-blobs"
    commit_to(a_fs, tmp_path / "a-blobs", 3, seed=81)

    async def sync_b() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            async with secondary_on(tmp_path, tls_dir, "b", a.port) as (b, _):
                await until(lambda: b.progress.applied_tid == a.head_tid)

    asyncio.run(sync_b())
    storage = FileStorage(str(b_fs), blob_dir=str(b_blobs))
    last = storage.lastTransaction()
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    data, serial = storage.load(b"\0" * 8)
    storage.store(b"\0" * 8, serial, data, "", txn)
    storage.tpc_vote(txn)  # on disk with status 'c', as a kill -9 leaves it
    shutil.copyfile(b_fs, tmp_path / "crashed.fs")
    storage.tpc_abort(txn)
    storage.close()
    shutil.move(tmp_path / "crashed.fs", b_fs)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "a") as a:
            replica = SecondaryStorage(FileStorage(str(b_fs), blob_dir=str(b_blobs)),
                                       SecondaryConfig(storage=str(b_fs), blob_dir=str(b_blobs),
                                                       primary=Address("127.0.0.1", a.port),
                                                       tls=tls(tls_dir, "secondary"), node="b").validate())
            try:
                assert replica.lastTransaction() == last  # not the unfinished one
                replica.start()
                await asyncio.to_thread(commit_to, a_fs, tmp_path / "a-blobs", 2, 82)
                await until(lambda: replica.secondary.progress.applied_tid == a.head_tid, timeout=20)
                assert replica.secondary.stopped is None and replica.secondary.progress.last_error is None
            finally:
                await asyncio.to_thread(replica.close)

    asyncio.run(scenario())


def test_two_secondaries_following_each_other_are_told_it_is_a_loop(tmp_path, tls_dir):
    """A promoted node restarted with its configuration from before the promotion follows the old
    primary, which now follows it: no primary, no writes, and both looked connected and caught
    up.  One of them refuses the other, and says why."""
    from replicator.config import Address
    from tests.helpers import free_port
    from tests.integration.test_replication import running_secondary

    ports = {"b": free_port(), "c": free_port()}

    def node(name: str, follows: str):
        return running_secondary(tmp_path, tls_dir, ports[follows], name,
                                 listen=Address("127.0.0.1", ports[name]), reconnect_max=0.3)

    def told(n) -> bool:
        error = n.progress.last_error or ""
        return "follows the other" in error or "would follow the other" in error

    async def scenario() -> None:
        async with node("b", "c") as (b, _), node("c", "b") as (c, _):
            try:
                await until(lambda: told(b) or told(c), timeout=20)
            except TimeoutError:
                raise AssertionError((b.progress, c.progress)) from None
            refused = b if told(b) else c
            assert not refused.progress.connected
            await asyncio.sleep(1.0)  # it retries, and is told again: never both connected
            assert not (b.progress.connected and c.progress.connected)
            assert told(refused)

    asyncio.run(scenario())
