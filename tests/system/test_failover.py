"""Hot-standby failover with real processes: kill -9 the primary, promote the standby, fence, rewind.

Every node is a separate process:

- the primary is ``runzeo -C`` whose storage is ``<replicated-primary>``
  (``%import replicator``, TLS from the test CA) wrapping a ``<filestorage>``
  with a blob directory;
- the standby is ``replicator secondary --listen ...`` following it;
- a writer thread of this test commits small transactions (every fifth with
  a blob) through a ZEO ``ClientStorage`` in a closed loop.

How the writer knows the TID of a commit that returned: every transaction
changes the same persistent object, ``root["counter"]``.  When
``transaction.commit()`` returns, ZODB's ``Connection.tpc_finish`` has set
that object's ``_p_serial`` to the TID the storage's ``tpc_finish``
returned, i.e. the TID the ZEO server sent back for this very commit.  That
is exact whatever other clients do, unlike ``db.lastTransaction()`` (moved
by invalidations as well).  Each transaction's description also carries
its sequence number (``w<i>``), and the tests check that the TID found in
the replica bears that description, so a wrong TID cannot pass unnoticed.

The rounds kill -9 the ZEO server at a random moment (seeded: the seed is
printed and ``REPLICATOR_FAILOVER_SEED=<seed>`` replays the schedule, not the
timing), promote the standby with ``replicator promote``, stop it and read
its Data.fs.

- Synchronous (``sync-count 1``): every commit that returned to the writer
  is in the promoted node; none may be lost.
- Asynchronous (``sync-count 0``): commits may be lost (the figure is
  printed); the replica must still be a clean prefix of the primary's history.
- The old primary restarted after the failover (epoch 0 again) takes writes
  until it hears of epoch 1; a secondary of epoch 1 pointed at it is refused
  (exit 4, "stale"), and from then on ZEO writes to it raise ReadOnlyError.
- Its orphaned transactions fork its history from the new primary's: as a
  secondary of the new primary it exits 4 naming the fork and the number of
  orphans; ``replicator rewind`` saves exactly those and truncates; then it
  follows the new primary and ``replicator verify`` finds them equal.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZODB.blob import Blob, is_blob_record
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError

from tests.helpers import (
    REPLICATOR,
    RUNZEO,
    Proc,
    free_port,
    start_secondary,
    tls_args,
    wait_for_port,
    wait_until,
)
from tests.system.sysutil import dump_logs, get_status, storage_tids, try_status

pytestmark = pytest.mark.slow

ROUNDS = 5
SEED = int(os.environ.get("REPLICATOR_FAILOVER_SEED", random.randrange(1 << 32)))


# -- processes -----------------------------------------------------------------


def tls_lines(tls_dir: Path, node: str) -> str:
    return (f"  tls-ca {tls_dir / 'ca.pem'}\n  tls-cert {tls_dir / f'{node}.pem'}\n"
            f"  tls-key {tls_dir / f'{node}.key'}\n")


def write_primary_conf(conf: Path, data_dir: Path, tls_dir: Path, zeo_port: int, repl_port: int, node: str,
                       sync: str) -> Path:
    """A runzeo config: a ``<replicated-primary>`` around a ``<filestorage>`` with blobs."""
    conf.write_text("%import replicator\n"
                    f"<zeo>\n  address 127.0.0.1:{zeo_port}\n</zeo>\n"
                    f"<replicated-primary>\n  listen 127.0.0.1:{repl_port}\n  node {node}\n"
                    f"{tls_lines(tls_dir, 'primary')}{sync}"
                    f"  <filestorage>\n    path {data_dir / 'Data.fs'}\n    blob-dir {data_dir / 'blobs'}\n"
                    "  </filestorage>\n</replicated-primary>\n")
    return conf


def start_runzeo(conf: Path, log: Path, zeo_port: int, repl_port: int) -> Proc:
    proc = Proc([RUNZEO, "-C", str(conf)], log)
    wait_for_port(zeo_port, proc.proc)
    wait_for_port(repl_port, proc.proc)
    return proc


def cli(tls_dir: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``replicator ARGS`` with the test CA's third certificate; output in ``.stdout``."""
    return subprocess.run([REPLICATOR, *args, *tls_args(tls_dir, "tertiary")], capture_output=True, text=True,
                          timeout=timeout)


