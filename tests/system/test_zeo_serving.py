"""Replication inside ZEO servers: ``runzeo`` processes configured with ``%import replicator``.

One ZEO server runs ``<replicated-primary>`` (the primary embedded in the
server that writes), another ``<replicated-secondary>`` (a read-only replica
served to ZEO clients); the clients are real ``ClientStorage`` databases and
the stream between the servers is real mutual TLS.  What a replica's clients
must get: every commit made on the primary, soon, without reconnecting;
ReadOnlyError for writes; correct caches after a disconnection; blobs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.blob import Blob
from ZODB.POSException import ReadOnlyError

from tests.helpers import REPLICATOR, RUNZEO, Proc, free_port, tls_args, wait_for_port, wait_until

TRANSACTIONS = 1000


def tls_lines(tls_dir: Path, node: str) -> str:
    return (f"  tls-ca {tls_dir / 'ca.pem'}\n  tls-cert {tls_dir / f'{node}.pem'}\n"
            f"  tls-key {tls_dir / f'{node}.key'}\n")


def filestorage(directory: Path) -> str:
    return f"  <filestorage>\n    path {directory / 'Data.fs'}\n    blob-dir {directory / 'blobs'}\n  </filestorage>\n"


def primary_conf(workdir: Path, tls_dir: Path, zeo_port: int, repl_port: int) -> Path:
    conf = workdir / "primary-zeo.conf"
    conf.write_text("%import replicator\n"
                    f"<zeo>\n  address 127.0.0.1:{zeo_port}\n</zeo>\n"
                    f"<replicated-primary>\n  listen 127.0.0.1:{repl_port}\n  node primary\n"
                    f"{tls_lines(tls_dir, 'primary')}{filestorage(workdir / 'primary')}</replicated-primary>\n")
    return conf


def secondary_conf(workdir: Path, tls_dir: Path, zeo_port: int, repl_port: int) -> Path:
    conf = workdir / "secondary-zeo.conf"
    conf.write_text("%import replicator\n"
                    f"<zeo>\n  address 127.0.0.1:{zeo_port}\n</zeo>\n"
                    f"<replicated-secondary>\n  primary 127.0.0.1:{repl_port}\n  node secondary\n"
                    f"{tls_lines(tls_dir, 'secondary')}{filestorage(workdir / 'secondary')}"
                    "</replicated-secondary>\n")
    return conf


class Cluster:
    """A primary ZEO server and a replica ZEO server, both ``runzeo -C``."""

    def __init__(self, workdir: Path, tls_dir: Path) -> None:
        self.workdir = workdir
        for name in ("primary", "secondary"):
            (workdir / name).mkdir()
        self.primary_zeo, self.repl_port, self.replica_zeo = free_port(), free_port(), free_port()
        self.primary_conf = primary_conf(workdir, tls_dir, self.primary_zeo, self.repl_port)
        self.secondary_conf = secondary_conf(workdir, tls_dir, self.replica_zeo, self.repl_port)
        self.primary = Proc([RUNZEO, "-C", str(self.primary_conf)], workdir / "primary-zeo.log")
        wait_for_port(self.primary_zeo, self.primary.proc)
        wait_for_port(self.repl_port, self.primary.proc)
        self.replica = self.start_replica()

    def start_replica(self) -> Proc:
        proc = Proc([RUNZEO, "-C", str(self.secondary_conf)], self.workdir / "secondary-zeo.log")
        wait_for_port(self.replica_zeo, proc.proc)
        return proc

    def restart_replica(self, while_down) -> None:
        assert self.replica.stop() == 0, self.replica.output()[-3000:]
        while_down()
        self.replica = self.start_replica()

    def stop(self) -> None:
        for proc in (self.replica, self.primary):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name} ---\n{p.output()[-4000:]}" for p in (self.primary, self.replica))


class Client:
    """A ZODB database on a ZEO server, with its own transaction manager."""

    def __init__(self, port: int, blob_dir: Path, **options) -> None:
        self.storage = ClientStorage(("127.0.0.1", port), blob_dir=str(blob_dir), wait_timeout=30, **options)
        self.db = ZODB.DB(self.storage)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)

    @property
    def root(self):
        return self.conn.root()

    def close(self) -> None:
        self.tm.abort()
        self.conn.close()
        self.db.close()


def count_disconnects(client: Client) -> list[float]:
    """A list that grows each time ``client`` loses its server."""
    seen: list[float] = []
    notify = client.storage.notify_disconnected

    def counting() -> None:
        seen.append(time.monotonic())
        notify()
    client.storage.notify_disconnected = counting
    return seen


def replica_client(port: int, blob_dir: Path, until_tid: bytes, **options) -> Client:
    """A read-only client, opened once the replica holds ``until_tid`` (the root must be there)."""
    probe = ClientStorage(("127.0.0.1", port), read_only=True, wait_timeout=30)
    try:
        wait_until(lambda: probe.lastTransaction() >= until_tid, timeout=30, what="replica caught up")
    finally:
        probe.close()
    return Client(port, blob_dir, read_only=True, **options)


def see(client: Client, check, timeout: float = 10.0) -> float:
    """Poll ``client`` with new transactions until ``check(root)``; return how long it took."""
    start = time.perf_counter()
    while True:
        client.tm.begin()
        if check(client.root):
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"replica client did not see the change within {timeout}s")
        time.sleep(0.0005)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tls_dir):
    workdir = tmp_path_factory.mktemp("zeo-serving")
    cluster = Cluster(workdir, tls_dir)
    writer = Client(cluster.primary_zeo, workdir / "writer-blobs")
    writer.root["objs"] = PersistentMapping()
    writer.tm.commit()
    cluster.writer = writer  # type: ignore[attr-defined]
    try:
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        writer.close()
        cluster.stop()


def last_tid(client: Client) -> bytes:
    return client.storage.lastTransaction()


def test_replica_clients_see_every_commit_within_a_second_without_reconnecting(cluster, tmp_path):
    writer = cluster.writer
    reader = replica_client(cluster.replica_zeo, tmp_path / "reader-blobs", last_tid(writer))
    disconnects = count_disconnects(reader)
    delays = []
    try:
        for i in range(TRANSACTIONS):
            writer.root["counter"] = i
            writer.tm.commit()
            delays.append(see(reader, lambda root, i=i: root.get("counter") == i))
        assert reader.storage.is_connected() and not disconnects
    finally:
        reader.close()
    delays.sort()
    median, worst = statistics.median(delays), delays[-1]
    print(f"\nreplica visibility over {TRANSACTIONS} commits: median {median * 1000:.1f} ms, "
          f"p99 {delays[int(len(delays) * 0.99)] * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert worst < 1.0, f"max visibility delay {worst:.3f}s"


def test_writes_through_the_replica_are_refused_and_change_nothing(cluster, tmp_path):
    writer = cluster.writer
    writer.root["guarded"] = "primary's"
    writer.tm.commit()
    primary_before = last_tid(writer)
    reader = replica_client(cluster.replica_zeo, tmp_path / "ro-blobs", primary_before)
    fallback = Client(cluster.replica_zeo, tmp_path / "fb-blobs", read_only_fallback=True)
    try:
        for client in (reader, fallback):
            client.tm.begin()
            before = last_tid(client)
            assert client.storage.isReadOnly()
            client.root["guarded"] = "replica's"
            client.root["objs"]["new"] = PersistentMapping()
            with pytest.raises(ReadOnlyError):
                client.tm.commit()
            client.tm.abort()
            assert last_tid(client) == before
            client.tm.begin()
            assert client.root["guarded"] == "primary's"
            assert "new" not in client.root["objs"]
        with pytest.raises(ReadOnlyError):
            reader.storage.new_oid()
    finally:
        reader.close()
        fallback.close()
    # Nothing reached the primary either.
    writer.tm.begin()
    assert last_tid(writer) == primary_before and writer.root["guarded"] == "primary's"


def _write_objects(writer: Client, keys: list[str], value: str) -> None:
    for key in keys:
        obj = writer.root["objs"].get(key)
        if obj is None:
            obj = writer.root["objs"][key] = PersistentMapping()
        obj["value"] = value
        writer.tm.commit()


def test_a_client_that_comes_back_gets_current_data(cluster, tmp_path):
    """A client's cache after a disconnection: quick verification from ZEO's invalidation queue."""
    writer = cluster.writer
    keys = [f"k{i}" for i in range(20)]
    _write_objects(writer, keys, "old")
    cache = {"client": "returning", "var": str(tmp_path)}  # a persistent cache survives close()
    reader = replica_client(cluster.replica_zeo, tmp_path / "ret-blobs", last_tid(writer), **cache)
    assert [reader.root["objs"][k]["value"] for k in keys] == ["old"] * 20
    reader.close()
    _write_objects(writer, keys[::2], "new")
    wait_until(lambda: replica_tid(cluster) == last_tid(writer), timeout=20, what="replica caught up")
    reader = Client(cluster.replica_zeo, tmp_path / "ret-blobs", read_only=True, **cache)
    try:
        reader.tm.begin()
        expected = ["new" if i % 2 == 0 else "old" for i in range(20)]
        assert [reader.root["objs"][k]["value"] for k in keys] == expected
        result = reader.storage._server.client.verify_result
        print(f"\nreturning client: {result}")
        assert result == "quick verification"
    finally:
        reader.close()


def replica_tid(cluster: Cluster) -> bytes:
    probe = ClientStorage(("127.0.0.1", cluster.replica_zeo), read_only=True, wait_timeout=30)
    try:
        return probe.lastTransaction()
    finally:
        probe.close()


def test_blobs_written_on_the_primary_are_readable_on_the_replica(cluster, tmp_path):
    writer = cluster.writer
    sizes = {"empty": 0, "small": 1000, "large": 3 * (1 << 20) + 17}
    contents = {}
    for name, size in sizes.items():
        blob = writer.root["objs"][f"blob-{name}"] = Blob()
        contents[name] = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        with blob.open("w") as fh:
            fh.write(contents[name])
        writer.tm.commit()
    reader = replica_client(cluster.replica_zeo, tmp_path / "blob-cache", last_tid(writer))
    try:
        for name in sizes:
            with reader.root["objs"][f"blob-{name}"].open() as fh:
                assert fh.read() == contents[name], name
    finally:
        reader.close()


def test_clients_survive_a_replica_server_restart(cluster, tmp_path):
    """The replica's ZEO server restarts while commits go on; its client reconnects on its own."""
    writer = cluster.writer
    keys = [f"r{i}" for i in range(10)]
    _write_objects(writer, keys, "before")
    reader = replica_client(cluster.replica_zeo, tmp_path / "restart-blobs", last_tid(writer))
    try:
        assert [reader.root["objs"][k]["value"] for k in keys] == ["before"] * 10
        cluster.restart_replica(lambda: _write_objects(writer, keys[:5], "during"))
        _write_objects(writer, keys[5:], "after")
        expected = ["during"] * 5 + ["after"] * 5
        see(reader, lambda root: [root["objs"][k]["value"] for k in keys] == expected, timeout=30)
    finally:
        reader.close()


