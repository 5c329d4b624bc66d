"""The AsyncAPI 3.0 document of `/ws/rates` and `/sse/rates`, made from the models the endpoints parse and send.

Client messages are `app.api.ws.CLIENT_MESSAGES`, server frames `app.rates.wire.SERVER_FRAMES`: a message
added there is in the document at once, and tests/test_asyncapi.py holds the two to what the endpoint really
accepts and sends. The document describes the service, so `receive` operations are what clients send and
`send` operations what the service sends them. `GET /asyncapi.json` serves it, `GET /docs/websocket`
renders it for people (app/api/docs/asyncapi_page.py).

`/sse/rates` (app/api/sse.py) is a second channel on a second server (http or https): the service sends every
pushed frame there as an event named by its `type`, and nothing is received; its query parameters are the
operations' HTTP binding. Replies to a client's own messages (`REPLY_ONLY`) never go there; any other frame the
hub sends is an event at once, so a frame added to `SERVER_FRAMES` is listed on both channels.
"""

from typing import Any, Literal, get_args

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.ws import CLIENT_MESSAGES
from app.rates.wire import SERVER_FRAMES, ErrorFrame

ADDRESS = "/ws/rates"
SSE_ADDRESS = "/sse/rates"
# Frames that only answer a client's own message: a stream of server-sent events has no messages to answer.
REPLY_ONLY = frozenset({"rate", "subscribed", "pong", "error"})
# The query of `GET /sse/rates` (app/api/sse.py), as the HTTP binding of each of its operations.
SSE_QUERY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "string",
            "description": 'Comma-separated pairs like "USD/NGN,GBP/KES" (any case), or "*": the pairs whose updates '
            "are sent (default: every pair; at most WS_MAX_PAIRS_PER_CLIENT)",
        },
        "min_change_bps": {
            "type": "number",
            "minimum": 0,
            "maximum": 1_000_000,
            "description": "As subscribe's min_change_bps; default 0",
        },
        "batch": {
            "type": "boolean",
            "description": "true: rates_update events instead of rate_update; default false",
        },
    },
}
_RATE_ITEM = {
    "source_currency": "USD",
    "destination_currency": "NGN",
    "rate": 0.00065348,
    "source_amount": 0.65348,
    "destination_amount": 1000,
    "destination_per_source": 1530.25,
    "last_updated": "2026-11-24T10:00:00Z",
    "stale": False,
    "provider": "flutterwave",
}
_AS_OF = "2026-11-24T10:00:01Z"
_EPOCH = "3f9c2b7e51d04a6c8e2f1a9b7c5d3e10"

