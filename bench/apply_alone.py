"""What a secondary spends decoding and applying, with no network (not part of make bench).

``python bench/apply_alone.py [--runs N] [--dst DIR] [DATA_DIR]`` reads the
500 MB Data.fs that ``make bench`` generates and caches (or DATA_DIR) with the
primary's tailer, encodes it once into the messages a primary sends (about
1 MiB each), then, N times, feeds them to a ``FrameDecoder`` and an
``Applier`` on a fresh FileStorage in DIR (by default under ``bench-run/``,
on the disk the sync benchmark uses; give a tmpfs directory to leave the
disk out).  Group commit is on and each message is made durable before the
next, in the same thread.  Prints, per run, the seconds spent decoding and
applying and the CPU seconds of both: set beside a sync's figures, the
difference is what receiving (TLS, WebSocket, asyncio) costs the secondary.

With ``--floor``, each run is followed by one of FileStorage alone: the same
transactions, decoded beforehand, committed straight through the storage API
(``tpc_begin``, ``restore``, ``restoreBlob``, ``tpc_vote``, ``tpc_finish``)
with no checks, FileStorage's per-commit fsync off and one fsync per message
as group commit does.  What the applier spends beyond that floor is all that
replication's own code adds to committing.

With ``--copy`` (and ``--floor``), each pair is preceded by ZODB's local copy
with fsync on (``copy_local.py``, the sync benchmark's baseline), and each
run says how much of the time 3x that copy allows the sync is left once the
thread that commits has decoded and applied, with no network: left for
receiving, in the applier's case; left for receiving, checking and making
blobs durable, in FileStorage's alone.  The speeds are those of that minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RUN, local_copy, median_range, say  # noqa: E402
from ZODB.Connection import TransactionMetaData  # noqa: E402
from ZODB.FileStorage import FileStorage  # noqa: E402

from replicator.applier import Applier  # noqa: E402
from replicator.protocol.events import BlobChunk, Record, TxnBegin, TxnEnd  # noqa: E402
from replicator.protocol.framing import FrameDecoder, encode_event  # noqa: E402
from replicator.tailer import Tailer  # noqa: E402

MESSAGE = 1 << 20


def messages(data: Path) -> list[bytes]:
    out = []
    with Tailer(str(data / "Data.fs"), str(data / "blobs")) as tailer:
        while events := tailer.read_events(MESSAGE):
            out.append(b"".join(encode_event(event) for event in events))
    return out


def run(stream: list[bytes], dst: Path) -> tuple[float, float, float, float]:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    storage = FileStorage(str(dst / "Data.fs"), blob_dir=str(dst / "blobs"))
    applier = Applier(storage)
    decoder = FrameDecoder()
    decoding = applying = applying_cpu = 0.0
    cpu0 = time.process_time()
    try:
        for message in stream:
            t0 = time.perf_counter()
            events = decoder.feed(message)
            c1 = time.process_time()
            t1 = time.perf_counter()
            applier.apply(events)
            applying += time.perf_counter() - t1
            applying_cpu += time.process_time() - c1
            decoding += t1 - t0
        cpu = time.process_time() - cpu0
    finally:
        applier.close()
        storage.close()
        shutil.rmtree(dst, ignore_errors=True)
    return decoding, applying, cpu, applying_cpu


def floor(batches: list[list], dst: Path) -> float:
    """CPU seconds FileStorage alone spends committing the decoded ``batches``, one fsync per batch."""
    fsmodule: Any = sys.modules["ZODB.FileStorage.FileStorage"]  # the module, not the class of that name
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    storage = FileStorage(str(dst / "Data.fs"), blob_dir=str(dst / "blobs"))
    saved, fsmodule.fsync = fsmodule.fsync, None
    meta = tid = None
    blob: Record | None = None  # the blob record whose file is being written, and that file
    blob_path, blob_left = "", 0
    blob_file: Any = None
    cpu0 = time.process_time()
    try:
        for events in batches:
            for event in events:
                kind = type(event)
                if kind is Record and event.blob_size is None:
                    storage.restore(event.oid, tid, event.data, "", event.data_txn, meta)
                    continue
                if kind is Record:
                    fd, blob_path = tempfile.mkstemp(dir=storage.temporaryDirectory())
                    blob, blob_file, blob_left = event, os.fdopen(fd, "wb"), event.blob_size
                elif kind is BlobChunk:
                    blob_file.write(event.data)
                    blob_left -= len(event.data)
                elif kind is TxnBegin:
                    meta = TransactionMetaData(event.user, event.description, event.extension)
                    tid = event.tid
                    storage.tpc_begin(meta, tid, event.status)
                elif kind is TxnEnd:
                    storage.tpc_vote(meta)
                    storage.tpc_finish(meta)
                if blob is not None and blob_left == 0:
                    blob_file.close()
                    storage.restoreBlob(blob.oid, tid, blob.data, blob_path, blob.data_txn, meta)
                    blob = None
            os.fsync(storage._file.fileno())
        cpu = time.process_time() - cpu0
    finally:
        fsmodule.fsync = saved
        storage.close()
        shutil.rmtree(dst, ignore_errors=True)
    return cpu


def spread(values: list[float], sign: str = "") -> str:
    """``median (min to max)`` of ``values``, two decimals ("to": a range may run below zero)."""
    med, lo, hi = median_range(values)
    return f"{med:{sign}.2f} ({lo:{sign}.2f} to {hi:{sign}.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=RUN / "data-sync-500MB-s1-v2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dst", type=Path, default=RUN / "work" / "apply-alone")
    parser.add_argument("--floor", action="store_true",
                        help="after each run, commit the same transactions through FileStorage alone")
    parser.add_argument("--copy", action="store_true",
                        help="with --floor: before each pair, time ZODB's local copy with fsync on and say "
                             "what 3x it leaves once decoding and applying are paid")
    args = parser.parse_args()
    if args.copy and not args.floor:
        parser.error("--copy needs --floor")
    if not (args.data / "Data.fs").exists():
        sys.exit(f"{args.data / 'Data.fs'}: not there; `make bench` (or `python bench/run.py sync`) makes it")
    stream = messages(args.data)
    say(f"{len(stream)} messages, {sum(map(len, stream)) / 1e6:.0f} MB, applied into {args.dst}")
    decoder = FrameDecoder()
    batches = [decoder.feed(message) for message in stream] if args.floor else []
    ratios, budgets, appliers, floors = [], [], [], []
    for i in range(args.runs):
        if args.copy:
            budgets.append(local_copy(args.data, "on")["seconds"] / 3)
        decoding, applying, cpu, applying_cpu = run(stream, args.dst)
        say(f"  run {i + 1}: decoding {decoding:.2f} s, applying {applying:.2f} s, CPU {cpu:.2f} s "
            f"(applying {applying_cpu:.2f})")
        if args.floor:
            alone = floor(batches, args.dst)
            ratios.append(applying_cpu / alone)
            say(f"  run {i + 1}: FileStorage alone, CPU {alone:.2f} s; the applier's CPU {ratios[-1]:.2f}x that")
        if args.copy:
            appliers.append(cpu)  # decoding and applying
            floors.append(cpu - applying_cpu + alone)  # decoding, and FileStorage's own commit
            say(f"  run {i + 1}: 3x ZODB's copy with fsync on asks for the sync in {budgets[-1]:.2f} s; "
                f"decoding and applying take {cpu:.2f} CPU-s of it, leaving {budgets[-1] - cpu:+.2f} s; "
                f"decoding and FileStorage alone {floors[-1]:.2f}, leaving {budgets[-1] - floors[-1]:+.2f} s")
    if ratios:
        say(f"the applier's CPU against FileStorage alone, times: {spread(ratios)}, {len(ratios)} pairs")
    if budgets:
        say(f"3x the fsync-on copy asks for the sync in {spread(budgets)} s")
        say(f"  decoding and applying: {spread(appliers)} CPU-s; left for receiving: "
            f"{spread([b - a for b, a in zip(budgets, appliers, strict=True)], '+')} s")
        say(f"  decoding and FileStorage alone: {spread(floors)} CPU-s; left for receiving, checking and "
            f"blob durability: {spread([b - f for b, f in zip(budgets, floors, strict=True)], '+')} s")


if __name__ == "__main__":
    main()
