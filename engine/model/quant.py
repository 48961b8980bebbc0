"""FP8 weights for the decoder's linear layers (`EngineConfig.quantization == "fp8"`).

Contract:
* `Fp8Linear` holds `weight` float8_e4m3fn [out, in] and `weight_scale` float32 [out] (per output
  channel: amax(|row|) / 448, 1 for an all-zero row) and an optional `bias` in the activation dtype; the
  layer computes `x @ (weight * weight_scale[:, None]).T + bias`. `Fp8Linear.from_linear(linear)`
  quantizes an `nn.Linear` round-to-nearest (`(w / scale).clamp(±448).to(float8_e4m3fn)`).
* Forward paths: which can run is decided once per layer when it is built (`select_kernel`); each call
  then picks by its number of rows M and by whether a CUDA graph is being captured, never by data (a
  graph replays the path it captured):
  - "scaled_mm" (CUDA; W8A8): the activations are quantized per token (row) to float8_e4m3fn
    (scale_a = max(amax(|x_row|) / 448, MIN_ACT_SCALE); one Triton kernel, torch ops without Triton),
    then one of two GEMMs:
    "tensorwise", for M <= TENSORWISE_MAX_M inside a CUDA graph capture (the decode graphs; the
    decoder's bound is `EngineConfig.fp8_tensorwise_rows`, applied by `set_tensorwise_rows_`; above it, with
    `EngineConfig.fp8_gemm_autotune`, the faster of the two per kind of layer and rows, timed at start-up by
    `autotune_tensorwise_rows_`):
    `torch._scaled_mm` with unit per-tensor scales into float32, then one epilogue kernel applying
    scale_a[m] * weight_scale[n] (+ bias). On H200 this GEMM read the weights ~2x as fast as bf16 at
    M <= 64, where the row-wise kernel was slower than bf16; but each call costs ~0.1 ms of CPU (eager
    full-size forwards at 128 tokens: 52 ms vs 30 ms row-wise), which graphs do not pay.
    "rowwise", otherwise (eager steps, prefill): `_scaled_mm` with scale_a [M, 1], scale_b [1, N] (bias
    fused where it takes it). Per-token activation rounding adds ~2.5% relative error to each output on
    top of the weights'.
  - "dequant" (CPU, other devices, or where `_scaled_mm` rejects the shape/dtype/GPU, e.g. K or N not a
    multiple of 16 or no FP8 tensor cores): `(x @ weight.to(x.dtype).T) * weight_scale + bias`, the
    activations unquantized (W8A16). This is the reference the CPU tests check.
  All are CUDA-graph capturable: no host sync, no data-dependent Python branching, outputs sized from
  shapes. `GLMV_FP8_DISABLE_SCALED_MM=1` (read when a layer is built) forces "dequant".
* `quantize_decoder_fp8_(model, include_lm_head=True) -> int` swaps, in place and one layer at a time
  (peak memory ~ the 16-bit model plus one layer), every decoder layer's self_attn.qkv_proj, o_proj,
  mlp.gate_up_proj, down_proj and the lm_head (unless tied to the input embeddings) for `Fp8Linear`,
  frees the 16-bit weights (on CUDA each goes back to the driver at once with `empty_cache`, so KV cache
  sizing that reads free memory sees it, unfragmented) and returns how many layers it swapped
  (already-FP8 layers are skipped: calling it twice swaps nothing). The vision tower and the embeddings
  stay as they are.
* `quantize_vision_fp8_(model) -> int` does the same to the ViT's linears (`vision_linear_names`: each
  block's qkv, proj, gate/up and down, the patch merger's three; `EngineConfig.vision_quantization`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.fused import HAS_TRITON, device_guard

if HAS_TRITON:  # else the torch ops quantize the activations
    import triton
    import triton.language as tl

    from engine.kernels.fused import _quantize_fp8

logger = logging.getLogger("glm-engine")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_ACT_SCALE = 1e-12  # floor of a token's activation scale (an all-zero row quantizes to 0)
WEIGHT_CHUNK_ELEMENTS = 1 << 26  # rows quantized per chunk: at most this many fp32 temporaries (256 MiB)
DISABLE_ENV = "GLMV_FP8_DISABLE_SCALED_MM"
TENSORWISE_MAX_M = 128  # rows (tokens) up to which CUDA graphs run the per-tensor GEMM + epilogue


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn [out, in], float32 scale [out]) per output channel, on its
    device, a chunk of rows at a time (no full float32 copy of a large weight)."""
    if weight.dim() != 2:
        raise ValueError(f"weight: shape {tuple(weight.shape)} must be [out_features, in_features]")
    out_features, in_features = weight.shape
    q = torch.empty((out_features, in_features), dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    rows = max(1, WEIGHT_CHUNK_ELEMENTS // max(in_features, 1))
    for start in range(0, out_features, rows):
        w = weight[start : start + rows].float()
        s = w.abs().amax(dim=1) / FP8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: scale 1, values 0
        q[start : start + rows] = (w / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[start : start + rows] = s
    return q, scale


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(weight.float() * weight_scale[:, None]) in `dtype` (for checks; the layers never build it)."""
    return (weight.float() * weight_scale.float()[:, None]).to(dtype)


def quantize_rows_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]): per-row dynamic quantization in torch ops."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=MIN_ACT_SCALE)
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols, min_scale,
        FP8_MAX_C: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
    ):  # fmt: skip
        """One program per row: scale = max(amax(|x|) / FP8_MAX, min_scale); q = clamp(x / scale).
        ONE_PASS (BLOCK >= n_cols): the row is read once and kept in registers."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX_C, min_scale)
            tl.store(scale_ptr + row, scale)
            tl.store(q_row + offs, _quantize_fp8(x, scale, FP8_MAX_C, q_ptr.dtype.element_ty), mask=mask)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX_C, min_scale)
            tl.store(scale_ptr + row, scale)
            for start in range(0, n_cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_row + offs, _quantize_fp8(x, scale, FP8_MAX_C, q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_rows_cols_kernel(
        acc_ptr, scale_a_ptr, scale_b_ptr, bias_ptr, out_ptr, n_cols, stride_acc, stride_out,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """out[m, n] = acc[m, n] * scale_a[m] * scale_b[n] (+ bias[n]), float32 math, stored in out's dtype."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        acc = tl.load(acc_ptr + row * stride_acc + offs, mask=mask, other=0.0)
        y = acc * tl.load(scale_a_ptr + row) * tl.load(scale_b_ptr + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


QUANT_ONE_PASS_MAX = 16384  # rows up to this width are quantized in one read


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (float8_e4m3fn [M, K] contiguous, float32 scale [M, 1]).

    One Triton kernel on CUDA (same numbers as `quantize_rows_fp8_reference`), torch ops elsewhere.
    """
    if not (HAS_TRITON and x.is_cuda) or x.numel() == 0 or x.stride(-1) != 1:
        return quantize_rows_fp8_reference(x)
    n_rows, n_cols = x.shape
    q = torch.empty((n_rows, n_cols), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    one_pass = n_cols <= QUANT_ONE_PASS_MAX
    block = triton.next_power_of_2(n_cols) if one_pass else 4096
    with device_guard(x):
        _quantize_rows_kernel[(n_rows,)](
            x, q, scale, x.stride(0), q.stride(0), n_cols, MIN_ACT_SCALE,
            FP8_MAX_C=FP8_MAX, BLOCK=block, ONE_PASS=one_pass, num_warps=max(1, min(16, block // 512)),
        )  # fmt: skip
    return q, scale


def scale_rows_cols_reference(
    acc: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """acc [M, N] float32 * scale_a [M, 1] * scale_b [N] (+ bias [N]) -> dtype."""
    y = acc * scale_a * scale_b[None, :]
    return (y if bias is None else y + bias.float()).to(dtype)


def scale_rows_cols(
    acc: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The epilogue of the per-tensor-scaled GEMM (see scale_rows_cols_reference): one Triton kernel on CUDA."""
    if not (HAS_TRITON and acc.is_cuda) or acc.numel() == 0 or acc.stride(-1) != 1:
        return scale_rows_cols_reference(acc, scale_a, scale_b, bias, dtype)
    n_rows, n_cols = acc.shape
    out = torch.empty((n_rows, n_cols), dtype=dtype, device=acc.device)
    block = min(1024, triton.next_power_of_2(n_cols))
    with device_guard(acc):
        _scale_rows_cols_kernel[(n_rows, triton.cdiv(n_cols, block))](
            acc, scale_a, scale_b, scale_b if bias is None else bias, out, n_cols, acc.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out


class Fp8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias with float8_e4m3fn weights (module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        """Empty layer; `dtype` is the activation (and bias, and output) dtype. Use `from_linear`."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        # the unit scales of the per-tensor GEMM (a buffer: it follows the layer's device)
        self.register_buffer(
            "unit_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False
        )
        self.kernel = "dequant"  # "scaled_mm" (an fp8 GEMM runs) | "dequant"; see select_kernel
        self.has_tensorwise = False  # the per-tensor GEMM runs here (select_kernel checked it)
        self.tensorwise_max_m = 0  # rows up to which graphs run the per-tensor GEMM + epilogue (0: never)
        # above tensorwise_max_m: (rows, per-tensor?) by ascending rows, timed at start-up
        # (`autotune_tensorwise_rows_`): a graph of m rows runs what the first entry of rows >= m says
        self.tensorwise_timed: tuple[tuple[int, bool], ...] = ()
        self.rowwise: str | None = None  # larger M: "fused_bias" | "plain" row-wise _scaled_mm | None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, select: bool = True) -> Fp8Linear:
        """Quantize `linear` (its device; activation dtype = its weight dtype); `select`: pick the kernel."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta", dtype=weight.dtype)
        layer.unit_scale = torch.ones((), dtype=torch.float32, device=weight.device)
        q, scale = quantize_weight_fp8(weight)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if select:
            layer.select_kernel()
        return layer

    @torch.no_grad()
    def select_kernel(self) -> str:
        """Decide once (now) which fp8 GEMMs this layer can run (module docstring: "tensorwise" for small M
        in CUDA graphs, "rowwise" otherwise, bias fused where `_scaled_mm` takes it): each is tried on this
        layer (M = 1 and 17; this also compiles the Triton kernels before any graph capture) and checked
        against the dequantized path. Without row-wise, eager steps use tensorwise up to
        TENSORWISE_MAX_M rows and the dequantized path above; with neither, "dequant". Call again after
        moving the layer to another device."""
        self.kernel, self.has_tensorwise, self.tensorwise_max_m, self.rowwise = "dequant", False, 0, None
        if not self.weight.is_cuda or not hasattr(torch, "_scaled_mm") or os.environ.get(DISABLE_ENV) == "1":
            return self.kernel
        errors = []
        try:
            self._check_path("tensorwise")
            self.has_tensorwise, self.tensorwise_max_m = True, TENSORWISE_MAX_M
        except Exception as exc:
            errors.append(f"tensorwise: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        for rowwise in ("fused_bias", "plain") if self.bias is not None else ("plain",):
            try:
                self.rowwise = rowwise
                self._check_path("rowwise")
                break
            except Exception as exc:
                self.rowwise = None
                errors.append(
                    f"rowwise {rowwise}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                )
        if self.tensorwise_max_m or self.rowwise:
            self.kernel = "scaled_mm"
        if self.kernel == "dequant" or (self.rowwise is None and errors):
            logger.warning(
                "[glm-engine] fp8: a [%d, %d] %s layer runs the dequantized path for %s (%s)",
                self.out_features,
                self.in_features,
                self.dtype,
                "every M" if self.kernel == "dequant" else f"M > {self.tensorwise_max_m}",
                "; ".join(errors),
            )
        return self.kernel

    def _check_path(self, path: str) -> None:
        gen = torch.Generator(device=self.weight.device).manual_seed(0)
        for m in (1, 17):
            x = torch.randn(m, self.in_features, device=self.weight.device, generator=gen).to(self.dtype)
            out = self._forward_fp8(x, path)
            if out.shape != (m, self.out_features) or out.dtype != self.dtype:
                raise RuntimeError(f"_scaled_mm returned {tuple(out.shape)} {out.dtype}")
        # numbers: the first rows against the dequantized path (W8A8 vs W8A16: a few % apart)
        rows = min(self.out_features, 256)
        w = self.weight[:rows].to(torch.float32) * self.weight_scale[:rows, None]
        ref = x.float() @ w.T
        if self.bias is not None:
            ref = ref + self.bias[:rows].float()
        err = (out[:, :rows].float() - ref).norm() / ref.norm().clamp(min=1e-12)
        if not bool(err < 0.25):  # construction time only: a host sync is fine here
            raise RuntimeError(f"_scaled_mm disagrees with the dequantized path (relative error {err:.3g})")

    def forward(
        self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x_fp8``: x's rows quantized already (`quantize_rows_fp8(x)`'s pair for x as [M, K], e.g. by
        `engine.kernels.fused.add_rms_norm_pair_fp8`), used where `takes_rows(x)`; else ignored."""
        path = self._path(x)
        if path == "dequant":
            return self.forward_dequant(x)
        return self._forward_fp8(x, path, x_fp8)

    def takes_rows(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` quantizes x's rows per token (W8A8), so that the op before may hand them
        over quantized (``x_fp8``)."""
        return self._path(x) != "dequant"

    def takes_rows_of(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """`takes_rows` for an x of ``num_rows`` rows, ``dtype`` and ``device`` not made yet."""
        return self._path_of(num_rows, dtype, device) != "dequant"

    def forward_rows(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The layer on rows quantized already (`quantize_rows_fp8`'s pair of some x [M, in_features] in
        this layer's dtype, where `takes_rows_of(M, ...)`): [M, out_features] in this layer's dtype."""
        path = self._path_of(q.shape[0], self.dtype, q.device)
        if path == "dequant":
            raise ValueError("forward_rows: this layer does not take quantized rows here (takes_rows_of)")
        return self._forward_fp8(q, path, (q, scale))

    def _path(self, x: torch.Tensor) -> str:
        """The GEMM `forward(x)` runs: by the layer's kernels, x's rows and whether a graph is being
        captured (see the module docstring)."""
        return self._path_of(x.numel() // self.in_features, x.dtype, x.device)

    def _path_of(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> str:
        if self.kernel != "scaled_mm" or device != self.weight.device or dtype != self.dtype:
            return "dequant"
        small = num_rows <= self.tensorwise_max_m or self._timed_tensorwise(num_rows)
        if small and (
            self.rowwise is None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        ):
            return "tensorwise"
        return "rowwise" if self.rowwise else "dequant"

    def _timed_tensorwise(self, num_rows: int) -> bool:
        for rows, tensorwise in self.tensorwise_timed:
            if num_rows <= rows:
                return tensorwise
        return False

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """W8A16 reference: (x @ weight.T in x's dtype) * weight_scale + bias. float16 dequantizes the
        weight in float32 first instead (x @ the unscaled fp8 values, up to 448 each, can overflow float16,
        and small scales are subnormal in float16)."""
        if x.dtype == torch.float16:
            out = F.linear(x, (self.weight.float() * self.weight_scale[:, None]).to(x.dtype))
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def _forward_fp8(
        self, x: torch.Tensor, path: str, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """W8A8: per-token fp8 activations (``x_fp8``, or quantized here), then the GEMM of `path`
        ("tensorwise" | "rowwise")."""
        shape = x.shape
        m = x.numel() // self.in_features
        if m == 0:
            return torch.zeros(*shape[:-1], self.out_features, dtype=self.dtype, device=x.device)
        if x_fp8 is None:
            x2 = x.reshape(-1, self.in_features)
            q, scale_a = quantize_rows_fp8(x2 if x2.stride(-1) == 1 else x2.contiguous())
        else:
            q, scale_a = x_fp8
        if path == "tensorwise":
            acc = torch._scaled_mm(
                q,
                self.weight.t(),  # column-major [in, out] view of the row-major weight
                scale_a=self.unit_scale,
                scale_b=self.unit_scale,
                out_dtype=torch.float32,
            )
            if isinstance(acc, tuple):  # torch < 2.5 returned (out, amax)
                acc = acc[0]
            out = scale_rows_cols(acc, scale_a, self.weight_scale, self.bias, self.dtype)
        else:
            out = torch._scaled_mm(
                q,
                self.weight.t(),
                scale_a=scale_a,
                scale_b=self.weight_scale.view(1, -1),
                bias=self.bias if self.rowwise == "fused_bias" else None,
                out_dtype=self.dtype,
            )
            if isinstance(out, tuple):
                out = out[0]
            if self.bias is not None and self.rowwise != "fused_bias":
                out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.dtype}, kernel={self.kernel}, "
            f"tensorwise_max_m={self.tensorwise_max_m}, rowwise={self.rowwise}"
        )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


DECODER_KINDS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")  # in a layer


def decoder_linear_names(model: nn.Module, include_lm_head: bool = True) -> list[str]:
    """Qualified names of the linears `quantize_decoder_fp8_` swaps (lm_head only if not tied)."""
    names = [
        f"language_model.layers.{i}.{kind}"
        for i in range(len(model.language_model.layers))
        for kind in DECODER_KINDS
    ]
    if include_lm_head and not _lm_head_is_tied(model):
        names.append("lm_head")
    return names


def _lm_head_is_tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "language_model", None), "embed_tokens", None)
    if head is None or embed is None:
        return False
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) or head.weight is embed.weight


def vision_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linears `quantize_vision_fp8_` swaps in a model (its ``visual``) or in a
    `VisionEncoder` itself: each ViT block's qkv, proj, gate/up and down, and the patch merger's proj,
    gate/up and down (the patch embedding and the downsample are convolutions and stay)."""
    visual, prefix = (model.visual, "visual.") if hasattr(model, "visual") else (model, "")
    names = []
    for i in range(len(visual.blocks)):
        block = f"{prefix}blocks.{i}"
        names += [
            f"{block}.attn.qkv",
            f"{block}.attn.proj",
            f"{block}.mlp.gate_up_proj",
            f"{block}.mlp.down_proj",
        ]
    return names + [f"{prefix}merger.{name}" for name in ("proj", "gate_up_proj", "down_proj")]


@torch.no_grad()
def quantize_decoder_fp8_(model: nn.Module, include_lm_head: bool = True) -> int:
    """Swap the decoder's linears for `Fp8Linear` in place (module docstring); returns how many."""
    return _swap_fp8_(model, decoder_linear_names(model, include_lm_head))


def set_tensorwise_rows_(model: nn.Module, rows: int) -> int:
    """Every decoder `Fp8Linear` of ``model`` that has the per-tensor GEMM (`Fp8Linear.has_tensorwise`) runs
    it in CUDA graphs for steps of up to ``rows`` rows, the row-wise GEMM above (where that runs; else the
    per-tensor GEMM eagerly up to ``rows`` too); returns how many layers. A prefill graph's rows are its token
    bucket; a mixed step's, its decodes and its chunks' bucket. A layer's own bound is `TENSORWISE_MAX_M` (128:
    the decode graphs); the engine sets `EngineConfig.fp8_tensorwise_rows`. Which GEMM is faster changes with
    the layer's shape and M (`benchmarks.gemv_bench --prefill-rows`)."""
    if rows < 0:
        raise ValueError(f"rows: {rows} must be 0 or more")
    count = 0
    for name in decoder_linear_names(model):
        layer = model.get_submodule(name)
        if isinstance(layer, Fp8Linear) and layer.has_tensorwise:
            layer.tensorwise_max_m = rows
            count += 1
    return count


@torch.no_grad()
def autotune_tensorwise_rows_(
    model: nn.Module,
    rows: list[int] | tuple[int, ...],
    timer: Callable[[list[Fp8Linear], str, int], float] | None = None,
) -> dict[str, dict[int, tuple[float, float]]]:
    """Time, for each kind of decoder layer (qkv, o, gate/up, down) whose FP8 layers have both GEMMs, and
    for each count of ``rows`` above the layers' bound (`set_tensorwise_rows_`), the kind's layers one after
    another (every decoder layer's: the weights stream from memory as in a step) with the per-tensor GEMM +
    epilogue and with the row-wise GEMM, on rows quantized already; CUDA graphs of up to that many rows (and
    more than the next smaller count) then run the faster (`Fp8Linear.tensorwise_timed`), as TensorRT-LLM
    picks a GEMM tactic per shape when it builds. ``timer(layers, path, m) -> ms``: a CUDA graph of them by
    default. Returns {kind: {rows: (per-tensor ms, row-wise ms)}}. Call before any graph is captured;
    calling again replaces the choices."""
    timer = timer or _time_layers
    out: dict[str, dict[int, tuple[float, float]]] = {}
    decoder = model.language_model.layers
    for kind in DECODER_KINDS:
        layers = [layer.get_submodule(kind) for layer in decoder]
        layers = [x for x in layers if isinstance(x, Fp8Linear) and x.has_tensorwise and x.rowwise]
        if not layers:
            continue
        bound = max(x.tensorwise_max_m for x in layers)
        times = {
            m: (timer(layers, "tensorwise", m), timer(layers, "rowwise", m))
            for m in sorted(set(rows))
            if m > bound
        }
        choice = tuple((m, tensorwise_ms < rowwise_ms) for m, (tensorwise_ms, rowwise_ms) in times.items())
        for layer in layers:
            layer.tensorwise_timed = choice
        out[kind] = times
    if out and timer is _time_layers:
        torch.cuda.empty_cache()  # the timing graphs' memory back to the driver before the KV cache is sized
    return out


def _time_layers(layers: list[Fp8Linear], path: str, m: int, repeats: int = 3) -> float:
    """ms of ``layers`` one after another on the same [m, in] rows (quantized once) with the GEMM of ``path``,
    replayed from a CUDA graph as the engine's steps are (eagerly the per-tensor path's ~0.1 ms of CPU a
    call would be timed instead): the least of ``repeats`` replays after a warm-up run and one replay."""
    first = layers[0]
    x = torch.randn(m, first.in_features, device=first.weight.device, dtype=first.dtype)
    rows = quantize_rows_fp8(x)

    def run() -> None:
        for layer in layers:
            layer._forward_fp8(x, path, rows)

    best = float("inf")
    with torch.cuda.device(x.device):  # streams and the graph on the layers' GPU, whichever is current
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # cuBLAS's workspace and its choice for the shape, before the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        del graph
    return best


@torch.no_grad()
def quantize_vision_fp8_(model: nn.Module) -> int:
    """Swap the ViT's linears (`vision_linear_names`) for `Fp8Linear` in place, as `quantize_decoder_fp8_`
    does the decoder's; returns how many. Where the row-wise GEMM runs, a layer runs it in CUDA graphs too
    (a small image's batch is within `TENSORWISE_MAX_M` rows), so that a ViT graph's replay gives what its
    eager forward gives."""
    return _swap_fp8_(model, vision_linear_names(model), rowwise_in_graphs=True)


def _swap_fp8_(model: nn.Module, names: list[str], rowwise_in_graphs: bool = False) -> int:
    count = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if isinstance(linear, Fp8Linear):
            continue
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: {type(linear).__name__} is not an nn.Linear")
        layer = Fp8Linear.from_linear(linear)
        if rowwise_in_graphs and layer.rowwise is not None:
            layer.tensorwise_max_m = 0
        setattr(parent, attr, layer)
        is_cuda = linear.weight.is_cuda
        del linear  # the last reference: the 16-bit weight is freed before the next layer is quantized
        if is_cuda:
            # Give the freed 16-bit weight (and the temporaries) back to the driver now: the next layer's
            # fp8 weight then gets a segment of its own instead of half of this one, which would stay
            # reserved (3 GB of the full-size model's 20 GB did) and never reach the KV cache.
            torch.cuda.empty_cache()
        count += 1
    return count


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "TENSORWISE_MAX_M",
    "autotune_tensorwise_rows_",
    "Fp8Linear",
    "decoder_linear_names",
    "dequantize_weight",
    "quantize_decoder_fp8_",
    "quantize_vision_fp8_",
    "quantize_rows_fp8",
    "quantize_rows_fp8_reference",
    "quantize_weight_fp8",
    "scale_rows_cols",
    "scale_rows_cols_reference",
    "set_tensorwise_rows_",
    "vision_linear_names",
    "weight_bytes",
]