# Examples by message type: (name, summary, payload). Each is checked against its model by the tests.
EXAMPLES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "get_all_rates": [("get_all_rates", "Ask for every stored rate again", {"type": "get_all_rates"})],
    "get_rate": [
        (
            "get_rate",
            "Ask for one pair (any ISO 4217 pair: one outside the polled set is fetched on demand)",
            {"type": "get_rate", "source_currency": "USD", "destination_currency": "NGN"},
        )
    ],
    "subscribe": [
        (
            "some_pairs",
            "Only these pairs from now on, and only moves of at least 25 basis points",
            {"type": "subscribe", "pairs": ["USD/NGN", "GBP/KES"], "min_change_bps": 25},
        ),
        ("everything", 'Every pair again ("*")', {"type": "subscribe", "pairs": ["*"]}),
        (
            "batch",
            "Batch mode: every pair, as `rates_update` frames holding all that is due since the last frame",
            {"type": "subscribe", "pairs": ["*"], "batch": True},
        ),
        (
            "per_pair",
            "Back to one `rate_update` frame per update",
            {"type": "subscribe", "pairs": ["*"], "batch": False},
        ),
    ],
    "unsubscribe": [("unsubscribe", "Stop the updates of a pair", {"type": "unsubscribe", "pairs": ["GBP/KES"]})],
    "ping": [("ping", "Is the connection alive?", {"type": "ping"})],
    "all_rates": [
        (
            "snapshot",
            "Sent at once on connect, and in answer to get_all_rates",
            {"type": "all_rates", "rates": [_RATE_ITEM], "as_of": _AS_OF, "epoch": _EPOCH, "seq": 4181},
        ),
        (
            "not_resumed",
            "Sent on connect to a client that asked to resume from a point that cannot be resumed from",
            {
                "type": "all_rates",
                "rates": [_RATE_ITEM],
                "as_of": _AS_OF,
                "epoch": _EPOCH,
                "seq": 4181,
                "resumed": False,
            },
        ),
    ],
    "resumed": [
        (
            "resumed",
            "Sent on connect to `/ws/rates?epoch=E&seq=N` in place of the snapshot: every pair stored after N",
            {
                "type": "resumed",
                "epoch": _EPOCH,
                "seq": 4190,
                "rates": [{**_RATE_ITEM, "previous_rate": 0.00065412, "seq": 4188}],
            },
        )
    ],
    "heartbeat": [
        (
            "heartbeat",
            "Sent to a client that was sent nothing for WS_HEARTBEAT_SECONDS",
            {"type": "heartbeat", "epoch": _EPOCH, "seq": 4190},
        )
    ],
    "rate": [("rate", "The answer to get_rate", {"type": "rate", "rate": _RATE_ITEM})],
    "subscribed": [
        (
            "subscribed",
            "The answer to subscribe and unsubscribe: every pair now subscribed",
            {"type": "subscribed", "pairs": ["GBP/KES", "USD/NGN"], "min_change_bps": 25},
        )
    ],
    "pong": [("pong", "The answer to ping", {"type": "pong"})],
    "rate_update": [
        (
            "rate_update",
            "A rate was stored (by the poller or on demand), on any replica",
            {"type": "rate_update", "rate": _RATE_ITEM, "previous_rate": 0.00065412, "seq": 4182},
        )
    ],
    "rates_update": [
        (
            "rates_update",
            "Batch mode: every update this client was due since its last frame, the newest per pair",
            {
                "type": "rates_update",
                "rates": [{**_RATE_ITEM, "previous_rate": 0.00065412, "seq": 4182}],
                "as_of": _AS_OF,
                "seq": 4182,
            },
        )
    ],
    "all_rates_update": [
        (
            "all_rates_update",
            "A poll cycle ended",
            {"type": "all_rates_update", "as_of": _AS_OF, "count": 44, "changed": 12},
        )
    ],
    "corridor": [
        (
            "paused",
            "An operator paused a pair this client follows: its last rate is still served, not fetched any more",
            {
                "type": "corridor",
                "pair": "USD/NGN",
                "state": "paused",
                "reason": "Flutterwave suspended NGN payouts",
                "since": _AS_OF,
            },
        ),
        (
            "withheld",
            "An operator withheld a pair: drop it, it is not served until resumed",
            {"type": "corridor", "pair": "USD/NGN", "state": "withheld", "reason": "Wrong rates", "since": _AS_OF},
        ),
        (
            "active",
            "Resumed: fetched and served again",
            {"type": "corridor", "pair": "USD/NGN", "state": "active", "reason": "Upstream fixed", "since": _AS_OF},
        ),
    ],
}
ERROR_MESSAGES: dict[str, str] = {
    "bad_request": "pairs: List should have at least 1 item after validation",
    "not_found": "No rate for USD/XTS is available.",
    "too_large": "The frame is larger than 64 KiB.",
    "rate_limited": "Too many messages; slow down.",
    "try_again_later": "Too many pairs outside the polled set were asked for; try again in 30 seconds.",
    "withheld": "USD/NGN is withheld by the operator and not served now: Wrong rates reported",
    "too_many_pairs": (
        "A client may be subscribed to at most 256 pairs at once; this would make 300. "
        'Unsubscribe from some first, or subscribe to "*" (every pair).'
    ),
}
# What each client message is answered with (the service's `reply` in AsyncAPI terms).
REPLIES: dict[str, list[str]] = {
    "get_all_rates": ["all_rates"],
    "get_rate": ["rate", "error"],
    "subscribe": ["subscribed", "error"],
    "unsubscribe": ["subscribed", "error"],
    "ping": ["pong"],
}
TITLES: dict[str, str] = {
    "all_rates": "Every stored rate (the snapshot)",
    "rate_update": "One rate, pushed when stored",
    "rates_update": "Updates in batch mode",
    "all_rates_update": "A poll cycle ended",
    "resumed": "What changed while the client was away (a resume)",
    "heartbeat": "Nothing was sent for a while: the connection is alive",
    "error": "An error; the connection stays open",
    "corridor": "An operator changed a pair's corridor",
}

