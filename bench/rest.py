"""Benchmark: cached REST reads against a bare ASGI app serving the same bytes, both under wrk in the same run.

The issue's goal: with Debian's wrk on loopback and one uvicorn worker, a cached
GET /api/rates for a polled pair (USD/NGN, amount=1000) reaches at least 0.2x the
throughput of a bare ASGI app that answers every GET with a fixed JSON body of
the same size; the same for GET /api/rates/all?base_currency=USD. The bare body
is the real endpoint's body, fetched once and written to a file the bare app
reads, so both send the same number of bytes. Bare and real runs alternate, twice
each per endpoint, so both see the same machine within the same minute.

The service runs with the built-in demo provider (no FLUTTERWAVE_SECRET_KEY),
SQLite in a temporary directory, POLL_INTERVAL_SECONDS=600 and
RATE_STALE_AFTER_SECONDS=3600, so the first poll's rates stay fresh (and cached)
for the whole run. Needs `wrk` (apt-get install wrk); `--profile` needs py-spy.

Run from the repository root:

    python -m bench.rest                          # 2 x 10 s per server and endpoint, wrk -t1 -c64
    python -m bench.rest --redis                  # also with REDIS_URL=redis://127.0.0.1:6379/11 (flushed)
    python -m bench.rest --threads 2 --connections 128 --duration 15
    python -m bench.rest --profile                # then py-spy on the worker while wrk loads each endpoint
    python -m bench.rest --limit-only             # only the cost of the per-client limit (below)
    python -m bench.rest --address-rules          # only the cost of the address rules (below)

With `--redis` (or `--limit-only`) it also measures the cost of the per-client
limit (RATE_LIMIT_PER_MINUTE, docs/limits.md): two replicas of the service on
one SQLite file and one Redis, one with the limit off and one with it on
(sized above what wrk sends, so every answer is a 200 that was counted in
Redis), cached GET /api/rates alternating between them; the ratio on / off
should be at least 0.8.

With `--address-rules` it measures what the client address rules cost a
cached GET /api/rates (docs/limits.md, "Who a client is"): one replica with
the limit on (sized above the load, counted in process memory) and uvicorn's
`--proxy-headers --forwarded-allow-ips 127.0.0.1`, against a baseline
replica with the limit off and `--no-proxy-headers`, wrk alternating between
them with one Lua script (bench/xff.lua) that sends each request from another
IPv6 address in X-Forwarded-For (65,536 addresses in 4,096 /64 networks), so
the forwarded address is parsed and keyed by its /64 on every request; the
ratio rules / baseline should be at least 0.8.

It exits 1 when a median ratio real / bare throughput is below 0.2, the limit's
or the address rules' ratio is below 0.8, or a run saw non-2xx answers or socket errors.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from starlette.types import ASGIApp, Receive, Scope, Send

from app.settings import Settings
from bench import pyspy
from tests.support.replicas import ONE_ADDRESS_LIMITS
from tests.support.waiting import eventually_sync

MIN_RATIO = 0.2
MIN_LIMIT_RATIO = 0.8
# The benchmark's clients all come from one address: the service's limits are off, as in the tests.
LIMITS_OFF = ONE_ADDRESS_LIMITS
# Above what one wrk can send in a minute here (about 20,000 a second), so the limit counts and never refuses.
LIMIT_ON = "50000000"
ROOT = Path(__file__).resolve().parent.parent
BODY_FILE_VARIABLE = "BENCH_BARE_BODY_FILE"
HEADERS_VARIABLE = "BENCH_BARE_HEADERS"
ENDPOINTS = {
    "/api/rates": "/api/rates?source_currency=USD&destination_currency=NGN&amount=1000",
    "/api/rates/all": "/api/rates/all?base_currency=USD",
}
# Response headers copied to the bare app, so only the work differs, not the bytes on the wire.
COPIED_HEADERS = ("content-type", "etag", "cache-control")
# Settings' own variables, and prefixes for any that may be added later.
SERVICE_PREFIXES = ("DATABASE_", "DB_", "REDIS_", "FLUTTERWAVE_", "POLL", "RATE", "CACHE_", "UPSTREAM_", "CORS_")
SERVICE_PREFIXES += ("ON_DEMAND_", "WS_")


def create_bare_app() -> ASGIApp:
    """The floor: an ASGI app that answers every request with the bytes in $BENCH_BARE_BODY_FILE.

    Run by `uvicorn bench.rest:create_bare_app --factory`.
    """
    body = Path(os.environ[BODY_FILE_VARIABLE]).read_bytes()
    copied: dict[str, str] = json.loads(os.environ.get(HEADERS_VARIABLE, "{}"))
    headers = [(name.encode(), value.encode()) for name, value in copied.items()]
    headers.append((b"content-length", str(len(body)).encode()))

    async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return bare_app


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_s: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    p50_ms: float = 0.0
    max_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="wrk threads, -t (default 1: the machine has 2 cores)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections, -c (default 64)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured wrk per server (default 2)")
    parser.add_argument("--runs", type=int, default=2, help="runs per server and endpoint (default 2)")
    parser.add_argument("--redis", action="store_true", help="also run the service with Redis, and the limit's cost")
    parser.add_argument("--limit-only", action="store_true", help="only the per-client limit's cost (needs Redis)")
    parser.add_argument(
        "--address-rules", action="store_true", help="only the address rules' cost (/64 keys, proxy headers)"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11", help="for --redis; flushed before/after")
    parser.add_argument("--profile", action="store_true", help="after the runs, py-spy the worker under wrk load")
    parser.add_argument("--profile-seconds", type=int, default=15, help="py-spy seconds per endpoint (default 15)")
    parser.add_argument("--profile-dir", type=Path, help="where py-spy output goes (default: a new /tmp directory)")
    parser.add_argument("--service-dir", type=Path, default=ROOT, help="run app.main from this copy (A/B trials)")
    parser.add_argument("--ready-timeout", type=float, default=60, help="seconds to wait for a server (default 60)")
    args = parser.parse_args(argv)
    if min(args.threads, args.connections, args.duration, args.runs) < 1:
        parser.error("--threads, --connections, --duration and --runs must be at least 1")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (apt-get install wrk)")
    return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment without any of the service's variables, plus `extra`."""
    names = {name.upper() for name in Settings.model_fields} | {"ENVIRONMENT"}
    env = {
        name: value
        for name, value in os.environ.items()
        if name.upper() not in names and not name.upper().startswith(SERVICE_PREFIXES)
    }
    env.update(extra)
    return env


