"""Running blocking storage and file calls off the event loop, safely.

``asyncio.to_thread`` alone has a trap: cancelling the awaiting task leaves
the thread running, and whoever cleans up next (abort a transaction, close a
file) would race it.  ``blocking()`` waits for the thread to finish before
letting the cancellation through, so a resource is never used by two threads.

``name_os_thread()`` gives the calling thread a name the system shows
(``top -H``, ``ps -L``, ``/proc/PID/task/TID/comm``): Python's thread names
stay inside the interpreter, so replication's thread in a ZEO server would
otherwise show as the server itself, and its CPU could not be told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["blocking", "name_os_thread", "OS_NAME_MAX"]

#: Linux keeps at most this many bytes of a thread's name.
OS_NAME_MAX = 15

P = ParamSpec("P")
R = TypeVar("R")


async def blocking(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn`` in a worker thread; on cancellation, let it finish first."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def name_os_thread(name: str) -> bool:
    """Name the calling thread for the system's tools (Linux; elsewhere nothing happens).

    Returns whether the name was set.  Longer names are cut to ``OS_NAME_MAX`` bytes.
    """
    native_id = getattr(threading, "get_native_id", None)  # missing on a few platforms
    if native_id is None:
        return False
    path = f"/proc/self/task/{native_id()}/comm"
    try:
        with open(path, "wb") as comm:
            comm.write(name.encode("utf-8", "replace")[:OS_NAME_MAX])
    except OSError:  # not Linux, or /proc not mounted: a cosmetic loss only
        return False
    return True
