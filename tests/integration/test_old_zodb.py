"""A secondary on a ZODB whose ``restore`` differs from the primary's refuses before it creates anything.

``tests/unit/test_dependencies.py`` checks the version test itself; here
each way of starting a secondary meets an installed ZODB that reports an
old release, and must refuse with the hint and leave no storage file behind
(an empty ``Data.fs`` would be taken for a replica by the next start).
"""

from __future__ import annotations

import asyncio
import importlib.metadata

import pytest
import ZODB.config

from replicator.config import Address, SecondaryConfig, TLSPaths
from replicator.errors import ConfigError
from replicator.secondary import Secondary
from replicator.zeoserver import serve_replica

REAL_VERSION = importlib.metadata.version


@pytest.fixture
def old_zodb(monkeypatch):
    def version(name: str) -> str:
        return "5.8.1" if name.lower() == "zodb" else REAL_VERSION(name)
    monkeypatch.setattr(importlib.metadata, "version", version)


def config(tmp_path, tls_dir) -> SecondaryConfig:
    (tmp_path / "replica").mkdir()
    return SecondaryConfig(
        storage=str(tmp_path / "replica" / "Data.fs"), blob_dir=str(tmp_path / "replica" / "blobs"),
        primary=Address("127.0.0.1", 1), node="secondary",
        tls=TLSPaths(str(tls_dir / "ca.pem"), str(tls_dir / "secondary.pem"), str(tls_dir / "secondary.key")),
    ).validate()


def assert_refused(info: pytest.ExceptionInfo, tmp_path) -> None:
    assert "ZODB 5.8.1 cannot apply the stream faithfully" in str(info.value)
    assert "pip install -U 'ZODB>=6.0.1'" in info.value.hint
    assert list((tmp_path / "replica").iterdir()) == []


def test_the_secondary_command_refuses_before_creating_its_storage(tmp_path, tls_dir, old_zodb):
    secondary = Secondary(config(tmp_path, tls_dir))
    with pytest.raises(ConfigError) as info:
        asyncio.run(secondary.open())
    assert_refused(info, tmp_path)


def test_a_secondary_serving_zeo_refuses_before_creating_its_storage(tmp_path, tls_dir, old_zodb):
    with pytest.raises(ConfigError) as info:
        asyncio.run(serve_replica(config(tmp_path, tls_dir), Address("127.0.0.1", 0)))
    assert_refused(info, tmp_path)


def test_a_replicated_secondary_section_refuses_before_creating_its_storage(tmp_path, tls_dir, old_zodb):
    replica = tmp_path / "replica"
    replica.mkdir()  # ZConfig wants the directory of the path to exist
    with pytest.raises(ConfigError) as info:
        ZODB.config.storageFromString(
            "%import replicator\n<replicated-secondary>\nprimary 127.0.0.1:1\nnode s\n"
            f"tls-ca {tls_dir / 'ca.pem'}\ntls-cert {tls_dir / 'secondary.pem'}\ntls-key {tls_dir / 'secondary.key'}\n"
            f"<filestorage>\npath {replica / 'Data.fs'}\nblob-dir {replica / 'blobs'}\n</filestorage>\n"
            "</replicated-secondary>\n")
    assert_refused(info, tmp_path)
