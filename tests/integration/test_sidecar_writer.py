"""A sidecar primary says which process writes its storage, and warns when that process goes.

The writer is a real separate process holding the FileStorage open (its
lock), as a ZEO server does; the sidecar learns of it from the kernel's
table of file locks.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

import replicator.primary as primary_module
from tests.helpers import until
from tests.integration.test_replication import running_primary

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/locks")

HOLD = """
import sys, time
from ZODB.FileStorage import FileStorage
fs = FileStorage(sys.argv[1])
print("open", flush=True)
time.sleep(600)
"""


def writer(path: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "open\n"
    return proc


def test_a_sidecar_says_when_its_writer_goes_and_comes_back(tmp_path, tls_dir, caplog, monkeypatch):
    monkeypatch.setattr(primary_module, "WRITER_LOOK", 0.1)
    path = str(tmp_path / "src.fs")
    db = ZODB.DB(FileStorage(path))
    db.close()
    (tmp_path / "src-blobs").mkdir()

    def said(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "replicator.primary" and text in r.getMessage()]

    async def scenario() -> None:
        first = writer(path)
        try:
            async with running_primary(tmp_path, tls_dir, sidecar=True) as primary:
                await until(lambda: said(f"process {first.pid} "), what="the writer named")
                assert said(f"process {first.pid} ")[0].getMessage().endswith(f"has {path} open for writing")
                first.kill()
                first.wait()
                await until(lambda: said("no longer has"), what="the warning")
                gone = said("no longer has")
                assert len(gone) == 1 and gone[0].levelno == logging.WARNING
                assert gone[0].getMessage().startswith(f"process {first.pid} ")
                assert "nothing new to replicate until one opens it again" in gone[0].getMessage()
                assert primary.status()["takes_writes"] is False
                second = writer(path)
                try:
                    await until(lambda: said(f"process {second.pid} "), what="the new writer named")
                    back = said(f"process {second.pid} ")
                    assert back[0].levelno == logging.INFO
                    assert back[0].getMessage().endswith(f"has {path} open for writing now")
                    await asyncio.sleep(0.5)
                    assert len(said("no longer has")) == 1 and len(said(f"process {second.pid} ")) == 1
                finally:
                    second.kill()
                    second.wait()
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()

    with caplog.at_level(logging.INFO, logger="replicator.primary"):
        asyncio.run(scenario())
