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
