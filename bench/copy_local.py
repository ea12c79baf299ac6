"""ZODB's own local copy, the baseline of the initial-sync benchmark (run as a script).

``python bench/copy_local.py SRC_DIR DST_DIR on|off`` copies ``SRC_DIR/Data.fs``
(with its blobs) into a fresh FileStorage with ``copyTransactionsFrom``, the
way ZODB copies a storage.  ``off`` sets FileStorage's module-level ``fsync``
to None in this process only, so ``tpc_finish`` does not fsync.  Prints JSON:
seconds (opening the source included), CPU seconds and peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

import ZODB.FileStorage  # noqa: F401  (loads the module patched below)
from ZODB.FileStorage import FileStorage

# ``ZODB.FileStorage.FileStorage`` as an attribute is the class; the module is here.
fsmodule: Any = sys.modules["ZODB.FileStorage.FileStorage"]


def main(src: str, dst: str, mode: str) -> dict:
    if mode == "off":
        fsmodule.fsync = None
    t0 = time.time()
    source = FileStorage(os.path.join(src, "Data.fs"), blob_dir=os.path.join(src, "blobs"), read_only=True)
    os.makedirs(dst, exist_ok=True)
    dest = FileStorage(os.path.join(dst, "Data.fs"), blob_dir=os.path.join(dst, "blobs"), create=True)
    dest.copyTransactionsFrom(source)
    dest.close()
    source.close()
    seconds = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
