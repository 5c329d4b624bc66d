"""One live service for the modules that test what integrators are handed: the OpenAPI document, the
AsyncAPI document, schemathesis and a generated client. A real uvicorn on loopback, polling the fake
Flutterwave, every polled pair stored before the first test."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.fake_flutterwave import FakeFlutterwave
from tests.replicas import Replica, replica_on_sqlite

LiveService = Replica


@contextmanager
def live_service_on(folder: Path) -> Iterator[Replica]:
    with FakeFlutterwave() as fake, replica_on_sqlite(folder, fake, UPSTREAM_TIMEOUT_SECONDS="1") as replica:
        yield replica
