"""The storage wrappers in one process: configured through ZConfig, used by ``ZODB.DB``, real TLS.

``tests/system/test_zeo_serving.py`` runs the same wrappers inside ``runzeo``
processes; here the wrappers' own contracts are checked up close: the
interfaces they declare, writes refused on a replica, invalidations before
``lastTransaction`` moves, pack on both sides, and how fast an embedded
primary ships a commit.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import transaction
import ZODB
import ZODB.config
import zope.interface
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import ReadOnlyError
from ZODB.serialize import referencesf

from replicator import wrappers
from replicator.config import Address, PrimaryConfig, SecondaryConfig, TLSPaths
from replicator.errors import ConfigError, EmptyReplicaError
from replicator.wrappers import PrimaryStorage, SecondaryStorage
from tests.helpers import free_port, wait_until


def tls_keys(tls_dir: Path, node: str) -> str:
    return (f"tls-ca {tls_dir / 'ca.pem'}\ntls-cert {tls_dir / f'{node}.pem'}\n"
            f"tls-key {tls_dir / f'{node}.key'}\n")


def primary_section(tmp_path: Path, tls_dir: Path, extra: str = "") -> str:
    (tmp_path / "p").mkdir(exist_ok=True)
    return (f"<replicated-primary>\nlisten 127.0.0.1:0\nnode p\n{tls_keys(tls_dir, 'primary')}{extra}"
            f"<filestorage>\npath {tmp_path / 'p' / 'Data.fs'}\nblob-dir {tmp_path / 'p' / 'blobs'}\n"
            "</filestorage>\n</replicated-primary>\n")


def secondary_section(tmp_path: Path, tls_dir: Path, port: int, fs_extra: str = "", extra: str = "") -> str:
    (tmp_path / "s").mkdir(exist_ok=True)
    return (f"<replicated-secondary>\nprimary 127.0.0.1:{port}\nnode s\n{tls_keys(tls_dir, 'secondary')}{extra}"
            f"<filestorage>\npath {tmp_path / 's' / 'Data.fs'}\nblob-dir {tmp_path / 's' / 'blobs'}\n"
            f"{fs_extra}</filestorage>\n</replicated-secondary>\n")


def open_pair(tmp_path: Path, tls_dir: Path, primary_extra: str = "",
              secondary_extra: str = "") -> tuple[ZODB.DB, SecondaryStorage]:
    """A database on an embedded primary, and a replica storage following it (not yet started)."""
    db = ZODB.config.databaseFromString(
        f"%import replicator\n<zodb>\n{primary_section(tmp_path, tls_dir, primary_extra)}</zodb>\n")
    replica = ZODB.config.storageFromString(
        "%import replicator\n" + secondary_section(tmp_path, tls_dir, db.storage.port, extra=secondary_extra))
    return db, replica


class RecordingDB:
    """What ZEO's StorageServerDB is to the storage: told of every applied transaction."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self.calls: list[tuple[bytes, list, bytes]] = []

    def invalidate(self, tid, oids, version="") -> None:
        self.calls.append((tid, oids, self.storage.lastTransaction()))


def test_config_sections_make_wrappers_with_their_base_interfaces(tmp_path, tls_dir):
    db, replica = open_pair(tmp_path, tls_dir)
    try:
        assert isinstance(db.storage, PrimaryStorage) and isinstance(replica, SecondaryStorage)
        base = FileStorage(str(tmp_path / "iface.fs"), blob_dir=str(tmp_path / "iface-blobs"))
        try:
            for wrapper in (db.storage, replica):
                assert set(zope.interface.providedBy(wrapper)) == set(zope.interface.providedBy(base))
        finally:
            base.close()
        assert not db.storage.isReadOnly() and replica.isReadOnly()
        assert db.storage.config.blob_dir == str(tmp_path / "p" / "blobs")
        assert db.storage.config.poll_interval == 1.0
        assert db.storage.status()["role"] == "primary"
        assert replica.config.compress is False
    finally:
        replica.close()
        db.close()


def test_a_replica_section_passes_compress_and_max_rate_on_to_its_secondary(tmp_path, tls_dir):
    """The section's keys reach the secondary, which negotiates compression with the primary.
    (That the stream is then deflated on the wire, and the rate held: test_compression, test_max_rate.)"""
    db, replica = open_pair(tmp_path, tls_dir, secondary_extra="compress true\nmax-rate 2MiB/s\n")
    try:
        assert replica.config.compress is True and replica.config.max_rate == 2 << 20
        replica.start()
        with db.transaction() as conn:
            conn.root()["v"] = "text " * 1000
        wait_until(lambda: replica.lastTransaction() == db.lastTransaction(), timeout=20)
        assert replica.status()["compression"] is True
        assert [s["compression"] for s in db.storage.status()["secondaries"]] == [True]
    finally:
        replica.close()
        db.close()


