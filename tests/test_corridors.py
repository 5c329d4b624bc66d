"""Corridor control end to end: two replicas sharing Redis on one database, real HTTP and WebSocket clients
(docs/operations.md "Corridors", docs/rest.md "Admin")."""

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.currencies import Pair
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient, is_update_for
from tests.test_keys import assert_error, bearer, create_key, start_service

pytestmark = pytest.mark.slow  # real servers

USD_NGN, USD_KES = Pair("USD", "NGN"), Pair("USD", "KES")
RATE = "/api/rates?source_currency=USD&destination_currency=NGN"
BASE = "/api/admin/corridors/USD/NGN"


@pytest.fixture
def replicas(
    tmp_path: Path, fake: FakeFlutterwave, database_url: str, redis_url: str
) -> Iterator[tuple[Replica, Replica]]:
    env = {"REDIS_URL": redis_url, "POLL_INTERVAL_SECONDS": "1", "POLLER_LOCK_TTL_SECONDS": "3"}
    first = start_service(tmp_path, fake, database_url, "first", **env)
    try:
        second = start_service(tmp_path, fake, database_url, "second", **env)
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


async def post(client: httpx.AsyncClient, key: str, path: str, **body: Any) -> httpx.Response:
    return await client.post(path, json=body, headers=bearer(key))


