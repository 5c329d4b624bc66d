"""Real uvicorn processes of the service on loopback, each started and stopped by its own PID."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.limits.websocket import MAX_MESSAGE_BYTES
from app.live.protocol import UVICORN_WS
from app.settings import Settings
from app.storage.engine import PROJECT_ROOT
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.waiting import eventually_sync


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# Every test client comes from 127.0.0.1, so the production limits (docs/limits.md) are turned off or sized
# for a test's traffic here; a test of a limit sets it explicitly.
ONE_ADDRESS_LIMITS = {
    "RATE_LIMIT_PER_MINUTE": "0",
    "WS_MAX_CLIENTS": "1000000",
    "WS_MAX_CLIENTS_PER_ADDRESS": "1000000",
    "WS_MESSAGES_PER_SECOND": "1000000",
    "WS_MESSAGE_BURST": "1000000",
    "ON_DEMAND_CALLS_PER_MINUTE": "100000",
    "ON_DEMAND_MAX_PAIRS": "100000",
}


def service_env(**values: str) -> dict[str, str]:
    """The inherited environment without any of the service's own variables, then `values`."""
    names = {name.upper() for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    env.update(values)
    return env


class Replica:
    def __init__(
        self,
        log_dir: Path,
        name: str = "replica",
        *,
        workers: int = 1,
        uvicorn_args: tuple[str, ...] = ("--no-access-log",),
        per_message_deflate: bool = True,
        ws_protocol: str | None = UVICORN_WS,
        **env: str,
    ) -> None:
        """`ws_protocol`: what `--ws` names; the image's protocol unless a test wants uvicorn's own."""
        self.workers = workers
        self.ws_protocol = ws_protocol
        self.per_message_deflate = per_message_deflate
        self.ws_protocol = ws_protocol
        self.uvicorn_args = uvicorn_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/rates"
        self.env = service_env(ENVIRONMENT="test", **{**ONE_ADDRESS_LIMITS, **env})
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> "Replica":
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            # As the image runs it (compression negotiated with clients that offer it), unless the test says not;
            # ws_protocol=None leaves uvicorn to choose its own, as a bare `uvicorn app.main:app` does.
            *(("--ws", self.ws_protocol) if self.ws_protocol is not None else ()),
            "--ws-per-message-deflate",
            str(self.per_message_deflate).lower(),
            "--ws-max-size",
            str(MAX_MESSAGE_BYTES),
            "--no-server-header",
            *self.uvicorn_args,
        ]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=log)
        eventually_sync(
            self._healthy,
            what=f"replica {self.url} to answer /healthz",
            timeout_s=timeout_s,
            detail=self.log,
            ignoring=(OSError,),
        )
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"replica exited with {self.process.returncode} before it answered:\n{self.log()}")
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
            return bool(response.status == 200)

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def poller_role(self) -> str:
        _, body = self.get("/readyz")
        role: str = body["data"]["poller"]
        return role

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as when a machine dies."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=5)
        self.process = None


def wait_for_rates(replica: Replica, count: int = 44, timeout_s: float = 20) -> None:
    """Until the replica serves `count` stored pairs across the four default bases."""
    eventually_sync(
        lambda: stored_rates(replica),
        until=lambda stored: stored >= count,
        what=f"the replica to store {count} rates",
        timeout_s=timeout_s,
        detail=replica.log,
    )


def stored_rates(replica: Replica) -> int:
    """How many pairs the replica serves across the four default bases."""
    return sum(
        int(replica.get(f"/api/rates/all?base_currency={base}")[1]["meta"]["count"])
        for base in ("USD", "CAD", "GBP", "EUR")
    )


@contextmanager
def replica_on_sqlite(
    folder: Path,
    fake: FakeFlutterwave,
    *,
    per_message_deflate: bool = True,
    ws_protocol: str | None = UVICORN_WS,
    **env: str,
) -> Iterator[Replica]:
    """One replica with its own SQLite file, polling the fake; yielded once all 44 pairs are stored."""
    replica = Replica(
        folder,
        per_message_deflate=per_message_deflate,
        ws_protocol=ws_protocol,
        DATABASE_URL=f"sqlite+aiosqlite:///{folder / 'rates.db'}",
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=fake.url,
        **env,
    )
    replica.start()
    try:
        wait_for_rates(replica)
        yield replica
    finally:
        replica.stop()
