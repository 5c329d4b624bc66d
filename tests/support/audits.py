"""The board's audits: Lighthouse and axe-core, both pinned in tools/npm, on Debian's chromium.

Lighthouse (for the audit test and the benchmark) runs with its defaults, mobile emulation and simulated
throttling, as an auditor would run it. The browser is told to make no background traffic: this
machine's network is closed, and a report must not depend on a request that cannot be answered.
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from app.storage.engine import PROJECT_ROOT

NPM_DIR = PROJECT_ROOT / "tools" / "npm"
LIGHTHOUSE = NPM_DIR / "node_modules" / ".bin" / "lighthouse"
AXE_SCRIPT = NPM_DIR / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--mute-audio",
]
MISSING = "{} is missing: run `npm ci` in tools/npm (tools/test.sh does)"


def run_lighthouse(url: str, categories: list[str] | None = None, timeout_s: float = 180) -> dict[str, Any]:
    """Lighthouse's JSON report of `url`: all categories, or only `categories`."""
    if not LIGHTHOUSE.exists():
        raise FileNotFoundError(MISSING.format(LIGHTHOUSE))
    with tempfile.TemporaryDirectory(prefix="lighthouse-") as scratch:
        report = Path(scratch) / "report.json"
        command = [
            str(LIGHTHOUSE),
            url,
            "--quiet",
            "--output=json",
            f"--output-path={report}",
            f"--chrome-flags={' '.join(CHROME_FLAGS)}",
        ]
        if categories:
            command.append(f"--only-categories={','.join(categories)}")
        # chrome-launcher writes its profile under TMPDIR: keep it inside the scratch folder.
        env = {**os.environ, "CHROME_PATH": CHROMIUM, "TMPDIR": scratch}
        result = subprocess.run(command, cwd=NPM_DIR, env=env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0 or not report.exists():
            raise RuntimeError(f"lighthouse failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        parsed: dict[str, Any] = json.loads(report.read_text())
    if parsed.get("runtimeError"):
        raise RuntimeError(f"lighthouse could not audit {url}: {parsed['runtimeError']}")
    return parsed


def scores(report: dict[str, Any]) -> dict[str, float]:
    return {name: category["score"] for name, category in report["categories"].items()}


def failed_audits(report: dict[str, Any], category: str) -> dict[str, str]:
    """The audits of `category` that cost it points, with their titles: what a failing assertion shows."""
    audits = report["audits"]
    failed = {}
    for reference in report["categories"][category]["auditRefs"]:
        audit = audits[reference["id"]]
        if reference["weight"] > 0 and audit["score"] is not None and audit["score"] < 1:
            failed[audit["id"]] = audit["title"]
    return failed
