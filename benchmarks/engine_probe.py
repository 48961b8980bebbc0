"""Engine-only GPU probe: bf16 greedy agreement with transformers, and the full-size shape's raw speed.

    python -m benchmarks.engine_probe --out DIR [--skip-parity] [--skip-speed] [--fp8]

Runs the engine in-process (no Triton), so it isolates the engine's own cost:
  * parity: the tiny checkpoint in bf16 on the GPU, our greedy tokens vs transformers `generate()`
    (text-only, one image, two images), reported as a token agreement rate (bf16 rounding can flip a
    near-tie; CPU fp32 parity is exact and tested in CI);
  * speed: the full-size GLM-4.6V-Flash shape with random bf16 weights: ViT time for a 1288x728 image,
    prefill time of a 1224-token prompt, decode ms/token at batch 1, output tokens/s at 32 concurrent.
  * --fp8 (off by default): EngineConfig.quantization "fp8" against bf16 (engine.model.quant): greedy agreement
    and first-step logits error on the tiny checkpoint and on the full-size shape (the same random
    weights, quantized in place, so one model is in memory), then decode ms/token at batch 1 and output
    tok/s at 32 concurrent (and a 1224-token prefill) of a bf16 engine and of an fp8 one (built one
    after the other), and each linear layer's time alone. Results under "fp8_tiny", "fp8_accuracy",
    "fp8_speed".
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
    from engine.llm_engine import GenerationRequest, LLMEngine
    from engine.model.rope import get_mrope_positions
    from engine.sample.sampler import SamplingParams

    ckpt = make_tiny_checkpoint(work / "tiny", "tiny", seed=0)
    tok = AutoTokenizer.from_pretrained(ckpt)
    proc = AutoImageProcessor.from_pretrained(ckpt)
    hf = Glm4vForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
    mc = ModelConfig.from_pretrained(ckpt)
    ex = LLMEngine(mc, EngineConfig(device=device, dtype="bfloat16", kv_cache_memory_bytes=64 << 20), ckpt)
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


def _full_model_config():
    """ModelConfig of the full-size GLM-4.6V-Flash shape (written once under /tmp)."""
    from build_engine.checkpoint import full_size_config
    from engine.config import ModelConfig

    tmp = Path("/tmp/glmv-full-config")
    full_size_config().save_pretrained(tmp)
    return ModelConfig.from_pretrained(tmp)


def _full_engine(device: str, quantization: str = "none", **engine_fields):
    """(engine, model config, engine config, load stats): full-size random bf16 weights, warmed up;
    ``engine_fields``: more EngineConfig settings."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    mc = _full_model_config()
    ec = EngineConfig(
        device=device,
        dtype="bfloat16",
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        max_model_len=32768,
        gpu_memory_utilization=0.9,
        quantization=quantization,
        **engine_fields,
    )
    t0 = time.perf_counter()
    ex = LLMEngine(mc, ec, None)
    ex.warmup()
    res: dict = {
        "load_s": time.perf_counter() - t0,
        "kv_blocks": ex.stats().num_blocks_total,
        "block_size": ec.block_size,
    }
    res["kv_tokens"] = res["kv_blocks"] * ec.block_size
    return ex, mc, ec, res


