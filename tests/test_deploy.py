"""What `deploy/` holds is checked offline: the alert rules by their unit tests, the Compose file against the
Compose specification, the Kubernetes manifests against Kubernetes's schemas, and all of them against the
service (every variable they set is a setting, every metric they read is one the service exports)."""

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.kit.metrics import Metrics
from app.limits.websocket import MAX_MESSAGE_BYTES
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
    assert found, "promtool is missing: apt-get install prometheus (tools/test.sh does)"
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


def kubernetes_documents() -> list[dict[str, Any]]:
    return [document for path in sorted(DEPLOY.glob("kubernetes/*.yaml")) for document in load_all(path)]


def kubernetes(name: str = "fxrates") -> dict[str, dict[str, Any]]:
    """The manifests of one part (`fxrates`: the service and its migration; `redis`), by kind."""
    return {
        document["kind"]: document
        for document in kubernetes_documents()
        if document["metadata"]["labels"]["app.kubernetes.io/name"] == name
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


def test_the_image_refuses_big_messages_as_they_arrive_and_names_no_server() -> None:
    # uvicorn's own limit is 16 MiB, checked after inflating; the app's is MAX_MESSAGE_BYTES (docs/limits.md).
    command = image_command()
    assert command[command.index("--ws-max-size") + 1] == str(MAX_MESSAGE_BYTES)
    assert "--no-server-header" in command


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


# Variables the manifests set for the service's containers that are not its settings.
NOT_SETTINGS = {
    "FORWARDED_ALLOW_IPS",  # uvicorn's own: whose proxy headers it believes
    "REDIS_PASSWORD",  # Kubernetes only: spelled into REDIS_URL as $(REDIS_PASSWORD), from the Secret
}


def test_every_variable_the_manifests_set_is_a_setting() -> None:
    settings = {name.upper() for name in Settings.model_fields} | NOT_SETTINGS
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


# What the manifests owe the contract: Redis's password, the proxy's network, memory for every client admitted

# Per WebSocket client, compressed (the image negotiates permessage-deflate): 55-57 KiB measured at 10,000 clients
# (docs/performance.md), the top of it, plus about 8 KiB for a client subscribed to WS_MAX_PAIRS_PER_CLIENT pairs;
# above the 50 KiB the contract allows for at the least.
CLIENT_KIB = 65
# The process itself: the interpreter, the libraries, every rate and the caches.
BASE_MIB = 150
COMPOSE_DEFAULT = re.compile(r"\$\{([A-Z_]+)(?::?-([^}]*))?\}")


def compose_value(text: str) -> str:
    """`text` as Compose gives it with no variable set: each ${NAME:-default} its default."""
    return COMPOSE_DEFAULT.sub(lambda match: match[2] or "", text)


def compose_replicas() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose()["services"].items() if name.startswith("fxrates-")}


def kubernetes_container() -> dict[str, Any]:
    container: dict[str, Any] = kubernetes()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return container


def kubernetes_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


def flag_value(command: list[str], flag: str) -> str:
    assert flag in command, (flag, command)
    return command[command.index(flag) + 1]


def test_compose_gives_redis_a_password_and_the_replicas_use_it() -> None:
    redis = compose()["services"]["redis"]
    password = flag_value(redis["command"], "--requirepass")
    assert compose_value(password), "Redis's password is empty when REDIS_PASSWORD is unset"
    # The health check must authenticate: an unauthenticated PING is refused, and redis-cli still exits 0.
    assert redis["environment"]["REDISCLI_AUTH"] == password
    assert "PONG" in " ".join(redis["healthcheck"]["test"])
    for name, replica in compose_replicas().items():
        url = urlsplit(replica["environment"]["REDIS_URL"])
        assert url.password == password, (name, "REDIS_URL must carry the password Redis asks for")
        assert (url.hostname, url.port) == ("redis", 6379), name


def test_kubernetes_gives_redis_a_password_from_the_secret_and_the_replicas_use_it() -> None:
    redis_pod = kubernetes("redis")["Deployment"]["spec"]["template"]["spec"]
    redis_service = kubernetes("redis")["Service"]
    (server,) = redis_pod["containers"]
    server_env = kubernetes_env(server)
    assert flag_value(server["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    secret = server_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert server_env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == secret  # the probe authenticates
    container = kubernetes_container()
    env = kubernetes_env(container)
    # From the same Secret's key, never written into the Deployment.
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    url = urlsplit(env["REDIS_URL"]["value"])
    assert url.password == "$(REDIS_PASSWORD)"
    # Kubernetes expands $(NAME) only from variables defined before it.
    names = [item["name"] for item in container["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    assert url.hostname == redis_service["metadata"]["name"]
    assert url.port == redis_service["spec"]["ports"][0]["port"]


def proxy_networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    assert value.strip() and "*" not in value, f"FORWARDED_ALLOW_IPS={value!r} would let a client pick its address"
    # Addresses or networks only: each must parse (an address is a network of one).
    return [ipaddress.ip_network(item.strip()) for item in value.split(",")]


def test_compose_believes_proxy_headers_only_from_its_own_network() -> None:
    (subnet,) = [item["subnet"] for item in compose()["networks"]["default"]["ipam"]["config"]]
    for name, replica in compose_replicas().items():
        networks = proxy_networks(compose_value(replica["environment"]["FORWARDED_ALLOW_IPS"]))
        assert networks == [ipaddress.ip_network(compose_value(subnet))], name
        # Published on the host's loopback only: a client elsewhere cannot come in through Docker's gateway.
        assert all(port.startswith("127.0.0.1:") for port in replica["ports"]), name


def test_kubernetes_believes_proxy_headers_only_from_the_pod_network() -> None:
    env = kubernetes_env(kubernetes_container())
    assert "FORWARDED_ALLOW_IPS" in env, "behind an ingress every client would share its address"
    networks = proxy_networks(env["FORWARDED_ALLOW_IPS"]["value"])
    assert all(network.is_private for network in networks), networks


def memory_bytes(text: str) -> int:
    """A memory quantity, as Kubernetes (`512Mi`, `1G`) or Compose (`512m`, `1g`: binary) writes it."""
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text))
    assert match, text
    units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    decimal = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(match[1]) * (decimal.get(match[2]) or units[match[2].lower()])


def needed_bytes(ws_max_clients: str | None) -> int:
    clients = int(ws_max_clients) if ws_max_clients is not None else Settings.model_fields["ws_max_clients"].default
    return clients * CLIENT_KIB * 2**10 + BASE_MIB * 2**20


def test_compose_gives_each_replica_the_memory_its_clients_need() -> None:
    for name, replica in compose_replicas().items():
        limit = memory_bytes(replica["mem_limit"])
        assert limit >= needed_bytes(replica["environment"].get("WS_MAX_CLIENTS")), name


def test_kubernetes_gives_each_replica_the_memory_its_clients_need() -> None:
    container = kubernetes_container()
    limit = memory_bytes(container["resources"]["limits"]["memory"])
    clients = kubernetes_env(container).get("WS_MAX_CLIENTS", {}).get("value")
    assert limit >= needed_bytes(clients)


def test_memory_quantities_read_as_their_tools_do() -> None:
    assert memory_bytes("1Gi") == memory_bytes("1g") == 2**30
    assert memory_bytes("512Mi") == memory_bytes("512m") == 512 * 2**20
    assert memory_bytes("1G") == 10**9


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
