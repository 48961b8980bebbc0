"""transformers ``generate()`` baseline on the full GLM-4.6V-Flash shape with random bf16 weights (GPU).

The model is built from the config directly on the GPU (no checkpoint, no download) and timed on the
shapes the serving benchmark uses, with inputs built the way the processor lays them out
(``[gMASK]<sop><|user|>\\n<|begin_of_image|>`` + one ``<|image|>`` per merged patch + ``<|end_of_image|>``
+ question tokens + ``<|assistant|>\\n``; random pixel_values of the right patch count):

* ``ttft_ms`` — generate(max_new_tokens=1) for one 1288×728 screenshot (1196 image tokens);
* ``decode_ms_per_token`` — batch 1, same prompt: (generate(N) − generate(1)) / (N − 1);
* ``batch_tok_s`` — batch 32 of 448×448 images (256 image tokens each), 128 new tokens each.

Every generate uses greedy decoding with ``min_new_tokens = max_new_tokens`` so random weights cannot stop
early. Timings synchronize the GPU; each is the median of ``--repeats`` runs after a warm-up.

    python -m benchmarks.baseline_hf --out baseline_hf.json [--budget-s 240]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PATCH, MERGE = 14, 2
QUESTION_TOKENS = 24  # a one-sentence question


def grid_for(width: int, height: int) -> tuple[int, int]:
    """Patch grid (gh, gw) after smart_resize for sizes well inside the pixel budget (round to 28)."""
    factor = PATCH * MERGE
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    return h // PATCH, w // PATCH


def build_inputs(config, width: int, height: int, batch: int, device: str, dtype):
    """input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw for ``batch`` prompts."""
    import torch

    gh, gw = grid_for(width, height)
    num_image_tokens = gh * gw // (MERGE * MERGE)
    special = {"gmask": 151331, "sop": 151333, "user": 151336, "assistant": 151337, "newline": 198}
    image_start = int(getattr(config, "image_start_token_id", 151339))
    image_end = int(getattr(config, "image_end_token_id", 151340))
    image_token = int(config.image_token_id)
    gen = torch.Generator().manual_seed(0)
    question = torch.randint(1000, 50000, (QUESTION_TOKENS,), generator=gen).tolist()
    ids = (
        [special["gmask"], special["sop"], special["user"], special["newline"], image_start]
        + [image_token] * num_image_tokens
        + [image_end]
        + question
        + [special["assistant"], special["newline"]]
    )
    input_ids = torch.tensor([ids] * batch, device=device)
    pixel_values = torch.randn(batch * gh * gw, 3 * 2 * PATCH * PATCH, generator=gen).to(
        device=device, dtype=dtype
    )
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == image_token).to(torch.int32),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, gh, gw]] * batch, device=device),
    }


def load_model(device: str = "cuda"):
    """Glm4vForConditionalGeneration of the full-size config, random bf16 weights created on ``device``."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    from benchmarks.roofline import full_size_config

    config = full_size_config()
    if isinstance(config, dict):  # build_engine unavailable: rebuild the config object
        raise RuntimeError("baseline needs build_engine.checkpoint.full_size_config()")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Glm4vForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    return model, config


def _generate_s(model, inputs: dict, new_tokens: int) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync()
    elapsed = time.perf_counter() - start
    produced = out.shape[1] - inputs["input_ids"].shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens, expected {new_tokens}")
    return elapsed


def run(out_path: Path | None, budget_s: float = 300.0, repeats: int = 3, decode_tokens: int = 64) -> dict:
    import torch

    deadline = time.perf_counter() + budget_s
    result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass

    def save() -> None:
        if out_path:
            out_path.write_text(json.dumps(result, indent=2) + "\n")

    def left() -> float:
        return deadline - time.perf_counter()

    started = time.perf_counter()
    model, config = load_model()
    result["load_s"] = round(time.perf_counter() - started, 2)
    result["params"] = sum(p.numel() for p in model.parameters())
    save()
    dtype = torch.bfloat16

    phases = [
        ("ttft", 1288, 728, 1),
        ("decode", 1288, 728, 1),
        ("batch", 448, 448, 32),
    ]
    for name, width, height, batch in phases:
        if left() < 20:
            result[f"{name}_skipped"] = f"time budget: {left():.0f} s left"
            continue
        try:
            inputs = build_inputs(config, width, height, batch, "cuda", dtype)
            prompt_len = inputs["input_ids"].shape[1]
            if name == "ttft":
                _generate_s(model, inputs, 1)  # warm-up
                times = [_generate_s(model, inputs, 1) for _ in range(repeats)]
                result["ttft_ms"] = round(statistics.median(times) * 1e3, 2)
                result["ttft_prompt_tokens"] = prompt_len
            elif name == "decode":
                _generate_s(model, inputs, 4)
                first = statistics.median(_generate_s(model, inputs, 1) for _ in range(2))
                times = [_generate_s(model, inputs, decode_tokens) for _ in range(max(1, repeats - 1))]
                result["decode_ms_per_token"] = round(
                    (statistics.median(times) - first) / (decode_tokens - 1) * 1e3, 3
                )
                result["decode_tokens"] = decode_tokens
            else:
                new_tokens = 128
                _generate_s(model, inputs, 2)
                seconds = _generate_s(model, inputs, new_tokens)
                result["batch_tok_s"] = round(batch * new_tokens / seconds, 2)
                result["batch"] = {
                    "size": batch,
                    "image": f"{width}x{height}",
                    "new_tokens": new_tokens,
                    "seconds": seconds,
                }
        except Exception as exc:
            result[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            torch.cuda.empty_cache()
        result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        save()
        print(
            f"baseline_hf {name}: {json.dumps({k: v for k, v in result.items() if k.startswith(name)})}",
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline_hf", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (rewritten after every phase)")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args(argv)
    result = run(args.out, args.budget_s, args.repeats, args.decode_tokens)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
