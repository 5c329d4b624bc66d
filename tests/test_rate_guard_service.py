"""The rate guard end to end, on real services (docs/operations.md, "The rate guard"; docs/rest.md, "Held values").

A glitch for one poll never reaches a WebSocket client or REST; a real move lands after the confirmations; an
operator accepts or rejects a held value; the held value survives a restart and is confirmed by another replica.
"""

# ruff: noqa: ASYNC212
# (Blocking HTTP from async tests is fine here: the service is another process, and the WebSocket frames it sends
# meanwhile wait in the socket, read once the test awaits them.)

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.currencies import Pair
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica
from tests.support.waiting import eventually_sync
from tests.support.ws_client import WsClient, is_update_for
from tests.test_keys import assert_error, audit_rows, bearer, create_key, refresh, start_service

pytestmark = pytest.mark.slow  # real servers

USD_NGN, USD_KES, GBP_GHS = Pair("USD", "NGN"), Pair("USD", "KES"), Pair("GBP", "GHS")
QUIET = {"POLL_INTERVAL_SECONDS": "3600"}  # one cycle at start-up; after it, only the test's refreshes fetch


def served(client: httpx.Client, pair: Pair) -> Decimal:
    answer = client.get(f"/api/rates?source_currency={pair.source}&destination_currency={pair.destination}")
    assert answer.status_code == 200, answer.text
    return Decimal(str(answer.json()["meta"]["destination_per_source"]))


def held_list(client: httpx.Client, key: str) -> list[dict[str, Any]]:
    answer = client.get("/api/admin/held", headers=bearer(key))
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    items: list[dict[str, Any]] = answer.json()["data"]["held"]
    return items


def outcome(client: httpx.Client, key: str, pair: Pair) -> str:
    done = refresh(client, key, [str(pair)])
    assert done.status_code == 200, done.text
    result: str = done.json()["data"]["outcomes"][0]["outcome"]
    return result


def decide(client: httpx.Client, key: str, pair: Pair, action: str, reason: str = "checked") -> httpx.Response:
    path = f"/api/admin/held/{pair.source}/{pair.destination}/{action}"
    return client.post(path, json={"reason": reason}, headers=bearer(key))


def gauge_reads(client: httpx.Client, line: str, value: float) -> None:
    """Until /metrics shows `value` (the held gauge is read from the database at most once a second)."""
    eventually_sync(lambda: metric(client, line), until=lambda read: read == value, what=f"{line} to read {value}")


def metric(client: httpx.Client, line: str) -> float:
    for text in client.get("/metrics").text.splitlines():
        if text.startswith(line + " "):
            return float(text.split()[-1])
    raise AssertionError(f"{line} is not in /metrics")


