"""`GET /asyncapi.json` and `GET /docs/websocket`: the WebSocket protocol, for tools and for people.

The page is rendered here from the AsyncAPI document itself, as plain HTML with one stylesheet of the
service's own: no script, nothing fetched from elsewhere, so it works on a closed network.
"""

import json
import re
from functools import cache
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from app.api.docs.asyncapi import build_asyncapi

router = APIRouter(include_in_schema=False)


# Stands for the host in the document built once; each request puts its own in (the Host it was asked on).
HOST = "\x00host\x00"


@cache
def _built(version: str, protocol: str) -> tuple[dict[str, Any], str]:
    """The document and its page, built once per process (for each of `ws` and `wss`), the host left open."""
    document = build_asyncapi(version, HOST, protocol)
    return document, render(document)


def _protocol(request: Request) -> str:
    return "wss" if request.url.scheme in ("https", "wss") else "ws"


def document_for(request: Request) -> dict[str, Any]:
    document, _ = _built(request.app.version, _protocol(request))
    servers = {name: {**server, "host": request.url.netloc} for name, server in document["servers"].items()}
    return {**document, "servers": servers}


# HEAD as well as GET, as everywhere in the service (docs/board.md).
@router.api_route("/asyncapi.json", methods=["GET", "HEAD"])
async def asyncapi_json(request: Request) -> JSONResponse:
    return JSONResponse(document_for(request))


@router.api_route("/docs/websocket", methods=["GET", "HEAD"])
async def asyncapi_page(request: Request) -> HTMLResponse:
    _, page = _built(request.app.version, _protocol(request))
    return HTMLResponse(page.replace(HOST, escape(request.url.netloc)))


def _text(text: str) -> str:
    """Escaped, with `code` spans shown as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A short, escaped description of a JSON schema's type, linking to named shapes."""
    if "$ref" in schema:
        name = escape(_ref_name(schema["$ref"]))
        return f'<a href="#schema-{name}">{name}</a>'
    if "const" in schema:
        return f"<code>{escape(json.dumps(schema['const']))}</code>"
    if "enum" in schema:
        return "one of " + ", ".join(f"<code>{escape(json.dumps(value))}</code>" for value in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    text = escape(str(kind))
    if "format" in schema:
        text += f" ({escape(schema['format'])})"
    return text


def _limits(schema: dict[str, Any]) -> str:
    words = {
        "minimum": "≥",
        "exclusiveMinimum": ">",
        "maximum": "≤",
        "exclusiveMaximum": "<",
        "minItems": "items ≥",
        "maxItems": "items ≤",
    }
    parts = [f"{sign} {schema[key]}" for key, sign in words.items() if key in schema]
    for option in schema.get("anyOf", []):
        parts.extend(f"{sign} {option[key]}" for key, sign in words.items() if key in option)
    return ", ".join(parts)


def _fields(schema: dict[str, Any]) -> str:
    properties: dict[str, Any] = schema.get("properties", {})
    if not properties:
        return ""
    required = set(schema.get("required", []))
    rows = "".join(
        f"<tr><td><code>{escape(name)}</code></td><td>{_type(field)}</td>"
        f"<td>{'yes' if name in required else 'no'}</td><td>{escape(_limits(field))}</td>"
        f"<td>{_text(field.get('description', ''))}</td></tr>"
        for name, field in properties.items()
    )
    return (
        "<table><thead><tr><th>field</th><th>type</th><th>required</th><th>limits</th><th>meaning</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _message(kind: str, message: dict[str, Any], schemas: dict[str, Any], replies: list[str]) -> str:
    schema = schemas[_ref_name(message["payload"]["$ref"])]
    parts = [f'<section id="message-{escape(kind)}"><h3><code>{escape(kind)}</code>: {escape(message["title"])}</h3>']
    if "summary" in message:
        parts.append(f"<p>{_text(message['summary'])}</p>")
    parts.append(_fields(schema))
    if replies:
        links = ", ".join(f'<a href="#message-{escape(reply)}"><code>{escape(reply)}</code></a>' for reply in replies)
        parts.append(f"<p>Answered with {links}.</p>")
    for example in message.get("examples", []):
        payload = escape(json.dumps(example["payload"], indent=1))
        parts.append(f"<p class=example>{escape(example['summary'])}</p><pre>{payload}</pre>")
    parts.append("</section>")
    return "".join(parts)


def render(document: dict[str, Any]) -> str:
    info = document["info"]
    components = document["components"]
    schemas: dict[str, Any] = components["schemas"]
    messages: dict[str, Any] = components["messages"]
    server = next(iter(document["servers"].values()))
    address = document["channels"]["rates"]["address"]
    received: list[str] = []
    sent: list[str] = []
    for operation in document["operations"].values():
        if operation["channel"]["$ref"] != "#/channels/rates":
            continue  # the same messages as server-sent events: said once, below
        kind = _ref_name(operation["messages"][0]["$ref"])
        replies = [_ref_name(reply["$ref"]) for reply in operation.get("reply", {}).get("messages", [])]
        section = received if operation["action"] == "receive" else sent
        section.append(_message(kind, messages[kind], schemas, replies))
    errors = "".join(
        f"<tr><td><code>{escape(example['payload']['code'])}</code></td>"
        f"<td>{escape(example['payload']['message'])}</td></tr>"
        for example in messages.get("error", {}).get("examples", [])
    )
    message_names = {_ref_name(message["payload"]["$ref"]) for message in messages.values()}
    shapes = "".join(
        f'<section id="schema-{escape(name)}"><h3>{escape(name)}</h3>{_fields(schema)}</section>'
        for name, schema in schemas.items()
        if name not in message_names
    )
    url = f"{server['protocol']}://{server['host']}{address}"
    events_server = document["servers"]["events"]
    events = document["channels"]["events"]
    events_url = f"{events_server['protocol']}://{events_server['host']}{events['address']}"
    streamed = ", ".join(
        f'<a href="#message-{escape(kind)}"><code>{escape(kind)}</code></a>' for kind in events["messages"]
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(info["title"])}: the WebSocket protocol</title>
<link rel="stylesheet" href="/static/docs.css">
</head>
<body>
<main>
<h1>{escape(info["title"])} <small>{escape(info["version"])}, AsyncAPI {escape(document["asyncapi"])}</small></h1>
<p>{_text(info["description"])}</p>
<p>Connect to <code>{escape(url)}</code>. The machine-readable document is
<a href="/asyncapi.json">/asyncapi.json</a>; the REST API is at <a href="/docs">/docs</a>.</p>
<p id="sse">The same stream as server-sent events: <code>GET {escape(events_url)}</code>. {_text(events["description"])}
Events: {streamed}.</p>
<nav aria-label="Contents"><ul>
<li><a href="#client">What a client sends</a></li>
<li><a href="#service">What the service sends</a></li>
<li><a href="#errors">Error codes</a></li>
<li><a href="#shapes">Shapes</a></li>
</ul></nav>
<h2 id="client">What a client sends</h2>
{"".join(received)}
<h2 id="service">What the service sends</h2>
{"".join(sent)}
<h2 id="errors">Error codes</h2>
<table><thead><tr><th>code</th><th>example message</th></tr></thead><tbody>{errors}</tbody></table>
<h2 id="shapes">Shapes</h2>
{shapes}
</main>
</body>
</html>
"""
