"""Fused rotate-half rotary of the vision tower, in the Triton language, with the torch code that defines it.

`apply_rotary_half_qk_(qkv [N, 3, heads, head_dim], cos, sin)` rotates q = qkv[:, 0] and k = qkv[:, 1] in
place like `engine.model.rope.apply_rotary_half` (cos/sin [N, head_dim] float32; the arithmetic runs in float32,
`x * cos + rotate_half(x) * sin`, and the result is rounded to qkv's dtype); v is left untouched. One
program per patch and group of heads; the eager torch version runs about seven full-size float32 kernels
per tensor (2 x 29 MB per kernel for a 1288x728 screenshot), this one reads and writes q and k once.

The same switch as `engine.kernels.fused` decides between Triton and torch (`use_triton`). Numerics: the float32
products and sum may be contracted into one fused multiply-add on the GPU, so a bfloat16 result can differ
from torch's by one rounding step where the float32 value lies next to a rounding boundary.
"""

from __future__ import annotations

import torch

from engine.kernels.fused import HAS_TRITON, device_guard, use_triton
from engine.model.rope import apply_rotary_half

if HAS_TRITON:
    import triton
    import triton.language as tl

    from engine.kernels.fused import _round_to

    @triton.jit
    def _rotary_half_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        qkv_stride_t,
        qkv_stride_h,
        cos_stride_t,
        sin_stride_t,
        n_heads,
        half,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        col_mask = cols < half
        mask = (heads < n_heads) & col_mask
        xdtype: tl.constexpr = qkv_ptr.dtype.element_ty
        c1 = tl.load(cos_ptr + t * cos_stride_t + cols, mask=col_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * cos_stride_t + half + cols, mask=col_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * sin_stride_t + cols, mask=col_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * sin_stride_t + half + cols, mask=col_mask, other=0.0).to(tl.float32)
        first = qkv_ptr + t * qkv_stride_t + heads * qkv_stride_h + cols
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
        r1 = x1 * c1 + (-x2) * s1
        r2 = x2 * c2 + x1 * s2
        tl.store(first, _round_to(r1, xdtype).to(xdtype), mask=mask)
        tl.store(first + half, _round_to(r2, xdtype).to(xdtype), mask=mask)


BLOCK_H = 4  # heads per program


def apply_rotary_half_qk_reference_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    qkv[:, 0] = apply_rotary_half(qkv[:, 0], cos, sin)
    qkv[:, 1] = apply_rotary_half(qkv[:, 1], cos, sin)
    return qkv


def apply_rotary_half_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q and k of qkv [N, 3, heads, head_dim] in place; cos/sin [N, head_dim] (see module docstring)."""
    if (
        not use_triton(qkv, cos, sin)
        or qkv.dim() != 4
        or qkv.shape[1] != 3
        or not qkv.is_contiguous()
        or cos.shape != (qkv.shape[0], qkv.shape[-1])
        or sin.shape != cos.shape
        or cos.stride(-1) != 1
        or sin.stride(-1) != 1
        or qkv.shape[-1] % 2
        or qkv.numel() == 0
    ):
        return apply_rotary_half_qk_reference_(qkv, cos, sin)
    num_tokens, _, n_heads, head_dim = qkv.shape
    qk = qkv.view(num_tokens, 3 * n_heads, head_dim)  # q heads then k heads are the first 2 * n_heads
    half = head_dim // 2
    block_h = min(BLOCK_H, triton.next_power_of_2(2 * n_heads))
    with device_guard(qkv):
        _rotary_half_kernel[(num_tokens, triton.cdiv(2 * n_heads, block_h))](
            qk, cos, sin, qk.stride(0), qk.stride(1), cos.stride(0), sin.stride(0), 2 * n_heads, half,
            BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half), num_warps=4,
        )  # fmt: skip
    return qkv
