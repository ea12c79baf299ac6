# One image for every role: ZEO server, replication primary, secondary.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY replicator ./replicator
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 zodb
COPY primary /etc/replicator/primary
COPY secondary /etc/replicator/secondary
USER zodb
