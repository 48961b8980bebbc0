"""Turns one scheduler step into one forward pass and one sampled token per finishing sequence.

Contract of ``ModelRunner.execute(out) -> list[int | None]`` (one entry per ``out.seqs``):
  * Sequence ``seq`` runs tokens ``[start, end)`` with ``start = seq.num_computed_tokens`` and
    ``end = start + num_scheduled_tokens``; all sequences are packed into one flat batch of T tokens.
  * Positions ``[3, T]``: a prompt token ``i`` takes ``seq.mrope_positions[:, i]`` (text-only prompts:
    ``i``); an output token ``i`` takes ``i + seq.mrope_delta`` in all three rows.
  * Image tokens of ``[start, end)`` take the rows of ``seq.image_embeds`` that belong to them (the
    k-th image token of the prompt takes row k), so a chunk boundary may cut through an image.
  * Logits are computed only for the last token of sequences whose step reaches ``len(seq)``; those get
    a sampled token id, the others (mid-prefill chunks) get None.
The runner owns the KV cache tensors (``num_kv_blocks`` sizes them from a memory budget) and is the one
door into the model: ``encode_images`` runs the ViT (on a stream of its own with ``async_vision``),
``start_images`` / ``advance_images`` run it a few blocks per engine step, ``execute`` / ``launch_decode``
the decoder; ``load_model`` builds the model it is given.

CUDA graphs (CUDA only, off with ``enforce_eager``):
  * ``DecodeGraphs``: a step where every sequence runs exactly one token replays a graph captured for
    (batch bucket, block-table width bucket); padding rows write into one scratch KV block past the block
    manager's range. A step of one-token steps and continuation chunks of at most ``CHUNK_DECODE_ROWS``
    tokens replays it with one row per token (image tokens take their embeddings through a static mask).
  * ``PrefillGraphs`` (``EngineConfig.prefill_cuda_graphs``): the sequences whose chunk starts at position
    0 ("fresh" prompt chunks, image tokens included) replay a graph captured for their total token count
    rounded up to a bucket (one varlen flash call per layer; padding is one extra sequence writing into
    the scratch block). A step of fresh chunks plus one-token steps runs the one-token part from a decode
    graph and then the fresh part from a prefill graph (two passes over the weights, each a few kernel
    launches, instead of one eager pass of ~1,000 host-side torch calls).
    Chunks that continue a prompt (prefix-cache hits, later chunks of a long prompt) replay a context
    graph of ``PrefillGraphs`` (token bucket x context bucket) the same way.
  * Other steps (more than ``PrefillGraphs.max_seqs`` chunks, more tokens than the largest bucket, more
    context than the largest context bucket) run eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.config import EngineConfig, ModelConfig
from engine.core.scheduler import SchedulerOutput
from engine.kernels import fused
from engine.kernels.attention import AttentionMetadata, fresh_prefill_supported, to_device
from engine.model.vision import PatchNormalizer, VisionPass
from engine.runner.cuda_graphs import DecodeGraphs, PrefillGraphs
from engine.sample.sampler import Sampler

if TYPE_CHECKING:
    from engine.sample.structured import PreparedMasks

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image processor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

logger = logging.getLogger("glm-engine")


@dataclass
class PendingDecode:
    """A launched decode step whose tokens have not been read on the host yet."""

    seqs: list  # the sequences of the step, in row order
    token_ids: torch.Tensor  # [len(seqs)] sampled ids on the device
    host: torch.Tensor  # their host copy (pinned on CUDA), valid once `ready` has passed
    ready: torch.cuda.Event | None  # None: already on the host

    def tokens(self) -> list[int]:
        """The sampled ids (waits for the step to finish)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def num_kv_blocks(engine_config: EngineConfig, kv_bytes_per_token: int, device: torch.device) -> int:
    """KV cache blocks for this engine.

    ``num_kv_blocks`` if set; else ``kv_cache_memory_bytes``; else on CUDA the part of
    ``gpu_memory_utilization * total`` not already in use (weights and everything else on the GPU; call it
    after loading the model) less ``image_cache_mb``, on CPU 1 GiB. Raises ValueError when that leaves no block.
    """
    if engine_config.num_kv_blocks is not None:
        return engine_config.num_kv_blocks
    block_bytes = kv_bytes_per_token * engine_config.block_size
    if engine_config.kv_cache_memory_bytes is not None:
        budget = engine_config.kv_cache_memory_bytes
        source = "kv_cache_memory_bytes"
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave room for activations of the largest step: hidden, qkv, mlp intermediate and logits are
        # all O(max_num_batched_tokens); 10% of what remains is a coarse margin for them.
        budget = int((engine_config.gpu_memory_utilization * total - (total - free)) * 0.9)
        budget -= engine_config.image_cache_mb << 20  # the image-embedding cache fills up later
        source = "gpu_memory_utilization"
    else:
        budget = 1 << 30
        source = "the CPU default of 1 GiB"
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"{source}: a budget of {budget} bytes holds no KV block of {block_bytes} bytes "
            f"({engine_config.block_size} tokens x {kv_bytes_per_token} bytes)"
        )
    return num_blocks


