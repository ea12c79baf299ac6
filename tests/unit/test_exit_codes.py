"""Each kind of failure leaves the CLI with the status the README's table gives it."""

from __future__ import annotations

import pytest

from replicator.cli import _fail
from replicator.errors import (
    ConfigError,
    CorruptedSourceError,
    DivergenceError,
    FencedStorageInUseError,
    OperationError,
    RejectedError,
    ReplicatorError,
    StorageError,
    StorageInUseError,
    TransportError,
    UsageError,
)


@pytest.mark.parametrize(("error", "status"), [
    (ConfigError("bad option"), 2),
    (UsageError("wrong node"), 2),
    (StorageInUseError("Data.fs", "Data.fs.lock", "process 1 (runzeo)"), 2),
    (FencedStorageInUseError("Data.fs", "Data.fs.lock", "process 1 (runzeo)", fenced="since then: switchover",
                             fence_record="Data.fs.fence", undo="replicator fence --undo h:1"), 2),
    (CorruptedSourceError("Data.fs", 4, "bad length"), 3),
    (DivergenceError("fork"), 4),
    (RejectedError("version", "protocol 2"), 4),
    (TransportError("h:1", "refused"), 6),
    (StorageError("No space left on device"), 7),
    (OperationError("the standby did not catch up"), 7),
    (ReplicatorError("something unforeseen"), 1),
])
def test_exit_status(error, status, capsys):
    with pytest.raises(SystemExit) as info:
        _fail(error)
    assert info.value.code == status
    assert capsys.readouterr().err.startswith("replicator: error: ")


def test_what_is_not_ours_is_raised_as_it_is():
    with pytest.raises(ZeroDivisionError):
        _fail(ZeroDivisionError("a bug"))
