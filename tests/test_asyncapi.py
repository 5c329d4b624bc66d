"""The AsyncAPI document of `/ws/rates` and `/sse/rates`: valid for the official parser, and true to what the endpoint
accepts and sends, checked on a live service."""

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from app.api.docs.asyncapi import REPLY_ONLY, error_codes, message_type
from app.api.ws import CLIENT_MESSAGES, ClientMessage
from app.currencies import Pair
from app.rates.wire import SERVER_FRAMES
from tests.support.openapi_service import LiveService, live_service_on
from tests.support.sse_client import SseClient
from tests.support.ws_client import WsClient

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NPM_TOOLS = ROOT / "tools" / "npm"
# Error codes the model declares that this service has no way to make here, each with its reason.
# Frames this test's service never sends, each with its reason.
FRAMES_NOT_PROVOKED = {
    "heartbeat": "it polls every half second and every client gets each all_rates_update: none is ever quiet; "
    "tests/test_ws_resume.py gets heartbeats from a quiet service",
}
CODES_NOT_PROVOKED = {
    "too_large": "declared, but a frame over 64 KiB closes the connection with 1009 instead of an error frame",
    "try_again_later": "needs the deployment's on-demand budget spent; tests/test_limits_replicas.py provokes it",
    "withheld": "needs a pair withheld by an operator; tests/test_corridors.py provokes it",
}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    # Polls every half second, so pushed updates arrive while a test listens. A client's message allowance
    # (docs/limits.md) hardly refills, so going past it does not depend on how fast this machine is.
    with live_service_on(
        tmp_path_factory.mktemp("asyncapi"),
        POLL_INTERVAL_SECONDS="0.5",
        WS_MESSAGES_PER_SECOND="0.01",
        WS_MESSAGE_BURST="30",
        # The examples subscribe two pairs at most; three are enough to go past.
        WS_MAX_PAIRS_PER_CLIENT="2",
    ) as service:
        yield service


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