def load_model(
    model_config: ModelConfig,
    engine_config: EngineConfig,
    device: torch.device,
    weights_dir: str | Path | None = None,
) -> torch.nn.Module:
    """The model on ``device``: the checkpoint's weights (``weights_dir``; None: random weights of the
    config's shape)."""
    from engine.model.decoder import Glm4vModel

    if weights_dir is None:
        return Glm4vModel.dummy(model_config, device, engine_config.dtype, engine_config.seed)
    return Glm4vModel.from_pretrained(weights_dir, device, engine_config.dtype, model_config)


def prepare_model(
    model: torch.nn.Module, engine_config: EngineConfig, device: torch.device, enforce_eager: bool = False
) -> None:
    """Make a loaded model (or one a caller gives) what the engine config asks, in place: the decoder's
    linear layers in FP8 (``quantization``; FP8 layers already there are kept) and the ViT's
    (``vision_quantization``), the FP8 GEMM of the decoder's graphs by rows (``fp8_tensorwise_rows``), the
    ViT's attention kernel (``vision_attention``) and its CUDA graphs on
    (``vision_cuda_graphs``, on CUDA, unless ``enforce_eager``), decode steps' matmuls through the skinny
    kernel (``decode_gemv``, on CUDA), the decoder's Triton kernels launched with PDL (``decode_pdl``;
    checked with one launch, off with a warning where it cannot run). Call before sizing the KV cache: the
    memory freed by FP8 goes to the cache."""
    if engine_config.quantization == "fp8":
        from engine.model.quant import quantize_decoder_fp8_, set_tensorwise_rows_, weight_bytes

        before = weight_bytes(model)
        swapped = quantize_decoder_fp8_(model)
        logger.info(
            "[glm-engine] fp8: %d decoder linear layers quantized; weights %.2f GB -> %.2f GB",
            swapped,
            before / 1e9,
            weight_bytes(model) / 1e9,
        )
        set_tensorwise_rows_(model, engine_config.fp8_tensorwise_rows)  # before any graph is captured
        if engine_config.fp8_gemm_autotune and device.type == "cuda" and not enforce_eager:
            autotune_fp8_gemms(model, engine_config)
    if engine_config.vision_quantization == "fp8":
        from engine.model.quant import quantize_vision_fp8_

        swapped = quantize_vision_fp8_(model)
        logger.info("[glm-engine] fp8: %d ViT linear layers quantized", swapped)
    if engine_config.decode_gemv and device.type == "cuda":
        layers = model.set_decode_gemv(True)  # after the FP8 swap, before any graph is captured
        logger.info("[glm-engine] decode_gemv: %d linear layers through the skinny kernel", layers)
    # before any graph is captured; "auto" is tried on here, and ModelRunner decides once its graphs exist
    if fused.set_pdl(bool(engine_config.decode_pdl) and device.type == "cuda"):
        try:  # one PDL launch now: a Triton or driver that cannot do it turns it off here, not mid-step
            x = torch.randn(2, 256, device=device, dtype=model.dtype)
            w = torch.ones(256, device=device, dtype=model.dtype)
            got = fused.add_rms_norm_pair(x, x, w, w, 1e-5)
            want = fused.add_rms_norm_pair_reference(x, x, w, w, 1e-5, 1e-5)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            if engine_config.decode_pdl != "auto":
                logger.info("[glm-engine] decode_pdl: the decoder's Triton kernels launch with PDL")
        except Exception as exc:
            fused.set_pdl(False)
            logger.warning("[glm-engine] decode_pdl: off (%s: %s)", type(exc).__name__, str(exc)[:200])
    elif engine_config.decode_pdl:
        logger.warning("[glm-engine] decode_pdl: off (needs CUDA, compute capability 9+, Triton with PDL)")
    model.visual.set_attention(engine_config.vision_attention)  # before any graph is captured
    if engine_config.vision_cuda_graphs and device.type == "cuda" and not enforce_eager:
        model.visual.enable_cuda_graphs(max_patches=max(16384, engine_config.max_num_vision_patches))


