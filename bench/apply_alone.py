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
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RUN, say  # noqa: E402
from ZODB.FileStorage import FileStorage  # noqa: E402

from replicator.applier import Applier  # noqa: E402
from replicator.protocol.framing import FrameDecoder, encode_event  # noqa: E402
from replicator.tailer import Tailer  # noqa: E402

MESSAGE = 1 << 20


def messages(data: Path) -> list[bytes]:
    out = []
    with Tailer(str(data / "Data.fs"), str(data / "blobs")) as tailer:
        while events := tailer.read_events(MESSAGE):
            out.append(b"".join(encode_event(event) for event in events))
    return out


def run(stream: list[bytes], dst: Path) -> tuple[float, float, float]:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    storage = FileStorage(str(dst / "Data.fs"), blob_dir=str(dst / "blobs"))
    applier = Applier(storage)
    decoder = FrameDecoder()
    decoding = applying = 0.0
    cpu0 = time.process_time()
    try:
        for message in stream:
            t0 = time.perf_counter()
            events = decoder.feed(message)
            t1 = time.perf_counter()
            applier.apply(events)
            applying += time.perf_counter() - t1
            decoding += t1 - t0
        cpu = time.process_time() - cpu0
    finally:
        applier.close()
        storage.close()
        shutil.rmtree(dst, ignore_errors=True)
    return decoding, applying, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=RUN / "data-sync-500MB-s1-v2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dst", type=Path, default=RUN / "work" / "apply-alone")
    args = parser.parse_args()
    if not (args.data / "Data.fs").exists():
        sys.exit(f"{args.data / 'Data.fs'}: not there; `make bench` (or `python bench/run.py sync`) makes it")
    stream = messages(args.data)
    say(f"{len(stream)} messages, {sum(map(len, stream)) / 1e6:.0f} MB, applied into {args.dst}")
    for i in range(args.runs):
        decoding, applying, cpu = run(stream, args.dst)
        say(f"  run {i + 1}: decoding {decoding:.2f} s, applying {applying:.2f} s, CPU {cpu:.2f} s")


if __name__ == "__main__":
    main()
