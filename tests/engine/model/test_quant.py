"""engine.model.quant: FP8 (float8_e4m3fn, per-output-channel scales) decoder linears.

CPU runs the dequantized path (W8A16), the reference; the GPU-marked test checks the `torch._scaled_mm`
paths (W8A8, per-token activations; per-tensor GEMM + epilogue, captured in CUDA graphs at small M, and
row-wise) against it, the Triton kernels against their torch references, and CUDA-graph replay.

Accuracy on the tiny random checkpoint (bfloat16 activations, fp8 vs the same weights in bfloat16; 16
prompts; seen on torch 2.13 CPU): first-step logits max abs error <= 0.26 (logits up to ~2.9 in size),
relative (norm) error <= 0.14; next-token argmax, teacher-forced over every prompt position, agrees
~83% with the float32 model (bfloat16 alone: ~97%). The tiny model's logits are nearly flat (top-2 gaps
often < 0.1) and random models amplify rounding ~5x, so free-running greedy continuations part early;
the tests assert the error bounds with margin, and argmax equality where the bf16 top-2 gap is more than
twice the observed max error (then it cannot flip).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from engine.config import EngineConfig, ModelConfig
from engine.kernels.attention import AttentionMetadata
from engine.llm_engine import GenerationRequest, LLMEngine
from engine.model.decoder import Glm4vModel
from engine.model.quant import (
    FP8_DTYPE,
    FP8_MAX,
    TENSORWISE_MAX_M,
    Fp8Linear,
    autotune_tensorwise_rows_,
    decoder_linear_names,
    dequantize_weight,
    quantize_decoder_fp8_,
    quantize_rows_fp8,
    quantize_rows_fp8_reference,
    quantize_vision_fp8_,
    quantize_weight_fp8,
    scale_rows_cols,
    scale_rows_cols_reference,
    set_tensorwise_rows_,
    vision_linear_names,
    weight_bytes,
)
from engine.sample.sampler import SamplingParams

BLOCK_SIZE = 4
NUM_PROMPTS = 16
# Bounds of the tiny-model accuracy test (observed: 0.26, 0.14, 0.83; see the module docstring).
MAX_ABS_LOGIT_ERROR = 0.4
MAX_REL_LOGIT_ERROR = 0.2
MIN_TEACHER_FORCED_AGREEMENT = 0.7


@pytest.fixture(scope="module")
def model_config(tiny_checkpoint) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint)


def rows_with_spread(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Gaussian rows scaled by 10^U(-3, 3) (per-channel scales must handle every magnitude)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    return w * torch.pow(10.0, torch.empty(out_features, 1).uniform_(-3, 3, generator=gen))


def prompts() -> list[list[int]]:
    return [
        torch.randint(0, 800, (8 + 3 * s,), generator=torch.Generator().manual_seed(s)).tolist()
        for s in range(NUM_PROMPTS)
    ]


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of positions with the same token, fraction inside the common prefixes)."""
    total = sum(len(x) for x in a)
    same = sum(s == t for x, y in zip(a, b, strict=True) for s, t in zip(x, y, strict=True))
    prefix = sum(
        next((k for k, (s, t) in enumerate(zip(x, y, strict=True)) if s != t), len(x))
        for x, y in zip(a, b, strict=True)
    )
    return same / total, prefix / total