@pytest.fixture(scope="module")
def document(live: LiveService) -> dict[str, Any]:
    status, headers, body = fetch(f"{live.url}/asyncapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    loaded: dict[str, Any] = json.loads(body)
    return loaded


def documented(document: dict[str, Any], action: str) -> set[str]:
    return {
        operation["messages"][0]["$ref"].rsplit("/", 1)[-1]
        for operation in document["operations"].values()
        if operation["action"] == action
    }


def validator(document: dict[str, Any], message_type: str) -> Draft202012Validator:
    payload_ref = document["components"]["messages"][message_type]["payload"]["$ref"]
    return Draft202012Validator({"$ref": payload_ref, "components": document["components"]})


def model_of(kind: str) -> type[BaseModel]:
    return {message_type(model): model for model in (*CLIENT_MESSAGES, *SERVER_FRAMES)}[kind]


def test_the_official_parser_finds_nothing(document: dict[str, Any], tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "Node 20 is needed: tools/test.sh installs it"
    assert (NPM_TOOLS / "node_modules" / "@asyncapi" / "parser").is_dir(), "run `npm ci` in tools/npm (.ci/run does)"
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(document))
    result = subprocess.run(
        [node, str(NPM_TOOLS / "validate-asyncapi.mjs"), str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert document["asyncapi"] == "3.0.0"


def test_the_document_names_exactly_what_the_parser_accepts(document: dict[str, Any]) -> None:
    # The discriminated union the endpoint parses with, read from its own schema.
    accepted = set(ClientMessage.json_schema()["discriminator"]["mapping"])
    assert documented(document, "receive") == accepted == {message_type(model) for model in CLIENT_MESSAGES}
    assert documented(document, "send") == {message_type(model) for model in SERVER_FRAMES}


def admin_post(url: str, body: dict[str, Any], key: str) -> None:
    data = json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as answer:
        assert answer.status == 200


def test_every_message_has_examples_that_its_model_and_schema_accept(document: dict[str, Any]) -> None:
    for kind, message in document["components"]["messages"].items():
        examples = message.get("examples", [])
        assert examples, f"{kind} has no example"
        check = validator(document, kind)
        for example in examples:
            payload = example["payload"]
            check.validate(payload)
            model = model_of(kind)
            assert set(payload) <= set(model.model_fields), f"{kind} example has unknown fields"
            if model in CLIENT_MESSAGES:
                assert isinstance(ClientMessage.validate_python(payload), model)
            else:
                model.model_validate(payload)
    error_examples = {e["payload"]["code"] for e in document["components"]["messages"]["error"]["examples"]}
    assert error_examples == set(error_codes()), "every error code has its example"


async def frames_until(
    client: WsClient, wanted: set[str], seen: list[dict[str, Any]], codes: frozenset[str] = frozenset()
) -> None:
    """Receive into `seen` until every type in `wanted`, and an error with each of `codes`, arrived (30 s at most)."""
    deadline = time.monotonic() + 30

    def missing() -> set[str]:
        types = {frame["type"] for frame in seen}
        errors = {frame["code"] for frame in seen if frame["type"] == "error"}
        return (wanted - types) | {f"error {code}" for code in codes - errors}

    while missing():
        assert time.monotonic() < deadline, f"never sent: {missing()}"
        seen.append(await client.recv(timeout_s=15))


async def test_what_the_endpoint_sends_is_what_the_document_says(live: LiveService, document: dict[str, Any]) -> None:
    live.fake.fail("400", pairs=[Pair("USD", "XTS")])
    client_examples = [
        example["payload"]
        for kind in sorted(documented(document, "receive"))
        for example in document["components"]["messages"][kind]["examples"]
    ]
    sends = documented(document, "send")
    batch = "rates_update" in sends
    codes_documented = set(error_codes())
    seen: list[dict[str, Any]] = []
    async with WsClient(live.ws_url) as client:
        seen.append(await client.recv())
        for payload in client_examples:
            await client.send(payload)
        await client.send({"type": "get_rate", "source_currency": "USD", "destination_currency": "XTS"})
        await client.send('{"type": "what is this"}')
        # Back to every pair, every move, one frame per update (the examples above asked otherwise).
        await client.send(
            {"type": "subscribe", "pairs": ["*"], "min_change_bps": 0, **({"batch": False} if batch else {})}
        )
        if "corridor" in sends:
            # An operator pauses a pair and resumes it: every client following it is told each time.
            for action in ("pause", "resume"):
                url = f"{live.url}/api/admin/corridors/USD/NGN/{action}"
                await asyncio.to_thread(admin_post, url, {"reason": "asyncapi test"}, live.operator_key)
        await frames_until(
            client,
            sends - {"rates_update", "resumed", *FRAMES_NOT_PROVOKED},
            seen,
            frozenset({"bad_request", "not_found"}),
        )
    if batch:
        async with WsClient(live.ws_url) as client:
            await client.send({"type": "subscribe", "pairs": ["*"], "batch": True})
            await frames_until(client, {"rates_update"}, seen)
    if "resumed" in sends:
        # A resume from the snapshot's seq (the service waits briefly for the events up to it to arrive).
        async with WsClient(live.ws_url) as client:
            first = await client.recv()
        async with WsClient(f"{live.ws_url}?epoch={first['epoch']}&seq={first['seq']}") as client:
            seen.append(await client.recv())
        async with WsClient(f"{live.ws_url}?epoch=another&seq={first['seq']}") as client:
            seen.append(await client.recv())
    if "too_many_pairs" in codes_documented:
        async with WsClient(live.ws_url) as client:
            await client.send({"type": "subscribe", "pairs": ["USD/NGN", "USD/KES", "USD/GHS"]})
            too_many, _ = await client.recv_until(lambda frame: frame.get("code") == "too_many_pairs")
            seen.append(too_many)
    if "rate_limited" in codes_documented:
        async with WsClient(live.ws_url) as client:
            # Past the burst of 30, short of what gets a client closed: the excess is refused.
            for _ in range(40):
                await client.send({"type": "ping"})
            limited, _ = await client.recv_until(lambda frame: frame.get("code") == "rate_limited")
            seen.append(limited)
    for frame in seen:
        assert frame["type"] in sends, f"undocumented frame {frame}"
        validator(document, frame["type"]).validate(frame)
    assert {frame["type"] for frame in seen} == sends - set(FRAMES_NOT_PROVOKED)
    codes = {frame["code"] for frame in seen if frame["type"] == "error"}
    assert set(document["components"]["schemas"]["ErrorFrame"]["properties"]["code"]["enum"]) == codes_documented
    assert codes_documented - codes == set(CODES_NOT_PROVOKED) & codes_documented


def test_the_page_renders_the_document_with_no_external_asset(live: LiveService, document: dict[str, Any]) -> None:
    status, headers, body = fetch(f"{live.url}/docs/websocket")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    for kind in document["components"]["messages"]:
        assert f'id="message-{kind}"' in page
    for code in error_codes():
        assert f"<code>{code}</code>" in page
    assert "http://" not in page.replace(live.url, "") and "https://" not in page and "<script" not in page
    assert fetch(f"{live.url}/static/docs.css")[0] == 200


def test_the_events_channel_lists_every_pushed_frame_with_the_query_binding(document: dict[str, Any]) -> None:
    events = document["channels"]["events"]
    assert events["address"] == "/sse/rates"
    assert document["servers"]["events"]["protocol"] == "http"
    pushed = {message_type(model) for model in SERVER_FRAMES} - REPLY_ONLY
    assert set(events["messages"]) == pushed
    streamed = [op for op in document["operations"].values() if op["channel"]["$ref"] == "#/channels/events"]
    assert {op["messages"][0]["$ref"].rsplit("/", 1)[-1] for op in streamed} == pushed
    assert all(op["action"] == "send" and op["bindings"]["http"]["method"] == "GET" for op in streamed)
    assert set(streamed[0]["bindings"]["http"]["query"]["properties"]) == {"pairs", "min_change_bps", "batch"}


async def test_what_the_event_stream_sends_is_what_the_document_says(
    live: LiveService, document: dict[str, Any]
) -> None:
    listed = set(document["channels"]["events"]["messages"])
    seen: dict[str, dict[str, Any]] = {}
    wanted = ({"all_rates", "rate_update", "all_rates_update"}, {"rates_update"})
    for query, kinds in zip(({}, {"batch": "true"}), wanted, strict=True):
        async with SseClient(f"{live.url}/sse/rates", query) as stream:
            async with asyncio.timeout(30):
                while not kinds <= set(seen):
                    event = await stream.next()
                    assert event.type in listed, f"undocumented event {event.type}"
                    validator(document, event.type).validate(event.json())
                    seen[event.type] = event.json()
    # Not provoked here: `resumed` needs a Last-Event-ID, `corridor` an operator (both checked over WebSocket above).
    assert set(seen) == listed - {"resumed", "corridor", *FRAMES_NOT_PROVOKED}
