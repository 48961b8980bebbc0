"""The GPU harness's bookkeeping, on CPU: phase isolation, partial JSON, ratios, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_harness import Harness, comparisons, plot_comparison, table


def _doc(device: str, baseline: dict) -> dict:
    return {
        "meta": {"date": "2026-11-21", "commit": "abc1234", "device": device},
        "phases": {
            "roofline": {
                "decode_ms_per_token_b1": 5.8,
                "decode_tok_s_b32_448": 4000.0,
                "decode_tok_s_b32_1288": 3000.0,
            },
            "baseline": baseline,
            "serve": {
                "ttft_1288": {"ttft_ms": {"p50": 65.0}},
                "ttft_448": {"ttft_ms": {"p50": 30.0}},
                "decode_b1": {"ms_per_token": 11.6},
                "c32_448": {"output_tok_s": 2000.0},
                "c32_1288": {"output_tok_s": 1500.0},
                "c64_1288": {"requests": 128, "errors": 0, "output_tok_s": 2100.0},
                "c128_1288": {"skipped": "time budget: 20 s left"},
            },
        },
    }


def test_ratios_against_a_measured_baseline() -> None:
    doc = _doc(
        "NVIDIA H100 80GB HBM3", {"ttft_ms": 130.0, "decode_ms_per_token": 116.0, "batch_tok_s": 250.0}
    )
    cmp = comparisons(doc)
    assert cmp["ours_over_transformers"] == {
        "ttft_1288_ms": 0.5,
        "decode_ms_per_token_b1": 0.1,
        "tok_s_c32_448": 8.0,
    }
    assert cmp["ours_over_roofline"]["decode_ms_per_token_b1"] == 2.0
    assert cmp["ours_over_roofline"]["tok_s_c32_448"] == 0.5
    assert set(cmp["transformers_source"].values()) == {"measured"}


def test_missing_baseline_falls_back_to_the_labelled_reference() -> None:
    cmp = comparisons(_doc("NVIDIA H200", {}))
    assert cmp["transformers"]["decode_ms_per_token_b1"] == 88.0
    assert cmp["transformers_source"]["decode_ms_per_token_b1"].startswith("reference: ARCHITECTURE.md")
    assert comparisons(_doc("some other GPU", {}))["transformers"]["ttft_1288_ms"] is None


def test_table_and_plot(tmp_path: Path) -> None:
    doc = _doc("NVIDIA H100 80GB HBM3", {"ttft_ms": 130.0})
    doc["comparison"] = comparisons(doc)
    text = table(doc)
    assert "decode ms/token b1" in text
    assert "c64_1288: 128 ok, 0 errors" in text
    assert "c128_1288: time budget" in text
    # a run with requests names the preprocessing model's compute per request (how fast the host was)
    doc["phases"]["serve"]["c32_448"] |= {
        "requests": 64, "errors": 0, "rps": 20.0, "ttft_ms": {"p50": 100.0, "p99": 400.0},
        "itl_ms": {"p50": 8.0, "p99": 28.0}, "response_gap_ms": {"p50": 36.0, "p99": 70.0},
        "stages": {"preprocessing": {"compute_infer_ms": 3.94}},
    }  # fmt: skip
    line = next(x for x in table(doc).splitlines() if x.startswith("c32_448: 20.00 req/s"))
    assert line.endswith("preprocessing 3.9 ms/request"), line
    # with the engine's side of the run: the tokens' gaps as it made them, the way out, full collections
    doc["phases"]["serve"]["c32_448"]["engine"] = {
        "gc_full_collections": 0, "gc_full_ms": 0.0,
        "stub_gc_full_collections": 2, "stub_gc_full_ms": 61.4,
    }  # fmt: skip
    doc["phases"]["serve"]["c32_448"]["client_gc"] = {"full_collections": 1, "ms": 12.6}
    doc["phases"]["serve"]["c32_448"] |= {
        "engine_itl_ms": {"p50": 7.84, "p99": 19.5}, "path_ms": {"p50": 3.1, "p99": 9.25},
    }  # fmt: skip
    line = next(x for x in table(doc).splitlines() if x.startswith("c32_448: 20.00 req/s"))
    assert (
        "response gap P50/P99 36.0/70.0 ms, engine ITL P50/P99 7.8/19.5 ms, path P50/P99 3.1/9.2 ms, " in line
    )
    end = "engine GC 0 (0 ms), stub GC 2 (61 ms), client GC 1 (13 ms)"
    assert line.endswith(f"3.9 ms/request, {end}"), line
    # the preprocessing thread's CPU time per request beside its compute, where read
    doc["phases"]["serve"]["c32_448"]["preprocess_cpu_ms"] = {"request": 1.26}
    line = next(x for x in table(doc).splitlines() if x.startswith("c32_448: 20.00 req/s"))
    assert line.endswith(f"3.9 ms/request (thread CPU 1.3), {end}"), line
    plot_comparison(doc, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_table_names_each_large_image_size() -> None:
    doc = _doc("NVIDIA H100 80GB HBM3", {})
    doc["comparison"] = comparisons(doc)
    doc["phases"]["serve"]["large_images"] = {
        "1920x1080": {"requests": 5, "errors": 0, "ttft_ms": {"p50": 326.4}, "server_ttft_ms": {"p50": 287.7},
                      "pre_llm_ms": {"p50": 35.2}},
        "3840x2160": {"requests": 4, "errors": 1, "ttft_ms": {"p50": 603.6}},
    }  # fmt: skip
    lines = table(doc).splitlines()
    assert "large_images 1920x1080: TTFT P50 326 ms (server 288, send -> llm 35), 5 ok, 0 errors" in lines
    assert "large_images 3840x2160: TTFT P50 604 ms (server 0, send -> llm 0), 4 ok, 1 errors" in lines


def test_a_failing_phase_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    harness = Harness(tmp_path, budget_s=60, commit="abc1234")
    with harness.phase("broken", 0) as rec:
        rec["partial"] = 1
        raise RuntimeError("no GPU here")
    with harness.phase("fine", 0) as rec:
        rec["value"] = 2
    with harness.phase("too_long", 600) as rec:
        assert rec is None
    harness.log_file.close()
    saved = json.loads((tmp_path / "harness.json").read_text())["phases"]
    assert saved["broken"]["ok"] is False and saved["broken"]["error"] == "RuntimeError: no GPU here"
    assert saved["broken"]["partial"] == 1
    assert saved["fine"] == {"value": 2, "ok": True, "seconds": saved["fine"]["seconds"]}
    assert saved["too_long"]["skipped"].startswith("time budget")


def test_stage_breakdown_is_the_per_execution_mean_between_two_snapshots() -> None:
    from benchmarks.gpu_harness import stage_breakdown

    before = {
        "llm": {"executions": 10, "queue": (10, 50_000_000), "compute_infer": (10, 20_000_000)},
        "idle": {"executions": 3, "queue": (3, 3_000_000)},
    }
    after = {
        "llm": {"executions": 14, "queue": (14, 58_000_000), "compute_infer": (14, 30_000_000)},
        "idle": {"executions": 3, "queue": (3, 3_000_000)},
        "new": {"executions": 2, "compute_output": (2, 1_000_000)},
    }
    assert stage_breakdown(before, after) == {
        "llm": {"executions": 4, "queue_ms": 2.0, "compute_infer_ms": 2.5},
        "new": {"executions": 2, "compute_output_ms": 0.5},
    }


def test_add_stats_takes_the_stages_of_some_requests_apart() -> None:
    """Stages of the requests between snapshots 0-1 and 2-3 only, not of those between 1 and 2."""
    from benchmarks.gpu_harness import add_stats, stage_breakdown

    snaps = [
        {"pre": {"executions": 0, "compute_infer": (0, 0)}},
        {"pre": {"executions": 1, "compute_infer": (1, 20_000_000)}},  # a cold request: 20 ms
        {"pre": {"executions": 2, "compute_infer": (2, 23_000_000)}},  # a warm one: 3 ms
        {"pre": {"executions": 3, "compute_infer": (3, 45_000_000)}, "llm": {"executions": 1}},  # cold: 22 ms
    ]
    cold = add_stats(add_stats({}, snaps[0], snaps[1]), snaps[2], snaps[3])
    warm = add_stats({}, snaps[1], snaps[2])
    assert stage_breakdown({}, cold) == {
        "pre": {"executions": 2, "compute_infer_ms": 21.0},
        "llm": {"executions": 1},
    }
    assert stage_breakdown({}, warm) == {"pre": {"executions": 1, "compute_infer_ms": 3.0}}
