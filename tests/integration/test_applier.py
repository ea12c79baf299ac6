"""The applier against real FileStorages: a random source is streamed into an empty target."""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import signal
import tempfile

import pytest
import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from persistent.mapping import PersistentMapping
from ZODB import DB
from ZODB.FileStorage import FileStorage

from replicator.applier import Applier
from replicator.errors import (
    ConfigError,
    DivergenceError,
    DurabilityError,
    IntegrityError,
    RemoteProtocolError,
    StorageError,
    StorageInUseError,
)
from replicator.protocol.events import BlobChunk, Heartbeat, Record, TxnBegin, TxnEnd
from replicator.storage import UNSYNCED_SUFFIX, iter_transactions, last_state, open_file_storage, txn_digest
from replicator.tailer import Tailer
from replicator.verify import verify

from .zodb_workload import (
    RAW_DESCRIPTION,
    RAW_EXTENSION,
    RAW_USER,
    Z64,
    build_source,
    flatten,
    identity_of,
    reference_stream,
    seal,
    snapshot,
    tids_of,
)


class Source:
    def __init__(self, path: str, blob_dir: str) -> None:
        self.path, self.blob_dir = path, blob_dir
        self.txns = reference_stream(path, blob_dir)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    d = tmp_path_factory.mktemp("source")
    build_source(str(d / "Data.fs"), str(d / "blobs"), seed=7, commits=40, pack_at=15)
    return Source(str(d / "Data.fs"), str(d / "blobs"))


class Target:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "target", "Data.fs")
        self.blob_dir = os.path.join(directory, "target", "blobs")
        self.storage = open_file_storage(self.path, self.blob_dir)
        self.applier = Applier(self.storage)

    def snapshot(self) -> dict[str, str]:
        return snapshot(self.path, self.blob_dir)

    def reopen(self) -> None:
        self.storage.close()
        self.storage = open_file_storage(self.path, self.blob_dir)
        self.applier = Applier(self.storage)


@pytest.fixture
def target(tmp_path):
    t = Target(str(tmp_path))
    yield t
    t.storage.close()


def assert_replica(source: Source, target: Target) -> None:
    for txn in source.txns:
        assert txn_digest(target.storage, txn[0].tid) == identity_of(txn)
    target.storage.close()
    result = verify(source.path, target.path, source.blob_dir, target.blob_dir)
    assert result.equal, result
    assert result.transactions == len(source.txns)
    target.reopen()


def test_source_covers_the_interesting_cases(source):
    records = [e for e in flatten(source.txns) if isinstance(e, Record)]
    assert any(r.data is None for r in records), "undone creation"
    assert any(r.data_txn is not None for r in records), "undo back pointer"
    assert any(r.blob_size is not None and r.data_txn is not None for r in records), "undone blob change"
    assert any(r.blob_size == 0 for r in records) or any(r.blob_size for r in records)
    assert {txn[0].status for txn in source.txns} == {" ", "p"}
    assert any(txn[0].user == RAW_USER for txn in source.txns)


def test_whole_stream_replicates_exactly(source, target):
    tids = target.applier.apply(flatten(source.txns))
    assert tids == tids_of(source.txns)
    assert target.applier.last_tid == tids[-1]
    assert last_state(target.storage) == (tids[-1], identity_of(source.txns[-1]))
    # The source's own digests agree with what was shipped.
    src = FileStorage(source.path, blob_dir=source.blob_dir, read_only=True)
    try:
        assert [txn_digest(src, t[0].tid) for t in source.txns] == [identity_of(t) for t in source.txns]
    finally:
        src.close()
    assert_replica(source, target)