def database_url_of(database: str, sqlite_url: str, postgres_url: str) -> str:
    return sqlite_url if database == "sqlite" else postgres_url


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_a_glitch_for_one_poll_never_reaches_a_client_or_rest(
    database: str, tmp_path: Path, fake: FakeFlutterwave, sqlite_url: str, postgres_url: str
) -> None:
    url = database_url_of(database, sqlite_url, postgres_url)
    operator = create_key(url, "ops-alice", "operator")
    replica = start_service(tmp_path, fake, url, POLL_INTERVAL_SECONDS="1")
    try:
        with httpx.Client(base_url=replica.url, timeout=10) as client:
            market = served(client, USD_NGN)
            async with WsClient(replica.ws_url) as ws:
                await ws.recv_until(lambda message: message["type"] == "all_rates")
                glitch = fake.glitch(USD_NGN, Decimal("1.5"))
                asked = fake.calls[USD_NGN]
                # Three cycle ends: the glitched poll, and at least one after it, each pushing USD/NGN as stored.
                seen: list[dict[str, Any]] = []
                for _ in range(3):
                    end, before = await ws.recv_until(lambda message: message["type"] == "all_rates_update")
                    seen += [*before, end]
                    assert served(client, USD_NGN) == market, "REST serves the stored value throughout"
            assert fake.calls[USD_NGN] >= asked + 2 and glitch in [value for _, value in fake.served[USD_NGN]]
            updates = [message for message in seen if is_update_for("USD/NGN")(message)]
            assert updates, "USD/NGN was pushed as stored meanwhile"
            assert {Decimal(str(update["rate"]["destination_per_source"])) for update in updates} == {market}
            history = client.get("/api/rates/history?source_currency=USD&destination_currency=NGN").json()
            assert all(Decimal(str(point["destination_per_source"])) != glitch for point in history["data"]["points"])
            assert held_list(client, operator) == [], "the answer back near the stored value dropped the held one"
        assert "rate guard: holding USD/NGN" in replica.log()
    finally:
        replica.stop()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_a_real_move_lands_after_the_confirmations_and_operators_accept_or_reject(
    database: str, tmp_path: Path, fake: FakeFlutterwave, sqlite_url: str, postgres_url: str
) -> None:
    url = database_url_of(database, sqlite_url, postgres_url)
    operator = create_key(url, "ops-alice", "operator")
    replica = start_service(tmp_path, fake, url, **QUIET)
    try:
        with httpx.Client(base_url=replica.url, timeout=10) as client:
            stored = served(client, USD_NGN)
            async with WsClient(replica.ws_url) as ws:
                await ws.recv_until(lambda message: message["type"] == "all_rates")
                # A devaluation: held, confirmed once, then stored at the second confirmation and pushed then.
                moved = fake.bump(USD_NGN, Decimal("1.5"))
                assert outcome(client, operator, USD_NGN) == "held"
                (item,) = held_list(client, operator)
                assert item["pair"] == "USD/NGN" and Decimal(str(item["held"])) == moved
                assert Decimal(str(item["stored"])) == stored and item["confirmations"] == 0
                assert Decimal(str(item["move_bps"])) == Decimal("5000")
                gauge_reads(client, "fxrates_rates_held", 1)
                assert outcome(client, operator, USD_NGN) == "held"
                assert held_list(client, operator)[0]["confirmations"] == 1
                assert served(client, USD_NGN) == stored, "held values are not served"
                assert outcome(client, operator, USD_NGN) == "changed"
                update, skipped = await ws.recv_until(is_update_for("USD/NGN"))
                assert Decimal(str(update["rate"]["destination_per_source"])) == moved
                assert not [message for message in skipped if is_update_for("USD/NGN")(message)]
                assert served(client, USD_NGN) == moved and held_list(client, operator) == []

                # Accepted by an operator: stored and pushed at once, with a seq.
                kes = fake.bump(USD_KES, Decimal("2"))
                assert outcome(client, operator, USD_KES) == "held"
                assert_error(decide(client, operator, USD_KES, "accept", reason=""), 422)
                assert_error(client.post("/api/admin/held/USD/KES/accept", json={"reason": "x"}), 401)
                accepted = decide(client, operator, USD_KES, "accept", reason="Matches the bank's rate")
                assert accepted.status_code == 200, accepted.text
                assert Decimal(str(accepted.json()["data"]["stored"])) == kes and accepted.json()["data"]["seq"] > 0
                update, _ = await ws.recv_until(is_update_for("USD/KES"))
                assert Decimal(str(update["rate"]["destination_per_source"])) == kes
                assert served(client, USD_KES) == kes

                # Rejected: dropped, the stored value stands.
                ghs = served(client, GBP_GHS)
                fake.bump(GBP_GHS, Decimal("0.5"))
                assert outcome(client, operator, GBP_GHS) == "held"
                rejected = decide(client, operator, GBP_GHS, "reject", reason="Upstream glitch")
                assert rejected.status_code == 200, rejected.text
                assert held_list(client, operator) == [] and served(client, GBP_GHS) == ghs
                assert_error(decide(client, operator, GBP_GHS, "reject"), 404)
                assert_error(decide(client, operator, Pair("USD", "XOF"), "accept"), 404)
                assert_error(
                    client.post("/api/admin/held/USD/ZZZ/accept", json={"reason": "r"}, headers=bearer(operator)), 404
                )

            rows = audit_rows(client, operator)
            decisions = [(row["action"], row["pairs"], row["reason"]) for row in rows if row["action"] != "refresh"]
            assert decisions == [
                ("reject_held", ["GBP/GHS"], "Upstream glitch"),
                ("accept_held", ["USD/KES"], "Matches the bank's rate"),
            ]
            assert metric(client, 'fxrates_operator_actions_total{action="accept_held"}') == 1
            assert metric(client, 'fxrates_operator_actions_total{action="reject_held"}') == 1
            gauge_reads(client, "fxrates_rates_held", 0)

            # Held and confirmed once, then the service restarts: its start-up cycle is the second confirmation, which
            # stores the value only if the first was kept in the database.
            fake.set_rate(GBP_GHS, ghs)
            back = fake.bump(USD_NGN, Decimal("0.5"))
            assert outcome(client, operator, USD_NGN) == "held"
            assert outcome(client, operator, USD_NGN) == "held"
            assert held_list(client, operator)[0]["confirmations"] == 1
        replica.stop()
        replica = start_service(tmp_path, fake, url, name="restarted", **QUIET)
        with httpx.Client(base_url=replica.url, timeout=10) as client:
            assert served(client, USD_NGN) == back
            assert held_list(client, operator) == []
    finally:
        replica.stop()


async def test_a_value_held_by_one_replica_is_confirmed_by_another(
    tmp_path: Path, fake: FakeFlutterwave, postgres_url: str, throwaway_redis: RedisServer
) -> None:
    operator = create_key(postgres_url, "ops-alice", "operator")
    replicas: list[Replica] = []
    try:
        for name in ("a", "b"):
            replicas.append(start_service(tmp_path, fake, postgres_url, name, REDIS_URL=throwaway_redis.url, **QUIET))
        a, b = (httpx.Client(base_url=replica.url, timeout=10) for replica in replicas)
        with a, b:
            stored = served(a, USD_NGN)
            moved = fake.bump(USD_NGN, Decimal("1.5"))
            assert outcome(a, operator, USD_NGN) == "held"
            gauge_reads(b, "fxrates_rates_held", 1)  # every replica tells what the database holds
            assert outcome(b, operator, USD_NGN) == "held"
            assert held_list(a, operator)[0]["confirmations"] == 1, "b's answer counted on a's"
            assert served(a, USD_NGN) == served(b, USD_NGN) == stored
            assert outcome(a, operator, USD_NGN) == "changed"
            eventually_sync(lambda: served(b, USD_NGN), until=lambda value: value == moved, what="b to serve the move")
    finally:
        for replica in replicas:
            replica.stop()
