"""What `deploy/` holds is checked offline: the alert rules by their unit tests, the Compose file against the
Compose specification, the Kubernetes manifests against Kubernetes's schemas, and all of them against the
service (every variable they set is a setting, every metric they read is one the service exports)."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.kit.metrics import Metrics
from app.live.protocol import UVICORN_WS
from app.settings import Settings
from app.storage.engine import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES_VERSION = "1.30.0"
# uvicorn's --timeout-graceful-shutdown in the image: how long requests in flight may take after SIGTERM.
IN_FLIGHT_GRACE_S = 10

# Metrics other parts of the service add (WebSocket fan-out, limits, database errors); the dashboard and the
# rules may read them before they land.
ALSO_EXPORTED = {
    "fxrates_websocket_frames_sent_total",
    "fxrates_websocket_updates_conflated_total",
    "fxrates_requests_refused_total",
    "fxrates_database_errors_total",
}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return found


def run(*command: str, cwd: Path = PROJECT_ROOT) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def load_all(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def exported_series() -> set[str]:
    """Every series name the service's registry can expose, labelled or not, sampled yet or not."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""], "summary": [""]}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\bfxrates_[a-z_]+\b", expression))


# Alert rules


def test_every_alert_rule_passes_its_unit_tests() -> None:
    run(promtool(), "check", "rules", "alerts.yaml", cwd=PROMETHEUS)
    output = run(promtool(), "test", "rules", "alerts.test.yaml", cwd=PROMETHEUS)
    assert "SUCCESS" in output


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_stays_quiet() -> None:
    rules = [rule for group in load_all(PROMETHEUS / "alerts.yaml")[0]["groups"] for rule in group["rules"]]
    cases = [case for test in load_all(PROMETHEUS / "alerts.test.yaml")[0]["tests"] for case in test["alert_rule_test"]]
    for rule in rules:
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown quiet"


def test_the_alert_rules_read_only_metrics_the_service_exports() -> None:
    known = exported_series() | ALSO_EXPORTED
    rules = [rule for group in load_all(PROMETHEUS / "alerts.yaml")[0]["groups"] for rule in group["rules"]]
    for rule in rules:
        assert metric_names(rule["expr"]) <= known, (rule["alert"], metric_names(rule["expr"]) - known)


