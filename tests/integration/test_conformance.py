"""ZODB's own storage conformance suites, run against a replicated primary while a secondary follows it.

Every test here is one of ZODB's generic storage tests (``ZODB.tests``
mixins, ``ZODB.tests.testblob``), composed the way ZODB's own
``testFileStorage.py`` composes them, but ``self._storage`` is a
``PrimaryStorage`` wrapping a ``FileStorage`` with a blob directory, and a
real ``SecondaryStorage`` (its own FileStorage and blob directory, mutual TLS
over 127.0.0.1) replicates it for the whole test.  At the end of each test
the harness waits until the secondary has applied the primary's
``lastTransaction`` and compares the two storages:

- ``replicator.verify.verify`` (every transaction and record, blob bytes
  included) must find them equal;
- where the test packed the primary, a pack rewrites the primary's history
  but not the secondary's, so full-history equality cannot hold; then every
  oid the primary still holds must have the same current state on the
  secondary (pickle, serial, blob bytes, or "no current data" on both), and
  both must have the same ``lastTransaction``.

The mixins' test methods are named ``test*`` since ZODB 6 (no longer
``check*``), so pytest collects these ``unittest.TestCase`` classes as they
are: no aliases and no collection hook.  The blob doctests (the files and
docstrings ``storage_reusable_suite`` runs) are not classes: they are built
the same way with our storage factory and run one by one by a parametrised
pytest test.

``docs/conformance.md`` has the table of results.
"""

from __future__ import annotations

import doctest
import hashlib
import io
import logging
import os
import re
import time
import unittest
from pathlib import Path

import pytest
import ZODB.tests
import ZODB.tests.testblob
import ZODB.tests.util
import zope.testing.renormalizing
from ZODB.blob import is_blob_record
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError
from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PackableStorage,
    PersistentStorage,
    ReadOnlyStorage,
    RecoveryStorage,
    RevisionStorage,
    StorageTestBase,
    Synchronization,
    TransactionalUndoStorage,
)
from ZODB.utils import z64

from replicator.config import Address, PrimaryConfig, SecondaryConfig, TLSPaths
from replicator.verify import format_result, verify
from replicator.wrappers import PrimaryStorage, SecondaryStorage
from tests.helpers import wait_until

#: How long the secondary may take to apply the primary's last transaction.
CATCH_UP_TIMEOUT = 30.0

_TLS_DIR: Path | None = None


@pytest.fixture(autouse=True, scope="module")
def _tls(tls_dir):
    """The storages are made inside unittest setUp()s, which cannot ask for fixtures."""
    global _TLS_DIR
    _TLS_DIR = tls_dir
    yield
    _TLS_DIR = None


def _tls_paths(node: str) -> TLSPaths:
    assert _TLS_DIR is not None, "the _tls fixture did not run"
    return TLSPaths(str(_TLS_DIR / "ca.pem"), str(_TLS_DIR / f"{node}.pem"), str(_TLS_DIR / f"{node}.key"))


class ObservedPrimary(PrimaryStorage):
    """``PrimaryStorage`` as is, plus what the harness must know: packs, and closes.

    ``close()`` first waits until the secondary has everything the primary
    committed (tests close and reopen their storage: ``PersistentStorage``,
    ``ReadOnlyStorage``, ``DB.close()`` in the doctests, and the secondary can
    only catch up while a primary serves), then closes the secondary, then
    the primary.  The order matters for time only: closed while a secondary
    is connected, a ``PrimaryStorage`` takes 10 s (see
    ``test_primary_closes_promptly_while_a_secondary_is_connected``).  A
    timeout is recorded, not raised inside the test: ``Replication.check``
    reports it.
    """

    def __init__(self, replication: Replication, base: FileStorage, config: PrimaryConfig) -> None:
        self._replication = replication
        super().__init__(base, config)

    def pack(self, *args, **kwargs):
        self._replication.packed = True
        return super().pack(*args, **kwargs)

    def close(self) -> None:
        if not self._closed:
            self._replication.catch_up(self)
            self._replication.close_secondary()
        super().close()


