"""``make bench``: replication measured against this machine's own limits.

Every figure comes from real processes (``runzeo``, ``replicator primary``,
``replicator secondary``, the helper scripts of this directory) on loopback,
over mutual TLS.  Data are generated here and cached in ``bench-run/``
keyed by their parameters.  Medians of repeated runs with min-max.

Sections (all by default; ``python bench/run.py sync lag`` runs some):

- ``sync``: initial sync of a generated Data.fs against ZODB's own local
  ``copyTransactionsFrom`` of the same file, fsync on and off, same run;
- ``lag``: commit-to-applied lag under constant ZEO write load (sidecar);
- ``cost``: ZEO commit throughput and latency with and without replication,
  one after the other, and side by side on one core (this needs control
  groups, in practice root; without them that part says why it is missing);
- ``memory``: peak RSS while streaming a huge blob and a huge transaction.

``BENCH_QUICK=1`` makes everything smaller.  Results: stdout (Markdown),
``bench-run/results.md`` and ``bench-run/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    HERE,
    MB,
    PRIMARY_CPUS,
    PY,
    QUICK,
    REPLICATOR,
    ROOT,
    RUN,
    SECONDARY_CPUS,
    CpuGroups,
    Proc,
    cpu_seconds,
    dir_bytes,
    ensure_tls,
    free_port,
    local_copy,
    machine,
    main_thread_cpu_seconds,
    median_range,
    on_cpus,
    peak_rss,
    percentile,
    say,
    start_primary,
    start_secondary,
    start_zeo,
    status,
    thread_cpu_seconds,
    threads_cpu_since,
    wait_acked,
    wait_for_port,
)

from replicator.config import PrimaryConfig  # noqa: E402
from replicator.cpuload import cpu_ticks  # noqa: E402
from replicator.wrappers import OS_THREAD_NAME, OS_WORKER_NAME  # noqa: E402

#: The names an embedded primary's threads show the system (``replicator.threads.name_os_thread``).
REPLICATION_THREADS = frozenset({OS_THREAD_NAME, OS_WORKER_NAME})

SYNC_MB = 100 if QUICK else 500
SYNC_REPEATS = 1 if QUICK else 3
LAG_SECONDS = 5 if QUICK else 20
LAG_RATES = (200, 1000)
#: Also measured for the sidecar alone: a light load, where it sleeps on file events between commits.
LAG_LOW_RATE = 20
COST_SECONDS = 4 if QUICK else 6
COST_REPEATS = 1 if QUICK else 9
#: The sidecar's default look at the file under load (--poll-interval), which the
#: stand-in pollers of the cost section copy.
POLL_INTERVAL = PrimaryConfig.poll_interval
#: Seconds each cost run also watches the primary's side with no commit at all.
IDLE_SECONDS = 2 if QUICK else 3
BIG_BLOB_MB, BIG_TXN_MB = (256, 50) if QUICK else (1024, 200)
TRACE_ENV = "REPLICATOR_TRACE_FILE"
#: Where a "separate disk" secondary keeps its storage (tmpfs when there is one).
SHM = Path("/dev/shm/replicator-bench") if Path("/dev/shm").is_dir() else RUN / "work" / "shm"

results: dict = {"machine": machine()}


def fmt(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    med, lo, hi = median_range([v * scale for v in values])
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -- data -----------------------------------------------------------------


def sync_data(megabytes: int = SYNC_MB, seed: int = 1, kind: str = "sync",
              version: str = "v2") -> tuple[Path, dict]:
    """A generated Data.fs (``gendata.py`` KIND: random ``sync`` or ``prose``), cached by its parameters."""
    data = RUN / f"data-{kind}-{megabytes}MB-s{seed}-{version}"
    summary = data / "summary.json"
    if not summary.exists():
        say(f"generating a {megabytes} MB Data.fs ({kind}) in {data} (cached for later runs)")
        fresh(data)
        out = subprocess.run([PY, str(HERE / "gendata.py"), kind, str(data), str(megabytes), str(seed)],
                             check=True, capture_output=True, text=True).stdout
        info = json.loads(out.splitlines()[-1])
        info["blob_bytes"] = dir_bytes(data / "blobs")
        summary.write_text(json.dumps(info))
    return data, json.loads(summary.read_text())


def big_data() -> Path:
    data = RUN / f"data-big-{BIG_BLOB_MB}MBblob-{BIG_TXN_MB}MBtxn-v1"
    if not (data / "summary.json").exists():
        say(f"generating a {BIG_BLOB_MB} MB blob and a {BIG_TXN_MB} MB transaction in {data}")
        fresh(data)
        out = subprocess.run([PY, str(HERE / "gendata.py"), "big", str(data), str(BIG_BLOB_MB),
                              str(BIG_TXN_MB)], check=True, capture_output=True, text=True).stdout
        (data / "summary.json").write_text(out.splitlines()[-1])
    return data


# -- 1. initial sync --------------------------------------------------------


def traced_start(trace: Path) -> float:
    """When the secondary was ready to replicate: the first line of its trace file."""
    with open(trace) as fh:
        kind, when = fh.readline().split()
    assert kind == "start", kind
    return float(when)


def cpu_when_ready(trace: Path, proc, timeout: float) -> tuple[float, float]:
    """The secondary's CPU seconds, whole process and event-loop thread, read as soon as its trace
    file says it is ready (polled every 5 ms: what it spends in that moment is counted as start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"secondary exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        if trace.exists() and trace.read_bytes().endswith(b"\n"):
            return cpu_seconds(proc.pid), main_thread_cpu_seconds(proc.pid)
        time.sleep(0.005)
    raise TimeoutError(f"secondary not ready within {timeout}s")


def wait_traced(trace: Path, tid: str, proc, timeout: float) -> float:
    """When the secondary made ``tid`` durable, read from its trace file (no load on the processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"secondary exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        if trace.exists():
            with open(trace, "rb") as fh:
                fh.seek(max(0, trace.stat().st_size - 200))
                lines = fh.read().decode().split("\n")
            for line in lines[-2::-1]:
                parts = line.split()
                if len(parts) == 2 and parts[0] == tid:
                    return float(parts[1])
        time.sleep(0.02)
    raise TimeoutError(f"secondary did not apply {tid} within {timeout}s")


def replicate(src: Path, tls: Path, timeout: float = 1800) -> dict:
    """A fresh secondary syncs ``src`` from a primary: seconds from its start until the last
    transaction is durable in it (its trace file says when; acks follow at once)."""
    work = fresh(RUN / "work" / "sync")
    trace = work / "trace.txt"
    port = free_port()
    primary = start_primary(work, src / "Data.fs", src / "blobs", port, tls)
    try:
        head = status(port, tls)["last_tid"]
        primary_cpu0 = cpu_seconds(primary.pid)
        t0 = time.time()
        secondary = start_secondary(work, work / "Data.fs", work / "blobs", port, tls, env={TRACE_ENV: str(trace)})
        try:
            ready_cpu, ready_loop_cpu = cpu_when_ready(trace, secondary, timeout)
            done = wait_traced(trace, head, secondary, timeout)
            secondary_cpu, loop_cpu = cpu_seconds(secondary.pid), main_thread_cpu_seconds(secondary.pid)
            row = {
                # From the secondary's readiness, as the baseline's timer starts after its
                # imports; its interpreter start and imports are reported apart.
                "seconds": done - traced_start(trace),
                "startup": traced_start(trace) - t0,
                "primary_cpu": cpu_seconds(primary.pid) - primary_cpu0,
                "secondary_cpu": secondary_cpu,
                # What bounds the sync: the CPU both sides spent while it ran, and its busiest thread.
                "secondary_sync_cpu": secondary_cpu - ready_cpu,
                "secondary_loop_cpu": loop_cpu - ready_loop_cpu,
                "primary_rss": peak_rss(primary.pid),
                "secondary_rss": peak_rss(secondary.pid),
                "head": head,
            }
            wait_acked(port, tls, 60, secondary)
        finally:
            secondary.stop()
    finally:
        primary.stop()
    row["work"] = str(work)
    return row


def cpu_bound(run: dict) -> float:
    """Seconds a sync needs at least, from the CPU it used: ``bench_sync``'s bound."""
    return max(run["secondary_loop_cpu"], (run["primary_cpu"] + run["secondary_sync_cpu"]) / (os.cpu_count() or 1))


def bench_sync() -> None:
    src, info = sync_data()
    tls = ensure_tls()
    total = info["bytes"] + info["blob_bytes"]
    txns = info["transactions"]
    say(f"initial sync: {txns} transactions, {info['bytes'] / MB:.0f} MB Data.fs + "
        f"{info['blob_bytes'] / MB:.0f} MB blobs, {SYNC_REPEATS} runs")
    runs: dict[str, list[dict]] = {"copy_on": [], "copy_off": [], "replication": []}
    for i in range(SYNC_REPEATS):
        runs["copy_off"].append(local_copy(src, "off"))
        say(f"  run {i + 1}: copy fsync off {runs['copy_off'][-1]['seconds']:.1f}s")
        runs["replication"].append(replicate(src, tls))
        say(f"  run {i + 1}: replication {runs['replication'][-1]['seconds']:.1f}s")
        if i == 0:
            verify(src, Path(runs["replication"][-1]["work"]))
        runs["copy_on"].append(local_copy(src, "on"))
        say(f"  run {i + 1}: copy fsync on {runs['copy_on'][-1]['seconds']:.1f}s")
    shutil.rmtree(RUN / "work" / "sync", ignore_errors=True)
    rates = {k: [txns / r["seconds"] for r in v] for k, v in runs.items()}
    mbs = {k: [total / MB / r["seconds"] for r in v] for k, v in runs.items()}
    # Ratios pair the runs of one repetition (same minute, same cache state).
    ratio_on = [a / b for a, b in zip(rates["replication"], rates["copy_on"], strict=True)]
    ratio_off = [a / b for a, b in zip(rates["replication"], rates["copy_off"], strict=True)]
    gb = total / (1 << 30)
    results["sync"] = {
        "transactions": txns, "data_fs_bytes": info["bytes"], "blob_bytes": info["blob_bytes"],
        "runs": runs, "txn_per_s": rates, "mb_per_s": mbs, "ratio_on": ratio_on, "ratio_off": ratio_off,
        "startup_s": [r["startup"] for r in runs["replication"]],
        "txn_per_s_from_process_start": [txns / (r["seconds"] + r["startup"]) for r in runs["replication"]],
        "secondary_loop_busy": [r["secondary_loop_cpu"] / r["seconds"] for r in runs["replication"]],
        "secondary_loop_cpu": [r["secondary_loop_cpu"] for r in runs["replication"]],
        # The least time the CPU each run spent allows, however well the two processes shared
        # the cores: their CPU during the sync over the cores, or the busiest thread's if longer.
        # (The primary's counts from just before the secondary starts: a little over.)
        "cpu_bound_ratio_on": [txns / cpu_bound(r) / on for r, on in zip(runs["replication"], rates["copy_on"],
                                                                          strict=True)],
        "cpu_bound_ratio_off": [txns / cpu_bound(r) / off for r, off in zip(runs["replication"],
                                                                            rates["copy_off"], strict=True)],
        "primary_cpu_per_gb": [r["primary_cpu"] / gb for r in runs["replication"]],
        "secondary_cpu_per_gb": [r["secondary_cpu"] / gb for r in runs["replication"]],
        "copy_cpu_per_gb": [r["cpu"] / gb for r in runs["copy_off"]],
        "primary_rss": [r["primary_rss"] for r in runs["replication"]],
        "secondary_rss": [r["secondary_rss"] for r in runs["replication"]],
    }


def verify(src: Path, dst: Path) -> None:
    t0 = time.time()
    proc = subprocess.run([REPLICATOR, "verify", str(src / "Data.fs"), str(dst / "Data.fs"), "--blob-dir-a",
                           str(src / "blobs"), "--blob-dir-b", str(dst / "blobs")],
                          capture_output=True, text=True)
    results.setdefault("checks", []).append(
        f"verify after the first sync: exit {proc.returncode} ({time.time() - t0:.0f}s): "
        f"{proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]}")
    if proc.returncode != 0:
        raise SystemExit(f"replica differs from its source:\n{proc.stdout}\n{proc.stderr}")


# -- ZEO set-ups ------------------------------------------------------------


class ZeoSetup:
    """A ZEO server on a fresh Data.fs, optionally with a sidecar primary and a secondary."""

    def __init__(self, name: str, replicated: bool, trace: Path | None = None, embedded: bool = False,
                 sync: bool = False, separate_disk: bool = True, poller: str | None = None) -> None:
        # Two machines on one: every process of the primary's side runs on
        # PRIMARY_CPUS, the secondary on SECONDARY_CPUS (see common.py).
        self.primary_cpus, self.secondary_cpus = PRIMARY_CPUS, SECONDARY_CPUS
        self.work = fresh(RUN / "work" / name)
        self.tls = ensure_tls()
        (self.work / "zeo").mkdir()
        # separate_disk: the secondary's storage on tmpfs, standing in for
        # the disk of the secondary's own machine, whose fsyncs do not queue
        # behind the primary's.
        self.sec_dir = fresh(SHM / name) if separate_disk else self.work / "sec"
        self.sec_dir.mkdir(exist_ok=True)
        self.zeo_port = free_port()
        self.primary = self.secondary = None
        self.port = free_port() if replicated else None
        port = self.port or 0  # only used when replicated
        if embedded:
            # The primary inside the ZEO server: replicator's ZConfig section wraps the filestorage.
            conf = self.work / "zeo.conf"
            conf.write_text(
                f"%import replicator\n<zeo>\n  address 127.0.0.1:{self.zeo_port}\n</zeo>\n"
                f"<replicated-primary>\n  listen 127.0.0.1:{self.port}\n  node primary\n"
                f"  tls-ca {self.tls / 'ca.pem'}\n  tls-cert {self.tls / 'primary.pem'}\n"
                f"  tls-key {self.tls / 'primary.key'}\n" + ("  sync-count 1\n" if sync else "") + "  <filestorage>\n"
                f"    path {self.work / 'zeo' / 'Data.fs'}\n    blob-dir {self.work / 'zeo' / 'blobs'}\n"
                f"  </filestorage>\n</replicated-primary>\n")
            with on_cpus(self.primary_cpus):
                self.zeo = Proc([str(Path(PY).parent / "runzeo"), "-C", str(conf)], self.work / "zeo.log")
            wait_for_port(self.zeo_port, self.zeo.proc)
            wait_for_port(port, self.zeo.proc)
        else:
            with on_cpus(self.primary_cpus):
                self.zeo = start_zeo(self.work, self.work / "zeo" / "Data.fs", self.work / "zeo" / "blobs",
                                     self.zeo_port)
        if not sync:
            self.writers(rate=0, seconds=0.2, count=1)  # creates the root: concurrent first opens race
        if poller:
            # No replication: a process that only looks at the file every 10 ms, in the
            # sidecar's place (bench/poller.py), counted as the sidecar.
            with on_cpus(self.primary_cpus):
                self.primary = Proc([PY, str(HERE / "poller.py"), str(self.work / "zeo" / "Data.fs"),
                                     str(POLL_INTERVAL), poller], self.work / "poller.log")
        if replicated:
            if not embedded:
                with on_cpus(self.primary_cpus):
                    self.primary = start_primary(self.work, self.work / "zeo" / "Data.fs",
                                                 self.work / "zeo" / "blobs", port, self.tls)
            env = {TRACE_ENV: str(trace)} if trace else None
            with on_cpus(self.secondary_cpus):
                self.secondary = start_secondary(self.work, self.sec_dir / "Data.fs", self.sec_dir / "blobs",
                                                 port, self.tls, env=env)
        if sync:
            # Synchronous: even the first commit waits for the secondary, so it comes first.
            self.writers(rate=0, seconds=0.2, count=1)

    def writers(self, rate: float, seconds: float, count: int) -> list[tuple[str, float, float]]:
        """Run ``count`` writer processes sharing ``rate``; their (tid, start, done) lines."""
        return self.writers_done(*self.start_writers(rate, seconds, count), seconds)

    def start_writers(self, rate: float, seconds: float, count: int,
                      start_at: float = 0.0) -> tuple[list[subprocess.Popen], list[Path]]:
        """Start the writers (all committing from ``start_at``, if given); ``writers_done`` collects them."""
        outs = [self.work / f"writer{i}.txt" for i in range(count)]
        extra = [f"{start_at:.6f}"] if start_at else []
        with on_cpus(self.primary_cpus):
            procs = [subprocess.Popen([PY, str(HERE / "writer.py"), str(self.zeo_port), str(rate / count),
                                       str(seconds), str(out), str(i), *extra]) for i, out in enumerate(outs)]
        return procs, outs

    @staticmethod
    def writers_done(procs: list[subprocess.Popen], outs: list[Path],
                     seconds: float) -> list[tuple[str, float, float]]:
        for proc in procs:
            if proc.wait(seconds + 120) != 0:
                raise SystemExit(f"writer failed with {proc.returncode}")
        lines = []
        for out in outs:
            for line in out.read_text().splitlines():
                tid, start, done = line.split()
                lines.append((tid, float(start), float(done)))
        return lines

    def caught_up(self, timeout: float = 120) -> int:
        """Wait until the secondary acknowledged the head; the primary's ``batched_wakeups`` so far."""
        if self.port is None:
            return 0
        return wait_acked(self.port, self.tls, timeout, self.secondary, interval=0.05)["batched_wakeups"]

    def busy(self) -> tuple[int, int]:
        """(idle, total) ticks of the primary's CPUs so far (``busy_share`` of two of them)."""
        return cpu_ticks(Path("/proc/stat").read_text(), set(self.primary_cpus)) or (0, 0)

    def stop(self) -> None:
        for proc in (self.secondary, self.primary, self.zeo):  # secondary first: no reconnect noise
            if proc is not None:
                proc.stop()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.sec_dir, ignore_errors=True)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the time the CPUs were not idle between two ``ZeoSetup.busy()`` readings."""
    total = after[1] - before[1]
    return 1 - (after[0] - before[0]) / total if total > 0 else 0.0


def _writers_for(rate: float) -> int:
    return 1 if rate <= 200 else 4


# -- 2. lag -----------------------------------------------------------------


def bench_lag() -> None:
    results["lag"] = {}
    embedded = (ROOT / "replicator" / "wrappers.py").exists()
    runs = [("sidecar", LAG_LOW_RATE)] + [("sidecar", r) for r in LAG_RATES]
    for mode, rate in runs + ([("embedded", r) for r in LAG_RATES] if embedded else []):
        trace = RUN / "work" / f"trace-{rate}.txt"
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.unlink(missing_ok=True)
        setup = ZeoSetup(f"lag-{rate}", replicated=True, trace=trace, embedded=mode == "embedded")
        try:
            setup.writers(rate=0, seconds=0.5, count=_writers_for(rate))  # create the objects
            batched = setup.caught_up()
            say(f"lag, {mode}: {rate} txn/s offered for {LAG_SECONDS}s")
            busy = setup.busy()
            lines = setup.writers(rate, LAG_SECONDS, _writers_for(rate))
            busy_after = setup.busy()
            batched = setup.caught_up() - batched
            applied = {}
            for line in trace.read_text().splitlines():
                tid, at = line.split()
                applied[tid] = float(at)
        finally:
            setup.stop()
        lags = sorted((applied[tid] - done) * 1000 for tid, _start, done in lines)
        first = min(start for _t, start, _d in lines)
        last = max(done for _t, _s, done in lines)
        results["lag"][f"{mode} {rate}"] = {
            "mode": mode, "offered": rate, "achieved": len(lines) / (last - first), "count": len(lines),
            "p50_ms": percentile(lags, 0.5), "p99_ms": percentile(lags, 0.99), "max_ms": lags[-1],
            "commit_p50_ms": percentile(sorted((d - s) * 1000 for _t, s, d in lines), 0.5),
            "busy": busy_share(busy, busy_after), "batched_wakeups": batched,
        }
        trace.unlink(missing_ok=True)


# -- 3. cost to the primary -------------------------------------------------


#: mode -> ZeoSetup options; "off" is the baseline every other mode is paired with.
class _Mode(TypedDict, total=False):
    replicated: bool
    embedded: bool
    sync: bool
    poller: str


COST_MODES: dict[str, _Mode] = {
    "off": {"replicated": False},
    # No replication: a process that wakes every 10 ms to stat Data.fs on an
    # asyncio timer, as the sidecar's poller does under load, and does nothing
    # else.  What it costs is the floor of the sidecar's way of looking; the
    # sidecar's cost beyond it is the work of shipping the commits.
    "10 ms look": {"replicated": False, "poller": "asyncio"},
    "sidecar": {"replicated": True},
    "embedded": {"replicated": True, "embedded": True},
    "embedded, synchronous": {"replicated": True, "embedded": True, "sync": True},
}


#: mode -> wake-ups a second the primary put off under CPU saturation, per cost run.
BATCHED: dict[str, list[float]] = {}
#: mode -> process -> share of a core it used while no client committed, per cost run.
IDLE: dict[str, dict[str, list[float]]] = {}


def _cost_run(i: int, mode: str, through: dict, cpu: dict, latency: dict) -> None:
    setup = ZeoSetup(f"cost-{i}", **COST_MODES[mode])
    try:
        setup.writers(rate=0, seconds=0.5, count=2)
        batched = setup.caught_up()
        procs = {name: p for name, p in {"zeo": setup.zeo, "sidecar": setup.primary}.items() if p is not None}
        idle_start = {name: cpu_seconds(p.proc.pid) for name, p in procs.items()}
        time.sleep(IDLE_SECONDS)  # nobody commits: what does each process cost when idle?
        before = {name: cpu_seconds(p.proc.pid) for name, p in procs.items()}
        for name, start in idle_start.items():
            IDLE.setdefault(mode, {}).setdefault(name, []).append((before[name] - start) / IDLE_SECONDS)
        # An embedded primary's threads in the ZEO server, told apart by the names they give themselves.
        threads_before = thread_cpu_seconds(setup.zeo.proc.pid, REPLICATION_THREADS)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the writers, once reaped
        lines = setup.writers(rate=0, seconds=COST_SECONDS, count=2)
        threads = threads_cpu_since(setup.zeo.proc.pid, REPLICATION_THREADS, threads_before)
        for name, start in before.items():
            used = cpu_seconds(procs[name].proc.pid) - start
            if name == "zeo" and COST_MODES[mode].get("embedded"):
                cpu[mode]["replication thread"].append(threads / len(lines) * 1e6)
                used -= threads
            cpu[mode][name].append(used / len(lines) * 1e6)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        writers_cpu = (reaped.ru_utime + reaped.ru_stime) - (children.ru_utime + children.ru_stime)
        cpu[mode]["writers"].append(writers_cpu / len(lines) * 1e6)
        through[mode].append(len(lines) / COST_SECONDS)
        batched = setup.caught_up() - batched
        if setup.port is not None:
            BATCHED.setdefault(mode, []).append(batched / COST_SECONDS)
        say(f"cost run {i + 1}: replication {mode}: {through[mode][-1]:.0f} commits/s")
        if i == 0 and mode not in latency:
            lines = setup.writers(rate=200, seconds=COST_SECONDS, count=1)
            lat = sorted((d - s) * 1000 for _t, s, d in lines)
            latency[mode] = {"p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99)}
        setup.caught_up()
    finally:
        setup.stop()


def bench_cost() -> None:
    """Each round runs every mode once; each mode's run is compared with the
    mean of the runs without replication just before and just after it (the
    next round's first run), so that the machine's slow drifts cancel."""
    through: dict[str, list[float]] = {mode: [] for mode in COST_MODES}
    # CPU microseconds per commit of every process on the primary's core.
    # The core is saturated, so throughput is about 1 / their sum: a second
    # estimate of the cost that steal and wall-clock noise do not reach.
    cpu: dict[str, dict[str, list[float]]] = {
        mode: {"zeo": [], "replication thread": [], "sidecar": [], "writers": []} for mode in COST_MODES}
    latency: dict[str, dict] = {}
    for i in range(COST_REPEATS):
        for mode in COST_MODES:
            _cost_run(i, mode, through, cpu, latency)
    _cost_run(COST_REPEATS, "off", through, cpu, latency)  # closes the last round's bracket

    def bracket(values: list[float], i: int) -> float:
        return (values[i] + values[i + 1]) / 2

    def core_cpu(mode: str, i: int) -> float:
        return sum(values[i] for values in cpu[mode].values() if values)

    def own_cpu(mode: str, i: int) -> float:
        """Microseconds per commit that replication itself spends on the primary's core: the
        sidecar's CPU, or that of the embedded primary's threads in the ZEO server.  What
        it leaves out, the server and its clients running slower beside it, is also what
        the machine's noise is made of (their rows show it)."""
        for side in ("sidecar", "replication thread"):
            if cpu[mode][side]:
                return cpu[mode][side][i]
        return 0.0

    off_core = [core_cpu("off", i) for i in range(COST_REPEATS + 1)]
    results["cost"] = {
        "throughput": through,
        "ratio": {mode: [through[mode][i] / bracket(through["off"], i) for i in range(COST_REPEATS)]
                  for mode in COST_MODES if mode != "off"},
        "cpu_ratio": {mode: [bracket(off_core, i) / core_cpu(mode, i) for i in range(COST_REPEATS)]
                      for mode in COST_MODES if mode != "off"},
        "own_cpu_ratio": {mode: [1 - own_cpu(mode, i) / core_cpu(mode, i) for i in range(COST_REPEATS)]
                          for mode in COST_MODES if mode != "off"},
        "latency_200": latency,
        "cpu_us_per_commit": cpu,
        "batched_per_s": BATCHED,
        "idle_share": IDLE,
    }
    bench_cost_side_by_side()


#: Modes measured side by side with the baseline on the primary's core; "off"
#: against "off" is the method's own control: what it reads when nothing differs.
SIDE_MODES = ("off", "10 ms look", "sidecar", "embedded")
SIDE_PAIRS = 1 if QUICK else 7
SIDE_GROUPS = ("replicator-bench-a", "replicator-bench-b")


def bench_cost_side_by_side() -> None:
    """The baseline and a mode on the primary's core at the same time, each half
    (ZEO server, its 2 clients, the sidecar if any) in a control group of equal
    CPU weight, the clients of both committing over the same window.  The
    machine's speed swings, which spread the one-after-the-other ratios over a
    band far wider than 5%, reach both halves alike.  The halves swap groups
    every other pair.  Only asynchronous modes: a synchronous half waits for
    its secondary, and the other half would take the idle core."""
    groups = CpuGroups.create(SIDE_GROUPS)
    if isinstance(groups, str):
        results["cost"]["side_by_side_unavailable"] = groups
        say(f"cost side by side: not measured: {groups}")
        return
    ratios: dict[str, list[float]] = {mode: [] for mode in SIDE_MODES}
    through: dict[str, list[tuple[float, float]]] = {mode: [] for mode in SIDE_MODES}
    # The replicated half's own CPU per commit (the sidecar's or looking process's,
    # or the embedded primary's threads'), and its wake-ups put off: what the
    # rounds one after the other report too, here under half a core.
    own: dict[str, list[float]] = {mode: [] for mode in SIDE_MODES}
    put_off: dict[str, list[float]] = {mode: [] for mode in SIDE_MODES}
    try:
        for i in range(SIDE_PAIRS):
            for mode in SIDE_MODES:
                arms = [("off", SIDE_GROUPS[i % 2]), (mode, SIDE_GROUPS[1 - i % 2])]
                setups: list[ZeoSetup] = []
                try:
                    for k, (arm, group) in enumerate(arms):
                        with groups.inside(group):
                            setups.append(ZeoSetup(f"side-{k}", **COST_MODES[arm]))
                        if setups[-1].secondary is not None:
                            # The secondary stands for another machine: in neither half.
                            groups.leave(setups[-1].secondary.pid)
                        with groups.inside(group):
                            setups[-1].writers(rate=0, seconds=0.5, count=2)
                    batched = [setup.caught_up() for setup in setups]
                    own_since = _own_cpu_meter(setups[1], mode)
                    start_at = time.time() + 3  # every client connected and waiting by then
                    started = []
                    for setup, (_arm, group) in zip(setups, arms, strict=True):
                        with groups.inside(group):
                            started.append(setup.start_writers(0, COST_SECONDS, 2, start_at))
                    commits = [len(ZeoSetup.writers_done(*procs_outs, COST_SECONDS)) for procs_outs in started]
                    rates = [n / COST_SECONDS for n in commits]
                    if own_since is not None and commits[1]:
                        own[mode].append(own_since() / commits[1] * 1e6)
                    after = [setup.caught_up() for setup in setups]
                    if setups[1].port is not None:
                        put_off[mode].append((after[1] - batched[1]) / COST_SECONDS)
                finally:
                    for setup in setups:
                        setup.stop()
                through[mode].append((rates[0], rates[1]))
                ratios[mode].append(rates[1] / rates[0])
                say(f"cost side by side {i + 1}: {mode} {rates[1]:.0f} commits/s, off {rates[0]:.0f}: "
                    f"{ratios[mode][-1]:.3f}")
    finally:
        groups.remove()
    results["cost"]["side_by_side"] = {"ratio": ratios, "throughput": through, "own_cpu_us_per_commit": own,
                                       "batched_per_s": put_off}


def _own_cpu_meter(setup: ZeoSetup, mode: str) -> Callable[[], float] | None:
    """From now, the CPU seconds replication (or the bare look) spends beside or in
    this half's ZEO server, read as ``_cost_run`` does; None for a half without either."""
    if COST_MODES[mode].get("embedded"):
        pid = setup.zeo.proc.pid
        threads = thread_cpu_seconds(pid, REPLICATION_THREADS)
        return lambda: threads_cpu_since(pid, REPLICATION_THREADS, threads)
    if setup.primary is not None:
        pid = setup.primary.proc.pid
        start = cpu_seconds(pid)
        return lambda: cpu_seconds(pid) - start
    return None


# -- 4. memory with huge blobs and transactions -----------------------------


def bench_memory() -> None:
    src = big_data()
    tls = ensure_tls()
    say(f"memory: streaming a {BIG_BLOB_MB} MB blob and a {BIG_TXN_MB} MB transaction")
    row = replicate(src, tls)
    shutil.rmtree(row.pop("work"), ignore_errors=True)
    results["memory"] = row


# -- report -----------------------------------------------------------------


def report() -> str:
    m = results["machine"]
    out = [f"Machine: {m['cores']} cores, {m['cpu']}, {m['memory_gb']} GB RAM, Linux {m['kernel']}; "
           f"Python {m['python']}, ZODB {m['zodb']}, ZEO {m['zeo']}; {m['date']}"
           + (" (BENCH_QUICK)" if m["quick"] else ""), ""]
    if "lag" in results or "cost" in results:
        out += [f"Lag and cost model two machines: the primary's side (ZEO server, its clients, the sidecar "
                f"primary) runs on CPU {sorted(PRIMARY_CPUS)}, the secondary on CPU {sorted(SECONDARY_CPUS)} "
                "with its storage on tmpfs.", ""]
    out += ["| measurement | result | target | |", "| --- | --- | --- | --- |"]

    def row(what: str, value: str, target: str = "", ok: bool | None = None) -> None:
        out.append(f"| {what} | {value} | {target} | {'' if ok is None else 'met' if ok else 'MISSED'} |")

    if "sync" in results:
        s = results["sync"]
        row(f"initial sync, {s['transactions']} txns, {s['data_fs_bytes'] / MB:.0f} MB + "
            f"{s['blob_bytes'] / MB:.0f} MB blobs, TLS", f"{fmt(s['txn_per_s']['replication'], 0)} txn/s, "
            f"{fmt(s['mb_per_s']['replication'], 1)} MB/s")
        if "startup_s" in s:
            row("... the same from the secondary's process start (interpreter and imports included)",
                f"{fmt(s['txn_per_s_from_process_start'], 0)} txn/s (start-up {fmt(s['startup_s'], 2)} s)")
        row("local copyTransactionsFrom, fsync on", f"{fmt(s['txn_per_s']['copy_on'], 0)} txn/s, "
            f"{fmt(s['mb_per_s']['copy_on'], 1)} MB/s")
        row("local copyTransactionsFrom, fsync off", f"{fmt(s['txn_per_s']['copy_off'], 0)} txn/s, "
            f"{fmt(s['mb_per_s']['copy_off'], 1)} MB/s")
        med_on = median_range(s["ratio_on"])[0]
        med_off = median_range(s["ratio_off"])[0]
        row("sync / copy (fsync on)", fmt(s["ratio_on"], 2) + "x", ">= 3x", med_on >= 3)
        row("sync / copy (fsync off)", fmt(s["ratio_off"], 2) + "x", ">= 0.6x", med_off >= 0.6)
        if "cpu_bound_ratio_on" in s:
            row("... the secondary's event-loop thread (it receives, decodes and applies): its CPU during the "
                "sync; the share of the sync it was busy", f"{fmt(s['secondary_loop_cpu'], 2)} s; "
                f"{fmt(s['secondary_loop_busy'], 0, 100)}%")
            row(f"... the most the CPU spent allows (primary's and secondary's over {os.cpu_count()} cores, or "
                "that thread's alone if longer): sync / copy, fsync on; fsync off", f"{fmt(s['cpu_bound_ratio_on'], 2)}x; "
                f"{fmt(s['cpu_bound_ratio_off'], 2)}x")
        row("CPU per GB replicated: primary / secondary",
            f"{fmt(s['primary_cpu_per_gb'], 1)} s / {fmt(s['secondary_cpu_per_gb'], 1)} s "
            f"(local copy: {fmt(s['copy_cpu_per_gb'], 1)} s)")
        prss, srss = max(s["primary_rss"]) / MB, max(s["secondary_rss"]) / MB
        row("peak RSS during initial sync: primary / secondary", f"{prss:.0f} MB / {srss:.0f} MB",
            "<= 120 MB", max(prss, srss) <= 120)
    if "memory" in results:
        mem = results["memory"]
        prss, srss = mem["primary_rss"] / MB, mem["secondary_rss"] / MB
        row(f"peak RSS streaming a {BIG_BLOB_MB} MB blob and a {BIG_TXN_MB} MB txn: primary / secondary",
            f"{prss:.0f} MB / {srss:.0f} MB ({mem['seconds']:.1f}s)", "<= 120 MB", max(prss, srss) <= 120)
    if "lag" in results:
        for lag in results["lag"].values():
            rate = lag["offered"]
            limit = {"sidecar": 15.0, "embedded": 5.0}.get(lag["mode"]) if rate == 200 else None
            load = (f"; primary's core {lag['busy'] * 100:.0f}% busy, {lag['batched_wakeups']} wake-ups "
                    "batched" if "busy" in lag else "")
            row(f"lag, {lag['mode']} primary, {rate} txn/s offered ({lag['achieved']:.0f} achieved, {lag['count']} txns)",
                f"p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms, max {lag['max_ms']:.1f} ms{load}",
                f"p99 <= {limit:.0f} ms" if limit else "", lag["p99_ms"] <= limit if limit else None)
    if "cost" in results:
        c = results["cost"]
        row("ZEO commits/s, 2 writers, closed loop, without replication", fmt(c["throughput"]["off"], 0))
        def floor(mode: str) -> bool:
            """The mode whose "sidecar" only looks at the file (bench/poller.py)."""
            return "poller" in COST_MODES.get(mode, {})

        names = {"zeo": "ZEO server", "replication thread": "replication's threads in it", "sidecar": "sidecar",
                 "writers": "the 2 clients"}

        def named(mode: str, name: str) -> str:
            return "the looking process" if name == "sidecar" and floor(mode) else names[name]

        side = c.get("side_by_side")
        for mode, ratios in c["ratio"].items():
            asynchronous = "synchronous" not in mode and not floor(mode)
            # Measured side by side too: the target is judged there, where the machine's swings cancel.
            aside = asynchronous and side is not None and mode in side["ratio"]
            target = "judged side by side, below" if aside else ">= 0.95" if asynchronous else ""
            ok = median_range(ratios)[0] >= 0.95 if asynchronous and not aside else None
            what = ("without replication, a process beside the server that only looks at Data.fs every "
                    f"{POLL_INTERVAL * 1000:.0f} ms, the floor of the sidecar's poll ({mode})" if floor(mode)
                    else f"with replication ({mode})")
            row(f"{what}: commits/s; ratio to without", f"{fmt(c['throughput'][mode], 0)}; {fmt(ratios, 3)}",
                target, ok)
            if mode in c.get("cpu_ratio", {}):
                row(f"... the same from CPU per commit on the primary's core ({mode})",
                    fmt(c["cpu_ratio"][mode], 3))
            if mode in c.get("own_cpu_ratio", {}):
                whose = "that process's" if floor(mode) else "replication's"
                row(f"... the same from {whose} own CPU alone ({mode}): 1 - its share of the core's "
                    "CPU per commit", fmt(c["own_cpu_ratio"][mode], 3))
            if c.get("batched_per_s", {}).get(mode):
                row(f"... wake-ups a second put off under CPU saturation ({mode})",
                    fmt(c["batched_per_s"][mode], 0))
        if side:
            row("side by side: the primary's core shared by two halves (each a ZEO server, its 2 clients, and a "
                "sidecar if any) in control groups of equal CPU weight, committing over the same "
                f"{COST_SECONDS} s; {len(side['ratio']['off'])} pairs, the halves swapping groups every other "
                "pair", "")
            for mode, ratios in side["ratio"].items():
                asynchronous = mode != "off" and not floor(mode)
                what = ("control: without replication, against itself" if mode == "off"
                        else f"only a look at Data.fs every {POLL_INTERVAL * 1000:.0f} ms ({mode})" if floor(mode)
                        else f"with replication ({mode})")
                pairs = side["throughput"][mode]
                row(f"... {what}: commits/s of that half / of the half without; ratio",
                    f"{fmt([b for _a, b in pairs], 0)} / {fmt([a for a, _b in pairs], 0)}; {fmt(ratios, 3)}",
                    ">= 0.95" if asynchronous else "", median_range(ratios)[0] >= 0.95 if asynchronous else None)
                own_us = side.get("own_cpu_us_per_commit", {}).get(mode)
                if own_us:
                    whose = ("the looking process" if floor(mode) else "replication's threads in the server"
                             if COST_MODES[mode].get("embedded") else "the sidecar")
                    put_off = side.get("batched_per_s", {}).get(mode)
                    row(f"... that half's own CPU per commit ({whose})" + ("; wake-ups a second put off" if put_off else ""),
                        f"{fmt(own_us, 0)} us" + (f"; {fmt(put_off, 0)}" if put_off else ""))
        elif "side_by_side_unavailable" in c:
            row("side by side on the primary's core (equal CPU weight, the same window)",
                f"not measured: {c['side_by_side_unavailable']}")
        for mode, sides in c.get("cpu_us_per_commit", {}).items():
            parts = [f"{named(mode, name)} {fmt(values, 0)} us" for name, values in sides.items() if values]
            row(f"CPU per commit, primary's core ({mode})", "; ".join(parts))
        for mode, sides in c.get("idle_share", {}).items():
            parts = [f"{named(mode, name)} {fmt(values, 2, 100)}%" for name, values in sides.items()]
            row(f"CPU with no commits for {IDLE_SECONDS} s, share of a core ({mode})", "; ".join(parts))
        lat = c["latency_200"]
        for mode, values in lat.items():
            row(f"ZEO commit latency at 200 txn/s ({mode})",
                f"p50 {values['p50_ms']:.2f} ms, p99 {values['p99_ms']:.2f} ms")
    out.append("")
    out += [f"- {c}" for c in results.get("checks", [])]
    return "\n".join(out)


SECTIONS = {"sync": bench_sync, "memory": bench_memory, "lag": bench_lag, "cost": bench_cost}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"what to run: any of {', '.join(SECTIONS)} (default: all)")
    sections = parser.parse_args(argv).sections or list(SECTIONS)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"no section {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    RUN.mkdir(exist_ok=True)
    t0 = time.time()
    for name in sections:
        SECTIONS[name]()
    shutil.rmtree(RUN / "work", ignore_errors=True)
    results["seconds"] = time.time() - t0
    text = report() + f"\n\n(make bench took {results['seconds'] / 60:.1f} min)\n"
    (RUN / "results.md").write_text(text)
    (RUN / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    os.chdir(ROOT)
    main(sys.argv[1:])