def test_metadata_bytes_are_kept_exactly(source, target):
    target.applier.apply(flatten(source.txns))
    raw = [t for t, _records in iter_transactions(target.storage) if t.user == RAW_USER]
    assert raw and all(t.description == RAW_DESCRIPTION and t.extension == RAW_EXTENSION for t in raw)
    by_tid = {t[0].tid: t[0] for t in source.txns}
    for stored, _records in iter_transactions(target.storage):
        begin = by_tid[stored.tid]
        assert (stored.status, stored.user, stored.description, stored.extension) == \
            (begin.status, begin.user, begin.description, begin.extension)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_any_batch_split_gives_the_same_replica(source, seed):
    events = flatten(source.txns)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(events)), k=rng.randrange(0, min(30, len(events) - 1))))
    batches = [events[i:j] for i, j in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    with tempfile.TemporaryDirectory() as d:
        target = Target(d)
        try:
            committed = []
            for batch in batches:
                committed += target.applier.apply(batch)
                # Only whole transactions are ever reported, and they are in the storage.
                assert target.applier.last_tid == (committed[-1] if committed else Z64)
            assert committed == tids_of(source.txns)
            assert_replica(source, target)
        finally:
            target.storage.close()


def test_resume_after_reopening(source, target):
    half = len(source.txns) // 2
    target.applier.apply(flatten(source.txns[:half]))
    target.reopen()
    assert target.applier.last_tid == source.txns[half - 1][0].tid
    target.applier.apply(flatten(source.txns[half:]))
    assert_replica(source, target)


def test_digest_mismatch_commits_nothing(source, target):
    target.applier.apply(flatten(source.txns[:5]))
    before = target.snapshot()
    bad = source.txns[5][:-1] + [TxnEnd(source.txns[5][0].tid, b"\x01" * 16)]
    with pytest.raises(IntegrityError):
        target.applier.apply(bad)
    assert target.snapshot() == before
    assert target.applier.last_tid == source.txns[4][0].tid
    # Content changed in flight (digest from the primary no longer matches) is refused too.
    blob_txn = next(i for i, t in enumerate(source.txns) if any(isinstance(e, BlobChunk) for e in t))
    target.applier.apply(flatten(source.txns[5:blob_txn]))
    before = target.snapshot()
    tampered = [BlobChunk(b"X" * len(e.data)) if isinstance(e, BlobChunk) else e for e in source.txns[blob_txn]]
    with pytest.raises(IntegrityError):
        target.applier.apply(tampered)
    assert target.snapshot() == before
    # Still usable: the right transactions go in.
    target.applier.apply(flatten(source.txns[blob_txn:]))
    assert_replica(source, target)


def test_transaction_must_follow_the_last_one(source, target):
    txns = source.txns
    target.applier.apply(flatten(txns[:3]))
    before = target.snapshot()
    with pytest.raises(RemoteProtocolError, match="gap"):
        target.applier.apply(txns[4])  # follows txns[3], which we lack
    with pytest.raises(RemoteProtocolError, match="already"):
        target.applier.apply(txns[2])  # resent
    fork = seal([TxnBegin(txns[3][0].tid, txns[1][0].tid, " ", b"", b"", b""), TxnEnd(txns[3][0].tid, b"\0" * 16)])
    with pytest.raises(DivergenceError):
        target.applier.apply(fork)  # the primary has nothing between txns[1] and txns[3]; we have txns[2]
    assert target.snapshot() == before
    assert not target.applier.in_transaction
    target.applier.apply(flatten(txns[3:]))
    assert_replica(source, target)


def _blob_txn_index(source: Source) -> int:
    return next(i for i, t in enumerate(source.txns)
                if sum(isinstance(e, BlobChunk) for e in t) >= 2 and isinstance(t[1], Record))


def test_abort_mid_transaction_leaves_target_unchanged(source, target):
    i = _blob_txn_index(source)
    target.applier.apply(flatten(source.txns[:i]))
    before = target.snapshot()
    txn = source.txns[i]
    first_chunk = next(n for n, e in enumerate(txn) if isinstance(e, BlobChunk))
    for cut in (1, first_chunk + 1, len(txn) - 1):  # after begin, mid-blob, before the end
        assert target.applier.apply(txn[:cut]) == []
        assert target.applier.in_transaction
        target.applier.abort()
        assert not target.applier.in_transaction
        assert target.snapshot() == before
    target.applier.abort()  # nothing in progress: a no-op
    target.applier.apply(flatten(source.txns[i:]))
    assert_replica(source, target)


@pytest.mark.parametrize("case", ["record_first", "chunk_without_blob", "chunk_too_long", "end_tid",
                                  "end_mid_blob", "begin_inside", "record_mid_blob", "not_a_stream_event"])
def test_out_of_order_events_are_refused(source, target, case):
    i = _blob_txn_index(source)
    target.applier.apply(flatten(source.txns[:i]))
    before = target.snapshot()
    txn = source.txns[i]
    begin = txn[0]
    blob_at = next(n for n, e in enumerate(txn) if isinstance(e, Record) and e.blob_size)
    bad = {
        "record_first": [txn[1]],
        "chunk_without_blob": [begin, BlobChunk(b"x")],
        "chunk_too_long": [*txn[:blob_at + 1], BlobChunk(b"x" * (txn[blob_at].blob_size + 1))],
        "end_tid": [begin, TxnEnd(b"\xff" * 8, txn[-1].digest)],
        "end_mid_blob": [*txn[:blob_at + 2], txn[-1]],
        "begin_inside": [begin, begin],
        "record_mid_blob": [*txn[:blob_at + 2], txn[1]],
        "not_a_stream_event": [begin, Heartbeat(begin.tid, 0.0)],
    }[case]
    with pytest.raises(RemoteProtocolError) as info:
        target.applier.apply(bad)
    assert not isinstance(info.value, IntegrityError)
    assert not target.applier.in_transaction
    assert target.snapshot() == before
    target.applier.apply(flatten(source.txns[i:]))
    assert_replica(source, target)


def test_blob_needs_a_blob_dir(source, tmp_path):
    storage = open_file_storage(str(tmp_path / "Data.fs"))
    try:
        applier = Applier(storage)
        i = next(i for i, t in enumerate(source.txns)
                 if any(isinstance(e, Record) and e.blob_size is not None for e in t))
        applier.apply(flatten(source.txns[:i]))
        size = os.path.getsize(tmp_path / "Data.fs")
        with pytest.raises(ConfigError, match="--blob-dir"):
            applier.apply(source.txns[i])
        assert os.path.getsize(tmp_path / "Data.fs") == size
        assert applier.last_tid == source.txns[i - 1][0].tid
    finally:
        storage.close()


def test_empty_blob_and_arbitrary_bytes(target):
    # A hand-made stream: no source storage can be simpler.
    from ZODB.blob import Blob  # noqa: F401  (the pickle below names ZODB.blob.Blob)
    blob_pickle = b"\x80\x03cZODB.blob\nBlob\nq\x00.N."
    tid = bytes.fromhex("03ff000000000001")
    events = seal([TxnBegin(tid, Z64, " ", b"\xff\x00", b"\xc3(", b"\x80\x80 ext"),
                   Record(b"\0" * 7 + b"\1", blob_pickle, None, 0),
                   Record(b"\0" * 7 + b"\2", None, None), TxnEnd(tid, b"\0" * 16)])
    assert target.applier.apply(events) == [tid]
    [(stored, records)] = list((t, list(r)) for t, r in iter_transactions(target.storage))
    assert (stored.user, stored.description, stored.extension) == (b"\xff\x00", b"\xc3(", b"\x80\x80 ext")
    assert records[0].blob_size == 0 and records[1].data is None
    assert txn_digest(target.storage, tid) == identity_of(events)


class FailingStorage:
    """A FileStorage whose ``method`` fails with a full disk on its ``at``-th call."""

    def __init__(self, storage, method: str, at: int) -> None:
        self._storage, self._method, self._at, self._calls = storage, method, at, 0

    def __getattr__(self, name):
        value = getattr(self._storage, name)
        if name != self._method:
            return value

        def failing(*args, **kw):
            self._calls += 1
            if self._calls == self._at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return value(*args, **kw)
        return failing


@pytest.mark.parametrize("method", ["restore", "restoreBlob", "tpc_vote"])
def test_storage_failure_leaves_target_unchanged(source, target, method):
    i = _blob_txn_index(source)
    target.applier.apply(flatten(source.txns[:i]))
    before = target.snapshot()
    applier = Applier(FailingStorage(target.storage, method, at=1))
    with pytest.raises(StorageError, match="No space left") as info:
        applier.apply(flatten(source.txns[i:]))
    assert isinstance(info.value.__cause__, OSError)
    # The very first call of ``method`` fails (at=1): every transaction before the one making it
    # is committed, nothing of that one or after it.
    def calls(txn) -> bool:
        if method == "tpc_vote":
            return True
        blob = method == "restoreBlob"
        return any(isinstance(e, Record) and (e.blob_size is not None) == blob for e in txn)
    failing = next(j for j in range(i, len(source.txns)) if calls(source.txns[j]))
    last = target.applier.last_tid
    assert last == source.txns[failing - 1][0].tid, (method, i, failing)
    if failing == i:
        assert target.snapshot() == before
    applier.apply(flatten(t for t in source.txns if t[0].tid > last))
    assert_replica(source, target)


def test_blob_file_write_failure(source, target):
    """A real OSError while writing the blob file: the file-size limit stands for a full disk."""
    i = _blob_txn_index(source)
    target.applier.apply(flatten(source.txns[:i]))
    before = target.snapshot()
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, old_limit[1]))
    try:
        with pytest.raises(StorageError) as info:
            target.applier.apply(source.txns[i])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert isinstance(info.value.__cause__, OSError)
    assert target.snapshot() == before
    target.applier.apply(flatten(source.txns[i:]))
    assert_replica(source, target)


