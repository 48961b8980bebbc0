"""Fused elementwise kernels of the decoder, in the Triton language, with the torch code that defines them.

Each public op runs a Triton kernel when `use_triton(...)` says so and its torch reference otherwise; the
references are the spec (and the CPU path), and they compute exactly what the decoder computed before
these kernels existed.

* `rms_norm(x, weight, eps)`: `weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`, the
  product rounded to x's dtype (engine.model.layers.RMSNorm, transformers' Glm4vRMSNorm).
* `add_rms_norm_pair(residual, h, w_post, w_next, eps) -> (new_residual, normed_next)`:
  `new_residual = residual + rms_norm(h, w_post)` (added in x's dtype) and
  `normed_next = rms_norm(new_residual, w_next)`: GLM-4's sandwich norm after a sublayer, fused with the
  norm in front of the next sublayer. One program per row (token).
* `add_rms_norm_pair_fp8(...) -> (new_residual, normed_next, q, scale)`: the same, and normed_next's rows
  quantized to FP8 as `engine.model.quant.quantize_rows_fp8` does (for an FP8 layer's skinny kernel next),
  in the same kernel: the row is in registers already.
* `silu_mul(gate_up [T, 2I]) -> [T, I]`: `up * silu(gate)`, gate the first half, up the second; silu is
  rounded to the input dtype before the product, as torch does in eager.
* `silu_mul_fp8(gate_up) -> (q, scale)`: `quantize_rows_fp8(silu_mul(gate_up))` (for an FP8 down
  projection next), one program per row that keeps the row in registers: the [T, I] product is never
  written (I up to 16384; wider rows and CPU run the two ops).
* `apply_interleaved_rotary_(qk [T, heads, head_dim], cos, sin)`: in place, rotates the first
  `2 * cos.shape[-1]` dims of every head in adjacent pairs (2i, 2i+1) like
  `engine.model.rope.apply_interleaved_rotary` (arithmetic in cos's dtype, each product and sum rounded to it);
  the other dims are left untouched. qk may be a strided view (e.g. into the qkv projection's output) as
  long as its last dim is contiguous; cos/sin may have any strides (MRotaryEmbedding's are transposed).
* `rotary_write_kv_(qkv [T, H + 2 Hkv, D], H, Hkv, cos, sin, kv_cache, slot_mapping) -> bool`: the rotary of
  the q and k heads (as `apply_interleaved_rotary_`) and the new k, v rows stored at their cache slots
  (as `engine.kernels.attention.write_kv_cache`, slot < 0 not stored), in one kernel; False (nothing
  done) off the Triton path, where the caller runs the two torch ops.
* `paged_decode_attention(q [B, H, D], k_cache, v_cache, block_tables, seq_lens, scale)`: attention of one
  decode token per sequence straight from the paged KV cache (split-K "flash-decoding" + a reduce kernel;
  see its section below), `paged_decode_attention_reference` (gather + float32 softmax) is its spec.

Numerics of the Triton path against the reference: rotary and the residual add round exactly as torch
does (bit-equal given equal inputs). The RMSNorm reduction (sum order, 1/sqrt) and silu's exp differ from
torch's by a few float32 ulps, so a bfloat16 result can differ from torch's by one rounding step where the
float32 value lies next to a rounding boundary (see tests/engine/kernels/test_fused.py for the tolerances).
Every rounding to bfloat16 goes through `_round_to`, a round-to-nearest-even written with integer ops:
Triton's CPU interpreter truncates float32 -> bfloat16 casts, this way it rounds like the GPU. Every cast
to FP8 (here, in engine.kernels.gemv and engine.model.quant) goes through `_quantize_fp8`: the interpreter's
float32 -> e4m3 cast drops the carry where rounding crosses a power of two (127.9 -> 64), so there the value
is rounded in float32 bits first (`_fp8_rounded`) and the cast only meets values e4m3 holds.

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

from engine.model.rope import apply_interleaved_rotary

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # not installed, or broken on this platform: the torch path runs
    triton = None
    tl = None
    HAS_TRITON = False
try:  # grid dependency control (PDL); older Triton lacks it
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except Exception:
    _gdc_launch_dependents = _gdc_wait = None

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run on these tensors (see the module docstring)."""
    if not HAS_TRITON or os.environ.get("GLMV_DISABLE_TRITON_KERNELS") == "1":
        return False
    return INTERPRET or all(t.is_cuda for t in tensors)


