"""The chaos soak in its short mode: two replicas, Redis restarts, a SIGKILLed poller, faults and load."""

import re
import subprocess
import sys

import pytest

from app.storage.engine import PROJECT_ROOT
from tests.support.replicas import service_env

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow


def test_a_short_soak_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "60", "--clients", "300", "--slow", "6"],
        cwd=PROJECT_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    figures = result.stdout[result.stdout.find("---- figures") :]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "---- PASS" in figures
    assert "slow readers cut off: 6 of 6" in figures
    assert "poller handovers: 1" in figures
    # The killed replica's 147 clients each lost their connection once and came back; the other's never did.
    assert re.search(r"replica \w \(killed\): 147 clients, 0 stayed connected, 147 reconnected", figures), figures
    assert re.search(r"replica \w: 147 clients, 147 stayed connected, 0 reconnected", figures), figures