def choose_decode_pdl(graphs: DecodeGraphs, rounds: int = 5, replays: int = 10) -> dict:
    """``decode_pdl`` "auto": capture the decode graphs of batch 1 and of batch 32 (or the largest bucket
    below) without PDL and with it (trigger "exit"), each in a private pool, replay them in turns, and leave
    PDL on only if it is faster at both batches. Call before any other graph is captured. Returns the
    median ms per replay of each ({"off": {batch: ms}, "on": {...}, "pdl": chosen})."""
    batches = sorted({1, max(b for b in graphs.batch_buckets if b <= 32)})
    width = graphs.width_buckets[0]
    trial: dict[str, dict[int, torch.cuda.CUDAGraph]] = {}
    for name, on in (("off", False), ("on", True)):
        fused.set_pdl(on, trigger="exit")
        trial[name] = {batch: graphs.trial_graph(batch, width) for batch in batches}
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in trial}
    for _ in range(rounds):  # in turns: a clock that drifts weighs on both alike
        for name, by_batch in trial.items():
            for batch, graph in by_batch.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(replays):
                    graph.replay()
                end.record()
                end.synchronize()
                times[name][batch].append(start.elapsed_time(end) / replays)
    med = {name: {b: statistics.median(v) for b, v in by_batch.items()} for name, by_batch in times.items()}
    use = all(med["on"][b] < med["off"][b] for b in batches)
    fused.set_pdl(use, trigger="exit")
    del trial  # their pools go with them
    return {**med, "pdl": use}


def autotune_fp8_gemms(model: torch.nn.Module, engine_config: EngineConfig) -> None:
    """`engine.model.quant.autotune_tensorwise_rows_` at the prefill graphs' token buckets (a mixed step's rows
    fall in one of them too), and the choices logged, a line per kind of layer."""
    from engine.model.quant import autotune_tensorwise_rows_
    from engine.runner.cuda_graphs import prefill_buckets

    start = time.perf_counter()
    times = autotune_tensorwise_rows_(model, prefill_buckets(engine_config.max_num_batched_tokens))
    for kind, by_rows in times.items():
        logger.info(
            "[glm-engine] fp8 GEMM by rows, %s (per-tensor / row-wise ms, the faster in graphs): %s",
            kind,
            ", ".join(f"{m}: {t:.2f}/{r:.2f} {'T' if t < r else 'R'}" for m, (t, r) in by_rows.items()),
        )
    logger.info("[glm-engine] fp8 GEMMs timed in %.1f s", time.perf_counter() - start)


