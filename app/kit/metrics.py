"""The service's Prometheus metrics, in a registry of its own built by the lifespan (no import-time globals).

Every metric is listed, with what it answers, in docs/operations.md. Buckets
follow this service's latencies: a cached answer takes about a millisecond, a
database read a few, an upstream call a few hundred (at most the upstream
timeout, 30 s by default).
"""

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LIMITS = ("per_client", "per_key", "on_demand_budget", "on_demand_pairs", "ws_clients", "ws_per_address", "ws_messages")

AUTH_FAILURES = ("missing", "bad_key", "forbidden", "blocked")
OPERATOR_ACTIONS = (
    "refresh",
    "pause",
    "withhold",
    "resume",
    "override",
    "end_override",
    "accept_held",
    "reject_held",
)
CORRIDOR_STATES = ("active", "paused", "withheld")


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "fxrates_http_requests", "HTTP requests by route template and status.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "fxrates_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.upstream_calls = Counter(
            "fxrates_upstream_calls", "Requests to the upstream by outcome.", ["outcome"], registry=r
        )
        self.upstream_call_seconds = Histogram(
            "fxrates_upstream_call_duration_seconds",
            "Time of one request to the upstream (one attempt), by outcome.",
            ["outcome"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.poll_pairs = Counter(
            "fxrates_poll_pairs", "Pairs refreshed by the poller by outcome.", ["outcome"], registry=r
        )
        self.poll_cycle_seconds = Histogram(
            "fxrates_poll_cycle_seconds",
            "Duration of one poll cycle.",
            registry=r,
            buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300),
        )
        self.last_successful_cycle = Gauge(
            "fxrates_poll_last_success_timestamp_seconds",
            "When the last cycle in which the upstream answered for a pair ended.",
            registry=r,
        )
        self.cache_lookups = Counter(
            "fxrates_cache_lookups", "Rate lookups by the layer that answered.", ["layer"], registry=r
        )
        self.cache_errors = Counter("fxrates_cache_errors", "Cache operations that failed (Redis down).", registry=r)
        self.websocket_clients = Gauge("fxrates_websocket_clients", "Connected WebSocket clients.", registry=r)
        self.gc_full_collection_seconds = Histogram(
            "fxrates_gc_full_collection_seconds",
            "Full garbage collections, each run between two poll cycles (app.live.gc_pacing): how long each "
            "stopped the process.",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.websocket_slow_closed = Counter(
            "fxrates_websocket_slow_closed", "WebSocket clients closed for not reading their updates.", registry=r
        )
        self.websocket_dropped = Counter(
            "fxrates_websocket_dropped",
            "WebSocket connections reset because what was queued for the client was still unsent 10 s after the "
            "service was done with them (app.live.protocol).",
            registry=r,
        )
        self.database_errors = Counter(
            "fxrates_database_errors",
            "Database calls that failed because it could not be reached (refused, cut, not answering, locked).",
            registry=r,
        )
        self.database_up = Gauge(
            "fxrates_database_up", "1 while the database answers, 0 while this process finds it away.", registry=r
        )
        self.stale_answers = Counter(
            "fxrates_stale_answers",
            "Answers served from what the process held because a part behind it could not be reached.",
            ["reason"],
            registry=r,
        )
        self.websocket_frames_sent = Counter(
            "fxrates_websocket_frames_sent", "Frames sent to WebSocket clients (replies and pushes).", registry=r
        )
        self.websocket_updates_conflated = Counter(
            "fxrates_websocket_updates_conflated",
            "Rate updates replaced, before a client took them, by a newer one for the same pair.",
            registry=r,
        )
        self.publish_errors = Counter("fxrates_publish_errors", "Events that could not be published.", registry=r)
        # Set when /metrics is scraped (app.api.ops), so they tell the state at that moment.
        self.rate_age_seconds = Gauge(
            "fxrates_rate_age_seconds",
            "Seconds since each polled pair's stored rate was received from the upstream.",
            ["pair"],
            registry=r,
        )
        self.poller_role = Gauge(
            "fxrates_poller_role",
            "1 for this replica's poller role (leading, standby or alone), 0 for the others; all 0 when not polling.",
            ["role"],
            registry=r,
        )
        self.dependency_up = Gauge(
            "fxrates_dependency_up",
            "1 when the dependency answered a check at the last scrape (database: SELECT 1; redis: PING), else 0.",
            ["dependency"],
            registry=r,
        )
        # The last `last_updated` read for each polled pair (epoch seconds), kept so a database outage
        # does not hide the ages: nothing newer can be stored while it lasts.
        self.rate_received_at: dict[str, float] = {}
        # One series per limit of docs/limits.md, created up front so each reads 0 before its first refusal.
        self.refused = Counter(
            "fxrates_requests_refused",
            "Requests, connections and messages refused by a limit (docs/limits.md).",
            ["limit"],
            registry=r,
        )
        for limit in LIMITS:
            self.refused.labels(limit=limit)
        self.auth_failures = Counter(
            "fxrates_auth_failures",
            "Requests refused for their API key: none where one is needed (missing), unknown or revoked (bad_key), "
            "a role that may not (forbidden), or from an address blocked for sending bad keys (blocked).",
            ["reason"],
            registry=r,
        )
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason=reason)
        self.operator_actions = Counter(
            "fxrates_operator_actions", "Operator actions done under /api/admin, by action.", ["action"], registry=r
        )
        for action in OPERATOR_ACTIONS:
            self.operator_actions.labels(action=action)
        self.corridors = Gauge(
            "fxrates_corridors",
            "Stored pairs by corridor state (active, paused, withheld), as of the last scrape.",
            ["state"],
            registry=r,
        )
        for state in CORRIDOR_STATES:
            self.corridors.labels(state=state)
        # Set when /metrics is scraped (app.api.ops), from the database: the same on every replica.
        self.rates_held = Gauge(
            "fxrates_rates_held",
            "Fetched values the rate guard holds for confirmation now, not stored (docs/operations.md).",
            registry=r,
        )
        self.limit_errors = Counter(
            "fxrates_limit_errors", "Limit counts that fell back to this process because Redis failed.", registry=r
        )