def start_server(
    name: str,
    target: str,
    env: Mapping[str, str],
    log_path: Path,
    *,
    factory: bool,
    cwd: Path = ROOT,
    uvicorn_args: tuple[str, ...] = (),
) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--log-level", "warning", "--no-access-log", *uvicorn_args]
    if factory:
        command.append("--factory")
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    return Server(name, f"http://127.0.0.1:{port}", process)


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextmanager
def serving(
    name: str,
    target: str,
    env: Mapping[str, str],
    log_path: Path,
    *,
    factory: bool,
    cwd: Path = ROOT,
    uvicorn_args: tuple[str, ...] = (),
) -> Iterator[Server]:
    server = start_server(name, target, env, log_path, factory=factory, cwd=cwd, uvicorn_args=uvicorn_args)
    try:
        yield server
    finally:
        stop_server(server)


def wait_until(server: Server, log_path: Path, timeout_s: float, ready: Any) -> None:
    """Poll `ready(client)` until it is true; raise with the server's log when the deadline passes."""

    def log() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    with httpx.Client(base_url=server.url, timeout=5) as client:

        def probe() -> bool:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.process.poll()} before it was ready:\n{log()}")
            return bool(ready(client))

        eventually_sync(
            probe,
            what=f"{server.name} to be ready",
            timeout_s=timeout_s,
            interval_s=0.2,
            detail=log,
            ignoring=(httpx.HTTPError, ValueError, KeyError),
        )