def wait_exit(proc: Proc, timeout: float) -> int:
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.argv[1]} still runs after {timeout}s:\n{proc.output()[-3000:]}") from None


def history(path: Path, blob_dir: Path | None = None) -> list[tuple[bytes, str]]:
    """(tid, description) of every transaction of a FileStorage, opened read-only."""
    storage = FileStorage(str(path), blob_dir=str(blob_dir) if blob_dir else None, read_only=True)
    try:
        return [(t.tid, t.description.decode("utf-8", "replace")) for t in storage.iterator()]
    finally:
        storage.close()


# -- the writer ----------------------------------------------------------------


class Client:
    """A ZODB database on a ZEO server, with its own transaction manager."""

    def __init__(self, port: int, blob_cache: Path, wait_timeout: float = 2.0, **options) -> None:
        self.storage = ClientStorage(("127.0.0.1", port), blob_dir=str(blob_cache), wait_timeout=wait_timeout,
                                     **options)
        self.db = ZODB.DB(self.storage)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)
        self.root = self.conn.root()
        if "counter" not in self.root:
            self.root["counter"] = PersistentMapping()
            self.root["blobs"] = PersistentMapping()
            self.tm.get().note("setup")
            self.tm.commit()

    def commit(self, note: str, value: int, blob: bytes | None = None, pad: bytes = b"") -> bytes:
        """Commit one transaction; return its TID (only if ``commit()`` returned)."""
        counter = self.root["counter"]
        counter["n"] = value
        counter["pad"] = pad
        if blob is not None:
            b = Blob()
            with b.open("w") as fh:
                fh.write(blob)
            self.root["blobs"][f"b{value % 7}"] = b
        self.tm.get().note(note)
        self.tm.commit()
        # Connection.tpc_finish set the changed object's serial to the TID tpc_finish returned.
        return counter._p_serial

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.tm.abort()
        with contextlib.suppress(Exception):
            self.conn.close()
        with contextlib.suppress(Exception):
            self.db.close()


class Writer(threading.Thread):
    """Commits ``w<i>`` transactions until the server goes away; records (i, tid) of each that returned."""

    def __init__(self, port: int, blob_cache: Path, seed: int) -> None:
        super().__init__(name="failover-writer", daemon=True)
        self.port, self.blob_cache, self.seed = port, blob_cache, seed
        self.returned: list[tuple[int, bytes]] = []
        self.attempted = 0
        self.failure: BaseException | None = None
        self.failed_at: float | None = None
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        rng = random.Random(self.seed)
        client = None
        try:
            client = Client(self.port, self.blob_cache)
            self.ready.set()
            last = b"\0" * 8
            i = 0
            while not self.stopping.is_set():
                i += 1
                self.attempted = i
                blob = rng.randbytes(rng.randint(1, 5000)) if i % 5 == 0 else None
                tid = client.commit(f"w{i}", i, blob, rng.randbytes(rng.randint(1, 300)))
                assert tid > last, (tid.hex(), last.hex())
                last = tid
                self.returned.append((i, tid))
        except BaseException as exc:  # the server was killed (or a bug: the test tells which)
            self.failure = exc
            self.failed_at = time.monotonic()
        finally:
            self.ready.set()
            if client is not None:
                client.close()


# -- one failover ----------------------------------------------------------------


@dataclass
class Outcome:
    returned: list[tuple[int, bytes]]
    primary: list[bytes]  # the old primary's Data.fs after the kill
    replica: list[tuple[bytes, str]]  # the promoted node's Data.fs
    promoted_at: bytes
    ran_for: float
    writer_error: str

    @property
    def replica_tids(self) -> list[bytes]:
        return [tid for tid, _ in self.replica]

    @property
    def lost(self) -> list[tuple[int, bytes]]:
        have = set(self.replica_tids)
        return [(i, tid) for i, tid in self.returned if tid not in have]