class Replication:
    """One replicated storage: primaries opened over ``NAME.fs`` in turn, one secondary following them.

    Every primary opened over the file listens on the same port, so the
    secondary reconnects to a reopened primary and resumes from its own last
    transaction.
    """

    def __init__(self, directory: str, name: str, blob_dir: str | None = None) -> None:
        self.path = os.path.join(directory, f"{name}.fs")
        self.blob_dir = os.path.abspath(blob_dir if blob_dir is not None else os.path.join(directory, f"{name}.blobs"))
        replica = os.path.join(directory, "replica")
        os.makedirs(replica, exist_ok=True)
        self.replica_path = os.path.join(replica, f"{name}.fs")
        self.replica_blob_dir = os.path.join(replica, f"{name}.blobs")
        self.port = 0
        self.primary: ObservedPrimary | None = None
        self.secondary: SecondaryStorage | None = None
        self.packed = False
        self.last_tid: bytes | None = None
        self.problems: list[str] = []
        #: Secondaries opened and closed in turn over the replica's file.
        self.secondaries = 0

    def open_primary(self, **kwargs) -> ObservedPrimary:
        base = FileStorage(self.path, blob_dir=self.blob_dir, **kwargs)
        config = PrimaryConfig(storage=self.path, listen=Address("127.0.0.1", self.port), tls=_tls_paths("primary"),
                               node="primary", poll_interval=1.0)  # as embedded in ZEO: woken by tpc_finish
        try:
            primary = ObservedPrimary(self, base, config)
        except BaseException:
            base.close()
            raise
        self.primary = primary
        self.port = primary.port or 0
        if self.secondary is None:
            base = FileStorage(self.replica_path, blob_dir=self.replica_blob_dir, create=True)
            self.secondary = SecondaryStorage(base, SecondaryConfig(
                storage=self.replica_path, primary=Address("127.0.0.1", self.port), tls=_tls_paths("secondary"),
                node="secondary", reconnect_min=0.05, reconnect_max=0.5))
            self.secondary.start()
        return primary

    def catch_up(self, primary: PrimaryStorage | None = None) -> None:
        """Wait until the secondary has applied ``primary``'s last transaction; record a failure."""
        primary = primary or self.primary
        if primary is None or self.secondary is None:
            return
        target = last_tid_in_file(primary) if self.packed else primary.lastTransaction()
        self.last_tid = target
        secondary = self.secondary

        def caught_up() -> bool:
            if secondary.error is not None or secondary.lastTransaction() == target:
                return True
            # A pack up to now may have collected the newest transactions
            # after the secondary applied them: packs are not replicated, so
            # it keeps them, and check() compares current states instead.
            return self.packed and secondary.lastTransaction() > target

        try:
            wait_until(caught_up, timeout=CATCH_UP_TIMEOUT, interval=0.005)
        except TimeoutError:
            self.problems.append(f"the secondary did not apply {target.hex()} within {CATCH_UP_TIMEOUT:.0f}s "
                                 f"(it has {secondary.lastTransaction().hex()}): {secondary.status()}")
        if secondary.error is not None:
            self.problems.append(f"the secondary stopped: {secondary.error!r}")

    def close_secondary(self) -> None:
        """Close the secondary; the next ``open_primary`` opens a new one, which resumes from its file."""
        secondary, self.secondary = self.secondary, None
        if secondary is not None:
            self.secondaries += 1
            secondary.close()

    def close(self) -> None:
        try:
            if self.primary is not None:
                self.primary.close()  # waits for the secondary, closes it, then the primary
        finally:
            self.close_secondary()

    def check(self) -> None:
        """Close both sides and compare them; raise AssertionError naming the difference."""
        self.close()
        if not self.secondaries:
            return
        assert not self.problems, "; ".join(dict.fromkeys(self.problems))
        if self.packed:
            differences = current_state_differences(self.path, self.blob_dir, self.replica_path,
                                                    self.replica_blob_dir)
            assert not differences, ("after a pack of the primary, the secondary's current state differs:\n"
                                     + "\n".join(differences[:10]))
        else:
            result = verify(self.path, self.replica_path, self.blob_dir, self.replica_blob_dir)
            assert result.equal, "the secondary differs from the primary:\n" + format_result(result)


class Replications:
    """The replicated storages one test made, by name (a doctest may make several, or reopen one)."""

    def __init__(self) -> None:
        self.by_name: dict[str, Replication] = {}

    def open(self, name: str = "Data", blob_dir: str | None = None, **kwargs) -> ObservedPrimary:
        """Open (or reopen) ``NAME.fs`` in the working directory (the test's temporary one) as a primary."""
        replication = self.by_name.get(name)
        if replication is None:
            replication = self.by_name[name] = Replication(os.getcwd(), name, blob_dir)
        return replication.open_primary(**kwargs)

    def check(self) -> None:
        errors = []
        for name, replication in self.by_name.items():
            try:
                replication.check()
            except AssertionError as e:
                errors.append(f"{name}: {e}")
        assert not errors, "\n".join(errors)