def test_missing_temp_dir_is_a_storage_error(source, target, tmp_path):
    i = _blob_txn_index(source)
    target.applier.apply(flatten(source.txns[:i]))
    before = target.snapshot()
    applier = Applier(target.storage, temp_dir=str(tmp_path / "nowhere"))
    with pytest.raises(StorageError, match="cannot create a blob file"):
        applier.apply(source.txns[i])
    assert target.snapshot() == before


def test_invalidate_is_called_before_last_tid_moves(source, target):
    seen = []
    applier = Applier(target.storage, invalidate=lambda tid, oids: seen.append(
        (tid, oids, target.storage.lastTransaction())))
    applier.apply(flatten(source.txns[:3]))
    assert [s[0] for s in seen] == tids_of(source.txns[:3])
    assert seen[0][1] == frozenset(e.oid for e in source.txns[0] if isinstance(e, Record))
    assert [s[2] for s in seen] == [Z64, *tids_of(source.txns[:2])]


def test_open_file_storage_errors(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        open_file_storage(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        open_file_storage(str(tmp_path / "missing.fs"), read_only=True)
    with pytest.raises(ConfigError, match="does not exist"):
        open_file_storage(str(tmp_path / "x.fs"), str(tmp_path / "noblobs"), read_only=True)
    (tmp_path / "garbage.fs").write_bytes(b"this is not a FileStorage")
    with pytest.raises(ConfigError, match="not a FileStorage"):
        open_file_storage(str(tmp_path / "garbage.fs"))
    first = open_file_storage(str(tmp_path / "deep" / "dir" / "Data.fs"), str(tmp_path / "blobs"))
    try:
        assert last_state(first) == (Z64, None)
        with pytest.raises(StorageInUseError, match="another process holds its lock"):
            open_file_storage(str(tmp_path / "deep" / "dir" / "Data.fs"))
    finally:
        first.close()
    if os.geteuid() != 0:  # root reads anything
        (tmp_path / "secret.fs").write_bytes(b"")
        os.chmod(tmp_path / "secret.fs", 0)
        with pytest.raises(ConfigError, match="permission denied"):
            open_file_storage(str(tmp_path / "secret.fs"))


def _datafs_fsyncs(monkeypatch, storage) -> list[int]:
    """Record every fsync of ``storage``'s Data.fs, by FileStorage itself or by the applier."""
    import sys

    calls: list[int] = []
    st = os.fstat(storage._file.fileno())
    fs_module = sys.modules["ZODB.FileStorage.FileStorage"]
    real_os_fsync, real_fs_fsync = os.fsync, fs_module.fsync

    def is_datafs(n: int) -> bool:  # by inode: the applier fsyncs a duplicate of the descriptor
        other = os.fstat(n)
        return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)

    def os_fsync(n):
        if is_datafs(n):
            calls.append(n)
        real_os_fsync(n)

    def fs_fsync(n):
        if is_datafs(n):
            calls.append(n)
        real_fs_fsync(n)

    monkeypatch.setattr(os, "fsync", os_fsync)
    monkeypatch.setattr(fs_module, "fsync", fs_fsync)
    return calls


def test_group_commit_fsyncs_once_per_batch(source, target, monkeypatch):
    calls = _datafs_fsyncs(monkeypatch, target.storage)
    half = len(source.txns) // 2
    tids = target.applier.apply(flatten(source.txns[:half]))
    assert len(tids) == half and len(calls) == 1
    for txn in source.txns[half:]:  # caught up: one transaction per batch, one fsync each
        target.applier.apply(txn)
    assert len(calls) == 1 + len(source.txns) - half
    assert_replica(source, target)


def _fail_one_fsync(monkeypatch, storage) -> list[int]:
    """The next fsync of ``storage``'s Data.fs fails with EIO, and those after it succeed: what
    Linux does after a failed write-back (it reports the error once, and may drop the pages).
    No disk here fails on demand, so the failure is put in ``os.fsync``'s place."""
    st = os.fstat(storage._file.fileno())
    real, failed = os.fsync, []

    def fsync(n):
        other = os.fstat(n)
        if not failed and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            failed.append(n)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(n)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def test_after_a_failed_fsync_nothing_is_applied_or_durable_until_the_tail_is_cut(source, target, monkeypatch,
                                                                                  caplog):
    third = len(source.txns) // 3
    target.applier.apply(flatten(source.txns[:third]))
    durable, durable_tid = os.path.getsize(target.path), source.txns[third - 1][0].tid
    failed = _fail_one_fsync(monkeypatch, target.storage)
    with caplog.at_level(logging.CRITICAL, "replicator.applier"), pytest.raises(DurabilityError) as caught:
        target.applier.apply(flatten(source.txns[third:2 * third]))
    assert failed and f"past byte {durable}" in str(caught.value) and "Input/output error" in str(caught.value)
    assert "Input/output error" in caplog.text
    # The next fsync would succeed, over pages that may never reach the disk: not asked.
    with pytest.raises(DurabilityError):
        target.applier.make_all_durable()
    with pytest.raises(DurabilityError):
        target.applier.apply(flatten(source.txns[2 * third:]))
    monkeypatch.undo()
    marker = target.path + UNSYNCED_SUFFIX
    assert os.path.exists(marker) and os.path.getsize(target.path) > durable
    target.storage.close()
    with caplog.at_level(logging.WARNING):
        target.reopen()  # open_file_storage cuts the file back
    assert not os.path.exists(marker) and os.path.getsize(target.path) == durable
    assert target.storage.lastTransaction() == durable_tid
    assert f"cut back to byte {durable}" in caplog.text
    # The index FileStorage saved as it closed covered the cut bytes: dropped, not left to be "ignored".
    assert "its saved index, which covered them, is dropped" in caplog.text
    assert "Ignoring index" not in caplog.text
    target.applier.apply(flatten(source.txns[third:]))  # fetched again, blobs included
    assert_replica(source, target)


def test_a_damaged_fsync_marker_stops_the_open(target, caplog):
    target.storage.close()
    marker = target.path + UNSYNCED_SUFFIX
    with open(marker, "w") as fh:
        fh.write("{not json")
    with pytest.raises(DurabilityError, match="is damaged"):
        open_file_storage(target.path, target.blob_dir)
    assert os.path.exists(marker)
    # Read-only opens (verify, say) leave it and say so.
    with caplog.at_level(logging.WARNING, "replicator.storage"):
        open_file_storage(target.path, target.blob_dir, read_only=True).close()
    assert "an fsync of this file failed" in caplog.text
    os.remove(marker)
    target.reopen()


def test_a_new_replica_makes_its_directory_entries_durable(target, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(n):
        synced.append(os.readlink(f"/proc/self/fd/{n}"))
        real(n)

    monkeypatch.setattr(os, "fsync", fsync)
    target.applier.make_all_durable()  # before the first Hello names what the replica holds
    assert {os.path.dirname(target.path), target.blob_dir} <= set(synced)
    synced.clear()
    target.applier.make_all_durable()
    assert synced == [target.path]  # the directories once per applier


def test_group_commit_leaves_other_storages_alone(source, target, tmp_path, monkeypatch):
    other = open_file_storage(str(tmp_path / "other" / "Data.fs"))
    try:
        calls = _datafs_fsyncs(monkeypatch, other)
        target.applier.apply(flatten(source.txns[:3]))
        import transaction
        from ZODB.DB import DB

        db = DB(other)
        with db.transaction() as conn:
            conn.root()["x"] = 1
        assert len(calls) >= 1  # FileStorage's own fsync in tpc_finish, untouched
        assert "_finish_finish" not in vars(other) and transaction
    finally:
        other.close()


def test_group_commit_off_gives_the_same_file(source, target, tmp_path):
    target.applier.apply(flatten(source.txns))
    plain = Target(str(tmp_path / "plain"))
    try:
        plain.applier.close()
        plain.applier = Applier(plain.storage, group_commit=False)
        plain.applier.apply(flatten(source.txns))
        assert "_finish_finish" not in vars(plain.storage)
        with open(plain.path, "rb") as a, open(target.path, "rb") as b:
            assert a.read() == b.read()
    finally:
        plain.storage.close()


def _temp_size(target: Target) -> int:
    return os.path.getsize(target.path + ".tmp")


def test_transaction_data_stays_in_memory_and_the_temp_file_is_back_after(source, target):
    own = target.storage._tfile
    target.applier.apply(flatten(source.txns[:5]))
    assert target.storage._tfile is own  # a promoted node's own commits use FileStorage's file
    assert _temp_size(target) == 0  # nothing went through it
    i = _blob_txn_index(source)
    target.applier.apply(flatten(source.txns[5:i]))
    assert target.applier.apply(source.txns[i][:-1]) == []  # mid-transaction: in memory
    assert target.storage._tfile is not own
    target.applier.abort()
    assert target.storage._tfile is own
    target.applier.apply(flatten(source.txns[i:]))
    assert _temp_size(target) == 0
    assert_replica(source, target)


def _big_transactions() -> list[list]:
    """Hand-made: three 20 KB records (past the 30,000 bytes the tests keep in memory), then a small one."""
    rng = random.Random(5)
    tids = [bytes.fromhex("03ff000000000001"), bytes.fromhex("03ff000000000002")]
    big = seal([TxnBegin(tids[0], Z64, " ", b"", b"big", b""),
                *[Record(bytes(7) + bytes([n]), rng.randbytes(20_000), None) for n in (1, 2, 3)],
                TxnEnd(tids[0], bytes(16))])
    small = seal([TxnBegin(tids[1], tids[0], " ", b"", b"small", b""),
                  Record(bytes(7) + b"\1", b"x" * 100, None), TxnEnd(tids[1], bytes(16))])
    return [big, small]


def test_a_transaction_outgrowing_memory_moves_to_the_temp_file(target, tmp_path, monkeypatch):
    monkeypatch.setattr("replicator.applier.MEMORY_TEMP", 30_000)
    own = target.storage._tfile
    txns = _big_transactions()
    # Its vote copies the file back: the secondary then applies in a thread.
    assert target.applier.apply(txns[0][:2]) == [] and not target.applier.may_stall
    assert target.applier.apply(txns[0][2:-1]) == [] and target.applier.may_stall
    target.applier.abort()
    assert not target.applier.may_stall
    assert target.applier.apply(flatten(txns)) == tids_of(txns)
    assert _temp_size(target) > 40_000  # the big one went through FileStorage's file
    assert target.storage._tfile is own
    for txn in txns:
        assert txn_digest(target.storage, txn[0].tid) == identity_of(txn)
    # Byte for byte what FileStorage writes on its own.
    plain = Target(str(tmp_path / "plain"))
    try:
        plain.applier.close()
        plain.applier = Applier(plain.storage, group_commit=False)
        plain.applier.apply(flatten(txns))
        with open(plain.path, "rb") as a, open(target.path, "rb") as b:
            assert a.read() == b.read()
    finally:
        plain.storage.close()


def test_a_failed_move_to_the_temp_file_commits_nothing(target, monkeypatch):
    """The file-size limit stands for a full disk as the transaction moves to the temp file."""
    monkeypatch.setattr("replicator.applier.MEMORY_TEMP", 30_000)
    txns = _big_transactions()
    own = target.storage._tfile
    before = target.snapshot()
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500, old_limit[1]))
    try:
        with pytest.raises(StorageError, match=r"cannot write .*Data\.fs\.tmp") as info:
            target.applier.apply(txns[0])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert isinstance(info.value.__cause__, OSError)
    assert not target.applier.in_transaction and target.storage._tfile is own
    assert target.snapshot() == before
    assert target.applier.apply(flatten(txns)) == tids_of(txns)


