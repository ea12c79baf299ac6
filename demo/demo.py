"""The live demo behind ``make demo``: a ZEO server, a primary, a secondary, a workload.

Everything runs on loopback, in ``demo-run/`` beside this repository:

1. ``replicator certs init`` makes a cluster CA and node certificates;
2. an unmodified ZEO server (``runzeo``) serves ``primary/Data.fs`` with blobs;
3. ``replicator primary`` tails that file; ``replicator secondary`` follows it
   over mutual TLS into ``secondary/Data.fs``;
4. a client writes transactions (objects, blobs, an undo) through ZEO while the
   secondary's progress is shown live from its ``GET /status``;
5. ``replicator verify`` proves the two storages equal.

Exit status 0 only if the secondary caught up and ``verify`` found them equal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from ZEO.ClientStorage import ClientStorage
from ZODB.blob import Blob

HERE = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REPLICATOR = str(BIN / "replicator")
sys.path.insert(0, str(HERE))
# Imported here, in one thread: importing ZODB from the workload's thread while
# the progress display imported in the main one could meet ZODB's circular
# imports half done ("partially initialized module 'ZODB.blob'").
from replicator.config import TLSPaths  # noqa: E402
from replicator.status import fetch_all  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early with status {proc.returncode}; see its log")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on port {port} within {timeout}s")


def write_workload(zeo_port: int, transactions: int, blob_every: int) -> None:
    """Commit ``transactions`` transactions through ZEO: objects, blobs and one undo."""
    rng = random.Random(42)
    blob_cache = HERE / "demo-run" / "client-blob-cache"
    storage = ClientStorage(("127.0.0.1", zeo_port), blob_dir=str(blob_cache), wait_timeout=30)
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        root = conn.root()
        if "docs" not in root:
            root["docs"] = OOBTree()
            transaction.commit()
        docs = root["docs"]
        for i in range(transactions):
            txn = transaction.get()
            txn.note(f"demo write {i}")
            txn.setUser("demo-user")
            for _ in range(rng.randint(1, 5)):
                key = f"doc-{rng.randrange(transactions)}"
                docs[key] = {"n": i, "text": "x" * rng.randint(10, 2000)}
            if blob_every and i % blob_every == 0:
                blob = Blob()
                with blob.open("w") as fh:
                    fh.write(os.urandom(rng.randint(1, 256 * 1024)))
                docs[f"blob-{i}"] = blob
            transaction.commit()
            time.sleep(0.002)
        # Undo the last transaction, as a site manager might.
        last = db.undoLog(0, 1)[0]
        db.undo(last["id"])
        transaction.get().note("demo undo")
        transaction.commit()
        conn.close()
    finally:
        db.close()


async def show_progress(tls: Path, primary_port: int, secondary_port: int, until: asyncio.Event) -> None:
    paths = TLSPaths(str(tls / "ca.pem"), str(tls / "secondary.pem"), str(tls / "secondary.key"))
    while True:
        prim, sec = await fetch_all([f"127.0.0.1:{primary_port}", f"127.0.0.1:{secondary_port}"], paths, False)
        if not prim.get("unreachable") and not sec.get("unreachable"):
            lag = "unknown" if sec["lag_seconds"] is None else f"{sec['lag_seconds'] * 1000:8.1f} ms"
            print(f"    primary head {prim['last_tid']} ({prim['transactions']} txns) | "
                  f"secondary at {sec['last_tid']} applied {sec['transactions_applied']:>5} "
                  f"lag {lag}", flush=True)
            if until.is_set() and prim["last_tid"] == sec["last_tid"]:
                return
        await asyncio.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=600)
    parser.add_argument("--blob-every", type=int, default=25)
    parser.add_argument("--keep", action="store_true", help="leave the processes running at the end")
    args = parser.parse_args()

    run = HERE / "demo-run"
    if run.exists():
        shutil.rmtree(run)
    (run / "primary" / "blobs").mkdir(parents=True)
    (run / "secondary").mkdir(parents=True)
    (run / "logs").mkdir()
    tls = run / "tls"
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        log = open(run / "logs" / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=run)
        procs.append(proc)
        return proc

    try:
        say("creating a cluster CA and node certificates")
        subprocess.run([REPLICATOR, "certs", "init", "--dir", str(tls)], check=True)

        zeo_port, primary_port, secondary_port = free_port(), free_port(), free_port()
        say(f"starting an unmodified ZEO server on 127.0.0.1:{zeo_port}")
        (run / "zeo.conf").write_text(
            f"<zeo>\n  address 127.0.0.1:{zeo_port}\n</zeo>\n"
            f"<filestorage>\n  path {run}/primary/Data.fs\n  blob-dir {run}/primary/blobs\n</filestorage>\n"
        )
        zeo = start("zeo", [str(BIN / "runzeo"), "-C", str(run / "zeo.conf")])
        wait_port(zeo_port, zeo, "ZEO server")

        tls_args = ["--tls-ca", str(tls / "ca.pem")]
        say(f"starting the primary (tails primary/Data.fs, listens on 127.0.0.1:{primary_port})")
        primary = start("primary", [REPLICATOR, "primary", "--storage", str(run / "primary" / "Data.fs"),
                                    "--blob-dir", str(run / "primary" / "blobs"),
                                    "--listen", f"127.0.0.1:{primary_port}", "--node", "primary", *tls_args,
                                    "--tls-cert", str(tls / "primary.pem"), "--tls-key", str(tls / "primary.key")])
        wait_port(primary_port, primary, "primary")

        say(f"starting the secondary (re-commits into secondary/Data.fs, status on 127.0.0.1:{secondary_port})")
        secondary = start("secondary", [REPLICATOR, "secondary", "--storage", str(run / "secondary" / "Data.fs"),
                                        "--blob-dir", str(run / "secondary" / "blobs"),
                                        "--primary", f"127.0.0.1:{primary_port}", "--node", "secondary",
                                        "--listen", f"127.0.0.1:{secondary_port}", *tls_args,
                                        "--tls-cert", str(tls / "secondary.pem"),
                                        "--tls-key", str(tls / "secondary.key")])
        wait_port(secondary_port, secondary, "secondary")

        say(f"writing {args.transactions} transactions through ZEO (objects, blobs, an undo) "
            "while the secondary follows live")
        done = asyncio.Event()

        async def drive() -> None:
            watcher = asyncio.create_task(show_progress(tls, primary_port, secondary_port, done))
            await asyncio.to_thread(write_workload, zeo_port, args.transactions, args.blob_every)
            done.set()
            await asyncio.wait_for(watcher, 120)

        asyncio.run(drive())

        say("replicator status")
        subprocess.run([REPLICATOR, "status", f"127.0.0.1:{primary_port}", f"127.0.0.1:{secondary_port}",
                        *tls_args, "--tls-cert", str(tls / "secondary.pem"),
                        "--tls-key", str(tls / "secondary.key")], check=False)

        say("stopping the secondary, then verifying both storages transaction by transaction")
        secondary.send_signal(signal.SIGTERM)
        secondary.wait(30)
        result = subprocess.run([REPLICATOR, "verify", str(run / "primary" / "Data.fs"),
                                 str(run / "secondary" / "Data.fs"),
                                 "--blob-dir-a", str(run / "primary" / "blobs"),
                                 "--blob-dir-b", str(run / "secondary" / "blobs")])
        if result.returncode == 0:
            say("demo finished: the secondary is an exact, transaction-consistent copy")
        else:
            say("demo FAILED: see demo-run/logs/")
        if args.keep:
            say("--keep: leaving ZEO and the primary running; press Ctrl-C to stop")
            signal.pause()
        return result.returncode
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
