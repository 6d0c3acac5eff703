# One image for every costmesh service; the command picks which one runs:
#   docker build -t costmesh .
#   docker run --rm -p 127.0.0.1:50051:50051 -e COSTMESH_INSECURE=true \
#     -e COSTMESH_API_KEYS=... costmesh                      # all four, one process, plaintext
#   docker run --rm -v "$PWD/certs/cache:/etc/costmesh/certs:ro" -e COSTMESH_SERVICE_KEY=... \
#     -e COSTMESH_TLS_CERT_FILE=/etc/costmesh/certs/cache.pem \
#     -e COSTMESH_TLS_KEY_FILE=/etc/costmesh/certs/cache-key.pem costmesh serve cache
# Off loopback a service needs TLS (docs/security.md); compose.yaml runs the services
# as separate containers with mutual TLS.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
COPY costmesh_tools/ costmesh_tools/
COPY costmesh_simulator/ costmesh_simulator/
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 costmesh \
    && useradd --system --uid 10001 --gid costmesh --no-create-home \
        --home-dir /var/lib/costmesh --shell /usr/sbin/nologin costmesh \
    && mkdir -p /var/lib/costmesh /etc/costmesh/certs \
    && chown costmesh:costmesh /var/lib/costmesh /etc/costmesh/certs

# Read by services/common/config.py (ENV_OVERRIDES). In a container the server must
# listen on every interface, and the ledger database and inference outbox go to a
# directory the unprivileged user owns (mount a volume there to keep them).
ENV COSTMESH_HOST=0.0.0.0 \
    COSTMESH_DATA_DIR=/var/lib/costmesh

# Run from the data directory, not /src, so imports come from the installed package.
WORKDIR /var/lib/costmesh
USER 10001:10001
EXPOSE 50051

ENTRYPOINT ["costmesh"]
CMD ["serve"]
