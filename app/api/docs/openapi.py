"""The OpenAPI document: FastAPI's, completed with what it cannot say from the route signatures alone.

- Examples are whole requests, one per meaningful variant of an operation. OpenAPI has no example of a
  whole query, so each variant is spread over the parameters as a named example of the same name, and a
  parameter the variant leaves out gets `null` there. Tools that pair parameter examples by name (Swagger
  UI's drop-downs, schemathesis) then send exactly the request written here, never two variants mixed
  (which for `amount` and `source_amount` would be a 422).
- A comma-separated list is an array with `explode: false`, so its items carry their pattern.
- The polled currencies, which depend on the deployment's settings, are named in the descriptions.
- `/api/admin` operations name the bearer scheme (`operatorKey`, from `app.api.admin.auth`); a request body's
  examples are FastAPI's own `openapi_examples`.

Every example is a request that succeeds as written on a running service (tests/test_openapi.py).
"""

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from app.settings import Settings


@dataclass(frozen=True)
class Example:
    summary: str
    query: dict[str, Any] = field(default_factory=dict)


EXAMPLES: dict[str, dict[str, Example]] = {
    "/api/rates": {
        "amount": Example(
            "What the sender pays for 1000 NGN to arrive (`amount`)",
            {"source_currency": "USD", "destination_currency": "NGN", "amount": "1000"},
        ),
        "source_amount": Example(
            "What arrives when the sender pays 100 USD (`source_amount`)",
            {"source_currency": "USD", "destination_currency": "NGN", "source_amount": "100"},
        ),
        "one_unit": Example(
            "The rate for one unit, any case", {"source_currency": "gbp", "destination_currency": "kes"}
        ),
    },
    "/api/rates/all": {
        "base": Example("Every stored pair from USD", {"base_currency": "USD"}),
        "some": Example(
            "Three destinations from EUR", {"base_currency": "EUR", "destination_currencies": ["NGN", "KES", "GHS"]}
        ),
    },
    "/api/rates/history": {
        "range": Example(
            "The changes over a range (`since`, `until`)",
            {
                "source_currency": "USD",
                "destination_currency": "NGN",
                "since": "2026-01-01T00:00:00Z",
                "until": "2036-01-01T00:00:00Z",
                "limit": 500,
            },
        ),
        "at": Example(
            "The one rate in effect at a moment (`at`)",
            {"source_currency": "USD", "destination_currency": "NGN", "at": "2036-01-01T00:00:00Z"},
        ),
    },
    "/api/admin/audit": {
        "recent": Example("The 20 newest rows", {"limit": 20}),
        "since": Example("Every row since a moment, up to 1000", {"since": "2026-01-01T00:00:00Z", "limit": 1000}),
    },
}

COMMA_LISTS = {"destination_currencies"}


def _spread(operation: dict[str, Any], variants: dict[str, Example]) -> None:
    for parameter in operation.get("parameters", []):
        name = parameter["name"]
        if not any(name in variant.query for variant in variants.values()):
            continue
        parameter["examples"] = {
            key: {"summary": variant.summary, "value": variant.query.get(name)} for key, variant in variants.items()
        }


def _polled(parameter: dict[str, Any], settings: Settings) -> None:
    name = parameter["name"]
    if name in ("source_currency", "base_currency"):
        polled = settings.rates_source_currencies
    elif name in ("destination_currency", "destination_currencies"):
        polled = settings.rates_destination_currencies
    else:
        return
    parameter["description"] += (
        f" Polled by this deployment: {', '.join(polled)}; other codes are fetched on demand (see docs/limits.md)."
    )


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    for path, item in document["paths"].items():
        operation = item.get("get")
        if operation is None:
            continue
        for parameter in operation.get("parameters", []):
            if parameter["name"] in COMMA_LISTS:
                parameter["style"], parameter["explode"] = "form", False
            if "description" in parameter:
                _polled(parameter, settings)
        if path in EXAMPLES:
            _spread(operation, EXAMPLES[path])
    for item in document["paths"].values():
        for response in (response for operation in item.values() for response in operation["responses"].values()):
            example = response.get("content", {}).get("application/json", {}).get("example")
            if isinstance(example, dict) and example.get("status") == "error":
                # FastAPI drops every null from the document; the envelope's `data: null` is part of its shape.
                example.setdefault("data", None)
    return document


def operation_id(route: APIRoute) -> str:
    """The endpoint's own name, so generated clients read `rates.get_rate`, not `get_rate_api_rates_get`."""
    return route.name


def install_openapi(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
