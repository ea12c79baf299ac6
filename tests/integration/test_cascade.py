"""Cascading: a secondary serves its own storage onward; a three-level chain stays equal to its source."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from replicator.config import Address, SecondaryConfig
from replicator.secondary import Secondary
from replicator.verify import verify
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

    asyncio.run(scenario())
    work.close()
    db.close()
    for name in ("a", "b", "c"):
        result = verify(str(tmp_path / "src.fs"), str(tmp_path / f"{name}.fs"),
                        str(tmp_path / "src-blobs"), str(tmp_path / f"{name}-blobs"))
        assert result.equal, (name, result)
        assert result.transactions > 100