def service_ready(client: httpx.Client) -> bool:
    if client.get("/readyz").status_code != 200:
        return False
    response = client.get(ENDPOINTS["/api/rates/all"])
    return response.status_code == 200 and response.json()["meta"]["count"] == 11


def bare_ready(client: httpx.Client) -> bool:
    return client.get("/").status_code == 200


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str) -> WrkResult:
    requests_s = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    if requests_s is None or p99 is None or total is None:
        raise RuntimeError(f"cannot parse wrk's output:\n{output}")
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    latency_max = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m|h)", output, re.MULTILINE)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests_s=float(requests_s[1]),
        p99_ms=float(p99[1]) * _UNITS_MS[p99[2]],
        requests=int(total[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(map(int, errors.groups())) if errors else 0,
        p50_ms=float(p50[1]) * _UNITS_MS[p50[2]] if p50 else 0.0,
        max_ms=float(latency_max[1]) * _UNITS_MS[latency_max[2]] if latency_max else 0.0,
    )


def wrk_command(url: str, threads: int, connections: int, duration_s: int, script: Path | None = None) -> list[str]:
    scripted = ["-s", str(script)] if script is not None else []
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", *scripted, url]


def run_wrk(url: str, threads: int, connections: int, duration_s: int, script: Path | None = None) -> WrkResult:
    done = subprocess.run(
        wrk_command(url, threads, connections, duration_s, script), capture_output=True, text=True, check=True
    )
    return parse_wrk(done.stdout)


def capture(real: Server, path: str, directory: Path) -> tuple[Path, dict[str, str]]:
    """The real endpoint's body, written to a file, and the headers the bare app should copy."""
    response = httpx.get(real.url + path, timeout=10)
    response.raise_for_status()
    body_path = directory / f"body-{len(list(directory.glob('body-*')))}.json"
    body_path.write_bytes(response.content)
    return body_path, {name: response.headers[name] for name in COPIED_HEADERS if name in response.headers}


def bench_endpoint(
    label: str, path: str, real: Server, args: argparse.Namespace, directory: Path
) -> tuple[float, list[str]]:
    """Alternate bare and real runs; print them and return the median ratio and any problems."""
    body_path, headers = capture(real, path, directory)
    env = clean_environment({BODY_FILE_VARIABLE: str(body_path), HEADERS_VARIABLE: json.dumps(headers)})
    log_path = directory / f"{body_path.stem}-bare.log"
    with serving("bare app", "bench.rest:create_bare_app", env, log_path, factory=True) as bare:
        wait_until(bare, log_path, args.ready_timeout, bare_ready)
        bare_body = httpx.get(bare.url + path, timeout=10).content
        if bare_body != body_path.read_bytes():
            raise RuntimeError("the bare app's body differs from the captured one")
        print(f"{label} {path}: {len(bare_body)} body bytes (bare = real, byte for byte, as captured)")
        for server in (bare, real):
            if args.warmup:
                run_wrk(server.url + path, args.threads, args.connections, args.warmup)
        results: dict[str, list[WrkResult]] = {"bare": [], "real": []}
        started = time.monotonic()
        for number in range(1, args.runs + 1):
            for kind, server in (("bare", bare), ("real", real)):
                result = run_wrk(server.url + path, args.threads, args.connections, args.duration)
                results[kind].append(result)
                print(
                    f"  run {number} {kind}: {result.requests_s:10.1f} req/s, p99 {result.p99_ms:8.2f} ms "
                    f"({result.requests} requests, {result.non_2xx} non-2xx, {result.socket_errors} socket errors)"
                )
        elapsed_s = time.monotonic() - started
    real_length = len(httpx.get(real.url + path, timeout=10).content)
    bare_rps = statistics.median(r.requests_s for r in results["bare"])
    real_rps = statistics.median(r.requests_s for r in results["real"])
    ratio = real_rps / bare_rps
    print(f"  measured runs took {elapsed_s:.0f} s")
    print(f"  median bare: {bare_rps:10.1f} req/s, p99 {statistics.median(r.p99_ms for r in results['bare']):.2f} ms")
    print(f"  median real: {real_rps:10.1f} req/s, p99 {statistics.median(r.p99_ms for r in results['real']):.2f} ms")
    print(f"  real body now {real_length} bytes (meta.age_seconds or meta.as_of may vary by a few digits)")
    print(f"  ratio real/bare throughput: {ratio:.3f} (at least {MIN_RATIO})")
    problems = [
        f"{label} {path} {kind} run {number}: {r.non_2xx} non-2xx, {r.socket_errors} socket errors"
        for kind, runs in results.items()
        for number, r in enumerate(runs, 1)
        if r.non_2xx or r.socket_errors
    ]
    if ratio < MIN_RATIO:
        problems.append(f"{label} {path}: ratio {ratio:.3f} below {MIN_RATIO}")
    return ratio, problems


def service_environment(database_url: str, redis_url: str | None, **overrides: str) -> dict[str, str]:
    extra = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "POLL_INTERVAL_SECONDS": "600",
        "RATE_STALE_AFTER_SECONDS": "3600",
        **LIMITS_OFF,
        **overrides,
    }
    if redis_url is not None:
        extra["REDIS_URL"] = redis_url
    return clean_environment(extra)