class _Load:
    """Random requests on an engine: `prompt`, `one` (TTFT, ms/token of one request), `batch`."""

    def __init__(self, ex, mc, device: str, gen: torch.Generator) -> None:
        self.ex, self.mc, self.device, self.gen = ex, mc, device, gen

    def prompt(self, n_text: int, n_img: int) -> tuple[list[int], torch.Tensor | None]:
        mc = self.mc
        ids = torch.randint(0, 150000, (n_text,), generator=self.gen).tolist()
        if not n_img:
            return ids, None
        ids = (
            ids[:4]
            + [mc.image_start_token_id]
            + [mc.image_token_id] * n_img
            + [mc.image_end_token_id]
            + ids[4:]
        )
        return ids, torch.randn(n_img, mc.hidden_size, generator=self.gen).to(self.device, torch.bfloat16)

    def one(self, n_img: int, n_text: int, max_tokens: int, tag: str) -> tuple[float, float]:
        from engine.llm_engine import GenerationRequest
        from engine.sample.sampler import SamplingParams

        ex = self.ex
        ids, embeds = self.prompt(n_text, n_img)
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

    def batch(
        self, num: int = 32, n_img: int = 256, n_text: int = 30, max_tokens: int = 128
    ) -> tuple[float, float]:
        """`num` concurrent requests (n_img image tokens each): (output tokens/s, wall s)."""
        from engine.llm_engine import GenerationRequest
        from engine.sample.sampler import SamplingParams

        ids_list = []
        _sync()
        t = time.perf_counter()
        for i in range(num):
            ids, embeds = self.prompt(n_text, n_img)
            rid = f"b{i}"
            self.ex.add_request(
                GenerationRequest(
                    rid,
                    ids,
                    SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                    image_embeds=embeds,
                )
            )
            ids_list.append(rid)
        tokens = _run_until_done(self.ex, ids_list)
        _sync()
        dt = time.perf_counter() - t
        return sum(len(v) for v in tokens.values()) / dt, dt


