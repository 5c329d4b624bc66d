"""One live service for the modules that test what integrators are handed: the OpenAPI document, the
AsyncAPI document, schemathesis and a generated client. A real uvicorn on loopback, polling the fake
Flutterwave, every polled pair stored before the first test."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite


@dataclass(frozen=True)
class LiveService:
    replica: Replica
    fake: FakeFlutterwave

    @property
    def url(self) -> str:
        return self.replica.url

    @property
    def ws_url(self) -> str:
        return self.replica.ws_url


@contextmanager
def live_service_on(folder: Path, **env: str) -> Iterator[LiveService]:
    with (
        FakeFlutterwave(slow_s=3.0) as fake,
        replica_on_sqlite(folder, fake, UPSTREAM_TIMEOUT_SECONDS="1", UPSTREAM_MAX_ATTEMPTS="1", **env) as replica,
    ):
        yield LiveService(replica, fake)
