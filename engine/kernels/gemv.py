"""Skinny matmuls for decode steps: y = x @ W.T for a few rows x, one Triton kernel that streams W once.

A decode step multiplies 1 to 16 token rows by every weight of the decoder, so its time is the time to read
the weights. cuBLAS runs these shapes as split-K GEMMs plus a separate reduce kernel; this kernel gives each
program a band of BLOCK_N output columns over the whole of K (no reduce), reads its band of W with the
loads software-pipelined, and applies the layer's epilogue before it stores:

* `skinny_linear(x [M, K], weight [N, K], bias [N] | None, scale [N] | None) -> [M, N]` in x's dtype:
  `x @ weight.T` accumulated in float32, then `* scale` (per output channel: an FP8 layer's
  `weight_scale`) and `+ bias`. `weight` may be x's dtype or float8_e4m3fn (W8A16: each weight is widened
  to x's dtype in registers, the activations are not quantized).
* `skinny_linear_silu_mul(x [M, K], gate_up [2I, K], scale [2I] | None) -> [M, I]`: the MLP's gate/up
  projection and `up * silu(gate)` in one kernel (a program reads the same columns of both halves), so
  the [M, 2I] product is never written.

Rounding follows the unfused ops in x's dtype: the product rounded, then the scale (rounded to x's dtype)
applied and rounded, then the bias added and rounded; silu_mul rounds gate and up, silu(gate), and the
product, as `engine.kernels.fused.silu_mul` does. The float32 sums run in another order than cuBLAS's, so
results differ from `F.linear` by float32 rounding moving a value across a bf16 rounding boundary (one bf16
step at most where the sums agree to float32 precision; tests/engine/kernels/test_gemv.py).

`supports(x, weight)`: CUDA (or Triton's interpreter), 1 <= M <= MAX_ROWS, x bfloat16 or float16 (float32
takes cuBLAS: its TF32 or full-precision paths are not what this kernel computes), K a multiple of 16,
contiguous rows. Anything else is the caller's `F.linear`. The kernels are CUDA-graph safe (no host sync,
the output sized from shapes).

Block sizes: `config(m, n, k, weight_dtype)` picks BLOCK_N, BLOCK_K, warps and pipeline stages from the
shape; `benchmarks/gemv_bench.py` measures every candidate on the decoder's shapes against cuBLAS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.kernels.fused import HAS_TRITON, INTERPRET, device_guard

if HAS_TRITON:
    import triton
    import triton.language as tl

    from engine.kernels.fused import _round_to

MAX_ROWS = 16  # token rows up to which a step's linear layers run this kernel (tl.dot's smallest tile)
FP8_DTYPE = torch.float8_e4m3fn


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def config(m: int, n: int, k: int, weight_dtype: torch.dtype) -> GemvConfig:
    """The block sizes for an [m, k] x [n, k] product (see the module docstring). Measured on an H100
    (`benchmarks.gemv_bench`'s sweep of 27 candidates, M = 1 and 16): wide bands with short, deep-pipelined
    K steps for K = 4096 (qkv, o, gate/up: best or within 2 % of it), narrower bands with long K steps
    for the down projection's K = 13696."""
    if k > 8192:
        return GemvConfig(32, 512, 4, 3)
    return GemvConfig(64, 128, 4, 5)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not HAS_TRITON or x.dim() != 2 or weight.dim() != 2:
        return False
    if not (INTERPRET or (x.is_cuda and weight.is_cuda)):
        return False
    m, k = x.shape
    return (
        1 <= m <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype in (x.dtype, FP8_DTYPE)
        and weight.shape[1] == k
        and k % 16 == 0
        and x.stride(1) == 1
        and weight.is_contiguous()
    )


if HAS_TRITON:

    @triton.jit
    def _band_dot(
        x_ptrs,
        w_ptrs,
        m_mask,
        acc,
        k_left,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """acc [BLOCK_N, BLOCK_M] += W band [BLOCK_N, BLOCK_K] @ x rows [BLOCK_M, BLOCK_K].T (DOT_F32: the
        interpreter, whose bf16 dot is wrong, multiplies in float32: the same products, exact either way)"""
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = tl.arange(0, BLOCK_K) < k_left
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            return tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        return tl.dot(w.to(x.dtype), tl.trans(x), acc)

    @triton.jit
    def _skinny_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        bias_ptr,
        y_ptr,
        M,
        N,
        K,
        x_stride,
        y_stride,
        up_rows,  # SILU_MUL: the row of W where the up half starts (I); else unused
        HAS_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU_MUL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        dtype: tl.constexpr = y_ptr.dtype.element_ty
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = rows of W
        n_mask = cols < N
        m_mask = rows < M
        w_rows = tl.where(n_mask, cols, 0).to(tl.int64)  # out-of-range bands re-read row 0 (unstored)
        kk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * x_stride + kk[None, :]
        w_ptrs = w_ptr + w_rows[:, None] * K + kk[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if SILU_MUL:
            u_ptrs = w_ptrs + up_rows.to(tl.int64) * K
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = _band_dot(x_ptrs, w_ptrs, m_mask, acc, K - k0, BLOCK_K, EVEN_K, DOT_F32)
            if SILU_MUL:
                acc_up = _band_dot(x_ptrs, u_ptrs, m_mask, acc_up, K - k0, BLOCK_K, EVEN_K, DOT_F32)
                u_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out = _round_to(acc, dtype)
        if HAS_SCALE:
            scale = _round_to(tl.load(scale_ptr + w_rows).to(tl.float32), dtype)
            out = _round_to(out * scale[:, None], dtype)
        if SILU_MUL:
            up = _round_to(acc_up, dtype)
            if HAS_SCALE:
                up_scale = _round_to(tl.load(scale_ptr + up_rows + w_rows).to(tl.float32), dtype)
                up = _round_to(up * up_scale[:, None], dtype)
            silu = _round_to(out / (1.0 + tl.exp(-out)), dtype)
            out = _round_to(up * silu, dtype)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + w_rows).to(tl.float32)
            out = _round_to(out + bias[:, None], dtype)
        y_ptrs = y_ptr + rows[None, :] * y_stride + cols[:, None]
        tl.store(y_ptrs, out.to(dtype), mask=n_mask[:, None] & m_mask[None, :])


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    silu_mul: bool,
    cfg: GemvConfig | None,
) -> torch.Tensor:
    m, k = x.shape
    n_w = weight.shape[0]
    n = n_w // 2 if silu_mul else n_w
    cfg = cfg or config(m, n_w, k, weight.dtype)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_k = min(cfg.block_k, triton.next_power_of_2(k))
    dummy = y  # pointer for an absent scale / bias (never read)
    with device_guard(x):
        _skinny_kernel[(triton.cdiv(n, cfg.block_n),)](
            x, weight, dummy if scale is None else scale, dummy if bias is None else bias, y,
            m, n, k, x.stride(0), y.stride(0), n if silu_mul else 0,
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
            BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, DOT_F32=INTERPRET,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return y


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    cfg: GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (* scale) (+ bias) -> [M, N] in x's dtype; `supports(x, weight)` must hold."""
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    return _launch(x, weight, bias, scale, False, cfg)


def skinny_linear_silu_mul(
    x: torch.Tensor, gate_up: torch.Tensor, scale: torch.Tensor | None = None, cfg: GemvConfig | None = None
) -> torch.Tensor:
    """up * silu(gate) of x [M, K] @ gate_up [2I, K].T (* scale), gate the first I rows -> [M, I]."""
    if gate_up.shape[0] % 2:
        raise ValueError(f"gate_up: {gate_up.shape[0]} rows, not two halves")
    return _launch(x, gate_up, None, scale, True, cfg)


def skinny_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The spec: the unfused ops in x's dtype (float32 products, rounded as the module docstring says)."""
    out = (x.float() @ weight.float().T).to(x.dtype)
    if scale is not None:
        out = out * scale.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def skinny_linear_silu_mul_reference(
    x: torch.Tensor, gate_up: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    from engine.kernels.fused import silu_mul_reference

    return silu_mul_reference(skinny_linear_reference(x, gate_up, None, scale))
