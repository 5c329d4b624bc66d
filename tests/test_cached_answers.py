"""What is built once and what is kept (docs/operations.md): the OpenAPI and AsyncAPI documents once per process,
a history answer until its pair next changes, on this replica or any other."""

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx

from app.api.docs import asyncapi_page
from app.api.history_answers import HistoryAnswers
from app.currencies import Pair
from app.main import create_app
from app.settings import Settings
from tests.conftest import running_app
from tests.support.fake_flutterwave import FakeFlutterwave

USD_NGN = Pair("USD", "NGN")
HISTORY = "/api/rates/history?source_currency=USD&destination_currency=NGN&since=2020-01-01T00:00:00Z&limit=500"


async def poll(state: dict[str, Any]) -> None:
    report = await state["services"].poller.run_cycle()
    assert report.failed == 0


def values(answer: httpx.Response) -> list[Decimal]:
    return [Decimal(str(point["destination_per_source"])) for point in answer.json()["data"]["points"]]


async def test_a_history_answer_is_kept_until_the_pair_changes_here(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings()) as (client, state):
        answers: HistoryAnswers = state["services"].history_answers
        await poll(state)
        first = await client.get(HISTORY)
        again = await client.get(HISTORY)
        as_csv = await client.get(HISTORY, headers={"Accept": "text/csv"})
        csv_again = await client.get(HISTORY, headers={"Accept": "text/csv"})
        assert answers.hits == 2
        assert again.content == first.content and again.headers["vary"] == first.headers["vary"]
        assert csv_again.content == as_csv.content and csv_again.headers["content-type"].startswith("text/csv")
        assert csv_again.headers["content-disposition"] == as_csv.headers["content-disposition"]

        fake.bump(USD_NGN, Decimal("1.01"))
        await poll(state)
        changed = await client.get(HISTORY)
        csv_changed = await client.get(HISTORY, headers={"Accept": "text/csv"})
        # Another pair's change leaves this pair's answer where it was.
        fake.bump(Pair("USD", "KES"), Decimal("1.01"))
        await poll(state)
        unchanged = await client.get(HISTORY)
    assert values(changed) == [*values(first), fake.rate(USD_NGN)]
    assert len(csv_changed.text.splitlines()) == len(as_csv.text.splitlines()) + 1
    assert unchanged.content == changed.content and answers.hits == 3


async def test_a_history_answer_shows_a_change_stored_by_another_replica_at_once(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings], postgres_url: str
) -> None:
    # No Redis: no event can tell this replica; the answer must still be new at once.
    settings = make_settings(database_url=postgres_url)
    async with running_app(settings) as (reader, reader_state), running_app(settings) as (_, writer_state):
        await poll(writer_state)
        before = await reader.get(HISTORY)
        assert (await reader.get(HISTORY)).content == before.content
        assert reader_state["services"].history_answers.hits == 1
        fake.bump(USD_NGN, Decimal("1.02"))
        await poll(writer_state)
        after = await reader.get(HISTORY)
    assert values(after) == [*values(before), fake.rate(USD_NGN)]


async def test_the_api_documents_are_built_once_per_process(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    assert app.openapi() is app.openapi()

    async with running_app(make_settings()) as (client, _):
        await client.get("/asyncapi.json")
        await client.get("/docs/websocket")
        built = asyncapi_page._built.cache_info().misses
        documents = [(await client.get("/asyncapi.json", headers={"Host": f"h{n}.example"})).json() for n in range(5)]
        pages = [(await client.get("/docs/websocket", headers={"Host": f"h{n}.example"})).text for n in range(5)]
        assert asyncapi_page._built.cache_info().misses == built
    # Each answer still names the host it was asked on.
    assert [document["servers"]["service"]["host"] for document in documents] == [f"h{n}.example" for n in range(5)]
    assert all(f"ws://h{n}.example/ws/rates" in page and "\x00" not in page for n, page in enumerate(pages))
