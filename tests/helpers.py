"""Shared test machinery: workloads, processes, ports and certificates.

Everything here drives real parts: ZODB databases on real FileStorage files,
ZEO servers started with ``runzeo``, and the ``replicator`` command itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob

BIN = Path(sys.executable).parent
REPLICATOR = str(BIN / "replicator")
RUNZEO = str(BIN / "runzeo")


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on now, and that this process has not handed out before.

    The kernel may pick the same free port twice in a row; two servers of
    one test given the same port is a failure that has nothing to do with
    what the test checks.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} after {timeout}s")


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s")


async def until(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.05) -> None:
    """``wait_until`` for a coroutine: poll ``predicate`` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def refused_at_handshake(node, tls_dir: Path, name: str) -> None:
    """A plain OpenSSL client presenting ``name``'s certificate gets nothing from ``node``'s server:
    its handshake is refused, and counted as a refused certificate."""
    import ssl

    refused = node.refused_handshakes.counts["certificate"]
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    context.load_cert_chain(tls_dir / f"{name}.pem", tls_dir / f"{name}.key")
    answer = b""
    with contextlib.suppress(ssl.SSLError, ConnectionError):  # or an end of file: TLS 1.3
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=context)
        writer.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = await reader.read()
    assert answer == b""
    await until(lambda: node.refused_handshakes.counts["certificate"] == refused + 1, timeout=5,
                what="the refusal counted")


class Workload:
    """Random commits through a ZODB.DB: objects, BTrees, blobs, undo."""

    def __init__(self, db: ZODB.DB, seed: int = 0, blobs: bool = True) -> None:
        self.db = db
        self.rng = random.Random(seed)
        self.blobs = blobs
        # Its own transaction manager: the workload may run in any thread.
        self.tm = transaction.TransactionManager()
        self.conn = db.open(self.tm)
        root = self.conn.root()
        if "tree" not in root:
            root["tree"] = OOBTree()
            root["maps"] = PersistentMapping()
            root["blobs"] = PersistentMapping()
            self.tm.get().note("init")
            self.tm.commit()
        self.root = root

    def commit_random(self, n: int) -> None:
        rng = self.rng
        for i in range(n):
            kind = rng.random()
            txn = self.tm.get()
            txn.setUser(rng.choice(["alice", "b\u00f6b", "sys"]))
            txn.note(f"t{i} \u2713")
            txn.setExtendedInfo("n", i)
            if kind < 0.6 or (kind >= 0.85 and not self.blobs):
                for _ in range(rng.randint(1, 8)):
                    self.root["tree"][f"k{rng.randrange(500)}"] = os.urandom(rng.randint(1, 2000))
            elif kind < 0.75:
                m = self.root["maps"].setdefault(f"m{rng.randrange(50)}", PersistentMapping())
                m[rng.randrange(10)] = "v" * rng.randint(100, 20_000)
                self.root["maps"]._p_changed = True
            elif kind < 0.85:
                self.undo_random()
                continue
            else:
                self.write_blob(f"b{rng.randrange(30)}", rng.randint(0, 300_000))
            self.tm.commit()

    def write_blob(self, key: str, size: int, chunk: int = 1 << 20) -> None:
        blob = self.root["blobs"].get(key)
        if blob is None:
            blob = self.root["blobs"][key] = Blob()
        with blob.open("w") as fh:
            left = size
            while left > 0:
                part = min(chunk, left)
                fh.write(self.rng.randbytes(part))
                left -= part

    def undo_random(self) -> bool:
        log = self.db.undoLog(0, 20)
        candidates = [entry for entry in log if entry.get("description", b"") not in (b"init", "init")]
        if not candidates:
            self.tm.abort()
            return False
        entry = self.rng.choice(candidates)
        try:
            self.db.undo(entry["id"], self.tm.get())
            self.tm.get().note("undo")
            self.tm.commit()
            return True
        except Exception:  # an undo conflict is a normal outcome of a random undo
            self.tm.abort()
            return False

    def big_transaction(self, megabytes: int, record_size: int = 512 * 1024) -> None:
        """One transaction of about ``megabytes`` MB spread over many records."""
        count = megabytes * (1 << 20) // record_size
        holder = self.root.setdefault("big", PersistentMapping())
        for i in range(count):
            obj = PersistentMapping()
            obj["payload"] = self.rng.randbytes(record_size)
            holder[f"{i}"] = obj
        self.tm.get().note(f"big {megabytes} MB")
        self.tm.commit()
        # Drop the objects from the connection cache so the test's own memory stays small.
        self.conn.cacheMinimize()

    def commit(self, note: str) -> None:
        self.tm.get().note(note)
        self.tm.commit()

    def close(self) -> None:
        self.tm.abort()
        self.conn.close()


