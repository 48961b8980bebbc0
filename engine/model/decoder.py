"""GLM-4 decoder with paged attention, and `Glm4vModel` (vision tower + decoder + lm_head).

Contract:
* `Glm4vModel.forward(input_ids [T], positions [3, T], attn, kv_caches, input_embeds [T, hidden] | None)
  -> hidden [T, hidden]` runs one step over a packed batch of prefill chunks and decode tokens (see
  `engine.kernels.attention`). It writes the new tokens' K/V into `kv_caches` (one tensor per layer, from
  `allocate_kv_caches`) and returns the final-norm hidden states of every new token. `positions` are the
  M-RoPE positions (`engine.model.rope.get_mrope_positions` for prompts; token i >= prompt_len has i + delta in
  all three rows). When `input_embeds` is given, `input_ids` is ignored (image prompts: build it with
  `get_input_embeddings`).
* `compute_logits(hidden [n, hidden]) -> [n, vocab] float32`: apply it only to the rows that sample.
* `get_input_embeddings(input_ids [T], image_embeds [m, hidden] | None)` embeds the ids and overwrites
  the m rows whose id is `image_token_id` with image_embeds, in order (m must equal that count).
* Weights: `Glm4vModel.from_pretrained(path, device, dtype)` loads an HF checkpoint (`engine.model.weights`);
  `Glm4vModel.dummy(model_config, device, dtype, seed)` fills random weights on the device.
  Parameter names are the HF names without the leading `model.`; q/k/v are fused into
  `self_attn.qkv_proj` at load.
* Numerics follow transformers' Glm4v: RMSNorm in float32, rotary in the activations' dtype, softmax in
  float32 (CPU reference; SDPA on CUDA); float32 runs match `Glm4vForConditionalGeneration` to ~1e-5.
* The elementwise work between matmuls runs as the fused ops of `engine.kernels.fused` (Triton kernels on CUDA,
  their torch references elsewhere): each layer is qkv_proj -> in-place rotary and the new k, v into the
  KV cache (one kernel: rotate_and_write_kv) -> paged_attention ->
  o_proj -> add_rms_norm_pair(post_self_attn, post_attention) -> gate_up_proj -> silu_mul -> down_proj ->
  add_rms_norm_pair(post_mlp, next layer's input_layernorm or the final norm). The RMSNorm modules only
  hold the weights and eps (state-dict names unchanged). Where the layer after such a norm (gate_up_proj,
  the next layer's qkv_proj) runs the skinny kernel on FP8 weights, the norm's kernel also quantizes its
  rows (`add_rms_norm_pair_fp8`) and the layer takes them: the same numbers, one kernel fewer per norm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig, parse_dtype
from engine.kernels import gemv
from engine.kernels.attention import AttentionMetadata, paged_attention, rotate_and_write_kv
from engine.kernels.fused import add_rms_norm_pair, add_rms_norm_pair_fp8, rms_norm, silu_mul
from engine.model.layers import ACTIVATIONS, RMSNorm, linear, linear_silu_mul, silu_mlp, takes_fp8_rows
from engine.model.rope import MRotaryEmbedding
from engine.model.vision import VisionEncoder, VisionPass

logger = logging.getLogger("glm-engine")

# `set_decode_gemv`'s check: the kernel's output against the layer's own forward, relative L2 difference
# (bf16 against cuBLAS ~1e-3; FP8 against the dequantized path on CPU ~3e-2: W8A8 against W8A16)
GEMV_CHECK_TOLERANCE = 0.05


class DecoderAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = linear(self.qkv_proj, x, x_fp8)  # [T, q_size + 2 * kv_size]
        heads = qkv.view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k heads rotated in place and the new k, v stored in the cache (one kernel on the GPU)
        q, k, v = rotate_and_write_kv(heads, self.num_heads, self.num_kv_heads, cos, sin, kv_cache, attn)
        out = paged_attention(q, k, v, kv_cache, attn, self.scale, kv_written=True)  # [T, heads, head_dim]
        return linear(self.o_proj, out.reshape(num_tokens, self.q_size))


class DecoderMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.hidden_act = config.hidden_act
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(
        self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if self.hidden_act == "silu":  # one kernel for a few rows; FP8: silu_mul quantizes for down
            return silu_mlp(self.gate_up_proj, self.down_proj, x, x_fp8)
        gate, up = linear(self.gate_up_proj, x, x_fp8).chunk(2, dim=-1)  # [T, 2 * intermediate]
        return linear(self.down_proj, up * self.act(gate))


class DecoderLayer(nn.Module):
    """GLM-4-0414 sandwich norms: x + post_self_attn(attn(input(x))); h + post_mlp(mlp(post_attention(h))).

    `forward` takes the residual stream x and input_layernorm(x) (computed by the op before it; with its
    rows in FP8 where the layer before quantized them) and returns the new residual stream, `next_norm` of
    it (the next layer's input_layernorm, or the final norm) and, where `next_linear` (the layer that
    takes that norm next) runs the skinny kernel on FP8 weights, the norm's rows quantized (else None).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = DecoderAttention(config)
        self.mlp = DecoderMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        normed: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        next_norm: RMSNorm,
        normed_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
        next_linear: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x [T, hidden] residual stream, normed = input_layernorm(x) -> (x', next_norm(x'), its FP8 rows)."""
        h = self.self_attn(normed, cos, sin, kv_cache, attn, normed_fp8)
        x, normed, normed_fp8 = _add_norm(x, h, self.post_self_attn_layernorm, self.post_attention_layernorm,
                                          self.mlp.gate_up_proj)  # fmt: skip
        h = self.mlp(normed, normed_fp8)
        return _add_norm(x, h, self.post_mlp_layernorm, next_norm, next_linear)


def _add_norm(
    x: torch.Tensor, h: torch.Tensor, post: RMSNorm, norm: RMSNorm, consumer: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """add_rms_norm_pair(x, h, post, norm) and, where `consumer` takes the result's rows in FP8, them."""
    if consumer is not None and takes_fp8_rows(consumer, h):
        x, normed, q, scale = add_rms_norm_pair_fp8(x, h, post.weight, norm.weight, post.eps, norm.eps)
        return x, normed, (q, scale)
    x, normed = add_rms_norm_pair(x, h, post.weight, norm.weight, post.eps, norm.eps)
    return x, normed, None


