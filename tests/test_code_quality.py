"""ruff and mypy --strict run with the test suite, so CI holds the code to them."""

import subprocess
import sys

import pytest

from app.storage.engine import PROJECT_ROOT

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "app", "tests", "bench", "alembic"],
        ["ruff", "format", "--check", "app", "tests", "bench", "alembic"],
        ["mypy", "app"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_code_quality(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