def test_back_pointers_are_found_through_the_object_history(source, target, monkeypatch):
    from replicator.applier import _GroupCommit

    found = []
    real = _GroupCommit._find_in_history

    def spy(self, oid, tid):
        pos = real(self, oid, tid)
        found.append(pos)
        return pos

    monkeypatch.setattr(_GroupCommit, "_find_in_history", spy)
    target.applier.apply(flatten(source.txns))
    with_back = [r for r in flatten(source.txns) if isinstance(r, Record) and r.data_txn is not None]
    assert with_back and len(found) == len(with_back)
    assert any(found)
    assert_replica(source, target)


def test_trace_file_lists_durable_tids(source, tmp_path):
    trace = tmp_path / "trace.txt"
    t = Target(str(tmp_path))
    try:
        t.applier.close()
        t.applier = Applier(t.storage, trace_file=str(trace))
        tids = t.applier.apply(flatten(source.txns))
        t.applier.close()
        start, *lines = trace.read_text().split("\n")[:-1]
        assert start.split()[0] == "start"  # when the applier was ready
        assert [bytes.fromhex(line.split()[0]) for line in lines] == tids
        assert all(float(line.split()[1]) >= float(start.split()[1]) > 1e9 for line in lines)
        assert "_finish_finish" not in vars(t.storage)
    finally:
        t.storage.close()