@dataclass
class Site:
    """Old primary "a" (runzeo), standby "b" (replicator secondary) and their files, in ``workdir``."""

    workdir: Path
    tls: Path
    sync: str
    zeo_port: int = field(default_factory=free_port)
    repl_port: int = field(default_factory=free_port)
    b_listen: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    #: More options of the standby's `replicator secondary`.
    b_extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.a_dir, self.b_dir = self.workdir / "a", self.workdir / "b"
        for d in (self.a_dir / "blobs", self.b_dir / "blobs"):
            d.mkdir(parents=True)
        self.conf = write_primary_conf(self.workdir / "a-zeo.conf", self.a_dir, self.tls, self.zeo_port,
                                       self.repl_port, "a", self.sync)
        self.runs = 0

    def start_a(self) -> Proc:
        self.runs += 1
        proc = self.a = start_runzeo(self.conf, self.workdir / f"a-zeo-{self.runs}.log", self.zeo_port,
                                     self.repl_port)
        self.procs.append(proc)
        return proc

    def start_b(self) -> Proc:
        proc = start_secondary(self.workdir, self.b_dir / "Data.fs", self.b_dir / "blobs", self.repl_port,
                               self.tls, name="b", status_port=self.b_listen, extra=list(self.b_extra))
        self.b = proc
        self.procs.append(proc)
        return proc

    def track(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(10)


def fail_over(site: Site, rng: random.Random, keep_standby: bool = False) -> Outcome:
    """Write through ZEO, kill -9 the primary at a random moment, promote the standby, read both files.

    The promoted standby is stopped before its file is read, unless ``keep_standby`` (it then
    serves epoch 1 on; promoted, it writes nothing more to its file).
    """
    a = site.start_a()
    b = site.start_b()
    wait_until(lambda: (s := try_status(site.repl_port, site.tls)) and s["secondaries"], timeout=30,
               what="the standby connected to the primary")
    writer = Writer(site.zeo_port, site.workdir / "writer-blobs", rng.randrange(1 << 30))
    writer.start()
    assert writer.ready.wait(30)
    assert writer.failure is None, f"writer could not start: {writer.failure!r}"
    started = time.monotonic()
    delay = rng.uniform(0.3, 1.5)
    time.sleep(delay)
    a.kill9()
    killed_at = time.monotonic()
    writer.stopping.set()
    writer.join(30)
    assert not writer.is_alive(), "the writer hangs after the primary was killed"
    assert writer.failure is None or writer.failed_at >= killed_at, f"writer failed before the kill: {writer.failure!r}"
    assert len(writer.returned) >= 3, f"only {len(writer.returned)} commits in {delay:.2f}s"

    done = cli(site.tls, "promote", f"127.0.0.1:{site.b_listen}")
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"is the primary of epoch 1 from transaction ([0-9a-f]{16})", done.stdout)
    assert match, done.stdout
    # The old primary is gone: promote says it could not be told, and what to do about it.
    assert f"WARNING: the former primary at 127.0.0.1:{site.repl_port} was not told of epoch 1" in done.stdout, \
        done.stdout
    status = get_status(site.b_listen, site.tls)
    assert status["role"] == "primary" and status["epoch"] == 1 and status["promoted"], status
    assert b.alive(), "the promoted standby stopped:\n" + b.output()[-3000:]
    if not keep_standby:
        assert b.stop() == 0, b.output()[-3000:]
    return Outcome(returned=writer.returned, primary=storage_tids(site.a_dir / "Data.fs"),
                   replica=history(site.b_dir / "Data.fs"), promoted_at=bytes.fromhex(match.group(1)),
                   ran_for=killed_at - started, writer_error=type(writer.failure).__name__)


def check_clean_prefix(out: Outcome) -> None:
    """The replica holds the old primary's first transactions, in order, and nothing else."""
    replica = out.replica_tids
    assert replica == out.primary[:len(replica)], "the replica is not a prefix of the primary's history"
    assert replica and replica[-1] == out.promoted_at
    # Every commit that returned is in the old primary's file (FileStorage fsyncs in tpc_finish).
    primary = set(out.primary)
    assert all(tid in primary for _, tid in out.returned)


