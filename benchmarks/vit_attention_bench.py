"""The ViT's attention on each SDPA backend, alone and in the whole encoder (GPU).

The full-size vision tower (24 blocks, 1536 wide, 12 heads of 128) with random bf16 weights encodes a
448×448, a 1288×728, a 1920×1080 and a 3840×2160 image (each resized as the server resizes it: the
last to 2912×1624), eagerly, with each of the engine's
``--vision-attention`` choices; per size it reports the encode time (median of CUDA-event timings), one
block's attention call alone, the first encode of that shape (cuDNN builds an execution plan per new
shape), and the largest difference of the embeddings from the flash ones. "auto" runs before "cudnn":
its first encode is flash's, then ``plan_ms_auto`` is what building cuDNN's plan for that new length
costs (`VisionEncoder.build_attention_plan`, the engine's idle work), then it encodes on cuDNN. Then the
448×448 layout is captured in a CUDA graph with each choice and replayed against its eager result (the
engine replays the ViT from graphs for small images). ``--vision-dtype fp8`` first swaps the tower's linears
for FP8 ones, as ``glmv-build --vision-dtype fp8`` does (the attention still runs in bf16). Writes
vit_attention.json under --out and prints a short table.

    python -m benchmarks.vit_attention_bench --out /tmp/vit
    python -m benchmarks.vit_attention_bench --vision-dtype fp8 --out /tmp/vit_fp8
    python -m benchmarks.vit_attention_bench --plot /tmp/vit/vit_attention.json   # vit_attention.png beside it
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.roofline import _time_cuda

SIZES = ((448, 448), (1288, 728), (1920, 1080), (3840, 2160))
CHOICES = ("flash", "auto", "cudnn")  # auto before cudnn: cudnn's first encode would build auto's plans


def _timed(fn, repeats: int) -> float:
    """Median ms of ``fn()`` over ``repeats`` runs (after one warm-up), by CUDA events."""
    return _time_cuda(fn, warmup=1, repeats=repeats) * 1e3


def _encoder(device: torch.device, dtype: torch.dtype):
    from build_engine.checkpoint import full_size_config
    from engine.config import ModelConfig
    from engine.model.vision import VisionEncoder

    config = ModelConfig.from_dict(full_size_config().to_dict()).vision_config
    torch.manual_seed(0)
    encoder = VisionEncoder(config).to(device=device, dtype=dtype).eval()
    for p in encoder.parameters():  # small weights: activations stay finite through 24 blocks
        torch.nn.init.normal_(p, std=0.02)
    return encoder, config


def _grid(size: tuple[int, int], config) -> tuple[int, int]:
    """The patch grid (rows, columns) of an image of ``size`` as the server resizes it."""
    from build_engine.checkpoint import full_size_image_size

    w, h = full_size_image_size(*size)
    return h // config.patch_size, w // config.patch_size


def plot(doc: dict, path: Path) -> Path:
    """vit_attention.png: each size's eager encode (ms) per choice, and what building auto's plan cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(doc["sizes"])
    fig, (encode_ax, plan_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(CHOICES)
    for i, choice in enumerate(CHOICES):
        values = [doc["sizes"][size].get(f"encode_ms_{choice}") or 0 for size in sizes]
        encode_ax.bar([j + i * width for j in range(len(sizes))], values, width, label=choice)
    encode_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    encode_ax.set(ylabel="ViT encode, eager (ms)", yscale="log", title="one image, full-size tower")
    encode_ax.legend()
    plans = [doc["sizes"][size].get("plan_ms_auto") or 0 for size in sizes]
    plan_ax.bar(sizes, plans)
    plan_ax.set(ylabel="ms", title="auto: cuDNN's plan for a new length (built while idle)")
    fig.suptitle(
        f"{doc.get('device', '')}  {doc.get('commit', '')}  torch {doc.get('torch', '')}"
        f"  linears {doc.get('vision_dtype', 'bf16')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from torch.nn.attention import sdpa_kernel

    from engine.model.vision import VISION_ATTENTION_BACKENDS, VISION_ATTENTION_CHOICES

    assert sorted(CHOICES) == sorted(VISION_ATTENTION_CHOICES)

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.vit_attention_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--vision-dtype", choices=("bf16", "fp8"), default="bf16", help="the tower's linears")
    p.add_argument("--plot", type=Path, help="only draw vit_attention.png beside this vit_attention.json")
    args = p.parse_args(argv)
    if args.plot is not None:
        print(plot(json.loads(args.plot.read_text()), args.plot.with_name("vit_attention.png")))
        return 0
    if args.out is None:
        p.error("--out is required")
    device, dtype = torch.device("cuda"), torch.bfloat16
    encoder, config = _encoder(device, dtype)
    if args.vision_dtype == "fp8":
        from engine.model.quant import Fp8Linear, quantize_vision_fp8_

        quantize_vision_fp8_(encoder)
        kernels = sorted({m.kernel for m in encoder.modules() if isinstance(m, Fp8Linear)})
        print(f"FP8 linears: kernel {', '.join(kernels)}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    rows: dict[str, dict] = {}
    for size in SIZES:
        gh, gw = _grid(size, config)
        grid = torch.tensor([[1, gh, gw]])
        pixels = torch.randn((gh * gw, config.patch_dim), generator=gen, device=device, dtype=dtype)
        n = gh * gw
        heads, head_dim = config.num_heads, config.head_dim
        qkv = torch.randn((n, 3, heads, head_dim), generator=gen, device=device, dtype=dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in qkv.unbind(1))  # the layout VisionAttention passes
        row: dict = {"patches": n}
        reference = None
        for choice in CHOICES:
            try:
                encoder.set_attention(choice)
                torch.cuda.synchronize()
                started = time.perf_counter()
                out = encoder.encode(pixels, grid)  # the first of this shape: cuDNN builds its plan here
                torch.cuda.synchronize()
                row[f"first_encode_ms_{choice}"] = round((time.perf_counter() - started) * 1e3, 3)
                if choice == "auto":  # the plan of this new length, as the engine builds it while idle
                    started = time.perf_counter()
                    planned = encoder.build_attention_plan()
                    torch.cuda.synchronize()
                    row["plan_ms_auto"] = round((time.perf_counter() - started) * 1e3, 3)
                    row["planned_auto"] = planned in encoder.attention_kernels.planned
                row[f"encode_ms_{choice}"] = round(
                    _timed(functools.partial(encoder.encode, pixels, grid), args.repeats), 3
                )
                backends = VISION_ATTENTION_BACKENDS["cudnn" if choice == "auto" else choice]
                with sdpa_kernel(backends, set_priority=True):
                    row[f"attention_ms_{choice}"] = round(
                        _timed(
                            functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v),
                            args.repeats,
                        ),
                        4,
                    )
                if reference is None:
                    reference = out.float()
                row[f"max_abs_diff_{choice}"] = float((out.float() - reference).abs().max())
            except Exception as exc:  # a backend that cannot run this shape: recorded, not fatal
                row[f"error_{choice}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows[f"{size[0]}x{size[1]}"] = row
        print(
            f"{size[0]}x{size[1]} ({n} patches): "
            + ", ".join(f"{k} {v}" for k, v in row.items() if k != "patches"),
            flush=True,
        )
    graphs: dict[str, dict] = {}
    gh, gw = _grid(SIZES[0], config)
    grid = torch.tensor([[1, gh, gw]])
    pixels = torch.randn((gh * gw, config.patch_dim), generator=gen, device=device, dtype=dtype)
    for choice in CHOICES:
        try:
            encoder.set_attention(choice)
            encoder.graphs = None
            eager = encoder.encode(pixels, grid)
            if choice == "auto":  # planned before the capture, as the engine's idle work does
                encoder.build_attention_plan()
                eager = encoder.encode(pixels, grid)
            encoder.enable_cuda_graphs()
            replayed = encoder.encode(pixels, grid)  # captured on first use
            replayed = encoder.encode(pixels, grid)
            graphs[choice] = {
                "captured": bool(encoder.graphs.entries),
                "max_abs_diff_vs_eager": float((replayed.float() - eager.float()).abs().max()),
                "graph_ms": round(_timed(functools.partial(encoder.encode, pixels, grid), args.repeats), 3),
            }
        except Exception as exc:
            graphs[choice] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            encoder.graphs = None
        print(f"graph 448x448 {choice}: {graphs[choice]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "vision_dtype": args.vision_dtype,
        "commit": os.environ.get("GLMV_COMMIT", ""),
        "sizes": rows,
        "graphs_448": graphs,
    }
    (args.out / "vit_attention.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out / "vit_attention.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
