"""Rotary position embeddings of GLM-4.6V: 3-D M-RoPE positions, decoder rotary, ViT 2-D rotary.

Contracts:
* `get_mrope_positions(input_ids, image_grid_thw, model_config) -> (positions [3, L] int64, delta)` equals
  transformers' `Glm4vModel.get_rope_index` for a prompt with 0..N images: text tokens get t=h=w=running
  index; an image block (a run of `image_token_id`) starting at s with LLM grid (h', w') gets
  t=s, h=s+row, w=s+col; the next text token resumes at s+max(h', w'). `delta = max(positions)+1-L`;
  output token i (i >= L) has position i + delta in all three rows.
* Decoder rotary (`MRotaryEmbedding`): only the first `rotary_dim` dims of a head rotate, as INTERLEAVED
  pairs (2i, 2i+1); frequency slot i uses the position row chosen by `mrope_section` (t, h, w in order).
  cos/sin are computed in float32, shape [T, rotary_dim/2]; the decoder casts them to the activations'
  dtype and rotates in that dtype, as transformers does.
* ViT rotary (`vision_rotary_cos_sin` + `apply_rotary_half`): per patch (h, w) in merge-window order; the
  full head rotates with the rotate-half layout; frequencies h-half then w-half, duplicated.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig


def get_mrope_positions(
    input_ids: list[int] | torch.Tensor, image_grid_thw: torch.Tensor | None, model_config: ModelConfig
) -> tuple[torch.Tensor, int]:
    """3-D M-RoPE positions [3, L] int64 (CPU) and the decode delta of one prompt.

    Images are matched to runs of `image_token_id` in order; each image's run must have exactly
    t*h*w/merge**2 tokens. Adjacent images without a separator are split by these counts.
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    merge = model_config.vision_config.spatial_merge_size
    image_id = model_config.image_token_id
    num_image_tokens = ids.count(image_id)
    expected = sum(model_config.num_image_tokens(g) for g in grids)
    if num_image_tokens != expected:
        raise ValueError(
            f"input_ids: {num_image_tokens} image tokens (id {image_id}) but image_grid_thw "
            f"{grids} needs {expected}"
        )

    rows: list[torch.Tensor] = []  # each [3, n]
    pos = 0  # running position
    i = 0
    image_idx = 0
    length = len(ids)
    while i < length:
        if ids[i] != image_id:
            j = i
            while j < length and ids[j] != image_id:
                j += 1
            rows.append(torch.arange(pos, pos + j - i, dtype=torch.int64).expand(3, -1))
            pos += j - i
            i = j
            continue
        t, h, w = grids[image_idx]
        image_idx += 1
        llm_h, llm_w = h // merge, w // merge
        # Like transformers: each frame is laid out at the same start (t index * 1 + s is only used
        # for t > 1, which a still image never has).
        tt = torch.arange(t, dtype=torch.int64).view(-1, 1, 1).expand(t, llm_h, llm_w) + pos
        hh = torch.arange(llm_h, dtype=torch.int64).view(1, -1, 1).expand(t, llm_h, llm_w) + pos
        ww = torch.arange(llm_w, dtype=torch.int64).view(1, 1, -1).expand(t, llm_h, llm_w) + pos
        rows.append(torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]))
        n = t * llm_h * llm_w
        i += n
        pos += max(h, w) // merge
    if not rows:
        return torch.zeros(3, 0, dtype=torch.int64), 0
    positions = torch.cat(rows, dim=1)  # [3, L]
    delta = int(positions.max()) + 1 - length
    return positions, delta


class MRotaryEmbedding(torch.nn.Module):
    """Decoder M-RoPE: positions [3, T] -> (cos, sin) [T, rotary_dim/2] float32."""

    def __init__(self, model_config: ModelConfig) -> None:
        super().__init__()
        rotary_dim = model_config.rotary_dim
        self.rotary_dim = rotary_dim
        self.inv_freq = 1.0 / (
            model_config.rope_theta
            ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim)
        )  # [rotary_dim/2]; explicit device: the model may be built under torch.device("meta")
        # Which position row (0=t, 1=h, 2=w) feeds each frequency slot.
        self.section_rows = torch.cat(
            [
                torch.full((n,), k % 3, dtype=torch.int64, device="cpu")
                for k, n in enumerate(model_config.mrope_section)
            ]
        )  # [rotary_dim/2]
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self.inv_freq.to(device), self.section_rows.to(device))
        return self._device_cache[device]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, section_rows = self._tables(positions.device)
        if positions.dim() == 1:
            positions = positions.expand(3, -1)
        slot_positions = positions[section_rows].T.float()  # [T, rotary_dim/2]
        freqs = slot_positions * inv_freq  # [T, rotary_dim/2]
        return freqs.cos(), freqs.sin()


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of x [T, heads, head_dim] in adjacent pairs (2i, 2i+1).

    cos/sin: [T, rotary_dim/2]; the arithmetic runs in their dtype (pass them in x's dtype to match
    transformers), the result is in x's dtype.
    """
    rotary_dim = 2 * cos.shape[-1]
    x_rot = x[..., :rotary_dim].to(cos.dtype).unflatten(-1, (-1, 2))  # [T, heads, rotary_dim/2, 2]
    x0, x1 = x_rot[..., 0], x_rot[..., 1]  # [T, heads, rotary_dim/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, rotary_dim/2]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def vision_patch_positions(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(h, w) patch coordinates [N, 2] int64 in the processor's merge-window order, all images/frames."""
    out = []
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(-1, 1).expand(h, w)
        ww = torch.arange(w).view(1, -1).expand(h, w)
        # (window row, in-window row, window col, in-window col) -> (window row, window col, in-row, in-col)
        hh = hh.reshape(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
        ww = ww.reshape(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    if not out:
        return torch.zeros(0, 2, dtype=torch.int64)
    return torch.cat(out)  # [N, 2]


def vision_rotary_cos_sin(
    hw_positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT 2-D rotary: hw_positions [N, 2] -> (cos, sin) [N, head_dim] float32 (rotate-half layout)."""
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, spatial_dim, 2, dtype=torch.float32, device=hw_positions.device) / spatial_dim)
    )  # [head_dim/4]
    freqs = hw_positions[..., None].float() * inv_freq  # [N, 2, head_dim/4]
    freqs = freqs.flatten(1)  # [N, head_dim/2]: h-half then w-half
    freqs = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
    return freqs.cos(), freqs.sin()


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the full head of x [N, heads, head_dim] (rotate-half layout); cos/sin [N, head_dim]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)