class Proc:
    """A child process with a log file, stopped politely or killed."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")


def start_zeo(workdir: Path, data_fs: Path, blob_dir: Path | None, port: int) -> Proc:
    conf = workdir / f"zeo-{port}.conf"
    blob_line = f"  blob-dir {blob_dir}\n" if blob_dir else ""
    conf.write_text(f"<zeo>\n  address 127.0.0.1:{port}\n</zeo>\n"
                    f"<filestorage>\n  path {data_fs}\n{blob_line}</filestorage>\n")
    proc = Proc([RUNZEO, "-C", str(conf)], workdir / f"zeo-{port}.log")
    wait_for_port(port, proc.proc)
    return proc


@contextlib.contextmanager
def zeo_server_db(workdir: Path, data_fs: Path, blob_dir: Path):
    """A ``runzeo`` on ``data_fs`` (``blob_dir`` created), and a ``ZODB.DB`` of it; both closed after."""
    blob_dir.mkdir(exist_ok=True)
    zeo = start_zeo(workdir, data_fs, blob_dir, port := free_port())
    try:
        db = zeo_db(port, workdir / f"client-blobs-{port}")
        try:
            yield db
        finally:
            db.close()
    finally:
        zeo.stop()


def zeo_db(port: int, blob_cache: Path | None) -> ZODB.DB:
    from ZEO.ClientStorage import ClientStorage

    storage = ClientStorage(("127.0.0.1", port), blob_dir=str(blob_cache) if blob_cache else None,
                            wait_timeout=30)
    return ZODB.DB(storage)


def tls_args(tls_dir: Path, node: str) -> list[str]:
    return ["--tls-ca", str(tls_dir / "ca.pem"), "--tls-cert", str(tls_dir / f"{node}.pem"),
            "--tls-key", str(tls_dir / f"{node}.key")]


def start_primary(workdir: Path, storage: Path, blob_dir: Path | None, port: int, tls_dir: Path,
                  name: str = "primary", extra: list[str] | None = None) -> Proc:
    argv = [REPLICATOR, "primary", "--storage", str(storage), "--listen", f"127.0.0.1:{port}",
            "--node", name, *tls_args(tls_dir, "primary")]
    if blob_dir:
        argv += ["--blob-dir", str(blob_dir)]
    proc = Proc(argv + (extra or []), workdir / f"{name}.log")
    wait_for_port(port, proc.proc)
    return proc


def start_secondary(workdir: Path, storage: Path, blob_dir: Path | None, primary_port: int, tls_dir: Path,
                    name: str = "secondary", status_port: int | None = None,
                    extra: list[str] | None = None) -> Proc:
    argv = [REPLICATOR, "secondary", "--storage", str(storage), "--primary", f"127.0.0.1:{primary_port}",
            "--node", name, *tls_args(tls_dir, "secondary")]
    if blob_dir:
        argv += ["--blob-dir", str(blob_dir)]
    if status_port:
        argv += ["--listen", f"127.0.0.1:{status_port}"]
    proc = Proc(argv + (extra or []), workdir / f"{name}.log")
    if status_port:
        wait_for_port(status_port, proc.proc)
    return proc


@contextlib.contextmanager
def sidecar_pair(workdir: Path, tls_dir: Path, storage: Path):
    """A sidecar ``replicator primary`` (node ``primary``) on ``storage`` and a ``replicator
    secondary`` (node ``secondary``, its storage ``workdir/b.fs``) streaming from it.

    Yields ``(port, status_port, primary, secondary)`` once the secondary is connected: the
    primary's port, the secondary's ``--listen`` port, and their processes (stopped after).
    """
    from tests.system.sysutil import try_status

    port, status_port = free_port(), free_port()
    primary = start_primary(workdir, storage, None, port, tls_dir)
    try:
        secondary = start_secondary(workdir, workdir / "b.fs", None, port, tls_dir, status_port=status_port)
        try:
            wait_until(lambda: (try_status(status_port, tls_dir) or {}).get("connected"), timeout=30,
                       what="the secondary connected")
            yield port, status_port, primary, secondary
        finally:
            secondary.stop()
    finally:
        primary.stop()


def last_tid_of(path: Path) -> bytes:
    """The last committed TID of a FileStorage, read without locking it."""
    from ZODB.FileStorage import FileStorage

    storage = FileStorage(str(path), read_only=True)
    try:
        return storage.lastTransaction()
    finally:
        storage.close()
