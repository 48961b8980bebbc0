"""engine.kernels.gemv: the skinny matmul kernel equals its reference, and the decoder runs it for decode steps.

On CPU the kernel runs through Triton's interpreter (the file executes itself in a fresh Python with
TRITON_INTERPRET=1, as tests/engine/kernels/test_fused.py does); on CUDA (GPU-marked) compiled. Either way
its float32 sums run in another order than the reference's (the unfused ops, rounded where torch rounds),
so a result may sit one rounding step from the reference where the float32 sum lies next to a boundary
(sums that cancel to near zero aside: within 2e-3), and nowhere further; FP8 on CUDA two steps (the FP8
tensor cores' sums within a K block), four for silu_mul (a product of two such results). A CUDA-graph
replay equals eager.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import bf16_ulps, main, run_interpreted  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's process (`run_interpreted`)
    import triton
    import triton.language as tl

    from engine.kernels.fused import _fp8_rounded

    @triton.jit
    def _fp8_rounded_kernel(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, _fp8_rounded(tl.load(x_ptr + offs)))


# (M, N, K): one token, a few, the most the decoder sends and the most the kernel takes (a 64-row tile); N not
# a multiple of the band; K not a multiple of the K block
SHAPES = [(1, 48, 64), (3, 40, 96), (16, 64, 272), (5, 33, 64), (9, 130, 528), (17, 40, 64), (32, 72, 96)]
SHAPES += [(40, 40, 64), (64, 72, 96)]


def _weights(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, k, generator=gen) * 0.05


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, steps: int = 1) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (
        f"{what}: {got.shape} {got.dtype} vs {ref.shape}"
    )
    got, ref = got.cpu(), ref.cpu()
    if ref.dtype == torch.bfloat16:
        # another float32 summation order: `steps` rounding steps, except where a sum cancels to near zero
        big = ref.float().abs() > 1e-2
        assert int(bf16_ulps(got, ref)[big].max()) <= steps, what
        small = (got.float() - ref.float()).abs()[~big]
        assert small.numel() == 0 or float(small.max()) <= 2e-3, f"{what}: near zero {float(small.max())}"
    else:
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3, msg=lambda m: f"{what}: {m}")


def _fp8_steps(device: str, m: int) -> int:
    """bf16 steps an FP8 result may sit from the reference: on CUDA the FP8 tensor cores sum a K block with
    fewer bits than float32 (2 steps seen on an H100 at 8ae5882, before each block's sum went to a
    float32 total; 3 with the 64-row tile, M = 40, at 6a34ab5); the interpreter multiplies in float32."""
    if device == "cpu":
        return 1
    return 2 if m <= 32 else 3


def check_linear(device: str) -> None:
    from engine.kernels import gemv
    from engine.model.quant import quantize_weight_fp8

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k in SHAPES:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            w = _weights(n, k, gen)
            bias = (torch.randn(n, generator=gen) * 0.1).to(device, dtype)
            w16 = w.to(device, dtype)
            assert gemv.supports(x, w16) == (m <= gemv.MAX_ROWS)
            what = f"{dtype} M={m} N={n} K={k}"
            for b in (None, bias):
                got = gemv.skinny_linear(x, w16, b)
                _assert_close(got, gemv.skinny_linear_reference(x, w16, b), what)
            # FP8 weights with per-channel scales (W8A16), as engine.model.quant.Fp8Linear holds them
            q, scale = quantize_weight_fp8(w.to(device))
            assert gemv.supports(x, q) == (m <= gemv.FP8_MAX_ROWS)
            got = gemv.skinny_linear(x, q, bias, scale)
            ref = gemv.skinny_linear_reference(x, q, bias, scale)
            _assert_close(got, ref, what + " fp8", _fp8_steps(device, m))
            # the reference itself: the W8A8 product near the dequantized weights' (per-token rounding of the
            # activations adds a few % to each output) and equal to what Fp8Linear's per-tensor path computes
            ref = gemv.skinny_linear_reference(x, q, bias, scale).float()
            dequant = x.float() @ (q.float() * scale[:, None]).T + bias.float()
            assert float((ref - dequant).norm() / dequant.norm()) < 0.1, what


def check_silu_mul(device: str) -> None:
    from engine.kernels import gemv
    from engine.kernels.fused import silu_mul_reference
    from engine.model.quant import quantize_weight_fp8

    gen = torch.Generator().manual_seed(1)
    for m, n, k in SHAPES:
        n += n % 2
        x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
        w = _weights(n, k, gen)
        w16 = w.to(device, torch.bfloat16)
        got = gemv.skinny_linear_silu_mul(x, w16)
        assert got.shape == (m, n // 2)
        ref = silu_mul_reference((x.float() @ w16.float().T).to(torch.bfloat16))
        _assert_close(got, ref, f"silu_mul M={m} N={n} K={k}")
        q, scale = quantize_weight_fp8(w.to(device))
        got = gemv.skinny_linear_silu_mul(x, q, scale)
        ref = gemv.skinny_linear_silu_mul_reference(x, q, scale)
        # on CUDA the product of gate's silu and up, each within _fp8_steps: twice that (3 seen on an H200
        # at 04e3e2b, M = 32)
        steps = _fp8_steps(device, m) if device == "cpu" else 2 * _fp8_steps(device, m)
        _assert_close(got, ref, f"silu_mul fp8 M={m} N={n} K={k}", steps)
    with pytest.raises(ValueError, match="x: 65 rows, the kernel takes 1 to 64"):
        gemv.skinny_linear(torch.zeros(65, 16, device=device), torch.zeros(8, 16, device=device))
    with pytest.raises(ValueError, match="gate_up: 3 rows"):
        gemv.skinny_linear_silu_mul(torch.zeros(1, 16, device=device), torch.zeros(3, 16, device=device))
    # rows already quantized: for FP8 weights only, and of x's shape
    x = torch.zeros(2, 32, device=device, dtype=torch.bfloat16)
    q, scale = quantize_weight_fp8(torch.ones(8, 32, device=device))
    rows = (torch.zeros(2, 32, device=device).to(q.dtype), torch.ones(2, 1, device=device))
    with pytest.raises(ValueError, match="x_fp8: x's rows quantized"):
        gemv.skinny_linear(x, q.float().to(torch.bfloat16), x_fp8=rows)
    with pytest.raises(ValueError, match="x_fp8: x's rows quantized"):
        gemv.skinny_linear(x, q, scale=scale, x_fp8=(rows[0][:1], rows[1][:1]))


def check_fp8_rounded(device: str) -> None:
    """The interpreter's e4m3 rounding (`engine.kernels.fused._fp8_rounded`, before its own cast) equals
    torch's float32 -> float8_e4m3fn cast:
    normal values, subnormal ones, ties, and roundings that carry into the exponent."""
    gen = torch.Generator().manual_seed(5)
    grid = torch.tensor([2.0**e * (1 + j / 16) for e in range(-10, 9) for j in range(16)])
    x = torch.cat(
        [
            torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-3, 3, (4096,), generator=gen),
            grid,
            -grid,
            torch.tensor([0.0, 448.0, -448.0, 0.0009765625, 0.00146484375]),
        ]
    )
    x = x.clamp(-448.0, 448.0).to(device)
    x = torch.cat([x, torch.zeros(8192 - x.numel(), device=device)])
    y = torch.empty_like(x)
    _fp8_rounded_kernel[(1,)](x, y, N=8192)
    want = x.to(torch.float8_e4m3fn).float()
    bad = y != want
    assert not bool(bad.any()), (x[bad][:5], y[bad][:5], want[bad][:5])


def check_supports(device: str) -> None:
    from engine.kernels import gemv

    w = torch.zeros(32, 64, device=device, dtype=torch.bfloat16)
    x = torch.zeros(4, 64, device=device, dtype=torch.bfloat16)
    assert gemv.supports(x, w)
    assert gemv.supports(torch.zeros(gemv.MAX_ROWS, 64, device=device, dtype=torch.bfloat16), w)
    too_many = torch.zeros(gemv.MAX_ROWS + 1, 64, device=device, dtype=torch.bfloat16)
    assert not gemv.supports(too_many, w), "M > MAX_ROWS"
    assert not gemv.supports(torch.zeros(0, 64, device=device, dtype=torch.bfloat16), w), "M = 0"
    assert not gemv.supports(x.float(), w.float()), "float32 takes cuBLAS"
    assert not gemv.supports(x[:, :40], w[:, :40]), "K not a multiple of 16"
    assert not gemv.supports(x, w.T.contiguous().T), "weight not contiguous"
    assert not gemv.supports(x.T.contiguous().T, w), "rows not contiguous"
    assert not gemv.supports(x, w.half()), "weight of another dtype"
    # block sizes: the 16- and 32-row tiles keep the measured ones; the 64-row tile's are cut to fit the
    # shared-memory budget (gate/up: two bands of W per stage), the down projection's swept at 64 rows
    assert gemv.config(4096, 32, silu_mul=True) == gemv.GemvConfig(64, 128, 4, 5)
    assert gemv.config(13696, 32) == gemv.GemvConfig(32, 512, 4, 3)
    assert gemv.config(4096, 64) == gemv.GemvConfig(64, 128, 4, 5)
    assert gemv.config(4096, 64, silu_mul=True) == gemv.GemvConfig(64, 128, 4, 4)
    assert gemv.config(13696, 64) == gemv.GemvConfig(64, 128, 4, 5)
    # FP8 weights (1 byte): longer K steps; cut where a 32-row tile's buffers would not fit
    assert gemv.config(13696, 16, fp8=True) == gemv.GemvConfig(64, 512, 4, 5)
    assert gemv.config(13696, 32, fp8=True) == gemv.GemvConfig(64, 512, 4, 4)
    assert gemv.config(4096, 16, silu_mul=True, fp8=True) == gemv.GemvConfig(64, 256, 4, 3)
    assert gemv.config(4096, 16, fp8=True) == gemv.GemvConfig(64, 256, 4, 5)


def check_decoder(device: str, checkpoint: str) -> None:
    """The tiny decoder in bf16 with decode_gemv: every step of <= MAX_ROWS tokens runs the kernel for each linear
    layer and the lm_head, and the hidden states and logits are those of the torch path."""
    from test_fused import decoder_outputs

    from engine.kernels import gemv
    from engine.model.decoder import Glm4vModel

    model = Glm4vModel.from_pretrained(checkpoint, device, torch.bfloat16)
    reference = decoder_outputs(model, device)
    ref_logits = model.compute_logits(reference[1])
    calls = {"linear": 0, "silu": 0}
    linear, silu = gemv.skinny_linear, gemv.skinny_linear_silu_mul

    def count(name: str, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    gemv.skinny_linear, gemv.skinny_linear_silu_mul = count("linear", linear), count("silu", silu)
    try:
        layers = model.set_decode_gemv(True)  # tries (and compiles) the kernel for each kind of layer
        assert layers == 4 * len(model.language_model.layers) + 1
        # the check ran the kernel: 4 linear kinds and the silu_mul one, at 7 row counts (1 to 64, each tile)
        assert calls == {"linear": 5 * 7, "silu": 7}, calls
        calls.update(linear=0, silu=0)
        got = decoder_outputs(model, device)  # a 12-token prefill step, then a 2-token decode step
        logits = model.compute_logits(got[1])
    finally:
        gemv.skinny_linear, gemv.skinny_linear_silu_mul = linear, silu
    num_layers = len(model.language_model.layers)
    # per step: qkv, o, down (linear) and gate_up + silu_mul (silu) in every layer; then the lm_head
    assert calls == {"linear": 2 * 3 * num_layers + 1, "silu": 2 * num_layers}, calls
    for g, r, step in zip(got, reference, ("prefill", "decode"), strict=True):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2, msg=lambda m, s=step: f"{s}: {m}")
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    assert model.set_decode_gemv(False) == 0
    assert all(not getattr(m, "decode_gemv", False) for m in model.modules())

    # a kernel that fails, or computes something else, leaves the model on its layers' own forwards
    def wrong(x, weight, bias=None, scale=None, cfg=None):
        return linear(x, weight, bias, scale, cfg) * 1.5

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    for bad in (wrong, broken):
        gemv.skinny_linear = bad
        try:
            assert model.set_decode_gemv(True) == 0
        finally:
            gemv.skinny_linear = linear
        assert all(not getattr(m, "decode_gemv", False) for m in model.modules()), bad.__name__


def check_decoder_fp8(device: str, checkpoint: str) -> None:
    """The tiny decoder in FP8 with decode_gemv: the norm before each gate/up and before each later layer's
    qkv quantizes its rows in its own kernel (`add_rms_norm_pair_fp8`) and the kernel takes them; the hidden
    states equal those of every layer quantizing its own rows."""
    from test_fused import decoder_outputs

    from engine.model import decoder
    from engine.model.decoder import Glm4vModel
    from engine.model.quant import quantize_decoder_fp8_

    model = Glm4vModel.from_pretrained(checkpoint, device, torch.bfloat16)
    quantize_decoder_fp8_(model)
    num_layers = len(model.language_model.layers)
    assert model.set_decode_gemv(True) == 4 * num_layers + 1
    fused_fp8, takes = decoder.add_rms_norm_pair_fp8, decoder.takes_fp8_rows
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape[0])
        return fused_fp8(*args, **kwargs)

    decoder.add_rms_norm_pair_fp8 = counted
    try:
        got = decoder_outputs(model, device)  # 12 then 2 tokens: both within FP8_MAX_ROWS
        decoder.takes_fp8_rows = lambda layer, x: False  # each layer quantizes its own rows
        reference = decoder_outputs(model, device)
    finally:
        decoder.add_rms_norm_pair_fp8, decoder.takes_fp8_rows = fused_fp8, takes
    # per step: before every gate/up, and before the qkv of every layer but the first
    assert calls == [12] * (2 * num_layers - 1) + [2] * (2 * num_layers - 1), calls
    for g, r, step in zip(got, reference, ("prefill", "decode"), strict=True):
        assert torch.equal(g, r), f"{step}: {(g.float() - r.float()).abs().max()}"


def check_decoder_fp8_gemm(device: str, checkpoint: str) -> None:
    """The tiny decoder in FP8 without the skinny kernel (prefill, or steps of more rows than it takes):
    each FP8 layer's own W8A8 GEMM, row-wise and tensor-wise, takes the rows the op before quantized (the
    norm before gate/up and every later qkv, `add_rms_norm_pair_fp8`; silu_mul before down,
    `silu_mul_fp8`): the layers quantize only the rows nothing hands them (the first qkv, every o), and
    the hidden states equal those of every layer quantizing its own rows. On CPU the layers are set to the
    GEMMs `select_kernel` picks on a GPU (torch's `_scaled_mm` runs there)."""
    from test_fused import decoder_outputs

    from engine.model import decoder
    from engine.model.decoder import Glm4vModel
    from engine.model.layers import linear, linear_silu_mul
    from engine.model.quant import Fp8Linear, quantize_decoder_fp8_

    model = Glm4vModel.from_pretrained(checkpoint, device, torch.bfloat16)
    quantize_decoder_fp8_(model)
    layers = [m for m in model.language_model.modules() if isinstance(m, Fp8Linear)]
    num_layers = len(model.language_model.layers)
    takes, silu_mlp, forward_fp8 = decoder.takes_fp8_rows, decoder.silu_mlp, Fp8Linear._forward_fp8
    handed = []  # per W8A8 call: whether its rows came quantized

    def counted(self, x, path, x_fp8=None):
        handed.append(x_fp8 is not None)
        return forward_fp8(self, x, path, x_fp8)

    for rowwise in ("plain", None):  # None: tensor-wise for up to 16 rows
        for layer in layers:
            if device == "cpu":
                layer.kernel, layer.tensorwise_max_m = "scaled_mm", 16
            layer.rowwise = rowwise if device == "cpu" or rowwise is None else layer.rowwise
        rows = [torch.zeros(12, layer.in_features, device=device, dtype=torch.bfloat16) for layer in layers]
        assert all(layer.takes_rows(x) for layer, x in zip(layers, rows, strict=True))
        handed.clear()
        Fp8Linear._forward_fp8 = counted
        try:
            got = decoder_outputs(model, device)  # 12 then 2 tokens
            counts = (handed.count(True), handed.count(False))
            decoder.takes_fp8_rows = lambda layer, x: False  # each layer quantizes its own rows
            decoder.silu_mlp = lambda gate_up, down, x, x_fp8=None: linear(down, linear_silu_mul(gate_up, x))
            reference = decoder_outputs(model, device)
        finally:
            decoder.takes_fp8_rows, decoder.silu_mlp, Fp8Linear._forward_fp8 = takes, silu_mlp, forward_fp8
        # per step: every gate/up, every later layer's qkv and every down projection take their rows; the
        # first qkv and every o projection quantize their own
        assert counts == (2 * (3 * num_layers - 1), 2 * (num_layers + 1)), (rowwise, counts)
        for g, r, step in zip(got, reference, ("prefill", "decode"), strict=True):
            assert torch.equal(g, r), f"{rowwise} {step}: {(g.float() - r.float()).abs().max()}"


def check_cuda_graph(device: str) -> None:
    """The kernel captures into a CUDA graph and replays on new inputs like eager."""
    from engine.kernels import gemv

    gen = torch.Generator().manual_seed(2)
    w = _weights(4608, 4096, gen).to(device, torch.bfloat16)
    bias = torch.randn(4608, generator=gen).to(device, torch.bfloat16)
    gate_up = _weights(2 * 1024, 4096, gen).to(device, torch.bfloat16)
    x = torch.randn(3, 4096, generator=gen).to(device, torch.bfloat16)
    gemv.skinny_linear(x, w, bias), gemv.skinny_linear_silu_mul(x, gate_up)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.skinny_linear(x, w, bias), gemv.skinny_linear_silu_mul(x, gate_up)
    x.copy_(torch.randn(3, 4096, generator=gen).to(device, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], gemv.skinny_linear(x, w, bias))
    assert torch.equal(out[1], gemv.skinny_linear_silu_mul(x, gate_up))


CHECKS: dict[str, Callable[..., None]] = {
    "linear": check_linear,
    "silu_mul": check_silu_mul,
    "supports": check_supports,
    "fp8_rounded": check_fp8_rounded,
    "decoder": check_decoder,
    "decoder_fp8": check_decoder_fp8,
    "decoder_fp8_gemm": check_decoder_fp8_gemm,
}


@pytest.mark.parametrize("check", ["linear", "silu_mul", "supports", "fp8_rounded"])
def test_kernel_equals_reference_in_interpreter(check):
    run_interpreted(__file__, check)


def test_decoder_with_decode_gemv_in_interpreter(tiny_checkpoint):
    run_interpreted(__file__, "decoder", str(tiny_checkpoint))


def test_fp8_decoder_norms_quantize_for_the_kernel_in_interpreter(tiny_checkpoint):
    run_interpreted(__file__, "decoder_fp8", str(tiny_checkpoint))


def test_fp8_decoder_norms_quantize_for_the_layers_gemm(tiny_checkpoint):
    check_decoder_fp8_gemm("cpu", str(tiny_checkpoint))


def test_not_supported_on_cpu_without_interpreter():
    from engine.kernels import fused, gemv

    if fused.INTERPRET:
        pytest.skip("the interpreter is on in this process")
    x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    assert not gemv.supports(x, w)


@pytest.mark.parametrize("check", ["linear", "silu_mul", "supports"])
@pytest.mark.gpu
def test_cuda_kernel_equals_reference(check):
    CHECKS[check]("cuda")


@pytest.mark.gpu
def test_cuda_decoder_with_decode_gemv(tiny_checkpoint):
    check_decoder("cuda", str(tiny_checkpoint))


@pytest.mark.gpu
def test_cuda_fp8_decoder_norms_quantize_for_the_kernel(tiny_checkpoint):
    check_decoder_fp8("cuda", str(tiny_checkpoint))


@pytest.mark.gpu
def test_cuda_fp8_decoder_norms_quantize_for_the_layers_gemm(tiny_checkpoint):
    check_decoder_fp8_gemm("cuda", str(tiny_checkpoint))


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    check_cuda_graph("cuda")


if __name__ == "__main__":
    main(CHECKS)
