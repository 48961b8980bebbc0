"""benchmarks.path_overhead end to end on CPU: the small preset served by the real Triton, text-only and
follow-up requests answered without errors, each model's stages read from Triton's statistics, the
preprocessing model's own stages from its metrics, and the
comparison plot drawn from the JSON it wrote."""

from __future__ import annotations

import json
from pathlib import Path


def test_path_overhead_runs_through_triton_and_compares(tmp_path: Path) -> None:
    from benchmarks.path_overhead import main

    assert main(["--out", str(tmp_path / "run"), "--requests", "2", "--cold-requests", "1"]) == 0
    doc = json.loads((tmp_path / "run" / "path_overhead.json").read_text())
    args = doc["meta"]["args"]
    assert (
        doc["meta"]["commit"]
        and args["requests"] == 2
        and args["cold_requests"] == 1
        and args["cold_seed"] >= 0
    )
    for kind, requests in (("text", 2), ("followup_1288", 2), ("new_1288", 1), ("new_4x1288", 1)):
        row = doc[kind]
        assert row["requests"] == requests and row["errors"] == 0, row["error_messages"]
        assert row["ttft_ms_p50"] > row["pre_llm_ms_p50"] > 0
        # each request went through every model of the ensemble once
        assert {m: s["executions"] for m, s in row["stages"].items() if m != "ensemble_sync"} == {
            "ensemble": requests, "preprocessing": requests, "llm": requests, "postprocessing": requests,
        }  # fmt: skip
        # the preprocessing model's own stages, one observation per request (its metrics)
        stages = row["preprocess_stages_ms"]
        assert set(stages) == {"inputs", "images", "template", "tokens", "positions", "outputs"}, stages
        assert all(ms >= 0 for ms in stages.values())
        assert row["preprocess_cpu_ms"] > 0  # its thread's CPU time per request
    # a new screenshot's decode and resize is its preprocessing's largest stage; text has no image work
    assert doc["new_1288"]["preprocess_stages_ms"]["images"] > doc["text"]["preprocess_stages_ms"]["images"]
    path = tmp_path / "run" / "path_overhead.json"
    assert main(["--out", str(tmp_path / "cmp"), "--compare", str(path), str(path)]) == 0
    assert (tmp_path / "cmp" / "path_overhead.png").stat().st_size > 10_000
