"""A primary slow to answer a Hello is waited for, not taken for a dead link.

After a pack, placing a secondary that was away means scanning the file
the pack replaced, which takes minutes on a big storage; the secondary used
to give up after its idle timeout (15 s), reconnect, and have the primary
start over. Generating a storage that big is not practical here, so the
real Primary's placement step is slowed by a few seconds against an idle
timeout of one; everything else (TLS, WebSocket, storages) is real.
"""

from __future__ import annotations

import asyncio
import logging

from replicator.config import Address, PrimaryConfig
from replicator.primary import Primary
from tests.integration.test_replication import (
    assert_equal,
    make_source,
    running_secondary,
    tls,
    wait_equal_tid,
)


class SlowToPlace(Primary):
    """A primary whose handshake takes ``delay`` seconds, as a long ``Data.fs.old`` scan does."""

    delay = 3.0
    placed = 0

    async def _position(self, tailer, hello, database):
        await asyncio.sleep(self.delay)
        self.placed += 1
        return await super()._position(tailer, hello, database)


def test_a_primary_slow_to_answer_the_hello_is_waited_for(tmp_path, tls_dir, caplog):
    db, work = make_source(tmp_path, 10)

    async def scenario() -> None:
        config = PrimaryConfig(storage=str(tmp_path / "src.fs"), blob_dir=str(tmp_path / "src-blobs"),
                               listen=Address("127.0.0.1", 0), tls=tls(tls_dir, "primary"), node="p",
                               heartbeat_interval=0.2).validate()
        primary = SlowToPlace(config)
        await primary.start()
        try:
            async with running_secondary(tmp_path, tls_dir, primary.port, idle_timeout=1.0) as (secondary, _):
                await wait_equal_tid(primary, secondary, timeout=30, target=db.storage.lastTransaction())
                assert secondary.link_log.failures == 0 and secondary.link_log.down_since is None
                assert primary.placed == 1  # one handshake, not one per idle timeout
        finally:
            await primary.stop()

    with caplog.at_level(logging.INFO, logger="replicator"):
        try:
            asyncio.run(scenario())
        finally:
            work.close()
            db.close()
    assert any("still working on its answer to our Hello" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "reconnecting" in r.getMessage()]
    assert_equal(tmp_path)