# What each field means, added to the generated schemas (a field the models describe themselves keeps theirs).
FIELDS: dict[str, str] = {
    "type": "What the message is",
    "source_currency": "ISO 4217 code of what the sender pays in (any case when sent, upper-case from the service)",
    "destination_currency": "ISO 4217 code of what the recipient gets",
    "pairs": 'Pairs like "USD/NGN" (any case), or "*" for every pair',
    "min_change_bps": "Send a pair's update only when destination_per_source moved at least this many basis points "
    "from the last value this client was sent for it; default 0",
    "batch": "true: updates come as rates_update frames (many pairs in one) instead of one rate_update each; "
    "false: back to rate_update",
    "rate": "Source units per destination unit (Flutterwave's orientation)",
    "rates": "Rate items",
    "source_amount": "What the sender pays for destination_amount, in the source currency",
    "destination_amount": "What the recipient gets, in the destination currency",
    "destination_per_source": "Destination units per source unit: the figure people usually quote",
    "last_updated": "When the service received the upstream's answer for this rate",
    "stale": "True once the rate is older than RATE_STALE_AFTER_SECONDS",
    "provider": "flutterwave, demo for simulated rates, or manual for an operator's override",
    "previous_rate": "The rate stored before this one (same orientation as rate); null for a first value",
    "as_of": "When the service made this frame",
    "count": "Pairs stored after the poll cycle",
    "changed": "Pairs whose value changed in the poll cycle",
    "seq": "Sequence number: every store of a rate in the deployment gets one, higher than every store's before "
    "it. On rate_update and an item of rates_update: that store's; on rates_update: the highest of its items; "
    "on all_rates: every store up to it is in the snapshot",
    "epoch": "Names the deployment's history (changes only when it is lost, e.g. a new database); sequence numbers "
    "are compared only within one epoch. Never contains ':'",
    "code": "What went wrong, for programs",
    "pair": "SOURCE/DESTINATION, upper-case",
    "state": "active (fetched and served), paused (served, marked, not fetched) or withheld (not served)",
    "reason": "Why, as the operator said",
    "since": "When the operator set this state",
    "corridor": "Present only while the pair is paused: state, reason, since",
    "message": "What went wrong, for people",
}


def message_type(model: type[BaseModel]) -> str:
    """The `type` a message of this model carries: the one value of its `type` literal."""
    (value,) = get_args(model.model_fields["type"].annotation)
    return str(value)


def error_codes() -> list[str]:
    return [str(code) for code in get_args(ErrorFrame.model_fields["code"].annotation)]


def _examples(kind: str) -> list[dict[str, Any]]:
    if kind == "error":
        return [
            {
                "name": code,
                "summary": f"Error `{code}`",
                "payload": {"type": "error", "code": code, "message": ERROR_MESSAGES.get(code, "…")},
            }
            for code in error_codes()
        ]
    return [{"name": name, "summary": summary, "payload": payload} for name, summary, payload in EXAMPLES.get(kind, [])]


def _message(model: type[BaseModel], kind: str, payload_ref: str) -> dict[str, Any]:
    description = (model.__doc__ or "").strip()
    message: dict[str, Any] = {
        "name": kind,
        "title": TITLES.get(kind, kind.replace("_", " ").capitalize()),
        "contentType": "application/json",
        "payload": {"$ref": payload_ref},
        "examples": _examples(kind),
    }
    if description and not description.startswith(model.__name__ + "("):  # pydantic's default docstring
        message["summary"] = description.splitlines()[0]
    return message


def _schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((model, "validation") for model in CLIENT_MESSAGES),
        *((model, "serialization") for model in SERVER_FRAMES),
    ]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = top.get("$defs", {})
    for schema in schemas.values():
        for name, field in schema.get("properties", {}).items():
            if name in FIELDS:
                field.setdefault("description", FIELDS[name])
    return schemas


