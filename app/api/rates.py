"""REST: `/api/rates`, `/api/rates/all` and `/api/rates/history` (docs/rest.md)."""

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import (
    DatabaseDep,
    HistoryAnswersDep,
    HubDep,
    LookupDep,
    MetricsDep,
    SessionsDep,
    SettingsDep,
    get_with_and_without_slash,
)
from app.api.etags import etag, matches
from app.api.history_answers import Answer, Question
from app.api.schemas import (
    AllRatesData,
    AllRatesEntry,
    AllRatesMeta,
    AllRatesQuery,
    AllRatesResponse,
    ErrorResponse,
    HistoryData,
    HistoryMeta,
    HistoryPoint,
    HistoryQuery,
    HistoryResponse,
    Money,
    RateData,
    RateMeta,
    RateQuery,
    RateResponse,
)
from app.errors import NotFound, error_body
from app.rates.quoting import destination_for, source_for
from app.rates.store import utc_now
from app.rates.wire import CorridorMark
from app.storage import repository
from app.storage.models import ExchangeRateHistory

router = APIRouter(prefix="/api/rates", tags=["rates"])


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "integer"}}}


def _error(
    description: str, message: str, errors: list[dict[str, str]] | None = None, *, retry: bool = False
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "model": ErrorResponse,
        "description": description,
        "content": {"application/json": {"example": error_body(message, errors)}},
    }
    if retry:
        response["headers"] = RETRY_AFTER
    return response


INVALID = _error(
    "A parameter is missing or malformed, a code is not ISO 4217, both sides are the same currency, "
    "an amount is not positive, or parameters that exclude each other were given together",
    "Invalid source_currency: 'XYZ' is not an ISO 4217 currency code.",
    [{"field": "source_currency", "message": "'XYZ' is not an ISO 4217 currency code"}],
)
LIMITED = _error(
    "Over the per-client limit, or the pair is outside the polled set and fetching it would go beyond the "
    "on-demand budget or the cap on stored pairs (docs/limits.md); see `Retry-After`",
    "Too many requests from this address (at most 1200 a minute); try again later.",
    retry=True,
)
DATABASE_DOWN = _error(
    "The database cannot be reached now (docs/outages.md); see `Retry-After`",
    "History is unavailable while the database cannot be reached; try again shortly.",
    retry=True,
)
NOT_MODIFIED = {"description": "The rate is unchanged since the `ETag` given in `If-None-Match`; no body"}
CACHED = {
    "ETag": {"description": "Weak validator of this answer", "schema": {"type": "string"}},
    "Cache-Control": {"description": "`max-age` = seconds until the rate turns stale", "schema": {"type": "string"}},
}
CSV_COLUMNS = ("at", "rate", "destination_per_source", "source_amount", "destination_amount", "seq")
CSV_EXAMPLE = "at,rate,destination_per_source,source_amount,destination_amount,seq\r\n"
CSV_EXAMPLE += "2026-11-24T10:00:00Z,0.00065348,1530.25,0.65348,1000,4182\r\n"


def _caching_headers(etag: str, max_age_s: float) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": f"max-age={max(0, int(max_age_s))}"}


@get_with_and_without_slash(
    router,
    "",
    response_model=RateResponse,
    summary="One pair's rate, in Flutterwave's shape",
    description="Looks in the cache, then the database, then the upstream. A stale rate is refreshed; if that "
    "fails it is served with `meta.stale = true`. `data.rate` is source units per destination unit.",
    responses={
        200: {"headers": CACHED},
        304: NOT_MODIFIED,
        404: _error(
            "The pair is outside the polled set and `ON_DEMAND_CURRENCIES` does not allow one of its currencies "
            "(docs/limits.md)",
            "USD/JPY is not served: this service does not fetch JPY on demand.",
        ),
        422: INVALID,
        429: LIMITED,
        503: _error(
            "No rate is held for the pair and the upstream (or the database, to store it) cannot give one now "
            "(see `Retry-After`); or an operator withheld the pair (docs/operations.md, Corridors)",
            "No rate for USD/NGN is stored yet and the upstream cannot give one now; try again shortly.",
            retry=True,
        ),
    },
)
async def get_rate(query: Annotated[RateQuery, Query()], lookup: LookupDep, request: Request) -> Response:
    found = await lookup.get(query.pair)
    rate = found.rate
    corridor = CorridorMark.of(lookup.corridors.mark(rate.pair))
    if query.source_amount is not None:
        source_amount, destination_amount = query.source_amount, destination_for(rate, query.source_amount)
    else:
        destination_amount = query.amount if query.amount is not None else Decimal(1)
        source_amount = source_for(rate, destination_amount)
    age_s = rate.age_s(utc_now())
    tag = etag(
        rate.pair,
        rate.seq,
        rate.last_updated.isoformat(),
        rate.rate,
        found.stale,
        query.amount,
        query.source_amount,
        # A corridor change alone changes the answer (docs/rest.md, ETags).
        corridor.since.isoformat() if corridor is not None else "",
    )
    headers = _caching_headers(tag, 0 if found.stale else lookup.stale_after_s - age_s)
    if matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    body = RateResponse(
        data=RateData(
            rate=rate.rate,
            source=Money(currency=rate.pair.source, amount=source_amount),
            destination=Money(currency=rate.pair.destination, amount=destination_amount),
        ),
        meta=RateMeta(
            destination_per_source=rate.destination_per_source,
            last_updated=rate.last_updated,
            age_seconds=round(age_s, 3),
            stale=found.stale,
            served_from=found.served_from,
            provider=rate.provider,
            seq=rate.seq,
            corridor=corridor,
        ),
    )
    # Serialised here, once: the declared response_model documents it, and validating it again would cost time.
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