class TextDecoder(nn.Module):
    """Embedding, decoder layers and final norm (HF `model.language_model`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = MRotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds  # [T, hidden]
        cos, sin = self.rotary(positions)  # [T, rotary_dim/2] each, float32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # transformers rotates in the activations' dtype
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: {len(kv_caches)} tensors for {len(self.layers)} layers")
        if not len(self.layers):
            return rms_norm(x, self.norm.weight, self.norm.eps)
        first = self.layers[0].input_layernorm
        normed = rms_norm(x, first.weight, first.eps)  # later input norms are fused into the layer before
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        # the layer taking each next norm (None for the final norm: the lm_head takes only sampled rows)
        next_linears = [layer.self_attn.qkv_proj for layer in self.layers[1:]] + [None]
        normed_fp8 = None
        for layer, kv_cache, next_norm, next_linear in zip(
            self.layers, kv_caches, next_norms, next_linears, strict=True
        ):
            x, normed, normed_fp8 = layer(
                x, normed, cos, sin, kv_cache, attn, next_norm, normed_fp8, next_linear
            )
        return normed  # the final norm of the last layer's output


class Glm4vModel(nn.Module):
    """GLM-4.6V: `.visual` (VisionEncoder), `.language_model` (TextDecoder) and `.lm_head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionEncoder(config.vision_config)
        self.language_model = TextDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embeddings'; lm_head may hold FP8 weights, engine.model.quant)."""
        return self.language_model.embed_tokens.weight.dtype

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language_model(input_ids, positions, attn, kv_caches, input_embeds)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> logits [n, vocab] float32."""
        return linear(self.lm_head, hidden).float()

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """`VisionEncoder.encode`: [N, patch_dim], [n, 3] -> [N / merge**2, hidden] in the model dtype."""
        return self.visual.encode(pixel_values.to(self.device, self.dtype), grid_thw)

    def start_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionPass:
        """`encode_images` in parts (`VisionEncoder.start`; `self.visual.advance` runs the blocks)."""
        return self.visual.start(pixel_values.to(self.device, self.dtype), grid_thw)

    @torch.no_grad()
    def get_input_embeddings(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]; image-token rows replaced by image_embeds [m, hidden] in order."""
        x = self.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        num_image_tokens = int(is_image.sum())
        num_embeds = 0 if image_embeds is None else image_embeds.shape[0]
        if num_image_tokens != num_embeds:
            raise ValueError(
                f"image_embeds: {num_embeds} rows for {num_image_tokens} image tokens "
                f"(id {self.config.image_token_id}) in input_ids"
            )
        if image_embeds is not None and num_embeds:
            x[is_image] = image_embeds.to(x.device, x.dtype)
        return x

    @torch.no_grad()
    def set_decode_gemv(self, on: bool) -> int:
        """Steps of up to gemv.MAX_ROWS tokens run the decoder's linear layers and the lm_head through the
        skinny kernel (`engine.kernels.gemv`; on: set on each layer, off: cleared). Call after any FP8
        swap and before CUDA graphs are captured. Where the kernel runs (CUDA, or Triton's interpreter),
        each kind of layer is tried now against its own forward at every row count the kernel compiles
        for (M == 1, M % 16 == 0, others; tiles of 16, 32 and 64 rows), which also compiles it before any
        capture; an error or a relative difference over GEMV_CHECK_TOLERANCE turns it off for the model
        with a warning. Returns the layers set (0 when turned off)."""
        layers = [self.lm_head]
        for layer in self.language_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        for module in layers:
            module.decode_gemv = on
        if on and self.language_model.layers:
            try:
                self._check_decode_gemv()
            except Exception as exc:
                logger.warning("[glm-engine] decode_gemv off: %s", (str(exc).splitlines() or [""])[0][:300])
                for module in layers:
                    module.decode_gemv = False
                return 0
        return len(layers) if on else 0

    def _check_decode_gemv(self) -> None:
        first = self.language_model.layers[0]
        gen = torch.Generator(device=self.device).manual_seed(0)
        kinds = (first.self_attn.qkv_proj, first.self_attn.o_proj, first.mlp.gate_up_proj,
                 first.mlp.down_proj, self.lm_head)  # fmt: skip
        for rows in (r for r in (1, 2, 16, 17, 32, 33, 64) if r <= gemv.MAX_ROWS):
            for module in kinds:
                x = torch.randn(rows, module.weight.shape[1], device=self.device, generator=gen)
                x = x.to(self.dtype)
                checks = [(linear(module, x), module(x))]
                if module is first.mlp.gate_up_proj:
                    checks.append((linear_silu_mul(module, x), silu_mul(module(x))))
                for got, ref in checks:
                    err = float((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))
                    if not err <= GEMV_CHECK_TOLERANCE:
                        shape = tuple(module.weight.shape)
                        raise RuntimeError(f"the kernel differs from the layer's forward on {shape} x {rows} rows "
                                           f"(relative difference {err:.3g})")  # fmt: skip

    def allocate_kv_caches(
        self,
        num_blocks: int,
        block_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> list[torch.Tensor]:
        """One zeroed [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer."""
        return allocate_kv_caches(
            self.config,
            num_blocks,
            block_size,
            self.device if device is None else device,
            self.dtype if dtype is None else dtype,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype | str | None = None) -> int:
        """KV cache bytes per token over all layers."""
        return self.config.kv_bytes_per_token(self.dtype if dtype is None else dtype)

    @classmethod
    def empty(
        cls, config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | str = "bfloat16"
    ) -> Glm4vModel:
        """Uninitialized parameters on `device` (built on the meta device: no host copy, no init cost)."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to(parse_dtype(dtype)).to_empty(device=torch.device(device))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.language_model.embed_tokens.weight
        return model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = "bfloat16",
        model_config: ModelConfig | None = None,
    ) -> Glm4vModel:
        """Load an HF Glm4v checkpoint directory, converting weights to `dtype` on `device`."""
        from engine.model.weights import load_weights

        config = model_config or ModelConfig.from_pretrained(path)
        model = cls.empty(config, device, dtype)
        load_weights(model, path)
        return model

    @classmethod
    def dummy(
        cls,
        model_config: ModelConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = "bfloat16",
        seed: int = 0,
    ) -> Glm4vModel:
        """Full-size model with random weights created directly on `device` (benchmarks without files)."""
        from engine.model.weights import init_dummy_weights

        model = cls.empty(model_config, device, dtype)
        init_dummy_weights(model, seed)
        return model


def allocate_kv_caches(
    model_config: ModelConfig,
    num_blocks: int,
    block_size: int,
    device: torch.device | str,
    dtype: torch.dtype | str,
) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per decoder layer."""
    shape = (2, num_blocks, block_size, model_config.num_key_value_heads, model_config.head_dim)
    return [
        torch.zeros(shape, dtype=parse_dtype(dtype), device=torch.device(device))
        for _ in range(model_config.num_hidden_layers)
    ]
