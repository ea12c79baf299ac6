"""``replicator secondary --zeo``: a read-only ZEO server on the replica, in the replicator's process.

ZEO's ``StorageServer`` (what ``runzeo`` runs) serves a ``SecondaryStorage``
from its own event loop in its own thread; the secondary follows the primary
on the caller's loop, so a slow ZEO client never delays replication and the
replicator's signals and exit codes stay as they are.  The server is created
before the secondary applies anything: ZEO seeds its invalidation queue from
``lastTransaction`` and then registers for invalidations, and nothing may be
applied in between.

On an empty replica the server is created (its port bound, so a port in use
is said at once) but answers no client until the primary's first
transaction is applied: a ZEO client's ``ZODB.DB`` creates the root object
of a storage that has none, which a read-only replica refuses
(``ReadOnlyError``), so clients started with the replica would fail.  Their
connections wait in the listening socket's queue meanwhile, as for a server
still starting.  A promotion of the empty replica starts answering too (the
first client creates the root, as on any new primary).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ZEO.StorageServer import StorageServer

from .config import Address, SecondaryConfig
from .errors import ConfigError
from .storage import check_restore_support, open_file_storage
from .tid import Z64 as z64
from .wrappers import SecondaryStorage

__all__ = ["serve_replica"]

log = logging.getLogger("replicator.zeo")

#: How often an empty replica looks whether the primary's first transaction arrived.
FIRST_TRANSACTION_POLL = 0.1

#: The name ZEO clients ask for by default (``ClientStorage(storage='1')``).
STORAGE_NAME = "1"


async def serve_replica(config: SecondaryConfig, address: Address, name: str = STORAGE_NAME) -> None:
    """Follow the primary and serve the replica to read-only ZEO clients at ``address``, under the
    storage name ``name``, until cancelled.

    Raises what ``Secondary.run`` raises (a refusal retrying cannot cure),
    ``ConfigError`` if the address cannot be bound, and ``StorageError``/
    ``ConfigError`` from opening the storage.
    """
    check_restore_support()  # before the storage file is created
    base = await asyncio.to_thread(open_file_storage, config.storage, config.blob_dir)
    storage = SecondaryStorage(base, config, start=False)
    try:
        # The storage itself refuses writes (and read-write clients) until a
        # promotion makes it the primary; then clients reconnect read-write.
        server = await asyncio.to_thread(StorageServer, (address.host, address.port),
                                         {name: storage}, read_only=False)
    except OSError as exc:
        await asyncio.to_thread(storage.close)
        raise ConfigError(f"--zeo {address}: cannot serve ZEO there: {exc}") from exc
    host, port = server.addr[:2]
    started = False

    def start() -> None:
        nonlocal started
        if not started:
            started = True
            server.start_thread()

    follow = asyncio.create_task(storage.secondary.serve(advice=(
        "ZEO clients may write to it now. Make it lasting before this process next stops: run the "
        "storage in a ZEO server with <replicated-primary> (or runzeo and `replicator primary` beside it). "
        f"Restarted with the same arguments, it would follow {config.primary} again")))
    try:
        if base.lastTransaction() == z64:
            log.warning("the replica %s holds no transaction yet: ZEO clients on %s:%s are answered once it "
                        "holds the primary's first one (a client's database would create a root object of "
                        "its own, which a replica refuses)", config.storage, host, port)
            while (base.lastTransaction() == z64 and not storage.secondary.promoted
                   and not follow.done()):
                await asyncio.wait([follow], timeout=FIRST_TRANSACTION_POLL)
        if not follow.done():
            start()
            log.info("serving the replica to read-only ZEO clients on %s:%s", host, port)
        await follow
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follow
        start()  # a server whose loop never ran closes only once it runs
        # Closes the storage too, after the secondary has let go of it.
        await asyncio.to_thread(server.close)
