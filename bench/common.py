"""Shared machinery of the benchmarks: machine facts, /proc readings, processes, statistics.

Everything measured here is a real process: ``runzeo``, ``replicator primary``,
``replicator secondary`` and helper scripts of this directory, each started
the way an operator would start it.  Readings come from ``/proc`` (peak RSS
is the kernel's ``VmHWM``, CPU is ``utime + stime``).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUN = ROOT / "bench-run"
BIN = Path(sys.executable).parent
PY = sys.executable
REPLICATOR = str(BIN / "replicator")
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
MB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(ROOT))
from tests.helpers import (  # noqa: E402  (after the path set-up on purpose)
    Proc,
    free_port,
    start_zeo,
    tls_args,
    wait_for_port,
    wait_until,
)

__all__ = ["HERE", "ROOT", "RUN", "PY", "REPLICATOR", "QUICK", "MB", "Proc", "free_port", "start_zeo",
           "tls_args", "wait_for_port", "wait_until", "machine", "peak_rss", "cpu_seconds", "median_range",
           "percentile", "ensure_tls", "status", "start_primary", "start_secondary", "say", "dir_bytes",
           "PRIMARY_CPUS", "SECONDARY_CPUS", "on_cpus", "CpuGroups", "local_copy"]

#: The lag and cost sections model two machines on this one: the primary's
#: (ZEO server, its clients, the sidecar primary) gets the first core, the
#: secondary's the other(s).  Without that the secondary's work, which in
#: production runs on another host, would be charged to the primary.
_CPUS = sorted(os.sched_getaffinity(0))
PRIMARY_CPUS = set(_CPUS[:1]) if len(_CPUS) > 1 else set(_CPUS)
SECONDARY_CPUS = set(_CPUS[1:]) if len(_CPUS) > 1 else set(_CPUS)


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None):
    """Processes started inside run on ``cpus`` (inherited affinity); None: anywhere."""
    if cpus is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class CpuGroups:
    """Control groups of equal CPU weight, to run two set-ups side by side on one core.

    Processes started ``inside(name)`` belong to that group (they inherit it
    from this process, which joins it for the moment).  While both groups want
    the core, the kernel gives each the same share of it, so their throughputs
    compare at the same moments: the machine's speed swings reach both alike.
    Needs a writable ``cpu`` controller: cgroup v1 (``cpu.shares``) or v2
    (``cpu.weight``), in practice root.
    """

    def __init__(self, base: Path, weight_file: str, weight: str, home: Path, names: tuple[str, ...]) -> None:
        self.base, self.home, self.names = base, home, names
        for name in names:
            (base / name).mkdir(exist_ok=True)
            (base / name / weight_file).write_text(weight)

    @classmethod
    def create(cls, names: tuple[str, ...]) -> CpuGroups | str:
        """The groups, or why they cannot be made here."""
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _num, controllers, path = line.split(":", 2)
            own[controllers] = path
        v1 = Path("/sys/fs/cgroup/cpu")
        v2 = Path("/sys/fs/cgroup")
        try:
            if (v1 / "cpu.shares").exists():
                home = next(path for controllers, path in own.items() if "cpu" in controllers.split(","))
                return cls(v1, "cpu.shares", "1024", v1 / home.lstrip("/"), names)
            if "cpu" in (v2 / "cgroup.controllers").read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+cpu")
                return cls(v2, "cpu.weight", "100", v2 / own.get("", "/").lstrip("/"), names)
            return "no cpu controller in this system's control groups"
        except (OSError, StopIteration) as exc:
            return f"cannot make control groups here ({exc.__class__.__name__}: {exc}); run as root"

    @contextlib.contextmanager
    def inside(self, name: str):
        (self.base / name / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self.home / "cgroup.procs").write_text(str(os.getpid()))

    def leave(self, pid: int) -> None:
        """Move a process (all its threads) back to this process's own group."""
        (self.home / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for name in self.names:
            with contextlib.suppress(OSError):
                (self.base / name).rmdir()


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> dict:
    from importlib.metadata import version

    import ZEO  # noqa: F401

    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(mem / (1 << 30), 1),
        "python": platform.python_version(),
        "zodb": version("ZODB"),
        "zeo": version("ZEO"),
        "kernel": platform.release(),
        "quick": QUICK,
    }


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for {pid}")


