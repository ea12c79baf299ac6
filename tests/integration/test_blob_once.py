"""A blob stored twice in one transaction crosses the link once.

ZEO's server stores each blob a client commits as two data records of its oid
in the same transaction, both naming the one blob file of ``(oid, tid)``.
Shipping that file with each record sent every blob committed through ZEO
twice: twice the bytes on a WAN link, twice the writes and fsyncs on the
secondary.  The second record now goes without the file, and the replica is
the same, record for record and file for file.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

from tests.helpers import zeo_server_db
from tests.integration.test_replication import (
    assert_equal,
    running_primary,
    running_secondary,
    wait_equal_tid,
)

MiB = 1 << 20


def repeated_oids(path) -> list[int]:
    """Per transaction, how many oids have more than one record in it."""
    storage = FileStorage(str(path), read_only=True)
    try:
        return [sum(1 for n in Counter(r.oid for r in txn).values() if n > 1) for txn in storage.iterator()]
    finally:
        storage.close()


def test_a_blob_stored_twice_in_one_transaction_crosses_the_link_once(tmp_path, tls_dir):
    rng = random.Random(7)
    with zeo_server_db(tmp_path, tmp_path / "src.fs", tmp_path / "src-blobs") as db:
        with db.transaction() as conn:  # two new blobs
            for name in ("a", "b"):
                blob = conn.root()[name] = Blob()
                with blob.open("w") as fh:
                    fh.write(rng.randbytes(MiB))
        with db.transaction() as conn:  # one of them rewritten
            with conn.root()["a"].open("w") as fh:
                fh.write(rng.randbytes(MiB))
        last = db.storage.lastTransaction()
    # What this test is about: ZEO stored each blob's oid twice in its transaction.
    assert repeated_oids(tmp_path / "src.fs")[-2:] == [2, 1]

    async def scenario() -> tuple[int, int]:
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await wait_equal_tid(primary, secondary, target=last)
                return primary.bytes_sent, secondary.progress.bytes_received

    sent, received = asyncio.run(scenario())
    # Three blob files of 1 MiB, and some small records: once each, not twice.
    assert 3 * MiB <= sent < 3 * MiB + 64 * 1024, sent
    assert 3 * MiB <= received < 3 * MiB + 64 * 1024, received
    result = assert_equal(tmp_path)
    assert repeated_oids(tmp_path / "dst.fs")[-2:] == [2, 1]
    assert result.blobs == 3  # blob files compared, each once (not one per record naming it)

    async def reconnect() -> dict:
        # The secondary's Hello names its last transaction by a digest of its own copy, which
        # must be the primary's: the same history, not a fork.
        async with running_primary(tmp_path, tls_dir) as primary:
            async with running_secondary(tmp_path, tls_dir, primary.port) as (secondary, _):
                await asyncio.wait_for(until(lambda: secondary.progress.connected or primary.refusals), 30)
                await asyncio.sleep(0.3)
                return dict(primary.refusals)

    assert asyncio.run(reconnect()) == {}


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.02)