@get_with_and_without_slash(
    router,
    "/all",
    response_model=AllRatesResponse,
    summary="Every stored pair of one base currency",
    description="Answers from what is stored; never waits on the upstream. While the database cannot be reached, "
    "from the last snapshot read, each rate's `stale` by its age.",
    responses={
        200: {"headers": CACHED},
        304: NOT_MODIFIED,
        422: INVALID,
        429: LIMITED,
        503: _error(
            "Nothing has been read from the database since start-up and it cannot be reached now",
            "Rates are unavailable while the database cannot be reached; try again shortly.",
            retry=True,
        ),
    },
)
async def get_all_rates(
    query: Annotated[AllRatesQuery, Query()],
    hub: HubDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    request: Request,
) -> Response:
    # From the process's snapshot of every stored rate: no database read per request, no upstream ever.
    snapshot = await hub.snapshot()
    if snapshot.held:
        metrics.stale_answers.labels(reason="database").inc()
    wanted = set(query.destination_currencies) if query.destination_currencies is not None else None
    rates = [
        rate
        for rate in snapshot.rates
        if rate.pair.source == query.base_currency and (wanted is None or rate.pair.destination in wanted)
    ]
    now = utc_now()
    stale_after_s = settings.rate_stale_after_seconds
    corridors = hub.corridors
    entries = {
        rate.pair.destination: AllRatesEntry(
            rate=rate.rate,
            source=Money(currency=rate.pair.source, amount=rate.source_amount),
            destination=Money(currency=rate.pair.destination, amount=rate.destination_amount),
            destination_per_source=rate.destination_per_source,
            last_updated=rate.last_updated,
            stale=rate.age_s(now) > stale_after_s,
            provider=rate.provider,
            corridor=CorridorMark.of(corridors.mark(rate.pair)),
        )
        for rate in rates
    }
    tag = etag(query.base_currency, *_versions(entries.items()))
    fresh_for_s = min((stale_after_s - rate.age_s(now) for rate in rates), default=0.0)
    headers = _caching_headers(tag, fresh_for_s)
    if matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    body = AllRatesResponse(
        data=AllRatesData(base_currency=query.base_currency, rates=entries),
        meta=AllRatesMeta(count=len(entries), as_of=now),
    )
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def _versions(entries: Iterable[tuple[str, AllRatesEntry]]) -> Iterable[str]:
    return (
        f"{code}:{entry.last_updated.isoformat()}:{entry.stale}:{entry.corridor.since if entry.corridor else ''}"
        for code, entry in entries
    )