def speed(device: str) -> dict:
    ex, mc, ec, res = _full_engine(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    load = _Load(ex, mc, device, gen)

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

    load.one(256, 30, 8, "warm0")
    load.one(1196, 26, 4, "warm1")
    ttft, _ = load.one(1196, 26, 2, "screenshot")
    res["prefill_1224_tokens_ms"] = ttft
    res["ttft_1288x728_engine_ms"] = ttft + res["vit_1288x728_ms"]
    _, tpot = load.one(0, 32, 129, "decode")
    res["decode_ms_per_token_b1"] = tpot

    # 32 concurrent 448x448 (256 image tokens) requests, 128 output tokens each.
    res["batch32_output_tok_s"], res["batch32_wall_s"] = load.batch(32)
    res["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        res["decode_profile_b1"] = _profile_decode(ex, load.prompt)
    return res


def _profile_decode(ex, prompt) -> str:
    """Kernel-time table of 16 decode steps at batch 1 (where the gap to the roofline goes)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.llm_engine import GenerationRequest
    from engine.sample.sampler import SamplingParams

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


# -- fp8 (--fp8) ---------------------------------------------------------------------------------------------

FP8_PROMPT_LENS = (32, 96, 256, 700)  # random text prompts of the accuracy checks
FP8_NEW_TOKENS = 32
FP8_STORAGE = torch.float8_e4m3fn


def _free_gpu() -> None:
    """Drop what the last phase left (engines, CUDA graphs) before the next full-size model."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _fp8_kernels(model) -> dict:
    """How many Fp8Linear layers run which paths ("dequant", or the small-M / large-M fp8 GEMMs)."""
    from engine.model.quant import Fp8Linear

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            key = module.kernel
            if key != "dequant":
                key = f"tensorwise<={module.tensorwise_max_m}, rowwise={module.rowwise}"
            counts[key] = counts.get(key, 0) + 1
    return counts


@torch.inference_mode()
def _all_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] float32 (on the model's device) of one prefill of `ids`."""
    from engine.kernels.attention import AttentionMetadata

    n, block_size, device = len(ids), 16, model.device
    num_blocks = -(-n // block_size)
    dtype = model.language_model.embed_tokens.weight.dtype
    kv_caches = model.allocate_kv_caches(num_blocks, block_size, device, dtype)
    attn = AttentionMetadata.build([n], [n], [list(range(num_blocks))], block_size, device)
    positions = torch.arange(n, device=device).expand(3, -1).contiguous()
    hidden = model.forward(torch.tensor(ids, device=device), positions, attn, kv_caches)
    return model.compute_logits(hidden)


def _greedy(model, mc, device: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt through an LLMEngine around `model` (batched, CUDA-graph decode)."""
    from engine.config import EngineConfig
    from engine.llm_engine import GenerationRequest, LLMEngine
    from engine.sample.sampler import SamplingParams

    longest = max(len(p) for p in prompts) + max_tokens
    ec = EngineConfig(
        device=device,
        dtype="bfloat16",
        max_num_seqs=max(8, len(prompts)),
        max_num_batched_tokens=max(2048, longest),
        max_model_len=longest + 16,
        kv_cache_memory_bytes=1 << 30,
    )
    ex = LLMEngine(mc, ec, model=model)
    ids = [f"p{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        ex.add_request(
            GenerationRequest(
                rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            )
        )
    tokens = _run_until_done(ex, ids)
    return [tokens[rid] for rid in ids]


def _logit_outputs(model, prompts: list[list[int]], continuations: list[list[int]]) -> dict:
    """First-step logits (CPU) and next-token argmax over prompt + continuation (teacher-forced)."""
    first = [_all_logits(model, p)[-1].cpu() for p in prompts]
    argmax = []
    for prompt, cont in zip(prompts, continuations, strict=True):
        logits = _all_logits(model, prompt + cont[:-1])
        argmax.append(logits[len(prompt) - 1 :].argmax(-1).tolist())  # the argmax at each step
    return {"first_logits": first, "forced_argmax": argmax}


def _model_outputs(model, mc, device: str, prompts: list[list[int]], max_tokens: int, forced=None) -> dict:
    """Greedy tokens, plus `_logit_outputs` over the `forced` continuations (default: its own)."""
    greedy = _greedy(model, mc, device, prompts, max_tokens)
    return {"greedy": greedy, **_logit_outputs(model, prompts, forced or greedy)}


def _logit_compare(ref: dict, got: dict) -> dict:
    """First-step logits error and teacher-forced argmax agreement of `got` against `ref`."""
    pairs = list(zip(ref["first_logits"], got["first_logits"], strict=True))
    forced = sum(
        a == b
        for x, y in zip(ref["forced_argmax"], got["forced_argmax"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    return {
        "first_logits_max_abs_err": max(float((g.float() - r.float()).abs().max()) for r, g in pairs),
        "first_logits_rel_err": max(
            float((g.float() - r.float()).norm() / r.float().norm()) for r, g in pairs
        ),
        "first_logits_max_abs": max(float(r.abs().max()) for r, _ in pairs),
        "first_argmax_same": f"{sum(int(r.argmax()) == int(g.argmax()) for r, g in pairs)}/{len(pairs)}",
        "teacher_forced_argmax_agreement": forced / max(sum(len(x) for x in ref["forced_argmax"]), 1),
    }


def _compare(ref: dict, got: dict) -> dict:
    """`_logit_compare` plus greedy agreement of `got` (fp8) against `ref` (bf16)."""
    total = sum(len(x) for x in ref["greedy"])
    pairs = list(zip(ref["greedy"], got["greedy"], strict=True))
    same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=False))
    prefix = sum(
        next((k for k, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
        for x, y in pairs
    )
    return {
        **_logit_compare(ref, got),
        "greedy_same_position": same / max(total, 1),
        "greedy_prefix_agreement": prefix / max(total, 1),
        "tokens_compared": total,
        "bf16_greedy": ref["greedy"],
        "fp8_greedy": got["greedy"],
    }


def _params_to(model, dtype: torch.dtype) -> None:
    """Every floating parameter of `model` to `dtype`, one at a time (buffers stay as they are)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != FP8_STORAGE and param.dtype != dtype:
                param.data = param.data.to(dtype)
    _free_gpu()


def _parity_fp8(model, mc, device: str, prompts: list[list[int]], fp32_reference: bool = True) -> dict:
    """bf16 outputs of `model`; (optionally) float32 outputs of the same weights, the noise floor; then the
    weights quantized in place: fp8 outputs as served and with the dequantized (W8A16) path; compared."""
    from engine.model.quant import Fp8Linear, quantize_decoder_fp8_, weight_bytes

    ref = _model_outputs(model, mc, device, prompts, FP8_NEW_TOKENS)
    _free_gpu()
    fp32, extra = None, {}
    if fp32_reference:
        try:
            _params_to(model, torch.float32)
            fp32 = _logit_outputs(model, prompts, ref["greedy"])
            extra["bf16_vs_fp32"] = _logit_compare(fp32, ref)
        except Exception:
            extra["bf16_vs_fp32"] = {"error": traceback.format_exc()}
        finally:
            _params_to(model, torch.bfloat16)  # exactly the bf16 values again
    before = weight_bytes(model)
    t = time.perf_counter()
    swapped = quantize_decoder_fp8_(model)
    _sync()
    quant_s = time.perf_counter() - t
    if torch.cuda.is_available():  # reserved >> allocated would mean the freed bf16 weights fragmented
        extra["gpu_mem_allocated_gb_after_quantize"] = torch.cuda.memory_allocated() / 1e9
        extra["gpu_mem_reserved_gb_after_quantize"] = torch.cuda.memory_reserved() / 1e9
    got = _model_outputs(model, mc, device, prompts, FP8_NEW_TOKENS, forced=ref["greedy"])
    res = _compare(ref, got)
    if fp32 is not None:
        extra["fp8_vs_fp32"] = _logit_compare(fp32, got)
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    kernels = [m.kernel for m in layers]
    try:  # the same fp8 weights through the dequantized path: the weights' share of the error
        for m in layers:
            m.kernel = "dequant"
        extra["w8a16_vs_bf16"] = _logit_compare(ref, _logit_outputs(model, prompts, ref["greedy"]))
    except Exception:
        extra["w8a16_vs_bf16"] = {"error": traceback.format_exc()}
    finally:
        for m, kernel in zip(layers, kernels, strict=True):
            m.kernel = kernel
    res.update(
        layers_quantized=swapped,
        kernels=_fp8_kernels(model),
        weights_gb_bf16=before / 1e9,
        weights_gb_fp8=weight_bytes(model) / 1e9,
        quantize_s=quant_s,
        prompt_lens=[len(p) for p in prompts],
        **extra,
    )
    return res


def fp8_tiny(device: str, work: Path) -> dict:
    """Tiny checkpoint on `device`: bf16 vs fp8 (same weights) greedy agreement and logits error."""
    from build_engine.checkpoint import make_tiny_checkpoint
    from engine.config import ModelConfig
    from engine.model.decoder import Glm4vModel

    ckpt = make_tiny_checkpoint(work / "tiny", "tiny", seed=0)
    mc = ModelConfig.from_pretrained(ckpt)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 800, (8 + 3 * s,), generator=gen).tolist() for s in range(16)]
    model = Glm4vModel.from_pretrained(ckpt, device, "bfloat16", mc)
    return _parity_fp8(model, mc, device, prompts)


def fp8_accuracy(device: str) -> dict:
    """Full-size shape, random weights (seed 0): bf16, then the same weights in fp8 (one model in memory)."""
    from engine.model.decoder import Glm4vModel

    mc = _full_model_config()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 150000, (n,), generator=gen).tolist() for n in FP8_PROMPT_LENS]
    model = Glm4vModel.dummy(mc, device, "bfloat16", seed=0)
    try:
        return _parity_fp8(model, mc, device, prompts)
    finally:
        del model
        _free_gpu()


