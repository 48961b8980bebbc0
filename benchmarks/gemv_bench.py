"""Decode-shaped matmuls (GPU): the skinny kernel of `engine.kernels.gemv` against cuBLAS and the FP8 path.

1. Per linear layer of the full-size decoder (qkv, o, gate/up with silu_mul, down, lm_head) and rows
   M in 1, 2, 4, 8, 16, 24, 32, 48, 64 (the decoder sends the kernel up to MAX_ROWS; the rows above say
   whether more would pay): the time of one layer call replayed from a CUDA graph over enough copies of the
   weight that nothing stays in L2 (a decode step reads each weight once), for `F.linear` (cuBLAS; the
   gate/up followed by `engine.kernels.fused.silu_mul`), the skinny kernel with its default block sizes,
   the FP8 layer as the engine runs it in graphs (`Fp8Linear`: per-token activation quantization, the
   per-tensor `_scaled_mm`, its epilogue) and the skinny kernel on the same FP8 weights (its rows quantized
   by a kernel before it). Each is also
   given as the weights' bytes over its time, and as a fraction of the copy bandwidth measured here.
2. Per decode step: each method's sum over 40 layers and the lm_head.
3. With --engine: batch-1 decode (context 1236) of the full-size engine (random weights, CUDA graphs)
   with `decode_gemv` off and on (and with --fp8 the same in FP8; with --pdl also the kernel with
   `decode_pdl`, the next kernel launched at each one's start and, "pdlexit", at its programs' exit, and
   "pdlauto", `decode_pdl` "auto": the engine's start-up trial and its choice are in the run's JSON), each
   engine built alone, and how many of the greedy tokens the runs share (PDL's with
   the kernel's run: the same arithmetic, so all of them).
4. Last, for --sweep-s seconds: at M = 1 and 16 (bf16; --sweep-rows: other M, e.g. 64 for the 64-row
   tile), every candidate block configuration of the skinny kernel on the largest layers first, the best
   set beside the default; then for --sweep-fp8-s seconds the same on FP8 weights (K steps up to 1024).

5. With --prefill-rows (e.g. 296,1236: a 448×448's and a 1288×728's prompt), instead of 1-4: per layer at
   those M, cuBLAS in bf16 against the FP8 layer as a prefill runs it, with its own row quantization and on
   rows quantized already (what a fused norm hands qkv and gate/up), and on those rows the decode graphs'
   per-tensor GEMM into float32 with its scales' epilogue, each as µs and TFLOP/s; and per prefill the
   40 layers' sum (the lm_head takes one row there).

Writes gemv_bench.json under --out and prints a short table.

    python -m benchmarks.gemv_bench --out /tmp/gemv [--engine | --engine-only] [--fp8] [--pdl] [--sweep-s 60] [--sweep-fp8-s 0] [--sweep-rows 1,16]
    python -m benchmarks.gemv_bench --out /tmp/gemv --prefill-rows 296,1236        # prefill-shaped, bf16 and FP8
    python -m benchmarks.gemv_bench --plot /tmp/gemv/gemv_bench.json       # gemv.png beside it
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.roofline import measure_copy_bandwidth

ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
SWEEP_ROWS = (1, 16)
L2_SPAN = 512 << 20  # bytes of distinct weights a graph cycles through (the H200's L2 is 60 MB)


def _layer_shapes(mc) -> dict[str, tuple[int, int, bool, bool]]:
    """name -> (out, in, bias, silu_mul) of the decoder's linear layers and the lm_head."""
    heads, kv, hd = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    hidden, inter = mc.hidden_size, mc.intermediate_size
    return {
        "qkv": ((heads + 2 * kv) * hd, hidden, True, False),
        "o": (hidden, heads * hd, False, False),
        "gate_up": (2 * inter, hidden, False, True),
        "down": (hidden, inter, False, False),
        "lm_head": (mc.vocab_size, hidden, False, False),
    }


