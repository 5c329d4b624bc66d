"""A throw-away redis-server for tests and benchmarks that need to stop and restart Redis."""

import socket
import subprocess

from tests.support.waiting import eventually_sync


class RedisServer:
    """A throw-away redis-server on a free loopback port, stopped by its own PID."""

    def __init__(self, password: str | None = None) -> None:
        """With `password`, clients must give it (`requirepass`), as the deploy kit's Redis asks; `url` carries it."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.password = password
        credentials = f":{password}@" if password is not None else ""
        self.url = f"redis://{credentials}127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password is not None:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually_sync(
            self._pong, what="the throw-away redis-server to answer PING", interval_s=0.02, ignoring=(OSError,)
        )

    def _pong(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"the throw-away redis-server exited with {self._process.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as connection:
            connection.sendall(b"PING\r\n")
            # Without the password PING is refused (-NOAUTH), which still says the server is up.
            return connection.recv(16).startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None
