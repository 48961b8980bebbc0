"""Engine-only GPU probe: bf16 greedy agreement with transformers, and the full-size shape's raw speed.

    python -m benchmarks.engine_probe --out DIR [--skip-parity] [--skip-speed]

Runs the engine in-process (no Triton), so it isolates the engine's own cost:
  * parity: the tiny checkpoint in bf16 on the GPU, our greedy tokens vs transformers `generate()`
    (text-only, one image, two images), reported as a token agreement rate (bf16 rounding can flip a
    near-tie; CPU fp32 parity is exact and tested in CI);
  * speed: the full-size GLM-4.6V-Flash shape with random bf16 weights: ViT time for a 1288x728 image,
    prefill time of a 1224-token prompt, decode ms/token at batch 1, output tokens/s at 32 concurrent.
Prints a short table and writes engine_probe.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run_until_done(ex, ids: list[str]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    done: set[str] = set()
    while len(done) < len(ids):
        for out in ex.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                done.add(out.request_id)
    return tokens


def parity(device: str, work: Path) -> dict:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, Glm4vForConditionalGeneration

    from build_engine.checkpoint import make_tiny_checkpoint
    from engine.config import EngineConfig, ModelConfig
    from engine.executor import Executor, GenerationRequest
    from engine.rope import get_mrope_positions
    from engine.sampling import SamplingParams

    ckpt = make_tiny_checkpoint(work / "tiny", "tiny", seed=0)
    tok = AutoTokenizer.from_pretrained(ckpt)
    proc = AutoImageProcessor.from_pretrained(ckpt)
    hf = Glm4vForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
    mc = ModelConfig.from_pretrained(ckpt)
    ex = Executor(mc, EngineConfig(device=device, dtype="bfloat16", kv_cache_memory_bytes=64 << 20), ckpt)
    cases = {
        "text": ([], "Describe the product in the photo."),
        "one_image": ([Image.new("RGB", (300, 200), (200, 30, 30))], "What is in this image?"),
        "two_images": (
            [Image.new("RGB", (224, 224), (10, 200, 10)), Image.new("RGB", (120, 360), (20, 20, 220))],
            "Compare the two images.",
        ),
    }
    n_new = 24
    agree = total = 0
    per_case = {}
    for name, (images, question) in cases.items():
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        kwargs = {}
        if images:
            ii = proc(images=images, return_tensors="pt")
            grid = ii["image_grid_thw"]
            parts = text.split("<|image|>")
            text = parts[0] + "".join(
                "<|image|>" * int(g.prod() // 4) + p for g, p in zip(grid, parts[1:], strict=True)
            )
            kwargs = {
                "pixel_values": ii["pixel_values"].to(device, torch.bfloat16),
                "image_grid_thw": grid.to(device),
            }
        ids = tok(text, return_tensors="pt")["input_ids"].to(device)
        kwargs["mm_token_type_ids"] = (ids == mc.image_token_id).long()
        with torch.no_grad():
            ref = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                do_sample=False,
                **kwargs,
            )
        ref_new = ref[0, ids.shape[1] :].tolist()
        embeds = None
        positions, delta = None, 0
        if images:
            with torch.no_grad():
                embeds = ex.model.encode_images(kwargs["pixel_values"], kwargs["image_grid_thw"])
            positions, delta = get_mrope_positions(ids[0].cpu(), kwargs["image_grid_thw"].cpu(), mc)
        req = GenerationRequest(
            name,
            ids[0].tolist(),
            SamplingParams(max_tokens=len(ref_new), temperature=0.0, ignore_eos=True),
            image_embeds=embeds,
            mrope_positions=positions,
            mrope_delta=delta,
        )
        ex.add_request(req)
        ours = _run_until_done(ex, [name])[name]
        n = min(len(ours), len(ref_new))
        first_diff = next((i for i in range(n) if ours[i] != ref_new[i]), n)
        agree += first_diff
        total += n
        per_case[name] = {"ours": ours, "transformers": ref_new, "agree_prefix": first_diff}
    return {"greedy_prefix_agreement": agree / max(total, 1), "cases": per_case}


def speed(device: str) -> dict:
    from build_engine.checkpoint import full_size_config
    from engine.config import EngineConfig, ModelConfig
    from engine.executor import Executor, GenerationRequest
    from engine.sampling import SamplingParams

    tmp = Path("/tmp/glmv-full-config")
    full_size_config().save_pretrained(tmp)
    mc = ModelConfig.from_pretrained(tmp)
    ec = EngineConfig(
        device=device,
        dtype="bfloat16",
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        gpu_memory_utilization=0.9,
    )
    t0 = time.perf_counter()
    ex = Executor(mc, ec, None)
    ex.warmup()
    res: dict = {
        "load_s": time.perf_counter() - t0,
        "kv_blocks": ex.stats().num_blocks_total,
        "block_size": ec.block_size,
    }
    res["kv_tokens"] = res["kv_blocks"] * ec.block_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    # ViT: 1288x728 → resized 728x1288 → grid 52x92 = 4784 patches → 1196 LLM tokens.
    pv = torch.randn(52 * 92, 1176, generator=gen).to(device, torch.bfloat16)
    grid = torch.tensor([[1, 52, 92]])
    with torch.no_grad():
        for _ in range(2):
            ex.model.encode_images(pv, grid)
        _sync()
        t = time.perf_counter()
        for _ in range(5):
            ex.model.encode_images(pv, grid)
        _sync()
    res["vit_1288x728_ms"] = (time.perf_counter() - t) / 5 * 1e3

    def prompt(n_text: int, n_img: int) -> tuple[list[int], torch.Tensor | None]:
        ids = torch.randint(0, 150000, (n_text,), generator=gen).tolist()
        if not n_img:
            return ids, None
        ids = (
            ids[:4]
            + [mc.image_start_token_id]
            + [mc.image_token_id] * n_img
            + [mc.image_end_token_id]
            + ids[4:]
        )
        return ids, torch.randn(n_img, mc.hidden_size, generator=gen).to(device, torch.bfloat16)

    def one(n_img: int, n_text: int, max_tokens: int, tag: str) -> tuple[float, float]:
        ids, embeds = prompt(n_text, n_img)
        _sync()
        t = time.perf_counter()
        ex.add_request(
            GenerationRequest(
                tag,
                ids,
                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                image_embeds=embeds,
            )
        )
        first = None
        n = 0
        done = False
        while not done:
            for out in ex.step():
                n += len(out.new_token_ids)
                if first is None and out.new_token_ids:
                    _sync()
                    first = time.perf_counter()
                done = done or out.finish_reason is not None
        _sync()
        end = time.perf_counter()
        return (first - t) * 1e3, (end - first) * 1e3 / max(n - 1, 1)

    one(256, 30, 8, "warm0")
    one(1196, 26, 4, "warm1")
    ttft, _ = one(1196, 26, 2, "screenshot")
    res["prefill_1224_tokens_ms"] = ttft
    res["ttft_1288x728_engine_ms"] = ttft + res["vit_1288x728_ms"]
    _, tpot = one(0, 32, 129, "decode")
    res["decode_ms_per_token_b1"] = tpot

    # 32 concurrent 448x448 (256 image tokens) requests, 128 output tokens each.
    ids_list = []
    _sync()
    t = time.perf_counter()
    for i in range(32):
        ids, embeds = prompt(30, 256)
        rid = f"b{i}"
        ex.add_request(
            GenerationRequest(
                rid,
                ids,
                SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True),
                image_embeds=embeds,
            )
        )
        ids_list.append(rid)
    tokens = _run_until_done(ex, ids_list)
    _sync()
    dt = time.perf_counter() - t
    res["batch32_output_tok_s"] = sum(len(v) for v in tokens.values()) / dt
    res["batch32_wall_s"] = dt
    res["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        res["decode_profile_b1"] = _profile_decode(ex, prompt)
    return res


def _profile_decode(ex, prompt) -> str:
    """Kernel-time table of 16 decode steps at batch 1 (where the gap to the roofline goes)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.executor import GenerationRequest
    from engine.sampling import SamplingParams

    ids, _ = prompt(64, 0)
    ex.add_request(
        GenerationRequest("prof", ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    )
    for _ in range(4):  # prefill + a few decodes outside the trace
        ex.step()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(16):
            ex.step()
        _sync()
    while ex.has_unfinished():
        ex.step()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    phases = [("parity", lambda: parity(args.device, args.out))] if not args.skip_parity else []
    if not args.skip_speed:
        phases.append(("speed", lambda: speed(args.device)))
    for name, fn in phases:
        try:
            report[name] = fn()
        except Exception:  # keep the other phase's numbers
            report[name] = {"error": traceback.format_exc()}
            print(report[name]["error"])
        (args.out / "engine_probe.json").write_text(json.dumps(report, indent=2))
    speed_report = dict(report.get("speed", {}))
    profile_table = speed_report.pop("decode_profile_b1", None)
    if profile_table:
        (args.out / "decode_profile_b1.txt").write_text(profile_table)
    print(json.dumps(speed_report, indent=1))
    if "parity" in report:
        print("greedy prefix agreement:", report["parity"].get("greedy_prefix_agreement"))


if __name__ == "__main__":
    main()