@get_with_and_without_slash(
    router,
    "/history",
    response_model=HistoryResponse,
    summary="What a pair was, over time",
    description="Every observed change, oldest first. With `at`, the one point in effect at that moment "
    "(the last observation at or before it). Moments without a zone are read as UTC. "
    "With `Accept: text/csv`, the points as CSV (RFC 4180: a header line, then one line per point); "
    "when more points matched than `limit`, the header `X-Truncated: true` says so.",
    responses={
        200: {
            "description": "The points, as JSON or, when asked with `Accept: text/csv`, as CSV",
            "content": {"text/csv": {"schema": {"type": "string"}, "example": CSV_EXAMPLE}},
            "headers": {
                "X-Truncated": {
                    "description": "CSV only: `true` when more points matched than `limit`",
                    "schema": {"type": "string", "enum": ["true", "false"]},
                },
                "Vary": {"description": "`Accept`: the answer depends on it", "schema": {"type": "string"}},
            },
        },
        404: _error(
            "With `at`: the pair had no rate yet at that moment",
            "USD/NGN had no rate yet at 2020-01-01T00:00:00Z.",
        ),
        422: INVALID,
        429: LIMITED,
        503: DATABASE_DOWN,
    },
)
async def get_history(
    query: Annotated[HistoryQuery, Query()],
    sessions: SessionsDep,
    database: DatabaseDep,
    answers: HistoryAnswersDep,
    request: Request,
) -> Response:
    pair = query.pair
    wants_csv = _wants_csv(request.headers.get("accept"))
    # A range is kept until the pair next changes; a moment (`at`) is one row read either way.
    question = None if query.at is not None else Question(pair, query.since, query.until, query.limit, wants_csv)
    version = None
    if question is not None:

        async def read_version() -> int | None:
            async with sessions() as session:
                return await repository.latest_history_id(session, pair)

        version = await database.call(read_version)
        kept = answers.get(question, version)
        if kept is not None:
            return Response(kept.body, media_type=kept.media_type, headers=dict(kept.headers))

    async def read() -> list[ExchangeRateHistory]:
        async with sessions() as session:
            if query.at is None:
                return await repository.list_history(session, pair, query.since, query.until, query.limit + 1)
            point = await repository.history_at(session, pair, query.at)
            return [] if point is None else [point]

    # Bounded, and a database that cannot be reached is a 503 with Retry-After (docs/outages.md).
    rows = await database.call(read)
    if query.at is not None and not rows:
        raise NotFound(f"{pair} had no rate yet at {query.at.isoformat().replace('+00:00', 'Z')}.")
    truncated = len(rows) > query.limit
    points = [
        HistoryPoint(
            at=row.observed_at,
            rate=row.rate,
            destination_per_source=row.destination_per_source,
            source_amount=row.source_amount,
            destination_amount=row.destination_amount,
            seq=row.seq,
            provider=row.provider,
            actor=row.actor,
        )
        for row in rows[: query.limit]
    ]
    if wants_csv:
        response = _csv(pair.source, pair.destination, points, truncated)
    else:
        body = HistoryResponse(
            data=HistoryData(source_currency=pair.source, destination_currency=pair.destination, points=points),
            meta=HistoryMeta(count=len(points), truncated=truncated, at=query.at),
        )
        response = Response(body.model_dump_json(), media_type="application/json", headers={"Vary": "Accept"})
    if question is not None:
        # Made from rows at least as new as `version`: kept under it, so it is never served once a newer row exists.
        headers = tuple((name, value) for name, value in response.headers.items() if name != "content-length")
        answers.put(question, Answer(version, bytes(response.body), response.media_type or "", headers))
    return response


def _quality(media_range: str) -> tuple[str, float]:
    kind, *parameters = (part.strip() for part in media_range.split(";"))
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return kind.lower(), float(value)
            except ValueError:
                return kind.lower(), 0.0
    return kind.lower(), 1.0


def _wants_csv(accept: str | None) -> bool:
    """CSV when `Accept` prefers it to JSON; on a tie, when it names CSV and not JSON. Otherwise JSON.

    Each type takes the quality of the most specific range that matches it (RFC 9110 §12.5.1).
    """
    if not accept:
        return False
    ranges = dict(_quality(item) for item in accept.split(",") if item.strip())
    csv_q = ranges.get("text/csv", ranges.get("text/*", ranges.get("*/*", 0.0)))
    json_q = ranges.get("application/json", ranges.get("application/*", ranges.get("*/*", 0.0)))
    if csv_q != json_q:
        return csv_q > json_q
    return csv_q > 0 and "text/csv" in ranges and "application/json" not in ranges


def _plain(value: Decimal) -> str:
    # As stored, never with an exponent: spreadsheets read 0.00065348, not 6.5348E-4.
    return format(value.normalize(), "f")


def _utc(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _csv(source: str, destination: str, points: list[HistoryPoint], truncated: bool) -> Response:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for point in points:
        amounts = (point.rate, point.destination_per_source, point.source_amount, point.destination_amount)
        writer.writerow([_utc(point.at), *(_plain(amount) for amount in amounts), point.seq])
    headers = {
        "Content-Disposition": f'attachment; filename="{source}-{destination}-history.csv"',
        "X-Truncated": "true" if truncated else "false",
        "Vary": "Accept",
    }
    return Response(text.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
