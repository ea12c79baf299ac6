"""How opening a storage for writing names what stands in its way."""

from __future__ import annotations

import errno

import pytest

from replicator import storage
from replicator.errors import ConfigError, StorageError


def _refusing(error: OSError):
    def open_it(*args, **kwargs):
        raise error
    return open_it


def test_a_read_only_file_system_is_a_configuration_error(tmp_path, monkeypatch):
    """A read-only mount under the storage (no such mount can be made here): the operator's to
    fix, exit status 2, not a failing machine (status 7, which a service manager restarts)."""
    path = str(tmp_path / "Data.fs")
    monkeypatch.setattr(storage, "FileStorage", _refusing(
        OSError(errno.EROFS, "Read-only file system", path + ".lock")))
    with pytest.raises(ConfigError, match=r"Data\.fs\.lock: read-only file system \(this storage must be "
                                          r"written to\)"):
        storage.open_file_storage(path)


def test_other_io_errors_stay_storage_errors(tmp_path, monkeypatch):
    path = str(tmp_path / "Data.fs")
    monkeypatch.setattr(storage, "FileStorage", _refusing(OSError(errno.EIO, "Input/output error", path)))
    with pytest.raises(StorageError, match="cannot open .*Input/output error") as raised:
        storage.open_file_storage(path)
    assert not isinstance(raised.value, ConfigError)
