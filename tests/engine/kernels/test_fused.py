"""engine.kernels.fused: the Triton kernels equal their torch references (and the decoder is unchanged by them).

On CPU the kernels run through Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is
imported, so each check runs in a fresh Python: this file executes itself
(`TRITON_INTERPRET=1 python tests/engine/kernels/test_fused.py CHECK [ARGS]`). The GPU-marked tests run the same
checks in-process on CUDA (compiled kernels), plus a CUDA-graph capture/replay check.

Tolerances: float32 rtol = atol = 1e-5. bfloat16: at most 1 bf16 ulp from the torch result, and rotary
bit-equal. The kernels round where torch rounds (every bf16 op in eager torch rounds its float32 result),
so bf16 differences come only from float32 reduction order / exp in RMSNorm and silu moving a value
across a rounding boundary; the interpreter runs here give none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import bf16_ulps, main, run_interpreted  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
EPS = 1e-5
# (num_heads + num_kv_heads, head_dim, rotary_dim): the tiny test config and GLM-4.6V-Flash.
ROTARY_SHAPES = [(4 + 2, 16, 8), (32 + 2, 128, 64)]
NUM_TOKENS = [1, 3, 7]
DTYPES = [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------
# helpers of the checks


def assert_matches(got: torch.Tensor, ref: torch.Tensor, what: str, exact: bool = False) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (
        f"{what}: {got.shape} {got.dtype} vs {ref.shape}"
    )
    got, ref = got.cpu(), ref.cpu()
    if exact:
        assert torch.equal(got, ref), (
            f"{what}: not bit-equal, max diff {(got.float() - ref.float()).abs().max()}"
        )
    elif ref.dtype == torch.bfloat16:
        ulps = int(bf16_ulps(got, ref).max())
        assert ulps <= 1, f"{what}: {ulps} bf16 ulps from torch"
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def no_fallback() -> Iterator[None]:
    """Make the torch fallbacks of engine.kernels.fused raise, so a passing check really ran the kernels."""
    from engine.kernels import fused as kernels

    names = [
        "rms_norm_reference",
        "add_rms_norm_pair_reference",
        "silu_mul_reference",
        "apply_interleaved_rotary_reference_",
    ]
    saved = {name: getattr(kernels, name) for name in names}

    def boom(*args, **kwargs):
        raise AssertionError("engine.kernels.fused fell back to torch")

    from engine.kernels import attention
    from engine.model import quant

    saved_write = attention._write_new_kv  # the torch write of rotate_and_write_kv's fallback
    saved_quant = quant.quantize_rows_fp8  # the FP8 kernels' fallback quantizes after the unfused op
    for name in names:
        setattr(kernels, name, boom)
    attention._write_new_kv = quant.quantize_rows_fp8 = boom
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)
        attention._write_new_kv, quant.quantize_rows_fp8 = saved_write, saved_quant


def residual_like(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Activations with a few large channels, like a decoder's residual stream."""
    x = torch.randn(shape, generator=gen) * 2
    x[..., :: max(1, shape[-1] // 5)] *= 40
    return x


def norm_weight(hidden: int, gen: torch.Generator) -> torch.Tensor:
    return 1 + 0.2 * torch.randn(hidden, generator=gen)


# ---------------------------------------------------------------------------------------------------------
# checks (run in a subprocess under the interpreter, or in-process on CUDA)


def check_use_triton(device: str) -> None:
    from engine.kernels import fused as kernels

    x = torch.zeros(2, device=device)
    assert kernels.HAS_TRITON and kernels.use_triton(x)
    os.environ["GLMV_DISABLE_TRITON_KERNELS"] = "1"
    try:
        assert not kernels.use_triton(x)
    finally:
        del os.environ["GLMV_DISABLE_TRITON_KERNELS"]


def check_rms_norm(device: str) -> None:
    from engine.kernels import fused as kernels

    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for num_tokens in NUM_TOKENS:
            for hidden in (64, 96, 4096):
                x = residual_like((num_tokens, hidden), gen).to(device, dtype)
                w = norm_weight(hidden, gen).to(device, dtype)
                with no_fallback():
                    got = kernels.rms_norm(x, w, EPS)
                ref = kernels.rms_norm_reference(x, w, EPS)
                assert_matches(got, ref, f"rms_norm {dtype} T={num_tokens} hidden={hidden}")


def check_add_rms_norm_pair(device: str) -> None:
    from engine.kernels import fused as kernels
    from engine.model.quant import quantize_rows_fp8_reference

    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for num_tokens in NUM_TOKENS:
            for hidden in (64, 96, 4096):
                residual = residual_like((num_tokens, hidden), gen).to(device, dtype)
                h = (torch.randn(num_tokens, hidden, generator=gen) * 5).to(device, dtype)
                w_post, w_next = (norm_weight(hidden, gen).to(device, dtype) for _ in range(2))
                before = residual.clone(), h.clone()
                with no_fallback():
                    new_residual, normed = kernels.add_rms_norm_pair(residual, h, w_post, w_next, EPS)
                what = f"add_rms_norm_pair {dtype} T={num_tokens} hidden={hidden}"
                ref_residual, ref_normed = kernels.add_rms_norm_pair_reference(
                    residual, h, w_post, w_next, EPS
                )
                assert_matches(new_residual, ref_residual, what + " residual")
                assert_matches(normed, ref_normed, what + " normed")
                # the norm of the residual it returned, in isolation (no compounding of the first step)
                assert_matches(
                    normed, kernels.rms_norm_reference(new_residual, w_next, EPS), what + " chained"
                )
                assert torch.equal(residual, before[0]) and torch.equal(h, before[1]), (
                    what + ": inputs changed"
                )
                if dtype == torch.float32:  # FP8 layers take 16-bit activations only
                    continue
                # with the rows quantized to FP8 in the same kernel: the same two outputs, and the rows as
                # quantize_rows_fp8 makes them from that normed
                with no_fallback():
                    got = kernels.add_rms_norm_pair_fp8(residual, h, w_post, w_next, EPS)
                assert torch.equal(got[0], new_residual) and torch.equal(got[1], normed), what + " fp8"
                q, scale = quantize_rows_fp8_reference(normed)
                assert got[2].dtype == q.dtype and torch.equal(got[2].float(), q.float()), what + " fp8 rows"
                assert torch.equal(got[3], scale), what + " fp8 scales"
    # a different eps for the second norm is honoured
    x, h, w = (torch.rand(2, 64, generator=gen).to(device) for _ in range(3))
    with no_fallback():
        _, normed = kernels.add_rms_norm_pair(x, h, w[0], w[1], 1e-6, eps_next=10.0)
    _, ref = kernels.add_rms_norm_pair_reference(x, h, w[0], w[1], 1e-6, eps_next=10.0)
    assert_matches(normed, ref, "add_rms_norm_pair eps_next")


def check_silu_mul(device: str) -> None:
    from engine.kernels import fused as kernels
    from engine.model.quant import quantize_rows_fp8_reference

    gen = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        for num_tokens in NUM_TOKENS:
            for intermediate in (128, 704, 13696):  # tiny, small, GLM-4.6V-Flash (not a power of two)
                gate_up = (torch.randn(num_tokens, 2 * intermediate, generator=gen) * 4).to(device, dtype)
                with no_fallback():
                    got = kernels.silu_mul(gate_up)
                ref = kernels.silu_mul_reference(gate_up)
                assert_matches(got, ref, f"silu_mul {dtype} T={num_tokens} I={intermediate}")
                if dtype == torch.float32:  # FP8 layers take 16-bit activations only
                    continue
                # with the product's rows quantized to FP8 in the same kernel: the rows and scales
                # quantize_rows_fp8 makes of silu_mul's product
                with no_fallback():
                    q, scale = kernels.silu_mul_fp8(gate_up)
                want_q, want_scale = quantize_rows_fp8_reference(got)
                what = f"silu_mul_fp8 {dtype} T={num_tokens} I={intermediate}"
                assert q.dtype == want_q.dtype and torch.equal(q.float(), want_q.float()), what + " rows"
                assert torch.equal(scale, want_scale), what + " scales"


def check_rotary(device: str) -> None:
    from engine.kernels import fused as kernels
    from engine.model.rope import apply_interleaved_rotary

    gen = torch.Generator().manual_seed(3)
    cases = [(dtype, dtype) for dtype in DTYPES] + [(torch.bfloat16, torch.float32)]  # (x, cos/sin) dtypes
    for x_dtype, cs_dtype in cases:
        for num_tokens in NUM_TOKENS:
            for qk_heads, head_dim, rotary_dim in ROTARY_SHAPES:
                kv_heads = 2
                # the decoder's layout: qk is a strided view into the fused qkv projection output
                qkv = torch.randn(num_tokens, (qk_heads + kv_heads) * head_dim, generator=gen) * 3
                qkv = qkv.to(device, x_dtype)
                qk = qkv[:, : qk_heads * head_dim].view(num_tokens, qk_heads, head_dim)
                angles = torch.rand(num_tokens, rotary_dim // 2, generator=gen) * 100
                if num_tokens == 3:  # MRotaryEmbedding's cos/sin are transposed views
                    angles = angles.T.contiguous().T
                cos, sin = angles.cos().to(device, cs_dtype), angles.sin().to(device, cs_dtype)
                before = qkv.clone()
                ref = apply_interleaved_rotary(qk.clone(), cos, sin)
                with no_fallback():
                    out = kernels.apply_interleaved_rotary_(qk, cos, sin)
                what = f"rotary x={x_dtype} cos={cs_dtype} T={num_tokens} heads={qk_heads} D={head_dim}"
                assert out is qk, what
                assert_matches(qk, ref, what, exact=x_dtype == cs_dtype == torch.bfloat16)
                q_cols = qk_heads * head_dim
                v_before, v_after = before[:, q_cols:], qkv[:, q_cols:]
                assert torch.equal(v_after, v_before), what + ": V changed"
                pass_dims = qkv[:, :q_cols].view(num_tokens, qk_heads, head_dim)[..., rotary_dim:]
                pass_before = before[:, :q_cols].view(num_tokens, qk_heads, head_dim)[..., rotary_dim:]
                assert torch.equal(pass_dims, pass_before), what + ": non-rotary dims changed"
                # the in-place torch fallback gives the reference exactly
                fallback = before[:, :q_cols].view(num_tokens, qk_heads, head_dim).clone()
                kernels.apply_interleaved_rotary_reference_(fallback, cos, sin)
                assert torch.equal(fallback, ref), what + ": fallback"


def check_rotary_kv(device: str) -> None:
    """rotary_write_kv_: the q and k heads rotated as apply_interleaved_rotary_ does, k (rotated) and v at
    their cache slots as write_kv_cache stores them, a padding token (slot -1) and every other slot left
    as they were."""
    from engine.kernels import fused as kernels
    from engine.kernels.attention import write_kv_cache

    gen = torch.Generator().manual_seed(6)
    num_blocks, block_size, kv_heads = 5, 4, 2
    cases = [(dtype, dtype) for dtype in DTYPES] + [(torch.bfloat16, torch.float32)]  # (x, cos/sin) dtypes
    for x_dtype, cs_dtype in cases:
        for num_tokens in NUM_TOKENS:
            for qk_heads, head_dim, rotary_dim in ROTARY_SHAPES:
                num_heads = qk_heads - kv_heads
                qkv = torch.randn(num_tokens, (qk_heads + kv_heads) * head_dim, generator=gen) * 3
                heads = qkv.to(device, x_dtype).view(num_tokens, qk_heads + kv_heads, head_dim)
                angles = torch.rand(num_tokens, rotary_dim // 2, generator=gen) * 100
                if num_tokens == 3:  # MRotaryEmbedding's cos/sin are transposed views
                    angles = angles.T.contiguous().T
                cos, sin = angles.cos().to(device, cs_dtype), angles.sin().to(device, cs_dtype)
                cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
                cache = cache.to(device, x_dtype)
                slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
                if num_tokens > 1:
                    slots[-1] = -1  # a padding token: nothing stored
                slots = slots.to(device)
                ref_heads, ref_cache = heads.clone(), cache.clone()
                kernels.apply_interleaved_rotary_reference_(ref_heads[:, :qk_heads], cos, sin)
                keep = slots >= 0
                k, v = ref_heads[:, num_heads:qk_heads], ref_heads[:, qk_heads:]
                write_kv_cache(ref_cache, k[keep], v[keep], slots[keep])
                with no_fallback():
                    assert kernels.rotary_write_kv_(heads, num_heads, kv_heads, cos, sin, cache, slots)
                what = f"rotary_kv x={x_dtype} cos={cs_dtype} T={num_tokens} heads={qk_heads} D={head_dim}"
                exact = x_dtype == cs_dtype == torch.bfloat16
                assert_matches(heads, ref_heads, what, exact=exact)
                assert_matches(cache, ref_cache, what + " cache", exact=exact)
                # what the cache got is what the heads hold: one rounding, the same in both
                live = slots[keep]
                flat = cache.view(2, -1, kv_heads, head_dim)
                assert torch.equal(flat[0, live], heads[keep, num_heads:qk_heads]), what + ": k"
                assert torch.equal(flat[1, live], heads[keep, qk_heads:]), what + ": v"
    # off the Triton path it does nothing and says so
    heads = torch.zeros(2, 6, 16, device=device)
    cache = torch.zeros(2, 2, 4, 2, 16, device=device)
    cos = sin = torch.zeros(2, 4, device=device)
    assert not kernels.rotary_write_kv_(heads, 3, 1, cos, sin, cache, torch.zeros(2, dtype=torch.long))


def decoder_outputs(model, device: str) -> list[torch.Tensor]:
    """Hidden states of a packed prefill of two prompts (5 and 7 tokens), then one decode step of both."""
    from engine.kernels.attention import AttentionMetadata

    block_size = 4
    kv_caches = model.allocate_kv_caches(8, block_size)
    tables = [[1, 2, 3], [5, 4, 6]]
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(30, 200, (12,), generator=gen).to(device)
    positions = torch.cat([torch.arange(5).expand(3, -1), torch.arange(7).expand(3, -1)], dim=1).to(device)
    attn = AttentionMetadata.build([5, 7], [5, 7], tables, block_size, device)
    prefill = model(ids, positions, attn, kv_caches)
    ids = torch.tensor([77, 99], device=device)
    positions = torch.cat([torch.full((3, 1), 5), torch.full((3, 1), 7)], dim=1).to(device)
    attn = AttentionMetadata.build([1, 1], [6, 8], tables, block_size, device)
    decode = model(ids, positions, attn, kv_caches)
    return [prefill, decode]


def check_decoder(device: str, checkpoint: str) -> None:
    from engine.model.decoder import Glm4vModel

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = Glm4vModel.from_pretrained(checkpoint, device, dtype)
        with no_fallback():
            fused = decoder_outputs(model, device)
        os.environ["GLMV_DISABLE_TRITON_KERNELS"] = "1"
        try:
            reference = decoder_outputs(model, device)
        finally:
            del os.environ["GLMV_DISABLE_TRITON_KERNELS"]
        for got, ref, step in zip(fused, reference, ("prefill", "decode"), strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(
                got, ref, rtol=tol, atol=tol, msg=lambda m, s=f"{dtype} {step}": f"{s}: {m}"
            )


def check_cuda_graph(device: str) -> None:
    """The fused ops capture into a CUDA graph and replay on new inputs like eager."""
    from engine.kernels import fused as kernels

    gen = torch.Generator().manual_seed(5)
    dtype, num_tokens, hidden, intermediate = torch.bfloat16, 3, 4096, 13696
    qk_heads, head_dim, rotary_dim = ROTARY_SHAPES[1]

    def inputs() -> list[torch.Tensor]:
        return [
            residual_like((num_tokens, hidden), gen).to(device, dtype),
            torch.randn(num_tokens, hidden, generator=gen).to(device, dtype),
            torch.randn(num_tokens, 2 * intermediate, generator=gen).to(device, dtype),
            torch.randn(num_tokens, (qk_heads + 2) * head_dim, generator=gen).to(device, dtype),
            torch.rand(num_tokens, rotary_dim // 2, generator=gen).to(device, dtype),
        ]

    w = [norm_weight(hidden, gen).to(device, dtype) for _ in range(3)]

    def step(residual, h, gate_up, qkv, angles):
        normed = kernels.rms_norm(residual, w[0], EPS)
        new_residual, normed2 = kernels.add_rms_norm_pair(residual, h, w[1], w[2], EPS)
        act = kernels.silu_mul(gate_up)
        qk = qkv[:, : qk_heads * head_dim].view(num_tokens, qk_heads, head_dim)
        kernels.apply_interleaved_rotary_(qk, angles.cos(), angles.sin())
        return [normed, new_residual, normed2, act, qkv]

    static = inputs()
    with no_fallback():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(*[t.clone() for t in static])  # warm-up compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step(*static)
        for _ in range(2):
            fresh = inputs()
            for dst, src in zip(static, fresh, strict=True):
                dst.copy_(src)
            graph.replay()
            expected = step(*fresh)
            torch.cuda.synchronize()
            for got, ref in zip(outs, expected, strict=True):
                assert torch.equal(got, ref), "graph replay differs from eager"


CHECKS: dict[str, Callable[..., None]] = {
    "use_triton": check_use_triton,
    "rms_norm": check_rms_norm,
    "add_rms_norm_pair": check_add_rms_norm_pair,
    "silu_mul": check_silu_mul,
    "rotary": check_rotary,
    "rotary_kv": check_rotary_kv,
    "decoder": check_decoder,
}


# ---------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize(
    "check", ["use_triton", "rms_norm", "add_rms_norm_pair", "silu_mul", "rotary", "rotary_kv"]
)
def test_kernel_equals_torch_reference_in_interpreter(check):
    run_interpreted(__file__, check)


def test_decoder_with_kernels_equals_torch_path_in_interpreter(tiny_checkpoint):
    run_interpreted(__file__, "decoder", str(tiny_checkpoint))


def test_torch_path_without_interpreter_on_cpu(monkeypatch):
    from engine.kernels import fused as kernels

    x = torch.randn(3, 64)
    w = torch.rand(64)
    if not kernels.INTERPRET:
        assert not kernels.use_triton(x)  # CPU tensors, no interpreter: torch
    monkeypatch.setenv("GLMV_DISABLE_TRITON_KERNELS", "1")
    assert not kernels.use_triton(x)
    assert torch.equal(kernels.rms_norm(x, w, EPS), kernels.rms_norm_reference(x, w, EPS))
    gate_up = torch.randn(3, 256)
    assert torch.equal(kernels.silu_mul(gate_up), kernels.silu_mul_reference(gate_up))


@pytest.mark.parametrize(
    "check", ["use_triton", "rms_norm", "add_rms_norm_pair", "silu_mul", "rotary", "rotary_kv"]
)
@pytest.mark.gpu
def test_cuda_kernel_equals_torch_reference(check):
    CHECKS[check]("cuda")


@pytest.mark.gpu
def test_cuda_decoder_with_kernels_equals_torch_path(tiny_checkpoint):
    check_decoder("cuda", str(tiny_checkpoint))


@pytest.mark.gpu
def test_cuda_graph_replay_of_kernels_equals_eager():
    check_cuda_graph("cuda")


if __name__ == "__main__":
    main(CHECKS)
