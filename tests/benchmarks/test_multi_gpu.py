"""benchmarks.multi_gpu: how evenly Triton split the requests between llm instances, read from metrics."""

from __future__ import annotations

import json

import pytest

from benchmarks.multi_gpu import instance_counters, per_instance_summary

BODY = """# HELP glmv_requests_finished_total Requests finished, by finish_reason
# TYPE glmv_requests_finished_total counter
glmv_requests_finished_total{finish_reason="abort",model="llm",model_instance="llm_0_0",version="1"} 2
glmv_requests_finished_total{finish_reason="length",model="llm",model_instance="llm_0_0",version="1"} 40
glmv_requests_finished_total{finish_reason="length",model="llm",model_instance="llm_0_1",version="1"} 23
glmv_requests_finished_total{finish_reason="stop",model="llm",model_instance="llm_0_1",version="1"} 1
glmv_requests_finished_total{finish_reason="stop",model="llm",version="1"} 7
nv_trt_llm_request_metrics{model="llm",model_instance="llm_0_0",request_type="waiting",version="1"} 5
glmv_inter_token_latency_seconds_bucket{le="0.01",model="llm",model_instance="llm_0_0",version="1"} 900
glmv_inter_token_latency_seconds_sum{model="llm",model_instance="llm_0_0",version="1"} 12.5
glmv_inter_token_latency_seconds_count{model="llm",model_instance="llm_0_0",version="1"} 1000
glmv_time_to_first_token_seconds_sum{model="llm",model_instance="llm_0_0",version="1"} 4.2
glmv_time_to_first_token_seconds_count{model="llm",model_instance="llm_0_0",version="1"} 42
"""


def test_counters_are_read_per_llm_instance() -> None:
    counters = instance_counters(BODY)
    assert sorted(counters) == ["llm_0_0", "llm_0_1"]
    assert counters["llm_0_0"] == {
        "finished": 42.0,
        "itl_s": 12.5,
        "itl_n": 1000.0,
        "ttft_s": 4.2,
        "ttft_n": 42.0,
    }
    assert counters["llm_0_1"] == {"finished": 24.0, "itl_s": 0.0, "itl_n": 0.0, "ttft_s": 0.0, "ttft_n": 0.0}
    assert instance_counters("") == {}


def test_summary_is_the_difference_between_two_scrapes() -> None:
    before = {"llm_0_0": {"finished": 2.0, "itl_s": 0.5, "itl_n": 100.0, "ttft_s": 0.2, "ttft_n": 2.0}}
    summary = per_instance_summary(before, instance_counters(BODY))
    assert summary == {
        "llm_0_0": {"requests": 40.0, "mean_itl_ms": 13.333, "mean_engine_ttft_ms": 100.0},
        "llm_0_1": {"requests": 24.0, "mean_itl_ms": None, "mean_engine_ttft_ms": None},
    }


@pytest.mark.slow
def test_gateway_placement_runs_on_cpu_servers(tmp_path) -> None:
    """`--placement gateway --workload reuse` with the tiny engine on two CPU servers: every request of the
    four-questions-per-image workload answered through the gateway, both servers used, hit rates reported."""
    from benchmarks.multi_gpu import main

    args = ["--out", str(tmp_path), "--preset", "tiny", "--device", "cpu", "--placement", "gateway"]
    args += ["--workload", "reuse", "--gpus", "2", "--concurrency-per-gpu", "2", "--images", "3"]
    args += ["--image-size", "112x112", "--max-tokens", "4"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "multi_gpu.json").read_text())
    one, two = doc["runs"]
    assert (one["placement"], one["target"], one["gpus"], two["gpus"]) == ("gateway", "openai", "0", "0,1")
    assert (one["requests"], one["errors"], two["requests"], two["errors"]) == (12, 0, 24, 0)
    assert 0 < one["cache_hit_rate"] < 1 and 0 < two["cache_hit_rate"] < 1
    assert sorted(two["requests_per_llm_instance"]) == ["server0/llm_0_0", "server1/llm_0_0"]
    assert sum(two["requests_per_llm_instance"].values()) == 24
    assert doc["scaling"]["reuse"]["rps"] > 0 and one["workload"]["kind"] == "reuse"
