"""The real deployment: a ZEO server writes, ``replicator primary`` tails, ``replicator secondary`` follows.

All three are separate processes started the way an operator starts them.
The workload goes through a ZEO client: many small transactions, undo, blobs,
one transaction of 50 MB and one 200 MB blob.  At the end the two storages
must be equal in every transaction and record, and neither replication
process may have grown by anything near the size of the data it streamed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from replicator.verify import verify
from tests.helpers import (
    REPLICATOR,
    Workload,
    free_port,
    start_primary,
    start_secondary,
    start_zeo,
    tls_args,
    wait_until,
    zeo_db,
)

MB = 1 << 20


def peak_rss(pid: int) -> int:
    """The kernel's high-water mark of the process's resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def current_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def status(port: int, tls_dir: Path) -> dict:
    out = subprocess.run([REPLICATOR, "status", f"127.0.0.1:{port}", "--json", *tls_args(tls_dir, "secondary")],
                         capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)[0]


@pytest.mark.slow
def test_zeo_workload_with_big_transaction_and_big_blob(tmp_path, tls_dir):
    src, dst = tmp_path / "primary", tmp_path / "secondary"
    src.mkdir()
    dst.mkdir()
    zeo_port, primary_port, status_port = free_port(), free_port(), free_port()
    procs = []
    try:
        zeo = start_zeo(tmp_path, src / "Data.fs", src / "blobs", zeo_port)
        procs.append(zeo)
        db = zeo_db(zeo_port, tmp_path / "client-blobs")
        work = Workload(db, seed=7)
        work.commit_random(50)

        primary = start_primary(tmp_path, src / "Data.fs", src / "blobs", primary_port, tls_dir)
        procs.append(primary)
        secondary = start_secondary(tmp_path, dst / "Data.fs", dst / "blobs", primary_port, tls_dir,
                                    status_port=status_port)
        procs.append(secondary)

        def caught_up() -> bool:
            p, s = status(primary_port, tls_dir), status(status_port, tls_dir)
            return p["last_tid"] == s["last_tid"] and s["connected"]

        wait_until(caught_up, timeout=60, interval=0.2, what="initial catch-up")
        base_primary, base_secondary = current_rss(primary.pid), current_rss(secondary.pid)

        # Live: small transactions, undo and blobs while replicating.
        work.commit_random(400)
        # One transaction of 50 MB (100 records of 512 KiB) and one 200 MB blob.
        work.big_transaction(50)
        work.write_blob("huge", 200 * MB)
        work.commit("200 MB blob")
        work.commit_random(20)
        work.close()
        db.close()

        wait_until(caught_up, timeout=240, interval=0.25, what="catch-up after the big data")
        peaks = {"primary": peak_rss(primary.pid), "secondary": peak_rss(secondary.pid)}
        bases = {"primary": base_primary, "secondary": base_secondary}
        print("peak RSS MB:", {k: round(v / MB, 1) for k, v in peaks.items()},
              "after start-up MB:", {k: round(v / MB, 1) for k, v in bases.items()})
        for name, peak in peaks.items():
            # Far below the data's size: the 200 MB blob and the 50 MB transaction
            # must each stream through, not sit in memory.
            assert peak < 120 * MB, f"{name} peak RSS {peak / MB:.0f} MB"
            assert peak - bases[name] < 40 * MB, f"{name} grew {(peak - bases[name]) / MB:.0f} MB"
        for proc in (secondary, primary, zeo):
            proc.stop()
        result = verify(str(src / "Data.fs"), str(dst / "Data.fs"), str(src / "blobs"), str(dst / "blobs"))
        assert result.equal, result
        assert result.transactions >= 400
        assert result.blobs >= 1
    except BaseException:
        for proc in procs:
            print(f"--- {proc.argv[:2]} log ---\n{proc.output()[-5000:]}")
        raise
    finally:
        for proc in procs:
            proc.stop()
