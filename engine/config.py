"""Model and engine configuration.

Contract:
* `ModelConfig.from_pretrained(path)` reads an HF Glm4v `config.json` (directory or file). It accepts the
  transformers 4.57 rope format (`rope_theta`, `partial_rotary_factor`, `rope_scaling.mrope_section` at
  `text_config` level) and the 5.x format (`text_config.rope_parameters`). Every token id (image, video,
  begin/end markers, eos list, pad) comes from the config (eos/pad fall back to `generation_config.json`);
  nothing is hard-coded. The text head_dim is `hidden_size // num_attention_heads`, as in transformers
  (a `head_dim` key is ignored there too).
* `EngineConfig` holds the serving knobs. It is validated at construction; a bad value raises ValueError
  whose message starts with the field name and states the limit.
Both are frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

QUANTIZATIONS = ("none", "fp8")  # EngineConfig.quantization values
VISION_ATTENTION_CHOICES = ("flash", "cudnn", "auto")  # EngineConfig.vision_attention (engine.model.vision)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' | 'float16' | 'float32' (or a torch.dtype) -> torch.dtype; ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} is not supported (choose one of {sorted(DTYPES)})")
        return dtype
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported (choose one of {sorted(DTYPES)})")
    return DTYPES[name]


@dataclass(frozen=True)
class VisionConfig:
    """The ViT tower (`vision_config`)."""

    depth: int  # number of ViT blocks
    hidden_size: int  # ViT width
    num_heads: int  # ViT attention heads
    patch_size: int  # spatial patch side in pixels
    temporal_patch_size: int  # frames per patch (stills are duplicated to this)
    spatial_merge_size: int  # side of the patch window merged into one LLM token
    image_size: int  # pretraining image side; learned position table is (image_size/patch_size)^2
    in_channels: int  # input channels (3)
    out_hidden_size: int  # merger output width (= LLM hidden); also the ViT MLP width
    intermediate_size: int  # merger SwiGLU width
    hidden_act: str  # activation of the ViT MLP and merger SwiGLU
    rms_norm_eps: float  # eps of the ViT RMSNorms
    rope_theta: float  # base of the 2-D ViT rotary embedding
    attention_bias: bool  # whether the ViT qkv projection has a bias

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Floats per pixel_values row: in_channels * temporal_patch_size * patch_size**2 (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def num_position_embeddings(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ModelConfig:
    """The GLM decoder (`text_config`), the token ids and the vision tower."""

    vocab_size: int  # rows of embed_tokens and lm_head
    hidden_size: int  # decoder width
    intermediate_size: int  # decoder SwiGLU width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA)
    hidden_act: str  # decoder MLP activation
    rms_norm_eps: float  # eps of every decoder RMSNorm
    max_position_embeddings: int  # longest context the model was trained for
    rope_theta: float  # decoder rotary base
    partial_rotary_factor: float  # fraction of head_dim that is rotated
    mrope_section: tuple[int, int, int]  # frequency slots for the t/h/w position rows
    tie_word_embeddings: bool  # lm_head shares embed_tokens' weight
    image_token_id: int  # <|image|> placeholder, one per LLM image token
    video_token_id: int  # <|video|> placeholder
    image_start_token_id: int  # <|begin_of_image|>
    image_end_token_id: int  # <|end_of_image|>
    video_start_token_id: int  # <|begin_of_video|>
    video_end_token_id: int  # <|end_of_video|>
    eos_token_ids: tuple[int, ...]  # generation stops on any of these
    pad_token_id: int | None  # padding id (may be an eos id)
    vision_config: VisionConfig  # the ViT tower
    torch_dtype: str = "bfloat16"  # dtype the checkpoint was saved in
    model_type: str = "glm4v"  # HF model_type

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if sum(self.mrope_section) * 2 != self.rotary_dim:
            raise ValueError(
                f"mrope_section: {list(self.mrope_section)} sums to {sum(self.mrope_section)}, must equal "
                f"head_dim * partial_rotary_factor / 2 = {self.rotary_dim // 2}"
            )
        if self.vision_config.out_hidden_size != self.hidden_size:
            raise ValueError(
                f"vision_config.out_hidden_size: {self.vision_config.out_hidden_size} must equal "
                f"hidden_size {self.hidden_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that are rotated (64 for Flash)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_id(self) -> tuple[int, ...]:
        """Alias of `eos_token_ids` (HF spelling)."""
        return self.eos_token_ids

    def kv_bytes_per_token(self, dtype: str | torch.dtype = "bfloat16") -> int:
        """Bytes of paged KV cache one token takes over all layers (K and V)."""
        itemsize = torch.empty((), dtype=parse_dtype(dtype)).element_size()
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * itemsize

    def num_image_tokens(self, grid_thw: tuple[int, int, int] | list[int]) -> int:
        """LLM placeholder tokens of one image/video with patch grid (t, h, w)."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.vision_config.spatial_merge_size**2

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (+ `generation_config.json` for eos/pad when the config lacks them)."""
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"config.json not found at {config_file}")
        raw = json.loads(config_file.read_text())
        gen_file = config_file.parent / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_dict(raw, generation)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Build from the parsed `config.json` dict (see `from_pretrained`)."""
        generation = generation or {}
        text = dict(raw.get("text_config") or raw)
        vision = dict(raw.get("vision_config") or {})
        if not vision:
            raise ValueError("vision_config: missing from config.json (not a Glm4v checkpoint?)")

        rope = dict(text.get("rope_parameters") or {})
        scaling = dict(text.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
        mrope = rope.get("mrope_section", scaling.get("mrope_section"))
        if mrope is None:
            raise ValueError(
                "text_config.rope_parameters.mrope_section: missing (also no rope_scaling.mrope_section)"
            )
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"text_config.rope_parameters.rope_type: {rope_type!r} is not supported")

        def first(*values: Any) -> Any:
            return next((v for v in values if v is not None), None)

        eos = first(text.get("eos_token_id"), raw.get("eos_token_id"), generation.get("eos_token_id"))
        if eos is None:
            raise ValueError("eos_token_id: missing from config.json and generation_config.json")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
        pad = first(text.get("pad_token_id"), raw.get("pad_token_id"), generation.get("pad_token_id"))

        vision_rope = dict(vision.get("rope_parameters") or {})
        vision_config = VisionConfig(
            depth=int(vision.get("depth", 24)),
            hidden_size=int(vision.get("hidden_size", 1536)),
            num_heads=int(vision.get("num_heads", 12)),
            patch_size=int(vision.get("patch_size", 14)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            image_size=int(vision.get("image_size", 336)),
            in_channels=int(vision.get("in_channels", 3)),
            out_hidden_size=int(vision.get("out_hidden_size", 4096)),
            intermediate_size=int(vision.get("intermediate_size", 13696)),
            hidden_act=str(vision.get("hidden_act", "silu")),
            rms_norm_eps=float(vision.get("rms_norm_eps", 1e-5)),
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
            attention_bias=bool(vision.get("attention_bias", False)),
        )

        def token_id(name: str) -> int:
            if name not in raw:
                raise ValueError(f"{name}: missing from config.json")
            return int(raw[name])

        return cls(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=int(text["num_attention_heads"]),
            num_key_value_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            hidden_act=str(text.get("hidden_act", "silu")),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            mrope_section=tuple(int(s) for s in mrope),  # type: ignore[arg-type]
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            image_token_id=token_id("image_token_id"),
            video_token_id=token_id("video_token_id"),
            image_start_token_id=token_id("image_start_token_id"),
            image_end_token_id=token_id("image_end_token_id"),
            video_start_token_id=token_id("video_start_token_id"),
            video_end_token_id=token_id("video_end_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=None if pad is None else int(pad),
            vision_config=vision_config,
            torch_dtype=str(raw.get("dtype", raw.get("torch_dtype", text.get("dtype", "bfloat16")))),
            model_type=str(raw.get("model_type", "glm4v")),
        )


@dataclass(frozen=True)
class EngineConfig:
    """Serving knobs; validated on construction (ValueError naming the field)."""

    max_num_seqs: int = 64  # most sequences scheduled in one step
    max_num_batched_tokens: int = 2048  # most new tokens (prefill chunks + decodes) in one step
    # Stall-free steps: prompt tokens in a step that also decodes. On an H200 (full size, bf16) a
    # 32-sequence decode step takes ~9 ms, a prompt chunk ~4.3 ms for its pass over the weights plus
    # ~0.03 ms a token: 320 tokens (with 1536 ViT patches, below) keep 32 x 1288x728 streams' inter-token
    # P99 near 23 ms at 10.7 req/s with the first token within 0.3 s. None: no cap beyond the budget.
    max_num_prefill_tokens_with_decodes: int | None = 320
    max_model_len: int = 8192  # longest prompt + output of one request
    block_size: int = 16  # tokens per KV cache block
    num_kv_blocks: int | None = None  # KV blocks to allocate; None: derive from the memory settings
    kv_cache_memory_bytes: int | None = None  # KV cache budget; None: gpu_memory_utilization decides
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use in total
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # weights/activations/KV dtype: float32 | float16 | bfloat16
    quantization: str = "none"  # "fp8": decoder linears + lm_head in float8_e4m3fn (engine.model.quant)
    vision_quantization: str = "none"  # "fp8": the ViT's linear layers in float8_e4m3fn (the same W8A8)
    enable_chunked_prefill: bool = True  # split long prompts over several steps
    max_images_per_request: int = 8  # most images in one request
    max_image_tokens_per_request: int = 16384  # most LLM image tokens in one request
    max_num_vision_patches: int = 8192  # most ViT patches in one packed forward (one step of the llm)
    # ViT work per engine step while sequences decode, in patches through the whole tower: a bigger batch
    # runs a few blocks per step (engine.core.vision_queue). 1536 patches (a 448x448 image is 1024) are
    # ~7.5 ms on an H200 (a 1288x728 screenshot, 4784 patches, takes 24 ms). 0: each batch in one step
    vision_patches_per_step: int = 1536
    vision_cuda_graphs: bool = True  # replay the ViT tower from CUDA graphs per image layout (CUDA only)
    # The ViT attention's kernel on CUDA (engine.model.vision.VISION_ATTENTION_CHOICES): "flash", "cudnn"
    # (cuDNN's fused attention: on an H200 a 1288x728 screenshot's ViT 24.2 -> 21.3 ms, a 2044x1148 image 93 -> 70
    # ms, the embeddings within 2.3e-5; but the first image of each new size waits for cuDNN to build its
    # plan, 0.03-0.8 s, in the engine step every stream waits on) or "auto": cuDNN for the image sizes whose
    # plan the engine loop built while it had no request, flash for the others (AttentionKernels;
    # docs/DESIGN.md)
    vision_attention: str = "auto"
    # Run the ViT on its own CUDA stream beside the decode steps (CUDA only). Off: under 32 concurrent
    # requests through Triton on an H200 the engine stalled with it on (cause not found yet).
    async_vision: bool = False
    prefill_cuda_graphs: bool = (
        True  # replay fresh prompt chunks from CUDA graphs per token bucket (CUDA only)
    )
    # A step with both decodes and prompt chunks runs them through one CUDA graph (one pass over the
    # weights) instead of a decode graph and a prefill graph (needs prefill_cuda_graphs; CUDA only; the
    # graphs are captured at start-up, docs/DESIGN.md)
    mixed_step_graphs: bool = True
    # Steps of up to 64 tokens (decode steps, short follow-up chunks) run the decoder's linear layers and
    # the lm_head through one Triton kernel per layer that reads the weights once, without cuBLAS's
    # split-K reduce, the gate/up projection and silu_mul fused (engine.kernels.gemv; CUDA only). On an
    # H100 batch-1 decode 7.42 -> 7.01 ms/token, the same greedy tokens (benchmarks.gemv_bench)
    decode_gemv: bool = True
    # The decoder's Triton kernels (the skinny matmuls, norms, rotary + KV write, decode attention) launched
    # with programmatic dependent launch: in a CUDA graph each kernel's programs are scheduled while the one
    # before it finishes (engine.kernels.fused.set_pdl; CUDA, compute capability 9+). Off: on an H200 batch-1
    # decode went 5.384 -> 5.635 ms/token with it (benchmarks.gemv_bench --engine-only --pdl).
    # "auto": when the engine starts, the batch-1 and batch-32 decode graphs are captured and timed both
    # ways (PDL letting the next kernel launch as each program ends) and PDL stays on only if it is faster
    # at both (engine.runner.model_runner.choose_decode_pdl); off without CUDA graphs
    decode_pdl: bool | str = False
    # FP8 layers (quantization "fp8") in CUDA graphs: steps of up to this many rows run the per-tensor GEMM
    # into float32 + a scales epilogue, larger ones the row-wise GEMM (engine.model.quant). 320: the decode
    # graphs and a 448x448's prefill graph. On an H100 the 40 layers' matmuls per-tensor against row-wise:
    # 6.87 / 7.75 ms at 320 rows, 7.52 / 6.43 at 384 (the mixed steps beside a 320-token chunk), 21.75 /
    # 21.25 at 1236 (benchmarks.gemv_bench --prefill-rows); through Triton 320 took ~1 ms off a new 448x448's
    # first step and 384 cost 3.6 % of 32 x 1288x728's req/s
    fp8_tensorwise_rows: int = 320
    # FP8 layers above fp8_tensorwise_rows: at start-up each kind of decoder layer (qkv, o, gate/up, down) is
    # timed with both GEMMs at each prefill graph's token bucket, and CUDA graphs of that many rows run the
    # faster (engine.model.quant.autotune_tensorwise_rows_; CUDA only; ~2.3 s at start-up on an H100). There
    # its choice took the 40 layers 9.93 -> 8.88 ms at 448 rows, 19.68 -> 19.06 at 1280 (the faster per kind
    # everywhere, gemv_bench --autotune), and a new 1288x728's first step ~0.7 ms through Triton; False:
    # row-wise above the bound
    fp8_gemm_autotune: bool = True
    enable_prefix_caching: bool = True  # reuse KV blocks of equal prefixes (images by content hash)
    image_cache_mb: int = 1024  # ViT embeddings kept by image hash on the engine's device; 0: off
    enable_thinking: bool = True  # default of the chat template's thinking switch
    seed: int = 0  # seed of the engine's sampler and of dummy weights

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting and the limit it broke."""

        def at_least(name: str, value: int | None, low: int) -> None:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{name}: {value!r} must be an integer >= {low}")

        at_least("max_num_seqs", self.max_num_seqs, 1)
        at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        at_least("max_num_prefill_tokens_with_decodes", self.max_num_prefill_tokens_with_decodes, 1)
        at_least("max_model_len", self.max_model_len, 1)
        at_least("block_size", self.block_size, 1)
        at_least("num_kv_blocks", self.num_kv_blocks, 1)
        at_least("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1)
        at_least("max_images_per_request", self.max_images_per_request, 0)
        at_least("max_image_tokens_per_request", self.max_image_tokens_per_request, 0)
        at_least("max_num_vision_patches", self.max_num_vision_patches, 4)
        at_least("vision_patches_per_step", self.vision_patches_per_step, 0)
        at_least("image_cache_mb", self.image_cache_mb, 0)
        at_least("fp8_tensorwise_rows", self.fp8_tensorwise_rows, 0)
        for name in (
            "vision_cuda_graphs",
            "prefill_cuda_graphs",
            "mixed_step_graphs",
            "decode_gemv",
            "fp8_gemm_autotune",
            "enable_prefix_caching",
            "async_vision",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: {getattr(self, name)!r} must be true or false")
        if not (isinstance(self.decode_pdl, bool) or self.decode_pdl == "auto"):
            raise ValueError(f'decode_pdl: {self.decode_pdl!r} must be true, false or "auto"')
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization} must be in (0, 1]")
        parse_dtype(self.dtype)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} must be spelled one of {sorted(DTYPES)}")
        if self.vision_attention not in VISION_ATTENTION_CHOICES:
            raise ValueError(
                f"vision_attention: {self.vision_attention!r} must be one of {', '.join(VISION_ATTENTION_CHOICES)}"
            )
        for name in ("quantization", "vision_quantization"):
            value = getattr(self, name)
            if value not in QUANTIZATIONS:
                raise ValueError(f"{name}: {value!r} must be one of {list(QUANTIZATIONS)}")
            if value == "fp8" and self.dtype not in ("bfloat16", "float16"):
                raise ValueError(
                    f"{name}: fp8 needs a 16-bit activation dtype (bfloat16 or float16), not dtype {self.dtype!r}"
                )
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device: {self.device!r} is not a torch device ({exc})") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} must be cpu or cuda[:N]")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens: {self.max_num_batched_tokens} must be >= max_model_len "
                f"{self.max_model_len} when enable_chunked_prefill is off"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineConfig:
        """Build from a dict (e.g. engine_config.json's "engine"); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown EngineConfig field (known: {sorted(known)})")
        return cls(**values)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EngineDir:
    """A ``glmv-build`` engine directory, the one reader of its files (docs/DESIGN.md lists them):
    ``config.json`` (ModelConfig), ``engine_config.json`` ({"engine": EngineConfig fields, "preprocess":
    request limits, "dummy": random weights}), ``tokenizer.json``, ``preprocessor_config.json``."""

    path: Path
    raw: dict[str, Any]
    """engine_config.json, parsed."""

    @classmethod
    def open(cls, path: str | Path) -> EngineDir:
        path = Path(path)
        config_file = path / "engine_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"engine_config.json not found in {path}")
        return cls(path, json.loads(config_file.read_text()))

    def engine_config(self, **overrides: Any) -> EngineConfig:
        """The EngineConfig it was built with; ``overrides`` replace fields."""
        return EngineConfig.from_dict({**self.raw.get("engine", {}), **overrides})

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_pretrained(self.path)

    @property
    def is_dummy(self) -> bool:
        """Built without weights: the runtime makes random ones of the config's shape."""
        return bool(self.raw.get("dummy", self.raw.get("build", {}).get("dummy", False)))

    @property
    def weights_dir(self) -> Path | None:
        """Where the safetensors are; None for a dummy engine."""
        return None if self.is_dummy else self.path

    @property
    def preprocess(self) -> dict[str, Any]:
        """The "preprocess" section: request limits beside the engine's own."""
        return dict(self.raw.get("preprocess", {}))

    def tokenizer(self) -> Any:
        """The fast tokenizer of ``tokenizer.json`` (tokenizers.Tokenizer), or None."""
        file = self.path / "tokenizer.json"
        if not file.is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file))

    def image_processor_config(self) -> dict[str, Any] | None:
        """``preprocessor_config.json`` (image_mean, image_std, ...), or None."""
        file = self.path / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else None


__all__ = [
    "DTYPES",
    "QUANTIZATIONS",
    "EngineConfig",
    "EngineDir",
    "ModelConfig",
    "VisionConfig",
    "parse_dtype",
]