@contextlib.contextmanager
def cli_replica(cluster: Cluster, tmp_path: Path, tls_dir: Path, node: str, *options: str):
    """``replicator secondary --zeo`` following the cluster's primary; yields its ZEO port, and
    checks that it stops cleanly (its output printed if anything failed)."""
    zeo_port = free_port()
    argv = [REPLICATOR, "secondary", "--storage", str(tmp_path / "Data.fs"), "--blob-dir",
            str(tmp_path / "blobs"), "--primary", f"127.0.0.1:{cluster.repl_port}", "--node", node,
            "--zeo", f"127.0.0.1:{zeo_port}", *options, *tls_args(tls_dir, "secondary")]
    proc = Proc(argv, tmp_path / f"{node}.log")
    try:
        wait_for_port(zeo_port, proc.proc)
        yield zeo_port
        assert proc.stop() == 0
    except BaseException:
        print(proc.output()[-4000:])
        raise
    finally:
        proc.stop()


def test_replicator_secondary_serves_zeo_clients(cluster, tmp_path, tls_dir):
    """``replicator secondary --zeo``: the same serving, from the command line, next to the other replica."""
    writer = cluster.writer
    with cli_replica(cluster, tmp_path, tls_dir, "cli") as zeo_port:
        reader = replica_client(zeo_port, tmp_path / "cli-blobs", last_tid(writer))
        try:
            delays = []
            for i in range(100):
                writer.root["cli"] = i
                writer.tm.commit()
                delays.append(see(reader, lambda root, i=i: root.get("cli") == i))
            print(f"\nreplicator secondary --zeo: median {statistics.median(delays) * 1000:.1f} ms, "
                  f"max {max(delays) * 1000:.1f} ms over 100 commits")
            assert max(delays) < 1.0
            reader.root["cli"] = -1
            with pytest.raises(ReadOnlyError):
                reader.tm.commit()
            reader.tm.abort()
        finally:
            reader.close()


