#!/bin/sh
# Create the cluster CA and node certificates once, in the shared volume.
set -e
dir=${1:-/tls}
if [ -f "$dir/ca.pem" ]; then
  echo "certificates already in $dir"
  exit 0
fi
exec replicator certs init --dir "$dir" --node primary --node secondary \
  --host primary --host secondary --host localhost --host 127.0.0.1
