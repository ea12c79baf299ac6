"""Which node a log line is about, where one process runs several.

A ZEO server with several replicated storages (``<replicated-primary>`` or
``<replicated-secondary>`` sections) runs one replication service per
storage, and their lines meet in the server's one log.  Each service tags
its thread's context with its node name (``tag_node``); from then on every
``replicator.*`` line logged in that context (its event loop's tasks and the
worker threads they start, which copy the context) begins with ``[NAME]``.
A command-line node runs alone in its process and is not tagged.
"""

from __future__ import annotations

import logging
import threading
from contextvars import ContextVar

__all__ = ["tag_node"]

_NODE: ContextVar[str | None] = ContextVar("replicator_node", default=None)
_lock = threading.Lock()
_installed = False


def tag_node(name: str) -> None:
    """Tag this context's ``replicator.*`` log lines (and those of the tasks and threads it starts) ``[name]``."""
    _install()
    _NODE.set(name)


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def record_factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            node = _NODE.get()
            if (node is not None and isinstance(record.msg, str)
                    and (record.name == "replicator" or record.name.startswith("replicator."))):
                record.msg = f"[{node.replace('%', '%%') if record.args else node}] {record.msg}"
            return record

        logging.setLogRecordFactory(record_factory)
        _installed = True
