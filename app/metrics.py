"""The service's Prometheus metrics, in a registry of its own built by the lifespan (no import-time globals)."""

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "fxrates_http_requests", "HTTP requests by route template and status.", ["route", "status"], registry=r
        )
        self.upstream_calls = Counter(
            "fxrates_upstream_calls", "Requests to the upstream by outcome.", ["outcome"], registry=r
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
        self.websocket_slow_closed = Counter(
            "fxrates_websocket_slow_closed", "WebSocket clients closed for not reading their updates.", registry=r
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
        self.publish_errors = Counter("fxrates_publish_errors", "Events that could not be published.", registry=r)
