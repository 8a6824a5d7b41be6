"""The monitoring files, checked for real: promtool, the dashboard's structure, and every PromQL query of
the dashboard and the alert rules against a real Prometheus that scrapes a running bertserve.

Prometheus and promtool come from Debian's `prometheus` package, which `.ci/run` installs; without them
these tests skip and say so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from service.app import create_app
from service.backends.fake import FakeBackend
from service.settings import ServiceSettings
from tests.helpers import LiveServer, free_port, make_registry, wait_http_ok

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bertserve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "bertserve.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target, and the template variable's query."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["query"]["query"])
            assert match, var["query"]
            out.append((f"variable {var['name']}", match.group(1)))
    return out


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def measure_part(expr: str) -> str:
    """The left side of a rule's final comparison: what the alert measures."""
    match = re.fullmatch(r"(.*\S)\s*(==|!=|>=|<=|>|<)\s*[-0-9.e]+", " ".join(expr.split()), flags=re.S)
    assert match, f"alert expression is not '<measure> <op> <threshold>': {expr}"
    return match.group(1)


# ---------------------------------------------------------------------------------------- static checks


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules():
    for args in (["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                 ["check", "rules", str(PROMETHEUS_DIR / "alerts.yml")]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_structure_and_datasource_uid():
    dash = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("throughput", "latency", "queue depth", "queue wait", "batch size", "padding", "error",
                   "rejection"):
        assert needed in titles, f"no panel about {needed}"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == uid
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]


def test_latency_quantiles_come_from_histograms():
    # p99 must aggregate across replicas: histogram_quantile over summed buckets, never a summary.
    latency = [e for title, e in dashboard_queries() if "latency" in title.lower()]
    assert latency and all("histogram_quantile" in e and "_bucket" in e and "sum by" in e for e in latency)


# ---------------------------------------------------------------------------------- real Prometheus


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    """bertserve over fake backends, a real uvicorn on loopback."""
    tmp = tmp_path_factory.mktemp("monitored")
    settings = ServiceSettings(model_store=tmp, max_batch_size=4, max_queue_delay_ms=2)
    registry = make_registry(tmp, settings, {"minilm": FakeBackend(dim=8, delay_s=0.002),
                                             "clf": FakeBackend(task="classification", num_labels=3)})
    with LiveServer(create_app(settings, registry=registry)) as live:
        yield live.url


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, service_url):
    """Prometheus on loopback scraping the service every second, with our alert rules loaded."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    job = config["scrape_configs"][0]
    job["static_configs"] = [{"targets": [service_url.removeprefix("http://")]}]
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp / "alerts.yml")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/-/ready", 60, proc, tmp / "prometheus.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(prom: str, expr: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {body}"
    return body["data"]["result"]


def drive_load(service: str, seconds: float) -> None:
    """A short bounded load over both models, with a few requests that fail on purpose."""
    end = time.monotonic() + seconds

    def worker(i: int) -> None:
        with httpx.Client(base_url=service, timeout=10) as client:
            n = 0
            while time.monotonic() < end:
                n += 1
                client.post("/v1/embeddings", json={"input": f"worker {i} says hello number {n}"})
                client.post("/embed", json={"inputs": ["short", f"a somewhat longer text from worker {i}"]})
                client.post("/predict", json={"inputs": "is this positive?", "model": "clf"})
                if n % 5 == 0:
                    client.post("/v1/embeddings", json={"input": "x", "model": "no-such-model"})  # 404
                    client.post("/v1/embeddings", json={"input": ""})  # 422

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))


@needs_prometheus
def test_every_dashboard_and_alert_query_returns_data(prometheus, service_url):
    # Load for long enough that every rate window holds several scrapes; the first scrape comes
    # some seconds after Prometheus starts, so wait until the series arrive.
    deadline = time.monotonic() + 60
    while not query(prometheus, 'bertserve_requests_total{job="bertserve"}') and time.monotonic() < deadline:
        time.sleep(0.5)
    drive_load(service_url, 8.0)
    time.sleep(2.5)  # the last load reaches a scrape

    def substitute(expr: str) -> str:
        return expr.replace("$__rate_interval", "30s").replace("$model", ".*")

    empty = []
    for title, expr in dashboard_queries():
        if not query(prometheus, substitute(expr)):
            empty.append(f"{title}: {expr}")
    for rule in alert_rules():
        query(prometheus, rule["expr"])  # the whole rule evaluates without error
        if not query(prometheus, measure_part(rule["expr"])):
            empty.append(f"alert {rule['alert']}: {measure_part(rule['expr'])}")
    assert not empty, "queries without data:\n" + "\n".join(empty)

    # The rules are loaded and healthy in Prometheus itself.
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r["health"] for g in rules for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert all(h in ("ok", "unknown") for h in loaded.values()), loaded
