# The image containers run (docs/deployment.md). Two stages: the first installs the locked dependencies into a
# virtual environment, with whatever that takes; the second copies only that environment and the code, so no
# build tool, cache or pip ends up in the image.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/fxrates
# From the lock file, every hash checked: the image gets exactly the versions the tests ran on.
COPY requirements/service.lock /tmp/service.lock
RUN /opt/fxrates/bin/pip install --require-hashes -r /tmp/service.lock \
    && /opt/fxrates/bin/pip uninstall --yes pip setuptools


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/fxrates/bin:$PATH

RUN useradd --system --uid 10001 --user-group --home-dir /srv/fxrates --create-home fxrates \
    && mkdir /srv/fxrates/data && chown fxrates:fxrates /srv/fxrates/data

COPY --from=build /opt/fxrates /opt/fxrates
WORKDIR /srv/fxrates
# The code runs from here, not as an installed package: `uvicorn app.main:app`, `python -m app.poller`, and
# `alembic upgrade head` (migrations are read from ./alembic) all work from this directory.
COPY alembic.ini ./
COPY alembic ./alembic
COPY app ./app

USER 10001:10001

# The embedded default keeps its SQLite file somewhere the non-root user may write; set DATABASE_URL in production.
ENV DATABASE_URL=sqlite+aiosqlite:////srv/fxrates/data/rates.db
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# The WebSocket protocol: uvicorn's own, which also writes each push's frame, framed and compressed once, to every
# client, and drops a connection the service has closed if the client takes nothing more within 10 s
# (app/ws_protocol.py). permessage-deflate for the clients that offer it (browsers, most mobile libraries): a third
# less to send per update, seven eighths less per snapshot, at about 8 KiB per connection (the client's own
# compression context) and a tenth of a push's cost (docs/performance.md).
# The protocol also closes a client that floods pings or fragments (1008) and refuses a message over 64 KiB as it
# arrives (1009), never inflating one further; --ws-max-size 65536 says the same to uvicorn (docs/limits.md).
# --no-server-header: no `server: uvicorn` telling scanners what to try.
# A deeper backlog lets thousands of clients reconnect at once.
# After SIGTERM, requests in flight get 10 s (docs/operations.md, Shutdown; the manifests in deploy/ allow for it).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", \
     "--ws", "app.ws_protocol:WebSocketProtocol", "--ws-per-message-deflate", "true", "--ws-max-size", "65536", \
     "--no-server-header", "--backlog", "8192", "--timeout-graceful-shutdown", "10"]