def build_asyncapi(version: str, host: str, protocol: str) -> dict[str, Any]:
    schemas = _schemas()
    messages: dict[str, Any] = {}
    received: list[str] = []
    sent: list[str] = []
    for models, names in ((CLIENT_MESSAGES, received), (SERVER_FRAMES, sent)):
        for model in models:
            kind = message_type(model)
            messages[kind] = _message(model, kind, f"#/components/schemas/{model.__name__}")
            names.append(kind)

    def ref(kind: str) -> dict[str, str]:
        return {"$ref": f"#/channels/rates/messages/{kind}"}

    operations: dict[str, Any] = {}
    for kind in received:
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": "#/channels/rates"},
            "title": f"Client sends {kind}",
            "messages": [ref(kind)],
        }
        if kind in REPLIES:
            operation["reply"] = {
                "channel": {"$ref": "#/channels/rates"},
                "messages": [ref(reply) for reply in REPLIES[kind] if reply in sent],
            }
        operations[f"receive_{kind}"] = operation
    for kind in sent:
        operations[f"send_{kind}"] = {
            "action": "send",
            "channel": {"$ref": "#/channels/rates"},
            "title": f"Service sends {kind}",
            "messages": [ref(kind)],
        }
    streamed = [kind for kind in sent if kind not in REPLY_ONLY]
    for kind in streamed:
        operations[f"stream_{kind}"] = {
            "action": "send",
            "channel": {"$ref": "#/channels/events"},
            "title": f"Service streams {kind}",
            "summary": f"An event named {kind}, its data the frame's JSON",
            "messages": [{"$ref": f"#/channels/events/messages/{kind}"}],
            "bindings": {"http": {"method": "GET", "query": SSE_QUERY, "bindingVersion": "0.3.0"}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "fxrates WebSocket",
            "version": version,
            "description": (
                "Real-time exchange rates over one WebSocket, `/ws/rates` (also `/ws/rates/`). JSON text frames. "
                "On connect the service sends `all_rates` at once (or, to `/ws/rates?epoch=E&seq=N`, `resumed`: "
                "only what changed after N, or `all_rates` with `resumed: false` when N cannot be resumed from); "
                "then every stored rate is pushed as a `rate_update` (or, after `subscribe` with `batch`, as "
                "`rates_update` frames), conflated per pair "
                "so a client never falls behind. Errors are `error` frames and the connection stays open. "
                "Close codes: 1008 a client that keeps sending past its message rate, 1009 a frame over 64 KiB, "
                "1012 the service is restarting, 1013 too many clients or a client that stopped reading. "
                "A client sent nothing for WS_HEARTBEAT_SECONDS (25) gets a `heartbeat`; two missed mean the "
                "connection is dead. "
                "The same stream is served as server-sent events at `/sse/rates` (the `events` channel) for "
                "clients that cannot hold a WebSocket. The reference is docs/websocket.md and docs/sse.md in "
                "the project."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "service": {
                "host": host,
                "protocol": protocol,
                "description": "The service that served this document",
            },
            "events": {
                "host": host,
                "protocol": "https" if protocol == "wss" else "http",
                "description": "The same service, for server-sent events",
            },
        },
        "channels": {
            "rates": {
                "address": ADDRESS,
                "title": "Rates",
                "description": "Every message of the protocol travels on this one socket.",
                "messages": {kind: {"$ref": f"#/components/messages/{kind}"} for kind in messages},
                "servers": [{"$ref": "#/servers/service"}],
            },
            "events": {
                "address": SSE_ADDRESS,
                "title": "Rates as server-sent events",
                "description": (
                    "`GET /sse/rates`, answered `text/event-stream`: one event per frame the WebSocket would push, "
                    "its `event` the frame's `type`, its `data` the frame's JSON, and `id: <epoch>:<seq>` when the "
                    'frame carries a `seq`. First `all_rates` (preceded by `retry: 3000`; with `"resumed": '
                    "false` when the client sent `Last-Event-ID`), then the pushed frames. A bad query is a 422, "
                    "no room for another client (the WebSocket's limits, one pool for both) a 503 with "
                    "`Retry-After`, both in the REST error envelope, before any event."
                ),
                "messages": {kind: {"$ref": f"#/components/messages/{kind}"} for kind in streamed},
                "servers": [{"$ref": "#/servers/events"}],
            },
        },
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