def test_replica_database_sees_commits_and_is_invalidated_before_last_tid_moves(tmp_path, tls_dir):
    db, replica = open_pair(tmp_path, tls_dir)
    recorder = RecordingDB(replica)
    try:
        replica.registerDB(recorder)  # starts the secondary
        with db.transaction() as conn:
            conn.root()["v"] = 0
        wait_until(lambda: replica.lastTransaction() == db.lastTransaction(), timeout=20)
        rdb = ZODB.DB(replica)
        tm = transaction.TransactionManager()
        rconn = rdb.open(tm)
        try:
            for i in range(1, 30):
                with db.transaction() as conn:
                    conn.root()["v"] = i
                wait_until(lambda i=i: (tm.begin(), rconn.root()["v"])[1] == i, timeout=10)
        finally:
            tm.abort()
            rconn.close()
            rdb.close()  # closes the replica too
        assert len(recorder.calls) >= 30
        for tid, oids, last_then in recorder.calls:
            assert isinstance(oids, list) and oids
            assert last_then < tid  # told before lastTransaction moved
    finally:
        replica.close()
        db.close()


def test_a_database_opened_on_an_empty_replica_waits_for_the_primarys_root(tmp_path, tls_dir):
    """``ZODB.DB`` creates the root object of an empty storage, which a replica refuses: a
    ``<zodb>`` configuration on a new replica waits for the primary's first transaction instead
    of failing with ReadOnlyError, then follows live."""
    primary = ZODB.config.databaseFromString(
        f"%import replicator\n<zodb>\n{primary_section(tmp_path, tls_dir)}</zodb>\n")
    try:
        with primary.transaction() as conn:
            conn.root()["v"] = "from the primary"
        rdb = ZODB.config.databaseFromString(
            "%import replicator\n<zodb>\n" + secondary_section(tmp_path, tls_dir, primary.storage.port)
            + "</zodb>\n")
        try:
            assert rdb.storage.lastTransaction() != b"\0" * 8
            with rdb.transaction() as conn:
                assert conn.root()["v"] == "from the primary"
            with primary.transaction() as conn:
                conn.root()["v"] = "later"
            tm = transaction.TransactionManager()
            conn = rdb.open(tm)
            wait_until(lambda: (tm.begin(), conn.root()["v"])[1] == "later", timeout=10)
            conn.close()
        finally:
            rdb.close()
    finally:
        primary.close()


def test_a_database_on_an_empty_replica_whose_primary_is_away_fails_with_the_reason(
        tmp_path, tls_dir, monkeypatch):
    """No primary to copy the root from: the database does not open, with an error naming the
    replica and why nothing came, and the replica's storage is closed (its lock released), so
    that the application can try again."""
    monkeypatch.setattr(wrappers, "FIRST_TRANSACTION_WAIT", 1.0)
    conf = "%import replicator\n<zodb>\n" + secondary_section(tmp_path, tls_dir, free_port()) + "</zodb>\n"
    with pytest.raises(EmptyReplicaError) as caught:
        ZODB.config.databaseFromString(conf)
    message = str(caught.value)
    assert f"the replica {tmp_path / 's' / 'Data.fs'} holds no transaction after 1s" in message, message
    assert "not connected to the primary at 127.0.0.1:" in message and "Connection refused" in message, message
    FileStorage(str(tmp_path / "s" / "Data.fs")).close()  # not locked any more


def test_a_database_on_an_empty_replica_of_an_empty_primary_says_so(tmp_path, tls_dir, monkeypatch):
    """Connected, but the primary has no root to send either: its heartbeats do not keep the
    database waiting, and the error says what is missing."""
    monkeypatch.setattr(wrappers, "FIRST_TRANSACTION_WAIT", 2.0)
    primary = ZODB.config.storageFromString("%import replicator\n" + primary_section(tmp_path, tls_dir))
    try:
        conf = ("%import replicator\n<zodb>\n" + secondary_section(tmp_path, tls_dir, primary.port)
                + "</zodb>\n")
        with pytest.raises(EmptyReplicaError, match="the primary at 127.0.0.1:[0-9]+ holds no transaction "
                                                    "either"):
            ZODB.config.databaseFromString(conf)
    finally:
        primary.close()


def test_writes_to_a_replica_raise_read_only_and_change_nothing(tmp_path, tls_dir):
    db, replica = open_pair(tmp_path, tls_dir)
    try:
        with db.transaction() as conn:
            conn.root()["v"] = 1
        replica.start()
        wait_until(lambda: replica.lastTransaction() == db.lastTransaction(), timeout=20)
        before = replica.lastTransaction()
        size = replica.getSize()
        meta = TransactionMetaData()
        for call in (lambda: replica.tpc_begin(meta), lambda: replica.store(b"\0" * 8, before, b"x", "", meta),
                     lambda: replica.restore(b"\0" * 8, before, b"x", "", None, meta),
                     lambda: replica.storeBlob(b"\0" * 8, before, b"x", "f", "", meta),
                     lambda: replica.undo(before, meta), replica.new_oid,
                     lambda: replica.deleteObject(b"\0" * 8, before, meta),
                     lambda: replica.tpc_vote(meta), lambda: replica.tpc_finish(meta)):
            with pytest.raises(ReadOnlyError, match="this node is a secondary: it follows the primary at 127.0.0.1:"):
                call()
        replica.tpc_abort(meta)
        assert replica.lastTransaction() == before and replica.getSize() == size
        assert replica.undoLog(0, 10) and replica.history(b"\0" * 8)
    finally:
        replica.close()
        db.close()