@torch.no_grad()
def _linear_microbench(device: str) -> dict:
    """Per-layer time (us, CUDA graph of 50 calls) of the full-size decoder's linears, bf16 vs fp8."""
    import torch.nn.functional as F
    from torch import nn

    from engine.model.quant import Fp8Linear

    def timed(fn, iters: int = 50) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / (5 * iters) * 1e3

    mc = _full_model_config()
    h, i, q = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads * mc.head_dim
    kv = mc.num_key_value_heads * mc.head_dim
    shapes = {
        "qkv_proj": (h, q + 2 * kv, True, mc.num_hidden_layers),
        "o_proj": (q, h, False, mc.num_hidden_layers),
        "gate_up_proj": (h, 2 * i, False, mc.num_hidden_layers),
        "down_proj": (i, h, False, mc.num_hidden_layers),
        "lm_head": (h, mc.vocab_size, False, 1),
    }
    res: dict = {}
    for name, (k, n, bias, count) in shapes.items():
        linear = nn.Linear(k, n, bias=bias, device=device, dtype=torch.bfloat16)
        linear.weight.normal_(0, 0.02)
        layer = Fp8Linear.from_linear(linear)
        row = {"kernel": layer.kernel, "count": count}
        for m in (1, 32):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            row[f"bf16_us_m{m}"] = timed(lambda x=x, linear=linear: F.linear(x, linear.weight, linear.bias))
            row[f"fp8_us_m{m}"] = timed(lambda x=x, layer=layer: layer(x))
        res[name] = row
        del linear, layer
        _free_gpu()
    for m in (1, 32):
        for kind in ("bf16", "fp8"):
            res[f"all_linears_{kind}_ms_m{m}"] = (
                sum(r[f"{kind}_us_m{m}"] * r["count"] for r in res.values() if isinstance(r, dict)) / 1e3
            )
    return res