# Programmatic dependent launch (`set_pdl`, Hopper and later): each kernel below starts with `_pdl_enter`,
# which waits for the kernel before it to finish (and its writes to be visible) and then lets the next one
# launch. Launched with PDL, a kernel's programs are scheduled while the one before it finishes, so the
# gap between two kernels of a CUDA graph (launch, ramp-up) overlaps the previous kernel's tail. A kernel
# reads or writes nothing before its wait, so the result is the same with PDL on or off. Where the next
# kernel may launch (`set_pdl`'s trigger): "start", right after the wait; "exit", when each program ends
# (the next kernel's programs then do not sit resident beside this one's).
PDL_TRIGGERS = {"start": 1, "exit": 2}  # the kernels' PDL argument for each
_PDL = False
_PDL_TRIGGER = "start"


def set_pdl(on: bool, trigger: str = "start") -> bool:
    """Launch the kernels of this module and `engine.kernels.gemv` with PDL from now on (CUDA graphs
    captured before keep how they were captured), letting the next kernel launch at ``trigger``
    (`PDL_TRIGGERS`). Only where it can run: a CUDA device of compute capability 9 or more, Triton with
    grid dependency control, not the interpreter. Returns whether it is on."""
    global _PDL, _PDL_TRIGGER
    if trigger not in PDL_TRIGGERS:
        raise ValueError(f"trigger: {trigger!r} must be one of {', '.join(PDL_TRIGGERS)}")
    _PDL_TRIGGER = trigger
    _PDL = bool(
        on
        and HAS_TRITON
        and _gdc_wait is not None
        and not INTERPRET
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] >= 9
    )
    return _PDL


def pdl_enabled() -> bool:
    return _PDL