@torch.inference_mode()
def all_logits(model: Glm4vModel, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Logits [len(ids), vocab] float32 of one full-prompt forward."""
    n = len(ids)
    num_blocks = -(-n // BLOCK_SIZE)
    kv_caches = model.allocate_kv_caches(num_blocks, BLOCK_SIZE, model.device, dtype)
    attn = AttentionMetadata.build([n], [n], [list(range(num_blocks))], BLOCK_SIZE, model.device)
    positions = torch.arange(n).expand(3, -1).clone().to(model.device)
    hidden = model.forward(torch.tensor(ids, device=model.device), positions, attn, kv_caches)
    return model.compute_logits(hidden).float().cpu()


# -- Fp8Linear ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_features", "in_features"), [(48, 64), (256, 128), (5, 1000), (33, 7)])
def test_weight_quantization_error_bounds(out_features, in_features):
    w = rows_with_spread(out_features, in_features, seed=out_features)
    q, scale = quantize_weight_fp8(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.dtype == torch.float32
    assert torch.allclose(scale, w.abs().amax(dim=1) / FP8_MAX, rtol=1e-6, atol=0)
    dq = dequantize_weight(q, scale, torch.float32)
    # per row (norm): e4m3 keeps 3 mantissa bits, round to nearest -> at most 2^-4 relative per element
    row_rel = (dq - w).norm(dim=1) / w.norm(dim=1)
    assert float(row_rel.max()) <= 2**-3
    assert float(row_rel.max()) <= 2**-4
    # per element: half an ulp of a normal (2^-4 relative) or of a subnormal step (2^-9 * scale)
    bound = 2**-4 * w.abs() + 2**-10 * scale[:, None] + 1e-6 * w.abs()
    assert bool(((dq - w).abs() <= bound).all())
    # each row's largest magnitude is 448 * scale, exactly
    top = w.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(q.float().abs().gather(1, top).squeeze(1), torch.full((out_features,), FP8_MAX))


def test_zero_rows_and_zero_inputs_stay_finite():
    linear = nn.Linear(32, 16, bias=True)
    with torch.no_grad():
        linear.weight[3] = 0
        linear.weight[10] = 0
        linear.bias.copy_(torch.arange(16.0))
    layer = Fp8Linear.from_linear(linear)
    assert float(layer.weight_scale[3]) == 1.0 and float(layer.weight_scale[10]) == 1.0
    assert not layer.weight[3].float().any() and not layer.weight[10].float().any()
    x = torch.randn(4, 32)
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 3], torch.full((4,), 3.0)) and torch.equal(out[:, 10], torch.full((4,), 10.0))
    assert torch.equal(layer(torch.zeros(2, 32)), linear.bias.detach().expand(2, -1))
    # the activation quantizer: an all-zero row gets the floor scale and quantizes to zeros
    q, scale = quantize_rows_fp8_reference(torch.zeros(2, 32, dtype=torch.bfloat16))
    assert not q.float().any() and bool((scale > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_linear(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=bias)
    with torch.no_grad():
        if bias:
            linear.bias.normal_()
    reference = linear  # float32
    layer = Fp8Linear.from_linear(linear.to(dtype))
    assert layer.kernel == "dequant"  # CPU
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (96,)
    assert (layer.bias is None) == (not bias) and (not bias or layer.bias.dtype == dtype)
    x = torch.randn(2, 3, 256)  # leading dims are kept
    out = layer(x.to(dtype))
    assert out.shape == (2, 3, 96) and out.dtype == dtype
    # exactly the dequantized weight's linear (up to float rounding)
    dq = dequantize_weight(layer.weight, layer.weight_scale, torch.float32)
    exact = nn.functional.linear(x.to(dtype).float(), dq, None if not bias else layer.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), exact, rtol=tol, atol=tol)
    # against the unquantized layer: the weights' rounding (~2.5% RMS), plus bf16's own
    with torch.no_grad():
        ref = reference.float()(x)
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 0.05, rel


def test_fp8_linear_float16_dequant_does_not_overflow():
    """x @ the unscaled fp8 values (up to 448) would overflow float16 here; the layer scales first."""
    linear = nn.Linear(4096, 8, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1e-3)
    layer = Fp8Linear.from_linear(linear.half())
    x = torch.full((1, 4096), 50.0, dtype=torch.float16)  # 4096 * 50 * 448 > 65504
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.full((1, 8), 4096 * 50 * 1e-3), rtol=1e-2)


def test_activation_quantizer_reference_round_trip():
    x = torch.randn(5, 300, dtype=torch.bfloat16) * torch.tensor([[1e-3], [1.0], [30.0], [1e3], [0.1]])
    q, scale = quantize_rows_fp8(x)  # CPU: the torch reference
    assert q.dtype == FP8_DTYPE and scale.shape == (5, 1) and scale.dtype == torch.float32
    assert torch.allclose(scale, x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX)
    back = q.float() * scale
    rel = (back - x.float()).norm(dim=1) / x.float().norm(dim=1)
    assert float(rel.max()) <= 2**-4


# -- quantize_decoder_fp8_ ------------------------------------------------------------------------------


def test_quantize_decoder_swaps_exactly_the_decoder_linears(tiny_checkpoint, model_config):
    mc = model_config
    model = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    linears_before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embed = model.language_model.embed_tokens.weight.clone()
    before = weight_bytes(model)
    expected = {
        f"language_model.layers.{i}.{name}"
        for i in range(mc.num_hidden_layers)
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    } | {"lm_head"}
    swapped_bytes = sum(
        model.get_submodule(n).weight.numel() * 2 for n in expected
    )  # bf16 weights that become fp8 (1 byte) + fp32 scales
    assert set(decoder_linear_names(model)) == expected

    assert quantize_decoder_fp8_(model) == 4 * mc.num_hidden_layers + 1 == len(expected)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8 == expected
    linears_after = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears_after == linears_before - expected  # the vision tower's linears are untouched
    assert any(n.startswith("visual.") for n in linears_after)
    assert torch.equal(model.language_model.embed_tokens.weight, embed)
    assert all(model.get_submodule(n).bias is not None for n in expected if n.endswith("qkv_proj"))
    scales = sum(model.get_submodule(n).weight_scale.numel() * 4 for n in expected)
    assert weight_bytes(model) == before - swapped_bytes // 2 + scales
    # the model still reports its activation dtype (encode_images and the KV cache use it)
    assert isinstance(model, Glm4vModel) and model.dtype == torch.bfloat16 and model.device.type == "cpu"
    grid = torch.tensor([[1, 4, 4]])
    embeds = model.encode_images(torch.randn(16, mc.vision_config.patch_dim), grid)
    assert embeds.dtype == torch.bfloat16 and embeds.shape == (4, mc.hidden_size)
    # idempotent
    assert quantize_decoder_fp8_(model) == 0


def test_quantize_decoder_keeps_a_tied_or_excluded_lm_head(model_config):
    tied_config = dataclasses.replace(model_config, tie_word_embeddings=True)
    tied = Glm4vModel.dummy(tied_config, "cpu", "bfloat16", seed=0)
    assert quantize_decoder_fp8_(tied) == 4 * model_config.num_hidden_layers
    assert type(tied.lm_head) is nn.Linear
    assert tied.lm_head.weight is tied.language_model.embed_tokens.weight
    untied = Glm4vModel.dummy(model_config, "cpu", "bfloat16", seed=0)
    assert quantize_decoder_fp8_(untied, include_lm_head=False) == 4 * model_config.num_hidden_layers
    assert type(untied.lm_head) is nn.Linear and untied.dtype == torch.bfloat16


def test_tensorwise_rows_bound_the_per_tensor_gemm_of_the_decoder_layers_that_have_it(model_config):
    """`set_tensorwise_rows_` moves the rows up to which a decoder FP8 layer with the per-tensor GEMM runs it;
    layers without it, and the ViT's, keep theirs. Without the row-wise GEMM a layer runs the per-tensor
    one up to that bound and the dequantized path above (graphs or not); on CPU no GEMM checks pass, so the
    kernels are set here as a GPU's `select_kernel` sets them."""
    model = Glm4vModel.dummy(model_config, "cpu", "bfloat16", seed=0)
    names = decoder_linear_names(model)
    quantize_decoder_fp8_(model)
    quantize_vision_fp8_(model)
    assert set_tensorwise_rows_(model, 320) == 0  # CPU: no layer has the per-tensor GEMM
    qkv = model.get_submodule(names[0])
    assert (qkv.kernel, qkv.has_tensorwise, qkv.tensorwise_max_m) == ("dequant", False, 0)
    for name in names[:3]:
        layer = model.get_submodule(name)
        layer.kernel, layer.has_tensorwise, layer.tensorwise_max_m = "scaled_mm", True, TENSORWISE_MAX_M
    vit = model.get_submodule(vision_linear_names(model)[0])
    vit.kernel, vit.has_tensorwise, vit.tensorwise_max_m = "scaled_mm", True, 0  # rowwise_in_graphs
    assert set_tensorwise_rows_(model, 320) == 3
    assert [model.get_submodule(n).tensorwise_max_m for n in names[:4]] == [320, 320, 320, 0]
    assert vit.tensorwise_max_m == 0
    paths = {m: qkv._path_of(m, torch.bfloat16, torch.device("cpu")) for m in (1, 128, 320, 321)}
    assert paths == {1: "tensorwise", 128: "tensorwise", 320: "tensorwise", 321: "dequant"}
    assert (
        set_tensorwise_rows_(model, 0) == 3
        and qkv._path_of(1, torch.bfloat16, qkv.weight.device) == "dequant"
    )
    with pytest.raises(ValueError, match="rows: -1 must be 0 or more"):
        set_tensorwise_rows_(model, -1)


def test_autotune_gives_each_kind_of_layer_the_faster_gemm_per_row_bucket_above_the_bound(model_config):
    """`autotune_tensorwise_rows_` times each kind of decoder layer that has both GEMMs at each row count
    above the bound (never at or below it), hands every layer of the kind the faster per count, and a
    graph's rows take the choice of the smallest timed count that holds them (none above the largest:
    row-wise). The kernels are set as a GPU's `select_kernel` sets them; the timer is given."""
    model = Glm4vModel.dummy(model_config, "cpu", "bfloat16", seed=0)
    quantize_decoder_fp8_(model)
    kinds = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    for layer in model.language_model.layers:
        for kind in kinds[:3]:  # down_proj keeps no GEMM: not timed, not changed
            fp8 = layer.get_submodule(kind)
            fp8.kernel, fp8.has_tensorwise, fp8.tensorwise_max_m, fp8.rowwise = (
                "scaled_mm",
                True,
                128,
                "plain",
            )
    assert set_tensorwise_rows_(model, 320) == 3 * len(model.language_model.layers)
    # per-tensor faster: qkv at 384 and 1280, o at 448, gate/up nowhere (a tie goes row-wise)
    faster = {("qkv_proj", 384), ("qkv_proj", 1280), ("o_proj", 448)}
    calls = []

    def timer(layers, path, m):
        name = next(n for n, x in model.named_modules() if x is layers[0]).rsplit(".", 1)[1]
        calls.append((name, path, m, len(layers)))
        if name == "gate_up_proj":
            return 1.0
        return 1.0 if (path == "tensorwise") == ((name, m) in faster) else 2.0

    times = autotune_tensorwise_rows_(model, [128, 320, 1280, 384, 448, 384], timer=timer)
    assert list(times) == list(kinds[:3])
    assert times["self_attn.qkv_proj"] == {384: (1.0, 2.0), 448: (2.0, 1.0), 1280: (1.0, 2.0)}
    assert {m for _, _, m, _ in calls} == {384, 448, 1280}  # 128 and 320 are within the bound
    assert len(calls) == 3 * 3 * 2 and {n for *_, n in calls} == {len(model.language_model.layers)}
    qkv, o, gate_up, down = (model.language_model.layers[-1].get_submodule(k) for k in kinds)
    assert qkv.tensorwise_timed == ((384, True), (448, False), (1280, True))
    assert o.tensorwise_timed == ((384, False), (448, True), (1280, False))
    assert gate_up.tensorwise_timed == ((384, False), (448, False), (1280, False))
    assert down.tensorwise_timed == () and down.kernel == "dequant"
    # rows -> the GEMM a graph of that many rows captures (rowwise None: the bound's answer on any device)
    qkv.rowwise = None
    paths = {
        m: qkv._path_of(m, torch.bfloat16, torch.device("cpu"))
        for m in (320, 321, 384, 385, 448, 449, 1280, 1281)
    }
    assert paths == {
        320: "tensorwise",  # the bound
        321: "tensorwise",  # up to 384: timed per-tensor
        384: "tensorwise",
        385: "dequant",  # up to 448: row-wise
        448: "dequant",
        449: "tensorwise",  # up to 1280: per-tensor
        1280: "tensorwise",
        1281: "dequant",  # above every timed count
    }


def test_quantized_tiny_model_logits_and_greedy(tiny_checkpoint, model_config, caplog):
    mc = model_config
    bf16 = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    fp8 = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    quantize_decoder_fp8_(fp8)
    max_abs, max_rel, agree, total, first_agree, gaps = 0.0, 0.0, 0, 0, 0, []
    for ids in prompts():
        ref, got = all_logits(bf16, ids, torch.bfloat16), all_logits(fp8, ids, torch.bfloat16)
        first_ref, first_got = ref[-1], got[-1]  # the logits of the first generated token
        max_abs = max(max_abs, float((first_got - first_ref).abs().max()))
        max_rel = max(max_rel, float((first_got - first_ref).norm() / first_ref.norm()))
        top2 = first_ref.topk(2).values
        gaps.append((float(top2[0] - top2[1]), int(first_ref.argmax()) == int(first_got.argmax())))
        first_agree += gaps[-1][1]
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())  # teacher-forced next-token argmax
        total += ref.shape[0]
    print(
        f"\ntiny fp8 vs bf16: first-step logits max abs {max_abs:.3f}, relative {max_rel:.3f}; first-step "
        f"argmax {first_agree}/{NUM_PROMPTS}; teacher-forced argmax agreement {agree / total:.3f} ({total})"
    )
    assert max_abs < MAX_ABS_LOGIT_ERROR and max_rel < MAX_REL_LOGIT_ERROR
    assert agree / total >= MIN_TEACHER_FORCED_AGREEMENT
    clear = [same for gap, same in gaps if gap > 2 * max_abs]  # an error below gap/2 cannot flip argmax
    assert len(clear) >= 2 and all(clear)  # 3 of 16 prompts here

    # The engine quantizes a given bf16 model in place when quantization is fp8, and logs it.
    model = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    engine = {"block_size": BLOCK_SIZE, "num_kv_blocks": 512, "max_model_len": 256, "dtype": "bfloat16"}
    with caplog.at_level(logging.INFO, logger="glm-engine"):
        ex = LLMEngine(mc, EngineConfig(**engine, quantization="fp8"), model=model)
    assert isinstance(ex.model.lm_head, Fp8Linear) and ex.model is model
    assert f"fp8: {4 * mc.num_hidden_layers + 1} decoder linear layers quantized" in caplog.text
    reference = LLMEngine(mc, EngineConfig(**engine), model=bf16)
    outputs = {}
    for name, llm in (("fp8", ex), ("bf16", reference)):
        for i, ids in enumerate(prompts()):
            llm.add_request(
                GenerationRequest(
                    str(i), ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
                )
            )
        tokens = {str(i): [] for i in range(NUM_PROMPTS)}
        while llm.has_unfinished():
            for out in llm.step():
                tokens[out.request_id] += out.new_token_ids
        outputs[name] = [tokens[str(i)] for i in range(NUM_PROMPTS)]
    same, prefix = greedy_agreement(outputs["fp8"], outputs["bf16"])
    print(f"tiny fp8 vs bf16 greedy, 32 tokens x {NUM_PROMPTS}: same token at {same:.3f} of the positions, "
          f"common prefix {prefix:.3f}")  # fmt: skip
    for (gap, _), x, y in zip(gaps, outputs["fp8"], outputs["bf16"], strict=True):
        if gap > 2 * max_abs:
            assert x[0] == y[0]  # the engine's first token, where the logits test says it cannot flip


