"""Operators' keys, end to end on a real service over HTTP (docs/rest.md "Keys", docs/operations.md "Operators").

The CLI creates, lists and revokes keys in the service's database; the service
answers `/api/admin` only to an operator key, counts a keyed request against the
key's own limit, refuses unknown and revoked keys, blocks an address that sends
too many, writes an audit row per admin action and never lets the key itself out.
"""

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.currencies import Pair
from app.storage.engine import PROJECT_ROOT
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.replicas import Replica, service_env, wait_for_rates

pytestmark = pytest.mark.slow  # real servers

KEY = re.compile(r"fxr_[A-Za-z0-9_-]{43}")
USD_NGN, USD_KES, GBP_GHS = Pair("USD", "NGN"), Pair("USD", "KES"), Pair("GBP", "GHS")
RATE = "/api/rates?source_currency=USD&destination_currency=NGN"
ADDRESS_LIMIT, KEY_LIMIT = 6, 30


def keys_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = service_env(DATABASE_URL=database_url, ENVIRONMENT="test")
    return subprocess.run(
        [sys.executable, "-m", "app.keys", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def create_key(database_url: str, name: str, role: str) -> str:
    created = keys_cli(database_url, "create", name, "--role", role)
    assert created.returncode == 0, created.stderr
    assert KEY.fullmatch(created.stdout.strip()) and created.stdout.count("\n") == 1, created.stdout
    return created.stdout.strip()


def revoke_key(database_url: str, name: str) -> None:
    revoked = keys_cli(database_url, "revoke", name)
    assert revoked.returncode == 0, revoked.stderr


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_service(
    folder: Path, fake: FakeFlutterwave, database_url: str, name: str = "keys", *, wait: bool = True, **env: str
) -> Replica:
    """A replica on `database_url`, polling the fake; with `wait`, yielded once all 44 pairs are stored."""
    values = {
        "DATABASE_URL": database_url,
        "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
        "FLUTTERWAVE_BASE_URL": fake.url,
        "UPSTREAM_TIMEOUT_SECONDS": "1",
        "UPSTREAM_MAX_ATTEMPTS": "1",
        **env,
    }
    replica = Replica(folder, name, **values)
    try:
        replica.start()
        if wait:
            wait_for_rates(replica)
    except BaseException:
        replica.stop()
        raise
    return replica


def assert_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    assert body["status"] == "error" and body["data"] is None and body["message"]
    return body


def audit_rows(client: httpx.Client, key: str, **query: str) -> list[dict[str, Any]]:
    answer = client.get("/api/admin/audit", params=query, headers=bearer(key))
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["data"]["rows"]
    return rows


def refresh(client: httpx.Client, key: str, pairs: list[str] | str, reason: str = "a test") -> httpx.Response:
    return client.post("/api/admin/refresh", json={"pairs": pairs, "reason": reason}, headers=bearer(key))


@pytest.fixture
def sqlite_service(tmp_path: Path, fake: FakeFlutterwave, sqlite_url: str) -> Iterator[tuple[Replica, str]]:
    replica = start_service(
        tmp_path,
        fake,
        sqlite_url,
        wait=False,  # its requests would count against the small address limit
        RATE_LIMIT_PER_MINUTE=str(ADDRESS_LIMIT),
        RATE_LIMIT_PER_KEY_PER_MINUTE=str(KEY_LIMIT),
    )
    try:
        yield replica, sqlite_url
    finally:
        replica.stop()


def test_the_cli_prints_a_key_once_lists_keys_and_revokes_them(sqlite_url: str) -> None:
    key = create_key(sqlite_url, "ops-alice", "operator")
    create_key(sqlite_url, "mobile-app", "integrator")
    again = keys_cli(sqlite_url, "create", "ops-alice", "--role", "operator")
    assert again.returncode == 1 and "exists already" in again.stderr and again.stdout == ""
    listed = keys_cli(sqlite_url, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "ID", "CREATED", "LAST", "USED", "REVOKED"]
    alice, app = (line.split() for line in lines[1:])
    assert alice[:3] == ["ops-alice", "operator", key[:12]] and alice[4:] == ["-", "-"]
    assert app[:2] == ["mobile-app", "integrator"]
    assert key not in listed.stdout and key[12:] not in listed.stdout

    revoke_key(sqlite_url, "mobile-app")
    revoked = keys_cli(sqlite_url, "list").stdout.splitlines()[2].split()
    assert revoked[-1] != "-" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", revoked[-1])
    unknown = keys_cli(sqlite_url, "revoke", "nobody")
    assert unknown.returncode == 1 and "no key is named 'nobody'" in unknown.stderr
    bad_role = keys_cli(sqlite_url, "create", "x", "--role", "root")
    assert bad_role.returncode == 2


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_admin_answers_only_an_operator_key_and_writes_one_audit_row_per_action(
    database: str, tmp_path: Path, fake: FakeFlutterwave, sqlite_url: str, postgres_url: str
) -> None:
    database_url = sqlite_url if database == "sqlite" else postgres_url
    operator = create_key(database_url, "ops-alice", "operator")
    integrator = create_key(database_url, "mobile-app", "integrator")
    replica = start_service(tmp_path, fake, database_url)
    try:
        with httpx.Client(base_url=replica.url, timeout=10) as client:
            missing = client.get("/api/admin/audit")
            assert_error(missing, 401)
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.headers["cache-control"] == "no-store"
            unknown = client.get("/api/admin/audit", headers=bearer("fxr_" + "A" * 43))
            assert_error(unknown, 401)
            assert unknown.headers["www-authenticate"] == "Bearer"
            basic = client.get("/api/admin/audit", headers={"Authorization": "Basic b3BzOnNlY3JldA=="})
            assert_error(basic, 401)
            forbidden = client.get("/api/admin/audit", headers=bearer(integrator))
            assert "integrator" in assert_error(forbidden, 403)["message"]
            assert forbidden.headers["cache-control"] == "no-store"
            assert audit_rows(client, operator) == []

            # Rejected actions write nothing: no key, an integrator's, a bad body, a pair never stored.
            assert_error(client.post("/api/admin/refresh", json={"pairs": "*", "reason": "r"}), 401)
            assert_error(refresh(client, integrator, "*"), 403)
            assert_error(refresh(client, operator, ["USD/NGN"], reason=""), 422)
            assert_error(refresh(client, operator, ["USD/NGN"], reason="x" * 501), 422)
            assert_error(refresh(client, operator, ["USD/XYZ"]), 422)
            never = assert_error(refresh(client, operator, ["USD/NGN", "USD/JPY"]), 422)
            assert "USD/JPY" in never["message"] and never["errors"][0]["field"] == "pairs"
            assert audit_rows(client, operator) == []

            # Changed, unchanged and failed, each as the fake upstream answers.
            fake.bump(USD_NGN, Decimal("1.02"))
            fake.fail("503", pairs=[GBP_GHS])
            done = refresh(client, operator, ["usd/ngn", "USD/KES", "GBP/GHS", "USD/NGN"], reason="Customer report #12")
            assert done.status_code == 200, done.text
            assert done.headers["cache-control"] == "no-store"
            outcomes = {item["pair"]: item["outcome"] for item in done.json()["data"]["outcomes"]}
            assert outcomes == {"USD/NGN": "changed", "USD/KES": "unchanged", "GBP/GHS": "failed"}
            served = client.get(RATE).json()["meta"]["destination_per_source"]
            assert Decimal(str(served)) == fake.rate(USD_NGN)
            fake.clear_faults()
            everything = refresh(client, operator, "*", reason="After the upstream incident")
            assert len(everything.json()["data"]["outcomes"]) == 44

            rows = audit_rows(client, operator)
            assert [row["reason"] for row in rows] == ["After the upstream incident", "Customer report #12"]
            first = rows[1]
            assert (first["actor"], first["action"]) == ("ops-alice", "refresh")
            assert first["pairs"] == ["USD/NGN", "USD/KES", "GBP/GHS"]
            assert Decimal(first["after"]["USD/NGN"]["destination_per_source"]) == fake.rate(USD_NGN)
            assert first["after"]["GBP/GHS"] == {"destination_per_source": None, "outcome": "failed"}
            assert Decimal(first["before"]["USD/NGN"]["destination_per_source"]) != fake.rate(USD_NGN)
            assert audit_rows(client, operator, limit="1") == rows[:1]
            assert audit_rows(client, operator, since=rows[0]["at"]) == rows[:1]
            metrics = client.get("/metrics").text
        assert 'fxrates_operator_actions_total{action="refresh"} 2.0' in metrics
        assert re.search(r'fxrates_auth_failures_total\{reason="forbidden"\} 2\.0', metrics)
    finally:
        replica.stop()


def test_a_key_is_counted_against_its_own_limit_not_its_address(sqlite_service: tuple[Replica, str]) -> None:
    replica, database_url = sqlite_service
    key = create_key(database_url, "mobile-app", "integrator")
    with httpx.Client(base_url=replica.url, timeout=10) as client:
        anonymous = [client.get(RATE) for _ in range(ADDRESS_LIMIT + 1)]
        assert [answer.status_code for answer in anonymous] == [200] * ADDRESS_LIMIT + [429]
        assert anonymous[0].headers["ratelimit-limit"] == str(ADDRESS_LIMIT)
        # The address is over its limit; the key is served, and its headers describe the key's window.
        keyed = [client.get(RATE, headers=bearer(key)) for _ in range(KEY_LIMIT)]
        assert {answer.status_code for answer in keyed} == {200}
        assert [answer.headers["ratelimit-limit"] for answer in keyed] == [str(KEY_LIMIT)] * KEY_LIMIT
        assert [int(answer.headers["ratelimit-remaining"]) for answer in keyed] == list(range(KEY_LIMIT - 1, -1, -1))
        over = client.get(RATE, headers=bearer(key))
        assert "with this key" in assert_error(over, 429)["message"]
        assert int(over.headers["retry-after"]) >= 1
        assert client.get(RATE).status_code == 429  # the address's own window is untouched by the key
        metrics = client.get("/metrics", headers=bearer(key)).text
    assert 'fxrates_requests_refused_total{limit="per_key"} 1.0' in metrics


def test_an_address_that_sends_ten_bad_keys_gets_429_for_any_key_until_the_minute_is_over(
    sqlite_service: tuple[Replica, str],
) -> None:
    replica, database_url = sqlite_service
    key = create_key(database_url, "ops-alice", "operator")
    with httpx.Client(base_url=replica.url, timeout=10) as client:
        assert client.get("/api/admin/audit", headers=bearer(key)).status_code == 200
        bad = [client.get(RATE, headers=bearer(f"fxr_{index:043d}")) for index in range(10)]
        assert [answer.status_code for answer in bad] == [401] * 10
        blocked = client.get("/api/admin/audit", headers=bearer(key))
        assert "bad API keys" in assert_error(blocked, 429)["message"]
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert client.get(RATE, headers=bearer("not-even-a-key")).status_code == 429
        # Without a key, the address is served under its own limit as before.
        assert client.get(RATE).status_code == 200
        metrics = client.get("/metrics").text
    assert 'fxrates_auth_failures_total{reason="bad_key"} 10.0' in metrics
    assert 'fxrates_auth_failures_total{reason="blocked"} 2.0' in metrics


def test_a_revoked_key_is_refused_by_both_replicas_sharing_postgresql(
    tmp_path: Path, fake: FakeFlutterwave, postgres_url: str
) -> None:
    key = create_key(postgres_url, "ops-alice", "operator")
    first = start_service(tmp_path, fake, postgres_url, "first")
    try:
        second = start_service(tmp_path, fake, postgres_url, "second", POLLER_ENABLED="false")
        try:
            with httpx.Client(timeout=10) as client:
                for replica in (first, second):
                    assert client.get(f"{replica.url}/api/admin/audit", headers=bearer(key)).status_code == 200
                    assert client.get(f"{replica.url}{RATE}", headers=bearer(key)).status_code == 200
                revoke_key(postgres_url, "ops-alice")
                revoked_at = time.monotonic()
                waiting = {first.url, second.url}
                # Each replica re-reads a key it holds within KEY_CACHE_TTL_S (docs/rest.md, "Keys"); the bound
                # itself is proven with a fake clock in tests/test_keyring.py, this proves the wiring.
                while waiting:
                    assert time.monotonic() - revoked_at < 30, f"still accepted by {waiting}"
                    for url in list(waiting):
                        if client.get(f"{url}/api/admin/audit", headers=bearer(key)).status_code == 401:
                            waiting.discard(url)
                    time.sleep(0.05)
                for replica in (first, second):
                    assert_error(client.get(f"{replica.url}{RATE}", headers=bearer(key)), 401)
        finally:
            second.stop()
    finally:
        first.stop()


def test_the_key_never_appears_in_the_database_a_log_line_an_answer_or_a_metric(
    tmp_path: Path, fake: FakeFlutterwave, sqlite_url: str
) -> None:
    key = create_key(sqlite_url, "ops-alice", "operator")
    integrator = create_key(sqlite_url, "mobile-app", "integrator")
    # The access log on, as JSON: every request is a line, with its path and client.
    replica = start_service(tmp_path, fake, sqlite_url, uvicorn_args=(), LOG_FORMAT="json")  # type: ignore[arg-type]
    answers: list[httpx.Response] = []
    try:
        with httpx.Client(base_url=replica.url, timeout=10) as client:
            answers.append(client.get(RATE, headers=bearer(key)))
            answers.append(refresh(client, key, ["USD/NGN"], reason="checking where keys go"))
            answers.append(client.get("/api/admin/audit", headers=bearer(key)))
            answers.append(client.get("/api/admin/audit", headers=bearer(integrator)))
            answers.append(client.get(RATE, headers=bearer(key[:-1] + ("A" if key[-1] != "A" else "B"))))
            answers.append(client.post("/api/admin/refresh", json={"pairs": "*"}, headers=bearer(key)))
            answers.append(client.get("/metrics"))
    finally:
        replica.stop()
    assert [answer.status_code for answer in answers] == [200, 200, 200, 403, 401, 422, 200]
    secret_parts = [key, key[12:], integrator, integrator[12:]]
    texts = {"log": replica.log()}
    for index, answer in enumerate(answers):
        texts[f"answer {index}"] = answer.text + json.dumps(dict(answer.headers))
    database_file = Path(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
    stored = b"".join(path.read_bytes() for path in database_file.parent.glob(database_file.name + "*"))
    assert "ops-alice" in answers[2].text and '"path": "/api/admin/refresh"' in texts["log"]
    for part in secret_parts:
        assert part.encode() not in stored
        for where, text in texts.items():
            assert part not in text, where