def peak_rss(pid: int) -> int:
    """The kernel's high-water mark of the process's resident set (VmHWM), bytes."""
    return _proc_status(pid, "VmHWM")


def _stat_cpu(raw: str) -> float:
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (threads included)."""
    return _stat_cpu(Path(f"/proc/{pid}/stat").read_text())


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process's first thread alone (a service's event loop)."""
    return _stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat").read_text())


def thread_cpu_seconds(pid: int, names: frozenset[str]) -> dict[int, float]:
    """CPU seconds so far of each live thread of ``pid`` whose system name is one of ``names``."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except FileNotFoundError:  # ended meanwhile
            continue
        if raw[raw.index("(") + 1:raw.rindex(")")] in names:
            found[int(task.name)] = _stat_cpu(raw)
    return found


def threads_cpu_since(pid: int, names: frozenset[str], before: dict[int, float]) -> float:
    """CPU seconds the threads named ``names`` used since ``before`` (``thread_cpu_seconds``).

    A thread started since counts from zero; one that ended since is lost,
    so this is a floor (replication's threads live as long as the server).
    """
    return sum(cpu - before.get(tid, 0.0) for tid, cpu in thread_cpu_seconds(pid, names).items())


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def ensure_tls() -> Path:
    tls = RUN / "tls"
    if not (tls / "secondary.key").exists():
        subprocess.run([REPLICATOR, "certs", "init", "--dir", str(tls), "--node", "primary", "--node",
                        "secondary", "--force"], check=True, capture_output=True)
    return tls


def status(port: int, tls: Path) -> dict:
    """GET /status of a node over mutual TLS (a direct HTTPS request, cheap enough to poll)."""
    ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    ctx.load_cert_chain(str(tls / "secondary.pem"), str(tls / "secondary.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/status")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def start_primary(workdir: Path, storage: Path, blob_dir: Path | None, port: int, tls: Path,
                  env: dict | None = None) -> Proc:
    argv = [REPLICATOR, "primary", "--storage", str(storage), "--listen", f"127.0.0.1:{port}",
            "--node", "primary", "--log-level", "WARNING", *tls_args(tls, "primary")]
    if blob_dir:
        argv += ["--blob-dir", str(blob_dir)]
    proc = Proc(argv, workdir / "primary.log", env=env)
    wait_for_port(port, proc.proc, timeout=120)
    return proc


def start_secondary(workdir: Path, storage: Path, blob_dir: Path | None, primary_port: int, tls: Path,
                    env: dict | None = None) -> Proc:
    argv = [REPLICATOR, "secondary", "--storage", str(storage), "--primary", f"127.0.0.1:{primary_port}",
            "--node", "secondary", "--log-level", "WARNING", *tls_args(tls, "secondary")]
    if blob_dir:
        argv += ["--blob-dir", str(blob_dir)]
    return Proc(argv, workdir / "secondary.log", env=env)


def wait_acked(primary_port: int, tls: Path, timeout: float, proc: Proc | None = None,
               interval: float = 0.1) -> dict:
    """Poll the primary's /status until one secondary acknowledged the primary's newest TID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.argv[1]} exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        try:
            st = status(primary_port, tls)
        except OSError:
            st = None
        if st and st["secondaries"] and st["secondaries"][0]["acked_tid"] == st["last_tid"]:
            return st
        time.sleep(interval)
    raise TimeoutError(f"secondary did not acknowledge the primary's head within {timeout}s")


def local_copy(src: Path, mode: str) -> dict:
    """ZODB's own local copy of ``src`` (``copy_local.py``) with FileStorage's fsync ``on`` or ``off``:
    its seconds, CPU seconds and peak RSS."""
    dst = RUN / "work" / f"copy-{mode}"
    shutil.rmtree(dst, ignore_errors=True)
    try:
        out = subprocess.run([PY, str(HERE / "copy_local.py"), str(src), str(dst), mode], check=True,
                             capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    return json.loads(out.splitlines()[-1])
