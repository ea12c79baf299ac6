"""A secondary killed while a transaction is kept open leaves no blob file behind.

Cut off by a broken link, a big transaction stays open in the secondary's
storage until the link is back, which may take hours; its complete blob
files meanwhile lie in the blob directory under their final names.  A
real ``replicator secondary`` process is killed (SIGKILL) in that state;
the next process on the storage (its own next start, or a primary's after
a failover) removes those files, which no committed transaction refers
to; then the transaction is fetched whole.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from replicator.applier import OPEN_MANIFEST, Applier
from replicator.storage import open_file_storage
from tests.helpers import start_secondary, until
from tests.integration.test_replication import (
    assert_equal,
    running_primary,
    running_secondary,
    wait_equal_tid,
)
from tests.integration.test_resume import (
    BLOB_SIZES,
    MB,
    breaking_proxy,
    make_source,
    start_primary_on_replica,
)


@pytest.mark.parametrize("next_start", ["secondary", "primary"])
def test_a_secondary_killed_while_a_transaction_is_kept_open_leaves_no_blob_file_behind(tmp_path: Path, tls_dir,
                                                                                       caplog, next_start):
    """The next start is the secondary's own, or a primary's on its storage (a failover)."""
    make_source(tmp_path)
    blobs = tmp_path / "dst-blobs"
    manifest = blobs / "tmp" / OPEN_MANIFEST

    def placed() -> list[Path]:
        """Blob files under their final names."""
        return sorted(path for path in blobs.rglob("*.blob"))

    async def scenario() -> list[Path]:
        async with running_primary(tmp_path, tls_dir) as primary:
            # One connection, cut once the first blob is complete and 2 MB of the second came;
            # then the link stays down.
            async with breaking_proxy(primary.port, BLOB_SIZES[0] + 2 * MB, connections=1) as (port, _):
                proc = start_secondary(tmp_path, tmp_path / "dst.fs", blobs, port, tls_dir)
                try:
                    await until(lambda: "open: " in proc.output(), timeout=30,
                                what="the secondary to keep the transaction open")
                    proc.kill9()
                finally:
                    proc.stop()
            orphans = placed()
            assert len(orphans) == 1 and manifest.exists(), proc.output()
            with caplog.at_level(logging.WARNING, logger="replicator"):
                if next_start == "secondary":  # what it does first, on opening the storage
                    storage = open_file_storage(str(tmp_path / "dst.fs"), str(blobs))
                    try:
                        Applier(storage).close()
                    finally:
                        storage.close()
                else:
                    await start_primary_on_replica(tmp_path, tls_dir)
            assert placed() == [] and not manifest.exists()
            async with running_secondary(tmp_path, tls_dir, primary.port) as (node, _):
                await wait_equal_tid(primary, node)
            return orphans

    orphans = asyncio.run(scenario())
    assert "removed 1 blob file(s) of transaction" in caplog.text
    assert len(placed()) == len(BLOB_SIZES) and orphans[0] in placed()  # committed there now
    assert not manifest.exists()
    assert_equal(tmp_path)
