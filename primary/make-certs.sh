#!/bin/sh
# Create the cluster CA and node certificates once: the CA (and its key) in
# the first directory, which only this job mounts; the nodes' files, and the
# CA's certificate without its key, copied into the shared volume.
set -e
ca=${1:-/ca}
shared=${2:-/tls}
if [ -f "$shared/ca.pem" ]; then
  echo "certificates already in $shared"
  exit 0
fi
replicator certs init --dir "$ca" --node primary --node secondary \
  --host primary --host secondary --host localhost --host 127.0.0.1
for f in ca.pem primary.pem primary.key secondary.pem secondary.key; do
  cp -p "$ca/$f" "$shared/$f"
done
echo "certificates in $shared; the CA key stays in $ca"
