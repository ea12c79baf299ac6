"""Generate a benchmark ``Data.fs`` (run as a script; prints a JSON summary).

``python bench/gendata.py sync OUT_DIR MEGABYTES SEED``: tens of thousands of
transactions of 1 to 8 records, record payloads log-uniform between 100 B and
20 KB, a blob in about 1 transaction in 150 (4 KB to 2 MB), until
``Data.fs`` holds ``MEGABYTES``.  No undos: restoring an undo record makes
FileStorage walk every transaction header back to the undone one, so a few
dozen of them would dominate the baseline copy's time (more than half of it
in a 500 MB file) and flatter the replicator, which avoids that walk.
Undo records are replicated and checked in the test suite.

``python bench/gendata.py prose OUT_DIR MEGABYTES SEED``: the same, but every
payload and blob is prose (pseudo-words of a 2,000-word vocabulary in Zipf
frequencies, as in natural language) instead of random bytes: content like
a CMS's, which deflate shrinks about threefold, for the WAN benchmark.

``python bench/gendata.py big OUT_DIR BLOB_MB TXN_MB``: one transaction with a
single blob of ``BLOB_MB`` and one transaction of ``TXN_MB`` spread over
512 KB records.

The files are written through ``ZODB.DB`` and FileStorage (real pickles, real
blob records), with FileStorage's per-commit fsync switched off in this
process only: generating is not what is measured.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import Any

import transaction
import ZODB
import ZODB.FileStorage  # noqa: F401  (loads the module patched below)
from BTrees.IOBTree import IOBTree
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

# ``ZODB.FileStorage.FileStorage`` as an attribute is the class; the module is here.
fsmodule: Any = sys.modules["ZODB.FileStorage.FileStorage"]

fsmodule.fsync = None  # generation only; the measured processes keep theirs

MB = 1 << 20


def payload(rng: random.Random) -> bytes:
    size = int(math.exp(rng.uniform(math.log(100), math.log(20_000))))
    return rng.randbytes(size)


class Prose:
    """Text of ``size`` bytes from pseudo-words drawn in Zipf frequencies."""

    SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]

    def __init__(self, rng: random.Random, words: int = 2000) -> None:
        self.rng = rng
        self.words = [" " + "".join(rng.choice(self.SYLLABLES) for _ in range(rng.randint(1, 4)))
                      for _ in range(words)]
        self.weights = [1 / (rank + 1) for rank in range(words)]

    def __call__(self, size: int) -> bytes:
        out = "".join(self.rng.choices(self.words, self.weights, k=size // 5 + 1))
        while len(out) < size:
            out += out
        return out[:size].encode()


def gen_sync(out: str, megabytes: int, seed: int, content: str = "random") -> dict:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "Data.fs")
    storage = FileStorage(path, blob_dir=os.path.join(out, "blobs"), create=True)
    db = ZODB.DB(storage, cache_size=2000)
    rng = random.Random(seed)
    prose = Prose(random.Random(seed + 1)) if content == "prose" else None

    def data(size: int) -> bytes:
        return rng.randbytes(size) if prose is None else prose(size)

    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    root["objs"] = tree = IOBTree()
    pool: list[PersistentMapping] = []
    blobs: list[Blob] = []
    target = megabytes * MB
    n = 0
    t0 = time.time()
    while os.path.getsize(path) < target:
        txn = tm.get()
        txn.setUser(rng.choice(["alice", "bob", "sys"]))
        kind = rng.random()
        create = len(pool) < 20 or (len(pool) < 20_000 and rng.random() < 0.4)
        label = "blob" if kind < 0.007 else "new" if create else "upd"
        txn.note(f"bench txn {n} {label}")
        if kind < 0.007:
            blob = Blob() if len(blobs) < 200 or rng.random() < 0.3 else rng.choice(blobs)
            if not any(b is blob for b in blobs):
                blobs.append(blob)
                root[f"blob{len(blobs)}"] = blob
            with blob.open("w") as fh:
                fh.write(data(int(math.exp(rng.uniform(math.log(4096), math.log(2 * MB))))))
        else:
            for _ in range(rng.randint(1, 8)):
                if create:
                    obj = PersistentMapping()
                    pool.append(obj)
                    tree[len(pool)] = obj
                else:
                    obj = rng.choice(pool)
                obj["d"] = payload(rng) if prose is None else prose(
                    int(math.exp(rng.uniform(math.log(100), math.log(20_000)))))
        tm.commit()
        n += 1
        if n % 500 == 0:
            conn.cacheMinimize()
    txns = sum(1 for _ in storage.iterator())
    db.close()
    return {"path": path, "transactions": txns, "bytes": os.path.getsize(path),
            "seconds": round(time.time() - t0, 1)}


def gen_big(out: str, blob_mb: int, txn_mb: int) -> dict:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "Data.fs")
    storage = FileStorage(path, blob_dir=os.path.join(out, "blobs"), create=True)
    db = ZODB.DB(storage)
    rng = random.Random(7)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    root["blob"] = blob = Blob()
    with blob.open("w") as fh:
        for _ in range(blob_mb):
            fh.write(rng.randbytes(MB))
    tm.get().note(f"one {blob_mb} MB blob")
    tm.commit()
    holder = root["big"] = PersistentMapping()
    for i in range(txn_mb * 2):
        holder[str(i)] = obj = PersistentMapping()
        obj["d"] = rng.randbytes(MB // 2)
    tm.get().note(f"one {txn_mb} MB transaction")
    tm.commit()
    conn.cacheMinimize()
    db.close()
    return {"path": path, "bytes": os.path.getsize(path)}


if __name__ == "__main__":
    kind, out, a, b = sys.argv[1:5]
    if kind in ("sync", "prose"):
        result = gen_sync(out, int(a), int(b), "random" if kind == "sync" else "prose")
    else:
        result = gen_big(out, int(a), int(b))
    print(json.dumps(result))
