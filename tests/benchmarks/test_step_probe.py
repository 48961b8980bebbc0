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
    assert engine["steps_profiled"] == 0  # no GPU profile on CPU
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
        r["chunks"] >= 1
        and r["chunk_tokens"] >= 2 * r["chunks"]
        and r["max_context"] * r["chunks"] >= r["chunk_tokens"]
        for r in mixed
    )
    assert not any(r["vit_capture"] for r in slowest)
    # when each ran (seconds into the measured loop), what it cost the stepping thread, what joined in it
    assert all(0 <= r["t_s"] <= res["wall_s"] + 1 and 0 <= r["cpu_ms"] for r in slowest)
    assert all(r["new"] >= 0 and r["profiled"] is False for r in slowest)


def test_steps_overlapping_the_profile_window_are_kept_apart() -> None:
    """The profiler's start and stop stall the stepping thread: steps that overlap its window are counted
    apart by path ("+profiled") and left out of the by-kind figures."""
    import collections

    from benchmarks.step_probe import _StepRecorder

    recorder = _StepRecorder.__new__(_StepRecorder)  # its bookkeeping only: no engine to wrap
    recorder.started, recorder.profiled = 100.0, None
    recorder.parts = collections.defaultdict(float)

    def record(t_s: float, ms: float) -> dict:
        return {"t_s": t_s, "ms": ms, "kind": "mixed", "path": "split_graph", "vit_capture": False}

    # the window: 2.0 s to 4.5 s into the run; a step from 1.9 s for 150 ms overlaps it, one ending at
    # 1.95 s does not, nor one starting at 4.6 s
    recorder.records = [
        record(1.0, 20.0),
        record(1.93, 20.0),
        record(1.9, 150.0),
        record(3.0, 600.0),
        record(4.6, 21.0),
    ]
    recorder.set_profiled(102.0, 104.5)
    res = recorder.take()
    assert res["steps"] == 5 and res["steps_profiled"] == 2
    assert res["step_ms_by_kind"]["mixed"]["count"] == 3 and res["step_ms_by_kind"]["mixed"]["p99"] < 22
    by_path = res["step_ms_by_path"]
    assert by_path["mixed/split_graph"]["count"] == 3
    assert by_path["mixed/split_graph+profiled"]["count"] == 2
    assert by_path["mixed/split_graph+profiled"]["max"] == 600.0
    assert [r["profiled"] for r in res["slowest_steps"][:2]] == [True, True]
    assert recorder.profiled is None and recorder.records == []  # the next take starts afresh