def fp8_speed(device: str) -> dict:
    """Decode ms/token at batch 1 and output tok/s at 32 concurrent: bf16 engine, then fp8 (one at a time)."""
    from engine.model.quant import weight_bytes

    res: dict = {}
    for label, quantization in (("bf16", "none"), ("fp8", "fp8")):
        ex = load = None
        try:
            _free_gpu()
            ex, mc, _, stats = _full_engine(device, quantization)
            load = _Load(ex, mc, device, torch.Generator(device="cpu").manual_seed(0))
            stats["weights_gb"] = weight_bytes(ex.model) / 1e9
            stats["kernels"] = _fp8_kernels(ex.model)
            load.one(0, 32, 8, "warm")
            load.batch(32, max_tokens=4)  # the batch's prefill shapes compile here, not in the timing
            load.one(1196, 26, 4, "warm1")
            stats["prefill_1224_tokens_ms"], _ = load.one(1196, 26, 2, "screenshot")
            _, stats["decode_ms_per_token_b1"] = load.one(0, 32, 129, "decode")
            stats["batch32_output_tok_s"], stats["batch32_wall_s"] = load.batch(32)
            stats["gpu_mem_peak_gb"] = (
                torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
            )
            res[label] = stats
        except Exception:  # keep the other configuration's numbers
            res[label] = {"error": traceback.format_exc()}
            print(res[label]["error"])
        finally:
            ex = load = None  # the engine goes before the next one is built
            _free_gpu()
    try:
        res["linears"] = _linear_microbench(device) if torch.cuda.is_available() else None
    except Exception:
        res["linears"] = {"error": traceback.format_exc()}
        print(res["linears"]["error"])
    bf16, fp8 = res.get("bf16", {}), res.get("fp8", {})
    if "decode_ms_per_token_b1" in bf16 and "decode_ms_per_token_b1" in fp8:
        res["decode_b1_speedup"] = bf16["decode_ms_per_token_b1"] / fp8["decode_ms_per_token_b1"]
        res["batch32_speedup"] = fp8["batch32_output_tok_s"] / bf16["batch32_output_tok_s"]
    return res