def last_tid_in_file(storage) -> bytes:
    """The last transaction the storage's file holds: what a secondary can get from it.

    After a pack that collected the newest transactions' every record (the
    objects were garbage), those transactions are gone from the file while
    ``lastTransaction()`` still names the newest; a secondary that had not
    received them before the pack never will, and needs none of them.
    """
    last = z64
    for txn in storage.iterator():
        last = txn.tid
    return last


def _current(storage: FileStorage, oid: bytes) -> tuple:
    try:
        data, serial = storage.load(oid)
    except POSKeyError:
        return ("no current data",)
    if not is_blob_record(data):
        return data, serial
    try:
        with open(storage.loadBlob(oid, serial), "rb") as f:
            return data, serial, f.read()
    except POSKeyError:
        return data, serial, "no blob file"


def _describe(state: tuple) -> str:
    if len(state) == 1:
        return state[0]
    data, serial = state[:2]
    text = f"serial {serial.hex()}, {len(data)}-byte pickle {hashlib.blake2b(data, digest_size=8).hexdigest()}"
    if len(state) == 3:
        blob = state[2]
        text += f", blob {blob}" if isinstance(blob, str) else f", blob {hashlib.blake2b(blob, digest_size=8).hexdigest()}"
    return text


def current_state_differences(path_a: str, blobs_a: str | None, path_b: str, blobs_b: str | None) -> list[str]:
    """Every oid storage A holds has the same current state in B; B ends at A's last transaction or later.

    B may hold more oids (objects A's pack collected) and more history,
    including the newest transactions when a pack up to now collected them
    after B applied them.
    """
    a = FileStorage(path_a, blob_dir=blobs_a, read_only=True)
    try:
        b = FileStorage(path_b, blob_dir=blobs_b, read_only=True)
        try:
            differences = []
            if b.lastTransaction() < a.lastTransaction():
                differences.append(f"B ends at {b.lastTransaction().hex()}, before A's last {a.lastTransaction().hex()}")
            for oid in a._index.keys():
                state_a, state_b = _current(a, oid), _current(b, oid)
                if state_a != state_b:
                    differences.append(f"oid {oid.hex()}: {_describe(state_a)} != {_describe(state_b)}")
            return differences
        finally:
            b.close()
    finally:
        a.close()


class ReplicatedTestBase(StorageTestBase.StorageTestBase):
    """``StorageTestBase`` whose ``self._storage`` is a replicated primary; the replica is compared in tearDown."""

    def setUp(self) -> None:
        super().setUp()  # a fresh temporary directory, made the working directory
        self._replications = Replications()
        self.open(create=True)

    def open(self, **kwargs) -> None:
        self._storage = self._replications.open("Data", **kwargs)

    def tearDown(self) -> None:
        try:
            self._replications.check()
            self.check_more()
        finally:
            self._storage = None  # closed by the check: StorageTestBase must not close it again
            super().tearDown()

    def check_more(self) -> None:
        """More checks after the replica was found equal (both sides closed)."""


# -- the generic storage mixins, one class each, composed as testFileStorage.FileStorageTests does

class BasicTests(ReplicatedTestBase, BasicStorage.BasicStorage):
    pass


class HistoryTests(ReplicatedTestBase, HistoryStorage.HistoryStorage):
    pass


class IteratorTests(ReplicatedTestBase, IteratorStorage.IteratorStorage, IteratorStorage.ExtendedIteratorStorage):
    use_extension_bytes = True  # as FileStorageTests: FileStorage keeps the extension's bytes


class MTTests(ReplicatedTestBase, MTStorage.MTStorage):
    pass


class PackableTests(ReplicatedTestBase, PackableStorage.PackableStorageWithOptionalGC,
                    PackableStorage.PackableUndoStorage):
    pass


class PersistentTests(ReplicatedTestBase, PersistentStorage.PersistentStorage):
    pass


class RevisionTests(ReplicatedTestBase, RevisionStorage.RevisionStorage):
    pass


class SynchronizationTests(ReplicatedTestBase, Synchronization.SynchronizedStorage):
    pass


class TransactionalUndoTests(ReplicatedTestBase, TransactionalUndoStorage.TransactionalUndoStorage):
    pass


