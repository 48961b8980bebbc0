"""Write deploy/grafana/glmv-dashboard.json, the Grafana dashboard of glmv-serve.

    python deploy/grafana/generate_dashboard.py            # rewrite the JSON next to this file
    python deploy/grafana/generate_dashboard.py --check    # exit 1 if the committed JSON is out of date

Every metric the panels query is named once, in METRICS below: when a metric is renamed in the engine, the
gateway or Triton, change it here and regenerate. tests/deploy/test_grafana_dashboard.py checks that every
panel query parses as PromQL and uses only these names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# key used in the queries below -> (Prometheus metric name, type, label matchers that pick the series).
# Histograms are queried as <name>_bucket.
METRICS: dict[str, tuple[str, str, str]] = {
    # engine: the llm model's pb_utils metrics on Triton's metrics port (:8002); the queue and KV families
    # use TensorRT-LLM's names and labels (model_repository/llm/1/metrics.py)
    "engine_waiting": ("nv_trt_llm_request_metrics", "gauge", 'request_type="waiting"'),
    "engine_running": ("nv_trt_llm_request_metrics", "gauge", 'request_type="scheduled"'),
    "engine_kv_used": ("nv_trt_llm_kv_cache_block_metrics", "gauge", 'kv_cache_block_type="used"'),
    "engine_kv_total": ("nv_trt_llm_kv_cache_block_metrics", "gauge", 'kv_cache_block_type="max"'),
    "engine_ttft": ("glmv_time_to_first_token_seconds", "histogram", ""),
    "engine_itl": ("glmv_inter_token_latency_seconds", "histogram", ""),
    "engine_preemptions": ("glmv_preemptions_total", "counter", ""),
    "engine_restarts": ("glmv_engine_restarts_total", "counter", ""),
    "engine_steps": ("glmv_engine_steps_total", "counter", ""),
    "engine_steps_ahead": ("glmv_engine_steps_ahead_total", "counter", ""),
    "engine_gc": ("glmv_engine_gc_collections_total", "counter", ""),
    "engine_gc_seconds": ("glmv_engine_gc_seconds_total", "counter", ""),
    "model_gc": ("glmv_model_gc_collections_total", "counter", ""),  # labels model, model_instance
    "model_gc_seconds": ("glmv_model_gc_seconds_total", "counter", ""),
    "engine_finished": ("glmv_requests_finished_total", "counter", ""),  # label finish_reason
    # preprocessing model (:8002)
    "preprocess_latency": ("glmv_preprocess_latency_seconds", "histogram", ""),
    "preprocess_errors": ("glmv_preprocess_errors_total", "counter", ""),
    # gateway (:8080/metrics, gateway/metrics.py)
    "gateway_requests": ("glmv_gateway_requests_total", "counter", ""),  # labels endpoint, status
    "gateway_latency": ("glmv_gateway_request_latency_seconds", "histogram", ""),  # labels endpoint, stream
    "gateway_ttft": ("glmv_gateway_ttft_seconds", "histogram", ""),
    "gateway_in_flight": ("glmv_gateway_requests_in_flight", "gauge", ""),
    # Triton's own (:8002)
    "triton_success": ("nv_inference_request_success", "counter", 'model="ensemble"'),
    "triton_failure": ("nv_inference_request_failure", "counter", 'model="ensemble"'),  # label reason
    "triton_gpu_utilization": ("nv_gpu_utilization", "gauge", ""),  # 0..1, label gpu_uuid
    "triton_gpu_memory_used": ("nv_gpu_memory_used_bytes", "gauge", ""),
    "triton_gpu_memory_total": ("nv_gpu_memory_total_bytes", "gauge", ""),
}

RATE = "$__rate_interval"
NOT_2XX = 'status!~"2.."'
IS_5XX = 'status=~"5.."'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
OUTPUT = Path(__file__).resolve().parent / "glmv-dashboard.json"


def m(key: str, extra: str = "") -> str:
    """The series selector of METRICS[key] (histograms: their _bucket series), with `extra` matchers added."""
    name, kind, matchers = METRICS[key]
    name = f"{name}_bucket" if kind == "histogram" else name
    labels = ", ".join(part for part in (matchers, extra) if part)
    return f"{name}{{{labels}}}" if labels else name


def quantile(q: float, key: str, by: str = "") -> str:
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({m(key)}[{RATE}])))"


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(
    title: str, description: str, unit: str, targets: list[tuple[str, str]], **options: Any
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}}
    defaults.update(options.pop("defaults", {}))
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        **options,
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def panels() -> list[dict[str, Any]]:
    """Rows of panels, in reading order; grid positions are assigned by layout()."""
    return [
        row("Latency"),
        panel(
            "Time to first token",
            "Engine: arrival to first generated token (queue + vision + prefill). Gateway: HTTP request to first "
            "streamed text, so it adds preprocessing and transport.",
            "s",
            [
                (quantile(0.5, "engine_ttft"), "engine P50"),
                (quantile(0.95, "engine_ttft"), "engine P95"),
                (quantile(0.95, "gateway_ttft"), "gateway P95"),
            ],
        ),
        panel(
            "Inter-token latency",
            "Engine: time between consecutive tokens of one sequence (decode step time as a request sees it).",
            "s",
            [(quantile(0.5, "engine_itl"), "P50"), (quantile(0.95, "engine_itl"), "P95")],
        ),
        panel(
            "Gateway request latency",
            "Request received to last byte sent, by streaming or not.",
            "s",
            [
                (quantile(0.5, "gateway_latency", "stream"), "P50 stream={{stream}}"),
                (quantile(0.95, "gateway_latency", "stream"), "P95 stream={{stream}}"),
            ],
        ),
        panel(
            "Preprocessing time",
            "Preprocessing model: decode, resize, chat template and tokenization of one request.",
            "s",
            [(quantile(0.5, "preprocess_latency"), "P50"), (quantile(0.95, "preprocess_latency"), "P95")],
        ),
        row("Traffic and errors"),
        panel(
            "Request rate",
            "Gateway requests per second by endpoint, and requests the Triton ensemble completed.",
            "reqps",
            [
                (f"sum by (endpoint) (rate({m('gateway_requests')}[{RATE}]))", "gateway {{endpoint}}"),
                (f"sum(rate({m('triton_success')}[{RATE}]))", "Triton ensemble success"),
            ],
        ),
        panel(
            "Errors by status",
            "Gateway answers with a status other than 2xx, by status code; failed Triton ensemble requests by "
            "reason; requests the preprocessing model refused (bad image, over a limit).",
            "reqps",
            [
                (
                    f"sum by (status) (rate({m('gateway_requests', NOT_2XX)}[{RATE}]))",
                    "gateway {{status}}",
                ),
                (f"sum by (reason) (rate({m('triton_failure')}[{RATE}]))", "Triton {{reason}}"),
                (f"sum(rate({m('preprocess_errors')}[{RATE}]))", "preprocessing refused"),
            ],
        ),
        panel(
            "Finished requests by reason",
            "Requests the engine finished per second: stop (end of answer), length (max_tokens), abort "
            "(cancelled or the client left).",
            "reqps",
            [(f"sum by (finish_reason) (rate({m('engine_finished')}[{RATE}]))", "{{finish_reason}}")],
        ),
        panel(
            "Error ratio",
            "Share of gateway requests answered with 5xx.",
            "percentunit",
            [
                (
                    f"sum(rate({m('gateway_requests', IS_5XX)}[{RATE}])) "
                    f"/ clamp_min(sum(rate({m('gateway_requests')}[{RATE}])), 1e-9)",
                    "5xx / all",
                )
            ],
            defaults={"min": 0, "max": 1},
        ),
        row("Queue and capacity"),
        panel(
            "Queue: waiting and running",
            "Requests waiting for the scheduler (the autoscaling signal) and sequences holding KV blocks, per "
            "replica; gateway requests in flight.",
            "short",
            [
                (f"sum by (instance) ({m('engine_waiting')})", "waiting {{instance}}"),
                (f"sum by (instance) ({m('engine_running')})", "running {{instance}}"),
                (f"sum({m('gateway_in_flight')})", "gateway in flight"),
            ],
        ),
        panel(
            "KV cache usage",
            "KV blocks in use / KV blocks in the cache, per replica.",
            "percent",
            [
                (
                    f"100 * sum by (instance) ({m('engine_kv_used')}) "
                    f"/ clamp_min(sum by (instance) ({m('engine_kv_total')}), 1)",
                    "{{instance}}",
                )
            ],
            defaults={"min": 0, "max": 100},
        ),
        panel(
            "Preemptions and engine restarts",
            "Sequences preempted (KV blocks freed, recomputed later) per second: steady preemption means the KV "
            "cache is too small for the load. Engine restarts: new engine processes started after one died "
            "(--engine-process); any is worth a look in the server log.",
            "ops",
            [
                (f"sum by (instance) (rate({m('engine_preemptions')}[{RATE}]))", "preempted {{instance}}"),
                (f"sum by (instance) (increase({m('engine_restarts')}[{RATE}]))", "restarts {{instance}}"),
            ],
        ),
        panel(
            "Engine steps",
            "Engine steps per second, and those of them that were decode steps launched before the previous "
            "step's tokens were read (the host's work for one step hidden behind the GPU's for the next). While "
            "only decodes run, the two lines should nearly meet; a gap means the host is in the decode path "
            "(penalties, logprobs, arrivals or ends every step).",
            "ops",
            [
                (f"sum by (instance) (rate({m('engine_steps')}[{RATE}]))", "steps {{instance}}"),
                (f"sum by (instance) (rate({m('engine_steps_ahead')}[{RATE}]))", "ahead {{instance}}"),
            ],
        ),
        panel(
            "Engine garbage collection",
            "Full (generation 2) garbage collections of the engine's process per second, and the seconds per "
            "second they take; the same for each Python model's stub (the llm's own sends every streamed "
            "response, postprocessing passes each on). Each one stalls the thread it lands on, the engine "
            "loop's or the response sender's included: every stream waits. Each process freezes what it holds "
            "once it is set up (the engine's when its loop starts, so one is counted then), and few should "
            "follow.",
            "short",
            [
                (f"sum by (instance) (rate({m('engine_gc')}[{RATE}]))", "collections/s {{instance}}"),
                (f"sum by (instance) (rate({m('engine_gc_seconds')}[{RATE}]))", "seconds/s {{instance}}"),
                (f"sum by (model) (rate({m('model_gc')}[{RATE}]))", "stub collections/s {{model}}"),
                (f"sum by (model) (rate({m('model_gc_seconds')}[{RATE}]))", "stub seconds/s {{model}}"),
            ],
        ),
        panel(
            "GPU utilization and memory",
            "Triton's GPU metrics: utilization (0-100 %) and memory used.",
            "percentunit",
            [
                (f"avg by (gpu_uuid) ({m('triton_gpu_utilization')})", "util {{gpu_uuid}}"),
                (
                    f"sum by (gpu_uuid) ({m('triton_gpu_memory_used')}) "
                    f"/ clamp_min(sum by (gpu_uuid) ({m('triton_gpu_memory_total')}), 1)",
                    "memory {{gpu_uuid}}",
                ),
            ],
            defaults={"min": 0, "max": 1},
        ),
    ]


def layout(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows span the width; panels go three to a line, 8 units high."""
    y, x, panel_id = 0, 0, 1
    out = []
    for item in items:
        item = dict(item, id=panel_id)
        panel_id += 1
        if item["type"] == "row":
            if x:
                y, x = y + 8, 0
            item["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
        else:
            item["gridPos"] = {"h": 8, "w": 8, "x": x, "y": y}
            x += 8
            if x >= 24:
                y, x = y + 8, 0
        out.append(item)
    return out


def dashboard() -> dict[str, Any]:
    return {
        "uid": "glmv-serve",
        "title": "glmv-serve: GLM-4.6V-Flash on Triton",
        "description": "Latency, traffic, errors, queue and KV cache of glmv-serve (engine, gateway, Triton).",
        "tags": ["glmv-serve", "triton", "llm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
