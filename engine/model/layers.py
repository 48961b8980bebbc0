"""Layers the ViT and the decoder share: RMSNorm and the MLP activations by config name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.fused import rms_norm

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (transformers' Glm4vRMSNorm order)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # one fused kernel on CUDA (engine.kernels.fused)
