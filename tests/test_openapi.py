"""The OpenAPI document on a live service: valid, every example a request that succeeds as written, the
error statuses with their envelope, and history as CSV."""

import csv
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.support.openapi_service import LiveService, live_service_on

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

HISTORY = "/api/rates/history?source_currency=USD&destination_currency=NGN"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    with live_service_on(tmp_path_factory.mktemp("openapi")) as service:
        yield service


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def spec(live: LiveService) -> dict[str, Any]:
    status, _, body = get(f"{live.url}/openapi.json")
    assert status == 200
    loaded: dict[str, Any] = json.loads(body)
    return loaded


def test_openapi_spec_validator_finds_nothing(spec: dict[str, Any]) -> None:
    validate(spec)


def examples_of(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each named example as the query it stands for (a parameter's `null` there: not sent)."""
    requests: dict[str, dict[str, Any]] = {}
    for parameter in operation["parameters"]:
        for name, example in parameter.get("examples", {}).items():
            query = requests.setdefault(name, {})
            if example["value"] is not None:
                value = example["value"]
                # Arrays are comma lists (`style: form`, `explode: false`).
                query[parameter["name"]] = ",".join(value) if isinstance(value, list) else value
    return requests


def test_every_example_is_a_request_that_succeeds_as_written(live: LiveService, spec: dict[str, Any]) -> None:
    expected = {
        "/api/rates": {"amount", "source_amount", "one_unit"},
        "/api/rates/all": {"base", "some"},
        "/api/rates/history": {"range", "at"},
    }
    for path, names in expected.items():
        requests = examples_of(spec["paths"][path]["get"])
        assert set(requests) == names
        for name, query in requests.items():
            status, _, body = get(f"{live.url}{path}?{urllib.parse.urlencode(query)}")
            assert status == 200, (path, name, body)
    # The amount variants ask one amount each, as their names say.
    rates = examples_of(spec["paths"]["/api/rates"]["get"])
    assert "source_amount" not in rates["amount"] and "amount" not in rates["source_amount"]
    history = examples_of(spec["paths"]["/api/rates/history"]["get"])
    assert "at" not in history["range"] and not {"since", "until"} & set(history["at"])
    status, _, body = get(f"{live.url}/api/rates/history?{urllib.parse.urlencode(history['at'])}")
    assert len(json.loads(body)["data"]["points"]) == 1


def test_every_error_status_is_documented_with_the_envelope(spec: dict[str, Any]) -> None:
    statuses = {"/api/rates": {"404", "422", "429", "503"}, "/api/rates/all": {"422", "429", "503"}}
    statuses["/api/rates/history"] = {"404", "422", "429", "503"}
    for path, wanted in statuses.items():
        responses = spec["paths"][path]["get"]["responses"]
        assert wanted <= set(responses)
        for status in wanted:
            content = responses[status]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
            assert content["example"]["status"] == "error" and content["example"]["data"] is None
    parameters = {p["name"]: p for p in spec["paths"]["/api/rates/all"]["get"]["parameters"]}
    comma_list = parameters["destination_currencies"]
    assert (comma_list["style"], comma_list["explode"]) == ("form", False)
    assert "^(?:" in comma_list["schema"]["anyOf"][0]["items"]["pattern"]
    history = spec["paths"]["/api/rates/history"]["get"]["responses"]["200"]["content"]
    assert set(history) == {"application/json", "text/csv"}


def test_history_as_csv(live: LiveService) -> None:
    _, _, as_json = get(f"{live.url}{HISTORY}")
    status, headers, as_csv = get(f"{live.url}{HISTORY}", Accept="text/csv")
    assert status == 200 and headers["content-type"] == "text/csv; charset=utf-8"
    assert headers["content-disposition"] == 'attachment; filename="USD-NGN-history.csv"'
    assert headers["x-truncated"] == "false" and "Accept" in headers["vary"]
    assert as_csv.count(b"\r\n") == as_csv.count(b"\n"), "RFC 4180 line ends"
    rows = list(csv.DictReader(io.StringIO(as_csv.decode())))
    points = json.loads(as_json)["data"]["points"]
    assert points and len(rows) == len(points)
    for row, point in zip(rows, points, strict=True):
        assert row["at"] == point["at"]
        for column in ("rate", "destination_per_source", "source_amount", "destination_amount"):
            assert "E" not in row[column].upper() and Decimal(row[column]) == Decimal(str(point[column]))
    _, truncated, _ = get(f"{live.url}{HISTORY}&limit=1&until=2036-01-01T00:00:00Z", Accept="text/csv")
    assert truncated["x-truncated"] == ("true" if len(points) > 1 else "false")


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        ("text/csv", "text/csv"),
        ("text/csv, */*;q=0.1", "text/csv"),
        ("text/csv, */*", "text/csv"),
        ("application/json, text/csv", "application/json"),
        ("text/csv;q=0.5, application/json", "application/json"),
        ("*/*", "application/json"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "application/json"),
    ],
)
def test_csv_only_when_accept_prefers_it(live: LiveService, accept: str, kind: str) -> None:
    status, headers, _ = get(f"{live.url}{HISTORY}", Accept=accept)
    assert status == 200 and headers["content-type"].split(";")[0] == kind


