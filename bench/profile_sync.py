"""Profile the primary and the secondary during an initial sync with py-spy (not part of make bench).

``python bench/profile_sync.py [--gil] [DATA_DIR]`` runs ``replicator
primary`` and ``replicator secondary`` under ``py-spy record`` (``pip install
py-spy`` into the venv first) on a benchmark data directory (by default the
500 MB one ``make bench`` generates and caches) and prints the hottest
functions of each (own time, all threads, or with ``--gil`` only the thread
holding the interpreter lock).  The raw stacks (py-spy's collapsed format,
which flame graph tools read) stay in ``bench-run/profile-*.txt``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RUN, ensure_tls, free_port, tls_args, wait_acked, wait_for_port  # noqa: E402

SPY = str(Path(sys.executable).parent / "py-spy")


def spy(name: str, argv: list[str], log: Path, gil: bool) -> subprocess.Popen:
    raw = RUN / f"profile-{name}.txt"
    return subprocess.Popen([SPY, "record", "--rate", "200", *(["--gil"] if gil else []), "-f", "raw", "-o", str(raw), "--", *argv],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def top(name: str, n: int = 25) -> None:
    own: collections.Counter = collections.Counter()
    total = 0
    for line in (RUN / f"profile-{name}.txt").read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        total += int(samples)
        own[stack.split(";")[-1]] += int(samples)
    print(f"\n== {name}: {total} samples, own time")
    for frame, count in own.most_common(n):
        print(f"{count / total * 100:5.1f}%  {frame}")


def main(data: Path, gil: bool) -> None:
    if not (data / "Data.fs").is_file():
        raise SystemExit(f"{data / 'Data.fs'}: no such file (run `make bench` once to generate it, "
                         "or give a directory holding a Data.fs and its blobs/)")
    if not Path(SPY).exists():
        raise SystemExit(f"{SPY}: not installed; `{sys.executable} -m pip install py-spy` first")
    tls = ensure_tls()
    work = RUN / "work" / "profile"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    rep = str(Path(sys.executable).parent / "replicator")
    primary = spy("primary", [rep, "primary", "--storage", str(data / "Data.fs"), "--blob-dir", str(data / "blobs"),
                              "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING",
                              *tls_args(tls, "primary")], work / "primary.log", gil)
    wait_for_port(port, primary, timeout=120)
    t0 = time.time()
    secondary = spy("secondary", [rep, "secondary", "--storage", str(work / "Data.fs"), "--blob-dir",
                                  str(work / "blobs"), "--primary", f"127.0.0.1:{port}", "--log-level", "WARNING",
                                  *tls_args(tls, "secondary")], work / "secondary.log", gil)
    wait_acked(port, tls, 1800, None, interval=0.1)
    print(f"synced in {time.time() - t0:.1f}s (under the profiler)")
    for proc in (secondary, primary):
        # py-spy forwards nothing: stop the profiled child, py-spy then writes its file.
        for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                    text=True).stdout.split():
            os.kill(int(child), 15)
        proc.wait(60)
    shutil.rmtree(work, ignore_errors=True)
    top("secondary")
    top("primary")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python bench/profile_sync.py",
                                     description=__doc__.split("\n\n")[0])  # type: ignore[union-attr]
    parser.add_argument("data", nargs="?", type=Path, default=RUN / "data-sync-500MB-s1-v2",
                        help="a directory holding Data.fs and blobs/ (default: %(default)s)")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the interpreter lock")
    args = parser.parse_args()
    main(args.data, args.gil)