def test_blob_files_left_by_a_killed_process_are_removed_at_start(tmp_path):
    """A half-received blob (kill -9 mid-blob) leaves a temporary file; the next applier deletes it."""
    from replicator.applier import BLOB_TEMP_PREFIX, Applier
    from replicator.storage import open_file_storage

    storage = open_file_storage(str(tmp_path / "dst.fs"), str(tmp_path / "blobs"))
    try:
        temp = storage.temporaryDirectory()
        leftover = os.path.join(temp, f"{BLOB_TEMP_PREFIX}abc.tmp")
        unrelated = os.path.join(temp, "someone-elses.tmp")
        for path in (leftover, unrelated):
            with open(path, "wb") as f:
                f.write(b"x" * 1000)
        Applier(storage)
        assert not os.path.exists(leftover)
        assert os.path.exists(unrelated)
    finally:
        storage.close()


def test_a_crash_mid_commit_does_not_leave_a_phantom_last_tid(tmp_path):
    """A vote that never finished: ZODB reports its TID as the last one; the replica must not."""
    import shutil

    import ZODB
    from ZODB.Connection import TransactionMetaData
    from ZODB.FileStorage import FileStorage

    from replicator.storage import open_file_storage

    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    with db.transaction() as conn:
        conn.root()["x"] = 1
    committed = db.lastTransaction()
    storage = db.storage
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.store(b"\0" * 8, committed, storage.load(b"\0" * 8)[0], "", txn)
    storage.tpc_vote(txn)  # on disk with status 'c', as a kill -9 would leave it
    shutil.copyfile(path, str(tmp_path / "crashed.fs"))
    storage.tpc_abort(txn)
    db.close()

    raw = FileStorage(str(tmp_path / "crashed.fs"), read_only=True)
    try:
        assert raw.lastTransaction() != committed  # the ZODB behaviour worked around
    finally:
        raw.close()
    for read_only in (True, False):
        fixed = open_file_storage(str(tmp_path / "crashed.fs"), read_only=read_only)
        try:
            assert fixed.lastTransaction() == committed
        finally:
            fixed.close()


