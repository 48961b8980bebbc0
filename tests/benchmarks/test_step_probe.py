"""benchmarks.step_probe on CPU (the tiny model): the closed loop runs, every step is recorded by kind and
part, and the report has the fields the GPU runs are read by."""

from __future__ import annotations

import json
from pathlib import Path


def test_step_probe_cpu_smoke(tmp_path: Path) -> None:
    from benchmarks.step_probe import main

    args = ["--out", str(tmp_path), "--device", "cpu", "--concurrency", "2", "--duration", "2"]
    assert main([*args, "--max-tokens", "8", "--pool", "4"]) == 0
    res = json.loads((tmp_path / "step_probe.json").read_text())
    assert res["requests"] >= 4 and res["output_tok_s"] > 0 and res["mean_output_tokens"] == 8
    # the steady state leaves out the first two requests (the opening burst) and the drain
    steady = res["steady"]
    assert 1 <= steady["requests"] <= res["requests"] - 2 and steady["rps"] > 0
    assert steady["ttft_ms"]["p50"] is not None
    engine = res["engine"]
    kinds = engine["step_ms_by_kind"]
    assert sum(k["count"] for k in kinds.values()) == engine["steps"] > 0
    assert set(kinds) <= {"ahead", "sync_decode", "mixed", "prompt_only", "idle"}
    # prompts ran, and decodes (synchronously on CPU: no decode graphs to run ahead)
    assert "sync_decode" in kinds and ({"mixed", "prompt_only"} & set(kinds))
    assert {"vision", "schedule", "execute", "output"} <= set(engine["host_ms_by_part"])
    # the ViT's launches inside the vision queue's part (whole batches here: nothing splits on CPU)
    parts = engine["host_ms_by_part"]
    assert 0 < parts["vision: encode_images"] <= parts["vision"]
    assert res["gpu_window"] == {}  # no GPU to profile
    assert res["allocator"] == {} and res["vision_graphs"] == {}  # no CUDA allocator, no ViT graphs on CPU
    # the same steps by the runner's path (no graphs on CPU: every synchronous step runs eagerly), and the
    # slowest of them with their shapes
    by_path = engine["step_ms_by_path"]
    assert sum(p["count"] for p in by_path.values()) == engine["steps"]
    assert {k.split("/")[1] for k in by_path if not k.startswith(("idle/", "ahead/"))} == {"eager"}
    slowest = engine["slowest_steps"]
    assert 0 < len(slowest) <= 12 and slowest[0]["ms"] == max(p["max"] for p in by_path.values())
    assert [r["ms"] for r in slowest] == sorted((r["ms"] for r in slowest), reverse=True)
    mixed = [r for r in slowest if r["kind"] in ("mixed", "prompt_only")]
    assert all(
        r["chunks"] >= 1 and r["chunk_tokens"] >= 2 and r["max_context"] >= r["chunk_tokens"] for r in mixed
    )
    assert not any(r["vit_capture"] for r in slowest)
    # when each ran (seconds into the measured loop), what it cost the stepping thread, what joined in it
    assert all(0 <= r["t_s"] <= res["wall_s"] + 1 and 0 <= r["cpu_ms"] for r in slowest)
    assert all(r["new"] >= 0 for r in slowest)
