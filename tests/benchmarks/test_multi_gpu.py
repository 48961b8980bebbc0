"""benchmarks.multi_gpu: how evenly Triton split the requests between llm instances, read from metrics."""

from __future__ import annotations

from benchmarks.multi_gpu import finished_per_instance

BODY = """# HELP glmv_requests_finished_total Requests finished, by finish_reason
# TYPE glmv_requests_finished_total counter
glmv_requests_finished_total{finish_reason="abort",model="llm",model_instance="llm_0_0",version="1"} 2
glmv_requests_finished_total{finish_reason="length",model="llm",model_instance="llm_0_0",version="1"} 40
glmv_requests_finished_total{finish_reason="length",model="llm",model_instance="llm_0_1",version="1"} 23
glmv_requests_finished_total{finish_reason="stop",model="llm",model_instance="llm_0_1",version="1"} 1
glmv_requests_finished_total{finish_reason="stop",model="llm",version="1"} 7
nv_trt_llm_request_metrics{model="llm",model_instance="llm_0_0",request_type="waiting",version="1"} 5
"""


def test_finished_requests_are_summed_per_llm_instance() -> None:
    assert finished_per_instance(BODY) == {"llm_0_0": 42.0, "llm_0_1": 24.0}
    assert finished_per_instance("") == {}