def test_group_fsync_in_its_thread_survives_a_pack_swapping_the_file(tmp_path):
    """The fsync of a batch runs beside the applier; a pack of the same storage swaps its file meanwhile."""
    import threading
    import time

    import transaction
    import ZODB
    from persistent.mapping import PersistentMapping

    storage = FileStorage(str(tmp_path / "Data.fs"))
    applier = Applier(storage)  # installs group commit on this storage
    db = ZODB.DB(storage)
    conn = db.open()
    errors: list[BaseException] = []
    stop = threading.Event()

    def fsync_forever() -> None:
        tid = storage.lastTransaction()
        while not stop.is_set():
            try:
                applier.make_durable([tid])
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)
                return

    syncer = threading.Thread(target=fsync_forever)
    try:
        conn.root()["m"] = PersistentMapping()
        transaction.commit()
        syncer.start()
        for _ in range(15):
            for n in range(20):
                conn.root()["m"]["n"] = n  # superseded revisions: each pack frees them and swaps the file
                transaction.commit()
            db.pack(time.time() + 1)
            if errors:
                break
    finally:
        stop.set()
        if syncer.is_alive():
            syncer.join()
        conn.close()
        applier.close()
        db.close()
    assert not errors, errors


def test_an_undo_into_a_transaction_that_undid_two_keeps_the_right_state(tmp_path, target):
    """The history of zopefoundation/ZODB#395, shipped by the tailer and applied.

    T3 undoes T2 and T1 at once, so it holds two records of the object,
    both back pointers (to state 1, then to state 0); T5 undoes T4, and its
    record points into T3.  FileStorage's ``restore`` before ZODB 6.0.1 took
    the first of T3's records for the one meant, and the replica read state
    1 where the primary reads 0 (why pyproject.toml asks for ZODB 6.0.1).
    """
    path = str(tmp_path / "source.fs")
    db = DB(FileStorage(path))
    tm = transaction.TransactionManager()
    try:
        def commit_value(value: int) -> None:
            conn = db.open(tm)
            root = conn.root()
            if value == 0:
                root["obj"] = PersistentMapping()
            root["obj"]["v"] = value
            tm.commit()
            conn.close()

        def value_now() -> int:
            conn = db.open(tm)
            try:
                return conn.root()["obj"]["v"]
            finally:
                tm.abort()
                conn.close()

        for value in (0, 1, 2):
            commit_value(value)
        db.undoMultiple([entry["id"] for entry in db.undoLog(0, 2)], tm.get())  # T3: undo T2 and T1
        tm.commit()
        commit_value(3)
        db.undo(db.undoLog(0, 1)[0]["id"], tm.get())  # T5: undo T4
        tm.commit()
        assert value_now() == 0
    finally:
        db.close()

    with Tailer(path) as tailer:
        events = []
        while more := tailer.read_events():
            events += more
    begins = [e for e in events if isinstance(e, TxnBegin)]
    assert len(begins) == 7  # the root's creation, then T0 to T5
    t3, t5 = begins[4].tid, begins[6].tid
    oids_in_t3 = [e.oid for e in events[events.index(begins[4]):events.index(begins[5])] if isinstance(e, Record)]
    assert len(oids_in_t3) == 2 and oids_in_t3[0] == oids_in_t3[1], "T3 undoes the object twice"
    obj = oids_in_t3[0]
    (last,) = [e for e in events[events.index(begins[6]):] if isinstance(e, Record)]
    assert (last.oid, last.data_txn) == (obj, t3), "T5 ships a back pointer into T3"

    assert target.applier.apply(events) == [b.tid for b in begins]
    src = FileStorage(path, read_only=True)
    try:
        for tid in (t3, t5):
            assert target.storage.loadSerial(obj, tid) == src.loadSerial(obj, tid)
        assert target.storage.load(obj) == src.load(obj)
    finally:
        src.close()
    target.storage.close()
    result = verify(path, target.path)
    assert result.equal, result
    target.reopen()


