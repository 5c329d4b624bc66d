"""The one service the WebSocket test modules share per module: a real uvicorn polling the fake every 0.3 s.

Registered for every test by tests/conftest.py (`pytest_plugins`); each module that asks gets its own. It runs
the image's WebSocket protocol (`ws_protocol`); a module that overrides that fixture, parametrized, runs its tests
on each protocol it names (None: uvicorn's own choice, as a bare `uvicorn app.main:app` makes).
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.live.protocol import UVICORN_WS
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite

POLL_INTERVAL_S = 0.3


@pytest.fixture(scope="module")
def ws_fake() -> Iterator[FakeFlutterwave]:
    with FakeFlutterwave(slow_s=3.0) as server:
        yield server


@pytest.fixture(scope="module")
def ws_protocol() -> str | None:
    return UVICORN_WS


@pytest.fixture(scope="module")
def ws_service(
    ws_fake: FakeFlutterwave, ws_protocol: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    with replica_on_sqlite(
        Path(tmp_path_factory.mktemp("ws")),
        ws_fake,
        ws_protocol=ws_protocol,
        POLL_INTERVAL_SECONDS=str(POLL_INTERVAL_S),
        UPSTREAM_TIMEOUT_SECONDS="1",
        UPSTREAM_MAX_ATTEMPTS="1",
    ) as replica:
        yield replica
