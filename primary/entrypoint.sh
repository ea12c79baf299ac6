#!/bin/sh
# The primary tails a file the ZEO server creates: wait for it to exist.
set -e
storage=/data/Data.fs
i=0
while [ ! -f "$storage" ]; do
  i=$((i + 1))
  [ "$i" -gt 600 ] && { echo "no $storage after 60s" >&2; exit 1; }
  sleep 0.1
done
while [ ! -f /tls/primary.key ]; do sleep 0.1; done
exec "$@"
