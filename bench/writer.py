"""A ZEO client committing small transactions at a fixed rate (run as a script).

``python bench/writer.py PORT RATE SECONDS OUT INDEX``: one transaction of one
small record (about 250 bytes: one of 64 small objects of its own, with a
200-character value) at a time, on an open-loop schedule of RATE
transactions per second (0: as fast as the server takes them) for SECONDS.
Appends ``<tid hex> <start> <done>`` per commit to OUT: ``start`` is when the
commit began, ``done`` when ``commit()`` returned, i.e. when the ZEO server
had finished (and fsynced) the transaction and told this client so.
Each writer changes only its own object, so writers never conflict.
An optional sixth argument START (seconds since the epoch) makes the writer
wait, connected, until then, so that writers of two servers measured side
by side commit over the same window.
"""

from __future__ import annotations

import os
import sys
import time

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage


def main(port: int, rate: float, seconds: float, out: str, index: int, start_at: float = 0.0) -> None:
    storage = ClientStorage(("127.0.0.1", port), wait_timeout=30)
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    key = f"writer{index}"
    for attempt in range(20):  # writers start together: the root may conflict once
        try:
            if key not in root:
                # Small objects of their own: a commit writes one of them,
                # not a mapping of all its values.
                root[key] = PersistentMapping({j: PersistentMapping() for j in range(64)})
                tm.commit()
            break
        except Exception:
            tm.abort()
            time.sleep(0.05 * (attempt + 1))
    objs = [root[key][j] for j in range(64)]
    lines = []
    if start_at:
        late = time.time() - start_at
        if late > 0:
            raise SystemExit(f"writer {index} ready {late:.2f} s after the common start")
        time.sleep(-late)
    interval = 1.0 / rate if rate else 0.0
    t_next = time.time()
    deadline = t_next + seconds
    i = 0
    while True:
        now = time.time()
        if now >= deadline:
            break
        if interval and now < t_next:
            time.sleep(t_next - now)
        t_next += interval
        start = time.time()
        obj = objs[i % 64]
        obj["v"] = os.urandom(100).hex()
        tm.get().note(f"w{index} {i}")
        tm.commit()
        done = time.time()
        lines.append(f"{obj._p_serial.hex()} {start:.6f} {done:.6f}\n")
        i += 1
    with open(out, "w") as fh:
        fh.writelines(lines)
    conn.close()
    db.close()


if __name__ == "__main__":
    port, rate, seconds, out, index = sys.argv[1:6]
    main(int(port), float(rate), float(seconds), out, int(index), float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)