def report(mode: str, n: int, out: Outcome) -> str:
    line = (f"{mode} round {n}: killed after {out.ran_for:.2f}s; {len(out.returned)} commits returned, "
            f"{len(out.lost)} lost; promoted node has {len(out.replica)} txns, the old primary "
            f"{len(out.primary)} ({len(out.primary) - len(out.replica)} never replicated); writer saw "
            f"{out.writer_error}")
    print(line, flush=True)
    return line


#: The standby reads at most this fast (``--max-rate``), well under what the writer commits,
#: so that it lags behind the primary: what asynchronous mode then loses at the kill,
#: synchronous mode must not.  On loopback it would otherwise never be behind.
STANDBY_RATE = ("--max-rate", "16k")


def run_rounds(tmp_path: Path, tls_dir: Path, mode: str, sync: str) -> list[Outcome]:
    print(f"\nseed {SEED} (REPLICATOR_FAILOVER_SEED={SEED} replays the schedule)")
    rng = random.Random(f"{SEED}-{mode}")
    outcomes, lines = [], []
    for n in range(1, ROUNDS + 1):
        site = Site(tmp_path / f"round{n}", tls_dir, sync, b_extra=STANDBY_RATE)
        try:
            out = fail_over(site, rng)
            site.stop_all()
            lines.append(report(mode, n, out))
            check_clean_prefix(out)
            outcomes.append(out)
            if mode == "sync":
                assert not out.lost, (f"round {n}: {len(out.lost)} returned commits lost in synchronous mode, "
                                      f"the first {out.lost[0][1].hex()} (commit w{out.lost[0][0]})")
            # The TIDs the writer recorded are those of its own commits.
            descriptions = dict(out.replica)
            for i, tid in out.returned:
                assert descriptions.get(tid, f"w{i}") == f"w{i}", (i, tid.hex(), descriptions[tid])
        except BaseException:
            site.stop_all()
            print(f"seed {SEED}, round {n}")
            dump_logs(site.workdir)
            raise
    print("\n".join(["summary:", *lines]))
    return outcomes


# -- the tests -----------------------------------------------------------------


def test_synchronous_mode_loses_no_returned_commit(tmp_path, tls_dir):
    """sync-count 1: after kill -9 of the primary and promotion, every commit that returned is there."""
    outcomes = run_rounds(tmp_path, tls_dir, "sync", "  sync-count 1\n  sync-timeout 10\n")
    assert sum(len(o.returned) for o in outcomes) > 0
    assert sum(len(o.lost) for o in outcomes) == 0


def test_asynchronous_mode_leaves_a_clean_prefix(tmp_path, tls_dir):
    """sync-count 0: commits may be lost (counted), but the replica is a prefix of the primary's history."""
    outcomes = run_rounds(tmp_path, tls_dir, "async", "  sync-count 0\n")
    returned = sum(len(o.returned) for o in outcomes)
    lost = sum(len(o.lost) for o in outcomes)
    print(f"asynchronous mode: {lost} of {returned} returned commits lost over {len(outcomes)} rounds")
    # The control of the synchronous test: the same lagging standby does lose returned commits
    # here, so that test's zero is synchronous mode's doing, not a standby that never lags.
    assert lost > 0, "the standby never lagged: the synchronous test could not tell the modes apart"
    for o in outcomes:
        # What was lost is exactly the old primary's unreplicated tail, never something in the middle.
        assert {tid for _, tid in o.lost} <= set(o.primary[len(o.replica):])


