"""kill -9 the primary and the secondary, at random, while a ZEO server takes a live workload.

Real processes: ``runzeo`` (FileStorage with a blob directory) takes random
commits from a client thread of this test (objects, BTrees, blobs, undo),
``replicator primary`` tails its Data.fs, ``replicator secondary`` follows.
Rounds of random delays kill -9 the secondary (restarted: it resumes from its
own last TID), the primary (restarted: the secondary reconnects by itself)
or both; besides, the secondary is killed at least once while it writes a
big blob and once while it restores a multi-MB transaction, and the primary
once while it streams a big blob.  After each kill of the secondary its
Data.fs must open cleanly.  At the end the secondary must equal the ZEO
server's storage: same transactions, none missing, none twice.

The random choices are seeded; the seed is printed, and
``REPLICATOR_CRASH_SEED=<seed>`` replays a run's schedule (not its timing).
"""

from __future__ import annotations

import os
import queue
import random
import re
import threading
import time
from pathlib import Path

import pytest

from replicator.verify import verify
from tests.helpers import (
    Workload,
    free_port,
    start_primary,
    start_secondary,
    start_zeo,
    wait_until,
    zeo_db,
)
from tests.system.sysutil import assert_opens_cleanly, dump_logs, storage_tids, try_status

RANDOM_ROUNDS = 5
BIG_BLOB_MB = (24, 40)
BIG_TXN_MB = (12, 20)
MB = 1 << 20


class Writer(threading.Thread):
    """Commits a random workload through a ZEO client until stopped; runs big commits on request."""

    def __init__(self, db, seed: int) -> None:
        super().__init__(name="workload", daemon=True)
        self.db = db
        self.seed = seed
        self.requests: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.commits = 0

    def big(self, kind: str, megabytes: int) -> queue.Queue:
        """Ask for one big commit; the returned queue receives its TID."""
        done: queue.Queue = queue.Queue()
        self.requests.put((kind, megabytes, done))
        return done

    def tid_of(self, marker: str) -> bytes:
        """TID of the recent commit whose description starts with ``marker``, asked of the server.

        (Neither the client's lastTransaction() nor a blob's _p_serial is
        reliably the new TID right after the commit.)
        """
        for entry in self.db.undoLog(0, 20):
            description = entry["description"]
            if isinstance(description, bytes):
                description = description.decode("utf-8", "replace")
            if description.startswith(marker + "\n") or description == marker:
                return entry["id"]
        raise AssertionError(f"commit {marker!r} not in the undo log")

    def run(self) -> None:
        pace = random.Random(self.seed + 1)
        try:
            work = Workload(self.db, seed=self.seed)
            try:
                while not self.stopping.is_set():
                    try:
                        kind, megabytes, done = self.requests.get_nowait()
                    except queue.Empty:
                        work.commit_random(1)
                        self.commits += 1
                        time.sleep(pace.uniform(0.0, 0.02))
                    else:
                        marker = f"request {self.commits}"
                        try:
                            work.tm.get().note(marker)
                            if kind == "blob":
                                work.write_blob("big", megabytes * MB)
                                work.tm.get().note(f"big blob {megabytes} MB")
                                work.tm.commit()
                            else:
                                work.big_transaction(megabytes)
                            done.put(self.tid_of(marker))
                        except BaseException:
                            done.put(None)
                            raise
                        self.commits += 1
            finally:
                work.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


