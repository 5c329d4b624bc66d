"""One live service for the modules that test what integrators are handed: the OpenAPI document, the
AsyncAPI document, schemathesis and a generated client. A real uvicorn on loopback, polling the fake
Flutterwave, every polled pair stored before the first test."""

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.storage.engine import PROJECT_ROOT
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite, service_env


@dataclass(frozen=True)
class LiveService:
    replica: Replica
    fake: FakeFlutterwave
    operator_key: str
    """An operator's key, created with `python -m app.keys` before the service started."""

    @property
    def url(self) -> str:
        return self.replica.url

    @property
    def ws_url(self) -> str:
        return self.replica.ws_url


def create_operator_key(database_url: str) -> str:
    command = [sys.executable, "-m", "app.keys", "create", "openapi-tests", "--role", "operator"]
    env = service_env(DATABASE_URL=database_url, ENVIRONMENT="test")
    created = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return created.stdout.strip()


@contextmanager
def live_service_on(folder: Path, **env: str) -> Iterator[LiveService]:
    # The same file replica_on_sqlite serves.
    key = create_operator_key(f"sqlite+aiosqlite:///{folder / 'rates.db'}")
    with (
        FakeFlutterwave(slow_s=3.0) as fake,
        replica_on_sqlite(folder, fake, UPSTREAM_TIMEOUT_SECONDS="1", UPSTREAM_MAX_ATTEMPTS="1", **env) as replica,
    ):
        yield LiveService(replica, fake, key)