# -- quantize_vision_fp8_ -------------------------------------------------------------------------------


class W8A16(nn.Module):
    """What an FP8 layer computes on the CPU, from its own quantization of ``linear``'s weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.weight_scale = quantize_weight_fp8(linear.weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)


def test_quantize_vision_swaps_exactly_the_vit_linears(tiny_checkpoint, model_config, caplog):
    mc = model_config
    model = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    bf16 = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    by_hand = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    linears_before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = ("attn.qkv", "attn.proj", "mlp.gate_up_proj", "mlp.down_proj")
    expected = {f"visual.blocks.{i}.{name}" for i in range(mc.vision_config.depth) for name in blocks} | {
        "visual.merger.proj", "visual.merger.gate_up_proj", "visual.merger.down_proj",
    }  # fmt: skip
    assert set(vision_linear_names(model)) == expected
    assert set(vision_linear_names(model.visual)) == {n.removeprefix("visual.") for n in expected}
    assert quantize_vision_fp8_(model) == len(expected) == 4 * mc.vision_config.depth + 3
    assert {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)} == expected
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} == linears_before - expected
    assert quantize_vision_fp8_(model) == 0  # idempotent
    # the ViT encodes with those layers: the same embeddings as one whose linears compute by hand from the
    # same FP8 weights, and not bf16's
    for name in expected:
        parent, _, attr = name.rpartition(".")
        setattr(by_hand.get_submodule(parent), attr, W8A16(getattr(by_hand.get_submodule(parent), attr)))
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    pixels = torch.randn(
        int(grid.prod(dim=1).sum()), mc.vision_config.patch_dim, generator=torch.Generator().manual_seed(5)
    )
    got, want, full = (m.encode_images(pixels, grid) for m in (model, by_hand, bf16))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    error = float((got.float() - full.float()).norm() / full.float().norm())
    assert 0 < error < 0.1, error
    # the engine quantizes a given model's ViT when vision_quantization is fp8, and logs it
    fresh = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "bfloat16", mc)
    engine = {"block_size": BLOCK_SIZE, "num_kv_blocks": 64, "max_model_len": 256, "dtype": "bfloat16"}
    with caplog.at_level(logging.INFO, logger="glm-engine"):
        ex = LLMEngine(mc, EngineConfig(**engine, vision_quantization="fp8"), model=fresh)
    assert isinstance(ex.model.visual.blocks[0].attn.qkv, Fp8Linear) and ex.model is fresh
    assert type(ex.model.lm_head) is nn.Linear  # the decoder stays as it is
    assert f"fp8: {len(expected)} ViT linear layers quantized" in caplog.text


# -- EngineConfig ----------------------------------------------------------------------------------------


def test_engine_config_quantization_field():
    assert EngineConfig().quantization == "none"
    for dtype in ("bfloat16", "float16"):
        config = EngineConfig(dtype=dtype, quantization="fp8")
        assert EngineConfig.from_dict(config.to_dict()) == config
        assert config.to_dict()["quantization"] == "fp8"
    assert EngineConfig.from_dict({"dtype": "bfloat16"}).quantization == "none"  # older engine dirs
    with pytest.raises(ValueError, match=r"^quantization: 'int4' must be one of \['none', 'fp8'\]"):
        EngineConfig(dtype="bfloat16", quantization="int4")
    with pytest.raises(ValueError, match=r"^quantization: fp8 needs a 16-bit activation dtype"):
        EngineConfig(dtype="float32", quantization="fp8")
    with pytest.raises(ValueError, match=r"^quantization: fp8 needs"):
        EngineConfig().replace(quantization="fp8")  # the default dtype is float32
    # the ViT's, on its own
    config = EngineConfig(dtype="bfloat16", vision_quantization="fp8")
    assert EngineConfig.from_dict(config.to_dict()) == config and config.quantization == "none"
    assert EngineConfig.from_dict({"dtype": "bfloat16"}).vision_quantization == "none"  # older engine dirs
    with pytest.raises(ValueError, match=r"^vision_quantization: 'int4' must be one of \['none', 'fp8'\]"):
        EngineConfig(dtype="bfloat16", vision_quantization="int4")
    with pytest.raises(ValueError, match=r"^vision_quantization: fp8 needs a 16-bit activation dtype"):
        EngineConfig(dtype="float32", vision_quantization="fp8")


# -- CUDA --------------------------------------------------------------------------------------------------


def test_w8a8_paths_on_cpu_where_torch_has_scaled_mm():
    """The GEMM paths' math (per-token activations, scales, bias) through torch's CPU _scaled_mm."""
    linear = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.bias.normal_()
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ref = layer.forward_dequant(x).float()
    for path, rowwise in (("tensorwise", None), ("rowwise", "plain"), ("rowwise", "fused_bias")):
        layer.rowwise = rowwise
        try:
            out = layer._forward_fp8(x, path)
        except (RuntimeError, NotImplementedError) as exc:  # no CPU _scaled_mm for this in this torch
            pytest.skip(f"torch._scaled_mm on CPU: {exc}")
        rel = float((out.float() - ref).norm() / ref.norm())
        assert out.dtype == torch.bfloat16 and rel < 0.06, (path, rowwise, rel)


def test_scale_epilogue_reference():
    acc = torch.randn(3, 40)
    scale_a, scale_b, bias = torch.rand(3, 1), torch.rand(40), torch.randn(40, dtype=torch.bfloat16)
    out = scale_rows_cols(acc, scale_a, scale_b, bias, torch.bfloat16)  # CPU: the reference
    expected = (acc * scale_a * scale_b + bias.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.gpu
def test_cuda_scaled_mm_path_equals_dequantized_path(tiny_checkpoint, model_config):
    device = torch.device("cuda")
    torch.manual_seed(0)
    # (in, out, bias): shapes of the full-size decoder (qkv_proj, down_proj) and a plain one
    for in_features, out_features, bias in ((4096, 4608, True), (13696, 4096, False), (4096, 2048, False)):
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.normal_(0, 0.02)
            if bias:
                linear.bias.normal_(0, 0.1)
        layer = Fp8Linear.from_linear(linear)
        assert layer.kernel == "scaled_mm" and layer.tensorwise_max_m == TENSORWISE_MAX_M, layer
        assert layer.rowwise in ("fused_bias", "plain"), layer
        for m in (1, 7, 32, TENSORWISE_MAX_M, TENSORWISE_MAX_M + 1, 300):  # both GEMM paths
            x = torch.randn(m, in_features, device=device, dtype=torch.bfloat16)
            fast, ref = layer(x), layer.forward_dequant(x)
            assert fast.shape == ref.shape and fast.dtype == torch.bfloat16
            rel = float((fast.float() - ref.float()).norm() / ref.float().norm())
            assert rel < 0.06, (in_features, out_features, m, rel)  # per-token fp8 activations: ~2.5%
            # the two fp8 GEMMs agree closely (same fp8 operands; accumulation and roundings differ)
            tensorwise = layer._forward_fp8(x, "tensorwise")
            rel = float((tensorwise.float() - ref.float()).norm() / ref.float().norm())
            assert rel < 0.06, (in_features, out_features, m, rel)
            torch.testing.assert_close(fast, tensorwise, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
            # the Triton kernels give their torch references' numbers
            q, scale = quantize_rows_fp8(x)
            q_ref, scale_ref = quantize_rows_fp8_reference(x)
            assert torch.equal(scale, scale_ref)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
            acc = torch.randn(m, out_features, device=device)
            got = scale_rows_cols(acc, scale, layer.weight_scale, layer.bias, torch.bfloat16)
            want = scale_rows_cols_reference(acc, scale, layer.weight_scale, layer.bias, torch.bfloat16)
            torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)  # fma vs mul+add: <= 1 ulp
        # CUDA graphs: capture, change the input in place, replay == eager of the same path (small M is
        # captured as "tensorwise" and runs "rowwise" eagerly; large M is "rowwise" in both, unless the
        # layer's bound is raised: fp8_tensorwise_rows, or autotune_tensorwise_rows_ chose per-tensor above it)
        for m, path, bound, timed in (
            (16, "tensorwise", None, ()),
            (200, "rowwise", None, ()),
            (200, "tensorwise", 320, ()),
            (200, "tensorwise", None, ((256, True),)),
            (200, "rowwise", None, ((192, True), (256, False))),
        ):
            layer.tensorwise_max_m, layer.tensorwise_timed = bound or TENSORWISE_MAX_M, timed
            x = torch.randn(m, in_features, device=device, dtype=torch.bfloat16)
            assert torch.equal(layer(x), layer._forward_fp8(x, "rowwise"))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                layer(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = layer(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(captured, layer._forward_fp8(x, path), rtol=0, atol=0)

    # rows wider than one pass of the activation quantizer
    x = torch.randn(3, 20000, device=device, dtype=torch.bfloat16)
    q, scale = quantize_rows_fp8(x)
    q_ref, scale_ref = quantize_rows_fp8_reference(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))

    odd = Fp8Linear.from_linear(nn.Linear(72, 40, device=device, dtype=torch.bfloat16))  # K % 16 != 0
    assert odd.kernel == "dequant"
    x = torch.randn(3, 72, device=device, dtype=torch.bfloat16)
    assert torch.equal(odd(x), odd.forward_dequant(x))

    # the tiny model on the GPU: fp8 vs bf16 logits, as on the CPU (plus the activations' rounding)
    bf16 = Glm4vModel.from_pretrained(tiny_checkpoint, device, "bfloat16", model_config)
    fp8 = Glm4vModel.from_pretrained(tiny_checkpoint, device, "bfloat16", model_config)
    quantize_decoder_fp8_(fp8)
    assert fp8.dtype == torch.bfloat16
    for ids in prompts()[:8]:
        ref, got = all_logits(bf16, ids, torch.bfloat16)[-1], all_logits(fp8, ids, torch.bfloat16)[-1]
        assert float((got - ref).abs().max()) < 2 * MAX_ABS_LOGIT_ERROR


@pytest.mark.gpu
def test_cuda_autotune_times_both_gemms_and_graphs_replay_the_choice(tiny_checkpoint, model_config):
    """`autotune_tensorwise_rows_` with its CUDA-event timer on the tiny model in FP8: every kind with both
    GEMMs gets a positive time for each and a choice per count above the bound; the engine's start-up
    (`prepare_model` with fp8_gemm_autotune) sets the same kind of table."""
    from engine.config import EngineConfig
    from engine.runner.model_runner import prepare_model

    device = torch.device("cuda")
    model = Glm4vModel.from_pretrained(tiny_checkpoint, device, "bfloat16", model_config)
    quantize_decoder_fp8_(model)
    set_tensorwise_rows_(model, 64)
    times = autotune_tensorwise_rows_(model, [32, 64, 96, 160])
    assert times, "no decoder layer of the tiny model has both FP8 GEMMs"
    for kind, by_rows in times.items():
        assert list(by_rows) == [96, 160], kind
        assert all(0 < ms < 1e3 for pair in by_rows.values() for ms in pair), (kind, by_rows)
        layer = model.language_model.layers[0].get_submodule(kind)
        assert layer.tensorwise_timed == tuple((m, t < r) for m, (t, r) in by_rows.items())

    model = Glm4vModel.from_pretrained(tiny_checkpoint, device, "bfloat16", model_config)
    config = EngineConfig(
        device="cuda",
        dtype="bfloat16",
        quantization="fp8",
        fp8_gemm_autotune=True,
        max_num_batched_tokens=512,
    )
    prepare_model(model, config, device, enforce_eager=True)  # eager: no timing
    assert all(not x.tensorwise_timed for x in model.modules() if isinstance(x, Fp8Linear))
    prepare_model(model, config, device)
    timed = [x.tensorwise_timed for x in model.modules() if isinstance(x, Fp8Linear) and x.tensorwise_timed]
    assert timed and {m for table in timed for m, _ in table} == {384, 448, 512}  # the buckets above 320
