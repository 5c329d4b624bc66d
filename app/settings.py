"""The service's configuration (docs/configuration.md), validated once at start-up.

Only the entry points (`app.main`, `app.poller`) build a `Settings`; everything
else is handed the values it needs.
"""

import ipaddress
import sys
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.currencies import Pair, normalise_currency


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


CommaList = Annotated[list[str], NoDecode]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = Annotated[tuple[Network, ...], NoDecode]

# In ON_DEMAND_CURRENCIES: every ISO 4217 code.
ANY_CURRENCY = "*"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Environment = Environment.development
    # Secret, as the passwords they may carry must never show in a log, an answer or a repr (docs/configuration.md):
    # read with get_secret_value() only where a connection is made.
    database_url: SecretStr = SecretStr("sqlite+aiosqlite:///./rates.db")
    redis_url: SecretStr | None = None
    flutterwave_secret_key: SecretStr | None = Field(default=None, validate_default=True)
    flutterwave_base_url: str = "https://api.flutterwave.com"
    rates_source_currencies: CommaList = ["USD", "CAD", "GBP", "EUR"]
    rates_destination_currencies: CommaList = [
        "XOF",
        "XAF",
        "EGP",
        "ETB",
        "GHS",
        "KES",
        "MAD",
        "NGN",
        "ZAR",
        "UGX",
        "ZMW",
    ]
    poll_interval_seconds: float = Field(default=600, gt=0)
    poller_enabled: bool = True
    poller_lock_ttl_seconds: float = Field(default=30, gt=0)
    rate_stale_after_seconds: float = Field(default=600, gt=0)
    cache_ttl_seconds: int | None = Field(default=None, gt=0, validate_default=True)
    upstream_timeout_seconds: float = Field(default=30, gt=0)
    upstream_max_attempts: int = Field(default=3, ge=1, le=10)
    upstream_concurrency: int = Field(default=4, ge=1, le=64)
    upstream_quote_amount: Decimal = Field(default=Decimal(1000), gt=0)
    ws_stall_timeout_seconds: float = Field(default=30, gt=0)
    cors_allow_origins: CommaList = ["*"]
    db_auto_migrate: bool = True
    db_timeout_seconds: float = Field(default=2, gt=0, le=60)
    log_format: Literal["text", "json"] = "text"
    shutdown_drain_seconds: float = Field(default=0, ge=0, le=300)
    # The limits on what one anonymous client can cause (docs/limits.md).
    on_demand_currencies: CommaList = [ANY_CURRENCY]
    on_demand_calls_per_minute: int = Field(default=10, ge=0, le=1_000_000)
    on_demand_max_pairs: int = Field(default=200, ge=0, le=1_000_000)
    rate_limit_per_minute: int = Field(default=1200, ge=0, le=100_000_000)
    # A request with a valid API key counts against its key's limit instead of its address's.
    rate_limit_per_key_per_minute: int = Field(default=6000, ge=0, le=100_000_000)
    # The rate guard (docs/operations.md, "The rate guard"): a fetched value moving more than this many basis points
    # from the stored one is held until confirmed; 0 turns it off.
    rate_guard_bps: int = Field(default=1000, ge=0, le=1_000_000)
    # Later answers in a row within the guard of a held value that store it; 0: only an operator's accept does.
    rate_guard_confirmations: int = Field(default=2, ge=0, le=1000)
    ws_max_clients: int = Field(default=10_000, ge=1, le=10_000_000)
    ws_max_clients_per_address: int = Field(default=100, ge=1, le=10_000_000)
    ws_messages_per_second: float = Field(default=10, gt=0, le=1_000_000)
    ws_message_burst: int = Field(default=50, ge=1, le=1_000_000)
    # Each pair followed costs a client memory and its `subscribed` answers bytes: bounded, so both are.
    ws_max_pairs_per_client: int = Field(default=256, ge=1, le=100_000)
    # A client sent nothing for this long gets a heartbeat; two missed tell it the connection is dead.
    ws_heartbeat_seconds: float = Field(default=25, gt=0, le=3600)
    # Who may read /metrics (docs/operations.md): loopback and the private networks.
    metrics_allow_ips: Networks = Field(
        default="127.0.0.1,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7", validate_default=True
    )

    @field_validator("redis_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("flutterwave_secret_key", mode="before")
    @classmethod
    def _blank_key_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("flutterwave_secret_key")
    @classmethod
    def _key_required_in_production(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None and info.data.get("environment") == Environment.production:
            raise ValueError("is required when ENVIRONMENT=production (demo rates are refused there)")
        return value

    @field_validator(
        "rates_source_currencies",
        "rates_destination_currencies",
        "cors_allow_origins",
        "on_demand_currencies",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("rates_source_currencies", "rates_destination_currencies")
    @classmethod
    def _iso_4217(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one currency code")
        return list(dict.fromkeys(normalise_currency(code) for code in value))

    @field_validator("on_demand_currencies")
    @classmethod
    def _iso_4217_or_any(cls, value: list[str]) -> list[str]:
        if ANY_CURRENCY in value:
            if len(value) > 1:
                raise ValueError(f"is either {ANY_CURRENCY!r} alone or a list of ISO 4217 codes")
            return value
        return list(dict.fromkeys(normalise_currency(code) for code in value))

    @field_validator("metrics_allow_ips", mode="before")
    @classmethod
    def _addresses_or_networks(cls, value: Any) -> Any:
        return tuple(_network(item) for item in _split_commas(value)) if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("cache_ttl_seconds")
    @classmethod
    def _twice_the_poll_interval(cls, value: int | None, info: ValidationInfo) -> int:
        if value is not None:
            return value
        # A cached rate must outlive one missed poll, so readers keep a hit while the poller retries.
        interval_s: float = info.data.get("poll_interval_seconds", 600)
        return max(1, round(2 * interval_s))

    @property
    def cache_ttl_s(self) -> int:
        assert self.cache_ttl_seconds is not None  # filled in by its validator
        return self.cache_ttl_seconds

    @property
    def polled_currencies(self) -> frozenset[str]:
        return frozenset(self.rates_source_currencies) | frozenset(self.rates_destination_currencies)

    @property
    def pairs(self) -> list[Pair]:
        """Every polled pair, sources in order, a currency never paired with itself."""
        return [
            Pair(source, destination)
            for source in self.rates_source_currencies
            for destination in self.rates_destination_currencies
            if source != destination
        ]


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError as error:
        reason = str(error).removeprefix(f"{text!r} ").removeprefix(f"{text} ")
        raise ValueError(
            f"has {text!r}, which is no IP address or network (CIDR, such as 10.0.0.0/8): {reason}"
        ) from None


def describe_error(error: ValidationError) -> str:
    """One line naming each bad variable, without echoing its value (it may be the secret)."""
    parts = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "configuration"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{name} {message}")
    return "invalid configuration: " + "; ".join(parts)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, or stop the process with one line naming the bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        print(f"fxrates: {describe_error(error)}", file=sys.stderr)  # noqa: T201 - logging is not set up yet
        raise SystemExit(2) from None