# Where a sample's time goes. First the first of these that any of its frames matches, in this order...
CALLED_FROM = (
    ("sqlalchemy/", "database: SQLAlchemy and aiosqlite"),
    ("aiosqlite/", "database: SQLAlchemy and aiosqlite"),
    ("(redis/", "Redis client"),
    ("run_in_threadpool ", "sync dependencies sent to the threadpool (anyio)"),
    ("WorkerThread.", "sync dependencies sent to the threadpool (anyio)"),
    ("RequestResponseCycle.send ", "uvicorn: writing the response (the socket write is in here)"),
    ("serialize_response ", "response model validation and JSON serialisation"),
    ("request_params_to_args ", "query parameters: parsing and query model validation"),
    ("(app/rates/", "our lookup, store and cache code"),
    ("(app/upstream/", "our lookup, store and cache code"),
    ("(app/api/rates.py", "our endpoint code (etag, response models)"),
    ("solve_dependencies ", "dependency solving, other"),
    ("matches (", "routing"),
    ("_match (", "routing"),
    ("Response.__call__ ", "sending the response through the middleware"),
)
# ...else the innermost frame matching one of these.
INNERMOST = (
    ("iddleware", "middleware frames"),
    ("_exception_handler.py", "middleware frames"),
    ("(uvicorn/protocols/", "uvicorn: HTTP protocol (httptools parsing runs under data_received)"),
    ("(fastapi/", "FastAPI request handling, other"),
    ("(starlette/", "Starlette request handling, other"),
    ("(pydantic", "pydantic, other"),
    ("(prometheus_client/", "prometheus_client"),
)


# The frames every main-thread sample passes through, left out of the inclusive list.
STARTUP_FRAMES = ("<frozen runpy>", "(click/", "(uvicorn/main.py", "(uvicorn/server.py", "(uvicorn/__main__.py")
STARTUP_FRAMES += ("(uvicorn/_compat.py", "(asyncio/runners.py", "(threading.py")


def categorise(frames: list[str]) -> str:
    for marker, name in CALLED_FROM:
        if any(marker in frame for frame in frames):
            return name
    for frame in reversed(frames):
        for marker, name in INNERMOST:
            if marker in frame:
                return name
    return "event loop, asyncio and other"


