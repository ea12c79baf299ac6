"""Initial sync over a shaped link, with and without ``--compress`` (not part of ``make bench``).

``sudo python bench/wan.py [RATE DELAY]`` (default ``20mbit 20ms``: 20 Mbit/s
each way, 40 ms round trip) puts the real ``replicator primary`` and
``replicator secondary`` in two network namespaces joined by a veth pair
shaped with ``tc netem`` (where the kernel lacks netem, ``tc tbf`` limits
the rate only, and the table says there is no added delay), and syncs a generated ``Data.fs`` from scratch,
plain and compressed in alternation, ``REPEATS`` times each.  Two data sets
of the same size: prose (content like a CMS's, which deflate shrinks about
threefold) and random bytes (which it cannot shrink: what compression costs
when it does not help).  The same runs over the unshaped veth show the CPU
compression costs where the link is not the limit.

Timed from the secondary's readiness to the primary's last transaction
being durable on it (its trace file, as in ``run.py``); bytes are the
primary's veth transmit counter; CPU is each process's ``utime + stime``.
Needs root (``ip netns``, ``tc``); the namespaces are removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MB,
    QUICK,
    REPLICATOR,
    RUN,
    Proc,
    cpu_seconds,
    machine,
    say,
    tls_args,
)
from run import TRACE_ENV, fmt, sync_data, traced_start, wait_traced  # noqa: E402

DATA_MB = 20 if QUICK else 60
REPEATS = 1 if QUICK else 3
NS_PRIMARY, NS_SECONDARY = f"repl-wan-p{os.getpid()}", f"repl-wan-s{os.getpid()}"
PRIMARY_IP, SECONDARY_IP = "10.77.0.1", "10.77.0.2"
PORT = 8100


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def data_set(content: str) -> tuple[Path, dict]:
    """The cached data set of ``content`` (prose or random), with its last TID."""
    data, info = sync_data(DATA_MB, seed=3, kind="prose" if content == "prose" else "sync", version="wan-v1")
    from ZODB.FileStorage import FileStorage

    fs = FileStorage(str(data / "Data.fs"), read_only=True)
    try:
        info["last_tid"] = fs.lastTransaction().hex()
    finally:
        fs.close()
    return data, info


def wan_tls() -> Path:
    tls = RUN / "tls-wan"
    if not (tls / "secondary.key").exists():
        sh(REPLICATOR, "certs", "init", "--dir", str(tls), "--node", "primary", "--node", "secondary",
           "--host", PRIMARY_IP, "--host", SECONDARY_IP, "--force")
    return tls


def netns_up() -> None:
    sh("ip", "netns", "add", NS_PRIMARY)
    sh("ip", "netns", "add", NS_SECONDARY)
    sh("ip", "link", "add", "rwp0", "netns", NS_PRIMARY, "type", "veth", "peer", "name", "rws0",
       "netns", NS_SECONDARY)
    for ns, dev, ip in ((NS_PRIMARY, "rwp0", PRIMARY_IP), (NS_SECONDARY, "rws0", SECONDARY_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def shape(rate: str | None, delay: str) -> str:
    """Shape both ends; returns how (netem with the delay, or tbf without it)."""
    how = "unshaped veth"
    for ns, dev in ((NS_PRIMARY, "rwp0"), (NS_SECONDARY, "rws0")):
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True)
        if not rate:
            continue
        netem = subprocess.run([*tc, "add", "dev", dev, "root", "netem", "rate", rate, "delay", delay,
                                "limit", "10000"], capture_output=True)
        if netem.returncode == 0:
            how = f"{rate}, {delay} each way (netem)"
        else:
            sh(*tc, "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
            how = f"{rate}, no added delay (tbf: this kernel has no netem)"
    return how


def netns_down() -> None:
    for ns in (NS_PRIMARY, NS_SECONDARY):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def tx_bytes() -> int:
    return int(sh("ip", "netns", "exec", NS_PRIMARY, "cat", "/sys/class/net/rwp0/statistics/tx_bytes"))


def sync_once(data: Path, info: dict, tls: Path, compress: bool) -> dict:
    work = RUN / "work" / "wan"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    trace = work / "trace.txt"
    primary = Proc(["ip", "netns", "exec", NS_PRIMARY, REPLICATOR, "primary", "--storage", str(data / "Data.fs"),
                    "--blob-dir", str(data / "blobs"), "--listen", f"{PRIMARY_IP}:{PORT}", "--node", "primary",
                    "--log-level", "WARNING", *tls_args(tls, "primary")], work / "primary.log")
    secondary = None
    try:
        time.sleep(1.5)  # the primary binds; the secondary would retry anyway
        sent0 = tx_bytes()
        p_cpu0 = cpu_seconds(primary.pid)
        secondary = Proc(["ip", "netns", "exec", NS_SECONDARY, REPLICATOR, "secondary", "--storage",
                          str(work / "Data.fs"), "--blob-dir", str(work / "blobs"), "--primary",
                          f"{PRIMARY_IP}:{PORT}", "--node", "secondary", "--log-level", "WARNING",
                          *tls_args(tls, "secondary"), *(["--compress"] if compress else [])],
                         work / "secondary.log", env={TRACE_ENV: str(trace)})
        done = wait_traced(trace, info["last_tid"], secondary, 1800)
        return {"seconds": done - traced_start(trace), "wire": tx_bytes() - sent0,
                "cpu_primary": cpu_seconds(primary.pid) - p_cpu0, "cpu_secondary": cpu_seconds(secondary.pid)}
    finally:
        for proc in (secondary, primary):
            if proc is not None:
                proc.stop()


def main(rate: str, delay: str) -> None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        sys.exit("bench/wan.py needs root and the ip and tc commands (network namespaces, tc netem)")
    tls = wan_tls()
    sets = {content: data_set(content) for content in ("prose", "random")}
    m = machine()
    rows = []
    netns_up()
    try:
        for shaped in (True, False):
            link = shape(rate if shaped else None, delay)
            for content, (data, info) in sets.items():
                payload = info["bytes"] + info["blob_bytes"]
                runs: dict[bool, list[dict]] = {False: [], True: []}
                for _ in range(REPEATS):
                    for compress in (False, True):
                        runs[compress].append(sync_once(data, info, tls, compress))
                        say(f"{link}, {content}, {'compressed' if compress else 'plain'}: "
                            f"{runs[compress][-1]['seconds']:.1f}s, {runs[compress][-1]['wire'] / MB:.1f} MB sent")
                for compress in (False, True):
                    r = runs[compress]
                    secs = [x["seconds"] for x in r]
                    rows.append((link, content, "compressed" if compress else "plain", fmt(secs),
                                 fmt([payload / MB / s for s in secs]), fmt([x["wire"] / MB for x in r]),
                                 f"{fmt([x['cpu_primary'] for x in r])} / {fmt([x['cpu_secondary'] for x in r])}"))
                ratio = [a["seconds"] / b["seconds"] for a, b in zip(runs[True], runs[False], strict=True)]
                rows.append((link, content, "compressed / plain time", fmt(ratio, 2), "", "", ""))
    finally:
        netns_down()
    lines = [f"Machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}; Python {m['python']}, "
             f"ZODB {m['zodb']}; "
             f"{m['date']}",
             "",
             f"{DATA_MB} MB Data.fs (+ blobs) synced from scratch over TLS, {REPEATS} run(s) each, medians (min-max)",
             "",
             "| link | data | stream | seconds | payload MB/s | MB on the wire | CPU s primary / secondary |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines)
    (RUN / "wan.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) >= 3 else ("20mbit", "20ms")))