def test_both_sides_pack_and_replication_goes_on(tmp_path, tls_dir):
    db, replica = open_pair(tmp_path, tls_dir)
    try:
        replica.start()
        for i in range(20):
            with db.transaction() as conn:
                conn.root()["v"] = i
        wait_until(lambda: replica.lastTransaction() == db.lastTransaction(), timeout=20)
        time.sleep(0.05)
        replica.pack(time.time(), referencesf)
        db.pack()
        for i in range(20, 25):
            with db.transaction() as conn:
                conn.root()["v"] = i
        wait_until(lambda: replica.lastTransaction() == db.lastTransaction(), timeout=20)
        replica.close()
        # Reopened, the packed replica is still accepted by the (packed) primary.
        replica = ZODB.config.storageFromString(
            "%import replicator\n" + secondary_section(tmp_path, tls_dir, db.storage.port))
        replica.start()
        with db.transaction() as conn:
            conn.root()["v"] = 99
        wait_until(lambda: replica.lastTransaction() == db.lastTransaction(), timeout=20)
        assert replica.error is None
    finally:
        replica.close()
        db.close()


def test_embedded_primary_ships_each_commit_at_once(tmp_path, tls_dir):
    """Each commit's tpc_finish wakes the streaming session itself.

    With the file poller slowed to 5 s, a commit would otherwise wait for the
    session's next heartbeat (1 s): the replica would still get every commit,
    about a second late, which no check of the replica alone can tell from a
    slow machine.  So the wake-ups are counted: the notifier's version moves
    once per wake-up, and with the poller asleep only ``tpc_finish`` moves it.
    """
    db, replica = open_pair(tmp_path, tls_dir, primary_extra="poll-interval 5.0\n")
    try:
        replica.start()
        with db.transaction() as conn:
            conn.root()["v"] = -1
        wait_until(lambda: replica.lastTransaction() == db.lastTransaction(), timeout=20)
        notifier = db.storage.primary.notifier
        woken_before = notifier.version
        delays = []
        for i in range(200):
            with db.transaction() as conn:
                conn.root()["v"] = i
            tid = db.lastTransaction()
            start = time.perf_counter()
            wait_until(lambda tid=tid: replica.lastTransaction() >= tid, timeout=10, interval=0.0002)
            delays.append(time.perf_counter() - start)
        woken = notifier.version - woken_before
    finally:
        replica.close()
        db.close()
    median = statistics.median(delays)
    print(f"\nembedded primary, commit -> applied: median {median * 1000:.2f} ms, "
          f"max {max(delays) * 1000:.2f} ms over 200 commits (file poller at 5 s), {woken} wake-ups")
    # One wake-up per commit (each waited for before the next); the poller may
    # add a look or two, and batching under CPU pressure still wakes once per commit
    # here, since the next commit waits for this one.
    assert woken >= 200


def test_configuration_problems_are_reported(tmp_path, tls_dir):
    with pytest.raises(ConfigError, match="read-only"):
        (tmp_path / "s").mkdir()
        FileStorage(str(tmp_path / "s" / "Data.fs")).close()
        ZODB.config.storageFromString(
            "%import replicator\n" + secondary_section(tmp_path, tls_dir, 1, fs_extra="read-only true\n"))
    # In the file's own terms: its keys, not the command's options.
    with pytest.raises(ConfigError, match=r"TLS files are required \(tls-ca, tls-cert, tls-key\); pass insecure "):
        ZODB.config.storageFromString(
            f"%import replicator\n<replicated-primary>\nlisten 127.0.0.1:0\n<filestorage>\n"
            f"path {tmp_path / 'x.fs'}\n</filestorage>\n</replicated-primary>\n")
    # The storage the section opened is closed again: another can lock it.
    FileStorage(str(tmp_path / "x.fs")).close()
    with pytest.raises(ConfigError, match="FileStorage"):
        PrimaryStorage(MappingStorage(),  # type: ignore[arg-type]
                       PrimaryConfig(storage="x", listen=Address("127.0.0.1", 0), insecure=True))
    with pytest.raises(ConfigError, match="FileStorage"):
        SecondaryStorage(MappingStorage(),  # type: ignore[arg-type]
                         SecondaryConfig(storage="x", primary=Address("127.0.0.1", 1),
                                         tls=TLSPaths("a", "b", "c")))
