"""Backups taken from a replica (repozo) while it follows: restored, they hold the primary's data.

A real Primary and Secondary over TLS; ZODB's own ``repozo`` run as a
separate process on the replica's Data.fs while the secondary writes it,
a full backup during the catch-up, incremental ones after more commits;
the restored file with a copy of the replica's blob directory verifies
equal to the primary's storage.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

from replicator.verify import format_result, verify
from tests.integration.test_replication import make_source, running_primary, running_secondary, wait_equal_tid

REPOZO = str(Path(sys.executable).parent / "repozo")


def repozo(*args: str) -> None:
    if "-B" in args:
        # repozo names its files by the second: a second backup within one would collide.
        time.sleep(1.05 - time.time() % 1)
    result = subprocess.run([REPOZO, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_repozo_backs_up_a_replica_while_it_follows(tmp_path, tls_dir):
    db, work = make_source(tmp_path, 150)
    repository = tmp_path / "backups"
    repository.mkdir()
    replica = str(tmp_path / "dst.fs")

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary, \
                running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
            # A full backup while the secondary is still catching up: whatever it holds then.
            while secondary.progress.txns_applied == 0:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(repozo, "-B", "-F", "-r", str(repository), "-f", replica)
            for _ in range(2):  # incremental ones, while commits go on
                await asyncio.to_thread(work.commit_random, 20)
                await asyncio.to_thread(repozo, "-B", "-r", str(repository), "-f", replica)
            await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
            await asyncio.to_thread(repozo, "-B", "-r", str(repository), "-f", replica)
            # repozo copies Data.fs only: the blob files are copied beside it (cp -a, rsync).
            shutil.copytree(tmp_path / "dst-blobs", tmp_path / "restored-blobs")

    try:
        asyncio.run(scenario())
    finally:
        work.close()
        db.close()
    assert len(list(repository.glob("*.deltafs"))) >= 1, list(repository.iterdir())
    repozo("-R", "-r", str(repository), "-o", str(tmp_path / "restored.fs"))
    result = verify(str(tmp_path / "src.fs"), str(tmp_path / "restored.fs"), str(tmp_path / "src-blobs"),
                    str(tmp_path / "restored-blobs"))
    assert result.equal, format_result(result)


def test_a_secondary_seeded_from_a_backup_fetches_only_what_came_after(tmp_path, tls_dir):
    """The way to start a disaster-recovery site of a big database over a slow link: restore a
    backup there (shipped on a disk), and the secondary resumes from the backup's last transaction
    instead of pulling the whole history through the link."""
    db, work = make_source(tmp_path, 120)
    repository = tmp_path / "backups"
    repository.mkdir()
    repozo("-B", "-F", "-r", str(repository), "-f", str(tmp_path / "src.fs"))
    shutil.copytree(tmp_path / "src-blobs", tmp_path / "shipped-blobs")  # the blobs travel beside it
    seeded = db.storage.lastTransaction()
    work.commit_random(30)  # the primary goes on meanwhile
    after = [t.tid for t in db.storage.iterator() if t.tid > seeded]
    assert len(after) >= 20
    repozo("-R", "-r", str(repository), "-o", str(tmp_path / "dst.fs"))
    shutil.copytree(tmp_path / "shipped-blobs", tmp_path / "dst-blobs")

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary, \
                running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
            await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
            assert secondary.progress.txns_applied == len(after)
            [peer] = primary.status()["secondaries"]
            assert peer["transactions_sent"] == len(after), peer  # nothing of what the backup held

    try:
        asyncio.run(scenario())
    finally:
        work.close()
        db.close()
    result = verify(str(tmp_path / "src.fs"), str(tmp_path / "dst.fs"), str(tmp_path / "src-blobs"),
                    str(tmp_path / "dst-blobs"))
    assert result.equal, format_result(result)
