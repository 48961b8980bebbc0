"""benchmarks.gemv_bench's arithmetic and outputs on CPU: the decoder's layer shapes, a decode step's matmul
time from the per-layer figures, the split error figures, and the plot of a committed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gemv_bench
from benchmarks.results import REPO_ROOT


def test_layer_shapes_are_the_full_size_decoders() -> None:
    from benchmarks.engine_probe import _full_model_config

    shapes = gemv_bench._layer_shapes(_full_model_config())
    assert shapes == {
        "qkv": (4608, 4096, True, False),
        "o": (4096, 4096, False, False),
        "gate_up": (27392, 4096, False, True),
        "down": (4096, 13696, False, False),
        "lm_head": (151552, 4096, False, False),
    }


def test_step_sums_add_every_layer_and_the_lm_head() -> None:
    def rows(us: float) -> dict:
        return {"rows": {str(m): {"cublas": {"us": us * m}, "gemv": {"us": us}} for m in gemv_bench.ROWS}}

    layers = {
        "qkv": rows(1.0),
        "o": rows(2.0),
        "gate_up": rows(3.0),
        "down": rows(4.0),
        "lm_head": rows(100.0),
    }
    sums = gemv_bench.step_sums(layers, num_layers=40)
    assert sums["1"] == {"cublas": pytest.approx((40 * 10 + 100) / 1e3), "gemv": pytest.approx(0.5)}
    assert sums["16"]["cublas"] == pytest.approx(16 * 0.5)
    del layers["lm_head"]["rows"]["16"]["gemv"]  # a method missing for a layer: no sum for it at that M
    assert "gemv" not in gemv_bench.step_sums(layers, num_layers=40)["16"]


def test_prefill_bench_runs_each_layer_and_sums_a_prefill(capsys) -> None:
    """--prefill-rows on CPU with a stand-in timer (1 ms a call): every layer but the lm_head at each M,
    cuBLAS and the FP8 layer (its dequantized path here: no FP8 GEMM, so no rows handed over), and the
    sums over the layers."""
    import types

    mc = types.SimpleNamespace(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64,
        intermediate_size=96, vocab_size=100, num_hidden_layers=3,
    )  # fmt: skip
    calls: list[int] = []

    def one_ms(fns) -> float:
        for fn in fns:
            assert fn().dtype == torch.bfloat16
        calls.append(len(fns))
        return 1.0

    out = gemv_bench.prefill_bench(mc, (3, 5), device="cpu", time_ms=one_ms, span=1 << 16)
    assert set(out["layers"]) == {"qkv", "o", "gate_up", "down"}
    qkv = out["layers"]["qkv"]
    assert qkv["shape"] == [64 + 2 * 2 * 16, 64] and set(qkv["rows"]) == {"3", "5"}
    assert qkv["copies"] == 4  # 64 KiB of copies of a 16 KiB weight
    row = qkv["rows"]["5"]
    assert row["fp8_path"] == "dequant" and set(row) == {"fp8_path", "cublas", "fp8_layer"}
    assert row["cublas"] == {"us": 1000.0, "tflop_s": pytest.approx(2 * 5 * 128 * 64 / 1e-3 / 1e12)}
    assert out["sums_ms"] == {m: {"cublas": 12.0, "fp8_layer": 12.0} for m in ("3", "5")}  # 3 layers x 4
    assert len(calls) == 4 * 2 * 2
    assert "prefill matmuls, 3 layers, M=5: cublas 12.00 ms  fp8_layer 12.00 ms" in capsys.readouterr().out


def test_errors_are_split_at_near_zero_sums() -> None:
    ref = torch.tensor([1.0, -0.5, 1e-3, 0.0], dtype=torch.bfloat16)
    one_step = torch.tensor([1.0078125, -0.5, 1e-3, 0.0], dtype=torch.bfloat16)  # 1 + 2**-7: one step up
    assert gemv_bench._bf16_ulps(one_step, ref) == {"steps": 1, "near_zero_abs": 0.0}
    near_zero = torch.tensor([1.0, -0.5, 2e-3, -1e-3], dtype=torch.bfloat16)
    got = gemv_bench._bf16_ulps(near_zero, ref)
    assert got["steps"] == 0 and got["near_zero_abs"] == pytest.approx(1e-3, rel=1e-2)


def test_plot_of_a_committed_run(tmp_path: Path) -> None:
    run = (
        REPO_ROOT / "benchmarks/results/2026-12-06-h100-vit-auto-fp8-sweep-6a34ab5/call2/gemv/gemv_bench.json"
    )
    copy = tmp_path / "gemv_bench.json"
    copy.write_text(run.read_text())
    assert gemv_bench.main(["--plot", str(copy)]) == 0
    png = tmp_path / "gemv.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(run.read_text())
    assert doc["device"] == "NVIDIA H100 80GB HBM3" and set(doc["step_ms"]) == {
        str(m) for m in gemv_bench.ROWS
    }


def test_plot_of_a_committed_prefill_run(tmp_path: Path) -> None:
    """A --prefill-rows run's JSON draws its own figure: the 40-layer sums per M and each layer's rate."""
    run = REPO_ROOT / "benchmarks/results/2026-12-06-h100-fp8-prefill-tensorwise-90c08a0/gemv_bench.json"
    copy = tmp_path / "gemv_bench.json"
    copy.write_text(run.read_text())
    assert gemv_bench.main(["--plot", str(copy)]) == 0
    assert (tmp_path / "gemv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prefill = json.loads(run.read_text())["prefill"]
    assert set(prefill["sums_ms"]) == {"128", "320", "512", "1236"}
    assert set(prefill["sums_ms"]["320"]) == set(gemv_bench.PREFILL_LABELS)


def test_out_is_required_unless_plotting() -> None:
    with pytest.raises(SystemExit):
        gemv_bench.main([])


def test_sweep_candidates() -> None:
    bf16, fp8 = gemv_bench._configs(), gemv_bench._configs(fp8=True)
    assert len(bf16) == 36 and len(fp8) == 48 and set(bf16) < set(fp8)
    assert {cfg.block_k for cfg in fp8} == {128, 256, 512, 1024}
    assert {(cfg.num_warps, cfg.num_stages) for cfg in bf16} == {(4, 3), (4, 5), (8, 4), (4, 7)}
    from engine.kernels.gemv import config

    assert config(4096) in bf16 and config(13696) in bf16  # the defaults are among the candidates


def test_choice_sums_price_the_engines_choice_with_the_graph_timings() -> None:
    """`choice_sums`: per M, the layers' matmuls from the graph timings with the start-up timer's choice
    per kind, with the faster per kind and all row-wise; kinds or rows the graphs lack are left out."""

    def graph(tensorwise_us: float, rowwise_us: float) -> dict:
        return {"fp8_tensorwise": {"us": tensorwise_us}, "fp8_rows": {"us": rowwise_us}}

    prefill = {
        "layers": {
            "qkv": {"rows": {"448": graph(20.0, 30.0), "640": graph(40.0, 30.0)}},
            "o": {"rows": {"448": graph(10.0, 5.0)}},
            "down": {"rows": {"448": {"fp8_rows": {"us": 7.0}}}},  # no per-tensor timing: left out
        }
    }
    times = {
        "self_attn.qkv_proj": {448: (1.0, 2.0), 640: (1.0, 2.0)},  # per-tensor chosen at both
        "self_attn.o_proj": {448: (1.0, 2.0), 2048: (2.0, 1.0)},  # 2048: no graph timing
        "mlp.down_proj": {448: (2.0, 1.0)},
    }
    sums = gemv_bench.choice_sums(prefill, times, num_layers=10)
    assert sums == {
        "448": {
            "engine": pytest.approx(10 * (20.0 + 10.0) / 1e3),
            "best": pytest.approx(10 * (20.0 + 5.0) / 1e3),
            "rowwise": pytest.approx(10 * (30.0 + 5.0) / 1e3),
        },
        "640": {"engine": pytest.approx(0.4), "best": pytest.approx(0.3), "rowwise": pytest.approx(0.3)},
    }


def test_choice_sums_of_the_committed_eager_autotune_run() -> None:
    """The H100 run at 2a09ca1: its eager start-up timings chose row-wise nearly everywhere, so the engine's
    sums sit at row-wise, above the graph timings' faster-per-kind sums (1.0 ms at 448 rows)."""
    run = REPO_ROOT / "benchmarks/results/2026-12-07-h100-fp8-gemm-autotune-2a09ca1/gemv_bench.json"
    res = json.loads(run.read_text())
    times = {kind: {int(m): pair for m, pair in by.items()} for kind, by in res["autotune"]["ms"].items()}
    sums = gemv_bench.choice_sums(res["prefill"], times, num_layers=40)
    assert sorted(sums, key=int) == ["384", "448", "512", "640", "1024", "1280", "2048"]
    assert sums["448"]["best"] == pytest.approx(8.844, abs=1e-3)
    assert sums["448"]["rowwise"] == pytest.approx(9.885, abs=1e-3)
    assert sums["448"]["best"] < sums["448"]["engine"] < sums["448"]["rowwise"]  # gate/up's only
    assert sums["640"]["engine"] == pytest.approx(sums["640"]["rowwise"])
