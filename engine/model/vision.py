"""GLM-4.6V vision tower: ViT + spatial downsample + patch merger.

Contract:
* `VisionEncoder.encode(pixel_values [N, patch_dim], grid_thw [n, 3]) -> [N / merge**2, out_hidden_size]`
  encodes the patches of n images (of any requests) in one packed forward; `start` + `advance` run the same
  forward a few blocks at a time (eagerly) with an equal result. Rows of pixel_values are in the
  processor's order (image after image, merge-window order inside an image; patch_dim = 3*2*14*14 = 1176);
  the output rows are the LLM image-token embeddings in the same order (image i owns
  t*h*w / merge**2 consecutive rows). Attention is block-diagonal: one block per image (per frame).
* Parameter names equal the HF checkpoint's `model.visual.*` names without the `model.visual.` prefix,
  except the fused `mlp.gate_up_proj` / `merger.gate_up_proj` (gate rows first), built at load by
  `engine.model.weights`.
* Matches transformers' `Glm4vVisionModel(...).pooler_output` (float32 to ~1e-5).
* `PatchNormalizer` turns raw uint8 RGB (the resized images, flat, or already patchified; no rescale or
  normalize: 8x fewer bytes between processes than float32 patches) into pixel_values on the encoder's
  device with the image processor's float32 arithmetic (`x * rescale_factor`, then `(x - mean) / std` per
  channel); the patchify runs on the device too.
* `VisionEncoder.set_attention(choice)` picks the SDPA kernel of the blocks' attention on CUDA (one of
  `VISION_ATTENTION_CHOICES`; `EngineConfig.vision_attention`): "flash" (FlashAttention-2), "cudnn"
  (cuDNN's fused attention first, flash where cuDNN cannot take the shape), or "auto": cuDNN for the
  image lengths whose cuDNN plan `build_attention_plan` has built on the calling thread, flash for the
  others (see `AttentionKernels`). CPU runs SDPA's own choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.config import VISION_ATTENTION_CHOICES, VisionConfig
from engine.kernels.fused import silu_mul
from engine.kernels.vision import apply_rotary_half_qk_
from engine.model.layers import ACTIVATIONS, RMSNorm
from engine.model.rope import vision_patch_positions, vision_rotary_cos_sin


class PatchNormalizer:
    """uint8 RGB -> float32 pixel_values [N, patch_dim] on the encoder's device.

    Takes either patches [N, patch_dim] (channel-major rows: 3 x temporal x p x p) or the resized images
    flat [sum(H*W*3)] with their grid (each image [H, W, 3] row-major, H = gh * p, W = gw * p, t = 1),
    which it patchifies on the device like `engine.processing.preprocess.Preprocessor.patchify`."""

    def __init__(
        self,
        patch_dim: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        rescale_factor: float,
        device: torch.device | str = "cpu",
        patch_size: int = 14,
        merge_size: int = 2,
        temporal_patch_size: int = 2,
    ) -> None:
        channels = len(image_mean)
        if len(image_std) != channels or patch_dim % channels:
            raise ValueError(f"image_mean/image_std: {channels} channels do not divide patch_dim {patch_dim}")
        per_channel = patch_dim // channels
        self.patch_dim = patch_dim
        self.patch, self.merge, self.temporal = patch_size, merge_size, temporal_patch_size
        self.rescale = torch.tensor(rescale_factor, dtype=torch.float32, device=device)
        self.mean = torch.tensor(image_mean, dtype=torch.float32).repeat_interleave(per_channel).to(device)
        self.std = torch.tensor(image_std, dtype=torch.float32).repeat_interleave(per_channel).to(device)

    def rgb_size(self, grid_thw: torch.Tensor) -> int:
        """Bytes of the flat RGB images of this grid."""
        return int(sum(h * w for _, h, w in grid_thw.tolist())) * self.patch**2 * 3

    def patchify(self, image_rgb: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Flat uint8 RGB images -> uint8 patches [N, patch_dim] on the device."""
        p, m, t = self.patch, self.merge, self.temporal
        rgb = image_rgb.to(self.mean.device, non_blocking=True)
        parts, offset = [], 0
        for _, gh, gw in grid_thw.tolist():
            size = gh * p * gw * p * 3
            x = rgb[offset : offset + size].view(gh // m, m, p, gw // m, m, p, 3)
            offset += size
            x = x.permute(0, 3, 1, 4, 6, 2, 5).unsqueeze(5)  # [gh/m, gw/m, m, m, 3, 1, p, p]
            parts.append(x.expand(-1, -1, -1, -1, -1, t, -1, -1).reshape(gh * gw, self.patch_dim))
        if not parts:
            return torch.zeros(0, self.patch_dim, dtype=torch.uint8, device=self.mean.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def __call__(self, patches: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        if patches.dtype != torch.uint8:
            return patches.to(self.mean.device, torch.float32)  # already pixel values
        if patches.ndim == 1:
            if grid_thw is None:
                raise ValueError("image_grid_thw: needed to patchify flat RGB images")
            patches = self.patchify(patches, grid_thw)
        if patches.ndim != 2 or patches.shape[1] != self.patch_dim:
            raise ValueError(f"image_pixels: shape {tuple(patches.shape)} must be [N, {self.patch_dim}]")
        x = patches.to(self.mean.device, non_blocking=True).to(torch.float32) * self.rescale
        return (x - self.mean) / self.std


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (t, p, p) == a matmul on the flattened (C, t, p, p) rows."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Module()
        shape = (config.hidden_size, config.in_channels, config.temporal_patch_size)
        self.proj.weight = nn.Parameter(torch.empty(*shape, config.patch_size, config.patch_size))
        self.proj.bias = nn.Parameter(torch.empty(config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # [hidden, patch_dim]
        return F.linear(pixel_values.to(weight.dtype), weight, self.proj.bias)  # [N, hidden]


class PositionEmbedding(nn.Module):
    """Learned square table, bicubically resampled (grid_sample) to each image's patch grid."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding(config.num_position_embeddings, config.hidden_size)

    def forward(self, hw_positions: torch.Tensor, patch_hw: torch.Tensor) -> torch.Tensor:
        """hw_positions [N, 2] patch (h, w); patch_hw [N, 2] grid (H, W) of each patch's image -> [N, hidden]."""
        table = self.position_embedding.weight  # [side*side, hidden]
        side = int(table.shape[0] ** 0.5)
        table_2d = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, hidden, side, side]
        norm = (hw_positions.float() + 0.5) / patch_hw.float() * 2 - 1  # [N, 2] (h, w) in [-1, 1]
        grid = norm.flip(-1)[None, :, None, :]  # [1, N, 1, 2] as (x=w, y=h)
        sampled = F.grid_sample(table_2d, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return sampled[0, :, :, 0].T.to(table.dtype)  # [N, hidden]


# The SDPA kernels each fixed `VisionEncoder.set_attention` choice lets the ViT use on CUDA, in priority
# order ("auto" picks one of the two per image length: AttentionKernels).
VISION_ATTENTION_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ],
}
assert (*VISION_ATTENTION_BACKENDS, "auto") == VISION_ATTENTION_CHOICES


class AttentionKernels:
    """The SDPA kernels of the ViT's attention for an image (frame) of n patches, shared by the blocks.

    "flash" and "cudnn" are fixed lists. "auto" serves cuDNN's faster kernel without its stall: cuDNN
    builds an execution plan for every new sequence length (tens to hundreds of ms), and keeps its plans
    per thread. So a length runs cuDNN only once `planned` holds it, that is once `VisionEncoder.
    build_attention_plan` built its plan on the thread that serves (the engine loop does that while it
    has no request); until then it runs flash and waits in `pending` (oldest first, at most MAX_PENDING).
    A length cuDNN cannot take goes to `refused` and stays on flash."""

    MAX_PENDING = 64

    def __init__(self, choice: str = "flash") -> None:
        if choice not in VISION_ATTENTION_CHOICES:
            raise ValueError(
                f"vision_attention: {choice!r} must be one of {', '.join(VISION_ATTENTION_CHOICES)}"
            )
        self.choice = choice
        self.planned: set[int] = set()
        self.refused: set[int] = set()
        self.pending: dict[int, None] = {}

    def backends(self, n: int) -> list:
        """The kernels, in priority order, for one attention call over ``n`` patches."""
        if self.choice != "auto":
            return VISION_ATTENTION_BACKENDS[self.choice]
        if n in self.planned:
            return VISION_ATTENTION_BACKENDS["cudnn"]
        if n not in self.refused and n not in self.pending and len(self.pending) < self.MAX_PENDING:
            self.pending[n] = None
        return VISION_ATTENTION_BACKENDS["flash"]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.kernels = AttentionKernels()  # on CUDA; VisionEncoder.set_attention shares one among the blocks

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]
    ) -> torch.Tensor:
        num_patches = x.shape[0]
        qkv = self.qkv(x).view(num_patches, 3, self.num_heads, self.head_dim)  # [N, 3, heads, head_dim]
        apply_rotary_half_qk_(qkv, cos, sin)  # q and k rotated in place
        q, k, v = qkv.unbind(1)  # [N, heads, head_dim]
        out = torch.empty_like(q)
        start = 0
        with contextlib.ExitStack() as stack:
            current = None  # the kernel list in force: a context is entered only where it changes
            for n in seqlens:  # block-diagonal: one image (frame) at a time
                backends = self.kernels.backends(n)
                if x.is_cuda and backends is not current:
                    stack.close()
                    stack.enter_context(sdpa_kernel(backends, set_priority=True))
                    current = backends
                # 4-D [1, heads, n, head_dim]: 3-D inputs fall back to the unfused math kernel on CUDA.
                qi, ki, vi = (t[start : start + n].transpose(0, 1)[None] for t in (q, k, v))
                out[start : start + n] = F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
                start += n
        return self.proj(out.view(num_patches, -1))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused in one matmul (gate rows first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACTIVATIONS[act]
        self.is_silu = act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_silu:  # one fused kernel on CUDA, same product as below
            return self.down_proj(silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        # The ViT MLP width is out_hidden_size, not intermediate_size (that one is the merger's).
        self.mlp = SwiGLU(config.hidden_size, config.out_hidden_size, config.hidden_act)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Linear -> LayerNorm -> exact GELU -> SwiGLU, one vector per LLM image token."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.out_hidden_size
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_up_proj = nn.Linear(dim, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, dim, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


LAYOUT_CACHE_PATCHES = 65536  # patches of position embeddings + rotary tables VisionEncoder keeps


class VisionEncoder(nn.Module):
    """The whole vision tower; see the module docstring for the `encode` contract."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.post_conv_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embeddings = PositionEmbedding(config)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.depth)])
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        merge = config.spatial_merge_size
        self.downsample = nn.Conv2d(
            config.hidden_size, config.out_hidden_size, kernel_size=merge, stride=merge
        )
        self.merger = PatchMerger(config)
        self.graphs: TowerGraphs | None = None  # enable_cuda_graphs()
        self.segment_graphs: TowerGraphs | None = None  # the same, for `advance`'s block ranges
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # _layout's cache

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values, grid_thw)

    def set_attention(self, choice: str) -> None:
        """The blocks' attention kernel on CUDA: one of `VISION_ATTENTION_CHOICES`. Graphs captured
        before keep the kernel they were captured with, so call it before any encode."""
        kernels = AttentionKernels(choice)
        for block in self.blocks:
            block.attn.kernels = kernels

    @property
    def attention_kernels(self) -> AttentionKernels:
        return self.blocks[0].attn.kernels if len(self.blocks) else AttentionKernels()

    @torch.no_grad()
    def build_attention_plan(self) -> int | None:
        """With "auto": build cuDNN's plan for the oldest pending image length on this thread (one attention
        call of that shape and layout, on zeros), so that length runs cuDNN from now on; the graphs that
        hold it are dropped (they keep the kernel they were captured with) and captured again on later
        use. Returns the length, or None when none is pending. Call it on the thread that encodes."""
        kernels = self.attention_kernels
        if not kernels.pending:
            return None
        n = next(iter(kernels.pending))
        del kernels.pending[n]
        # the activations' dtype and device (a norm's weight: the linears' may be FP8, which cuDNN refuses)
        config, weight = self.config, self.blocks[0].norm1.weight
        qkv = torch.zeros(n, 3, config.num_heads, config.head_dim, device=weight.device, dtype=weight.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in qkv.unbind(1))  # the layout of VisionAttention's calls
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if weight.is_cuda else contextlib.nullcontext():
                F.scaled_dot_product_attention(q, k, v)
        except RuntimeError:  # cuDNN does not take this shape: flash it stays
            kernels.refused.add(n)
            return n
        kernels.planned.add(n)
        for graphs in (self.graphs, self.segment_graphs):
            if graphs is not None:
                graphs.forget(lambda seqlens: n in seqlens)
        return n

    def enable_cuda_graphs(
        self, max_graphs: int = 8, max_patches: int = 16384, max_segment_graphs: int = 24
    ) -> None:
        """Replay the blocks + merger of `encode` from CUDA graphs, one per batch layout (the images'
        patch counts), captured on first use; and a forward split by `advance` from graphs of its block
        ranges, one per (layout, range), captured the second time that range of that layout runs (the
        first runs eagerly: an image size met once costs no captures). CUDA only; see TowerGraphs. The
        two kinds share one memory pool (they replay one at a time)."""
        self.graphs = TowerGraphs(self._tower, max_graphs, max_patches)
        self.segment_graphs = TowerGraphs(
            self._tower, max_segment_graphs, max_patches, capture_after=1, share_pool_with=self.graphs
        )

    def _tower(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        seqlens: list[int],
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        """Blocks ``start`` to ``end`` (default: all) of the ViT: [N, hidden] -> [N, hidden]; when they
        include the last block, then the final norm, spatial downsample and merger -> [N / merge**2, out]."""
        end = len(self.blocks) if end is None else end
        for block in self.blocks[start:end]:
            x = block(x, cos, sin, seqlens)
        return self._head(x) if end == len(self.blocks) else x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, spatial downsample and merger of the last block's output."""
        config = self.config
        merge = config.spatial_merge_size
        x = self.post_layernorm(x)
        x = x.view(-1, merge, merge, x.shape[-1]).permute(0, 3, 1, 2)  # [N/4, hidden, merge, merge]
        x = self.downsample(x).view(-1, config.out_hidden_size)  # [N/4, out_hidden]
        return self.merger(x)

    def _layout(
        self, h: int, w: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position embeddings [h*w, hidden], rotary cos, sin [h*w, head_dim]) of one frame of an h x w
        patch grid, in merge-window order. They depend on the grid alone (and the position table), so they
        are kept per grid: the bicubic resampling is a slow kernel (~2.5 ms per image on an H100). At most
        `LAYOUT_CACHE_PATCHES` patches' worth are kept, least recently used dropped first."""
        table = self.embeddings.position_embedding.weight
        key = (h, w, table.data_ptr(), table._version, device)
        cached = self._layouts.pop(key, None)
        if cached is None:
            config = self.config
            grid = torch.tensor([[1, h, w]], dtype=torch.int64)
            hw_positions = vision_patch_positions(grid, config.spatial_merge_size).to(device)  # [hw, 2]
            patch_hw = torch.tensor([[h, w]], device=device).expand(h * w, 2)
            cos, sin = vision_rotary_cos_sin(hw_positions, config.head_dim, config.rope_theta)
            cached = (self.embeddings(hw_positions, patch_hw), cos, sin)
            while self._layouts and sum(k[0] * k[1] for k in self._layouts) + h * w > LAYOUT_CACHE_PATCHES:
                self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = cached
        return cached

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, patch_dim], grid_thw [n, 3] -> image-token embeddings [N / merge**2, out_hidden]."""
        x, cos, sin, seqlens = self._embed(pixel_values, grid_thw)
        if self.graphs is not None and x.is_cuda:
            return self.graphs(x, cos, sin, seqlens)
        return self._tower(x, cos, sin, seqlens)

    @torch.no_grad()
    def start(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionPass:
        """`encode` in parts: the patch embedding now, the blocks by `advance`."""
        return VisionPass(*self._embed(pixel_values, grid_thw))

    @torch.no_grad()
    def advance(self, vision_pass: VisionPass, num_blocks: int) -> bool:
        """Run the next ``num_blocks`` blocks of ``vision_pass`` (and the head after the last one, which
        sets ``vision_pass.out``), replayed from a graph where `segment_graphs` has one; returns whether it
        is done. The result equals `encode`'s eager one."""
        p = vision_pass
        end = min(len(self.blocks), p.next_block + max(1, num_blocks))
        if self.segment_graphs is not None:  # set on CUDA only
            x = self.segment_graphs(p.x, p.cos, p.sin, p.seqlens, p.next_block, end)
        else:
            x = self._tower(p.x, p.cos, p.sin, p.seqlens, p.next_block, end)
        p.next_block = end
        if end == len(self.blocks):
            p.out, p.x, p.cos, p.sin = x, None, None, None
        else:
            p.x = x
        return p.out is not None

    def _embed(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Check the inputs; (patch embeddings + positions [N, hidden], rotary cos, sin, frame lengths)."""
        config = self.config
        merge = config.spatial_merge_size
        device = self.patch_embed.proj.weight.device
        grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
        num_patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (num_patches, config.patch_dim):
            raise ValueError(
                f"pixel_values: shape {tuple(pixel_values.shape)} does not match grid_thw {grids} "
                f"(needs [{num_patches}, {config.patch_dim}])"
            )
        for t, h, w in grids:
            if h % merge or w % merge or t < 1:
                raise ValueError(f"grid_thw: {[t, h, w]} must have t >= 1 and h, w divisible by {merge}")
        seqlens = [h * w for t, h, w in grids for _ in range(t)]  # one attention block per frame
        layouts = [self._layout(h, w, device) for _, h, w in grids]
        frames = [t for t, _, _ in grids]
        pos, cos, sin = (
            torch.cat(
                [part[k].repeat(t, 1) if t > 1 else part[k] for t, part in zip(frames, layouts, strict=True)]
            )
            for k in range(3)
        )  # [N, hidden], [N, head_dim] x 2

        x = self.patch_embed(pixel_values.to(device))  # [N, hidden]
        x = self.post_conv_layernorm(x)
        return x + pos, cos, sin, seqlens


@dataclass(eq=False)
class VisionPass:
    """A packed ViT forward run a few blocks at a time (`VisionEncoder.start` / `advance`): the hidden
    states after ``next_block`` blocks, then ``out`` (the embeddings) once the head has run."""

    x: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    seqlens: list[int]
    next_block: int = 0
    out: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        return sum(self.seqlens)


class TowerGraphs:
    """CUDA graphs of `VisionEncoder._tower` (the whole tower, or one range of its blocks), keyed by the
    per-image patch counts of the batch and the block range.

    Eager, the tower is ~300 kernel launches and ~2,500 torch calls per forward: for a 448x448 image the
    host, not the GPU, sets its time. A key seen for the ``capture_after + 1``-th time runs eagerly twice
    on a side stream (Triton kernels compile, cuBLAS warms up), then is captured; earlier calls run
    eagerly. Later calls copy their inputs into the graph's static buffers, replay, and get a copy of the
    output (the static output is overwritten by the next replay, and the embeddings may wait several engine
    steps for their prefill). Layouts over `max_patches` patches run eagerly; so does a key whose capture
    failed (logged once). At most `max_graphs` graphs are held; when they are, a new key is captured only if
    it has run more often than the least recently used graph's key (which is then dropped), else it runs
    eagerly: a capture holds the engine step it happens in (~40-60 ms more on an H100), so traffic that
    cycles through more image sizes than there are graphs must not capture on every image. Use counts halve
    every `AGE_EVERY` × `max_graphs` calls, so a size that stopped coming gives way to one that started.
    The graphs share one memory pool (also with ``share_pool_with``'s): they replay one at a time and their
    outputs are copied out at once."""

    MAX_SEEN = 1024  # keys counted towards capture_after, and keys whose uses are counted (oldest forgotten)
    AGE_EVERY = 16

    def __init__(
        self,
        tower,
        max_graphs: int,
        max_patches: int,
        capture_after: int = 0,
        share_pool_with: TowerGraphs | None = None,
    ) -> None:
        self.tower = tower
        self.max_graphs, self.max_patches = max_graphs, max_patches
        self.capture_after = capture_after
        self.entries: dict[tuple, tuple] = {}  # insertion order = least recently used first
        self.failed: set[tuple] = set()
        self.seen: dict[tuple, int] = {}  # key -> eager runs so far (while below capture_after)
        self.uses: dict[tuple, int] = {}  # key -> calls (halved every AGE_EVERY * max_graphs calls)
        self._calls_since_aging = 0
        self.num_refused = 0  # captures not made: the graphs were held by keys used more
        self._pool_owner = share_pool_with._pool_owner if share_pool_with is not None else self
        self.pool = None  # on the pool owner
        self._pool_users: list[TowerGraphs] = []  # on the pool owner: every TowerGraphs capturing into it
        self._pool_owner._pool_users.append(self)

    @staticmethod
    def key(seqlens: list[int], start: int = 0, end: int | None = None) -> tuple:
        """The entry of a batch layout and block range (the whole tower: ``(seqlens...)``)."""
        return tuple(seqlens) if start == 0 and end is None else (tuple(seqlens), start, end)

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        seqlens: list[int],
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        key = self.key(seqlens, start, end)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()  # inside someone else's capture
        if x.shape[0] > self.max_patches or key in self.failed or capturing:
            return self.tower(x, cos, sin, seqlens, start, end)
        uses = self._count_use(key)
        entry = self.entries.pop(key, None)
        if entry is None:
            runs = self.seen.pop(key, 0)
            if runs < self.capture_after:  # not captured yet: eager, and counted
                self._remember(key, runs + 1)
                return self.tower(x, cos, sin, seqlens, start, end)
            if len(self.entries) >= self.max_graphs and uses <= self.uses.get(next(iter(self.entries)), 0):
                # every graph held, the least recently used one's key used as often or more: eager
                self.num_refused += 1
                self._remember(key, runs)
                return self.tower(x, cos, sin, seqlens, start, end)
            try:
                entry = self._capture(x, cos, sin, seqlens, start, end)
            except Exception:
                import logging

                logging.getLogger("glm-engine").exception("[glm-engine] ViT graph capture failed for %s", key)
                self.failed.add(key)
                return self.tower(x, cos, sin, seqlens, start, end)
            while len(self.entries) >= self.max_graphs:
                self.entries.pop(next(iter(self.entries)))
        self.entries[key] = entry
        graph, static_x, static_cos, static_sin, static_out = entry
        static_x.copy_(x)
        static_cos.copy_(cos)
        static_sin.copy_(sin)
        graph.replay()
        return static_out.clone()

    def forget(self, holds: Callable[[tuple[int, ...]], bool]) -> int:
        """Drop the graphs whose layout (per-image patch counts) ``holds`` says yes to; they are captured
        again on later use. Returns how many were dropped."""
        keys = [key for key in self.entries if holds(key if not isinstance(key[0], tuple) else key[0])]
        for key in keys:
            del self.entries[key]
        owner = self._pool_owner
        if keys and not any(users.entries for users in owner._pool_users):
            # the last graphs of the pool are gone, and the pool with them: capturing into its handle again
            # fails (the allocator's pool has no user left), so the next capture takes a new one
            owner.pool = None
        return len(keys)

    def _remember(self, key: tuple, runs: int) -> None:
        """``key``'s eager runs towards its capture (the oldest keys forgotten past MAX_SEEN)."""
        self.seen[key] = runs
        while len(self.seen) > self.MAX_SEEN:
            self.seen.pop(next(iter(self.seen)))

    def _count_use(self, key: tuple) -> int:
        """One more call of ``key``; returns its use count (halved for every key now and then)."""
        uses = self.uses.pop(key, 0) + 1
        self.uses[key] = uses  # most recent last: the oldest are forgotten first
        while len(self.uses) > self.MAX_SEEN:
            self.uses.pop(next(iter(self.uses)))
        self._calls_since_aging += 1
        if self._calls_since_aging >= self.AGE_EVERY * max(1, self.max_graphs):
            self._calls_since_aging = 0
            self.uses = {k: n // 2 for k, n in self.uses.items() if n // 2}
            uses = self.uses.get(key, 0)
        return uses

    def _capture(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        seqlens: list[int],
        start: int = 0,
        end: int | None = None,
    ) -> tuple:
        static_x, static_cos, static_sin = x.clone(), cos.clone(), sin.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.tower(static_x, static_cos, static_sin, seqlens, start, end)
        torch.cuda.current_stream(x.device).wait_stream(side)
        owner = self._pool_owner
        if owner.pool is None:
            owner.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # captured while serving: the llm's request threads may pin host memory meanwhile, which a "global"
        # capture would count against it; nothing they do touches this stream
        with torch.cuda.graph(graph, pool=owner.pool, capture_error_mode="thread_local"):
            static_out = self.tower(static_x, static_cos, static_sin, seqlens, start, end)
        return graph, static_x, static_cos, static_sin, static_out
