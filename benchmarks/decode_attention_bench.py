"""Micro-benchmark of one layer's decode attention: the old gather + masked SDPA path vs the Triton
paged-decode kernel (engine.kernels.fused.paged_decode_attention).

Full-size GLM-4.6V head config (32 query heads, 2 KV heads, head_dim 128, block_size 16, bf16), every
sequence at the given context (block_tables exactly as wide as the context, blocks shuffled), one decode
token per sequence. Times the attention only (the KV write is the same on both paths), in µs per call:

* ``graph``: N calls captured in one CUDA graph, replayed (how decode steps run in the engine);
* ``eager``: back-to-back launches (includes Python and launch overhead).

The old path is ``engine.kernels.attention._paged_attention_fast`` with GLMV_DISABLE_TRITON_KERNELS=1 and its
per-step plan already built (the engine builds it once per step for all 40 layers).

    python -m benchmarks.decode_attention_bench                   # B = 1, 8, 32 x context 1k, 4k
    python -m benchmarks.decode_attention_bench --sweep           # also try block_n / splits / warps
    python -m benchmarks.decode_attention_bench --batch 1 --context 4096 16384

Needs a CUDA GPU (not part of the test suite). ``TRITON_INTERPRET=1 ... --device cpu --iters 1`` runs the
code path on CPU as a smoke test (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 2, 128, 16


@contextlib.contextmanager
def triton_disabled(disabled: bool = True) -> Iterator[None]:
    saved = os.environ.get("GLMV_DISABLE_TRITON_KERNELS")
    if disabled:
        os.environ["GLMV_DISABLE_TRITON_KERNELS"] = "1"
    else:
        os.environ.pop("GLMV_DISABLE_TRITON_KERNELS", None)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GLMV_DISABLE_TRITON_KERNELS", None)
        else:
            os.environ["GLMV_DISABLE_TRITON_KERNELS"] = saved


def make_inputs(batch: int, context: int, device: str, dtype: torch.dtype, seed: int = 0):
    """q [B, H, D], kv_cache [2, N, 16, Hkv, D], AttentionMetadata of one decode token per sequence."""
    from engine.kernels.attention import AttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq + 1
    blocks = list(range(1, num_blocks))
    random.Random(seed).shuffle(blocks)
    tables = [[blocks.pop() for _ in range(per_seq)] for _ in range(batch)]
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    kv_cache = kv_cache.to(device, dtype)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    attn = AttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK_SIZE, device)
    return q, kv_cache, attn


def time_call(fn: Callable[[], object], iters: int, graph: bool, repeats: int = 5) -> float:
    """Median µs per call of fn over `repeats` runs of `iters` calls (in one CUDA graph if graph)."""
    if not torch.cuda.is_available() or not graph:
        if graph:
            return float("nan")
        fn()
        samples = []
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) / iters * 1e6)
        return statistics.median(samples)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / autotune / plan outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples)


def bench_shape(batch: int, context: int, args: argparse.Namespace) -> dict:
    from engine.kernels import attention
    from engine.kernels import fused as kernels

    dtype = torch.bfloat16
    q, kv_cache, attn = make_inputs(batch, context, args.device, dtype)
    scale = HEAD_DIM**-0.5
    k = v = torch.zeros(batch, NUM_KV_HEADS, HEAD_DIM, device=args.device, dtype=dtype)  # unused (decode)

    def old() -> torch.Tensor:
        with triton_disabled():
            return attention._paged_attention_fast(q, k, v, kv_cache, attn, scale)

    def new(**overrides) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            return kernels.paged_decode_attention(
                q, kv_cache[0], kv_cache[1], attn.block_tables, attn.seq_lens, scale, **overrides
            )

        return call

    with triton_disabled(False):
        assert kernels.paged_decode_supported(q, kv_cache[0], kv_cache[1]), (
            "the Triton kernel cannot run here"
        )
    ref = kernels.paged_decode_attention_reference(
        q, kv_cache[0], kv_cache[1], attn.block_tables, attn.seq_lens, scale
    )
    max_err_old = (old().float() - ref.float()).abs().max().item()
    max_err_new = (new()().float() - ref.float()).abs().max().item()
    splits = kernels.paged_decode_splits(
        batch, NUM_KV_HEADS, attn.block_tables.shape[1] * BLOCK_SIZE, q.device
    )
    row = {
        "batch": batch,
        "context": context,
        "tokens_per_split": splits[0],
        "num_splits": splits[1],
        "old_graph_us": time_call(old, args.iters, graph=True),
        "new_graph_us": time_call(new(), args.iters, graph=True),
        "old_eager_us": time_call(old, args.iters, graph=False),
        "new_eager_us": time_call(new(), args.iters, graph=False),
        "max_abs_err_old": max_err_old,
        "max_abs_err_new": max_err_new,
        "kv_bytes": 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * kv_cache.element_size(),
    }
    if row["new_graph_us"] == row["new_graph_us"]:  # not NaN
        row["new_TBps"] = row["kv_bytes"] / row["new_graph_us"] / 1e6
    if args.sweep:
        best = None
        saved = kernels.DECODE_WARPS, kernels.DECODE_STAGES
        try:
            for warps in (4, 8):
                for stages in (2, 3):
                    kernels.DECODE_WARPS, kernels.DECODE_STAGES = warps, stages
                    for block_n in (32, 64, 128):
                        for num_splits in (None, 1, 4, 16, 32, 64, 128):
                            call = new(num_splits=num_splits, block_n=block_n)
                            err = (call().float() - ref.float()).abs().max().item()
                            us = time_call(call, args.iters, graph=torch.cuda.is_available())
                            cfg = {
                                "warps": warps,
                                "stages": stages,
                                "block_n": block_n,
                                "num_splits": num_splits,
                                "us": us,
                                "err": err,
                            }
                            if best is None or us < best["us"]:
                                best = cfg
        finally:
            kernels.DECODE_WARPS, kernels.DECODE_STAGES = saved
        row["best"] = best
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--iters", type=int, default=40, help="calls per timed graph / eager run")
    parser.add_argument("--sweep", action="store_true", help="also search launch parameters (slow)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 as a smoke test)")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # as engine.runner.model_runner does
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"# {'B':>3} {'ctx':>6} {'splits':>6} {'old graph':>10} {'new graph':>10} {'old eager':>10} {'new eager':>10}  (µs/call)"
    )
    rows = []
    for batch in args.batch:
        for context in args.context:
            row = bench_shape(batch, context, args)
            rows.append(row)
            print(
                f"  {batch:>3} {context:>6} {row['num_splits']:>6} {row['old_graph_us']:>10.2f} "
                f"{row['new_graph_us']:>10.2f} {row['old_eager_us']:>10.2f} {row['new_eager_us']:>10.2f}",
                flush=True,
            )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