def pdl_args() -> dict:
    """The launch arguments of a kernel that starts with `_pdl_enter(PDL)`."""
    return {"PDL": PDL_TRIGGERS[_PDL_TRIGGER], "launch_pdl": True} if _PDL else {"PDL": False}


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's device."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# torch references (the spec, and the path used without Triton)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """engine.model.layers.RMSNorm.forward: normalize in float32, cast back, then scale in x's dtype."""
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
    if _gdc_wait is not None:

        @triton.jit
        def _pdl_enter(PDL: tl.constexpr):
            """A kernel's first statement: with PDL, wait for the kernel before it, then (trigger "start",
            PDL == 1) let the next launch; with "exit" (2) the next launches as this one's programs end."""
            if PDL:
                _gdc_wait()
                if PDL == 1:
                    _gdc_launch_dependents()

    else:  # a Triton without grid dependency control: PDL never turns on (set_pdl)

        @triton.jit
        def _pdl_enter(PDL: tl.constexpr):
            pass

    # Triton's interpreter casts float32 -> float8 wrongly where the rounding carries into the exponent
    # (127.9 -> 64) and exactly on values e4m3 holds: there `_quantize_fp8` rounds in float32 bits first
    _ROUND_FP8_FIRST = tl.constexpr(INTERPRET)

    @triton.jit
    def _fp8_rounded(q):
        """float32 q (|q| <= 448) rounded to the nearest e4m3 value, ties to even, as float32 (the GPU's
        cast). Normal values keep 3 of float32's 23 mantissa bits; below 2^-6 (subnormal) the values are
        multiples of 2^-9."""
        bits = q.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        subnormal = (q + 24576.0) - 24576.0  # float32's spacing at 1.5 * 2^14 is 2^-9
        return tl.where(tl.abs(q) < 0.015625, subnormal, normal)

    @triton.jit
    def _quantize_fp8(x, scale, FP8_MAX_C: tl.constexpr, dtype: tl.constexpr):
        """float32 x / scale, clamped to +-FP8_MAX_C, cast to ``dtype`` (float8e4nv) as the GPU casts it."""
        q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -FP8_MAX_C), FP8_MAX_C)
        if _ROUND_FP8_FIRST:
            q = _fp8_rounded(q)
        return q.to(dtype)

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
    def _rms_norm_kernel(
        x_ptr, w_ptr, out_ptr, x_stride, out_stride, n_cols, eps, BLOCK: tl.constexpr, PDL: tl.constexpr
    ):
        _pdl_enter(PDL)
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
        q_ptr,  # QUANT: normed's rows in FP8 [rows, n_cols] (contiguous) and their scales [rows]
        scale_ptr,
        min_scale,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
        QUANT: tl.constexpr = False,
        FP8_MAX_C: tl.constexpr = 448.0,
    ):
        _pdl_enter(PDL)
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
        if QUANT:  # as engine.model.quant's _quantize_rows_kernel on the stored row (masked lanes are 0)
            scale = tl.maximum(tl.max(tl.abs(normed), axis=0) / FP8_MAX_C, min_scale)
            tl.store(scale_ptr + row, scale)
            q = _quantize_fp8(normed, scale, FP8_MAX_C, q_ptr.dtype.element_ty)
            tl.store(q_ptr + row * n_cols + cols, q, mask=mask)

    @triton.jit
    def _silu_mul_kernel(
        gu_ptr, out_ptr, gu_stride, out_stride, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr
    ):
        _pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        silu = _round_to(gate / (1.0 + tl.exp(-gate)), dtype)
        tl.store(out_ptr + row * out_stride + cols, _round_to(up * silu, dtype).to(dtype), mask=mask)

    @triton.jit
    def _silu_mul_quant_kernel(
        gu_ptr, q_ptr, scale_ptr, gu_stride, n_cols, min_scale,
        FP8_MAX_C: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One row: `_silu_mul_kernel`'s product (rounded to gate_up's dtype), then quantized as
        engine.model.quant's _quantize_rows_kernel does (masked lanes are 0)."""
        _pdl_enter(PDL)
        DTYPE: tl.constexpr = gu_ptr.dtype.element_ty
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        h = _round_to(up * _round_to(gate / (1.0 + tl.exp(-gate)), DTYPE), DTYPE)
        scale = tl.maximum(tl.max(tl.abs(h), axis=0) / FP8_MAX_C, min_scale)
        tl.store(scale_ptr + row, scale)
        q = _quantize_fp8(h, scale, FP8_MAX_C, q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * n_cols + cols, q, mask=mask)

    @triton.jit
    def _rotate_pairs_(
        even, mask, cos_row, sin_row, slots, slot_mask, cos_stride_r, sin_stride_r, xdtype: tl.constexpr
    ):
        # the pairs (even, even + 1) of a token's heads rotated in place as rope.apply_interleaved_rotary
        # does: arithmetic in cos's dtype, each product and sum rounded to it; the result rounded to x's
        # dtype, stored and returned
        cdtype: tl.constexpr = cos_row.dtype.element_ty
        c = tl.load(cos_row + slots * cos_stride_r, mask=slot_mask, other=0.0).to(tl.float32)
        s = tl.load(sin_row + slots * sin_stride_r, mask=slot_mask, other=0.0).to(tl.float32)
        x0 = _round_to(tl.load(even, mask=mask, other=0.0).to(tl.float32), cdtype)
        x1 = _round_to(tl.load(even + 1, mask=mask, other=0.0).to(tl.float32), cdtype)
        r0 = _round_to(_round_to(x0 * c, cdtype) - _round_to(x1 * s, cdtype), cdtype)
        r1 = _round_to(_round_to(x1 * c, cdtype) + _round_to(x0 * s, cdtype), cdtype)
        r0, r1 = _round_to(r0, xdtype), _round_to(r1, xdtype)
        tl.store(even, r0.to(xdtype), mask=mask)
        tl.store(even + 1, r1.to(xdtype), mask=mask)
        return r0, r1

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
        PDL: tl.constexpr,
    ):
        _pdl_enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        slots = tl.arange(0, BLOCK_R)[None, :]
        slot_mask = slots < half
        mask = (heads < n_heads) & slot_mask
        xdtype: tl.constexpr = qk_ptr.dtype.element_ty
        even = qk_ptr + t * qk_stride_t + heads * qk_stride_h + 2 * slots
        _rotate_pairs_(
            even, mask, cos_ptr + t * cos_stride_t, sin_ptr + t * sin_stride_t, slots, slot_mask,
            cos_stride_r, sin_stride_r, xdtype,
        )  # fmt: skip

    @triton.jit
    def _rotary_kv_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        cache_ptr,
        slot_ptr,
        qkv_stride_t,
        qkv_stride_h,
        cos_stride_t,
        cos_stride_r,
        sin_stride_t,
        sin_stride_r,
        cache_stride_kv,
        cache_stride_slot,
        cache_stride_h,
        n_q,
        n_kv,
        half,
        head_dim,
        BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PDL: tl.constexpr,
    ):
        _pdl_enter(PDL)
        # heads [0, n_q) are q, [n_q, n_q + n_kv) k, then v: q and k rotated in place as _rotary_kernel
        # does; k (rotated) and v rows stored at the token's cache slot unless it is < 0 (padding)
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        n_rot = n_q + n_kv
        slot = tl.load(slot_ptr + t).to(tl.int64)
        has_slot = (heads * 0 + slot) >= 0  # [BLOCK_H, 1], like the other masks
        is_k = (heads >= n_q) & (heads < n_rot)
        is_v = (heads >= n_rot) & (heads < n_rot + n_kv)
        kv_head = tl.where(is_k, heads - n_q, heads - n_rot).to(tl.int64)
        cache_row = cache_ptr + slot * cache_stride_slot + kv_head * cache_stride_h
        cache_dtype: tl.constexpr = cache_ptr.dtype.element_ty

        slots = tl.arange(0, BLOCK_R)[None, :]
        slot_mask = slots < half
        mask = (heads < n_rot) & slot_mask
        xdtype: tl.constexpr = qkv_ptr.dtype.element_ty
        even = qkv_ptr + t * qkv_stride_t + heads * qkv_stride_h + 2 * slots
        r0, r1 = _rotate_pairs_(
            even, mask, cos_ptr + t * cos_stride_t, sin_ptr + t * sin_stride_t, slots, slot_mask,
            cos_stride_r, sin_stride_r, xdtype,
        )  # fmt: skip
        k_mask = mask & is_k & has_slot
        tl.store(cache_row + 2 * slots, r0.to(xdtype).to(cache_dtype), mask=k_mask)
        tl.store(cache_row + 2 * slots + 1, r1.to(xdtype).to(cache_dtype), mask=k_mask)

        # k's dims past the rotary ones, and all of v, as they are
        cols = tl.arange(0, BLOCK_D)[None, :]
        copy_mask = ((is_k & (cols >= 2 * half)) | is_v) & (cols < head_dim) & has_slot
        row = tl.load(qkv_ptr + t * qkv_stride_t + heads * qkv_stride_h + cols, mask=copy_mask, other=0.0)
        dst = cache_row + is_v.to(tl.int64) * cache_stride_kv + cols
        tl.store(dst, row.to(cache_dtype), mask=copy_mask)


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
    with device_guard(x):
        _rms_norm_kernel[(n_rows,)](
            x2, weight.contiguous(), out, x2.stride(0), out.stride(0), n_cols, eps,
            BLOCK=block, num_warps=_row_warps(block), **pdl_args(),
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
    return _add_rms_norm_pair(residual, h, w_post, w_next, eps, eps_next, False)[:2]


def add_rms_norm_pair_fp8(
    residual: torch.Tensor,
    h: torch.Tensor,
    w_post: torch.Tensor,
    w_next: torch.Tensor,
    eps: float,
    eps_next: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`add_rms_norm_pair` and normed's rows [T, hidden] quantized: (new_residual, normed, float8_e4m3fn
    [T, hidden], float32 scale [T, 1]), as `quantize_rows_fp8(normed)`; one kernel on the Triton path."""
    return _add_rms_norm_pair(residual, h, w_post, w_next, eps, eps_next, True)


def _add_rms_norm_pair(residual, h, w_post, w_next, eps, eps_next, quant: bool):
    eps_next = eps if eps_next is None else eps_next
    dtypes = {residual.dtype, h.dtype, w_post.dtype, w_next.dtype}
    kernel = (
        use_triton(residual, h, w_post, w_next)
        and len(dtypes) == 1
        and residual.shape == h.shape
        and residual.numel() > 0
    )
    if quant and not kernel:  # the rows quantized after the pair, off the Triton path
        from engine.model.quant import quantize_rows_fp8

        new_residual, normed = _add_rms_norm_pair(residual, h, w_post, w_next, eps, eps_next, False)
        return new_residual, normed, *quantize_rows_fp8(_rows(normed))
    if not kernel:
        return add_rms_norm_pair_reference(residual, h, w_post, w_next, eps, eps_next)
    res2, h2 = _rows(residual), _rows(h)
    n_rows, n_cols = res2.shape
    new_residual = torch.empty((n_rows, n_cols), dtype=residual.dtype, device=residual.device)
    normed = torch.empty_like(new_residual)
    q = scale = normed  # unused without quant (a pointer never read)
    min_scale, fp8_max = 0.0, 448.0
    if quant:
        from engine.model.quant import FP8_DTYPE, FP8_MAX, MIN_ACT_SCALE

        q = torch.empty((n_rows, n_cols), dtype=FP8_DTYPE, device=residual.device)
        scale = torch.empty((n_rows, 1), dtype=torch.float32, device=residual.device)
        min_scale, fp8_max = MIN_ACT_SCALE, FP8_MAX
    block = triton.next_power_of_2(n_cols)
    with device_guard(residual):
        _add_rms_norm_pair_kernel[(n_rows,)](
            res2, h2, w_post.contiguous(), w_next.contiguous(), new_residual, normed,
            res2.stride(0), h2.stride(0), new_residual.stride(0), normed.stride(0), n_cols, eps, eps_next,
            q, scale, min_scale,
            BLOCK=block, num_warps=_row_warps(block), QUANT=quant, FP8_MAX_C=fp8_max, **pdl_args(),
        )  # fmt: skip
    out = new_residual.view(residual.shape), normed.view(residual.shape)
    return (*out, q, scale) if quant else out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> up * silu(gate) [..., I] (gate = first half, up = second half)."""
    if not use_triton(gate_up) or gate_up.shape[-1] % 2 or gate_up.numel() == 0:
        return silu_mul_reference(gate_up)
    gu = _rows(gate_up)
    n_rows, n_cols = gu.shape[0], gu.shape[1] // 2
    out = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    block = min(SILU_BLOCK, triton.next_power_of_2(n_cols))
    with device_guard(gate_up):
        _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](
            gu,
            out,
            gu.stride(0),
            out.stride(0),
            n_cols,
            BLOCK=block,
            num_warps=4 if block >= 512 else 1,
            **pdl_args(),
        )
    return out.view(*gate_up.shape[:-1], n_cols)