class ConflictResolutionTests(ReplicatedTestBase, ConflictResolution.ConflictResolvingStorage,
                              ConflictResolution.ConflictResolvingTransUndoStorage):
    # ConflictResolvingTransUndoStorage uses TransactionalUndoStorage's helper
    # (FileStorageTests composes both mixins in one class; here each has its own).
    _begin_undos_vote = TransactionalUndoStorage.TransactionalUndoStorage._begin_undos_vote


#: RecoveryStorage tests whose destination ends up a full copy of the source (the others pack it).
_FULL_COPIES = {"testSimpleRecovery", "testRestoreWithMultipleObjectsInUndoRedo", "testRestoreWithMultipleUndoRedo"}


class RecoveryTests(ReplicatedTestBase, RecoveryStorage.RecoveryStorage):
    """Recovery from the replicated primary into a plain FileStorage (as testFileStorage's FileStorageRecoveryTest).

    After the replica was found equal to the primary, the recovered
    destination is checked against the replica too: equal (``verify``) when
    the test copied the whole history, otherwise (the test packed the
    destination) every oid the destination holds has the replica's current
    state.
    """

    def setUp(self) -> None:
        super().setUp()
        self._dst = FileStorage("Dest.fs", create=True)

    def new_dest(self) -> FileStorage:
        return FileStorage("Dest.fs")

    def tearDown(self) -> None:
        self._dst.close()
        super().tearDown()

    def check_more(self) -> None:
        replica = self._replications.by_name["Data"]
        if self._testMethodName in _FULL_COPIES:
            result = verify(os.path.abspath("Dest.fs"), replica.replica_path)
            assert result.complete, "the recovered destination differs from the replica:\n" + format_result(result)
        else:
            differences = current_state_differences(os.path.abspath("Dest.fs"), None, replica.replica_path,
                                                    replica.replica_blob_dir)
            assert not differences, "the recovered destination differs from the replica:\n" + "\n".join(differences)


class SecondaryReadOnlyTests(ReplicatedTestBase, ReadOnlyStorage.ReadOnlyStorage):
    """ReadOnlyStorage against the ``SecondaryStorage``: data written on the primary, read on the replica.

    The mixin's ``_make_readonly`` closes the storage and reopens it with
    ``read_only=True``: here that reopens the primary (so it goes on serving)
    and hands the test the secondary, once it has applied everything.
    """

    def open(self, read_only: bool = False, **kwargs) -> None:
        super().open(**kwargs)
        if read_only:
            replication = self._replications.by_name["Data"]
            replication.catch_up()
            assert not replication.problems, replication.problems
            self._storage = replication.secondary


# -- blob suites (ZODB.tests.testblob.storage_reusable_suite's parts, with our factory)

class _MonotonicTime:
    """What storage_reusable_suite's MonotonicallyIncreasingTimeMinimalTestLayer does around each test."""

    def __init__(self) -> None:
        self._layer = ZODB.tests.util.MonotonicallyIncreasingTimeMinimalTestLayer("replicated")

    def __enter__(self) -> None:
        self._layer.testSetUp()

    def __exit__(self, *exc) -> None:
        self._layer.testTearDown()


class ReplicatedBlobTestMixin:
    """``create_storage`` for testblob's classes: a replicated primary; ``dest`` (recovery's target) is plain."""

    def create_storage(self, name: str = "data", blob_dir: str | None = None):
        if blob_dir is None:
            blob_dir = f"{name}.bobs"
        if name == "dest":
            return FileStorage(f"{name}.fs", blob_dir=blob_dir)
        return self._replications.open(name, blob_dir)

    def setUp(self) -> None:
        self._time = _MonotonicTime()
        self._time.__enter__()
        self._replications = Replications()
        super().setUp()

    def tearDown(self) -> None:
        try:
            self._replications.check()
            self.check_more()
        finally:
            self._storage = None
            try:
                super().tearDown()
            finally:
                self._time.__exit__()

    def check_more(self) -> None:
        pass


class BlobUndoTests(ReplicatedBlobTestMixin, ZODB.tests.testblob.BlobUndoTests):
    pass


class RecoveryBlobTests(ReplicatedBlobTestMixin, ZODB.tests.testblob.RecoveryBlobStorage):
    """Blob recovery from the replicated primary into a plain FileStorage; the copy must equal the replica too."""

    def check_more(self) -> None:
        self._dst.close()
        replica = self._replications.by_name["data"]
        result = verify(os.path.abspath("dest.fs"), replica.replica_path, os.path.abspath("dest.bobs"),
                        replica.replica_blob_dir)
        assert result.equal, "the recovered destination differs from the replica:\n" + format_result(result)


