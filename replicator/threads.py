"""Running blocking storage and file calls off the event loop, safely.

``asyncio.to_thread`` alone has a trap: cancelling the awaiting task leaves
the thread running, and whoever cleans up next (abort a transaction, close a
file) would race it.  ``blocking()`` waits for the thread to finish before
letting the cancellation through, so a resource is never used by two threads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["blocking"]

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
