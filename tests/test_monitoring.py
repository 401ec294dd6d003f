"""Monitoring with the real tools: promtool checks the rules, their unit tests and the node's
exposition; a real Prometheus scrapes a running node and evaluates the alert rules; every
PromQL expression in the rules and the Grafana dashboard reads only metrics the node exports."""

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from plugin.app import Node
from plugin.config import NodeConfig
from plugin.metrics import (
    BASELINE_QUANTITIES,
    EVALUATIONS,
    MANUFACTURER_OTHER,
    MANUFACTURERS,
    QUEUES,
    REJECT_REASONS,
    STAGES,
)
from tests.conftest import REPO, free_port, node_config, storescu, wait_for, write_pipeline
from tests.promql import exported_names, metric_names

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
# Metrics Prometheus itself adds to every target.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed: run `make test`, which installs the Debian package prometheus")
    return path


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the module, with the demo pipeline (and a baseline band) and a
    destination, so the per-destination and band series exist."""
    tmp = tmp_path_factory.mktemp("monitored")
    write_pipeline(tmp / "pipelines", monitoring={"findings": {"nodule": {"positive_rate": [0.3, 0.7]}}})
    config = node_config(tmp, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}})
    config["dispatch"] = {"tries": 1, "backoff_seconds": 0}
    node = Node(NodeConfig.model_validate(config), CollectorRegistry())
    node.start()
    yield node
    node.stop()


def metrics_url(node: Node) -> str:
    assert node.metrics_server is not None
    return f"http://127.0.0.1:{node.metrics_server[0].server_port}/metrics"


def promql_expressions() -> dict[str, str]:
    """Every PromQL expression shipped: alert rules, dashboard panels and variables."""
    expressions = {}
    for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            expressions[f"alerts.yml: {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    dashboard = json.loads((GRAFANA / "dashboards" / "radpipe.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expressions[f"dashboard: {panel['title']} / {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            expressions[f"dashboard: variable {variable['name']}"] = text
    return expressions


def alert_names() -> set[str]:
    return {r["alert"] for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]}


def test_promtool_check_rules_and_config() -> None:
    out = subprocess.run(
        [tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in out.stdout
    out = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_alert_unit_tests_pass() -> None:
    files = sorted(path.name for path in PROMETHEUS.glob("*_test.yml"))
    assert files == ["alerts_drift_test.yml", "alerts_test.yml"]
    out = subprocess.run(
        [tool("promtool"), "test", "rules", *files],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(files), out.stdout
    # Every alert has at least one unit test.
    tested = {
        case["alertname"]
        for name in files
        for test in yaml.safe_load((PROMETHEUS / name).read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert alert_names() <= tested, alert_names() - tested


def test_promtool_accepts_the_live_exposition(live_node: Node) -> None:
    exposition = http_get(metrics_url(live_node))
    out = subprocess.run([tool("promtool"), "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    assert out.returncode == 0 and not out.stdout and not out.stderr, (out.stdout + out.stderr).decode()


def test_metric_name_extraction() -> None:
    """The checker below must see the names (and only the names) an expression reads."""
    expr = 'histogram_quantile(0.95, sum by (stage, le) (rate(radpipe_stage_seconds_bucket{stage!="wait"}[5m]))) > 30'
    assert metric_names(expr) == {"radpipe_stage_seconds_bucket"}
    expr = 'increase(a_total[15m]) > 0 and on (instance) b{x=~"$instance"} offset 5m == 1e9'
    assert metric_names(expr) == {"a_total", "b"}
    assert metric_names("label_values(radpipe_spool_free_bytes, instance)") == {"radpipe_spool_free_bytes"}


def test_every_promql_expression_uses_exported_metrics(live_node: Node) -> None:
    exported = exported_names(http_get(metrics_url(live_node)).decode())
    expressions = promql_expressions()
    assert len(expressions) > 10
    unknown = {}
    for where, expr in expressions.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        if missing := names - exported - PROMETHEUS_OWN:
            unknown[where] = sorted(missing)
    assert not unknown, unknown
    # Label values the node defines (a typo would make a panel or an alert silently empty).
    for where, expr in expressions.items():
        for label, values in (
            ("queue", QUEUES),
            ("stage", STAGES),
            ("reason", REJECT_REASONS),
            ("evaluation", EVALUATIONS),
            ("quantity", BASELINE_QUANTITIES),
            ("bound", ("low", "high")),
            ("manufacturer", (*MANUFACTURERS, *MANUFACTURER_OTHER)),
        ):
            for value in re.findall(rf'\b{label}\s*=\s*"([^"]*)"', expr):
                assert value in values, f"{where}: {label}={value!r} is not one of {values}"
    # The dashboard shows what the issue asks for.
    used = set().union(*(metric_names(e) for w, e in expressions.items() if w.startswith("dashboard")))
    for name in (
        "radpipe_instances_received_total",
        "radpipe_stage_seconds_bucket",
        "radpipe_queue_depth",
        "radpipe_instances_rejected_total",
        "radpipe_model_info",
        "radpipe_series_score_bucket",
        "radpipe_findings_total",
        "radpipe_finding_baseline",
        "radpipe_series_lesions_sum",
        "radpipe_input_slices_bucket",
        "radpipe_input_pixel_spacing_mm_bucket",
        "radpipe_input_series_total",
    ):
        assert name in used, name


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "radpipe.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    dashboard = json.loads((GRAFANA / "dashboards" / "radpipe.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]} | {
        t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]
    }
    assert uids == {source["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.fixture
def prometheus(tmp_path: Path, live_node: Node) -> Iterator[str]:
    """The real Prometheus on a free loopback port, using the shipped config and rules,
    scraping the live node every second; yields its base URL."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [metrics_url(live_node).split("/")[2]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                return http_get(f"{url}/-/ready").startswith(b"Prometheus")
            except OSError:
                return False

        wait_for(ready, timeout=30, what="Prometheus ready")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def query(url: str, expr: str) -> list[dict]:
    answer = json.loads(http_get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_scrapes_the_node_and_evaluates_the_rules(
    prometheus: str, live_node: Node, demo_study: dict[str, list[Path]], dcmtk: None
) -> None:
    series = demo_study["Demo chest CT, no nodules"]
    assert storescu(live_node.port, *series).returncode == 0
    start = time.monotonic()

    def received() -> float:
        result = query(prometheus, 'sum(radpipe_instances_received_total{job="radpipe"})')
        return float(result[0]["value"][1]) if result else 0.0

    wait_for(lambda: received() == len(series), timeout=30, what="Prometheus to see the received instances")
    [up] = query(prometheus, 'up{job="radpipe"}')
    assert up["value"][1] == "1"
    depths = query(prometheus, "radpipe_queue_depth")
    assert {"assembly", "jobs", "running", "dispatch"} <= {r["metric"]["queue"] for r in depths} <= set(QUEUES)
    # The node label arrives as the node served it (no target label of the same name clashes).
    assert {r["metric"].get("node") for r in depths} == {live_node.config.node.id}

    # Every alert rule evaluates on the node's real series without an error.
    def evaluated() -> list[dict]:
        answer = json.loads(http_get(f"{prometheus}/api/v1/rules"))
        rules = [r for g in answer["data"]["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

    rules = wait_for(evaluated, timeout=30, what="rules evaluated")
    assert {r["name"] for r in rules} == alert_names()
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = {r["name"] for r in rules if r["state"] != "inactive"}
    assert "RadpipeNodeDown" not in firing
    assert time.monotonic() - start < 60