# A step of one-token steps and prompt chunks that continue cached context, each of at most this many
# tokens (a follow-up question, a conversation turn, image tokens included), replays the decode graph with
# one row per token: the paged decode kernel attends each row over its context, split across thread
# blocks, where a flash call over the gathered context keeps a handful busy (on an H200 a follow-up's
# attention went 2.95 -> 0.80 ms per step, its step 17.0 -> 13.9 ms).
CHUNK_DECODE_ROWS = 64


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        num_blocks: int,
        sampler: Sampler,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        image_processor_config: dict[str, Any] | None = None,
    ) -> None:
        """``enforce_eager``: no CUDA graphs. ``image_processor_config``: the checkpoint's
        preprocessor_config.json (image_mean, image_std, rescale_factor) for uint8 image inputs; None: CLIP
        mean/std and 1/255."""
        self.model = model
        self.model_config = model_config
        self.engine_config = engine_config
        self.block_size = engine_config.block_size
        self.device = torch.device(engine_config.device)
        if self.device.type == "cuda" and self.device.index is None:  # the loop thread sets it by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.sampler = sampler
        use_graphs = self.device.type == "cuda" and not enforce_eager
        proc = image_processor_config or {}
        vision = model_config.vision_config
        self.patch_normalizer = PatchNormalizer(
            vision.patch_dim,
            tuple(proc.get("image_mean", CLIP_MEAN)),
            tuple(proc.get("image_std", CLIP_STD)),
            float(proc.get("rescale_factor", 1 / 255)),
            self.device,
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )
        # With async_vision on CUDA the ViT runs on a stream of its own, beside the decode steps.
        self.vision_stream = (
            torch.cuda.Stream(self.device)
            if self.device.type == "cuda" and engine_config.async_vision
            else None
        )
        if self.device.type == "cuda":
            # cuDNN attention builds a plan for every new sequence length (~70 ms each): every new prompt
            # length would pay it in its TTFT. Flash / memory-efficient SDPA need no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # block id num_blocks is the scratch block of graph padding rows (never handed out)
        self.scratch_block_id = num_blocks
        self.kv_caches = model.allocate_kv_caches(
            num_blocks + 1, self.block_size, self.device, engine_config.torch_dtype
        )  # per layer [2, num_blocks + 1, block_size, num_kv_heads, head_dim]
        self.graphs: DecodeGraphs | None = None
        self.chunk_decode_rows = CHUNK_DECODE_ROWS
        self.prefill_graphs: PrefillGraphs | None = None
        if (
            use_graphs
            and engine_config.prefill_cuda_graphs
            and fresh_prefill_supported(model.dtype, model_config.head_dim)
        ):
            self.prefill_graphs = PrefillGraphs(
                model,
                self.kv_caches,
                self.block_size,
                max_num_tokens=engine_config.max_num_batched_tokens,
                scratch_block_id=self.scratch_block_id,
                max_context=max_model_len or engine_config.max_model_len,
                max_decodes=engine_config.max_num_seqs if engine_config.mixed_step_graphs else 0,
                max_blocks_per_seq=-(-(max_model_len or engine_config.max_model_len) // self.block_size),
                mixed_chunk_tokens=engine_config.max_num_prefill_tokens_with_decodes
                or engine_config.max_num_batched_tokens,
            )
        if use_graphs:
            max_len = max_model_len or engine_config.max_model_len
            self.graphs = DecodeGraphs(
                model,
                self.kv_caches,
                self.block_size,
                max_num_seqs=engine_config.max_num_seqs,
                max_num_blocks_per_seq=-(-max_len // self.block_size),
                scratch_block_id=self.scratch_block_id,
            )
        # decode_pdl "auto": what the trial of choose_decode_pdl measured (None: no trial ran)
        self.decode_pdl_trial: dict | None = None
        if engine_config.decode_pdl == "auto":
            self._choose_decode_pdl()

    def _choose_decode_pdl(self) -> None:
        if self.graphs is None or not fused.pdl_enabled():
            why = "no CUDA graphs" if self.graphs is None else "PDL cannot run here"
            fused.set_pdl(False)
            logger.info("[glm-engine] decode_pdl auto: off (%s)", why)
            return
        started = time.perf_counter()
        try:
            with torch.inference_mode(), torch.cuda.device(self.device):
                self.decode_pdl_trial = choose_decode_pdl(self.graphs)
        except Exception as exc:  # a capture that fails with PDL: serve without it, not fail the start
            fused.set_pdl(False)
            logger.warning("[glm-engine] decode_pdl auto: off (%s: %s)", type(exc).__name__, str(exc)[:200])
            return
        trial = self.decode_pdl_trial
        logger.info(
            "[glm-engine] decode_pdl auto: %s (decode graph ms without / with PDL: %s; timed in %.1f s)",
            "on" if trial["pdl"] else "off",
            ", ".join(f"batch {b} {trial['off'][b]:.3f} / {trial['on'][b]:.3f}" for b in trial["off"]),
            time.perf_counter() - started,
        )

    # -- the ViT -----------------------------------------------------------------------------------------

    def encode_images(
        self, images: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """One packed ViT forward over ``images`` ((raw pixels: uint8 patches, float pixel values or flat
        RGB; grid [1, 3]) each) -> (embeddings [sum(image tokens), hidden], event). On the vision stream
        the forward is launched without waiting and the event is recorded after it (`wait_vision` before
        use); else it runs at once and the event is None."""
        stream = self.vision_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with (
            torch.inference_mode(),
            torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(),
        ):
            embeds = self.model.encode_images(*self._vision_inputs(images))
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return embeds, ready

    def start_images(self, images: list[tuple[torch.Tensor, torch.Tensor]]) -> VisionPass:
        """`encode_images` to run a few blocks at a time on the decoder's stream: the patch embedding
        now, then `advance_images` until it returns True (``.out`` holds the embeddings)."""
        with torch.inference_mode():
            return self.model.start_images(*self._vision_inputs(images))

    def advance_images(self, vision_pass: VisionPass, num_blocks: int) -> bool:
        """The next ``num_blocks`` ViT blocks of ``vision_pass``; whether its embeddings are done."""
        with torch.inference_mode():
            return self.model.visual.advance(vision_pass, num_blocks)

    def _vision_inputs(self, images: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel values [N, patch_dim] on the device, grids [n, 3] on the CPU) of ``images``: (pixels, grid)
        each, or (flat RGB, grid, (height, width)) for an image not yet at its grid's size, which is resized
        here on the device as PIL's bicubic resize does."""
        pixels = [self.patch_normalizer(self._at_grid_size(*image), image[1]) for image in images]
        return torch.cat(pixels), torch.cat([image[1] for image in images]).to(torch.int64).cpu()

    def _at_grid_size(
        self, rgb: torch.Tensor, grid: torch.Tensor, source: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Flat RGB ``rgb`` of a ``source`` (height, width) image resized to its grid's size (flat), on the
        device; ``rgb`` as it is without a source size."""
        if source is None:
            return rgb
        from engine.processing.resample import resize_bicubic

        patch = self.model_config.vision_config.patch_size
        _, grid_h, grid_w = (int(v) for v in grid[0].tolist())
        height, width = source
        image = rgb.view(height, width, 3).to(self.device, non_blocking=True)
        return resize_bicubic(image, (grid_w * patch, grid_h * patch)).reshape(-1)

    def wait_vision(self, embeds: torch.Tensor, ready: torch.cuda.Event) -> None:
        """Order the decoder's stream after a launched ViT forward that produced ``embeds``."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        embeds.record_stream(current)

    def warm_up_vision(self) -> None:
        """One mid-size image through the ViT, so the first real image pays no kernel start-up."""
        vision = self.model_config.vision_config
        side = 16 * vision.spatial_merge_size
        with torch.inference_mode():
            self.model.encode_images(
                torch.zeros(side * side, vision.patch_dim, device=self.device),
                torch.tensor([[1, side, side]]),
            )

    @property
    def has_idle_work(self) -> bool:
        """Whether `idle_work` has something to do (cuDNN plans of image lengths met so far, with
        ``vision_attention`` "auto")."""
        return bool(self.model.visual.attention_kernels.pending)

    def idle_work(self) -> None:
        """One piece of work for a moment without requests, on the thread that steps: cuDNN's plan for one
        image length the ViT met, so the next images of that size run cuDNN's attention (the build, tens to
        hundreds of ms, would otherwise hold a step every stream waits on)."""
        started = time.perf_counter()
        with torch.inference_mode():
            n = self.model.visual.build_attention_plan()
        if n is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            kernels = self.model.visual.attention_kernels
            logger.info(
                "[glm-engine] ViT attention for %d patches: %s (%.0f ms)",
                n,
                "cuDNN plan built" if n in kernels.planned else "cuDNN cannot take it, flash it stays",
                (time.perf_counter() - started) * 1e3,
            )

    def capture_cuda_graphs(self) -> None:
        """Capture all decode and prefill CUDA graphs now (start-up; no-op on CPU or with enforce_eager)."""
        with torch.inference_mode():
            for name, graphs in (
                ("prefill, context and mixed-step", self.prefill_graphs),
                ("decode", self.graphs),
            ):
                if graphs is None:
                    continue
                started, before = time.perf_counter(), len(graphs.graphs)
                graphs.capture_all()
                logger.info(
                    "[glm-engine] captured %d %s CUDA graphs in %.1f s",
                    len(graphs.graphs) - before,
                    name,
                    time.perf_counter() - started,
                )

    # -- the decoder -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int | None]:
        counts = out.num_scheduled_tokens
        if self.graphs is not None and all(
            n == 1 or (n <= self.chunk_decode_rows and seq.num_computed_tokens)
            for seq, n in zip(out.seqs, counts, strict=True)
        ):  # one-token steps and short continuation chunks: one decode-graph row per token
            hidden = self.graphs.run(out.seqs, counts=counts)  # [sum(counts), hidden] or None
            if hidden is not None:
                return self._sample(out, [(hidden, self._last_rows(out))])
        if self.prefill_graphs is not None:
            parts = self._execute_split(out)
            if parts is not None:
                return self._sample(out, parts)
        input_ids, positions, input_embeds, attn, sample_rows = self.prepare(out)
        hidden = self.model.forward(input_ids, positions, attn, self.kv_caches, input_embeds)  # [T, hidden]
        return self._sample(out, [(hidden, sample_rows)])

    @torch.inference_mode()
    def launch_decode(
        self,
        seqs: list,
        previous: PendingDecode | None = None,
        before_sample: Callable[[], PreparedMasks | None] | None = None,
    ) -> PendingDecode | None:
        """Launch a one-token step of ``seqs`` (all decoding, all `Sampler.can_run_ahead`) from a decode
        graph, and its sampling, without waiting for the GPU. With ``previous``, each sequence's input is
        its token of that step, still on the device, one position past the host's state.
        ``before_sample``, when given, is called after the forward is launched and before it is sampled:
        it reads ``previous``'s tokens on the host (while the forward runs) and returns the grammar masks
        of the sequences whose sampling `needs_last_token`, fed those tokens (`Sampler.prepare_masks`), or
        None. None (nothing launched, ``before_sample`` not called) when no graph fits."""
        if self.graphs is None:
            return None
        input_ids = None
        if previous is not None:
            rows = {id(seq): j for j, seq in enumerate(previous.seqs)}
            index = [rows[id(seq)] for seq in seqs]
            input_ids = previous.token_ids
            if index != list(range(len(previous.seqs))):
                input_ids = input_ids[torch.tensor(index).to(input_ids.device, non_blocking=True)]
        hidden = self.graphs.run(seqs, input_ids)
        if hidden is None:
            return None
        logits = self.model.compute_logits(hidden)
        prepared = before_sample() if before_sample is not None else None
        ahead = int(previous is not None)  # previous's tokens are not in the sequences yet
        token_ids = self.sampler.sample_ids(logits, seqs, ahead=ahead, prepared=prepared)  # [n], device
        if token_ids.is_cuda:
            host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            host.copy_(token_ids, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return PendingDecode(seqs, token_ids, host, ready)
        return PendingDecode(seqs, token_ids, token_ids, None)

    @staticmethod
    def _last_rows(out: SchedulerOutput) -> list[tuple[int, int]]:
        """(index into out.seqs, row) of the sequences that sample, their chunks' rows packed in order."""
        rows, end = [], 0
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_scheduled_tokens, strict=True)):
            end += n
            if seq.num_computed_tokens + n == len(seq):
                rows.append((i, end - 1))
        return rows

    @staticmethod
    def _one_token_rows(seqs: list, indices) -> list[tuple[int, int]]:
        """(index into seqs, row) of one-token steps that sample; row j holds the j-th of ``indices``."""
        return [(i, j) for j, i in enumerate(indices) if seqs[i].num_computed_tokens + 1 == len(seqs[i])]

    def _sample(
        self, out: SchedulerOutput, parts: list[tuple[torch.Tensor, list[tuple[int, int]]]]
    ) -> list[int | None]:
        """One token for each (index into out.seqs, row) of each (hidden states, rows) part."""
        sampled: list[int | None] = [None] * len(out.seqs)
        picked, order = [], []
        for hidden, rows in parts:
            if not rows:
                continue
            if all(row == k for k, (_, row) in enumerate(rows)):
                picked.append(hidden[: len(rows)])  # the leading rows: no gather
            else:
                index = torch.tensor([row for _, row in rows]).to(hidden.device, non_blocking=True)
                picked.append(hidden.index_select(0, index))
            order += [i for i, _ in rows]
        if order:
            hidden = picked[0] if len(picked) == 1 else torch.cat(picked)
            logits = self.model.compute_logits(hidden)  # [num_sampling, vocab] fp32
            token_ids = self.sampler(logits, [out.seqs[i] for i in order])
            for i, token_id in zip(order, token_ids, strict=True):
                sampled[i] = token_id
        return sampled

    def _execute_split(self, out: SchedulerOutput) -> list[tuple[torch.Tensor, list[tuple[int, int]]]] | None:
        """Run a step of prompt chunks (+ one-token steps) from a decode graph and a prefill graph.

        Chunks that all start at position 0 replay a fresh prefill graph; chunks with cached context
        (prefix-cache hits, later chunks of a long prompt) replay a context graph. Returns the
        (hidden, rows) parts `_sample` takes, or None (nothing run) when no graph fits the step."""
        seqs, scheduled = out.seqs, out.num_scheduled_tokens
        fresh = [i for i, seq in enumerate(seqs) if seq.num_computed_tokens == 0 or scheduled[i] > 1]
        if not fresh:
            return None
        fresh_set = set(fresh)
        others = [i for i in range(len(seqs)) if i not in fresh_set]
        if others:
            parts = self._execute_mixed(out, others, fresh)
            if parts is not None:
                return parts
        counts = [scheduled[i] for i in fresh]
        context_lens = None
        if any(seqs[i].num_computed_tokens for i in fresh):
            context_lens = [seqs[i].num_computed_tokens + scheduled[i] for i in fresh]
            if not self.prefill_graphs.fits_context(counts, context_lens):
                return None
        elif not self.prefill_graphs.fits(counts):
            return None
        if others and self.graphs is None:
            return None
        # The fresh part's inputs first: preparing them copies host lists to the GPU and waits for it,
        # so done between the two replays it would stall the GPU behind the host.
        sub = SchedulerOutput(seqs=[out.seqs[i] for i in fresh], num_scheduled_tokens=counts)
        input_ids, positions, input_embeds, attn, sample_rows = self.prepare(sub)
        if input_embeds is None:
            input_embeds = self.model.language_model.embed_tokens(input_ids)
        parts = []
        if others:
            hidden = self.graphs.run([out.seqs[i] for i in others])  # own pool: survives the prefill replay
            if hidden is None:
                return None
            parts.append((hidden, self._one_token_rows(out.seqs, others)))
        if context_lens is None:
            hidden = self.prefill_graphs.run(input_embeds, positions, attn.slot_mapping, counts)
        else:
            tables = [seqs[i].block_table for i in fresh]
            hidden = self.prefill_graphs.run_context(
                input_embeds, positions, attn.slot_mapping, counts, context_lens, tables
            )
        parts.append((hidden, [(fresh[j], row) for j, row in sample_rows]))
        return parts

    def _execute_mixed(
        self, out: SchedulerOutput, decodes: list[int], chunks: list[int]
    ) -> list[tuple[torch.Tensor, list[tuple[int, int]]]] | None:
        """Run the one-token steps ``decodes`` and the prompt chunks ``chunks`` of ``out`` through one mixed
        graph (`PrefillGraphs.mixed_key`): one pass over the weights. None when no mixed graph fits."""
        graphs = self.prefill_graphs
        seqs, scheduled = out.seqs, out.num_scheduled_tokens
        decoding = [seqs[i] for i in decodes]
        counts = [scheduled[i] for i in chunks]
        context_lens = [seqs[i].num_computed_tokens + scheduled[i] for i in chunks]
        key = graphs.mixed_key(
            len(decodes), counts, context_lens, max(len(seq.block_table) for seq in decoding)
        )
        if key is None:
            return None
        order = decodes + chunks
        sub = SchedulerOutput(
            seqs=[seqs[i] for i in order], num_scheduled_tokens=[scheduled[i] for i in order]
        )
        input_ids, positions, input_embeds, attn, sample_rows = self.prepare(sub)
        if input_embeds is None:
            input_embeds = self.model.language_model.embed_tokens(input_ids)
        block_size = self.block_size
        slots = [
            seq.block_table[seq.num_computed_tokens // block_size] * block_size
            + seq.num_computed_tokens % block_size
            for seq in decoding
        ]
        hidden = graphs.run_mixed(
            key,
            input_embeds,
            positions,
            attn.slot_mapping,
            slots,
            [seq.num_computed_tokens + 1 for seq in decoding],
            [seq.block_table for seq in decoding],
            counts,
            context_lens,
            [seqs[i].block_table for i in chunks],
        )
        return [(hidden, [(order[j], row) for j, row in sample_rows])]

    def prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, AttentionMetadata, list[tuple[int, int]]]:
        """Flatten a step into (input_ids [T], positions [3, T], input_embeds [T, hidden] | None, attn,
        [(seq index, row of its last token)] for the sequences that sample)."""
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []  # each [3, n]
        query_lens: list[int] = []
        seq_lens: list[int] = []
        image_parts: list[tuple[int, int, torch.Tensor]] = []  # (first row in batch, seq, embeds)
        sample_rows: list[tuple[int, int]] = []
        for i, (seq, num_tokens) in enumerate(zip(out.seqs, out.num_scheduled_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.append(self.positions(seq, start, end))
            if seq.image_token_indices:
                first, last = seq.image_rows(start, end)
                if last > first:
                    image_parts.append((offset, i, seq.image_embeds[first:last]))
            query_lens.append(num_tokens)
            seq_lens.append(end)
            if end == len(seq):
                sample_rows.append((i, offset + num_tokens - 1))

        ids = torch.tensor(input_ids, dtype=torch.long)  # [T]
        device_ids = to_device(ids, self.device)
        input_embeds = None
        if image_parts:
            embeds = self.model.language_model.embed_tokens(device_ids)  # [T, hidden]
            is_image = ids == self.model_config.image_token_id
            for offset, i, rows in image_parts:
                n = out.num_scheduled_tokens[i]
                idx = torch.nonzero(is_image[offset : offset + n]).squeeze(1) + offset
                embeds[to_device(idx, self.device)] = rows.to(self.device, embeds.dtype)
            input_embeds = embeds
        attn = AttentionMetadata.build(
            query_lens, seq_lens, [seq.block_table for seq in out.seqs], self.block_size, self.device
        )
        return (
            device_ids,
            to_device(torch.cat(positions, dim=1), self.device),
            input_embeds,
            attn,
            sample_rows,
        )

    @staticmethod
    def positions(seq, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions [3, end - start] of tokens [start, end) of ``seq``."""
        num_prompt = seq.num_prompt_tokens
        parts = []
        if start < num_prompt:
            prompt_end = min(end, num_prompt)
            if seq.mrope_positions is None:
                parts.append(torch.arange(start, prompt_end, dtype=torch.long).expand(3, -1))
            else:
                parts.append(seq.mrope_positions[:, start:prompt_end].long())
        if end > num_prompt:
            first = max(start, num_prompt)
            parts.append(torch.arange(first, end, dtype=torch.long).add_(seq.mrope_delta).expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
