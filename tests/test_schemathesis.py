"""schemathesis against the live `/openapi.json`: no 5xx and no answer that breaks its own schema."""

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings
from tests.fake_flutterwave import SECRET_KEY, FakeFlutterwave


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = Path(tmp_path_factory.mktemp("schemathesis")) / "rates.db"
    with FakeFlutterwave() as fake:
        app = create_app(
            Settings(  # type: ignore[call-arg]
                _env_file=None,
                environment="test",
                database_url=f"sqlite+aiosqlite:///{database}",
                redis_url=None,
                flutterwave_secret_key=SECRET_KEY,
                flutterwave_base_url=fake.url,
                poll_interval_seconds=600,
                upstream_timeout_seconds=1,
                # Every fuzzed request comes from one address: the limits are off or sized for the fuzzer.
                rate_limit_per_minute=0,
                on_demand_calls_per_minute=100_000,
                on_demand_max_pairs=100_000,
            )
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(timeout=20)


# Many more for a long fuzzing run: FXRATES_FUZZ_EXAMPLES=2000.
EXAMPLES = int(os.environ.get("FXRATES_FUZZ_EXAMPLES", "80"))
OPERATIONS = [
    "GET /api/rates",
    "GET /api/rates/all",
    "GET /api/rates/history",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
]


@pytest.mark.parametrize("label", OPERATIONS)
def test_the_api_keeps_its_own_schema(live_url: str, label: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    assert set(operations) == set(OPERATIONS), "an operation is missing from the suite"

    @given(case=operations[label].as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def call(case: schemathesis.Case) -> None:
        # Rules that span fields or need a list (ISO 4217 membership, source != destination, one amount
        # at most, at most 4 decimals) are not in the OpenAPI schema, so a "schema-valid" request may
        # rightly get a 422; every other check stays on, the no-5xx one first of all.
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    call()