def test_an_index_that_cannot_be_saved_costs_only_the_quick_start(source, target, monkeypatch, caplog):
    """Saving the storage's index (``save_index``) on a full disk warns and goes on: what was
    applied stays, and the next try waits until as much more was applied."""
    target.applier.apply(flatten(source.txns))
    monkeypatch.setattr("replicator.applier.INDEX_SAVE_BYTES", 1)
    monkeypatch.setattr("replicator.applier.INDEX_SAVE_RATIO", 0)
    assert target.applier.index_save_due

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(target.storage, "_save_index", full_disk)
    target.applier.save_index()
    assert "cannot save the index of" in caplog.text and "No space left on device" in caplog.text
    assert not target.applier.index_save_due
    assert_replica(source, target)


def test_an_index_that_cannot_be_saved_on_close_is_one_warning_not_a_traceback(tmp_path, caplog):
    """A secondary stopped on a full disk: FileStorage's close logged its failure to save the
    index with a traceback, and left a partial index file behind."""
    import errno
    import logging

    from replicator.storage import close_storage

    path = tmp_path / "Data.fs"
    storage = FileStorage(str(path))

    def full(*args, **kwargs):
        with open(f"{path}.index.index_tmp", "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    storage._index.save = full
    with caplog.at_level(logging.WARNING):
        close_storage(storage)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert any("could not save its index on close ([Errno 28] No space left on device)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not (tmp_path / "Data.fs.index.index_tmp").exists()
    FileStorage(str(path), read_only=True).close()  # the file itself opens as before