SILU_QUANT_MAX_COLS = 16384  # the widest rows `silu_mul_fp8` keeps in registers (GLM-4.6V-Flash: 13696)


def silu_mul_fp8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T, 2I] (16-bit) -> (float8_e4m3fn [T, I] contiguous, float32 scale [T, 1]):
    `quantize_rows_fp8(silu_mul(gate_up))`, in one kernel on the Triton path."""
    from engine.model.quant import FP8_DTYPE, FP8_MAX, MIN_ACT_SCALE, quantize_rows_fp8

    gu = _rows(gate_up)
    n_rows, n_cols = gu.shape[0], gu.shape[1] // 2
    if (
        not use_triton(gate_up)
        or gate_up.shape[-1] % 2
        or n_rows == 0
        or n_cols > SILU_QUANT_MAX_COLS
        or gate_up.dtype not in (torch.bfloat16, torch.float16)
    ):
        return quantize_rows_fp8(_rows(silu_mul(gate_up)))
    q = torch.empty((n_rows, n_cols), dtype=FP8_DTYPE, device=gate_up.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=gate_up.device)
    block = triton.next_power_of_2(n_cols)
    with device_guard(gate_up):
        _silu_mul_quant_kernel[(n_rows,)](
            gu, q, scale, gu.stride(0), n_cols, MIN_ACT_SCALE,
            FP8_MAX_C=FP8_MAX, BLOCK=block, num_warps=max(1, min(16, block // 512)), **pdl_args(),
        )  # fmt: skip
    return q, scale


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
    with device_guard(qk):
        _rotary_kernel[(num_tokens, triton.cdiv(n_heads, block_h))](
            qk, cos, sin, qk.stride(0), qk.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            n_heads, half,
            BLOCK_H=block_h, BLOCK_R=block_r, num_warps=ROTARY_WARPS, **pdl_args(),
        )  # fmt: skip
    return qk


def rotary_write_kv_(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> bool:
    """On the Triton path, in one kernel: `apply_interleaved_rotary_` on the q and k heads of qkv
    [T, num_heads + 2 * num_kv_heads, head_dim] (in place), and k (rotated) and v stored into kv_cache
    [2, num_blocks, block_size, num_kv_heads, head_dim] at the flat slots slot_mapping [T] (tokens at a
    slot < 0 are not stored), as `engine.kernels.attention.write_kv_cache` does. Returns False, having
    done nothing, where that path does not run (the caller then does both in torch)."""
    half = cos.shape[-1]
    if (
        not use_triton(qkv, cos, sin, kv_cache, slot_mapping)
        or qkv.dim() != 3
        or qkv.stride(-1) != 1
        or qkv.shape[1] != num_heads + 2 * num_kv_heads
        or cos.dim() != 2
        or cos.shape != sin.shape
        or cos.dtype != sin.dtype
        or cos.shape[0] != qkv.shape[0]
        or 2 * half > qkv.shape[-1]
        or qkv.numel() == 0
        or kv_cache.dim() != 5
        or tuple(kv_cache.shape[-2:]) != (num_kv_heads, qkv.shape[-1])
        or not kv_cache.is_contiguous()
        or slot_mapping.shape != (qkv.shape[0],)
    ):
        return False
    num_tokens, n_all, head_dim = qkv.shape
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    block_h = min(ROTARY_BLOCK_H, triton.next_power_of_2(n_all))
    with device_guard(qkv):
        _rotary_kv_kernel[(num_tokens, triton.cdiv(n_all, block_h))](
            qkv, cos, sin, flat, slot_mapping,
            qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            flat.stride(0), flat.stride(1), flat.stride(2),
            num_heads, num_kv_heads, half, head_dim,
            BLOCK_H=block_h, BLOCK_R=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=ROTARY_WARPS, **pdl_args(),
        )  # fmt: skip
    return True


# ---------------------------------------------------------------------------------------------------------
# paged decode attention (one query token per sequence, K/V read through the block table)
#
# `paged_decode_attention(q [B, H, D], k_cache, v_cache [num_blocks, block_size, Hkv, D], block_tables
# [B, W], seq_lens [B], scale) -> [B, H, D]`: query b attends to the first seq_lens[b] tokens of its
# sequence (token j at block block_tables[b, j // block_size], offset j % block_size), query head h to kv
# head h // (H // Hkv); softmax in float32. `paged_decode_attention_reference` is the spec.
#
# Kernel ("flash-decoding"): grid (B, Hkv, num_splits). Program (b, kvh, s) holds the G = H // Hkv query
# heads of kv head kvh as one [G, D] tile (so K/V are read once per kv head) and runs an online softmax
# over tokens [s * tokens_per_split, (s + 1) * tokens_per_split) ∩ [0, seq_lens[b]) in tiles of BLOCK_N
# tokens, each token's K/V row loaded through the block table (only live blocks are read). With one split
# it writes the output directly; otherwise it writes a float32 partial (acc / l and the base-2 log-sum-exp)
# and `_paged_decode_reduce_kernel` (grid (B, H)) merges the live splits. Programs whose range starts
# past seq_lens[b] exit at once and the reduce ignores them, so num_splits may be sized from shapes alone
# (block_tables width, B, Hkv, the GPU's SM count): a CUDA graph captured for one width replays for any
# seq_lens that fit it. Numerics: scores and the softmax in float32; for 16-bit caches p is rounded to the
# cache dtype before the p @ V product (as flash / memory-efficient SDPA do), float32 caches use IEEE
# float32 dots (no TF32).

if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        block_tables_ptr,
        seq_lens_ptr,
        out_ptr,
        part_o_ptr,
        part_lse_ptr,
        qk_scale,  # softmax scale * log2(e)
        q_stride_b,
        q_stride_h,
        k_stride_blk,
        k_stride_slot,
        k_stride_h,
        v_stride_blk,
        v_stride_slot,
        v_stride_h,
        bt_stride_b,
        out_stride_b,
        out_stride_h,
        num_heads,
        max_tokens,  # block_tables width * block_size
        tokens_per_split,
        GROUP: tl.constexpr,  # query heads per kv head
        HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr,  # block_size of the cache
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr,  # one split: write the output, no partials
        FP32_DOT: tl.constexpr,  # float32 operands, IEEE dots (float32 caches; the interpreter, whose dot
        # cannot take bfloat16: bf16 x bf16 products are exact in float32, so the result is the same)
        PDL: tl.constexpr,
    ):
        _pdl_enter(PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        num_splits = tl.num_programs(2)
        seq_len = tl.minimum(tl.load(seq_lens_ptr + b).to(tl.int32), max_tokens)
        start = split * tokens_per_split
        if start >= seq_len:
            return
        end = tl.minimum(start + tokens_per_split, seq_len)
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        kv_dtype: tl.constexpr = v_ptr.dtype.element_ty

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g
        b64 = b.to(tl.int64)
        q = tl.load(
            q_ptr + b64 * q_stride_b + heads[:, None] * q_stride_h + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [G, D]
        if FP32_DOT:
            q = q.to(tl.float32)
        k_base = k_ptr + kvh * k_stride_h
        v_base = v_ptr + kvh * v_stride_h
        table = block_tables_ptr + b64 * bt_stride_b

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            toks = n0 + offs_n
            n_mask = toks < end
            blk = tl.load(table + toks // PAGE, mask=n_mask, other=0).to(tl.int64)
            slot = toks % PAGE
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(
                k_base + (blk * k_stride_blk + slot * k_stride_slot)[:, None] + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )  # [N, D]
            if FP32_DOT:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # [G, N] float32, base-2 logits
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a live token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_base + (blk * v_stride_blk + slot * v_stride_slot)[:, None] + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )  # [N, D]
            p = _round_to(p, kv_dtype)  # the p @ V operand in the cache dtype (float32 values)
            if FP32_DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(kv_dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        o = acc / l_i[:, None]  # l_i >= 1 (the max term is exp2(0))
        gd_mask = g_mask[:, None] & d_mask[None, :]
        if DIRECT:
            out = out_ptr + b64 * out_stride_b + heads[:, None] * out_stride_h + offs_d[None, :]
            tl.store(out, _round_to(o, dtype).to(dtype), mask=gd_mask)
        else:
            row = (b64 * num_heads + heads) * num_splits + split  # [G] rows of [B, H, S]
            tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=gd_mask)
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g_mask)

    @triton.jit
    def _paged_decode_reduce_kernel(
        part_o_ptr,
        part_lse_ptr,
        seq_lens_ptr,
        out_ptr,
        out_stride_b,
        out_stride_h,
        num_heads,
        num_splits,
        max_tokens,
        tokens_per_split,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,  # >= num_splits
        BLOCK_SC: tl.constexpr,  # splits merged per iteration
        BLOCK_D: tl.constexpr,
        PDL: tl.constexpr,
    ):
        _pdl_enter(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        seq_len = tl.minimum(tl.load(seq_lens_ptr + b).to(tl.int32), max_tokens)
        live = tl.cdiv(seq_len, tokens_per_split)  # splits that wrote a partial (>= 1)
        base = (b.to(tl.int64) * num_heads + h) * num_splits
        offs_s = tl.arange(0, BLOCK_S)
        lse = tl.load(part_lse_ptr + base + offs_s, mask=offs_s < live, other=float("-inf"))
        m = tl.max(lse, axis=0)
        denom = tl.sum(tl.exp2(lse - m), axis=0)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        offs_c = tl.arange(0, BLOCK_SC)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, live, BLOCK_SC):
            splits = s0 + offs_c
            s_mask = splits < live
            w = tl.exp2(tl.load(part_lse_ptr + base + splits, mask=s_mask, other=float("-inf")) - m)
            o = tl.load(
                part_o_ptr + (base + splits)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(w[:, None] * o, axis=0)
        out = acc / denom
        tl.store(
            out_ptr + b.to(tl.int64) * out_stride_b + h * out_stride_h + offs_d,
            _round_to(out, dtype).to(dtype),
            mask=d_mask,
        )


# Launch parameters of the decode attention (defaults; the GPU owner tunes them with
# benchmarks/decode_attention_bench.py). A program handles a multiple of DECODE_BLOCK_N tokens; the split
# count aims at DECODE_PROGRAMS_PER_SM programs per SM over the whole batch.
DECODE_BLOCK_N = 64  # tokens per tile (K and V tiles of [BLOCK_N, D])
DECODE_WARPS = 4
DECODE_STAGES = 2
DECODE_PROGRAMS_PER_SM = 2
DECODE_MAX_SPLITS = 256
DECODE_REDUCE_BLOCK_SC = 16
DECODE_REDUCE_WARPS = 2
_DEFAULT_SM_COUNT = 132  # H100 SXM; used without CUDA (the interpreter)
_sm_counts: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def paged_decode_splits(
    batch: int,
    num_kv_heads: int,
    max_tokens: int,
    device: torch.device,
    num_splits: int | None = None,
    block_n: int = DECODE_BLOCK_N,
) -> tuple[int, int]:
    """(tokens_per_split, num_splits) for a decode batch whose block tables cover max_tokens tokens.

    A function of shapes only (and the device's SM count): fixed for a captured CUDA graph. num_splits
    forces a split count (rounded so every split is a whole number of BLOCK_N tiles)."""
    if num_splits is None:
        target = DECODE_PROGRAMS_PER_SM * _sm_count(device)
        num_splits = min(DECODE_MAX_SPLITS, -(-target // max(1, batch * num_kv_heads)))
    per_split = -(-max_tokens // max(1, num_splits))
    tokens_per_split = max(block_n, -(-per_split // block_n) * block_n)
    return tokens_per_split, -(-max_tokens // tokens_per_split)


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Gather every sequence's block table, float32 softmax over its first seq_lens[b] tokens. q [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    tables = block_tables.long()
    k = k_cache[tables].flatten(1, 2).float()  # [B, S, Hkv, D], S = W * block_size
    v = v_cache[tables].flatten(1, 2).float()
    qf = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bshd->bhgs", qf, k) * scale
    positions = torch.arange(k.shape[1], device=q.device)
    live = positions[None, :] < seq_lens.long()[:, None]  # [B, S]
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgs,bshd->bhgd", scores.softmax(dim=-1), v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_decode_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether `paged_decode_attention` runs its Triton kernel on these tensors (else the reference)."""
    return (
        use_triton(q, k_cache, v_cache)
        and q.dim() == 3
        and k_cache.dim() == 4
        and k_cache.shape == v_cache.shape
        and q.dtype == k_cache.dtype == v_cache.dtype
        and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and q.shape[2] == k_cache.shape[3] <= 256
        and q.shape[1] % k_cache.shape[2] == 0
        and q.shape[1] // k_cache.shape[2] <= 64
        and q.stride(-1) == 1
        and k_cache.stride(-1) == 1
        and v_cache.stride(-1) == 1
        and q.numel() > 0
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context; see the section comment above.

    q [B, H, D] (last dim contiguous), k_cache/v_cache [num_blocks, block_size, Hkv, D], block_tables
    [B, W] int, seq_lens [B] int (1 <= seq_lens[b] <= W * block_size). Returns [B, H, D] in q's dtype
    (written into `out` when given). num_splits / block_n override the launch heuristic (tuning)."""
    if not paged_decode_supported(q, k_cache, v_cache):
        ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
        if out is None:
            return ref
        return out.copy_(ref)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: {tuple(out.shape)} {out.dtype} must be like q with a contiguous last dim")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    block_n = block_n or DECODE_BLOCK_N
    max_tokens = block_tables.shape[1] * block_size
    if max_tokens == 0:
        return out.zero_()
    tokens_per_split, splits = paged_decode_splits(
        batch, num_kv_heads, max_tokens, q.device, num_splits, block_n
    )
    direct = splits == 1
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    with device_guard(q):
        _paged_decode_kernel[(batch, num_kv_heads, splits)](
            q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse,
            scale * 1.4426950408889634,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1),
            num_heads, max_tokens, tokens_per_split,
            GROUP=group, HEAD_DIM=head_dim, PAGE=block_size, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, DIRECT=direct,
            FP32_DOT=q.dtype == torch.float32 or INTERPRET, num_warps=DECODE_WARPS, num_stages=DECODE_STAGES, **pdl_args(),
        )  # fmt: skip
        if not direct:
            _paged_decode_reduce_kernel[(batch, num_heads)](
                part_o, part_lse, seq_lens, out, out.stride(0), out.stride(1),
                num_heads, splits, max_tokens, tokens_per_split,
                HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(splits), BLOCK_SC=DECODE_REDUCE_BLOCK_SC, BLOCK_D=block_d,
                num_warps=DECODE_REDUCE_WARPS, **pdl_args(),
            )  # fmt: skip
    return out