def _fp8_table(report: dict) -> str:
    """Short text table of the fp8 phases (whatever of them ran)."""

    def num(value, fmt: str = ".2f") -> str:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "-"
        return str(value) if isinstance(value, int) else format(value, fmt)

    lines = []
    speed = report.get("fp8_speed") or {}
    if speed:
        bf16, fp8 = speed.get("bf16", {}), speed.get("fp8", {})
        lines.append(
            f"{'fp8 speed (full-size shape, random weights)':46s} {'bf16':>10s} {'fp8':>10s} {'fp8/bf16':>9s}"
        )
        for key, label in (
            ("weights_gb", "weights GB"),
            ("kv_tokens", "KV cache tokens"),
            ("decode_ms_per_token_b1", "decode ms/token, batch 1"),
            ("batch32_output_tok_s", "output tok/s, 32 concurrent"),
            ("prefill_1224_tokens_ms", "prefill ms, 1224-token prompt (image embeds)"),
            ("load_s", "load + quantize + warmup s"),
        ):
            a, b = bf16.get(key), fp8.get(key)
            ratio = b / a if isinstance(a, int | float) and isinstance(b, int | float) and a else None
            lines.append(f"  {label:44s} {num(a):>10s} {num(b):>10s} {num(ratio, '.3f'):>9s}")
        for label, part in (("bf16", bf16), ("fp8", fp8)):
            if "error" in part:
                lines.append(f"  {label}: ERROR {part['error'].strip().splitlines()[-1]}")
        if fp8.get("kernels"):
            lines.append(f"  fp8 layer kernels: {fp8['kernels']}")
        linears = speed.get("linears") or {}
        if "all_linears_bf16_ms_m1" in linears:
            lines.append(
                "  linears alone per step (us sums, CUDA graph): batch 1 "
                f"{num(linears['all_linears_bf16_ms_m1'])} -> {num(linears['all_linears_fp8_ms_m1'])} ms, "
                f"batch 32 {num(linears['all_linears_bf16_ms_m32'])} -> {num(linears['all_linears_fp8_ms_m32'])} ms"
            )
    for key, title in (("fp8_accuracy", "full-size random weights"), ("fp8_tiny", "tiny checkpoint")):
        acc = report.get(key) or {}
        if "error" in acc:
            lines.append(f"fp8 accuracy, {title}: ERROR {acc['error'].strip().splitlines()[-1]}")
        elif acc:
            lines.append(
                f"fp8 accuracy, {title} (bf16 vs fp8, same weights): first-step logits max abs err "
                f"{num(acc.get('first_logits_max_abs_err'), '.4f')} (logits up to "
                f"{num(acc.get('first_logits_max_abs'))}), rel err {num(acc.get('first_logits_rel_err'), '.4f')}, "
                f"argmax {acc.get('first_argmax_same')}; greedy {FP8_NEW_TOKENS} tokens: prefix agreement "
                f"{num(acc.get('greedy_prefix_agreement'), '.3f')}, same position "
                f"{num(acc.get('greedy_same_position'), '.3f')}; teacher-forced argmax agreement "
                f"{num(acc.get('teacher_forced_argmax_agreement'), '.3f')}"
            )
            for sub, label in (
                ("bf16_vs_fp32", "bf16 vs fp32 (noise floor)"),
                ("fp8_vs_fp32", "fp8 vs fp32"),
                ("w8a16_vs_bf16", "fp8 weights only (dequantized path) vs bf16"),
            ):
                part = acc.get(sub) or {}
                if "error" in part:
                    lines.append(f"  {label}: ERROR {part['error'].strip().splitlines()[-1]}")
                elif part:
                    lines.append(
                        f"  {label}: first-step rel err {num(part.get('first_logits_rel_err'), '.4f')}, "
                        f"max abs err {num(part.get('first_logits_max_abs_err'), '.4f')}; teacher-forced "
                        f"argmax agreement {num(part.get('teacher_forced_argmax_agreement'), '.3f')}"
                    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--fp8",
        action="store_true",
        help="also: fp8 vs bf16 tiny parity, full-size accuracy (same random weights) and decode speed",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    phases = [("parity", lambda: parity(args.device, args.out))] if not args.skip_parity else []
    if not args.skip_speed:
        phases.append(("speed", lambda: speed(args.device)))
    if args.fp8:
        phases += [
            ("fp8_tiny", lambda: fp8_tiny(args.device, args.out)),
            ("fp8_accuracy", lambda: fp8_accuracy(args.device)),
            ("fp8_speed", lambda: fp8_speed(args.device)),
        ]
    for name, fn in phases:
        try:
            report[name] = fn()
        except Exception:  # keep the other phase's numbers
            report[name] = {"error": traceback.format_exc()}
            print(report[name]["error"])
        if args.fp8:
            _free_gpu()  # the next phase may build another full-size model
        (args.out / "engine_probe.json").write_text(json.dumps(report, indent=2))
    speed_report = dict(report.get("speed", {}))
    profile_table = speed_report.pop("decode_profile_b1", None)
    if profile_table:
        (args.out / "decode_profile_b1.txt").write_text(profile_table)
    print(json.dumps(speed_report, indent=1))
    if "parity" in report:
        print("greedy prefix agreement:", report["parity"].get("greedy_prefix_agreement"))
    if args.fp8:
        print(_fp8_table(report))


if __name__ == "__main__":
    main()
