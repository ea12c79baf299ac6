"""ZConfig factories for ``<replicated-primary>`` and ``<replicated-secondary>`` (see ``component.xml``).

``%import replicator`` in a ZEO server's or ZODB's configuration file makes
both section types available wherever a storage section may stand.  Each
wraps one ``<filestorage>`` section; the other keys are the options of the
``replicator`` command and are checked the same way, every problem at once
(``ConfigError``).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from ZODB.config import BaseConfig

from .config import PrimaryConfig, Problems, SecondaryConfig, TLSPaths
from .errors import ConfigError, ReplicatorError
from .storage import check_new_storage_blob_dir, check_restore_support, drop_unsynced_tail
from .wrappers import PrimaryStorage, SecondaryStorage

__all__ = ["PrimaryStorageConfig", "SecondaryStorageConfig"]


log = logging.getLogger("replicator.zconfig")


def _under_runzeo() -> bool:
    """Whether this process is ZEO's ``runzeo`` (its script, or ``python -m ZEO.runzeo``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", "") == "ZEO.runzeo" or os.path.basename(sys.argv[0] or "").startswith("runzeo")


def section_failed(section: str, exc: ReplicatorError) -> ReplicatorError:
    """``exc`` in the configuration file's terms (``tls-ca``, not ``--tls-ca``), logged CRITICAL.

    Under ``runzeo``, which would print a traceback and exit with status 1
    (a bug, by the exit statuses of the README), the process exits with the
    status the ``replicator`` command gives the same error instead.
    """
    if isinstance(exc, ConfigError):
        problems = [re.sub(r"(?<![\w-])--(?=[a-z])", "", p) for p in exc.problems]
        hint = exc.hint
        exc = ConfigError(problems)
        if hint == ConfigError.hint:  # the command line's; a specific one (an upgrade, say) stays
            exc.hint = f"fix the <{section}> section; the README's \"Inside a ZEO server\" lists its keys"
        else:
            exc.hint = hint
    log.critical("<%s>: %s", section, exc)
    if _under_runzeo():
        from .cli import EXIT_CODES

        raise SystemExit(next((code for cls, code in EXIT_CODES if isinstance(exc, cls)), 1))
    return exc


def _tls(section) -> TLSPaths | None:
    if not (section.tls_ca or section.tls_cert or section.tls_key):
        return None
    return TLSPaths(section.tls_ca or "", section.tls_cert or "", section.tls_key or "")


def _node(section) -> dict:
    return {"node": section.node} if section.node else {}


def _before_open(section, name: str) -> None:
    """Checks of the wrapped ``<filestorage>`` before it opens: ``check_new_storage_blob_dir`` (it
    would empty its blob directory as it creates a new file), and ``drop_unsynced_tail`` (an fsync
    of the file failed in an earlier run)."""
    inner = getattr(section.base, "config", None)
    path, blob_dir = getattr(inner, "path", None), getattr(inner, "blob_dir", None)
    try:
        if isinstance(path, str) and isinstance(blob_dir, str):
            check_new_storage_blob_dir(path, blob_dir)
        if isinstance(path, str) and not getattr(inner, "read_only", False):
            drop_unsynced_tail(path)
    except ReplicatorError as exc:
        raise section_failed(name, exc) from None


class PrimaryStorageConfig(BaseConfig):
    """Opens the wrapped storage and serves its replication stream from this process."""

    def open(self, database_name="unnamed", databases=None):
        section = self.config
        _before_open(section, "replicated-primary")
        base = section.base.open()
        try:
            # storage and blob_dir are the wrapped storage's own; the
            # wrapper fills them in, but validate() wants them right too.
            found = Problems()
            config = found.validate(PrimaryConfig(
                storage=base.getName(), blob_dir=getattr(base, "blob_dir", None) or None,
                listen=found.address(section.listen, "listen"), tls=_tls(section),
                insecure=section.insecure, poll_interval=section.poll_interval,
                batch_delay=section.batch_delay, **_node(section),
                sync_count=section.sync_count, sync_names=tuple((section.sync_names or "").split()),
                sync_timeout=section.sync_timeout, sync_fallback=section.sync_fallback,
            ))
            return PrimaryStorage(base, config)
        except ReplicatorError as exc:
            base.close()
            raise section_failed("replicated-primary", exc) from None
        except BaseException:
            base.close()
            raise


class SecondaryStorageConfig(BaseConfig):
    """Opens the replica's storage; it follows the primary once a server or database takes it."""

    def open(self, database_name="unnamed", databases=None):
        section = self.config
        try:
            check_restore_support()  # before the wrapped section creates the storage file
        except ReplicatorError as exc:
            raise section_failed("replicated-secondary", exc) from None
        _before_open(section, "replicated-secondary")
        base = section.base.open()
        try:
            found = Problems()
            config = found.validate(SecondaryConfig(
                storage=base.getName(), blob_dir=getattr(base, "blob_dir", None) or None,
                primary=found.address(section.primary, "primary"),
                listen=found.address(section.listen, "listen") if section.listen else None,
                tls=_tls(section), insecure=section.insecure, compress=section.compress,
                max_rate=found.rate(section.max_rate, "max-rate"), **_node(section),
            ))
            return SecondaryStorage(base, config)
        except ReplicatorError as exc:
            base.close()
            raise section_failed("replicated-secondary", exc) from None
        except BaseException:
            base.close()
            raise
