"""deploy/k8s: every manifest validates (strict, offline schemas of kubernetes-validate) and the invariants the
deployment relies on hold: one GPU per replica, probe paths and ports, Service ports that reach the container,
the HPA metric that the prometheus-adapter rule exposes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml
from conftest import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
# The newest schemas bundled, and the oldest Kubernetes release still in common use that we claim to support.
KUBERNETES_VERSIONS = ("1.37.0", "1.30.0")


def manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def all_resources() -> list[dict[str, Any]]:
    out = []
    for path in manifest_files():
        out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        r for r in all_resources() if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    (c,) = resource("Deployment", "glmv-serve")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates(path: Path, version: str) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} has no resources"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_expected_resources_exist() -> None:
    kinds = {(r["kind"], r["metadata"]["name"]) for r in all_resources()}
    for expected in [
        ("Namespace", "glmv"),
        ("ConfigMap", "glmv-serve-config"),
        ("PersistentVolumeClaim", "glmv-checkpoint"),
        ("Deployment", "glmv-serve"),
        ("Service", "glmv-serve"),
        ("PodDisruptionBudget", "glmv-serve"),
        ("HorizontalPodAutoscaler", "glmv-serve"),
        ("ConfigMap", "prometheus-adapter"),
    ]:
        assert expected in kinds
    for r in all_resources():
        if r["kind"] != "Namespace" and r["metadata"]["name"] != "prometheus-adapter":
            assert r["metadata"]["namespace"] == "glmv", r["metadata"]["name"]


def test_one_gpu_per_replica() -> None:
    resources = container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]


def test_probes_ask_the_right_endpoints() -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "grpc": 8001, "metrics": 8002, "triton-http": 8000}
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["exec"]["command"] == [
        "python3",
        "/opt/glmv-serve/docker/healthcheck.py",
        "triton-ready",
        "gateway-ready",
    ]
    # The start-up budget covers a first engine build of the full model.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    # The health script's per-check timeout (2 checks) fits in the probe's timeout.
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert 2 * float(env["GLMV_HEALTH_TIMEOUT"]) < c["readinessProbe"]["timeoutSeconds"]
    # Ports the entrypoint and health script read agree with the declared container ports.
    assert int(env["GLMV_GATEWAY_PORT"]) == ports["http"]
    assert int(env["GLMV_GRPC_PORT"]) == ports["grpc"]
    assert int(env["GLMV_METRICS_PORT"]) == ports["metrics"]
    assert int(env["GLMV_HTTP_PORT"]) == ports["triton-http"]


def test_service_ports_reach_the_container() -> None:
    c = container()
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    service = resource("Service", "glmv-serve")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(by_name) == {"http", "grpc", "metrics"}
    for name, port in by_name.items():
        assert port["targetPort"] == name and container_ports[name] == port["port"]
    labels = resource("Deployment", "glmv-serve")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_selectors_match_the_pods() -> None:
    deployment = resource("Deployment", "glmv-serve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = resource("PodDisruptionBudget", "glmv-serve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_volumes_match_the_image() -> None:
    spec = resource("Deployment", "glmv-serve")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    assert mounts["/models/checkpoint"]["readOnly"] is True
    assert "/models/engine" in mounts and "/dev/shm" in mounts
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert (
        volumes[mounts["/models/checkpoint"]["name"]]["persistentVolumeClaim"]["claimName"]
        == "glmv-checkpoint"
    )
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # The image's user (Dockerfile ARG GLMV_UID) runs the pod and owns the volumes.
    assert spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["fsGroup"] == 10001
    assert "ARG GLMV_UID=10001" in (REPO_ROOT / "Dockerfile").read_text()
    # Grace period covers preStop + gateway drain + Triton stop.
    config = resource("ConfigMap", "glmv-serve-config")["data"]
    needed = 5 + int(config["GLMV_DRAIN_TIMEOUT"]) + int(config["GLMV_STOP_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > needed


def test_configmap_gateway_settings_are_gateway_fields() -> None:
    from gateway.config import ENV_PREFIX, GatewayConfig

    data = resource("ConfigMap", "glmv-serve-config")["data"]
    gateway_env = {k: v for k, v in data.items() if k.startswith(ENV_PREFIX)}
    assert gateway_env
    GatewayConfig.from_sources([], environ=gateway_env)  # every value parses and validates


def test_hpa_scales_the_deployment_on_the_adapter_metric() -> None:
    hpa = resource("HorizontalPodAutoscaler", "glmv-serve")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "glmv-serve",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "glmv_engine_num_waiting"

    adapter = yaml.safe_load(resource("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == name
    # The adapter reads the series the dashboard shows as the queue (one list of metric names).
    series, _, matchers = dashboard_metrics()["engine_waiting"]
    assert rule["seriesQuery"].startswith(f"{series}{{{matchers},")
    assert rule["name"]["matches"] == f"^{series}$"
    assert matchers in rule["metricsQuery"]
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    # The query the adapter sends for one namespace's pods, as its templates expand it, is valid PromQL.
    expanded = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="glmv",pod=~"glmv-serve-a|glmv-serve-b"')
        .replace("<<.GroupBy>>", "pod")
    )
    promql_parser.parse(expanded)
    promql_parser.parse(rule["seriesQuery"])


def dashboard_metrics() -> dict[str, tuple[str, str, str]]:
    from test_grafana_dashboard import generator

    return generator().METRICS
