"""A secondary whose fsync fails: it stops instead of retrying, acknowledges nothing past the last
good fsync, and its next start cuts the file back and fetches the rest again.

Linux reports a failed write-back to one fsync only and may drop the pages:
an fsync retried after a failure succeeds over data that never reached the
disk, and a secondary that then acknowledged it would break its promise to
a synchronous primary. No disk here fails on demand (no device mapper), so
``os.fsync`` fails once for the secondary's Data.fs, as such a disk does;
everything else is real (a primary and a secondary over mutual TLS).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import pytest

from replicator.errors import DurabilityError
from replicator.storage import UNSYNCED_SUFFIX
from tests.helpers import until
from tests.integration.test_replication import (
    assert_equal,
    make_source,
    running_primary,
    running_secondary,
    wait_equal_tid,
)


def test_a_failed_fsync_stops_the_secondary_and_its_next_start_fetches_the_tail_again(tmp_path, tls_dir,
                                                                                     monkeypatch, caplog):
    db, work = make_source(tmp_path, 40)
    datafs = tmp_path / "dst.fs"
    real_fsync, failed = os.fsync, []

    def fsync(fd: int) -> None:
        if failed == [] and os.path.exists(datafs) and os.path.samestat(os.fstat(fd), os.stat(datafs)):
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    async def scenario() -> None:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port, expect_failure=True) as (secondary, task):
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                durable = db.storage.lastTransaction()
                await until(lambda: primary.acked_by_node.get("dst") == durable, timeout=10, what="the ack")
                size = datafs.stat().st_size
                monkeypatch.setattr(os, "fsync", fsync)
                work.commit_random(10)
                with pytest.raises(DurabilityError) as caught:
                    await asyncio.wait_for(asyncio.shield(task), 30)  # not retried
                monkeypatch.undo()
                assert failed and f"past byte {size}" in str(caught.value)
                assert datafs.stat().st_size > size  # what was applied past it is in the file
                await asyncio.sleep(0.5)
                assert primary.acked_by_node["dst"] == durable  # and was never acknowledged
                assert (tmp_path / f"dst.fs{UNSYNCED_SUFFIX}").exists()
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                assert datafs.stat().st_size == size  # cut back before it opened
                await wait_equal_tid(primary, secondary, target=db.storage.lastTransaction())
                assert not (tmp_path / f"dst.fs{UNSYNCED_SUFFIX}").exists()

    with caplog.at_level(logging.WARNING, logger="replicator"):
        asyncio.run(scenario())
    work.close()
    db.close()
    assert assert_equal(tmp_path).transactions > 40
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "Input/output error" in critical[0], critical
    assert "cut back to byte" in caplog.text
    retried = [r for r in caplog.records if r.name == "replicator.secondary"
               and r.getMessage().startswith("local storage failed")]
    assert not retried  # stopped, not retried
