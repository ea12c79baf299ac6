"""Replication's threads inside a ZEO server (or any process) carry a name the system shows.

Python's thread names stay inside the interpreter: without an OS name, the
service thread of an embedded primary or secondary shows in ``top -H`` and
``/proc/PID/task`` as the server itself, and what replication costs the
server cannot be read off per thread (the benchmark reads it so too).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from replicator.threads import OS_NAME_MAX, name_os_thread
from replicator.wrappers import OS_THREAD_NAME, OS_WORKER_NAME
from tests.integration.test_embedded_wakeup import applied, pair  # noqa: F401  (fixture)
from tests.integration.test_fence_settle import vote_one

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names from /proc")


def os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().rstrip("\n")


def test_a_thread_names_itself_cut_to_what_linux_keeps():
    seen: dict[str, object] = {}

    def run() -> None:
        seen["set"] = name_os_thread("a-very-long-thread-name")
        seen["name"] = os_name(threading.get_native_id())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"set": True, "name": "a-very-long-thread-name"[:OS_NAME_MAX]}
    assert os_name(threading.get_native_id()) != seen["name"]  # the caller's own name is untouched


def test_where_the_name_cannot_be_set_nothing_breaks(monkeypatch):
    monkeypatch.setattr(threading, "get_native_id", lambda: 2**31 - 1)  # no such thread: no such file
    assert name_os_thread("replication") is False
    monkeypatch.delattr(threading, "get_native_id")  # a platform without native thread ids
    assert name_os_thread("replication") is False


def test_the_services_and_their_workers_are_named(pair):  # noqa: F811
    primary, secondary = pair
    tid = primary.tpc_finish(vote_one(primary, b"1"))
    assert applied(secondary, tid, 10), "the secondary never caught up"
    services = [primary._service._thread, secondary._service._thread]
    assert [os_name(t.native_id) for t in services] == [OS_THREAD_NAME, OS_THREAD_NAME]
    workers = [t for t in threading.enumerate() if t.name.startswith(f"{OS_THREAD_NAME}_")]
    assert workers, "no blocking call ran in a worker thread of the services' loops"
    assert {os_name(t.native_id) for t in workers} == {OS_WORKER_NAME}
    # Everything else keeps the process's name: only replication's threads are renamed.
    others = {os_name(t.native_id) for t in threading.enumerate() if t not in services and t not in workers}
    assert OS_THREAD_NAME not in others and OS_WORKER_NAME not in others
