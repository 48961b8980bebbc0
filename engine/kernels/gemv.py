"""Skinny matmuls for decode steps: y = x @ W.T for a few rows x, one Triton kernel that streams W once.

A decode step multiplies 1 to 64 token rows by every weight of the decoder, so its time is the time to read
the weights. cuBLAS runs these shapes as split-K GEMMs plus a separate reduce kernel; this kernel gives each
program a band of BLOCK_N output columns over the whole of K (no reduce), reads its band of W with the
loads software-pipelined, and applies the layer's epilogue before it stores:

* `skinny_linear(x [M, K], weight [N, K], bias [N] | None, scale [N] | None) -> [M, N]` in x's dtype:
  `x @ weight.T` accumulated in float32, `+ bias`. `weight` is x's dtype, or float8_e4m3fn with `scale`
  its per-output-channel `weight_scale` (engine.model.quant.Fp8Linear): then, as that layer's per-tensor
  path computes, the rows are quantized to FP8 per token first (`quantize_rows_fp8`, one small kernel),
  the dot runs on the FP8 tensor cores (each sum of at most FP8_PROMOTE_K = 128 products added to a
  float32 total, as cuBLAS's FP8 GEMM without fast accumulation does), and the epilogue applies row
  scale, column scale and bias.
* `skinny_linear_silu_mul(x [M, K], gate_up [2I, K], scale [2I] | None) -> [M, I]`: the MLP's gate/up
  projection and `up * silu(gate)` in one kernel (a program reads the same columns of both halves), so
  the [M, 2I] product is never written.

Rounding follows the unfused ops in x's dtype: 16-bit weights, the product rounded, then the bias added and
rounded; FP8, the scaled product (+ bias) rounded once, as `scale_rows_cols` does; silu_mul rounds gate and
up, silu(gate), and the product, as `engine.kernels.fused.silu_mul` does. The float32 sums run in another
order than cuBLAS's, so results differ from `F.linear` by float32 rounding moving a value across a bf16
rounding boundary (one bf16 step at most where the sums agree to float32 precision; FP8 on CUDA two, its
tensor cores summing a K block with fewer bits; tests/engine/kernels/test_gemv.py).

The kernel takes 1 to KERNEL_ROWS (64) rows in a row tile of 16, 32 or 64; the decoder sends it steps of
up to MAX_ROWS. `supports(x, weight)`: CUDA (or Triton's interpreter), 1 <= M <= MAX_ROWS (FP8 weights:
FP8_MAX_ROWS), x bfloat16 or float16 (float32 takes cuBLAS: its TF32 or full-precision paths are not what this kernel
computes), K a multiple of 16, contiguous rows. Anything else is the caller's `F.linear`. The kernels are
CUDA-graph safe (no host sync, the output sized from shapes).

Block sizes: `config(k, ...)` picks BLOCK_N, BLOCK_K, warps and pipeline stages from the reduced dimension and
the weights' dtype; `benchmarks/gemv_bench.py` measures every candidate on the decoder's shapes against cuBLAS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.kernels.fused import HAS_TRITON, INTERPRET, device_guard, pdl_args

if HAS_TRITON:
    import triton
    import triton.language as tl

    from engine.kernels.fused import _pdl_enter, _round_to

MAX_ROWS = 64  # token rows up to which a step's linear layers run this kernel
# FP8 weights: at 24 and 32 rows the down projection was slower than the FP8 layers' own GEMM on an H100
FP8_MAX_ROWS = 16
ROW_TILES = (16, 32, 64)  # the kernel's row tile: the smallest that holds M (16: tl.dot's smallest)
# FP8: the K of each tensor-core dot whose sum goes to the float32 total (the FP8 tensor cores keep fewer
# bits than float32 in a sum; 256 and 512 gave 7 bf16 steps at K = 528 on an H100 where 128 gave 2)
FP8_PROMOTE_K = 128
KERNEL_ROWS = ROW_TILES[-1]  # the most rows the kernel takes (the decoder sends it up to MAX_ROWS)
# shared memory for one program's pipelined buffers (H100/H200: 227 KiB per block; the rest for the epilogue)
SMEM_BUDGET = 220 * 1024
FP8_DTYPE = torch.float8_e4m3fn


# With PDL (engine.kernels.fused.set_pdl) each program first prefetches into L2 up to this many bytes of its
# band of W (the weights do not depend on the kernel before), then waits for that kernel; 0: no prefetch
_PDL_PREFETCH_BYTES = 0
L2_LINE = 128  # bytes a prefetch brings


def set_pdl_prefetch(nbytes: int) -> None:
    """Bytes of its band each program prefetches before its PDL wait (0: none; only while PDL is on)."""
    global _PDL_PREFETCH_BYTES
    if nbytes < 0:
        raise ValueError(f"nbytes: {nbytes} must be >= 0")
    _PDL_PREFETCH_BYTES = int(nbytes)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def config(k: int, block_m: int = 16, silu_mul: bool = False, fp8: bool = False) -> GemvConfig:
    """The block sizes for a product over K = k (see the module docstring), measured on an H100 with
    `benchmarks.gemv_bench`'s sweeps (M = 1 and 16). 16-bit weights (27 candidates): wide bands with short,
    deep-pipelined K steps for K = 4096 (qkv, o, gate/up: best or within 2 % of it), narrower bands with
    long K steps for the down projection's K = 13696. FP8 weights (36 candidates, at `6a34ab5`): wide bands
    with twice the K per step (the same bytes in flight), 512 for the down projection; gate/up (two bands
    per step) with 3 stages. Each best or within 3 % of it; per layer 7 % under the 16-bit choices on FP8.
    Measured with one dot per K step; since, a step's dots are FP8_PROMOTE_K wide (the same loads).
    Larger row tiles get them cut to fit `SMEM_BUDGET` (`fit`), except the down projection's at 64 rows:
    swept there (27 candidates at `eb7c40b`), wide bands with short K steps won (46 µs; the cut 16-row
    choice 64)."""
    if fp8:
        if k > 8192:
            return fit(GemvConfig(64, 512, 4, 5), block_m, silu_mul, elem_bytes=1)
        return fit(GemvConfig(64, 256, 4, 3 if silu_mul else 5), block_m, silu_mul, elem_bytes=1)
    if k > 8192:
        if block_m > 32:
            return fit(GemvConfig(64, 128, 4, 5), block_m, silu_mul)
        return fit(GemvConfig(32, 512, 4, 3), block_m, silu_mul)
    return fit(GemvConfig(64, 128, 4, 5), block_m, silu_mul)


def fit(cfg: GemvConfig, block_m: int, silu_mul: bool, elem_bytes: int = 2) -> GemvConfig:
    """``cfg`` with its pipeline's buffers (per stage a BLOCK_N x BLOCK_K band of W, two with silu_mul,
    and the BLOCK_M x BLOCK_K rows of x) within `SMEM_BUDGET`: fewer stages, down to 3, then shorter K
    steps (down to 64)."""
    block_n, block_k, warps, stages = cfg

    def need(bk: int, st: int) -> int:
        return st * bk * elem_bytes * (block_n * (2 if silu_mul else 1) + block_m)

    while need(block_k, stages) > SMEM_BUDGET and stages > 3:
        stages -= 1
    while need(block_k, stages) > SMEM_BUDGET and block_k > 64:
        block_k //= 2
    return GemvConfig(block_n, block_k, warps, stages)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not HAS_TRITON or x.dim() != 2 or weight.dim() != 2:
        return False
    if not (INTERPRET or (x.is_cuda and weight.is_cuda)):
        return False
    m, k = x.shape
    return (
        1 <= m <= (FP8_MAX_ROWS if weight.dtype == FP8_DTYPE else MAX_ROWS)
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
        PROMOTE: tl.constexpr,
    ):
        """acc [BLOCK_N, BLOCK_M] += W band [BLOCK_N, BLOCK_K] @ x rows [BLOCK_M, BLOCK_K].T, in x's and W's
        dtype (both bf16/fp16, or both FP8). DOT_F32: the interpreter, whose bf16 dot is wrong, multiplies in
        float32: the same products, exact either way. PROMOTE (FP8): the block's dot accumulates on its own
        and is added to acc in float32 (the FP8 tensor cores keep fewer bits than float32 in their sums)."""
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = tl.arange(0, BLOCK_K) < k_left
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            return tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        if PROMOTE:
            return acc + tl.dot(w, tl.trans(x))
        return tl.dot(w, tl.trans(x), acc)

    @triton.jit
    def _epilogue(acc, x_scale, w_scale, FP8: tl.constexpr):
        """The float32 product, scaled per row and column for FP8 (rounded by the caller)."""
        if FP8:
            acc = acc * x_scale[None, :] * w_scale[:, None]
        return acc

    @triton.jit
    def _prefetch_l2(addr):
        """`prefetch.global.L2` of each address (int64 tensor): the lines are fetched, nothing waits."""
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
            "=r,l",
            [addr],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _skinny_kernel(
        x_ptr,
        w_ptr,
        x_scale_ptr,
        w_scale_ptr,
        bias_ptr,
        y_ptr,
        M,
        N,
        K,
        x_stride,
        y_stride,
        up_rows,  # SILU_MUL: the row of W where the up half starts (I); else unused
        FP8: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU_MUL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SUB_K: tl.constexpr,  # the K of each dot (BLOCK_K, or FP8_PROMOTE_K for FP8): BLOCK_K // SUB_K per step
        EVEN_K: tl.constexpr,
        DOT_F32: tl.constexpr,
        PDL: tl.constexpr,
        w_addr,  # PREFETCH_LINES: W's address as an integer
        PREFETCH_LINES: tl.constexpr,  # L2 lines of each row of the band prefetched before the PDL wait
        LINE_ELEMS: tl.constexpr,  # elements of W in an L2 line
        ROW_LINES: tl.constexpr,  # lines a row of W spans up to the prefetch's end (<= PREFETCH_LINES)
    ):
        if PREFETCH_LINES:
            band = tl.minimum(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
            line = tl.minimum(tl.arange(0, PREFETCH_LINES), ROW_LINES - 1).to(tl.int64)
            elem_bytes: tl.constexpr = 128 // LINE_ELEMS
            addr = w_addr + (band[:, None] * K + line[None, :] * LINE_ELEMS) * elem_bytes
            _prefetch_l2(addr)
            if SILU_MUL:  # the up half's rows of the band too
                _prefetch_l2(addr + up_rows.to(tl.int64) * K * elem_bytes)
        _pdl_enter(PDL)
        pid = tl.program_id(0)
        dtype: tl.constexpr = y_ptr.dtype.element_ty
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = rows of W
        n_mask = cols < N
        m_mask = rows < M
        w_rows = tl.where(n_mask, cols, 0).to(tl.int64)  # out-of-range bands re-read row 0 (unstored)
        kk = tl.arange(0, SUB_K)
        x_ptrs = x_ptr + rows[:, None] * x_stride + kk[None, :]
        w_ptrs = w_ptr + w_rows[:, None] * K + kk[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if SILU_MUL:
            u_ptrs = w_ptrs + up_rows.to(tl.int64) * K
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            for j in tl.static_range(BLOCK_K // SUB_K):
                k_left = K - k0 - j * SUB_K
                acc = _band_dot(x_ptrs, w_ptrs, m_mask, acc, k_left, SUB_K, EVEN_K, DOT_F32, FP8)
                if SILU_MUL:
                    acc_up = _band_dot(x_ptrs, u_ptrs, m_mask, acc_up, k_left, SUB_K, EVEN_K, DOT_F32, FP8)
                    u_ptrs += SUB_K
                x_ptrs += SUB_K
                w_ptrs += SUB_K
        x_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        w_scale = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if FP8:
            x_scale = tl.load(x_scale_ptr + rows, mask=m_mask, other=0.0)
            w_scale = tl.load(w_scale_ptr + w_rows)
        out = _epilogue(acc, x_scale, w_scale, FP8)
        if SILU_MUL:
            out = _round_to(out, dtype)
            if FP8:
                w_scale = tl.load(w_scale_ptr + up_rows + w_rows)
            up = _round_to(_epilogue(acc_up, x_scale, w_scale, FP8), dtype)
            silu = _round_to(out / (1.0 + tl.exp(-out)), dtype)
            out = up * silu
        elif HAS_BIAS:
            if not FP8:  # the 16-bit product is rounded, then the bias added (FP8: added in float32)
                out = _round_to(out, dtype)
            out = out + tl.load(bias_ptr + w_rows).to(tl.float32)[:, None]
        y_ptrs = y_ptr + rows[None, :] * y_stride + cols[:, None]
        tl.store(y_ptrs, _round_to(out, dtype).to(dtype), mask=n_mask[:, None] & m_mask[None, :])


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    silu_mul: bool,
    cfg: GemvConfig | None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    m, k = x.shape
    if not 1 <= m <= KERNEL_ROWS:
        raise ValueError(f"x: {m} rows, the kernel takes 1 to {KERNEL_ROWS}")
    block_m = next(t for t in ROW_TILES if t >= m)
    n_w = weight.shape[0]
    n = n_w // 2 if silu_mul else n_w
    fp8 = weight.dtype == FP8_DTYPE
    if fp8 != (scale is not None):
        raise ValueError("scale: FP8 weights take their per-channel scale, 16-bit weights none")
    if x_fp8 is not None and (not fp8 or x_fp8[0].shape != x.shape or not x_fp8[0].is_contiguous()):
        raise ValueError("x_fp8: x's rows quantized ([M, K] contiguous), for FP8 weights only")
    cfg = cfg or config(k, block_m, silu_mul, fp8)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_k = min(cfg.block_k, triton.next_power_of_2(k))
    x_in, x_scale = x, y  # y: the pointer of an absent tensor (never read)
    if fp8:  # W8A8: the rows quantized per token as Fp8Linear quantizes them (or by the norm before)
        from engine.model.quant import quantize_rows_fp8

        x_in, x_scale = quantize_rows_fp8(x) if x_fp8 is None else x_fp8
        block_k = max(32, block_k)  # the FP8 dot's smallest K
    sub_k = min(block_k, FP8_PROMOTE_K) if fp8 else block_k
    prefetch_lines = row_lines = 0
    line_elems = L2_LINE // weight.element_size()
    pdl = pdl_args()
    if _PDL_PREFETCH_BYTES and pdl["PDL"] and not INTERPRET:
        rows_in_band = cfg.block_n * (2 if silu_mul else 1)
        row_lines = min(triton.cdiv(k, line_elems), max(1, _PDL_PREFETCH_BYTES // (rows_in_band * L2_LINE)))
        prefetch_lines = triton.next_power_of_2(row_lines)
    with device_guard(x):
        _skinny_kernel[(triton.cdiv(n, cfg.block_n),)](
            x_in, weight, x_scale, y if scale is None else scale, y if bias is None else bias, y,
            m, n, k, x_in.stride(0), y.stride(0), n if silu_mul else 0,
            FP8=fp8, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SUB_K=sub_k,
            EVEN_K=k % block_k == 0, DOT_F32=INTERPRET,
            w_addr=weight.data_ptr() if prefetch_lines else 0, PREFETCH_LINES=prefetch_lines,
            LINE_ELEMS=line_elems, ROW_LINES=max(row_lines, 1),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )  # fmt: skip
    return y


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    cfg: GemvConfig | None = None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (* scale) (+ bias) -> [M, N] in x's dtype (`supports(x, weight)`).
    ``x_fp8``: FP8 weights only, x's rows already quantized (`quantize_rows_fp8(x)`'s pair: float8 [M, K]
    contiguous, float32 scale [M, 1]), e.g. by `engine.kernels.fused.add_rms_norm_pair_fp8`."""
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    return _launch(x, weight, bias, scale, False, cfg, x_fp8)