def _graph_ms(calls, repeats: int = 20) -> float:
    """Median ms of one of `calls` (zero-argument functions), all replayed from one CUDA graph."""
    from benchmarks.decode_attention_bench import time_call

    def all_calls() -> None:
        for call in calls:
            call()

    return time_call(all_calls, iters=1, graph=True, repeats=repeats) / 1e3 / len(calls)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far a is from the reference b: the most bf16 steps where |b| > 1e-2, and the largest absolute
    difference where it is smaller (sums that cancel to near zero count steps by the thousand)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    big = b.float().abs() > 1e-2
    steps = (ordered(a) - ordered(b)).abs()[big]
    small = (a.float() - b.float()).abs()[~big]
    return {
        "steps": int(steps.max()) if steps.numel() else 0,
        "near_zero_abs": float(small.max()) if small.numel() else 0.0,
    }


def _configs(fp8: bool = False):
    """The sweep's candidates; FP8 (1-byte weights: twice the K per byte in flight) also K steps of 1024;
    7 stages: more bytes in flight per program, for an H200's bandwidth."""
    from engine.kernels.gemv import GemvConfig

    return [
        GemvConfig(bn, bk, warps, stages)
        for bn in (16, 32, 64)
        for bk in ((128, 256, 512, 1024) if fp8 else (128, 256, 512))
        for warps, stages in ((4, 3), (4, 5), (8, 4), (4, 7))
    ]


