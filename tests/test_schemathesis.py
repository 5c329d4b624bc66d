"""schemathesis, run as a new user would (`schemathesis run …/openapi.json --checks all`), against the live service.

Every check is on, positive data acceptance and negative data rejection included, in every phase: the
documented examples, the coverage of each parameter's edges, and fuzzing in both modes. The only requests
left out are those that break a rule tying two parameters together, or name a pair the service never stored,
which JSON Schema cannot state; each is named, with its reason, in tests/schemathesis_hooks.py; and the
event stream `/sse/rates`, which never ends (excluded below, tested in tests/test_sse.py).
"""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from schemathesis.core.warnings import SchemathesisWarning

from tests.schemathesis_hooks import LEFT_OUT
from tests.support.openapi_service import LiveService, live_service_on

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Many more for a long fuzzing run: FXRATES_FUZZ_EXAMPLES=2000.
EXAMPLES = int(os.environ.get("FXRATES_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    # Every fuzzed request comes from one address: the limits (docs/limits.md) are off or sized for the fuzzer.
    limits_off = {
        "RATE_LIMIT_PER_MINUTE": "0",
        "RATE_LIMIT_PER_KEY_PER_MINUTE": "0",
        "ON_DEMAND_CALLS_PER_MINUTE": "100000",
        "ON_DEMAND_MAX_PAIRS": "100000",
    }
    with live_service_on(tmp_path_factory.mktemp("schemathesis"), **limits_off) as service:
        yield service


def test_schemathesis_with_every_check_finds_nothing(live_service: LiveService, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{live_service.url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--mode",
        "all",
        "--max-examples",
        str(EXAMPLES),
        "--generation-deterministic",
        "--no-color",
        "--exclude-path-regex",
        LEFT_OUT,
        # Every warning but missing test data: accepting or rejecting a held value is a 404 unless one is held for
        # the pair, which no request's shape can bring about (the flow is tested in tests/test_rate_guard_service.py).
        "--warnings",
        ",".join(
            warning.value for warning in SchemathesisWarning if warning is not SchemathesisWarning.MISSING_TEST_DATA
        ),
        # An operator's key on every request, as an operator would run it: /api/admin is fuzzed too, and
        # the `ignored_auth` check sends its requests without the key as well.
        "--header",
        f"Authorization: Bearer {live_service.operator_key}",
        # A stream that never ends while the service runs: every accepted request would hang the run. Its query
        # and refusals are tested in tests/test_sse.py.
        "--exclude-path",
        "/sse/rates",
    ]
    # Run from a scratch folder: schemathesis keeps a cache in its working directory.
    environment = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "No issues found" in report, report
    # Each phase really ran: an empty run would also find nothing.
    for phase in ("Examples", "Coverage", "Fuzzing"):
        assert f"✅ {phase}" in report, report
