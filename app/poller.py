"""`python -m app.poller`: the poller on its own, outside the web app (docs/design.md, "The poller").

python -m app.poller               cycle every POLL_INTERVAL_SECONDS until stopped
python -m app.poller --once        one cycle; exit 0 when every pair succeeded, 1 otherwise
python -m app.poller --interval N  cycle every N seconds
"""

import argparse
import asyncio
import signal

from app.kit.logs import configure_logging
from app.kit.metrics import Metrics
from app.services import open_services
from app.settings import Settings, load_settings


async def _main(settings: Settings, once: bool) -> int:
    async with open_services(settings, Metrics(), start_poller=False) as services:
        if once:
            report = await services.poller.run_cycle()
            return 0 if report.all_ok else 1
        # A platform stops the command with SIGTERM: stop as the web app does, finishing a write under way
        # and handing the lease back, so another replica polls now rather than after its TTL.
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        async with services.poller:
            await stopping.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.poller", description="Poll the upstream for rates.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run one cycle; exit 0 if every pair succeeded")
    mode.add_argument("--interval", type=float, metavar="N", help="seconds between cycles (POLL_INTERVAL_SECONDS)")
    args = parser.parse_args(argv)
    overrides = {"poll_interval_seconds": args.interval} if args.interval is not None else {}
    settings = load_settings(**overrides)
    configure_logging(settings.log_format)
    try:
        return asyncio.run(_main(settings, args.once))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
