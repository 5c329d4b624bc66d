"""SIGTERM: stop taking new work, then let the server stop (docs/operations.md, Shutdown).

uvicorn, on SIGTERM, stops accepting connections, waits for requests in flight
(up to `--timeout-graceful-shutdown`), closes WebSockets with 1012 and then
runs the lifespan's shutdown. This hooks in front of that, the moment the
signal arrives:

1. `/readyz` answers 503, so a load balancer stops sending new work here;
2. every WebSocket client is closed with 1012 (service restart), so it
   reconnects to another replica at once, and a new one is closed the same way;
3. the poller stops and hands its lease back, so another replica polls now
   rather than after the lease's TTL;
4. after `SHUTDOWN_DRAIN_SECONDS` (time for the load balancer to notice), the
   signal is passed on to the server. A second SIGTERM passes it on at once.

Where no server caught SIGTERM (the app run in process by a test), nothing is
hooked and the default stays.
"""

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

from app.ingest.poller import Poller
from app.kit.tasks import TaskSet
from app.live.hub import Hub

log = logging.getLogger(__name__)

SERVICE_RESTART = 1012


class GracefulShutdown:
    def __init__(self, hub: Hub, poller: Poller, *, drain_s: float) -> None:
        self._hub = hub
        self._poller = poller
        self._drain_s = drain_s
        self.draining = False
        self._tasks = TaskSet()

    @asynccontextmanager
    async def on_sigterm(self) -> AsyncIterator["GracefulShutdown"]:
        """Hook SIGTERM for the duration of the block, in front of whichever server caught it."""
        server_handler = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(server_handler):
            yield self
            return
        loop = asyncio.get_running_loop()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.draining:
                server_handler(signum, frame)
                return
            self.draining = True
            # A signal handler runs between two bytecodes of whatever the loop was doing: start the work from the loop.
            loop.call_soon_threadsafe(self._start, lambda: server_handler(signum, None))

        signal.signal(signal.SIGTERM, on_signal)
        try:
            yield self
        finally:
            if signal.getsignal(signal.SIGTERM) is on_signal:
                signal.signal(signal.SIGTERM, server_handler)
            # The poller's stop is shielded: cancelled here, it still finishes, and the lifespan awaits it next.
            await self._tasks.aclose()

    def _start(self, stop_server: Callable[[], None]) -> None:
        self._tasks.spawn(self._drain(stop_server), "graceful-shutdown")

    async def _drain(self, stop_server: Callable[[], None]) -> None:
        log.info("SIGTERM: not ready any more; closing WebSocket clients with 1012 and handing the poller's lease back")
        self._hub.close_all(SERVICE_RESTART)
        # Beside the drain, not before it: a poll cycle slow to stop must not hold up the server's own shutdown
        # (the lifespan waits for this same stop before closing what the poller uses).
        self._tasks.spawn(self._poller.stop(), "poller-stop")
        if self._drain_s > 0:
            log.info("draining for %.1fs before the server stops", self._drain_s)
            await asyncio.sleep(self._drain_s)
        stop_server()
