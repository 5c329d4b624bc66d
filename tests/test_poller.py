"""The poller against the fake upstream: every pair asked, failures contained, history only on change."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from app.currencies import Pair
from app.kit.metrics import Metrics
from app.services import open_services
from app.settings import Settings
from app.storage import repository
from app.storage.engine import PROJECT_ROOT
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.waiting import eventually


async def current_values(settings: Settings) -> dict[Pair, Decimal]:
    async with open_services(settings, Metrics(), start_poller=False) as services:
        return {rate.pair: rate.destination_per_source for rate in await services.store.all()}


async def test_a_cycle_stores_all_44_pairs_and_history_grows_only_on_change(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    async with open_services(settings, Metrics(), start_poller=False) as services:
        first = await services.poller.run_cycle()
        second = await services.poller.run_cycle()
        moved = Pair("USD", "NGN")
        fake.bump(moved, Decimal("1.01"))
        third = await services.poller.run_cycle()
        rates = await services.store.all()
        async with services.store._sessions() as session:
            history = {p: len(await repository.list_history(session, p)) for p in settings.pairs}
    assert (first.ok, first.failed, first.changed) == (44, 0, 44)
    assert (second.ok, second.failed, second.changed) == (44, 0, 0)
    assert (third.ok, third.failed, third.changed) == (44, 0, 1)
    assert len(rates) == 44 and {rate.provider for rate in rates} == {"flutterwave"}
    assert {rate.pair: rate.destination_per_source for rate in rates}[moved] == fake.rate(moved)
    assert history.pop(moved) == 2
    assert set(history.values()) == {1}


async def test_a_quarter_failing_still_asks_every_pair_and_loses_no_rate(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(upstream_timeout_seconds=0.3, upstream_max_attempts=2)
    pairs = settings.pairs
    failing = pairs[::4]
    assert len(failing) == 11
    kinds = ["503", "500", "429", "hang", "not_json", "inconsistent_rate", "400", "wrong_currency"]
    async with open_services(settings, Metrics(), start_poller=False) as services:
        await services.poller.run_cycle()
        before = {rate.pair: rate.destination_per_source for rate in await services.store.all()}
        fake.reset_counters()
        for index, pair in enumerate(failing):
            fake.fail(kinds[index % len(kinds)], pairs=[pair], retry_after=0)
        for pair in pairs:
            fake.bump(pair, Decimal("1.002"))
        report = await services.poller.run_cycle()
        after = {rate.pair: rate.destination_per_source for rate in await services.store.all()}
    assert (report.ok, report.failed, report.changed) == (33, 11, 33)
    assert set(fake.calls) == set(pairs)
    assert len(after) == 44
    for pair in pairs:
        if pair in failing:
            assert after[pair] == before[pair], f"{pair} lost its last good rate"
        else:
            assert after[pair] == fake.rate(pair)


async def test_the_running_poller_cycles_and_stops_cleanly(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(poll_interval_seconds=0.2)
    pair = Pair("USD", "KES")
    async with open_services(settings, Metrics(), start_poller=True):
        await eventually(
            lambda: fake.calls[pair], until=lambda calls: calls >= 3, what="the poller to cycle three times"
        )
    calls_at_stop = sum(fake.calls.values())
    await asyncio.sleep(0.3)
    assert sum(fake.calls.values()) == calls_at_stop, "the poller kept running after shutdown"
    assert len(await current_values(settings)) == 44


async def test_stopping_mid_cycle_loses_no_write(fake: FakeFlutterwave, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    fake.latency_s = 0.05
    async with open_services(settings, Metrics(), start_poller=True):
        await eventually(
            lambda: sum(fake.calls.values()),
            until=lambda calls: calls >= 10,
            what="ten upstream calls",
            interval_s=0.005,
        )
    # Whatever was written before the stop was written whole: current row and its history point together.
    async with open_services(settings, Metrics(), start_poller=False) as services:
        stored = await services.store.all()
        async with services.store._sessions() as session:
            history = [len(await repository.list_history(session, rate.pair)) for rate in stored]
    assert stored, "nothing was stored before the stop"
    assert all(rate.destination_per_source == fake.rate(rate.pair) for rate in stored)
    assert history == [1] * len(stored)


def run_once(fake: FakeFlutterwave, database: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.isupper() or key in ("PATH", "HOME", "LANG")}
    env.update(
        ENVIRONMENT="test",
        DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=fake.url,
        UPSTREAM_TIMEOUT_SECONDS="1",
        UPSTREAM_MAX_ATTEMPTS="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "app.poller", "--once"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow  # starts a Python process of its own
def test_once_exits_0_when_every_pair_succeeds_and_1_otherwise(fake: FakeFlutterwave, tmp_path: Path) -> None:
    ok = run_once(fake, tmp_path / "rates.db")
    assert ok.returncode == 0, ok.stderr
    assert "44 ok, 0 failed" in ok.stderr
    fake.fail("503", pairs=[Pair("EUR", "ZMW")])
    failed = run_once(fake, tmp_path / "rates.db")
    assert failed.returncode == 1, failed.stderr
    assert "43 ok, 1 failed" in failed.stderr
    assert SECRET_KEY not in ok.stderr + failed.stderr