def _weight_copies(n: int, k: int, has_bias: bool, span: int, gen: torch.Generator) -> list[torch.nn.Linear]:
    """Enough bf16 [n, k] linears with random weights (on ``gen``'s device) to fill ``span`` bytes, so that a
    graph cycling through them reads each from memory, not L2."""
    linears = []
    for _ in range(max(1, -(-span // (n * k * 2)))):
        layer = torch.nn.Linear(k, n, bias=has_bias, device=gen.device, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.weight.normal_(0, 0.02, generator=gen)
            if has_bias:
                layer.bias.normal_(0, 0.02, generator=gen)
        linears.append(layer)
    return linears


DECODE_LABELS = {  # layer_bench's methods, in its order
    "cublas": "cuBLAS (bf16)",
    "gemv": "skinny kernel (bf16)",
    "fp8_engine": "FP8 layer path",
    "fp8_gemv": "skinny kernel (FP8)",
}


def layer_bench(mc, copy_tb_s: float, fp8: bool, rows: tuple[int, ...] = ROWS) -> dict:
    from engine.kernels import gemv
    from engine.kernels.fused import silu_mul
    from engine.model.quant import Fp8Linear

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    out: dict = {}
    for name, (n, k, has_bias, fused_silu) in _layer_shapes(mc).items():
        linears = _weight_copies(n, k, has_bias, L2_SPAN, gen)
        copies = len(linears)
        fp8_layers = [Fp8Linear.from_linear(layer) for layer in linears] if fp8 else []
        bytes_bf16, bytes_fp8 = n * k * 2, n * k
        rows_out: dict = {}
        for m in rows:
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            res: dict = {}

            def cublas(layer=None, x=x, fused_silu=fused_silu):
                y = F.linear(x, layer.weight, layer.bias)
                return silu_mul(y) if fused_silu else y

            def skinny(layer=None, x=x, cfg=None, fused_silu=fused_silu):
                if fused_silu:
                    return gemv.skinny_linear_silu_mul(x, layer.weight, None, cfg)
                return gemv.skinny_linear(x, layer.weight, layer.bias, None, cfg)

            def fp8_engine(layer=None, x=x, fused_silu=fused_silu):
                y = layer(x)
                return silu_mul(y) if fused_silu else y

            def fp8_skinny(layer=None, x=x, fused_silu=fused_silu):
                if fused_silu:
                    return gemv.skinny_linear_silu_mul(x, layer.weight, layer.weight_scale)
                return gemv.skinny_linear(x, layer.weight, layer.bias, layer.weight_scale)

            with torch.no_grad():
                # agreement with the unfused ops (float32 products, rounded as torch rounds)
                ref = (
                    gemv.skinny_linear_silu_mul_reference(x, linears[0].weight)
                    if fused_silu
                    else gemv.skinny_linear_reference(x, linears[0].weight, linears[0].bias)
                )
                res["vs_reference"] = _bf16_ulps(skinny(linears[0]), ref)
                res["cublas_vs_reference"] = _bf16_ulps(cublas(linears[0]), ref)
                fns = {"cublas": cublas, "gemv": skinny, "fp8_engine": fp8_engine, "fp8_gemv": fp8_skinny}
                for method in DECODE_LABELS:
                    layers, nbytes = (
                        (fp8_layers, bytes_fp8) if method.startswith("fp8") else (linears, bytes_bf16)
                    )
                    if not layers:
                        continue
                    fn = fns[method]
                    ms = _graph_ms([lambda layer=layer, fn=fn: fn(layer) for layer in layers])
                    tb_s = nbytes / (ms * 1e-3) / 1e12
                    res[method] = {"us": ms * 1e3, "weight_tb_s": tb_s, "of_copy_bw": tb_s / copy_tb_s}
            rows_out[str(m)] = res
            line = f"{name:8s} M={m:2d}: " + "  ".join(
                f"{meth} {res[meth]['us']:7.1f} us ({res[meth]['of_copy_bw']:.2f})"
                for meth in DECODE_LABELS
                if meth in res
            )
            print(line, flush=True)
        out[name] = {
            "shape": [n, k],
            "bias": has_bias,
            "silu_mul": fused_silu,
            "copies": copies,
            "rows": rows_out,
        }
        del linears, fp8_layers
        gc.collect()
        torch.cuda.empty_cache()
    return out


def sweep(mc, deadline: float, fp8: bool = False, rows: tuple[int, ...] = SWEEP_ROWS) -> dict:
    """Every candidate block configuration at each M of ``rows`` (bf16, or with ``fp8`` the FP8 weights as
    `Fp8Linear` holds them), the layers in order of their share of a step, until the deadline:
    name -> M -> {config: us} and the best (the default's is what `gemv.config` picks for that M's tile)."""
    from engine.kernels import gemv
    from engine.model.quant import quantize_weight_fp8

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    shapes = _layer_shapes(mc)
    out: dict = {}
    for name in ("gate_up", "down", "qkv", "o"):
        n, k, has_bias, fused_silu = shapes[name]
        copies = max(1, -(-L2_SPAN // (n * k * (1 if fp8 else 2))))
        weights = [
            torch.randn(n, k, device=dev, generator=gen).mul_(0.02).to(torch.bfloat16) for _ in range(copies)
        ]
        if fp8:
            weights = [quantize_weight_fp8(w) for w in weights]  # (weight, scale) pairs
        bias = torch.zeros(n, device=dev, dtype=torch.bfloat16) if has_bias else None
        for m in rows:
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            timings: dict = {}
            for cfg in _configs(fp8):
                if time.monotonic() > deadline:
                    break

                def call(w, cfg=cfg, x=x, fused_silu=fused_silu, bias=bias):
                    w, scale = w if fp8 else (w, None)
                    if fused_silu:
                        return gemv.skinny_linear_silu_mul(x, w, scale, cfg)
                    return gemv.skinny_linear(x, w, bias, scale, cfg)

                try:
                    with torch.no_grad():
                        timings[str(tuple(cfg))] = (
                            _graph_ms([lambda w=w, call=call: call(w) for w in weights]) * 1e3
                        )
                except Exception as exc:  # a configuration Triton cannot build (shared memory)
                    timings[str(tuple(cfg))] = f"{type(exc).__name__}"
            measured = {c: us for c, us in timings.items() if isinstance(us, float)}
            if measured:
                best = min(measured, key=measured.get)
                tile = next(t for t in gemv.ROW_TILES if t >= m)
                default = str(tuple(gemv.config(k, tile, silu_mul=fused_silu, fp8=fp8)))
                out.setdefault(name, {})[str(m)] = {"us": timings, "best": best, "best_us": measured[best]}
                print(
                    f"sweep{' fp8' if fp8 else ''} {name:8s} M={m:2d}: best {best} {measured[best]:.1f} us; "
                    f"default {default} {measured.get(default, float('nan')):.1f} us",
                    flush=True,
                )
        del weights
        torch.cuda.empty_cache()
    return out


PREFILL_LABELS = {  # prefill_bench's methods, in its order
    "cublas": "cuBLAS (bf16)",
    "fp8_layer": "FP8 layer (its own row quantization)",
    "fp8_rows": "FP8 row-wise GEMM (rows quantized)",
    "fp8_tensorwise": "FP8 per-tensor GEMM + epilogue (rows quantized)",
}


def prefill_bench(
    mc, rows: tuple[int, ...], device: str = "cuda", time_ms=_graph_ms, span: int = L2_SPAN
) -> dict:
    """Prefill-shaped matmuls: per layer (not the lm_head) and M of ``rows``, from a CUDA graph over enough
    weight copies to leave L2, cuBLAS in bf16 (gate/up followed by silu_mul), the FP8 layer with its own row
    quantization (`Fp8Linear.forward`), and on rows quantized already (`forward_rows`, and the per-tensor
    GEMM + epilogue the decode graphs run); µs and TFLOP/s.
    Then per M the sum of a prefill's 40 layers for each. ``time_ms(calls)``: ms of one of the calls;
    ``span``: bytes of bf16 weight copies per layer."""
    from engine.kernels.fused import silu_mul
    from engine.model.quant import Fp8Linear, quantize_rows_fp8

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(2)
    out: dict = {"layers": {}, "sums_ms": {}}
    shapes = {name: shape for name, shape in _layer_shapes(mc).items() if name != "lm_head"}
    for name, (n, k, has_bias, fused_silu) in shapes.items():
        linears = _weight_copies(n, k, has_bias, span, gen)
        copies = len(linears)
        fp8_layers = [Fp8Linear.from_linear(layer) for layer in linears]
        by_rows: dict = {}
        for m in rows:
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            with torch.no_grad():
                q, scale = quantize_rows_fp8(x)

            def post(y, fused_silu=fused_silu):
                return silu_mul(y) if fused_silu else y

            calls = {
                "cublas": [lambda w=w, x=x: post(F.linear(x, w.weight, w.bias)) for w in linears],
                "fp8_layer": [lambda w=w, x=x: post(w(x)) for w in fp8_layers],
            }
            if fp8_layers[0].takes_rows(x):  # an FP8 GEMM runs at this M (else the layers dequantize)
                calls["fp8_rows"] = [lambda w=w, q=q, s=scale: post(w.forward_rows(q, s)) for w in fp8_layers]
                # the decode graphs' GEMM at this M: per-tensor into float32, then the scales' epilogue
                calls["fp8_tensorwise"] = [
                    lambda w=w, q=q, s=scale: post(w._forward_fp8(q, "tensorwise", (q, s)))
                    for w in fp8_layers
                ]
            res: dict = {"fp8_path": fp8_layers[0]._path(x)}
            with torch.no_grad():
                for method, fns in calls.items():
                    ms = time_ms(fns)
                    res[method] = {"us": ms * 1e3, "tflop_s": 2 * m * n * k / (ms * 1e-3) / 1e12}
            by_rows[str(m)] = res
            print(
                f"prefill {name:8s} M={m:5d}: "
                + "  ".join(
                    f"{meth} {res[meth]['us']:8.1f} us ({res[meth]['tflop_s']:4.0f} TFLOP/s)"
                    for meth in calls
                )
                + f"  (FP8 path {res['fp8_path']})",
                flush=True,
            )
        out["layers"][name] = {"shape": [n, k], "copies": copies, "rows": by_rows}
        del linears, fp8_layers
        gc.collect()
        torch.cuda.empty_cache()
    for m in rows:
        out["sums_ms"][str(m)] = {
            meth: mc.num_hidden_layers
            * sum(out["layers"][name]["rows"][str(m)][meth]["us"] for name in shapes)
            / 1e3
            for meth in PREFILL_LABELS
            if all(meth in out["layers"][name]["rows"][str(m)] for name in shapes)
        }
        print(
            f"prefill matmuls, {mc.num_hidden_layers} layers, M={m}: "
            + "  ".join(f"{k} {v:.2f} ms" for k, v in out["sums_ms"][str(m)].items()),
            flush=True,
        )
    return out


def step_sums(layers: dict, num_layers: int, rows: tuple[int, ...] = ROWS) -> dict:
    """ms per decode step of each method: 40 x (qkv + o + gate_up + down) + lm_head, per M."""
    sums: dict = {}
    for m in rows:
        for method in DECODE_LABELS:
            try:
                per_layer = sum(
                    layers[name]["rows"][str(m)][method]["us"] for name in ("qkv", "o", "gate_up", "down")
                )
                total = num_layers * per_layer + layers["lm_head"]["rows"][str(m)][method]["us"]
            except KeyError:
                continue
            sums.setdefault(str(m), {})[method] = total / 1e3
    return sums


ENGINE_METHODS = {  # --engine-run's method: the engine settings it runs
    "cublas": {"decode_gemv": False},
    "gemv": {"decode_gemv": True},
    "pdl": {"decode_gemv": True, "decode_pdl": True},
    "pdlexit": {"decode_gemv": True, "decode_pdl": True},  # the next kernel launches as each program ends
    # PDL, each skinny program first prefetching into L2 the head of its band of W (64 KiB) / all of it
    "pdlpf": {"decode_gemv": True, "decode_pdl": True},
    "pdlpfall": {"decode_gemv": True, "decode_pdl": True},
    "pdlauto": {"decode_gemv": True, "decode_pdl": "auto"},  # the engine times both ways and picks
}
PDL_PREFETCH_BYTES = {"pdlpf": 64 << 10, "pdlpfall": 4 << 20}


def engine_run(quant: str, method: str, context: int = 1236) -> dict:
    """One engine (this process): batch-1 decode ms/token and its first 64 greedy tokens."""
    from benchmarks.engine_probe import _full_engine
    from benchmarks.ttft_probe import _decode_b1_ms
    from engine.kernels import fused
    from engine.kernels.fused import pdl_enabled
    from engine.llm_engine import GenerationRequest
    from engine.sample.sampler import SamplingParams

    if method == "pdlexit":  # the engine turns PDL on through fused.set_pdl: with the "exit" trigger here
        set_pdl = fused.set_pdl
        fused.set_pdl = lambda on, trigger="exit": set_pdl(on, trigger)
    if method in PDL_PREFETCH_BYTES:
        from engine.kernels import gemv

        gemv.set_pdl_prefetch(PDL_PREFETCH_BYTES[method])
    ex, _, _, _ = _full_engine("cuda", quantization=quant, **ENGINE_METHODS[method])
    if method.startswith("pdl") and method != "pdlauto" and not pdl_enabled():
        raise RuntimeError("decode_pdl did not turn on (see the engine's warning)")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (context,), generator=gen).tolist()
    params = SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True)
    _decode_b1_ms(ex, GenerationRequest("warm", ids, params), loop=False)
    times = [_decode_b1_ms(ex, GenerationRequest(f"d{i}", ids, params), loop=False) for i in range(3)]
    tokens: list[int] = []
    ex.add_request(
        GenerationRequest("ids", ids, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    )
    while ex.has_unfinished():
        for o in ex.step():
            tokens += list(o.new_token_ids)
    run = {"decode_ms_per_token_b1": sorted(times)[1], "context": context, "tokens": tokens}
    if method == "pdlauto":  # what the engine's start-up trial timed, and what it chose
        run["pdl_trial"] = {k: v if k == "pdl" else {str(b): round(ms, 4) for b, ms in v.items()}
                            for k, v in (ex.runner.decode_pdl_trial or {}).items()}  # fmt: skip
        run["pdl"] = pdl_enabled()
    return run


def engine_decode(fp8: bool, out_dir: Path, pdl: bool = False, only: set[str] | None = None) -> dict:
    """`engine_run` with cuBLAS and with the kernel (and with PDL), each
    engine in a Python of its own; ``only``: just these QUANT_METHOD runs. Greedy tokens are compared with
    the cuBLAS run's (PDL's with the kernel's)."""
    out: dict = {}
    methods = ["cublas", "gemv"] + (["pdl", "pdlexit", "pdlpf", "pdlpfall", "pdlauto"] if pdl else [])
    for quant in ("none", "fp8") if fp8 else ("none",):
        tokens = {}
        for method in methods:
            key = f"{quant}_{method}"
            if only is not None and key not in only:
                continue
            path = out_dir / f"engine_{key}.json"
            cmd = [sys.executable, "-m", "benchmarks.gemv_bench", "--out", str(out_dir), "--engine-run", key]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            if proc.returncode != 0 or not path.is_file():
                out[key] = {"error": proc.stderr[-2000:]}
                print(f"engine {key}: failed: {proc.stderr[-600:]}", flush=True)
                continue
            run = json.loads(path.read_text())
            tokens[method] = run.pop("tokens")
            out[key] = run
            print(
                f"engine {key}: decode b1, context {run['context']}: {run['decode_ms_per_token_b1']:.3f} ms/token"
                + (
                    f" (auto chose PDL {'on' if run['pdl'] else 'off'}: {run['pdl_trial']})"
                    if "pdl" in run
                    else ""
                )
            )
        for a, b, name in (
            ("cublas", "gemv", "greedy_tokens_equal"),
            ("gemv", "pdl", "pdl_tokens_equal"),
            ("gemv", "pdlexit", "pdlexit_tokens_equal"),
            ("gemv", "pdlpf", "pdlpf_tokens_equal"),
            ("gemv", "pdlpfall", "pdlpfall_tokens_equal"),
            ("gemv", "pdlauto", "pdlauto_tokens_equal"),
        ):
            if a in tokens and b in tokens:
                pairs = list(zip(tokens[a], tokens[b], strict=False))
                same = sum(1 for x, y in pairs if x == y)
                first_diff = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
                out[f"{quant}_{name}"] = {"equal": same, "of": len(pairs), "first_difference": first_diff}
                print(
                    f"engine {quant}: {b} tokens equal to {a}'s {same}/{len(pairs)} (first difference {first_diff})"
                )
    return out


def plot_prefill(res: dict, path: Path) -> Path:
    """gemv.png of a --prefill-rows run: a prefill's 40-layer matmul ms against its rows M for each method,
    and each layer's TFLOP/s at every M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = res["prefill"]
    rows = sorted(prefill["sums_ms"], key=int)
    methods = [m for m in PREFILL_LABELS if any(m in prefill["sums_ms"][r] for r in rows)]
    fig, (sums_ax, layers_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for method in methods:
        points = [(int(r), prefill["sums_ms"][r][method]) for r in rows if method in prefill["sums_ms"][r]]
        sums_ax.plot(*zip(*points, strict=True), marker="o", label=PREFILL_LABELS[method])
    sums_ax.set(xlabel="prompt rows M", ylabel="matmuls of a prefill (ms)", title="40 layers")
    sums_ax.legend(fontsize=8)
    names = list(prefill["layers"])
    groups = [(name, r) for name in names for r in rows]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [prefill["layers"][n]["rows"][r].get(method, {}).get("tflop_s", 0) for n, r in groups]
        layers_ax.bar(
            [j + i * width for j in range(len(groups))], values, width, label=PREFILL_LABELS[method]
        )
    layers_ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(groups))], [f"{n}\n{r}" for n, r in groups], fontsize=7
    )
    layers_ax.set(ylabel="TFLOP/s", title="per layer and M")
    fig.suptitle(f"{res.get('device', '')}  {res.get('commit', '')}  {res.get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(res: dict, path: Path) -> Path:
    """gemv.png: matmul ms per decode step against rows M for each method, and each layer's µs at M = 1
    (a --prefill-rows run: `plot_prefill`)."""
    if "prefill" in res:
        return plot_prefill(res, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (steps_ax, layers_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods, labels = tuple(DECODE_LABELS), DECODE_LABELS
    rows = sorted(res["step_ms"], key=int)
    for method in methods:
        points = [(int(m), res["step_ms"][m][method]) for m in rows if method in res["step_ms"][m]]
        if points:
            steps_ax.plot(*zip(*points, strict=True), marker="o", label=labels[method])
    steps_ax.set(xlabel="token rows M", ylabel="matmuls per decode step (ms)", title="40 layers + lm_head")
    steps_ax.legend()
    names = list(res["layers"])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [res["layers"][n]["rows"].get("1", {}).get(method, {}).get("us") for n in names]
        if any(v is not None for v in values):
            xs = [j + i * width for j in range(len(names))]
            layers_ax.bar(xs, [v or 0 for v in values], width, label=labels[method])
    layers_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    layers_ax.set(ylabel="µs per call, M = 1", yscale="log", title="per layer")
    fig.suptitle(f"{res.get('device', '')}  {res.get('commit', '')}  copy {res['copy']['tb_s']:.2f} TB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def choice_sums(prefill: dict, times: dict, num_layers: int) -> dict:
    """Per M that both ``prefill`` (`prefill_bench`'s graph timings over weight copies) and ``times``
    (`autotune_tensorwise_rows_`'s {kind: {M: (per-tensor ms, row-wise ms)}}) have: the ``num_layers``
    layers' matmuls in ms, from the graph timings, with the engine's choice per kind, with the faster per
    kind, and all row-wise: whether the start-up timing picks what the graphs say."""
    out: dict = {}
    for kind, by_rows in times.items():
        name = kind.rsplit(".", 1)[-1].removesuffix("_proj")  # self_attn.qkv_proj -> qkv
        for m, (tensorwise_ms, rowwise_ms) in by_rows.items():
            graph = prefill["layers"].get(name, {}).get("rows", {}).get(str(m), {})
            if "fp8_tensorwise" not in graph or "fp8_rows" not in graph:
                continue
            t_us, r_us = graph["fp8_tensorwise"]["us"], graph["fp8_rows"]["us"]
            sums = out.setdefault(str(m), {"engine": 0.0, "best": 0.0, "rowwise": 0.0})
            sums["engine"] += num_layers * (t_us if tensorwise_ms < rowwise_ms else r_us) / 1e3
            sums["best"] += num_layers * min(t_us, r_us) / 1e3
            sums["rowwise"] += num_layers * r_us / 1e3
    return out


def autotune_bench(mc, rows: tuple[int, ...], bound: int) -> dict:
    """The engine's start-up choice (`--fp8-gemm-autotune`) on the full-size decoder (random weights, FP8):
    `autotune_tensorwise_rows_` above ``bound`` rows at ``rows``; per kind and M the per-tensor and row-wise
    ms of its 40 layers and the choice, and per M the 40 layers' sum with the choices against row-wise."""
    from engine.model.decoder import Glm4vModel
    from engine.model.quant import autotune_tensorwise_rows_, quantize_decoder_fp8_, set_tensorwise_rows_

    model = Glm4vModel.dummy(mc, "cuda", "bfloat16", seed=0)
    quantize_decoder_fp8_(model)
    set_tensorwise_rows_(model, bound)
    start = time.perf_counter()
    times = autotune_tensorwise_rows_(model, rows)
    seconds = time.perf_counter() - start
    sums: dict = {}
    for kind, by_rows in times.items():
        for m, (t, r) in by_rows.items():
            print(f"autotune {kind} M={m}: per-tensor {t:.2f} ms, row-wise {r:.2f} ms")
            tuned, rowwise = sums.setdefault(str(m), [0.0, 0.0])
            sums[str(m)] = [tuned + min(t, r), rowwise + r]
    for m, (tuned, rowwise) in sums.items():
        print(f"autotune M={m}: 40 layers {rowwise:.2f} ms row-wise -> {tuned:.2f} ms with the choices")
    print(f"autotune took {seconds:.1f} s", flush=True)
    del model
    torch.cuda.empty_cache()
    return {
        "bound": bound,
        "seconds": seconds,
        "ms": {kind: {str(m): list(pair) for m, pair in by_rows.items()} for kind, by_rows in times.items()},
        "sums_ms": {m: {"tuned": tuned, "rowwise": rowwise} for m, (tuned, rowwise) in sums.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.engine_probe import _full_model_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--engine", action="store_true", help="also batch-1 decode of the engine, off and on")
    ap.add_argument("--fp8", action="store_true", help="FP8 layers too (and the FP8 engine with --engine)")
    ap.add_argument(
        "--pdl", action="store_true", help="with --engine: also the kernel with decode_pdl on (both triggers)"
    )
    ap.add_argument("--engine-only", action="store_true", help="the engine runs alone (no layers, no sweep)")
    ap.add_argument(
        "--engine-runs", help="only these engine runs, comma-separated QUANT_METHOD (e.g. none_gemv,fp8_gemv)"
    )
    ap.add_argument(
        "--rows",
        default=",".join(map(str, ROWS)),
        help="the layers' row counts M, comma-separated (up to 64)",
    )
    ap.add_argument("--plot", type=Path, help="only draw gemv.png beside this gemv_bench.json")
    ap.add_argument("--engine-run", help=argparse.SUPPRESS)  # one engine_run here: QUANT_gemv|QUANT_cublas
    ap.add_argument("--sweep-s", type=float, default=60.0, help="seconds for the block-size sweep (last)")
    ap.add_argument("--sweep-fp8-s", type=float, default=0.0, help="then seconds for the same on FP8 weights")
    ap.add_argument(
        "--sweep-rows",
        default=",".join(map(str, SWEEP_ROWS)),
        help="the sweeps' row counts M, comma-separated (up to the kernel's 64; e.g. 1,16,64: whether a 64-row "
        "tile beats cuBLAS with some block sizes)",
    )
    ap.add_argument(
        "--prefill-rows",
        help="comma-separated M: prefill-shaped layers in bf16 and FP8 instead of the decode layers, engine and sweep",
    )
    ap.add_argument(
        "--autotune",
        type=int,
        metavar="BOUND",
        help="with --prefill-rows: also the engine's --fp8-gemm-autotune choice above BOUND rows (the full-size "
        "FP8 decoder's layers timed at those rows)",
    )
    args = ap.parse_args(argv)
    if args.plot is not None:
        print(plot(json.loads(args.plot.read_text()), args.plot.with_name("gemv.png")))
        return 0
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine_run:
        quant, method = args.engine_run.split("_")
        run = engine_run(quant, method)
        (args.out / f"engine_{args.engine_run}.json").write_text(json.dumps(run))
        return 0
    mc = _full_model_config()
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": os.environ.get("GLMV_COMMIT", ""),
        "date": time.strftime("%Y-%m-%d"),
    }
    res["copy"] = measure_copy_bandwidth()
    print(f"copy bandwidth {res['copy']['tb_s']:.2f} TB/s", flush=True)
    if args.prefill_rows:
        prefill_rows = tuple(int(m) for m in args.prefill_rows.split(","))
        res["prefill"] = prefill_bench(mc, prefill_rows)
        (args.out / "gemv_bench.json").write_text(json.dumps(res, indent=2))
        if args.autotune is not None:
            res["autotune"] = autotune_bench(mc, prefill_rows, args.autotune)
            times = {
                kind: {int(m): pair for m, pair in by.items()} for kind, by in res["autotune"]["ms"].items()
            }
            res["autotune"]["graph_sums_ms"] = choice_sums(res["prefill"], times, mc.num_hidden_layers)
            for m, sums in res["autotune"]["graph_sums_ms"].items():
                print(
                    f"autotune choice M={m} (graph timings, 40 layers): row-wise {sums['rowwise']:.2f} ms, "
                    f"the engine's {sums['engine']:.2f}, the faster per kind {sums['best']:.2f}"
                )
            (args.out / "gemv_bench.json").write_text(json.dumps(res, indent=2))
        plot(res, args.out / "gemv.png")
        return 0
    if not args.engine_only:
        rows = tuple(int(m) for m in args.rows.split(","))
        res["layers"] = layer_bench(mc, res["copy"]["tb_s"], args.fp8, rows)
        res["step_ms"] = step_sums(res["layers"], mc.num_hidden_layers, rows)
        for m, sums in res["step_ms"].items():
            print(f"matmuls per decode step M={m}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in sums.items()))
        (args.out / "gemv_bench.json").write_text(json.dumps(res, indent=2))
    if args.engine or args.engine_only:
        only = set(args.engine_runs.split(",")) if args.engine_runs else None
        res["engine"] = engine_decode(args.fp8, args.out, args.pdl, only)
        (args.out / "gemv_bench.json").write_text(json.dumps(res, indent=2))
    if args.engine_only:
        return 0
    rows = tuple(int(m) for m in args.sweep_rows.split(","))
    res["sweep"] = sweep(mc, time.monotonic() + args.sweep_s, rows=rows)
    (args.out / "gemv_bench.json").write_text(json.dumps(res, indent=2))
    if args.sweep_fp8_s > 0:
        res["sweep_fp8"] = sweep(mc, time.monotonic() + args.sweep_fp8_s, fp8=True, rows=rows)
        (args.out / "gemv_bench.json").write_text(json.dumps(res, indent=2))
    plot(res, args.out / "gemv.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