def test_errors_stay_json_when_csv_is_asked_for(live: LiveService) -> None:
    status, headers, body = get(
        f"{live.url}/api/rates/history?source_currency=XYZ&destination_currency=NGN", Accept="text/csv"
    )
    assert status == 422 and headers["content-type"] == "application/json"
    assert json.loads(body)["errors"][0]["field"] == "source_currency"


def test_moments_beyond_the_calendar_once_in_utc_are_before_or_after_everything(live: LiveService) -> None:
    # Valid RFC 3339 date-times that fall outside years 1-9999 once converted to UTC.
    status, _, body = get(f"{live.url}{HISTORY}&at=0001-01-01T00:00:00%2B01:00")
    assert status == 404 and json.loads(body)["status"] == "error"
    status, _, body = get(f"{live.url}{HISTORY}&until=9999-12-31T23:59:59-05:00")
    assert status == 200 and json.loads(body)["meta"]["count"] >= 1


def send(url: str, method: str, body: Any, key: str) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_every_admin_operation_needs_an_operator_key_and_its_examples_succeed(
    live: LiveService, spec: dict[str, Any]
) -> None:
    assert spec["components"]["securitySchemes"]["operatorKey"] | {"description": ""} == {
        "type": "http",
        "scheme": "bearer",
        "description": "",
    }
    admin = {path: item for path, item in spec["paths"].items() if path.startswith("/api/admin/")}
    assert {"/api/admin/refresh", "/api/admin/audit", "/api/admin/held", "/api/admin/corridors"} <= set(admin)
    for item in admin.values():
        for operation in item.values():
            assert operation["security"] == [{"operatorKey": []}]
            # An operation that takes nothing (the held list) cannot be given anything invalid: no 422.
            takes = "parameters" in operation or "requestBody" in operation
            for status in ("401", "403", *(["422"] if takes else []), "429", "503"):
                example = operation["responses"][status]["content"]["application/json"]["example"]
                assert example["status"] == "error" and example["data"] is None
    bodies = admin["/api/admin/refresh"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(bodies) == {"some", "all"}
    for name, example in bodies.items():
        status, body = send(f"{live.url}/api/admin/refresh", "POST", example["value"], live.operator_key)
        assert status == 200, (name, body)
    # Each corridor action's examples, on the path's own example pair, in an order where each succeeds.
    corridor = "/api/admin/corridors/{source}/{destination}/"
    for action in ("pause", "withhold", "resume", "override"):
        operation = admin[corridor + action]["post"]
        path = {parameter["name"]: parameter["schema"]["examples"][0] for parameter in operation["parameters"]}
        url = f"{live.url}{corridor.format(**path)}{action}"
        for name, example in operation["requestBody"]["content"]["application/json"]["examples"].items():
            status, body = send(url, "POST", example["value"], live.operator_key)
            assert status == 200, (action, name, body)
    ending = admin[corridor + "override"]["delete"]
    reason = next(p["schema"]["examples"][0] for p in ending["parameters"] if p["name"] == "reason")
    status, body = send(
        f"{live.url}/api/admin/corridors/USD/NGN/override?{urllib.parse.urlencode({'reason': reason})}",
        "DELETE",
        None,
        live.operator_key,
    )
    assert status == 200, body
    status, body = send(f"{live.url}/api/admin/corridors", "GET", None, live.operator_key)
    assert status == 200 and json.loads(body)["data"]["corridors"], body
    queries = examples_of(admin["/api/admin/audit"]["get"])
    assert set(queries) == {"recent", "since"}
    for name, query in queries.items():
        status, body = send(
            f"{live.url}/api/admin/audit?{urllib.parse.urlencode(query)}", "GET", None, live.operator_key
        )
        assert status == 200 and json.loads(body)["meta"]["count"] >= 2, (name, body)
    for action in ("accept", "reject"):
        operation = admin[f"/api/admin/held/{{source}}/{{destination}}/{action}"]["post"]
        assert "example" in operation["responses"]["404"]["content"]["application/json"]
        (example,) = operation["requestBody"]["content"]["application/json"]["examples"].values()
        # Nothing is held on the live service: its 404 in the envelope, as documented.
        status, body = send(f"{live.url}/api/admin/held/USD/NGN/{action}", "POST", example["value"], live.operator_key)
        assert status == 404 and json.loads(body)["status"] == "error", (action, body)
    status, body = send(f"{live.url}/api/admin/held", "GET", None, live.operator_key)
    assert status == 200 and json.loads(body)["data"]["held"] == [], body
    status, headers, body = get(f"{live.url}/api/admin/audit")
    assert status == 401 and headers["www-authenticate"] == "Bearer" and headers["cache-control"] == "no-store"


def test_the_event_stream_is_listed_with_its_query_and_refusals(spec: dict[str, Any]) -> None:
    operation = spec["paths"]["/sse/rates"]["get"]
    assert set(operation["responses"]["200"]["content"]) == {"text/event-stream"}
    assert {p["name"] for p in operation["parameters"]} == {"pairs", "min_change_bps", "batch", "last-event-id"}
    for status in ("422", "503"):
        content = operation["responses"][status]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in operation["responses"]["503"]["headers"]
