"""The decoder's prefill attention (GPU): the varlen flash call the engine makes against cuDNN's fused attention.

A fresh prompt of T tokens (GLM-4.6V's decoder: 32 query heads, 2 KV heads, head size 128, bf16, causal)
through each candidate, ``python -m benchmarks.prefill_attention_bench --out DIR [--lengths 296,1236,2560]``:

* ``flash_varlen``: `engine.kernels.attention.fresh_prefill_attention` (PyTorch's FlashAttention-2 varlen
  call, GQA in the kernel), what the engine runs today;
* ``cudnn_dense``: `F.scaled_dot_product_attention` on [1, heads, T, D] with only cuDNN's kernel allowed,
  the KV heads repeated to the query heads first (the repeat timed with it);
* ``cudnn_dense_gqa``: the same with ``enable_gqa`` instead of the repeat;
* ``cudnn_ragged``: `torch.ops.aten._cudnn_attention_forward` with the prompt's cumulative lengths (the
  packed layout the engine uses), KV heads repeated.

For each: the first call's time (cuDNN builds an execution plan per new shape), the median of 30 calls
(CUDA events), TFLOP/s of the causal product, and the largest difference from flash_varlen. A candidate
that raises is recorded with its error. Writes prefill_attention.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.results import make_meta
from benchmarks.roofline import _time_cuda

HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128


def _repeat_kv(t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(HEADS // KV_HEADS, dim=1)  # [T, Hkv, D] -> [T, H, D]


def candidates(scale: float) -> dict:
    from engine.kernels.attention import fresh_prefill_attention

    def flash_varlen(q, k, v, cu, n):
        return fresh_prefill_attention(q, k, v, cu, n, scale)

    def cudnn_dense(q, k, v, cu, n):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            qd, kd, vd = (t.transpose(0, 1)[None] for t in (q, _repeat_kv(k), _repeat_kv(v)))
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)[0].transpose(0, 1)

    def cudnn_dense_gqa(q, k, v, cu, n):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            qd, kd, vd = (t.transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
            return out[0].transpose(0, 1)

    def cudnn_ragged(q, k, v, cu, n):
        return torch.ops.aten._cudnn_attention_forward(
            q, _repeat_kv(k), _repeat_kv(v), None, cu, cu, n, n, False, 0.0, True, False, scale=scale
        )[0]

    return {
        "flash_varlen": flash_varlen,
        "cudnn_dense": cudnn_dense,
        "cudnn_dense_gqa": cudnn_dense_gqa,
        "cudnn_ragged": cudnn_ragged,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", default="296,1236,2560", help="prompt lengths T, comma-separated")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    scale = HEAD_DIM**-0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    rows: dict = {}
    for n in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(n, HEADS, HEAD_DIM, device=dev, generator=gen, dtype=torch.bfloat16)
        k = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, generator=gen, dtype=torch.bfloat16)
        v = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, generator=gen, dtype=torch.bfloat16)
        cu = torch.tensor([0, n], device=dev, dtype=torch.int32)
        flop = 4 * n * n * HEADS * HEAD_DIM / 2  # QK^T and PV, causal half
        reference = None
        for name, fn in candidates(scale).items():
            row: dict = {}
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn(q, k, v, cu, n)
                torch.cuda.synchronize()
                row["first_call_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                inputs = (q, k, v, cu, n)
                seconds = _time_cuda(lambda fn=fn, inputs=inputs: fn(*inputs), warmup=0, repeats=30)
                row["ms"] = round(seconds * 1e3, 4)
                row["tflop_s"] = round(flop / row["ms"] / 1e9, 1)
                if reference is None:
                    reference = out.float()
                row["max_abs_diff"] = float((out.float() - reference).abs().max())
            except Exception as exc:  # a kernel this torch or GPU cannot run for the shape
                row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            rows.setdefault(str(n), {})[name] = row
            shown = (
                row.get("error")
                or f"{row['ms']:.3f} ms ({row['tflop_s']} TFLOP/s), first call {row['first_call_ms']:.1f} ms, "
                f"max diff {row['max_abs_diff']:.2e}"
            )
            print(f"T={n:5d} {name:16s} {shown}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = make_meta(vars(args) | {"out": str(args.out)}, "random q, k, v (no model)")
    doc = {"meta": meta, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (args.out / "prefill_attention.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