def test_stale_primary_is_fenced_then_rewound_to_follow_the_new_primary(tmp_path, tls_dir):
    """Failover, the old primary comes back at epoch 0, takes orphans, is fenced by epoch 1, is rewound."""
    rng = random.Random(f"{SEED}-fence")
    print(f"\nseed {SEED}")
    # Synchronous, but a commit that finds no secondary returns after 1.5 s
    # (async fallback): the old primary, back alone, can take orphans.
    site = Site(tmp_path, tls_dir, "  sync-count 1\n  sync-timeout 1.5\n  sync-fallback async\n")
    clients: list[Client] = []
    try:
        out = fail_over(site, rng, keep_standby=True)
        report("sync", 1, out)
        check_clean_prefix(out)  # (no-loss is the first test's: here a commit may degrade after 1.5 s)
        promoted = out.replica_tids

        # -- the old primary comes back with the same configuration, epoch 0 and writable, where the
        # promoted node cannot reach it: it keeps trying the address it followed and would fence it
        # within seconds.  So on another replication port (a moved host, or a partition).
        site.repl_port = free_port()
        site.conf = write_primary_conf(site.workdir / "a-zeo.conf", site.a_dir, site.tls, site.zeo_port,
                                       site.repl_port, "a", site.sync)
        site.start_a()
        status = get_status(site.repl_port, site.tls)
        assert status["epoch"] == 0 and not status["stale"] and status["fenced"] is None, status
        old = Client(site.zeo_port, tmp_path / "old-client-blobs", wait_timeout=10)
        clients.append(old)
        orphan_blobs = {}
        for k in range(4):
            data = rng.randbytes(rng.randint(1, 20_000))
            tid = old.commit(f"orphan{k}", 10_000 + k, blob=data)
            orphan_blobs[tid] = data
        status = get_status(site.repl_port, site.tls)
        assert status["sync"]["degraded"] and status["sync"]["async_commits"] >= 4, status["sync"]

        # -- a third secondary joins epoch 1 by following the promoted node ...
        c_dir = tmp_path / "c"
        (c_dir / "blobs").mkdir(parents=True)
        c_listen = free_port()
        c = site.track(start_secondary(tmp_path, c_dir / "Data.fs", c_dir / "blobs", site.b_listen, tls_dir,
                                       name="c", status_port=c_listen))
        wait_until(lambda: (s := try_status(c_listen, tls_dir)) and s["epoch"] == 1
                   and s["last_tid"] == out.promoted_at.hex(), timeout=30, what="c caught up in epoch 1")
        assert c.stop() == 0, c.output()[-3000:]
        # ... and refuses the stale primary, which learns of epoch 1 from it and fences itself.
        c2 = site.track(start_secondary(tmp_path, c_dir / "Data.fs", c_dir / "blobs", site.repl_port, tls_dir,
                                        name="c-to-stale"))
        assert wait_exit(c2, 30) == 4, c2.output()[-3000:]
        assert "stale" in c2.output(), c2.output()[-3000:]
        status = get_status(site.repl_port, site.tls)
        assert status["stale"] is True and "epoch 1" in (status["fenced"] or ""), status
        before = old.storage.lastTransaction()
        # The client connected before the fence may have been dropped (ZEO decides read-only at
        # registration); either way its write fails.  A client that connects now, read-only if
        # it must, gets ReadOnlyError.
        old.root["counter"]["n"] = -1
        with pytest.raises((ReadOnlyError, ClientDisconnected)):
            old.tm.commit()
        old.tm.abort()
        old.close()
        clients.remove(old)
        late = Client(site.zeo_port, tmp_path / "late-client-blobs", wait_timeout=10, read_only_fallback=True)
        clients.append(late)
        assert late.storage.lastTransaction() == before
        late.root["counter"]["n"] = -2
        with pytest.raises(ReadOnlyError):
            late.tm.commit()
        late.tm.abort()
        late.close()
        clients.remove(late)
        for proc in (site.a, site.b):  # the old primary (runzeo) and the promoted standby
            assert proc.stop() == 0, proc.output()[-3000:]
        a_history = storage_tids(site.a_dir / "Data.fs")
        assert a_history[-1] == before  # the refused write left nothing
        assert a_history[:len(promoted)] == promoted
        orphans = a_history[len(promoted):]
        assert list(orphan_blobs) == orphans[-4:]

        # -- the new primary takes writes: runzeo with <replicated-primary> on b's file (epoch 1).
        new_zeo, new_repl = free_port(), free_port()
        new_conf = write_primary_conf(tmp_path / "b-zeo.conf", site.b_dir, tls_dir, new_zeo, new_repl, "b", "")
        site.track(start_runzeo(new_conf, tmp_path / "b-zeo.log", new_zeo, new_repl))
        status = get_status(new_repl, tls_dir)
        assert status["epoch"] == 1 and status["fenced"] is None, status
        new = Client(new_zeo, tmp_path / "new-client-blobs", wait_timeout=10)
        clients.append(new)
        for k in range(3):
            new.commit(f"new{k}", 20_000 + k, blob=rng.randbytes(100) if k == 1 else None)
        new_head = new.storage.lastTransaction()

        # -- the old node, as a secondary of the new primary, is refused: its history forks.
        refused = site.track(Proc([REPLICATOR, "secondary", "--storage", str(site.a_dir / "Data.fs"),
                                   "--blob-dir", str(site.a_dir / "blobs"), "--primary", f"127.0.0.1:{new_repl}",
                                   "--node", "a", *tls_args(tls_dir, "primary")], tmp_path / "a-refused.log"))
        assert wait_exit(refused, 30) == 4, refused.output()[-3000:]
        said = refused.output()
        assert f"histories fork after {out.promoted_at.hex()}" in said, said[-3000:]
        assert f"this node has {len(orphans)} transaction(s)" in said, said[-3000:]

        # -- rewind: the orphans are saved (exactly them, blobs included), the file is cut at the fork.
        done = cli(tls_dir, "rewind", "--storage", str(site.a_dir / "Data.fs"), "--blob-dir",
                   str(site.a_dir / "blobs"), "--primary", f"127.0.0.1:{new_repl}")
        assert done.returncode == 0, done.stdout + done.stderr
        print(done.stdout)
        saved = re.search(r"Saved them to (\S+)", done.stdout)
        assert saved, done.stdout
        saved_path = Path(saved.group(1))
        assert saved_path.parent == site.a_dir and saved_path.name.startswith(
            f"Data.fs.orphans-{out.promoted_at.hex()}-")
        storage = FileStorage(str(saved_path), blob_dir=f"{saved_path}.blobs", read_only=True)
        try:
            assert [t.tid for t in storage.iterator()] == orphans
            for t in storage.iterator():
                if t.tid in orphan_blobs:
                    # (A Blob written before it is added is stored twice in its transaction, by ZODB.)
                    blobs = {r.oid for r in t if r.data is not None and is_blob_record(r.data)}
                    assert len(blobs) == 1
                    with open(storage.loadBlob(blobs.pop(), t.tid), "rb") as fh:
                        assert fh.read() == orphan_blobs[t.tid]
        finally:
            storage.close()
        assert storage_tids(site.a_dir / "Data.fs") == promoted

        # -- the old node follows the new primary and ends equal to it.
        a_listen = free_port()
        follower = site.track(start_secondary(tmp_path, site.a_dir / "Data.fs", site.a_dir / "blobs", new_repl,
                                              tls_dir, name="a-follows", status_port=a_listen))
        wait_until(lambda: (s := try_status(a_listen, tls_dir)) and s["last_tid"] == new_head.hex(),
                   timeout=30, what="the rewound node caught up with the new primary")
        assert get_status(a_listen, tls_dir)["epoch"] == 1
        new.close()
        clients.remove(new)
        site.stop_all()
        assert follower.proc.returncode == 0, follower.output()[-3000:]
        check = subprocess.run([REPLICATOR, "verify", str(site.a_dir / "Data.fs"), str(site.b_dir / "Data.fs"),
                                "--blob-dir-a", str(site.a_dir / "blobs"), "--blob-dir-b", str(site.b_dir / "blobs")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "equal" in check.stdout
        print(check.stdout)
    except BaseException:
        print(f"seed {SEED}")
        for client in clients:
            client.close()
        site.stop_all()
        dump_logs(tmp_path)
        raise
    finally:
        for client in clients:
            client.close()
        site.stop_all()


def test_a_commit_waiting_for_acknowledgements_does_not_freeze_the_zeo_server(tmp_path, tls_dir):
    """sync-count 1 and no secondary: a commit waits (2 s here), but other clients must still be served."""
    data = tmp_path / "a"
    (data / "blobs").mkdir(parents=True)
    seed_db = ZODB.DB(FileStorage(str(data / "Data.fs"), blob_dir=str(data / "blobs")))
    with seed_db.transaction() as conn:  # the root, so that opening a database commits nothing
        conn.root()["counter"] = PersistentMapping()
        conn.root()["blobs"] = PersistentMapping()
    seed_db.close()
    zeo_port, repl_port = free_port(), free_port()
    conf = write_primary_conf(tmp_path / "a-zeo.conf", data, tls_dir, zeo_port, repl_port, "a",
                              "  sync-count 1\n  sync-timeout 2\n  sync-fallback async\n")
    server = start_runzeo(conf, tmp_path / "a-zeo.log", zeo_port, repl_port)
    writer = reader = None
    try:
        writer = Client(zeo_port, tmp_path / "writer-blobs", wait_timeout=10)
        reader = ClientStorage(("127.0.0.1", zeo_port), wait_timeout=10)
        started = time.monotonic()
        committing = threading.Thread(target=writer.commit, args=("held", 1), daemon=True)
        committing.start()
        time.sleep(0.3)  # the commit now waits for an acknowledgement that cannot come
        asked = time.monotonic()
        reader.history(b"\0" * 8)  # a round trip to the server, nothing to do with the commit
        answered = time.monotonic()
        # The read came back while the commit was still held: it did not wait for it.
        assert committing.is_alive(), "the commit returned before sync-timeout, with no secondary to acknowledge it"
        committing.join(10)
        held = time.monotonic() - started
        print(f"commit held {held:.2f}s; a read asked meanwhile took {answered - asked:.2f}s")
        assert held >= 1.8, f"the commit returned after {held:.2f}s, before sync-timeout (2 s)"
        assert answered - asked < 1.0, f"a read waited {answered - asked:.2f}s for another client's commit"
    except BaseException:
        dump_logs(tmp_path)
        raise
    finally:
        if reader is not None:
            reader.close()
        if writer is not None:
            writer.close()
        server.stop()


def test_a_fenced_primary_restarted_with_its_configuration_stays_fenced(tmp_path, tls_dir):
    """The runbook's fence, then an emergency promotion of the standby, then the old primary's ZEO
    server restarted with its unchanged configuration (a reboot): it must come back fenced, not as
    a second writable primary whose commits its own secondaries would follow."""
    site = Site(tmp_path, tls_dir, "")
    client = None
    try:
        site.start_a()
        site.start_b()
        writer = Client(site.zeo_port, tmp_path / "writer-blobs")
        head = writer.commit("w1", 1)
        writer.close()
        wait_until(lambda: (s := try_status(site.b_listen, tls_dir)) and s["last_tid"] == head.hex(), timeout=30,
                   what="the standby caught up")
        old, standby = f"127.0.0.1:{site.repl_port}", f"127.0.0.1:{site.b_listen}"
        fenced = cli(tls_dir, "fence", old)
        assert fenced.returncode == 0 and "fenced (fenced by an operator)" in fenced.stdout, fenced.stdout + fenced.stderr
        promoted = cli(tls_dir, "promote", standby)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        assert site.a.stop() == 0, site.a.output()[-3000:]

        a = site.start_a()  # the same runzeo configuration, as after a reboot
        status = get_status(site.repl_port, tls_dir)
        assert status["role"] == "primary" and status["fenced"] == "fenced by an operator", status
        # The promotion told it of the new epoch: no `fence --undo` offered, none accepted.
        assert status["superseded"] == "by epoch 1 (seen from b)", status
        assert "then superseded by epoch 1 (seen from b), and stays so across this restart" in a.output()
        assert "fence --undo" not in a.output()
        undo = cli(tls_dir, "fence", "--undo", old)
        assert undo.returncode == 2 and "would make two primaries" in undo.stderr, undo.stdout + undo.stderr
        client = Client(site.zeo_port, tmp_path / "client-blobs", wait_timeout=10, read_only_fallback=True)
        assert client.storage.isReadOnly()
        with pytest.raises(ReadOnlyError):
            client.commit("after the restart", 2)
        client.tm.abort()
        assert storage_tids(site.a_dir / "Data.fs")[-1] == head
        assert get_status(site.b_listen, tls_dir)["role"] == "primary"
    except BaseException:
        dump_logs(tmp_path)
        raise
    finally:
        if client is not None:
            client.close()
        site.stop_all()