def profile(real: Server, label: str, args: argparse.Namespace, directory: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    for path in ENDPOINTS.values():
        name = re.sub(r"\W+", "-", f"{label}-{path.split('?')[0]}").strip("-")
        raw_path = directory / f"{name}.txt"
        speedscope_path = directory / f"{name}.speedscope.json"
        seconds = args.profile_seconds
        load = subprocess.Popen(
            wrk_command(real.url + path, args.threads, args.connections, 2 * seconds + 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1)
            for out, form in ((raw_path, "raw"), (speedscope_path, "speedscope")):
                command = [py_spy, "record", "--pid", str(real.process.pid), "--duration", str(seconds), "--gil"]
                command += ["--format", form, "--output", str(out)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"py-spy could not profile (exit {done.returncode}): {done.stderr.strip()[-500:]}")
                    return
        finally:
            if load.poll() is None:
                load.terminate()
                try:
                    load.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    load.kill()
                    load.wait()
        print(f"profile {label} {path} under wrk: {raw_path} (collapsed), {speedscope_path} (speedscope)")
        pyspy.summarise(raw_path, top=20, categorise=categorise, leave_out=STARTUP_FRAMES)


def bench_service(label: str, redis_url: str | None, args: argparse.Namespace, profile_dir: Path | None) -> list[str]:
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        directory = Path(tmp)
        env = service_environment(f"sqlite+aiosqlite:///{directory / 'rates.db'}", redis_url)
        log_path = directory / "service.log"
        with serving("service", "app.main:app", env, log_path, factory=False, cwd=args.service_dir) as real:
            wait_until(real, log_path, args.ready_timeout, service_ready)
            print(f"{label}: service ready at {real.url} (pid {real.process.pid})")
            for path in ENDPOINTS.values():
                problems += bench_endpoint(label, path, real, args, directory)[1]
            if profile_dir is not None:
                profile(real, label, args, profile_dir)
    return problems


def bench_limit(redis_url: str, args: argparse.Namespace) -> list[str]:
    """Cached /api/rates on two replicas sharing SQLite and Redis: the per-client limit off, and on."""
    path = ENDPOINTS["/api/rates"]
    with tempfile.TemporaryDirectory(prefix="bench-rest-limit-") as tmp:
        directory = Path(tmp)
        database_url = f"sqlite+aiosqlite:///{directory / 'rates.db'}"
        servers: dict[str, Server] = {}
        with contextlib.ExitStack() as stack:
            for kind, limit in (("off", "0"), ("on", LIMIT_ON)):
                # One replica polls (it holds the lease); the other finds the rates in the shared SQLite and Redis.
                env = service_environment(database_url, redis_url, RATE_LIMIT_PER_MINUTE=limit)
                log_path = directory / f"limit-{kind}.log"
                server = stack.enter_context(
                    serving(f"limit {kind}", "app.main:app", env, log_path, factory=False, cwd=args.service_dir)
                )
                wait_until(server, log_path, args.ready_timeout, service_ready)
                servers[kind] = server
            headers = httpx.get(servers["on"].url + path, timeout=10).headers
            if headers.get("ratelimit-limit") != LIMIT_ON:
                raise RuntimeError(f"the limit is not on: {dict(headers)}")
            print(f"per-client limit, redis: {path}, RATE_LIMIT_PER_MINUTE off (0) vs on ({LIMIT_ON})")
            for server in servers.values():
                if args.warmup:
                    run_wrk(server.url + path, args.threads, args.connections, args.warmup)
            results: dict[str, list[WrkResult]] = {"off": [], "on": []}
            for number in range(1, args.runs + 1):
                for kind, server in servers.items():
                    result = run_wrk(server.url + path, args.threads, args.connections, args.duration)
                    results[kind].append(result)
                    print(
                        f"  run {number} limit {kind}: {result.requests_s:10.1f} req/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, max {result.max_ms:.2f} ms "
                        f"({result.requests} requests, {result.non_2xx} non-2xx, {result.socket_errors} socket errors)"
                    )
    off_rps = statistics.median(r.requests_s for r in results["off"])
    on_rps = statistics.median(r.requests_s for r in results["on"])
    ratio = on_rps / off_rps
    for kind in ("off", "on"):
        rps = statistics.median(r.requests_s for r in results[kind])
        p50 = statistics.median(r.p50_ms for r in results[kind])
        p99 = statistics.median(r.p99_ms for r in results[kind])
        worst = max(r.max_ms for r in results[kind])
        print(f"  median limit {kind}: {rps:10.1f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms; max {worst:.2f} ms")
    print(f"  ratio limit on/off throughput: {ratio:.3f} (at least {MIN_LIMIT_RATIO})")
    return ratio_problems("per-client limit", "limit", results, ratio)


def ratio_problems(name: str, label: str, results: dict[str, list[Any]], ratio: float) -> list[str]:
    """Every run that saw errors, and a ratio under MIN_LIMIT_RATIO."""
    problems = [
        f"{label} {kind} run {number}: {r.non_2xx} non-2xx, {r.socket_errors} socket errors"
        for kind, runs in results.items()
        for number, r in enumerate(runs, 1)
        if r.non_2xx or r.socket_errors
    ]
    if ratio < MIN_LIMIT_RATIO:
        problems.append(f"{name}: ratio {ratio:.3f} below {MIN_LIMIT_RATIO}")
    return problems


def bench_address_rules(args: argparse.Namespace) -> list[str]:
    """Cached /api/rates: the limit keyed by forwarded IPv6 /64 networks, against no limit and no proxy headers."""
    path = ENDPOINTS["/api/rates"]
    script = ROOT / "bench" / "xff.lua"
    with tempfile.TemporaryDirectory(prefix="bench-rest-addresses-") as tmp:
        directory = Path(tmp)
        servers: dict[str, Server] = {}
        with contextlib.ExitStack() as stack:
            for kind, limit, flags in (
                ("baseline", "0", ("--no-proxy-headers",)),
                ("rules", LIMIT_ON, ("--proxy-headers", "--forwarded-allow-ips", "127.0.0.1")),
            ):
                env = service_environment(
                    f"sqlite+aiosqlite:///{directory / f'{kind}.db'}", None, RATE_LIMIT_PER_MINUTE=limit
                )
                log_path = directory / f"{kind}.log"
                server = stack.enter_context(
                    serving(
                        kind, "app.main:app", env, log_path, factory=False, cwd=args.service_dir, uvicorn_args=flags
                    )
                )
                wait_until(server, log_path, args.ready_timeout, service_ready)
                servers[kind] = server
            print(
                f"address rules: {path}, X-Forwarded-For IPv6 from {script.name}; baseline: limit off, no proxy headers"
            )
            for server in servers.values():
                if args.warmup:
                    run_wrk(server.url + path, args.threads, args.connections, args.warmup, script)
            results: dict[str, list[WrkResult]] = {"baseline": [], "rules": []}
            for number in range(1, args.runs + 1):
                for kind, server in servers.items():
                    result = run_wrk(server.url + path, args.threads, args.connections, args.duration, script)
                    results[kind].append(result)
                    print(
                        f"  run {number} {kind}: {result.requests_s:10.1f} req/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms ({result.requests} requests, {result.non_2xx} non-2xx, "
                        f"{result.socket_errors} socket errors)"
                    )
    ratio = statistics.median(r.requests_s for r in results["rules"]) / statistics.median(
        r.requests_s for r in results["baseline"]
    )
    print(f"  ratio address rules / baseline throughput: {ratio:.3f} (at least {MIN_LIMIT_RATIO})")
    return ratio_problems("address rules", "address rules", results, ratio)


def flush(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    print(f"{(wrk_version.stdout or wrk_version.stderr).splitlines()[0]}; {os.cpu_count()} CPUs")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency, {args.runs} runs per server")
    profile_dir = None
    if args.profile:
        profile_dir = args.profile_dir or Path(tempfile.mkdtemp(prefix="bench-rest-profile-"))
        profile_dir.mkdir(parents=True, exist_ok=True)
    if args.address_rules:
        problems = bench_address_rules(args)
        for problem in problems:
            print(f"problem: {problem}")
        print("FAIL" if problems else "PASS")
        return 1 if problems else 0
    problems = [] if args.limit_only else bench_service("no redis", None, args, profile_dir)
    if args.redis and not args.limit_only:
        flush(args.redis_url)
        try:
            problems += bench_service("redis", args.redis_url, args, profile_dir)
        finally:
            flush(args.redis_url)
    if args.redis or args.limit_only:
        flush(args.redis_url)
        try:
            problems += bench_limit(args.redis_url, args)
        finally:
            flush(args.redis_url)
    for problem in problems:
        print(f"problem: {problem}")
    print("FAIL" if problems else "PASS")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
