"""ZConfig factories for ``<replicated-primary>`` and ``<replicated-secondary>`` (see ``component.xml``).

``%import replicator`` in a ZEO server's or ZODB's configuration file makes
both section types available wherever a storage section may stand.  Each
wraps one ``<filestorage>`` section; the other keys are the options of the
``replicator`` command and are checked the same way, every problem at once
(``ConfigError``).
"""

from __future__ import annotations

from ZODB.config import BaseConfig

from .config import PrimaryConfig, SecondaryConfig, TLSPaths, parse_address, parse_rate
from .storage import check_restore_support
from .wrappers import PrimaryStorage, SecondaryStorage

__all__ = ["PrimaryStorageConfig", "SecondaryStorageConfig"]


def _tls(section) -> TLSPaths | None:
    if not (section.tls_ca or section.tls_cert or section.tls_key):
        return None
    return TLSPaths(section.tls_ca or "", section.tls_cert or "", section.tls_key or "")


def _node(section) -> dict:
    return {"node": section.node} if section.node else {}


class PrimaryStorageConfig(BaseConfig):
    """Opens the wrapped storage and serves its replication stream from this process."""

    def open(self, database_name="unnamed", databases=None):
        section = self.config
        base = section.base.open()
        try:
            # storage and blob_dir are the wrapped storage's own; the
            # wrapper fills them in, but validate() wants them right too.
            config = PrimaryConfig(
                storage=base.getName(), blob_dir=getattr(base, "blob_dir", None) or None,
                listen=parse_address(section.listen, "listen"), tls=_tls(section),
                insecure=section.insecure, poll_interval=section.poll_interval,
                batch_delay=section.batch_delay, **_node(section),
                sync_count=section.sync_count, sync_names=tuple((section.sync_names or "").split()),
                sync_timeout=section.sync_timeout, sync_fallback=section.sync_fallback,
            ).validate()
            return PrimaryStorage(base, config)
        except BaseException:
            base.close()
            raise


class SecondaryStorageConfig(BaseConfig):
    """Opens the replica's storage; it follows the primary once a server or database takes it."""

    def open(self, database_name="unnamed", databases=None):
        section = self.config
        check_restore_support()  # before the wrapped section creates the storage file
        base = section.base.open()
        try:
            config = SecondaryConfig(
                storage=base.getName(), blob_dir=getattr(base, "blob_dir", None) or None,
                primary=parse_address(section.primary, "primary"),
                listen=parse_address(section.listen, "listen") if section.listen else None,
                tls=_tls(section), insecure=section.insecure, compress=section.compress,
                max_rate=parse_rate(section.max_rate, "max-rate"), **_node(section),
            ).validate()
            return SecondaryStorage(base, config)
        except BaseException:
            base.close()
            raise
