"""Layers the ViT and the decoder share: RMSNorm, the MLP activations by config name, and `linear`, the
decoder's matmul of a few token rows through the skinny kernel (`engine.kernels.gemv`) where a layer
allows it (`decode_gemv` set on the layer by `Glm4vModel.set_decode_gemv`). `takes_fp8_rows(layer, x)`:
whether that call quantizes x's rows to FP8 (the kernel on FP8 weights, or an FP8 layer's own W8A8 GEMM
for more rows), so the op before may hand it x's rows quantized (``x_fp8``) instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import gemv
from engine.kernels.fused import rms_norm, silu_mul, silu_mul_fp8

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (transformers' Glm4vRMSNorm order)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # one fused kernel on CUDA (engine.kernels.fused)


def _gemv_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """layer's weight where `linear` runs the skinny kernel for x (2-D), else None."""
    if not getattr(layer, "decode_gemv", False) or x.dim() != 2:
        return None
    weight = layer.weight
    return weight if gemv.supports(x, weight) else None


def takes_fp8_rows(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `linear(layer, x)` (or `linear_silu_mul`) quantizes x's rows to FP8: the skinny kernel on
    FP8 weights, or an FP8 layer's W8A8 GEMM (`Fp8Linear.takes_rows`). The dtype first: a 16-bit model
    asks this twice a layer."""
    if layer.weight.dtype != gemv.FP8_DTYPE:
        return False
    if _gemv_weight(layer, x) is not None:
        return True
    takes_rows = getattr(layer, "takes_rows", None)
    return takes_rows is not None and takes_rows(x)


def _forward(
    layer: nn.Module, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """layer(x), with x's quantized rows where given (only an FP8 layer that takes them is given any)."""
    return layer(x) if x_fp8 is None else layer(x, x_fp8)


def linear(
    layer: nn.Module, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """layer(x) for an nn.Linear or an FP8 layer (engine.model.quant.Fp8Linear, whose per-tensor path the
    kernel computes); rows up to gemv.MAX_ROWS through the skinny kernel where the layer has `decode_gemv`
    set. ``x_fp8``: x's rows quantized (`quantize_rows_fp8(x)`), used where `takes_fp8_rows`."""
    weight = _gemv_weight(layer, x)
    if weight is None:
        return _forward(layer, x, x_fp8)
    if weight.dtype != gemv.FP8_DTYPE:
        x_fp8 = None
    return gemv.skinny_linear(x, weight, layer.bias, getattr(layer, "weight_scale", None), x_fp8=x_fp8)


def linear_silu_mul(
    layer: nn.Module, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """up * silu(gate) of a gate/up projection: one skinny kernel where `linear` would run it (and the
    layer has no bias), else `silu_mul(layer(x))`; ``x_fp8`` as for `linear`."""
    weight = _gemv_weight(layer, x)
    if weight is None or layer.bias is not None:
        return silu_mul(_forward(layer, x, x_fp8))
    if weight.dtype != gemv.FP8_DTYPE:
        x_fp8 = None
    return gemv.skinny_linear_silu_mul(x, weight, getattr(layer, "weight_scale", None), x_fp8=x_fp8)


def silu_mlp(
    gate_up: nn.Module,
    down: nn.Module,
    x: torch.Tensor,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """down(up * silu(gate)) of x [T, hidden] (``x_fp8`` as for `linear`, for gate/up). Where gate/up is no
    skinny kernel and an FP8 down projection quantizes its rows for its own GEMM (more rows than the skinny
    kernel takes, or none), the product and its quantization are one kernel (`silu_mul_fp8`) and the down
    projection takes the rows; else `linear(down, linear_silu_mul(gate_up, x, x_fp8))`. The same numbers."""
    takes_rows_of = getattr(down, "takes_rows_of", None)
    if (
        takes_rows_of is not None
        and x.dim() == 2
        and gate_up.bias is None
        and _gemv_weight(gate_up, x) is None
        and not (getattr(down, "decode_gemv", False) and x.shape[0] <= gemv.FP8_MAX_ROWS)
        and takes_rows_of(x.shape[0], x.dtype, x.device)
    ):
        return down.forward_rows(*silu_mul_fp8(_forward(gate_up, x, x_fp8)))
    return linear(down, linear_silu_mul(gate_up, x, x_fp8))
