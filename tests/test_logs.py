"""Logs as a collector reads them (docs/operations.md, Logs): with LOG_FORMAT=json every line a real process
writes is one JSON object, requests included, each with the request id the client got back."""

import json
import re
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings, load_settings
from tests.conftest import running_app
from tests.support.replicas import Replica


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Status and the X-Request-ID the service returned."""
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["X-Request-ID"]


@pytest.mark.slow  # a real uvicorn process
def test_json_logs_one_object_a_line_with_every_request(tmp_path: Path) -> None:
    replica = Replica(
        tmp_path,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}",
        LOG_FORMAT="json",
        POLLER_ENABLED="false",
        uvicorn_args=(),  # uvicorn's access log on: in JSON the service's own request records replace it
    ).start()
    try:
        status, echoed = get(
            f"{replica.url}/api/rates?source_currency=USD&destination_currency=NGN",
            {"X-Request-ID": "support-ticket-42"},
        )
        assert (status, echoed) == (200, "support-ticket-42")
        status, generated = get(f"{replica.url}/healthz")
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", generated)
        # An id that could forge a log line is replaced, not echoed.
        status, replaced = get(f"{replica.url}/healthz", {"X-Request-ID": "x\u00e9 forged=1"})
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", replaced)
    finally:
        replica.stop()

    lines = [line for line in replica.log().splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for line in lines:
        record = json.loads(line)  # every line, uvicorn's own included
        assert isinstance(record, dict)
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
        records.append(record)
    loggers = {record["logger"] for record in records}
    assert "uvicorn.error" in loggers  # "Application startup complete." and the shutdown lines
    assert "app.services" in loggers  # the service's own start-up lines (no Redis, demo rates)

    by_id = {record.get("request_id"): record for record in records if record["logger"] == "app.access"}
    access = by_id["support-ticket-42"]
    assert access["method"] == "GET"
    assert access["route"] == "/api/rates"
    assert access["path"] == "/api/rates"
    assert access["status"] == 200
    assert isinstance(access["duration_s"], float) and access["duration_s"] >= 0
    assert access["client"] == "127.0.0.1"
    assert by_id[generated]["route"] == "/healthz"
    assert replaced in by_id
    # uvicorn's plain access line is gone, not doubled.
    assert not any(record["logger"] == "uvicorn.access" for record in records)


async def test_text_stays_the_default_and_the_request_id_is_returned_anyway(
    make_settings: Callable[..., Settings],
) -> None:
    assert make_settings().log_format == "text"
    async with running_app(make_settings()) as (client, _):
        answer = await client.get("/api/rates/all", headers={"X-Request-ID": "abc-123"})
        assert answer.headers["X-Request-ID"] == "abc-123"
        assert re.fullmatch(r"[0-9a-f]{32}", (await client.get("/no/such/page")).headers["X-Request-ID"])


def test_an_unknown_log_format_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as stopped:
        load_settings(_env_file=None)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "LOG_FORMAT" in error and "'json'" in error
