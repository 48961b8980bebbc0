"""engine.kernels.vision: the vision rotary kernel equals its torch reference, and the ViT is unchanged.

On CPU the kernel runs through Triton's interpreter in a fresh Python (TRITON_INTERPRET=1 must be set
before triton is imported): this file executes itself. Tolerances: float32 1e-5; bfloat16 at most one bf16
step (the GPU may contract the float32 product and sum into one fused multiply-add).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import bf16_ulps, main, run_interpreted  # noqa: E402


def check_rotary(device: str) -> None:
    from engine.kernels import vision as vision_kernels
    from engine.model.rope import vision_patch_positions, vision_rotary_cos_sin

    for dtype in (torch.float32, torch.bfloat16):
        for num_patches, heads, head_dim in ((4, 2, 16), (37, 3, 32), (64, 12, 128)):
            gen = torch.Generator().manual_seed(num_patches)
            qkv = torch.randn(num_patches, 3, heads, head_dim, generator=gen).to(device, dtype)
            side = int(num_patches**0.5)
            grid = torch.tensor([[1, side * 2, side * 2]])
            positions = vision_patch_positions(grid, 2)[:num_patches].to(device)
            cos, sin = vision_rotary_cos_sin(positions, head_dim, 10000.0)
            ref = vision_kernels.apply_rotary_half_qk_reference_(qkv.clone(), cos, sin)
            saved = vision_kernels.apply_rotary_half_qk_reference_
            vision_kernels.apply_rotary_half_qk_reference_ = None  # a fallback would fail: the kernel ran
            try:
                got = vision_kernels.apply_rotary_half_qk_(qkv.clone(), cos, sin)
            finally:
                vision_kernels.apply_rotary_half_qk_reference_ = saved
            assert torch.equal(got[:, 2], qkv[:, 2]), "v changed"
            if dtype == torch.float32:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            else:
                assert int(bf16_ulps(got, ref).max()) <= 1, (num_patches, heads, head_dim)


def check_vision_encoder(device: str) -> None:
    """The tiny ViT with the kernels (rms_norm, silu_mul, rotary) equals the torch path."""
    import tempfile

    from build_engine.checkpoint import make_tiny_checkpoint
    from engine.config import ModelConfig
    from engine.kernels import fused as kernels
    from engine.kernels import vision as vision_kernels
    from engine.model.vision import VisionEncoder

    with tempfile.TemporaryDirectory() as tmp:
        config = ModelConfig.from_pretrained(
            make_tiny_checkpoint(Path(tmp) / "tiny", "tiny", seed=0)
        ).vision_config
    torch.manual_seed(0)
    encoder = VisionEncoder(config).to(device).eval()
    for name, p in encoder.named_parameters():  # attention logits far from uniform: rotary matters
        torch.nn.init.normal_(p, std=0.5 if "attn" in name else 0.2)
    pixels = torch.randn(2 * 16 + 24, config.patch_dim, device=device)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 4, 6]])
    with_kernels = encoder.encode(pixels, grid)
    os.environ["GLMV_DISABLE_TRITON_KERNELS"] = "1"
    assert not kernels.use_triton(pixels) and not vision_kernels.use_triton(pixels)
    without = encoder.encode(pixels, grid)
    torch.testing.assert_close(with_kernels, without, rtol=1e-5, atol=1e-5)
    # the rotary is not a no-op here: dropping it changes the output
    import engine.model.vision as vision

    saved = vision.apply_rotary_half_qk_
    vision.apply_rotary_half_qk_ = lambda qkv, cos, sin: qkv
    try:
        unrotated = encoder.encode(pixels, grid)
    finally:
        vision.apply_rotary_half_qk_ = saved
    assert (unrotated - without).abs().max() > 1e-3


CHECKS = {"rotary": check_rotary, "vision_encoder": check_vision_encoder}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_vision_kernels_in_interpreter(check: str) -> None:
    run_interpreted(__file__, check)


@pytest.mark.gpu
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_vision_kernels_on_cuda(check: str) -> None:
    CHECKS[check]("cuda")


if __name__ == "__main__":
    main(CHECKS)
