"""Fused elementwise kernels of the decoder, in the Triton language, with the torch code that defines them.

Each public op runs a Triton kernel when `use_triton(...)` says so and its torch reference otherwise; the
references are the spec (and the CPU path), and they compute exactly what the decoder computed before
these kernels existed.

* `rms_norm(x, weight, eps)`: `weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`, the
  product rounded to x's dtype (engine.vision.RMSNorm, transformers' Glm4vRMSNorm).
* `add_rms_norm_pair(residual, h, w_post, w_next, eps) -> (new_residual, normed_next)`:
  `new_residual = residual + rms_norm(h, w_post)` (added in x's dtype) and
  `normed_next = rms_norm(new_residual, w_next)`: GLM-4's sandwich norm after a sublayer, fused with the
  norm in front of the next sublayer. One program per row (token).
* `silu_mul(gate_up [T, 2I]) -> [T, I]`: `up * silu(gate)`, gate the first half, up the second; silu is
  rounded to the input dtype before the product, as torch does in eager.
* `apply_interleaved_rotary_(qk [T, heads, head_dim], cos, sin)`: in place, rotates the first
  `2 * cos.shape[-1]` dims of every head in adjacent pairs (2i, 2i+1) like
  `engine.rope.apply_interleaved_rotary` (arithmetic in cos's dtype, each product and sum rounded to it);
  the other dims are left untouched. qk may be a strided view (e.g. into the qkv projection's output) as
  long as its last dim is contiguous; cos/sin may have any strides (MRotaryEmbedding's are transposed).

Numerics of the Triton path against the reference: rotary and the residual add round exactly as torch
does (bit-equal given equal inputs). The RMSNorm reduction (sum order, 1/sqrt) and silu's exp differ from
torch's by a few float32 ulps, so a bfloat16 result can differ from torch's by one rounding step where the
float32 value lies next to a rounding boundary (see tests/engine/test_kernels.py for the tolerances).
Every rounding to bfloat16 goes through `_round_to`, a round-to-nearest-even written with integer ops:
Triton's CPU interpreter truncates float32 -> bfloat16 casts, this way it rounds like the GPU.

When the Triton path runs (`use_triton`): triton imports, env GLMV_DISABLE_TRITON_KERNELS is not "1", and
either all tensors are on CUDA or TRITON_INTERPRET=1 was set when this module was imported (Triton's CPU
interpreter; tests use it). Kernels are CUDA-graph safe: no host sync, outputs sized from shapes only.

Measured on an H200 (torch 2.11, triton 3.6), full-size decoder with random bf16 weights, one decode step
at context 512 replayed as a CUDA graph: batch 1 8.5 -> 6.4 ms, batch 8 9.1 -> 6.6 ms; 1812 -> 809 kernels.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from engine.rope import apply_interleaved_rotary

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # not installed, or broken on this platform: the torch path runs
    triton = None
    tl = None
    HAS_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run on these tensors (see the module docstring)."""
    if not HAS_TRITON or os.environ.get("GLMV_DISABLE_TRITON_KERNELS") == "1":
        return False
    return INTERPRET or all(t.is_cuda for t in tensors)


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's device."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# torch references (the spec, and the path used without Triton)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """engine.vision.RMSNorm.forward: normalize in float32, cast back, then scale in x's dtype."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # x * rsqrt(mean(x^2) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_pair_reference(
    residual: torch.Tensor,
    h: torch.Tensor,
    w_post: torch.Tensor,
    w_next: torch.Tensor,
    eps: float,
    eps_next: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = residual + rms_norm_reference(h, w_post, eps)
    return new_residual, rms_norm_reference(new_residual, w_next, eps if eps_next is None else eps_next)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def apply_interleaved_rotary_reference_(
    qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    rotary_dim = 2 * cos.shape[-1]
    qk[..., :rotary_dim] = apply_interleaved_rotary(qk[..., :rotary_dim], cos, sin)
    return qk


# ---------------------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        """float32 x rounded (to nearest, ties to even) to `dtype`, returned as float32."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        elif dtype == tl.float32:
            return x
        else:
            return x.to(dtype).to(tl.float32)

    @triton.jit
    def _rms_scale(x, w, n_cols, eps, dtype: tl.constexpr):
        """rms_norm of one float32 row x (masked lanes 0) with float32 weight w: float32 values of dtype."""
        mean_square = tl.sum(x * x, axis=0) / n_cols
        rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
        normed = _round_to(x * rstd, dtype)
        return _round_to(w * normed, dtype)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_stride, out_stride, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = _rms_scale(x, w, n_cols, eps, dtype)
        tl.store(out_ptr + row * out_stride + cols, y.to(dtype), mask=mask)

    @triton.jit
    def _add_rms_norm_pair_kernel(
        res_ptr,
        h_ptr,
        w_post_ptr,
        w_next_ptr,
        res_out_ptr,
        normed_out_ptr,
        res_stride,
        h_stride,
        res_out_stride,
        normed_out_stride,
        n_cols,
        eps,
        eps_next,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype: tl.constexpr = res_out_ptr.dtype.element_ty
        h = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w_post = tl.load(w_post_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        post = _rms_scale(h, w_post, n_cols, eps, dtype)
        res = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        res = _round_to(res + post, dtype)  # masked lanes stay 0
        tl.store(res_out_ptr + row * res_out_stride + cols, res.to(dtype), mask=mask)
        w_next = tl.load(w_next_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        normed = _rms_scale(res, w_next, n_cols, eps_next, dtype)
        tl.store(normed_out_ptr + row * normed_out_stride + cols, normed.to(dtype), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, gu_stride, out_stride, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        silu = _round_to(gate / (1.0 + tl.exp(-gate)), dtype)
        tl.store(out_ptr + row * out_stride + cols, _round_to(up * silu, dtype).to(dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(
        qk_ptr,
        cos_ptr,
        sin_ptr,
        qk_stride_t,
        qk_stride_h,
        cos_stride_t,
        cos_stride_r,
        sin_stride_t,
        sin_stride_r,
        n_heads,
        half,
        BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        slots = tl.arange(0, BLOCK_R)[None, :]
        slot_mask = slots < half
        mask = (heads < n_heads) & slot_mask
        cdtype: tl.constexpr = cos_ptr.dtype.element_ty  # arithmetic dtype (rope.apply_interleaved_rotary)
        xdtype: tl.constexpr = qk_ptr.dtype.element_ty
        c = tl.load(cos_ptr + t * cos_stride_t + slots * cos_stride_r, mask=slot_mask, other=0.0)
        s = tl.load(sin_ptr + t * sin_stride_t + slots * sin_stride_r, mask=slot_mask, other=0.0)
        c, s = c.to(tl.float32), s.to(tl.float32)
        even = qk_ptr + t * qk_stride_t + heads * qk_stride_h + 2 * slots
        x0 = _round_to(tl.load(even, mask=mask, other=0.0).to(tl.float32), cdtype)
        x1 = _round_to(tl.load(even + 1, mask=mask, other=0.0).to(tl.float32), cdtype)
        r0 = _round_to(_round_to(x0 * c, cdtype) - _round_to(x1 * s, cdtype), cdtype)
        r1 = _round_to(_round_to(x1 * c, cdtype) + _round_to(x0 * s, cdtype), cdtype)
        tl.store(even, _round_to(r0, xdtype).to(xdtype), mask=mask)
        tl.store(even + 1, _round_to(r1, xdtype).to(xdtype), mask=mask)


# Launch parameters, timed on an H200 in CUDA graphs (GLM-4.6V-Flash shapes, T = 1, 8, 64 tokens).
ROTARY_BLOCK_H = 4  # heads per program: 34 q+k heads -> 9 programs per token (1.1 us at T=1)
ROTARY_WARPS = 4
SILU_BLOCK = 512  # columns per program (1.2 us at T=1, I=13696)


def _row_warps(block: int) -> int:
    return max(1, min(8, block // 512))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------------------
# public ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., hidden] with weight [hidden]; see rms_norm_reference."""
    if not use_triton(x, weight) or weight.dtype != x.dtype or x.numel() == 0:
        return rms_norm_reference(x, weight, eps)
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n_cols)
    with _device_guard(x):
        _rms_norm_kernel[(n_rows,)](
            x2, weight.contiguous(), out, x2.stride(0), out.stride(0), n_cols, eps,
            BLOCK=block, num_warps=_row_warps(block),
        )  # fmt: skip
    return out.view(x.shape)


def add_rms_norm_pair(
    residual: torch.Tensor,
    h: torch.Tensor,
    w_post: torch.Tensor,
    w_next: torch.Tensor,
    eps: float,
    eps_next: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + rms_norm(h, w_post), rms_norm(that, w_next)); eps_next defaults to eps. New tensors."""
    eps_next = eps if eps_next is None else eps_next
    dtypes = {residual.dtype, h.dtype, w_post.dtype, w_next.dtype}
    if (
        not use_triton(residual, h, w_post, w_next)
        or len(dtypes) != 1
        or residual.shape != h.shape
        or residual.numel() == 0
    ):
        return add_rms_norm_pair_reference(residual, h, w_post, w_next, eps, eps_next)
    res2, h2 = _rows(residual), _rows(h)
    n_rows, n_cols = res2.shape
    new_residual = torch.empty((n_rows, n_cols), dtype=residual.dtype, device=residual.device)
    normed = torch.empty_like(new_residual)
    block = triton.next_power_of_2(n_cols)
    with _device_guard(residual):
        _add_rms_norm_pair_kernel[(n_rows,)](
            res2, h2, w_post.contiguous(), w_next.contiguous(), new_residual, normed,
            res2.stride(0), h2.stride(0), new_residual.stride(0), normed.stride(0), n_cols, eps, eps_next,
            BLOCK=block, num_warps=_row_warps(block),
        )  # fmt: skip
    return new_residual.view(residual.shape), normed.view(residual.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> up * silu(gate) [..., I] (gate = first half, up = second half)."""
    if not use_triton(gate_up) or gate_up.shape[-1] % 2 or gate_up.numel() == 0:
        return silu_mul_reference(gate_up)
    gu = _rows(gate_up)
    n_rows, n_cols = gu.shape[0], gu.shape[1] // 2
    out = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    block = min(SILU_BLOCK, triton.next_power_of_2(n_cols))
    with _device_guard(gate_up):
        _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](
            gu, out, gu.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4 if block >= 512 else 1
        )
    return out.view(*gate_up.shape[:-1], n_cols)


def apply_interleaved_rotary_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate qk [T, heads, head_dim] in place (see the module docstring); cos/sin [T, rotary_dim/2]."""
    half = cos.shape[-1]
    if (
        not use_triton(qk, cos, sin)
        or qk.dim() != 3
        or qk.stride(-1) != 1
        or cos.dim() != 2
        or cos.shape != sin.shape
        or cos.dtype != sin.dtype
        or cos.shape[0] != qk.shape[0]
        or 2 * half > qk.shape[-1]
        or qk.numel() == 0
    ):
        return apply_interleaved_rotary_reference_(qk, cos, sin)
    num_tokens, n_heads, _ = qk.shape
    block_h, block_r = min(ROTARY_BLOCK_H, triton.next_power_of_2(n_heads)), triton.next_power_of_2(half)
    with _device_guard(qk):
        _rotary_kernel[(num_tokens, triton.cdiv(n_heads, block_h))](
            qk, cos, sin, qk.stride(0), qk.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            n_heads, half,
            BLOCK_H=block_h, BLOCK_R=block_r, num_warps=ROTARY_WARPS,
        )  # fmt: skip
    return qk
