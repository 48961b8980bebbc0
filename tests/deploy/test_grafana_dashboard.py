"""deploy/grafana/glmv-dashboard.json: valid dashboard JSON, generated from generate_dashboard.py, every panel
query parses as PromQL (promql-parser; also Prometheus's own parser through promtool when installed) and uses
only the metric names listed at the top of the generator."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import pytest
import yaml
from conftest import REPO_ROOT

GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "glmv-dashboard.json"
# Grafana replaces these before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${datasource}": "prometheus"}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_dashboard", GRAFANA_DIR / "generate_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, Grafana variables substituted."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def selector_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_committed_json_is_what_the_generator_writes() -> None:
    assert DASHBOARD.read_text() == generator().render(), "run python deploy/grafana/generate_dashboard.py"


def test_dashboard_shape() -> None:
    dashboard = load()
    assert dashboard["uid"] == "glmv-serve" and dashboard["schemaVersion"] >= 36
    (datasource,) = dashboard["templating"]["list"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24
        for dx in range(pos["w"]):
            for dy in range(pos["h"]):
                cell = (pos["x"] + dx, pos["y"] + dy)
                assert cell not in cells, f"{panel['title']} overlaps another panel"
                cells.add(cell)
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_required_panels_are_there() -> None:
    titles = {p["title"] for p in load()["panels"]}
    for required in (
        "Time to first token",
        "Inter-token latency",
        "Queue: waiting and running",
        "KV cache usage",
        "Request rate",
        "Errors by status",
        "Preemptions and engine restarts",
    ):
        assert required in titles
    ttft = next(p for p in load()["panels"] if p["title"] == "Time to first token")
    assert {t["legendFormat"] for t in ttft["targets"]} >= {"engine P50", "engine P95"}


def test_every_query_parses_and_uses_only_listed_metrics() -> None:
    gen = generator()
    listed: set[str] = set()
    for name, kind, _ in gen.METRICS.values():
        listed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    for title, expr in queries(load()):
        names = selector_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        assert names <= listed, f"{title}: {sorted(names - listed)} not in METRICS of generate_dashboard.py"
    # Every listed series (name + matchers) has a panel: a metric nobody looks at is a stale entry.
    all_exprs = "\n".join(target["expr"] for panel in load()["panels"] for target in panel.get("targets", []))
    for key in gen.METRICS:
        selector = gen.m(key)
        assert selector.split("{")[0] in all_exprs and (gen.METRICS[key][2] in all_exprs), key


def test_histograms_are_quantiles_of_bucket_rates() -> None:
    for title, expr in queries(load()):
        if "_bucket" in expr:
            assert expr.startswith("histogram_quantile(") and "sum by (le" in expr and "rate(" in expr, title


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_queries_pass_prometheus_own_parser(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries(load()))
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