def _from_the_primary(record: logging.LogRecord) -> bool:
    """Drop the replica's "Copied blob file" lines: they come whenever it applies, between doctest lines.

    ``commit_from_wrong_partition`` breaks ``os.rename`` for the whole process
    and prints what ``ZODB.blob.copied`` logs; the in-process secondary's
    ``restoreBlob`` copies too.  The replica is compared in tearDown.
    """
    return f"{os.sep}replica{os.sep}" not in record.getMessage()


def _blob_doctest_setup(test) -> None:
    ZODB.tests.testblob.setUp(test)  # a fresh temporary directory, made the working directory
    logging.getLogger("ZODB.blob.copied").addFilter(_from_the_primary)
    time = _MonotonicTime()
    time.__enter__()
    replications = Replications()

    def create_storage(name: str = "data", blob_dir: str | None = None) -> ObservedPrimary:
        return replications.open(name, blob_dir if blob_dir is not None else f"{name}.bobs")

    test.globs.update(create_storage=create_storage, file_type=io.BufferedReader,
                      _replications=replications, _time=time)


def _blob_doctest_teardown(test) -> None:
    try:
        test.globs["_replications"].check()
    finally:
        logging.getLogger("ZODB.blob.copied").removeFilter(_from_the_primary)
        test.globs["_time"].__exit__()
        ZODB.tests.util.tearDown(test)


def _blob_doctests() -> list[unittest.TestCase]:
    """What ``storage_reusable_suite(..., test_packing=True, test_undo=False, test_blob_storage_recovery=False)``
    builds (its classes are above), with our setUp/tearDown around each doctest."""
    sep = re.escape(os.path.sep)
    paths = re.compile(rf"([a-zA-Z]:)?{sep}.*{sep}(server-)?blobs{sep}.*\.blob")
    suite = unittest.TestSuite()
    suite.addTest(doctest.DocFileSuite(
        "blob_connection.txt", "blob_importexport.txt", "blob_transaction.txt", "blob_packing.txt",
        package=ZODB.tests, setUp=_blob_doctest_setup, tearDown=_blob_doctest_teardown,
        checker=zope.testing.renormalizing.RENormalizing([(paths, "<BLOB STORAGE PATH>")]),
        optionflags=doctest.ELLIPSIS))
    suite.addTest(doctest.DocTestSuite(
        ZODB.tests.testblob, setUp=_blob_doctest_setup, tearDown=_blob_doctest_teardown,
        checker=ZODB.tests.util.checker + zope.testing.renormalizing.RENormalizing([
            (re.compile(sep + sep), "/"), (re.compile(sep), "/")])))
    return list(_flatten(suite))


def _flatten(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _flatten(test)
        else:
            yield test


BLOB_DOCTESTS = _blob_doctests()


@pytest.mark.parametrize("case", BLOB_DOCTESTS, ids=[case.id().rpartition(".")[2] for case in BLOB_DOCTESTS])
def test_blob_doctest(case: unittest.TestCase) -> None:
    if case.id().endswith("blob_transaction_txt") and os.geteuid() == 0:
        pytest.skip("run as root: blob_transaction.txt expects open(blob.committed(), 'w') to raise "
                    "PermissionError (committed blob files are read-only), which root is never refused; "
                    "ZODB's own FileStorage fails this doctest the same way as root")
    result = unittest.TestResult()
    case.run(result)
    problems = result.errors + result.failures
    assert not problems, "\n".join(text for _test, text in problems)


def test_primary_closes_promptly_while_a_secondary_is_connected(tmp_path) -> None:
    """A ZEO server or ``DB.close()`` on a ``PrimaryStorage`` should not hang because a secondary follows it."""
    replication = Replication(str(tmp_path), "Data")
    primary = replication.open_primary(create=True)
    secondary = replication.secondary
    assert secondary is not None
    try:
        wait_until(lambda: secondary.status().get("connected"), timeout=CATCH_UP_TIMEOUT)
        started = time.monotonic()
        PrimaryStorage.close(primary)  # not ObservedPrimary.close, which closes the secondary first
        elapsed = time.monotonic() - started
    finally:
        replication.close_secondary()
        primary.close()
    # Not a speed target: before sessions were ended on stop, this waited out
    # aiohttp's shutdown timeout twice (10 s).
    assert elapsed < 5.0, f"PrimaryStorage.close() took {elapsed:.1f}s with a secondary connected"
