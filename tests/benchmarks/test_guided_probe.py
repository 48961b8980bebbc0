"""benchmarks.guided_probe on CPU (the tiny model): both loops run, every guided answer's masks are filled,
and the report has the fields the GPU runs are read by."""

from __future__ import annotations

import json
from pathlib import Path


def test_guided_probe_cpu_smoke(tmp_path: Path) -> None:
    from benchmarks.guided_probe import main

    args = ["--out", str(tmp_path), "--device", "cpu", "--concurrency", "2", "--duration", "0.5"]
    assert main([*args, "--max-tokens", "24", "--grammar-threads", "2"]) == 0
    res = json.loads((tmp_path / "guided_probe.json").read_text())
    guided, plain, single = res["with_schema"], res["without_schema"], res["with_schema_threads_2"]
    for run in (guided, plain, single):
        assert run["requests"] >= 2 and run["output_tok_s"] > 0 and run["ttft_ms"]["p50"] is not None
        assert run["engine"]["steps"] > 0
    # the guided answers' masks were filled; the plain run has none; both decode the same lengths
    assert guided["engine"]["mask_fill_ms"]["p50"] is not None
    assert (
        plain["engine"]["mask_fill_ms"]["p50"] is None and plain["engine"]["mask_prepare_ms"]["p50"] is None
    )
    assert plain["mean_output_tokens"] == round(guided["mean_output_tokens"])
    assert res["with_over_without"] == round(guided["output_tok_s"] / plain["output_tok_s"], 3)