class Cluster:
    """The ZEO server, the primary and the secondary of one test, with their paths."""

    def __init__(self, tmp_path: Path, tls_dir: Path) -> None:
        self.tmp, self.tls = tmp_path, tls_dir
        self.zeo_fs, self.zeo_blobs = tmp_path / "zeo" / "Data.fs", tmp_path / "zeo" / "blobs"
        self.sec_fs, self.sec_blobs = tmp_path / "sec" / "Data.fs", tmp_path / "sec" / "blobs"
        for d in (self.zeo_blobs, self.sec_blobs):
            d.mkdir(parents=True)
        self.zeo_port, self.port, self.status_port = free_port(), free_port(), free_port()
        self.zeo = self.primary = self.secondary = None
        self.secondary_kills = self.primary_kills = 0

    def start_primary(self) -> None:
        self.primary = start_primary(self.tmp, self.zeo_fs, self.zeo_blobs, self.port, self.tls)

    def start_secondary(self) -> None:
        self.secondary = start_secondary(self.tmp, self.sec_fs, self.sec_blobs, self.port, self.tls,
                                         status_port=self.status_port)

    def kill_secondary(self) -> list[bytes]:
        """kill -9 the secondary; its Data.fs must open cleanly; return its TIDs."""
        assert self.secondary.alive(), "the secondary died by itself"
        self.secondary.kill9()
        self.secondary_kills += 1
        return assert_opens_cleanly(self.sec_fs, self.tmp / "scratch")

    def restart_secondary(self, tids: list[bytes]) -> None:
        self.start_secondary()
        # It resumes from its own last transaction, not from scratch.
        expected = tids[-1].hex() if tids else "0000000000000000"
        wait_until(lambda: self._last_opened() is not None and self._last_opened().startswith(expected),
                   timeout=10, what="restarted secondary opened its storage")

    def _last_opened(self) -> str | None:
        found = re.findall(r"secondary \S+ opened \S+ at (\S+)", self.secondary.output())
        return found[-1] if found else None

    def kill_primary(self, rng: random.Random, restart: bool = True) -> None:
        assert self.primary.alive(), "the primary died by itself"
        self.primary.kill9()
        self.primary_kills += 1
        if restart:
            self.restart_primary(rng)

    def restart_primary(self, rng: random.Random) -> None:
        time.sleep(rng.uniform(0.0, 1.0))
        self.start_primary()

    def secondary_tid(self) -> str | None:
        status = try_status(self.status_port, self.tls)
        return status["last_tid"] if status else None

    def temp_blobs(self) -> dict[Path, int]:
        sizes = {}
        for path in (self.sec_blobs / "tmp").glob("repl-*.tmp"):
            try:
                sizes[path] = path.stat().st_size
            except FileNotFoundError:
                pass
        return sizes

    def tfile_size(self) -> int:
        try:
            return (self.sec_fs.parent / (self.sec_fs.name + ".tmp")).stat().st_size
        except FileNotFoundError:
            return 0


