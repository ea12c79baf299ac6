# One image for every role: ZEO server, replication primary, secondary.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY replicator ./replicator
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 zodb \
    && mkdir -p /data /tls /ca && chown zodb:zodb /data /tls /ca
# (A new named volume takes the owner of the directory it is mounted on: zodb's.)
COPY primary /etc/replicator/primary
COPY secondary /etc/replicator/secondary
USER zodb
