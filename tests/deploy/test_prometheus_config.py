"""deploy/prometheus/prometheus.yml: the jobs, ports and labels the dashboard and the autoscaler rely on; and,
where the Debian `prometheus` package is installed, a real Prometheus scraping a real Triton and gateway with
the file's static jobs and answering every dashboard query."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT
from test_entrypoint import free_port
from test_grafana_dashboard import load as load_dashboard
from test_grafana_dashboard import queries

CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"


def jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}


def test_static_jobs_scrape_triton_and_gateway_ports() -> None:
    j = jobs()
    assert j["glmv-serve-triton"]["static_configs"][0]["targets"] == ["localhost:8002"]
    assert j["glmv-serve-gateway"]["static_configs"][0]["targets"] == ["localhost:8080"]
    for name in ("glmv-serve-triton", "glmv-serve-gateway"):
        assert j[name]["metrics_path"] == "/metrics"


def test_kubernetes_job_keeps_the_deployment_metric_ports_and_adds_pod_labels() -> None:
    job = jobs()["glmv-serve-pods"]
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "30-deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    relabel = job["relabel_configs"]
    keep_ports = next(
        r for r in relabel if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    )
    assert set(keep_ports["regex"].split("|")) == {"metrics", "http"} <= port_names
    keep_app = next(
        r for r in relabel if r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    )
    assert keep_app["regex"] == deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    targets = {r["target_label"]: r["source_labels"] for r in relabel if "target_label" in r}
    # the prometheus-adapter rule maps these two labels to the namespace and pod resources
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [deployment["metadata"]["namespace"]]


def static_only_config(triton_metrics_port: int, gateway_port: int) -> dict[str, Any]:
    """The file's static jobs with their targets moved to the test's ports. Debian builds Prometheus without
    Kubernetes service discovery, so the kubernetes_sd job is left out here."""
    config = yaml.safe_load(CONFIG.read_text())
    config["scrape_configs"] = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" not in j]
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    ports = {"glmv-serve-triton": triton_metrics_port, "glmv-serve-gateway": gateway_port}
    for job in config["scrape_configs"]:
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{ports[job['job_name']]}"]
    return config


def test_static_jobs_pass_promtool(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(static_only_config(8002, 8080)))
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def query(prometheus_port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian package) not installed")
def test_real_prometheus_scrapes_triton_and_gateway(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    http, grpc, metrics, gateway, prom = (free_port() for _ in range(5))
    repo = tmp_path / "model_repository"  # empty: Triton serves its own metrics with no models
    repo.mkdir()
    bin_dir = Path(sys.executable).parent
    log = (tmp_path / "servers.log").open("wb")
    processes.append(
        subprocess.Popen(
            [str(bin_dir / "glmv-serve"), "--model-repository", str(repo), "--http-port", str(http)]
            + [
                "--grpc-port",
                str(grpc),
                "--metrics-port",
                str(metrics),
                "--log-file",
                str(tmp_path / "triton.log"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    processes.append(
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "--triton-url", f"localhost:{grpc}", "--port", str(gateway)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(static_only_config(metrics, gateway)))
    processes.append(
        subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
            + [f"--web.listen-address=127.0.0.1:{prom}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )

    deadline = time.monotonic() + 120
    up: dict[str, str] = {}
    while time.monotonic() < deadline:
        for proc in processes:
            assert proc.poll() is None, (tmp_path / "servers.log").read_text()
        try:
            up = {r["metric"]["job"]: r["value"][1] for r in query(prom, "up")["data"]["result"]}
        except OSError:
            up = {}
        if up == {"glmv-serve-triton": "1", "glmv-serve-gateway": "1"}:
            break
        time.sleep(1)
    assert up == {"glmv-serve-triton": "1", "glmv-serve-gateway": "1"}, (tmp_path / "servers.log").read_text()

    triton_series = query(prom, 'count({job="glmv-serve-triton", __name__=~"nv_.+"})')["data"]["result"]
    assert triton_series and int(triton_series[0]["value"][1]) > 0
    gateway_series = query(prom, 'count({job="glmv-serve-gateway", __name__=~"glmv_gateway_.+"})')["data"][
        "result"
    ]
    assert gateway_series and int(gateway_series[0]["value"][1]) > 0
    # Every dashboard query runs on the real query engine (results may be empty without traffic).
    for title, expr in queries(load_dashboard()):
        answer = query(prom, expr)
        assert answer["status"] == "success", f"{title}: {answer}"
