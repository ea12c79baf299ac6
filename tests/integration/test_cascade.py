"""Cascading: a secondary serves its own storage onward; a three-level chain stays equal to its source."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from replicator.config import Address, SecondaryConfig
from replicator.errors import DivergenceError
from replicator.rewind import Fork, local_tids_backwards, truncate_after
from replicator.secondary import Secondary
from replicator.status import render
from replicator.verify import verify
from tests.helpers import free_port
from tests.integration.test_failover import primary_on, secondary_on, until
from tests.integration.test_replication import make_source, running_primary, tls


@contextlib.asynccontextmanager
async def chained(tmp_path: Path, tls_dir: Path, name: str, upstream_port: int):
    config = SecondaryConfig(storage=str(tmp_path / f"{name}.fs"), blob_dir=str(tmp_path / f"{name}-blobs"),
                             primary=Address("127.0.0.1", upstream_port), listen=Address("127.0.0.1", 0),
                             tls=tls(tls_dir, "secondary"), node=name, reconnect_min=0.05, reconnect_max=0.5)
    node = Secondary(config.validate())
    await node.open()
    task = asyncio.create_task(node.run())
    try:
        yield node
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await node.close()


def test_three_level_cascade_stays_equal_under_random_workload_with_blobs(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 60, seed=3)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with chained(tmp_path, tls_dir, "a", primary.port) as a:
                async with chained(tmp_path, tls_dir, "b", a.port) as b:
                    async with chained(tmp_path, tls_dir, "c", b.port) as c:
                        for _ in range(6):
                            await asyncio.to_thread(work.commit_random, 25)
                        target = db.storage.lastTransaction()
                        for _ in range(3000):
                            if c.progress.applied_tid == target:
                                break
                            await asyncio.sleep(0.02)
                        assert (a.progress.applied_tid, b.progress.applied_tid, c.progress.applied_tid) == \
                            (target, target, target)
                        # Each level reports the level below it.
                        assert [s["node"] for s in a.status()["secondaries"]] == ["b"]
                        assert [s["node"] for s in b.status()["secondaries"]] == ["c"]
                        text = render([{**b.status(), "url": "https://b/status"}], now=time.time())
                        assert "  secondaries   1 connected\n    - c from " in text, text

    asyncio.run(scenario())
    work.close()
    db.close()
    for name in ("a", "b", "c"):
        result = verify(str(tmp_path / "src.fs"), str(tmp_path / f"{name}.fs"),
                        str(tmp_path / "src-blobs"), str(tmp_path / f"{name}-blobs"))
        assert result.equal, (name, result)
        assert result.transactions > 100


def test_a_relay_that_lost_its_tail_makes_its_secondary_wait_not_give_up(tmp_path, tls_dir):
    """s1 relays p to s3; s1 loses its last transactions, which s3 already has, and restarts.

    Until s1 has them again from p, s3 is ahead of s1 but not of the chain:
    s1 refuses it with the retryable ``behind``, and s3 resumes once s1 caught up.
    """
    db, work = make_source(tmp_path, 30, seed=5)
    port = free_port()

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir, listen=Address("127.0.0.1", port)):
            async with secondary_on(tmp_path, tls_dir, "s1", port) as (s1, _):
                async with secondary_on(tmp_path, tls_dir, "s3", s1.port) as (s3, _):
                    target = db.storage.lastTransaction()
                    await until(lambda: s3.progress.applied_tid == target)

        # s1 crashed and lost its unsynced tail: its last three transactions.
        s1_fs = str(tmp_path / "s1.fs")
        newest = list(local_tids_backwards(s1_fs))[:3]
        truncate_after(s1_fs, str(tmp_path / "s1-blobs"),
                       Fork(fork_tid=b"", orphans=len(newest), cut=newest[-1][1]), [tid for tid, _ in newest])
        await asyncio.to_thread(work.commit_random, 10)

        # p is not back yet, so s1 cannot catch up before s3 asks it.
        async with secondary_on(tmp_path, tls_dir, "s1", port) as (s1, s1_task):
            assert s1.progress.applied_tid < target
            async with secondary_on(tmp_path, tls_dir, "s3", s1.port) as (s3, s3_task):
                await until(lambda: s3_task.done() or "(behind)" in (s3.progress.last_error or ""))
                assert not s3_task.done(), s3_task.exception()
                assert "relays the history of the primary 127.0.0.1:" in (s3.progress.last_error or "")
                assert s3.progress.applied_tid == target
                # The relay counts the refusal as a primary does (status, metrics, status text).
                assert s1.status()["refusals"]["behind"] >= 1
                assert "behind (since start; this node's log names each)" in render(
                    [{**s1.status(), "url": "https://s1/status"}], time.time())
                async with running_primary(tmp_path, tls_dir, listen=Address("127.0.0.1", port)):
                    final = db.storage.lastTransaction()
                    await until(lambda: s3.progress.applied_tid == final)
                assert not s1_task.done() and not s3_task.done()

    asyncio.run(scenario())
    work.close()
    db.close()
    for name in ("s1", "s3"):
        result = verify(str(tmp_path / "src.fs"), str(tmp_path / f"{name}.fs"),
                        str(tmp_path / "src-blobs"), str(tmp_path / f"{name}-blobs"))
        assert result.equal, (name, result)


def test_a_secondary_ahead_of_the_whole_chain_is_told_so_by_the_relay(tmp_path, tls_dir):
    """s3 holds a transaction neither its relay s1 nor the chain's source p ever had.

    s1 cannot know by itself that it will never catch up with s3, so it asks
    p: p is the source and has nothing as new, so s1 refuses s3 with the
    final ``ahead`` (and the rewind advice), instead of ``behind`` for ever.
    """
    db, work = make_source(tmp_path, 20, seed=7)

    async def scenario() -> None:
        async with primary_on(tmp_path, tls_dir, "src") as p:  # with its control routes, as the CLI's
            async with secondary_on(tmp_path, tls_dir, "s1", p.port) as (s1, _):
                async with secondary_on(tmp_path, tls_dir, "s3", s1.port) as (s3, _):
                    await until(lambda: s3.progress.applied_tid == db.storage.lastTransaction())
                # A commit made on s3's storage behind the chain's back (a node that was a
                # primary for a while, say).
                await asyncio.to_thread(commit_directly, tmp_path / "s3.fs", tmp_path / "s3-blobs")
                async with secondary_on(tmp_path, tls_dir, "s3", s1.port, expect_failure=True) as (s3, task):
                    await until(lambda: task.done(), timeout=30)
                    error = task.exception()
                    assert isinstance(error, DivergenceError), error
                    assert "(ahead)" in str(error) and "the source of this chain" in str(error), error
                    # rewind takes a primary: the advice names the relay's, which the node does not follow.
                    assert f"--primary 127.0.0.1:{p.port}`, the primary of the relay 127.0.0.1:{s1.port}" \
                        in (error.hint or ""), error.hint
                assert s1.status()["refusals"] == {"ahead": 1}
                assert p.refusals == {}  # p was only asked, over HTTPS; s3 never reached it

    asyncio.run(scenario())
    work.close()
    db.close()


def commit_directly(path: Path, blob_dir: Path) -> None:
    import ZODB
    from ZODB.FileStorage import FileStorage

    db = ZODB.DB(FileStorage(str(path), blob_dir=str(blob_dir)))
    try:
        with db.transaction() as conn:
            conn.root()["behind the chain's back"] = 1
    finally:
        db.close()
