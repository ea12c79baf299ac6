"""A ZEO server of several replicated storages, and a standby server of their replicas.

Each storage has its own primary and secondary, and their lines meet in
each server's one log: every line of replication must say which node it is
about, or an operator cannot tell whose secondary was lost or whose storage
failed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ZODB
from ZEO.ClientStorage import ClientStorage

from tests.helpers import free_port, wait_until
from tests.system.sysutil import get_status
from tests.system.test_switchover import start_runzeo

STORAGES = ("1", "catalog")


def tls_lines(tls_dir: Path, cert: str) -> str:
    return f"  tls-ca {tls_dir / 'ca.pem'}\n  tls-cert {tls_dir / f'{cert}.pem'}\n  tls-key {tls_dir / f'{cert}.key'}\n"


@pytest.mark.slow
def test_each_storages_replication_lines_name_its_node(tmp_path, tls_dir):
    listen = {s: free_port() for s in STORAGES}
    standby_listen = {s: free_port() for s in STORAGES}
    primaries = "".join(
        f"<replicated-primary {s}>\n  listen 127.0.0.1:{listen[s]}\n  node primary-{s}\n{tls_lines(tls_dir, 'primary')}"
        f"  <filestorage>\n    path {tmp_path / f'main-{s}.fs'}\n  </filestorage>\n</replicated-primary>\n"
        for s in STORAGES)
    replicas = "".join(
        f"<replicated-secondary {s}>\n  primary 127.0.0.1:{listen[s]}\n  listen 127.0.0.1:{standby_listen[s]}\n"
        f"  node standby-{s}\n{tls_lines(tls_dir, 'secondary')}"
        f"  <filestorage>\n    path {tmp_path / f'standby-{s}.fs'}\n  </filestorage>\n</replicated-secondary>\n"
        for s in STORAGES)
    main_port, standby_port = free_port(), free_port()
    main = start_runzeo(tmp_path, "main", main_port, primaries)
    standby = start_runzeo(tmp_path, "standby", standby_port, replicas)
    try:
        for s in STORAGES:
            db = ZODB.DB(ClientStorage(("127.0.0.1", main_port), storage=s, wait_timeout=30))
            with db.transaction() as conn:
                conn.root()["storage"] = s
            db.close()
        for s in STORAGES:
            head = get_status(listen[s], tls_dir)["last_tid"]
            wait_until(lambda s=s, head=head: get_status(standby_listen[s], tls_dir)["last_tid"] == head,
                       timeout=30, what=f"the replica of {s} applied the commit")
    finally:
        standby.stop()  # its secondaries say goodbye: the primaries log the end of each session
        main.stop()
    for proc, role in ((main, "primary"), (standby, "standby")):
        lines = [line for line in proc.output().splitlines() if re.match(r"\S+ \w+ replicator\.", line)]
        tags = {s: [line for line in lines if f" [{role}-{s}] " in line] for s in STORAGES}
        untagged = [line for line in lines if not any(line in found for found in tags.values())]
        assert all(tags.values()), (role, lines)
        assert not untagged, untagged
    main_log = main.output()
    for s in STORAGES:
        assert re.search(rf"\[primary-{s}\] session with secondary standby-{s} .* said goodbye", main_log), main_log
