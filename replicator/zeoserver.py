"""``replicator secondary --zeo``: a read-only ZEO server on the replica, in the replicator's process.

ZEO's ``StorageServer`` (what ``runzeo`` runs) serves a ``SecondaryStorage``
from its own event loop in its own thread; the secondary follows the primary
on the caller's loop, so a slow ZEO client never delays replication and the
replicator's signals and exit codes stay as they are.  The server is created
before the secondary applies anything: ZEO seeds its invalidation queue from
``lastTransaction`` and then registers for invalidations, and nothing may be
applied in between.
"""

from __future__ import annotations

import asyncio
import logging

from ZEO.StorageServer import StorageServer

from .config import Address, SecondaryConfig
from .errors import ConfigError
from .storage import check_restore_support, open_file_storage
from .wrappers import SecondaryStorage

__all__ = ["serve_replica"]

log = logging.getLogger("replicator.zeo")

#: The name ZEO clients ask for by default (``ClientStorage(storage='1')``).
STORAGE_NAME = "1"


async def serve_replica(config: SecondaryConfig, address: Address) -> None:
    """Follow the primary and serve the replica to read-only ZEO clients at ``address`` until cancelled.

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
                                         {STORAGE_NAME: storage}, read_only=False)
    except OSError as exc:
        await asyncio.to_thread(storage.close)
        raise ConfigError(f"--zeo {address}: cannot serve ZEO there: {exc}") from exc
    server.start_thread()
    host, port = server.addr[:2]
    log.info("serving the replica to read-only ZEO clients on %s:%s", host, port)
    try:
        await storage.secondary.serve(advice="ZEO clients may write to it now.")
    finally:
        # Closes the storage too, after the secondary has let go of it.
        await asyncio.to_thread(server.close)
