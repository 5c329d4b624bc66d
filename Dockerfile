FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/fxrates

# Dependencies in their own layer: rebuilt only when pyproject.toml changes, not on every code change.
COPY pyproject.toml README.md ./
RUN mkdir app && touch app/__init__.py \
    && pip install . \
    && pip uninstall --yes fxrates \
    && rm -rf app build *.egg-info

COPY alembic.ini ./
COPY alembic ./alembic
COPY app ./app

RUN useradd --system --uid 10001 --home-dir /srv/fxrates fxrates \
    && mkdir /srv/fxrates/data && chown fxrates /srv/fxrates/data
USER fxrates

# The embedded default keeps its SQLite file somewhere the non-root user may write; set DATABASE_URL in production.
ENV DATABASE_URL=sqlite+aiosqlite:////srv/fxrates/data/rates.db
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

# No permessage-deflate: frames are ~400 bytes, and per-connection compressors double the CPU and memory
# of every push (bench/ws_fanout.py). A deeper backlog lets thousands of clients reconnect at once.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", \
     "--ws-per-message-deflate", "false", "--backlog", "8192"]