def poll(predicate, timeout: float, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def kill_inside_big_commit(cluster: Cluster, writer: Writer, rng: random.Random, what: str) -> bool:
    """Kill while a big commit is being applied (or, for ``primary-blob``, streamed).

    Returns True when the kill provably landed inside the transaction: the
    secondary's storage does not hold it yet.
    """
    if what == "secondary-txn":
        megabytes = rng.randint(*BIG_TXN_MB)
        base = max(cluster.tfile_size(), MB)
        done = writer.big("txn", megabytes)
        # The secondary restores records into Data.fs.tmp until the vote.
        hit = poll(lambda: base + 2 * MB <= cluster.tfile_size() < base + (megabytes - 2) * MB, timeout=60)
    else:
        megabytes = rng.randint(*BIG_BLOB_MB)
        old = set(cluster.temp_blobs())
        done = writer.big("blob", megabytes)

        def growing() -> str | None:
            for p, size in cluster.temp_blobs().items():
                if p not in old and 2 * MB <= size <= (megabytes - 2) * MB:
                    return f"{p.name} at {size / MB:.1f} MB"
            return None
        hit = poll(growing, timeout=60)
    if what == "primary-blob":
        cluster.kill_primary(rng, restart=False)
        tid = done.get(timeout=60)
        assert tid is not None, f"the workload failed: {writer.error!r}"
        # With the primary gone, the secondary cannot have finished the transaction since.
        applied = bytes.fromhex(cluster.secondary_tid() or "00" * 8)
        inside = bool(hit) and applied < tid
        print(f"  {what}: {megabytes} MB, seen {hit}, secondary at {applied.hex()}, "
              f"kill {'inside the transaction' if inside else 'missed it'}")
        cluster.restart_primary(rng)
        return inside
    tids = cluster.kill_secondary()
    tid = done.get(timeout=60)
    assert tid is not None, f"the workload failed: {writer.error!r}"
    inside = bool(hit) and tid not in tids
    print(f"  {what}: {megabytes} MB, seen {hit}, secondary at {len(tids)} txns, "
          f"kill {'inside the transaction' if inside else 'missed it'}")
    cluster.restart_secondary(tids)
    return inside


@pytest.mark.slow  # about 30-50 s
def test_kill9_primary_and_secondary_during_live_workload(tmp_path, tls_dir):
    seed = int(os.environ.get("REPLICATOR_CRASH_SEED") or random.randrange(1 << 32))
    print(f"crash test seed: {seed} (replay with REPLICATOR_CRASH_SEED={seed})")
    rng = random.Random(seed)
    cluster = Cluster(tmp_path, tls_dir)
    db = writer = None
    started = time.monotonic()
    try:
        cluster.zeo = start_zeo(tmp_path, cluster.zeo_fs, cluster.zeo_blobs, cluster.zeo_port)
        db = zeo_db(cluster.zeo_port, tmp_path / "blob-cache")
        writer = Writer(db, seed)
        writer.start()
        cluster.start_primary()
        cluster.start_secondary()

        plan = ["secondary", "primary", "both"] + [rng.choice(["secondary", "primary", "both"])
                                                  for _ in range(RANDOM_ROUNDS - 3)]
        plan += ["secondary-blob", "secondary-txn", "primary-blob"]
        rng.shuffle(plan)
        inside = {"secondary-blob": False, "secondary-txn": False, "primary-blob": False}
        for step in plan:
            time.sleep(rng.uniform(0.3, 2.0))
            assert writer.is_alive(), f"the workload stopped: {writer.error!r}"
            print(f"{time.monotonic() - started:6.1f}s {step} (workload at {writer.commits} commits)")
            if step in ("secondary", "both"):
                tids = cluster.kill_secondary()
                if step == "both":
                    cluster.kill_primary(rng)
                time.sleep(rng.uniform(0.0, 0.5))
                cluster.restart_secondary(tids)
            elif step == "primary":
                cluster.kill_primary(rng)
            else:
                inside[step] = kill_inside_big_commit(cluster, writer, rng, step)
        # A kill that came too late is tried again, a few times.
        for step in [s for s, ok in inside.items() if not ok]:
            for _ in range(3):
                if inside[step]:
                    break
                time.sleep(rng.uniform(0.2, 0.5))
                inside[step] = kill_inside_big_commit(cluster, writer, rng, step)
        assert all(inside.values()), f"no kill landed inside a big commit: {inside}"

        time.sleep(rng.uniform(0.5, 1.5))
        writer.stopping.set()
        writer.join(60)
        assert not writer.is_alive() and writer.error is None, f"the workload failed: {writer.error!r}"
        final = db.lastTransaction().hex()
        wait_until(lambda: (try_status(cluster.port, tls_dir) or {}).get("last_tid") == final, timeout=30,
                   what="primary seeing the last commit")
        wait_until(lambda: cluster.secondary_tid() == final, timeout=90, what="secondary catching up")
        print(f"{time.monotonic() - started:6.1f}s caught up at {final} after {writer.commits} commits, "
              f"{cluster.secondary_kills} secondary and {cluster.primary_kills} primary kills")
        assert cluster.secondary.alive() and cluster.primary.alive()
        assert cluster.secondary.stop() == 0
        # What the killed secondaries left half-received was removed at their restarts.
        leftovers = sorted(p.name for p in Path(cluster.sec_blobs, "tmp").glob("repl-*.tmp"))
        assert not leftovers, f"blob files a killed secondary was receiving are still there: {leftovers}"
        assert cluster.primary.stop() == 0
        db.close()
        db = None
        assert cluster.zeo.stop() == 0

        result = verify(str(cluster.zeo_fs), str(cluster.sec_fs), str(cluster.zeo_blobs), str(cluster.sec_blobs))
        assert result.equal, result
        source_tids, replica_tids = storage_tids(cluster.zeo_fs), storage_tids(cluster.sec_fs)
        assert len(replica_tids) == len(source_tids) == result.transactions
        assert replica_tids == source_tids
        assert len(set(replica_tids)) == len(replica_tids)
        assert all(a < b for a, b in zip(replica_tids, replica_tids[1:], strict=False))
        assert assert_opens_cleanly(cluster.sec_fs, tmp_path / "scratch") == source_tids
    except BaseException:
        print(f"crash test seed: {seed}")
        dump_logs(tmp_path)
        raise
    finally:
        if writer is not None:
            writer.stopping.set()
            writer.join(30)
        for proc in (cluster.secondary, cluster.primary):
            if proc is not None:
                proc.stop()
        if db is not None:
            db.close()
        if cluster.zeo is not None:
            cluster.zeo.stop()
