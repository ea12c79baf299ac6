"""Fixtures shared by the integration and system tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory) -> Path:
    """A cluster CA with node certificates ``primary``, ``secondary``, ``tertiary`` and
    ``standby`` (the name sync-names waits for in tests), and ``operator`` and ``monitor``
    certificates of those roles."""
    from replicator.certs import init_ca, issue_node

    directory = tmp_path_factory.mktemp("tls")
    init_ca(directory)
    for name in ("primary", "secondary", "tertiary", "standby"):
        issue_node(directory, name, hosts=("localhost", "127.0.0.1"))
    for role in ("operator", "monitor"):  # certificates of those roles, named after them
        issue_node(directory, role, role=role)
    return directory


@pytest.fixture
def own_tls(tmp_path, tls_dir) -> Path:
    """A copy of the cluster's CA and certificates that a test may replace files in (renewals,
    a new CA, revocations)."""
    return Path(shutil.copytree(tls_dir, tmp_path / "tls"))


@pytest.fixture(scope="session")
def foreign_tls_dir(tmp_path_factory) -> Path:
    """A second, unrelated CA and a node certificate it signed."""
    from replicator.certs import init_ca, issue_node

    directory = tmp_path_factory.mktemp("foreign-tls")
    init_ca(directory, common_name="Some other CA")
    issue_node(directory, "secondary", hosts=("localhost", "127.0.0.1"))
    issue_node(directory, "primary", hosts=("localhost", "127.0.0.1"))
    return directory
