"""`engine.kernels.fused.silu_mul_fp8`'s block sizes (GPU): FP8 layers' silu_mul with the down projection's
row quantization, for GLM-4.6V-Flash's intermediate size (13696).

For each row count (a decode step's few rows up to a screenshot's prefill) and each (block, warps): the
time of one call (CUDA events around 50 calls in a row, median of 7), the bytes it moves (gate_up read,
FP8 rows and scales written) over that time, and whether its rows and scales equal those of the default
configuration (a wider row goes in two passes where the block is narrower than it: the same arithmetic).
The unfused pair (`silu_mul`, then `quantize_rows_fp8`) is timed beside them. Writes silu_quant.json
under --out and prints a table.

    python -m benchmarks.silu_quant_bench --out /tmp/silu
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.results import make_meta

ROWS = (1, 16, 64, 256, 1228, 2048)
CONFIGS = ((16384, 16), (8192, 8), (4096, 8), (4096, 4), (2048, 8), (2048, 4), (1024, 4), (1024, 2))
INTERMEDIATE = 13696
CALLS = 50


def _us_per_call(fn, *args) -> float:
    fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from engine.kernels import fused
    from engine.model.quant import quantize_rows_fp8

    default = (fused.SILU_QUANT_BLOCK, fused.SILU_QUANT_WARPS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for rows in ROWS:
        gate_up = torch.randn(rows, 2 * INTERMEDIATE, device="cuda", generator=gen).mul_(4).bfloat16()
        moved = rows * INTERMEDIATE * (4 + 1) + rows * 4
        fused.SILU_QUANT_BLOCK, fused.SILU_QUANT_WARPS = default
        want_q, want_scale = fused.silu_mul_fp8(gate_up)
        row = {"rows": rows, "bytes": moved}
        row["unfused_us"] = round(_us_per_call(lambda x: quantize_rows_fp8(fused.silu_mul(x)), gate_up), 2)
        for block, warps in CONFIGS:
            fused.SILU_QUANT_BLOCK, fused.SILU_QUANT_WARPS = block, warps
            q, scale = fused.silu_mul_fp8(gate_up)
            same = torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(
                scale, want_scale
            )
            us = _us_per_call(fused.silu_mul_fp8, gate_up)
            row[f"{block}x{warps}"] = {"us": round(us, 2), "tb_s": round(moved / us / 1e6, 3), "same": same}
        fused.SILU_QUANT_BLOCK, fused.SILU_QUANT_WARPS = default
        rows_out.append(row)
        best = min(CONFIGS, key=lambda c: row[f"{c[0]}x{c[1]}"]["us"])
        cells = "  ".join(
            f"{b}x{w} {row[f'{b}x{w}']['us']:.1f}{'' if row[f'{b}x{w}']['same'] else ' DIFFERS'}"
            for b, w in CONFIGS
        )
        print(
            f"rows {rows:5d}: unfused {row['unfused_us']:.1f} us  {cells}  best {best[0]}x{best[1]}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": make_meta(
            vars(args) | {"out": str(args.out)}, {"intermediate": INTERMEDIATE, "dtype": "bf16"}
        ),
        "default": f"{default[0]}x{default[1]}",
        "rows": rows_out,
    }
    (args.out / "silu_quant.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
