"""A stand-in sidecar that only looks at the file: the floor of any 10 ms poll (run as a script).

``python bench/poller.py DATA_FS INTERVAL asyncio|sleep``: until SIGTERM, wake
every INTERVAL seconds and ``os.stat`` DATA_FS, and do nothing with what it
sees.  ``asyncio``: a timer on an asyncio event loop, as ``replicator
primary`` looks while the file is written (its poller is such a timer);
``sleep``: ``time.sleep``, the cheapest wake-up Python has.  The cost
benchmark runs it beside the ZEO server in place of the sidecar, so that each
run measures what the wake-ups alone cost the server on this machine, before
a byte is read or shipped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time


def by_sleep(path: str, interval: float) -> None:
    while True:
        time.sleep(interval)
        os.stat(path)


async def by_asyncio(path: str, interval: float) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)

    def look() -> None:
        os.stat(path)
        loop.call_later(interval, look)

    loop.call_later(interval, look)
    await stop


def main(path: str, interval: float, how: str) -> None:
    if how == "sleep":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        by_sleep(path, interval)
    elif how == "asyncio":
        asyncio.run(by_asyncio(path, interval))
    else:
        raise SystemExit(f"poller: unknown way to wait {how!r} (asyncio or sleep)")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
