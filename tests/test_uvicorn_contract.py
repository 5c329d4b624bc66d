"""What app.live.protocol relies on in uvicorn's websockets-sansio protocol, checked on the uvicorn installed.

uvicorn does not document `WebSocketsSansIOProtocol` as a class to subclass, so any release may rename its
attributes or reorder its handshake. pyproject.toml pins the releases tested (`TESTED_UVICORN`) and this module is
what "tested" means: it names every attribute the subclass uses and every method it overrides, and fails naming
what moved. The order the subclass assumes, checked on a real connection over loopback:

1. `__init__` builds `conn` (websockets' `ServerProtocol`), so the subclass can replace `conn.available_extensions`
   after `super().__init__()`: the handshake reads them later.
2. `connection_made` sets `transport` and `client`.
3. The handshake request: `handle_connect` has `conn` accept it (permessage-deflate negotiated, `conn.extensions`
   final), sets `scope` (with an `extensions` dict), then starts `run_asgi` as a task: the subclass offers its
   writers from there.
4. `websocket.accept`: `send` writes the 101 response and sets `handshake_complete` (frames may follow it).
   `pause_writing`/`resume_writing` clear and set `writable`.
5. `websocket.close`: `send` sets `close_sent` and `close_timer`; `run_asgi` then returns without closing the
   transport, which is when the subclass starts its own timer, `close_timeout` long.
6. `connection_lost` sets `disconnected` and `writable` (a writer waiting wakes and raises `ClientDisconnected`,
   which `run_asgi` swallows quietly).

When the subclass starts using another attribute of uvicorn's, `test_the_contract_names_everything_the_subclass_uses`
fails until it is named here.
"""

import ast
import asyncio
import inspect
import logging
import socket
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory, PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

import app.live.protocol
from app.live.frames import Outgoing
from app.live.protocol import TESTED_UVICORN, WebSocketProtocol, prepared_frames, warn_if_untested_uvicorn
from app.storage.engine import PROJECT_ROOT

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

UVICORN = f"uvicorn {uvicorn.__version__}"
BASE = "WebSocketsSansIOProtocol"

# Every attribute of uvicorn's the subclass reads or writes on `self`, and what for.
RELIED_ON = {
    "config": "__init__ reads config.ws_per_message_deflate to offer its own permessage-deflate",
    "conn": "websockets' ServerProtocol: __init__ replaces conn.available_extensions, run_asgi reads "
    "conn.extensions (as negotiated), the writers read conn.state",
    "scope": "run_asgi adds the prepared-frames writers to scope['extensions']",
    "loop": "run_asgi schedules the reset of a stuck connection with loop.call_later",
    "close_timeout": "how long after the application is done a stuck connection is reset",
    "disconnected": "the writers refuse, and the reset is skipped, once connection_lost has run",
    "close_sent": "the writers refuse once websocket.close has been sent",
    "handshake_complete": "the writers refuse before the 101 response has been written",
    "writable": "the transport's flow control: send_prepared waits on it, write_now checks it",
    "transport": "frames are written to it; the reset reads its buffer size and socket and aborts it",
    "app_state": "the reset counts in the lifespan state's metrics",
    "client": "the reset logs the peer's address",
    "queue": "handle_parser_exception hands the application its websocket.disconnect, as uvicorn's own does",
    "read_paused": "handle_parser_exception resumes reading, so what the client still sends is read and dropped",
    "close_timer": "handle_parser_exception closes the transport after close_timeout, as uvicorn's own does",
}
# uvicorn's methods the subclass overrides, with what it assumes of them.
OVERRIDDEN = {
    "__init__": "called by keyword (config, server_state, app_state) by uvicorn's HTTP protocols on an upgrade",
    "run_asgi": "a coroutine without arguments, run as a task once the handshake request is accepted",
    "connection_lost": "called with the exception (or None) when the transport is gone",
    "handle_connect": "called with websockets' Request once it is parsed, before the application runs; sets scope",
    "handle_text": "called with each text frame (fragments too) websockets parsed",
    "handle_bytes": "called with each binary frame (fragments too) websockets parsed",
    "handle_cont": "called with each continuation frame websockets parsed",
    "handle_ping": "called, without arguments, for each ping websockets answered",
    "handle_pong": "called with each pong frame",
    "handle_parser_exception": "called when websockets failed the connection (1009, 1002, ...), with the close "
    "frame in conn.data_to_send(); again for each read that follows",
}
FRAME_TEXT = "contract"