def skinny_linear_silu_mul(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    scale: torch.Tensor | None = None,
    cfg: GemvConfig | None = None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """up * silu(gate) of x [M, K] @ gate_up [2I, K].T (* scale), gate the first I rows -> [M, I]
    (``x_fp8`` as for `skinny_linear`)."""
    if gate_up.shape[0] % 2:
        raise ValueError(f"gate_up: {gate_up.shape[0]} rows, not two halves")
    return _launch(x, gate_up, None, scale, True, cfg, x_fp8)


def skinny_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The spec, in torch ops: 16-bit weights, the float32 product rounded, then + bias rounded; FP8
    weights, `Fp8Linear`'s per-tensor path (rows quantized, product * row scale * column scale + bias in
    float32, rounded once)."""
    if weight.dtype == FP8_DTYPE:
        from engine.model.quant import quantize_rows_fp8_reference, scale_rows_cols_reference

        xq, x_scale = quantize_rows_fp8_reference(x)
        acc = xq.float() @ weight.float().T
        return scale_rows_cols_reference(acc, x_scale, scale.float(), bias, x.dtype)
    out = (x.float() @ weight.float().T).to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def skinny_linear_silu_mul_reference(
    x: torch.Tensor, gate_up: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    from engine.kernels.fused import silu_mul_reference

    return silu_mul_reference(skinny_linear_reference(x, gate_up, None, scale))