def test_the_prometheus_config_is_valid_and_scrapes_both_compose_replicas() -> None:
    run(promtool(), "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    config = load_all(PROMETHEUS / "prometheus.yml")[0]
    targets = {
        target for job in config["scrape_configs"] for static in job["static_configs"] for target in static["targets"]
    }
    replicas = {name for name in compose()["services"] if name.startswith("fxrates-")}
    assert len(replicas) == 2
    assert targets == {f"{name}:8000" for name in replicas}


# Dashboard


def test_the_dashboard_parses_and_charts_only_metrics_the_service_exports() -> None:
    dashboard = json.loads((PROMETHEUS / "grafana-dashboard.json").read_text())
    known = exported_series() | ALSO_EXPORTED
    charted: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            charted |= metric_names(target["expr"])
    assert charted, "the dashboard charts nothing"
    assert charted <= known, charted - known
    # What an operator looks at first is there.
    for wanted in (
        "fxrates_http_request_duration_seconds_bucket",
        "fxrates_upstream_call_duration_seconds_bucket",
        "fxrates_rate_age_seconds",
        "fxrates_poller_role",
        "fxrates_dependency_up",
    ):
        assert wanted in charted, wanted


# Compose


def compose() -> dict[str, Any]:
    return load_all(DEPLOY / "compose.yaml")[0]


def test_the_compose_file_follows_the_compose_specification() -> None:
    run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", "deploy/compose.yaml")


def test_compose_migrates_once_before_two_replicas_start() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    replicas = [service for name, service in services.items() if name.startswith("fxrates-")]
    assert len(replicas) == 2
    for replica in replicas:
        assert replica["environment"]["DB_AUTO_MIGRATE"] == "false"
        assert replica["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert "REDIS_URL" in replica["environment"] and "postgres" in replica["environment"]["DATABASE_URL"]


# Kubernetes


def kubernetes() -> dict[str, dict[str, Any]]:
    return {
        document["kind"]: document for path in sorted(DEPLOY.glob("kubernetes/*.yaml")) for document in load_all(path)
    }


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("kubernetes/*.yaml")), ids=lambda path: path.name)
def test_each_kubernetes_manifest_is_valid(path: Path) -> None:
    for document in load_all(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kubernetes_has_what_a_rollout_needs() -> None:
    manifests = kubernetes()
    assert {"Deployment", "Job", "Service", "PodDisruptionBudget"} <= manifests.keys()
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["DB_AUTO_MIGRATE"] == "false"
    job = manifests["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["alembic", "upgrade", "head"]
    # SIGTERM: the drain, then requests in flight, then a few seconds for the lifespan to close.
    drain_s = float(env["SHUTDOWN_DRAIN_SECONDS"] or 0)
    assert pod["terminationGracePeriodSeconds"] >= drain_s + IN_FLIGHT_GRACE_S + 3
    assert manifests["PodDisruptionBudget"]["spec"]["selector"] == manifests["Deployment"]["spec"]["selector"]


def image_command() -> list[str]:
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    command: list[str] = json.loads(re.search(r"^CMD (\[.*?\])$", dockerfile.replace("\\\n", ""), re.M | re.S)[1])  # type: ignore[index]
    return command


def test_the_image_gives_requests_in_flight_the_grace_the_manifests_allow_for() -> None:
    command = image_command()
    assert command[command.index("--timeout-graceful-shutdown") + 1] == str(IN_FLIGHT_GRACE_S)


def test_the_image_runs_the_websocket_protocol_that_drops_clients_gone_silent() -> None:
    # What the tests' replicas run (tests/support/replicas.py), so what they show holds for the image.
    command = image_command()
    assert command[command.index("--ws") + 1] == UVICORN_WS
    assert command[command.index("--ws-per-message-deflate") + 1] == "true"


# Settings


def environment_names() -> dict[str, set[str]]:
    """Every environment variable each manifest sets for the service's own containers."""
    names: dict[str, set[str]] = {}
    for name, service in compose()["services"].items():
        if "fxrates" in str(service.get("image", "")):
            names[f"compose:{name}"] = set(service.get("environment", {}))
    for kind, manifest in kubernetes().items():
        spec = manifest["spec"]
        pod = spec.get("template", {}).get("spec")
        if pod:
            for container in pod["containers"]:
                names[f"kubernetes:{kind}/{container['name']}"] = {item["name"] for item in container.get("env", [])}
    return names


def test_every_variable_the_manifests_set_is_a_setting() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    found = environment_names()
    assert len(found) >= 5, found  # two replicas and the migration in Compose, the Deployment and the Job
    for where, names in found.items():
        assert names, where
        assert names <= settings, (where, names - settings)


def test_the_variables_in_the_manifests_hold_valid_values() -> None:
    """The plain values (not secrets, not ${...}) pass the settings' own validation."""
    for manifest in (compose()["services"]["fxrates-1"]["environment"],):
        values = {
            name.lower(): value for name, value in manifest.items() if "${" not in str(value) and name != "DATABASE_URL"
        }
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    container = kubernetes()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    values = {item["name"].lower(): item["value"] for item in container["env"] if "value" in item}
    Settings(_env_file=None, flutterwave_secret_key="set-by-the-secret", **values)  # type: ignore[call-arg]


# Build


def locked_versions(path: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==([^\s;\\]+)", path.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


@pytest.mark.parametrize(
    ("lock", "extras"), [("service.lock", []), ("test.lock", ["test"])], ids=["service.lock", "test.lock"]
)
def test_the_lock_files_pin_every_dependency_pyproject_asks_for(lock: str, extras: list[str]) -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(text) for text in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(text) for text in project["optional-dependencies"][extra]]
    text = (PROJECT_ROOT / "requirements" / lock).read_text()
    pins = locked_versions(PROJECT_ROOT / "requirements" / lock)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements/{lock}: run tools/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, pyproject.toml asks for {requirement}: run tools/lock.sh"
        )
    # Every pin carries hashes, so `pip install --require-hashes` can check what it downloads.
    assert text.count("==") <= text.count("--hash=sha256:")