def subclass_source() -> ast.ClassDef:
    tree = ast.parse(Path(app.live.protocol.__file__).read_text())
    (found,) = (node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "WebSocketProtocol")
    return found


def defined_by_subclass(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def used_on(cls: ast.ClassDef, owner: Callable[[ast.expr], bool]) -> set[str]:
    return {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute) and owner(node.value)}


def names(attributes: set[str]) -> str:
    return ", ".join(f"self.{name}" for name in sorted(attributes))


def is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def is_super(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


# The contract, read off the code


def test_the_contract_names_everything_the_subclass_uses() -> None:
    cls = subclass_source()
    own = defined_by_subclass(cls)
    inherited = used_on(cls, is_self) - own
    unnamed, stale = inherited - RELIED_ON.keys(), RELIED_ON.keys() - inherited
    assert not unnamed, f"app/live/protocol.py now uses uvicorn's {names(unnamed)}: name it in RELIED_ON"
    assert not stale, f"app/live/protocol.py no longer uses {names(stale)}: drop it from RELIED_ON"
    overrides = {name for name in own if hasattr(WebSocketsSansIOProtocol, name)}
    gone = {name: why for name, why in OVERRIDDEN.items() if name not in overrides}
    assert not gone, f"{UVICORN}: {BASE} no longer has " + "; ".join(f"`{n}` ({w})" for n, w in gone.items())
    clashes = overrides - OVERRIDDEN.keys()
    assert not clashes, (
        f"{UVICORN}: {BASE} now has {sorted(clashes)}, which app/live/protocol.py defines too: rename ours, "
        "or name it in OVERRIDDEN if the subclass means to override it"
    )
    extended = used_on(cls, is_super)
    assert extended <= OVERRIDDEN.keys(), f"the subclass calls super().{sorted(extended - OVERRIDDEN.keys())}"


def test_the_subclass_is_uvicorns_websockets_sansio_protocol() -> None:
    assert WebSocketProtocol.__bases__ == (WebSocketsSansIOProtocol,)
    assert issubclass(WebSocketsSansIOProtocol, asyncio.Protocol), f"{UVICORN}: {BASE} is no asyncio.Protocol"
    assert issubclass(ClientDisconnected, Exception), f"{UVICORN}: ClientDisconnected is no longer an Exception"


def test_the_methods_the_subclass_overrides_keep_their_signatures() -> None:
    init = inspect.signature(WebSocketsSansIOProtocol.__init__).parameters
    for name in ("config", "server_state", "app_state"):
        assert name in init, f"{UVICORN}: {BASE}.__init__ takes no `{name}` ({OVERRIDDEN['__init__']})"
        assert init[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{UVICORN}: __init__'s {name} moved"
    run_asgi = WebSocketsSansIOProtocol.run_asgi
    assert inspect.iscoroutinefunction(run_asgi), f"{UVICORN}: {BASE}.run_asgi is no longer a coroutine"
    assert list(inspect.signature(run_asgi).parameters) == ["self"], f"{UVICORN}: {BASE}.run_asgi takes arguments"
    lost = list(inspect.signature(WebSocketsSansIOProtocol.connection_lost).parameters)
    assert lost == ["self", "exc"], f"{UVICORN}: {BASE}.connection_lost{tuple(lost)}, not (self, exc)"


# The contract, on a real connection over loopback


@dataclass
class Connection:
    protocol: WebSocketProtocol
    server_state: ServerState
    app_state: dict[str, Any]
    transport: asyncio.Transport
    client: ClientProtocol
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    seen: dict[str, Any] = field(default_factory=dict)
    run_asgi: asyncio.Task[Any] | None = None  # the task uvicorn runs the application in

    async def events(self, until: Callable[[list[Event]], bool]) -> list[Event]:
        """What the client receives, until `until` is satisfied by all of it."""
        received: list[Event] = []
        async with asyncio.timeout(10):
            while not until(received):
                data = await self.reader.read(65536)
                if data:
                    self.client.receive_data(data)
                else:
                    self.client.receive_eof()
                received += self.client.events_received()
                self.writer.write(b"".join(self.client.data_to_send()))  # the close reply, if any
                if not data:
                    break
        return received

    async def application_done(self) -> bool:
        """Whether run_asgi has returned, within a deadline."""
        assert self.run_asgi is not None, "the application never ran"
        _, pending = await asyncio.wait({self.run_asgi}, timeout=10)
        return not pending

    async def lost(self) -> bool:
        """Whether the server closed the connection and connection_lost ran, within a deadline."""
        try:
            async with asyncio.timeout(10):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        # asyncio calls connection_lost before it closes the socket: it has run once the client sees the end.
        return self.protocol.disconnected


@asynccontextmanager
async def connected(make_app: Callable[[Connection], App], *, deflate: bool) -> AsyncIterator[Connection]:
    """uvicorn's protocol subclass on one side of a TCP connection on loopback, websockets' client on the other."""
    holder: list[Connection] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        holder[0].run_asgi = asyncio.current_task()
        await make_app(holder[0])(scope, receive, send)

    config = uvicorn.Config(app, ws=WebSocketProtocol, ws_per_message_deflate=deflate, lifespan="off", log_config=None)
    config.load()
    server_state, app_state = ServerState(), {"metrics": None}
    # By keyword, as uvicorn's HTTP protocols create it on an upgrade.
    protocol = WebSocketProtocol(config=config, server_state=server_state, app_state=app_state)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_socket = socket.create_connection(listener.getsockname())
        server_socket, _ = listener.accept()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, server_socket)
    reader, writer = await asyncio.open_connection(sock=client_socket)
    client = ClientProtocol(
        parse_uri("ws://127.0.0.1/"), extensions=[ClientPerMessageDeflateFactory()] if deflate else []
    )
    holder.append(Connection(protocol, server_state, app_state, transport, client, reader, writer))
    try:
        yield holder[0]
    finally:
        writer.close()
        transport.abort()
        for task in list(server_state.tasks):
            task.cancel()
        await asyncio.gather(*server_state.tasks, return_exceptions=True)


def send_handshake(connection: Connection) -> None:
    connection.client.send_request(connection.client.connect())
    connection.writer.write(b"".join(connection.client.data_to_send()))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def uvicorn_errors() -> Iterator[list[logging.LogRecord]]:
    """What uvicorn logs on its error logger (it may not propagate to the root logger pytest captures)."""
    handler, logger = Records(), logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def check(condition: bool, what: str) -> None:
    assert condition, f"{UVICORN}: {what} (app/live/protocol.py relies on it)"


async def test_uvicorn_still_sets_every_attribute_the_subclass_relies_on() -> None:
    started = asyncio.Event()

    def make_app(connection: Connection) -> App:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            started.set()
            await asyncio.Event().wait()  # held open until the test is done with it

        return app

    async with connected(make_app, deflate=True) as connection:
        send_handshake(connection)
        async with asyncio.timeout(10):
            await started.wait()
        protocol = connection.protocol
        missing = {name: why for name, why in RELIED_ON.items() if name not in vars(protocol)}
        assert not missing, f"{UVICORN}: {BASE} no longer sets " + "; ".join(f"`{n}` ({w})" for n, w in missing.items())
        kinds = {
            "config": isinstance(protocol.config, uvicorn.Config)
            and isinstance(protocol.config.ws_per_message_deflate, bool),
            "conn": isinstance(protocol.conn, ServerProtocol) and isinstance(protocol.conn.available_extensions, list),
            "scope": isinstance(protocol.scope.get("extensions"), dict),
            "loop": protocol.loop is asyncio.get_running_loop(),
            "close_timeout": isinstance(protocol.close_timeout, int | float) and protocol.close_timeout > 0,
            "disconnected": protocol.disconnected is False,
            "close_sent": protocol.close_sent is False,
            "handshake_complete": protocol.handshake_complete is False,
            "writable": isinstance(protocol.writable, asyncio.Event) and protocol.writable.is_set(),
            "transport": protocol.transport is connection.transport,
            "app_state": protocol.app_state is connection.app_state,
            "client": protocol.client == connection.writer.get_extra_info("sockname")[:2],
        }
        changed = [name for name, as_expected in kinds.items() if not as_expected]
        assert not changed, f"{UVICORN}: {BASE} changed what these hold: " + "; ".join(
            f"`{name}` ({RELIED_ON[name]})" for name in changed
        )
        # The subclass's own names shadow nothing of uvicorn's (a clash would replace uvicorn's, or hide ours).
        own = defined_by_subclass(subclass_source()) - OVERRIDDEN.keys()
        uvicorns = WebSocketsSansIOProtocol(
            config=protocol.config, server_state=connection.server_state, app_state=connection.app_state
        )
        clashes = {name for name in own if hasattr(WebSocketsSansIOProtocol, name)} | (own & set(vars(uvicorns)))
        assert not clashes, f"{UVICORN}: {BASE} now has {sorted(clashes)}, names app/live/protocol.py defines too"


@pytest.mark.parametrize("deflate", [True, False], ids=["compressed", "plain"])
async def test_the_handshake_runs_in_the_order_the_subclass_assumes(deflate: bool) -> None:
    def make_app(connection: Connection) -> App:
        protocol, seen = connection.protocol, connection.seen

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen["negotiated when run_asgi starts"] = list(protocol.conn.extensions)
            seen["writers offered"] = offered = prepared_frames(scope)
            seen["complete before the accept"] = protocol.handshake_complete
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            seen["complete after the accept"] = protocol.handshake_complete
            seen["open after the accept"] = protocol.conn.state is State.OPEN
            if offered is not None:
                await offered.send(Outgoing(FRAME_TEXT).wire(offered.deflate))
            await send({"type": "websocket.close", "code": 1000})
            seen["close_sent after the close"] = protocol.close_sent
            seen["returned at"] = protocol.loop.time()

        return app

    with uvicorn_errors() as errors:
        async with connected(make_app, deflate=deflate) as connection:
            send_handshake(connection)
            received = await connection.events(
                lambda got: any(isinstance(e, Frame) and e.opcode is Opcode.CLOSE for e in got)
            )
            assert await connection.application_done()
            check(not errors, f"uvicorn failed the application: {[(e.getMessage(), e.exc_info) for e in errors]}")
            await check_the_order(connection, deflate, received)


async def check_the_order(connection: Connection, deflate: bool, received: list[Event]) -> None:
    """What the application saw at each step, and what the client received, against what the subclass assumes."""
    protocol, seen = connection.protocol, connection.seen

    negotiated = seen["negotiated when run_asgi starts"]
    if deflate:
        check(
            len(negotiated) == 1 and isinstance(negotiated[0], PerMessageDeflate),
            f"conn.extensions is {negotiated} when run_asgi starts, not what was negotiated",
        )
        check(
            negotiated[0].local_no_context_takeover,
            "the handshake no longer negotiates with the conn.available_extensions the subclass set after "
            "__init__ (no server_no_context_takeover)",
        )
    else:
        check(negotiated == [], f"conn.extensions is {negotiated} without compression")
    check(seen["writers offered"] is not None, "scope['extensions'] is not a dict the subclass can add to")
    check(not seen["complete before the accept"], "handshake_complete is True before websocket.accept")
    check(seen["complete after the accept"], "handshake_complete is False after websocket.accept")
    check(seen["open after the accept"], "conn.state is not OPEN after websocket.accept")
    check(seen["close_sent after the close"], "close_sent is False after websocket.close")

    what = [
        f"{e.opcode.name} {bytes(e.data)!r}" if isinstance(e, Frame) else str(getattr(e, "status_code", e))
        for e in received
    ]
    check(
        what[:2] == ["101", f"TEXT {FRAME_TEXT.encode()!r}"],
        f"the client received {what}: not the 101, then the prepared frame written after websocket.accept",
    )
    # After websocket.close, uvicorn's run_asgi leaves the transport open for close_timer; the subclass's
    # timer starts then.
    timer = protocol._drop_timer
    check(timer is not None, "run_asgi returned without the subclass's code after it running")
    assert timer is not None
    due = (seen["returned at"] + protocol.close_timeout, protocol.loop.time() + protocol.close_timeout)
    check(due[0] <= timer.when() <= due[1], f"the drop timer is due at {timer.when()}, not close_timeout on")

    # The client's close reply went out with the last read: uvicorn completes the closing handshake.
    check(await connection.lost(), "the closing handshake did not complete: connection_lost never ran")
    check(timer.cancelled(), "connection_lost ran without the subclass's override cancelling its timer")


async def test_backpressure_and_loss_reach_the_writers_as_the_subclass_assumes() -> None:
    accepted, go = asyncio.Event(), asyncio.Event()

    def make_app(connection: Connection) -> App:
        seen = connection.seen

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            offered = prepared_frames(scope)
            assert offered is not None
            seen["offered"] = offered
            accepted.set()
            await go.wait()
            try:
                await offered.send(Outgoing(FRAME_TEXT).wire(None))
            except ClientDisconnected:
                seen["raised"] = True
                raise

        return app

    with uvicorn_errors() as errors:
        async with connected(make_app, deflate=False) as connection:
            protocol = connection.protocol
            send_handshake(connection)
            async with asyncio.timeout(10):
                await accepted.wait()
            frame = Outgoing(FRAME_TEXT).wire(None)

            protocol.pause_writing()  # what the transport calls above its high-water mark
            check(not protocol.writable.is_set(), "pause_writing no longer clears writable")
            assert not connection.seen["offered"].write_now(frame)
            protocol.resume_writing()
            check(protocol.writable.is_set(), "resume_writing no longer sets writable")

            protocol.pause_writing()
            go.set()  # send_prepared now waits on writable
            connection.transport.abort()  # asyncio calls connection_lost, and never resume_writing
            done = await connection.application_done()
            check(protocol.disconnected, "connection_lost no longer sets disconnected")
            check(
                done and protocol.writable.is_set(), "connection_lost no longer sets writable: a writer waits for ever"
            )
            check(connection.seen.get("raised", False), "a writer waiting on writable was not told the client left")
    check(not errors, f"run_asgi no longer swallows ClientDisconnected quietly: it logged {errors}")


# The range tested


def test_pyproject_pins_the_range_the_code_states() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = (Requirement(text) for text in project["dependencies"] if Requirement(text).name == "uvicorn")
    assert pin.specifier == SpecifierSet(TESTED_UVICORN), (
        f"pyproject.toml asks for uvicorn{pin.specifier}, app/live/protocol.py says {TESTED_UVICORN} was tested"
    )


def test_a_uvicorn_outside_the_range_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="app.live.protocol"):
        warn_if_untested_uvicorn("0.55.0")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"uvicorn 0.55.0 is outside the range tested ({TESTED_UVICORN})")


@pytest.mark.parametrize("installed", ["0.54.0", "0.54.7", None], ids=["0.54.0", "0.54.7", "installed"])
def test_a_uvicorn_inside_the_range_says_nothing(caplog: pytest.LogCaptureFixture, installed: str | None) -> None:
    with caplog.at_level(logging.DEBUG, logger="app.live.protocol"):
        warn_if_untested_uvicorn(installed)
    assert not caplog.records