def test_replicator_secondary_serves_its_replica_under_the_storage_name_given(cluster, tmp_path, tls_dir):
    """A server of several storages names them ("1", "catalog", ...): clients of the replica of
    "catalog" ask for that name, whichever server they reach."""
    writer = cluster.writer
    writer.root["named"] = "catalog"
    writer.tm.commit()
    with cli_replica(cluster, tmp_path, tls_dir, "named", "--zeo-storage", "catalog") as zeo_port:
        storage = ClientStorage(("127.0.0.1", zeo_port), storage="catalog", read_only=True, wait_timeout=30)
        try:
            wait_until(lambda: storage.lastTransaction() >= last_tid(writer), timeout=30, what="replica caught up")
            db = ZODB.DB(storage)
            try:
                assert db.open().root()["named"] == "catalog"
            finally:
                db.close()
        finally:
            storage.close()


def test_zeo_clients_of_an_empty_replica_wait_for_the_primarys_first_transaction(tmp_path, tls_dir):
    """Replica, its clients and primary started together (a whole stack brought up at once): a
    client's database used to fail at once with ReadOnlyError, trying to create a root object
    in the empty replica.  Now the replica answers clients once the primary's root is there."""
    import threading

    from tests.helpers import start_primary
    from tests.integration.test_cli import make_fs

    make_fs(tmp_path / "a.fs", [1, 2, 3])  # the primary's root holds v = 3
    (tmp_path / "r").mkdir()
    repl_port, zeo_port = free_port(), free_port()
    replica = Proc([REPLICATOR, "secondary", "--storage", str(tmp_path / "r" / "Data.fs"), "--primary",
                    f"127.0.0.1:{repl_port}", "--node", "replica", "--zeo", f"127.0.0.1:{zeo_port}",
                    *tls_args(tls_dir, "secondary")], tmp_path / "replica.log")
    primary = None
    opened: list = []

    def open_database() -> None:
        try:
            db = ZODB.DB(ClientStorage(("127.0.0.1", zeo_port), read_only=True, wait_timeout=60))
            with db.transaction() as conn:
                opened.append(conn.root()["v"])
            db.close()
        except BaseException as exc:  # noqa: BLE001  (said by the assertion below)
            opened.append(exc)

    try:
        wait_for_port(zeo_port, replica.proc)  # bound at once, so a port in use is said at start
        client = threading.Thread(target=open_database)
        client.start()
        time.sleep(1.0)  # the client connects to an empty replica, whose primary is not up yet
        assert not opened, opened
        primary = start_primary(tmp_path, tmp_path / "a.fs", None, repl_port, tls_dir)
        client.join(60)
        assert opened == [3], (opened, replica.output()[-3000:])
        assert "ZEO clients on 127.0.0.1" in replica.output()
    finally:
        assert replica.stop() == 0, replica.output()[-3000:]
        if primary is not None:
            primary.stop()