async def audit_rows(client: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    answer = await client.get("/api/admin/audit", headers=bearer(key))
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["data"]["rows"]
    return rows


async def meta(client: httpx.AsyncClient, path: str = "/api/rates?source_currency=USD&destination_currency=NGN") -> Any:
    return (await client.get(path)).json()["meta"]


async def polls_pass(fake: FakeFlutterwave, cycles: int = 2) -> None:
    """Until `cycles` more poll cycles have asked the upstream (USD/KES is always fetched)."""
    start = fake.calls[USD_KES]
    await eventually(lambda: fake.calls[USD_KES] >= start + cycles, what="poll cycles", timeout_s=20)


async def test_pause_withhold_resume_and_override(
    replicas: tuple[Replica, Replica], fake: FakeFlutterwave, database_url: str
) -> None:
    first, second = replicas
    key = create_key(database_url, "ops-alice", "operator")
    integrator = create_key(database_url, "mobile-app", "integrator")
    async with (
        httpx.AsyncClient(base_url=first.url, timeout=10) as one,
        httpx.AsyncClient(base_url=second.url, timeout=10) as two,
    ):
        async with WsClient(second.ws_url) as watcher:
            await watcher.recv_until(lambda m: m["type"] == "all_rates")
            await watcher.ask({"type": "subscribe", "pairs": ["USD/NGN"]}, "subscribed")

            # Rejected: nothing written, nothing changed.
            before = await audit_rows(one, key)
            assert_error(await one.post(f"{BASE}/pause", json={"reason": "x"}), 401)
            assert_error(await post(one, integrator, f"{BASE}/pause", reason="x"), 403)
            assert_error(await post(one, key, "/api/admin/corridors/USD/JPY/pause", reason="x"), 422)
            assert_error(await post(one, key, "/api/admin/corridors/USD/XYZ/pause", reason="x"), 422)
            assert_error(await post(one, key, f"{BASE}/pause"), 422)
            assert_error(await post(one, key, f"{BASE}/pause", reason="x" * 501), 422)
            for bad in (
                {"expires_in_seconds": 86_401},
                {"destination_per_source": "-1"},
                {"destination_per_source": 1.5},
            ):
                body = {"destination_per_source": "1530.25", "expires_in_seconds": 60, "reason": "x", **bad}
                assert_error(await post(one, key, f"{BASE}/override", **body), 422)
            assert_error(await one.delete(f"{BASE}/override", params={"reason": "x"}, headers=bearer(key)), 422)
            assert await audit_rows(one, key) == before
            assert "corridor" not in (await meta(two))

            # Pause: not fetched, still served, marked; the other replica's client is told.
            paused = await post(one, key, f"{BASE}/pause", reason="Flutterwave suspended NGN payouts")
            assert paused.status_code == 200, paused.text
            assert (await meta(one))["corridor"]["state"] == "paused"
            frame, _ = await watcher.recv_until(lambda m: m["type"] == "corridor")
            assert frame["pair"] == "USD/NGN" and frame["state"] == "paused"
            assert frame["reason"] == "Flutterwave suspended NGN payouts"
            calls = fake.calls[USD_NGN]
            await polls_pass(fake)
            assert fake.calls[USD_NGN] == calls
            for client in (one, two):
                answer = await client.get(RATE)
                assert answer.status_code == 200
                assert answer.json()["meta"]["corridor"]["state"] == "paused"
            skipped = await post(one, key, "/api/admin/refresh", pairs=["USD/NGN"], reason="try")
            assert skipped.json()["data"]["outcomes"] == [{"pair": "USD/NGN", "outcome": "skipped"}]
            assert fake.calls[USD_NGN] == calls

            # Withhold: not served anywhere, history still answers.
            assert (await post(two, key, f"{BASE}/withhold", reason="Wrong rates reported")).status_code == 200
            frame, _ = await watcher.recv_until(lambda m: m["type"] == "corridor")
            assert frame["state"] == "withheld"

            # The replica that acted answers so at once; the other once the event reaches it.
            async def withheld_there() -> bool:
                return (await one.get(RATE)).status_code == 503

            await eventually(withheld_there, what="the withhold to reach", timeout_s=10)
            for client in (two, one):
                refused = assert_error(await client.get(RATE), 503)
                assert "withheld by the operator" in refused["message"]
                assert "NGN" not in (await client.get("/api/rates/all?base_currency=USD")).json()["data"]["rates"]
                assert (
                    await client.get("/api/rates/history?source_currency=USD&destination_currency=NGN")
                ).status_code == 200
            async with WsClient(first.ws_url) as newcomer:
                snapshot, _ = await newcomer.recv_until(lambda m: m["type"] == "all_rates")
                pairs = {(r["source_currency"], r["destination_currency"]) for r in snapshot["rates"]}
                assert ("USD", "NGN") not in pairs and ("USD", "KES") in pairs
                refused_ws = await newcomer.ask(
                    {"type": "get_rate", "source_currency": "USD", "destination_currency": "NGN"}, ("rate", "error")
                )
                assert refused_ws["type"] == "error" and refused_ws["code"] == "withheld"

            # Resume: fetched at once.
            assert (await post(one, key, f"{BASE}/resume", reason="Upstream fixed")).status_code == 200
            assert fake.calls[USD_NGN] > calls
            assert "corridor" not in (await meta(one))
            frame, _ = await watcher.recv_until(lambda m: m["type"] == "corridor")
            assert frame["state"] == "active"

            # Override: stored and pushed with provider manual and a seq; polls do not replace it.
            answer = await post(
                one, key, f"{BASE}/override", destination_per_source="1530.25", expires_in_seconds=4, reason="Treasury"
            )
            assert answer.status_code == 200, answer.text
            update, _ = await watcher.recv_until(
                lambda m: is_update_for("USD/NGN")(m) and m["rate"]["provider"] == "manual"
            )
            assert Decimal(str(update["rate"]["destination_per_source"])) == Decimal("1530.25")
            assert isinstance(update["seq"], int)
            calls = fake.calls[USD_NGN]
            await polls_pass(fake)
            served = await meta(one)
            assert served["provider"] == "manual" and served["seq"] == update["seq"]
            history = (
                await one.get(
                    "/api/rates/history",
                    params={"source_currency": "USD", "destination_currency": "NGN", "limit": 1000},
                )
            ).json()
            assert history["data"]["points"][-1]["provider"] == "manual"
            assert history["data"]["points"][-1]["actor"] == "ops-alice"

            # It expires: the next fetch replaces it.
            async def fetched_again() -> bool:
                return bool((await meta(two))["provider"] == "flutterwave")

            await eventually(fetched_again, what="expiry", timeout_s=20)
            assert fake.calls[USD_NGN] > calls

            # DELETE ends one early, fetched at once.
            await post(
                one, key, f"{BASE}/override", destination_per_source="1500", expires_in_seconds=3600, reason="again"
            )
            assert (await meta(one))["provider"] == "manual"
            listed = (await one.get("/api/admin/corridors", headers=bearer(key))).json()["data"]["corridors"]
            ngn = next(item for item in listed if item["pair"] == "USD/NGN")
            assert ngn["state"] == "active" and ngn["override"]["in_force"] and ngn["override"]["by"] == "ops-alice"
            ended = await one.delete(f"{BASE}/override", params={"reason": "Upstream back"}, headers=bearer(key))
            assert ended.status_code == 200, ended.text
            assert (await meta(one))["provider"] == "flutterwave"

            actions = [row["action"] for row in await audit_rows(one, key)]
            assert actions[:7] == ["end_override", "override", "override", "resume", "withhold", "refresh", "pause"]


async def test_states_and_overrides_survive_a_restart(tmp_path: Path, fake: FakeFlutterwave, database_url: str) -> None:
    replica = start_service(tmp_path, fake, database_url, "before", POLL_INTERVAL_SECONDS="1")
    key = create_key(database_url, "ops-bob", "operator")
    try:
        async with httpx.AsyncClient(base_url=replica.url, timeout=10) as client:
            assert (await post(client, key, f"{BASE}/pause", reason="suspended")).status_code == 200
            kes = "/api/admin/corridors/USD/KES/override"
            assert (
                await post(client, key, kes, destination_per_source="130", expires_in_seconds=3600, reason="r")
            ).is_success
    finally:
        replica.stop()
    again = start_service(tmp_path, fake, database_url, "after", POLL_INTERVAL_SECONDS="1")
    try:
        async with httpx.AsyncClient(base_url=again.url, timeout=10) as client:
            assert (await meta(client))["corridor"]["reason"] == "suspended"
            kes_meta = (await client.get("/api/rates?source_currency=USD&destination_currency=KES")).json()["meta"]
            assert kes_meta["provider"] == "manual"
            calls = fake.calls[USD_NGN], fake.calls[USD_KES]
            other = Pair("USD", "GHS")
            start = fake.calls[other]
            await eventually(lambda: fake.calls[other] >= start + 2, what="poll cycles", timeout_s=20)
            assert (fake.calls[USD_NGN], fake.calls[USD_KES]) == calls
    finally:
        again.stop()
