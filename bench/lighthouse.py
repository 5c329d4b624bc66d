"""Benchmark: Lighthouse's performance audit of the rates board, run after run, beside a bare baseline.

The goal (docs/board.md): under Lighthouse 12's default mobile emulation and simulated throttling,
the board scores performance >= 0.95 with total blocking time <= 150 ms in every run.

Workloads, each a real uvicorn on loopback with SQLite, polling the project's fake Flutterwave
(44 pairs, the default currencies):

  fresh  a fresh install: one observation per pair, so every sparkline cell says "collecting history";
  week   seven days of history for every pair, a change every 10 minutes (1,008 points a pair,
         44,352 in all), the heaviest board a week-old deployment shows.

Baseline: the same page, stylesheet and favicon served as fixed files by a bare static server
with the script left out, so the figures of the machine itself (chromium start, style, layout,
paint under throttling) are measured in the same minutes as the board's. The ratio that matters
is the board's TBT minus the bare page's: what the board's own script costs.

Run from the repository root (Lighthouse and axe come from `npm ci` in tools/npm):

    python -m bench.lighthouse                   # 3 runs of each workload, 3 of the baseline
    python -m bench.lighthouse --runs 5 --workload week

One warm-up run per workload comes first and is printed but not counted (`--warmup 0` counts
everything). It prints each run's performance score, TBT, LCP, FCP, speed index, CLS, max potential FID and the
number of long tasks, then p50/max per workload and the load average of this shared machine, and
exits 1 when any board run scores below 0.95 or blocks for more than 150 ms.
"""

import argparse
import asyncio
import functools
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from app.api.board import WEB_DIR
from app.currencies import Pair
from app.settings import Settings
from tests.support.audits import run_lighthouse
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.history import record_history
from tests.support.replicas import replica_on_sqlite

MIN_SCORE = 0.95
MAX_TBT_MS = 150.0
WEEK = timedelta(days=7)
CHANGE_EVERY = timedelta(minutes=10)
METRICS = {
    "tbt_ms": "total-blocking-time",
    "lcp_ms": "largest-contentful-paint",
    "fcp_ms": "first-contentful-paint",
    "si_ms": "speed-index",
    "cls": "cumulative-layout-shift",
    "max_fid_ms": "max-potential-fid",
}


@dataclass(frozen=True)
class Run:
    workload: str
    score: float
    figures: dict[str, float]
    long_tasks: int

    def line(self) -> str:
        shown = "  ".join(
            f"{name} {value:.3f}" if name == "cls" else f"{name} {value:5.0f}" for name, value in self.figures.items()
        )
        return f"{self.workload:9s} performance {self.score:.2f}  {shown}  long_tasks {self.long_tasks}"


def measure(workload: str, url: str) -> Run:
    report = run_lighthouse(url, ["performance"])
    audits: dict[str, Any] = report["audits"]
    figures = {name: float(audits[audit]["numericValue"]) for name, audit in METRICS.items()}
    long_tasks = len(audits["long-tasks"].get("details", {}).get("items", []))
    return Run(workload, float(report["categories"]["performance"]["score"]), figures, long_tasks)


def week_of_history(pairs: list[Pair], fake: FakeFlutterwave) -> list[tuple[Pair, datetime, Decimal]]:
    """A random walk for each pair that ends a step before the fake's current value, oldest first."""
    walk = random.Random(13)
    now = datetime.now(UTC)
    steps = int(WEEK / CHANGE_EVERY)
    observations = []
    for pair in pairs:
        value = fake.rate(pair)
        points = []
        for step in range(1, steps + 1):
            value = +(value * Decimal(1 + walk.uniform(-0.002, 0.002))).quantize(Decimal("0.000001"))
            points.append((pair, now - step * CHANGE_EVERY, value))
        observations.extend(reversed(points))
    return observations


@contextmanager
def board_service(workload: str, pairs: list[Pair]) -> Iterator[str]:
    with FakeFlutterwave() as fake, tempfile.TemporaryDirectory(prefix="bench-lighthouse-") as scratch:
        folder = Path(scratch)
        if workload == "week":
            asyncio.run(record_history(f"sqlite+aiosqlite:///{folder / 'rates.db'}", week_of_history(pairs, fake)))
        with replica_on_sqlite(folder, fake, POLL_INTERVAL_SECONDS="600") as replica:
            yield replica.url + "/"


@contextmanager
def bare_page() -> Iterator[str]:
    """The board's page without its script, its stylesheet and favicon, from a bare static server."""
    with tempfile.TemporaryDirectory(prefix="bench-lighthouse-bare-") as scratch:
        root = Path(scratch)
        (root / "static").mkdir()
        for name in ("board.css", "favicon.svg"):
            shutil.copy(WEB_DIR / "static" / name, root / "static" / name)
        page = (WEB_DIR / "index.html").read_text()
        (root / "index.html").write_text(page.replace('<script type="module" src="/static/board.js"></script>', ""))
        handler = functools.partial(QuietHandler, directory=str(root))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def summary(runs: list[Run]) -> str:
    tbts = [run.figures["tbt_ms"] for run in runs]
    scores = [run.score for run in runs]
    return (
        f"performance p50 {statistics.median(scores):.2f} min {min(scores):.2f}; "
        f"TBT ms p50 {statistics.median(tbts):.0f} max {max(tbts):.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lighthouse", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="Lighthouse runs per workload (default 3)")
    parser.add_argument("--workload", choices=["fresh", "week", "both"], default="both")
    parser.add_argument(
        "--warmup", type=int, default=1, help="runs per workload printed but not counted (default 1): a cold chromium"
    )
    args = parser.parse_args(argv)
    pairs = Settings(_env_file=None).pairs  # type: ignore[call-arg]
    workloads = ["fresh", "week"] if args.workload == "both" else [args.workload]

    print(f"load average at start: {load_average()}")
    runs: dict[str, list[Run]] = {"bare": []}
    for workload in workloads:
        runs[workload] = []
        with board_service(workload, pairs) as url, bare_page() as bare_url:
            # The first launch of chromium after other work reads its files from disk, in the page's time.
            for _ in range(args.warmup):
                print(f"{measure(workload, url).line()}  (warm-up, not counted)", flush=True)
            # Board and bare page alternate, so both see the same machine within the same minute.
            for _ in range(args.runs):
                for name, target in ((workload, url), ("bare", bare_url)):
                    run = measure(name, target)
                    runs[name].append(run)
                    print(f"{run.line()}  load {load_average()}", flush=True)

    print()
    for name, measured in runs.items():
        print(f"{name:9s} {summary(measured)}")
    bare_tbt = statistics.median(run.figures["tbt_ms"] for run in runs["bare"])
    for workload in workloads:
        own = statistics.median(run.figures["tbt_ms"] for run in runs[workload]) - bare_tbt
        print(f"{workload:9s} TBT p50 above the bare page: {own:.0f} ms")
    print(f"load average at end: {load_average()}")

    failing = [run for w in workloads for run in runs[w] if run.score < MIN_SCORE or run.figures["tbt_ms"] > MAX_TBT_MS]
    for run in failing:
        print(f"FAIL {run.workload}: performance {run.score:.2f}, TBT {run.figures['tbt_ms']:.0f} ms")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
