"""The engine's front door: requests in, per-step token outputs out, one loop thread.

Contract:
  * ``add_request(req) -> request_id`` validates at once (ValueError naming the field: sampling params,
    empty or too long prompt, image_embeds rows or image_patches/image_grid_thw vs image tokens,
    mrope_positions shape, duplicate id) and queues the request; it joins the running batch at the next
    step.
  * Images come either encoded (``image_embeds``) or as patches (``image_patches`` uint8 RGB or float
    pixel values, with ``image_grid_thw``): the loop thread then runs the ViT itself, packing the patches
    of several requests into one forward (at most ``max_num_vision_patches``), just ahead of their prefill
    (it encodes more only while the prefill queue holds less than one step of tokens). The embeddings
    stay on the device.
  * ``step() -> list[RequestOutput]``: one scheduler step. A request gets an output in a step when it got
    new tokens or finished; ``new_token_ids`` are the tokens not returned before (a request preempted by
    recompute never returns a token twice). Every request's last output has ``finish_reason`` set:
    "stop" (eos, stop id, stop string), "length" (max_tokens, max_model_len) or "abort"; its KV blocks are
    free by then. A model error ends the requests of that batch with "abort" and ``error`` set.
  * ``abort(request_id)``: the request ends within the next step with an "abort" output (unknown or
    finished ids are ignored).
  * ``add_request``, ``abort``, ``stats`` and ``has_unfinished`` may be called from any thread; ``step``
    from one thread at a time: the loop thread after ``start(callback)``, else the caller.
  * ``start(callback)`` runs ``step()`` on a thread while there is work (it sleeps on a condition when
    idle) and calls ``callback(outputs)`` after each step with outputs. ``stop()`` ends the loop; requests
    still unfinished end with "abort". ``generate(req)`` is an async iterator over one request's outputs
    (it starts the loop if needed; leaving the iterator early aborts the request).
  * With a tokenizer (``from_engine_dir`` loads ``tokenizer.json``), outputs also carry ``text`` and
    ``reasoning`` deltas and ``GenerationRequest.stop_strings`` end sequences inside the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer, think_token_ids
from engine.image_cache import ImageCache
from engine.metrics import EngineStats
from engine.model_runner import ModelRunner, PendingDecode, num_kv_blocks
from engine.sampling import Sampler, SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.structured import GrammarCompiler, GrammarState, Guide

logger = logging.getLogger("glm-engine")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image processor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    image_embeds: torch.Tensor | None = None
    """[num_image_tokens, hidden], rows in prompt order."""
    image_patches: torch.Tensor | None = None
    """The images for the executor to encode: uint8 RGB patches [num_patches, patch_dim], float pixel
    values [num_patches, patch_dim], or the resized RGB images flat [sum(H*W*3)] uint8 (stills; patchified
    and normalized on the device). Exclusive with image_embeds."""
    image_grid_thw: torch.Tensor | None = None
    """[num_images, 3] (t, h, w) patches per image, with image_patches."""
    image_hashes: list[bytes] | None = None
    """Content hash of each image as the model sees it (resized pixels and their size), for the prefix and
    image-embedding caches; None: the executor hashes image_patches itself (host tensors only)."""
    mrope_positions: torch.Tensor | None = None
    """[3, prompt_len] int64; None: text-only (arange)."""
    mrope_delta: int = 0
    """Position of output token i (i >= prompt_len) is i + mrope_delta."""
    arrival_time: float = field(default_factory=time.monotonic)
    stop_strings: tuple[str, ...] = ()
    """Strings that end the sequence (needs the executor's tokenizer)."""
    is_thinking: bool = False
    """The output starts inside <think> (routes text to ``reasoning`` until </think>)."""
    guide: Guide | None = None
    """Hold the answer to a JSON schema, any JSON, a regex or a grammar (engine.structured; needs the
    executor's tokenizer). Compiled in ``add_request`` (cached by guide)."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    """None while running; then "stop" | "length" | "abort"."""
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    text: str = ""
    """Answer text delta (with a tokenizer)."""
    reasoning: str = ""
    """Reasoning text delta (with a tokenizer)."""
    error: str | None = None
    """Why the engine aborted the request, when it was not asked to."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (not computed for this request)."""
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] | None = None
    """With ``sampling.logprobs`` set: (logprob, top (token id, logprob) pairs) of each new token."""

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _VisionBatch:
    """Requests whose images one ViT forward encodes: each one's plan (image index -> rows at hand, or
    None until ``embeds`` is split) and the (request, image index) jobs in ``embeds`` order."""

    plans: list[tuple[Sequence, dict[int, torch.Tensor | None]]]
    jobs: list[tuple[Sequence, int]]
    embeds: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # recorded on the vision stream after the forward (CUDA)


class Executor:
    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        weights_dir: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        enforce_eager: bool | None = None,
        image_processor_config: dict[str, Any] | None = None,
    ) -> None:
        """Load the model (``weights_dir``; None: random weights of the config's shape, unless ``model``
        is given), size and allocate the KV cache, build scheduler, sampler and runner.
        ``enforce_eager=True`` turns CUDA graphs off (None: EngineConfig.enforce_eager if it exists).
        ``image_processor_config``: the checkpoint's preprocessor_config.json (image_mean, image_std,
        rescale_factor) for uint8 ``image_patches``; None: CLIP mean/std and 1/255."""
        from engine.decoder import Glm4vModel
        from engine.vision import PatchNormalizer

        self.model_config = model_config
        self.engine_config = engine_config
        self.device = torch.device(engine_config.device)
        if self.device.type == "cuda" and self.device.index is None:  # the loop thread sets it by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        if model is None:
            if weights_dir is None:
                model = Glm4vModel.dummy(model_config, self.device, engine_config.dtype, engine_config.seed)
            else:
                model = Glm4vModel.from_pretrained(
                    weights_dir, self.device, engine_config.dtype, model_config
                )
        if engine_config.quantization == "fp8":  # before KV sizing: the freed 16-bit weights go to the cache
            from engine.quant import quantize_decoder_fp8_, weight_bytes

            before = weight_bytes(model)
            swapped = quantize_decoder_fp8_(model)  # in place (a given model too); FP8 layers are kept
            logger.info(
                "[glm-engine] fp8: %d decoder linear layers quantized; weights %.2f GB -> %.2f GB",
                swapped,
                before / 1e9,
                weight_bytes(model) / 1e9,
            )
        self.model = model
        if (
            engine_config.vision_cuda_graphs
            and self.device.type == "cuda"
            and not (
                getattr(engine_config, "enforce_eager", False) if enforce_eager is None else enforce_eager
            )
        ):
            model.visual.enable_cuda_graphs(max_patches=max(16384, engine_config.max_num_vision_patches))
        block_size = engine_config.block_size
        num_blocks = num_kv_blocks(
            engine_config, model_config.kv_bytes_per_token(engine_config.dtype), self.device
        )
        self.max_model_len = min(engine_config.max_model_len, num_blocks * block_size)
        if self.max_model_len < engine_config.max_model_len:
            logger.warning(
                "[glm-engine] KV cache holds %d tokens (%d blocks): max_model_len %d capped to %d",
                num_blocks * block_size,
                num_blocks,
                engine_config.max_model_len,
                self.max_model_len,
            )
        logger.info("[glm-engine] KV cache: %d blocks of %d tokens", num_blocks, block_size)
        self.block_manager = BlockManager(
            num_blocks, block_size, enable_prefix_caching=engine_config.enable_prefix_caching
        )
        self.image_cache = ImageCache(engine_config.image_cache_mb << 20)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=engine_config.max_num_seqs,
            max_num_batched_tokens=engine_config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=model_config.eos_token_ids,
            enable_chunked_prefill=engine_config.enable_chunked_prefill,
            max_num_prefill_tokens_with_decodes=engine_config.max_num_prefill_tokens_with_decodes,
        )
        self.runner = ModelRunner(
            model,
            model_config,
            engine_config,
            num_blocks,
            Sampler(model_config.eos_token_ids),
            max_model_len=self.max_model_len,
            enforce_eager=enforce_eager,
        )
        proc = image_processor_config or {}
        self.patch_normalizer = PatchNormalizer(
            model_config.vision_config.patch_dim,
            tuple(proc.get("image_mean", CLIP_MEAN)),
            tuple(proc.get("image_std", CLIP_STD)),
            float(proc.get("rescale_factor", 1 / 255)),
            self.device,
            patch_size=model_config.vision_config.patch_size,
            merge_size=model_config.vision_config.spatial_merge_size,
            temporal_patch_size=model_config.vision_config.temporal_patch_size,
        )
        self._vision_waiting: list[Sequence] = []  # loop thread only: images not encoded yet, FIFO
        # On CUDA the ViT runs on a stream of its own, beside the decode steps: a launched batch waits
        # here (loop thread only) until its event has passed, then joins the scheduler.
        self._vision_stream = (
            torch.cuda.Stream(self.device)
            if self.device.type == "cuda" and engine_config.async_vision
            else None
        )
        self._vision_inflight: _VisionBatch | None = None
        self.tokenizer = tokenizer
        self.think_start_id, self.think_end_id = think_token_ids(tokenizer) if tokenizer else (None, None)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._seqs: dict[str, Sequence] = {}  # unfinished requests by id
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._new_seqs: list[Sequence] = []  # added, not yet handed to the scheduler
        self._aborted_ids: set[str] = set()
        self._streams: dict[str, Callable[[RequestOutput], None]] = {}  # generate() queues
        self._stats = EngineStats(num_blocks_total=num_blocks)
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._callback: Callable[[list[RequestOutput]], None] | None = None
        self._pending: PendingDecode | None = None  # loop thread only: a launched decode step (see step)
        self._grammar_compiler: GrammarCompiler | None = None  # made on the first guided request

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, **overrides: Any) -> Executor:
        """Executor for a ``glmv-build`` engine directory; ``overrides`` replace EngineConfig fields."""
        engine_dir = Path(engine_dir)
        config_file = engine_dir / "engine_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"engine_config.json not found in {engine_dir}")
        raw = json.loads(config_file.read_text())
        engine_config = EngineConfig.from_dict({**raw.get("engine", {}), **overrides})
        model_config = ModelConfig.from_pretrained(engine_dir)
        is_dummy = bool(raw.get("dummy", raw.get("build", {}).get("dummy", False)))
        tokenizer = None
        if (engine_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        processor_file = engine_dir / "preprocessor_config.json"
        processor = json.loads(processor_file.read_text()) if processor_file.is_file() else None
        return cls(
            model_config,
            engine_config,
            None if is_dummy else engine_dir,
            tokenizer=tokenizer,
            image_processor_config=processor,
        )

    # -- requests (any thread) ----------------------------------------------------------------------

    def add_request(self, req: GenerationRequest) -> str:
        return self._add(req, None)

    def _add(self, req: GenerationRequest, stream: Callable[[RequestOutput], None] | None) -> str:
        seq = self._make_seq(req)
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, req.stop_strings, req.is_thinking, self.think_start_id, self.think_end_id
            )
        with self._cond:
            if req.request_id in self._seqs:
                raise ValueError(f"request_id: {req.request_id!r} is already in use by an unfinished request")
            self._seqs[req.request_id] = seq
            if detokenizer is not None:
                self._detokenizers[req.request_id] = detokenizer
            if stream is not None:
                self._streams[req.request_id] = stream
            self._new_seqs.append(seq)
            self._cond.notify_all()
        return req.request_id

    def _make_seq(self, req: GenerationRequest) -> Sequence:
        """Validate ``req`` (ValueError naming the field) and build its Sequence."""
        if not isinstance(req.request_id, str) or not req.request_id:
            raise ValueError(f"request_id: {req.request_id!r} must be a non-empty string")
        req.sampling.validate()
        prompt = [int(t) for t in req.prompt_token_ids]
        self.scheduler.check_prompt(len(prompt))
        num_tokens = len(prompt) + req.sampling.max_tokens
        if num_tokens > self.max_model_len:  # min_tokens <= max_tokens: also what min_tokens can never reach
            raise ValueError(
                f"max_tokens: prompt {len(prompt)} + max_tokens {req.sampling.max_tokens} = {num_tokens} "
                f"tokens, over the limit of {self.max_model_len} tokens (max_model_len, capped at the KV "
                "cache capacity)"
            )
        vocab_size = self.model_config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {vocab_size})")
        num_image_tokens = prompt.count(self.model_config.image_token_id)
        if req.image_patches is not None or req.image_grid_thw is not None:
            self._check_patches(req, num_image_tokens)
            num_rows = num_image_tokens
        else:
            num_rows = 0 if req.image_embeds is None else req.image_embeds.shape[0]
        if num_rows != num_image_tokens:
            raise ValueError(
                f"image_embeds: {num_rows} rows for {num_image_tokens} image tokens "
                f"(id {self.model_config.image_token_id}) in prompt_token_ids"
            )
        if req.image_embeds is not None and tuple(req.image_embeds.shape[1:]) != (
            self.model_config.hidden_size,
        ):
            raise ValueError(
                f"image_embeds: shape {tuple(req.image_embeds.shape)} must be "
                f"[num_image_tokens, {self.model_config.hidden_size}]"
            )
        if req.mrope_positions is not None and tuple(req.mrope_positions.shape) != (3, len(prompt)):
            raise ValueError(
                f"mrope_positions: shape {tuple(req.mrope_positions.shape)} must be [3, {len(prompt)}]"
            )
        if req.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings: this executor has no tokenizer to match stop strings")
        generator = None
        if req.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        has_patches = req.image_patches is not None and req.image_patches.shape[0] > 0
        image_sizes = image_hashes = input_offsets = None
        if has_patches:
            grid = req.image_grid_thw
            merge_area = self.model_config.vision_config.spatial_merge_size**2
            image_sizes = [int(t * h * w) // merge_area for t, h, w in grid.tolist()]
            input_offsets = self._image_input_offsets(req.image_patches, grid)
            image_hashes = self._image_hashes(req, input_offsets)
        seq = Sequence(
            req.request_id,
            prompt,
            req.sampling,
            image_embeds=req.image_embeds,
            image_patches=req.image_patches if has_patches else None,
            image_grid_thw=req.image_grid_thw if has_patches else None,
            mrope_positions=req.mrope_positions,
            mrope_delta=int(req.mrope_delta),
            image_token_id=self.model_config.image_token_id,
            image_sizes=image_sizes,
            image_hashes=image_hashes,
            arrival_time=req.arrival_time,
            generator=generator,
        )
        seq.image_input_offsets = input_offsets
        if req.guide is not None:
            if req.sampling.min_tokens:
                raise ValueError(
                    f"min_tokens: {req.sampling.min_tokens} must be 0 with guided_decoding_guide "
                    "(the grammar decides where the answer ends)"
                )
            seq.grammar = GrammarState(self.grammar_compiler().compile(req.guide))
        return seq

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of guided requests' grammars (one per executor, its cache keyed by guide)."""
        with self._lock:
            if self._grammar_compiler is None:
                if self.tokenizer is None:
                    raise ValueError(
                        "guided_decoding_guide: this executor has no tokenizer to build a grammar"
                    )
                self._grammar_compiler = GrammarCompiler(
                    self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids
                )
            return self._grammar_compiler

    def _image_input_offsets(self, patches: torch.Tensor, grid: torch.Tensor) -> list[tuple[int, int]]:
        """[start, end) of each image in ``patches`` along dim 0 (bytes of flat RGB, else patch rows)."""
        offsets, start = [], 0
        for i in range(grid.shape[0]):
            if patches.ndim == 1:
                size = self.patch_normalizer.rgb_size(grid[i : i + 1])
            else:
                size = int(grid[i].prod())
            offsets.append((start, start + size))
            start += size
        return offsets

    def _image_hashes(self, req: GenerationRequest, offsets: list[tuple[int, int]]) -> list[bytes] | None:
        """The request's image hashes, checked; computed from host patches when it gave none."""
        grid = req.image_grid_thw
        if req.image_hashes is not None:
            hashes = [bytes(h) for h in req.image_hashes]
            if len(hashes) != grid.shape[0] or not all(hashes):
                raise ValueError(
                    f"image_hash: {len(hashes)} hashes for {grid.shape[0]} images (one non-empty hash each)"
                )
            return hashes
        patches = req.image_patches
        if patches.device.type != "cpu":
            return None
        data = patches.contiguous().view(torch.uint8).numpy() if patches.dtype != torch.uint8 else None
        hashes = []
        for (start, end), thw in zip(offsets, grid.tolist(), strict=True):
            h = hashlib.blake2b(b"%d,%d,%d;%s" % (*thw, str(patches.dtype).encode()), digest_size=16)
            if data is None:
                h.update(patches[start:end].contiguous().numpy())
            else:
                row = data.shape[-1]
                h.update(data.reshape(-1, row)[start:end])
            hashes.append(h.digest())
        return hashes

    def _check_patches(self, req: GenerationRequest, num_image_tokens: int) -> None:
        vision = self.model_config.vision_config
        merge = vision.spatial_merge_size
        if req.image_embeds is not None:
            raise ValueError(
                "image_patches: give image_patches with image_grid_thw, or image_embeds, not both"
            )
        if req.image_patches is None or req.image_grid_thw is None:
            missing = "image_grid_thw" if req.image_grid_thw is None else "image_patches"
            raise ValueError(f"{missing}: image_patches and image_grid_thw go together")
        grid = req.image_grid_thw
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.dtype.is_floating_point:
            raise ValueError(
                f"image_grid_thw: shape {tuple(grid.shape)} {grid.dtype} must be [n, 3] integers"
            )
        for t, h, w in grid.tolist():
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise ValueError(
                    f"image_grid_thw: {[t, h, w]} must have t, h, w >= 1 and h, w divisible by {merge}"
                )
        num_patches = int(grid.prod(dim=1).sum()) if grid.shape[0] else 0
        patches = req.image_patches
        if patches.ndim == 1:  # the resized RGB images, flat: stills only
            if patches.dtype != torch.uint8:
                raise ValueError(f"image_patches: flat RGB images must be uint8, not {patches.dtype}")
            if any(t != 1 for t in grid[:, 0].tolist()):
                raise ValueError(f"image_grid_thw: flat RGB images are stills (t = 1), got {grid.tolist()}")
            expected = self.patch_normalizer.rgb_size(grid)
            if patches.shape[0] != expected:
                raise ValueError(
                    f"image_patches: {patches.shape[0]} bytes of RGB, image_grid_thw {grid.tolist()} needs "
                    f"{expected}"
                )
        elif tuple(patches.shape) != (num_patches, vision.patch_dim):
            raise ValueError(
                f"image_patches: shape {tuple(patches.shape)} must be [{num_patches}, {vision.patch_dim}] "
                f"for image_grid_thw {grid.tolist()}"
            )
        if patches.dtype != torch.uint8 and not patches.dtype.is_floating_point:
            raise ValueError(f"image_patches: dtype {patches.dtype} must be uint8 or floating point")
        if num_patches // merge**2 != num_image_tokens:
            raise ValueError(
                f"image_patches: {num_patches // merge**2} image tokens for {num_image_tokens} image tokens "
                f"(id {self.model_config.image_token_id}) in prompt_token_ids"
            )

    def warmup(self) -> None:
        """Run one throw-away request (a full-budget prefill chunk, then decodes) so the first real request
        pays no kernel start-up, then capture the CUDA graphs. Call before serving (no request running)."""
        num_tokens = max(1, min(self.engine_config.max_num_batched_tokens, self.max_model_len - 2))
        vision = self.model_config.vision_config
        side = 16 * vision.spatial_merge_size  # one mid-size image warms the ViT's kernels
        with torch.inference_mode():
            self.model.encode_images(
                torch.zeros(side * side, vision.patch_dim, device=self.device),
                torch.tensor([[1, side, side]]),
            )
        self.add_request(
            GenerationRequest("__warmup__", [0] * num_tokens, SamplingParams(max_tokens=2, ignore_eos=True))
        )
        while self.has_unfinished():
            self.step()
        self.capture_cuda_graphs()

    def capture_cuda_graphs(self) -> None:
        """Capture all decode and prefill CUDA graphs now (start-up; no-op on CPU or with enforce_eager)."""
        with torch.inference_mode():
            if self.runner.prefill_graphs is not None:
                self.runner.prefill_graphs.capture_all()
            if self.runner.graphs is not None:
                self.runner.graphs.capture_all()

    def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._seqs:
                self._aborted_ids.add(request_id)
                self._cond.notify_all()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._seqs)

    def stats(self) -> EngineStats:
        with self._lock:
            return dataclasses.replace(
                self._stats,
                num_waiting=self._stats.num_waiting + len(self._new_seqs),
                is_loop_running=self._thread is not None and self._thread.is_alive(),
                # counters the loop thread only adds to: read here, not copied after every step
                prefix_cache=self.block_manager.stats,
                num_image_cache_hits=self.image_cache.num_hits,
                num_image_cache_misses=self.image_cache.num_misses,
                image_cache_bytes=self.image_cache.num_bytes,
            )

    # -- one step (one thread) ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs it produced.

        Decode steps run one ahead of the host where they can (`_run_ahead`): a decode-only step that
        replays a CUDA graph is launched without waiting for its tokens; the next call launches the step
        after it (its input tokens still on the GPU) and only then reads the first one's tokens, so the
        host's work for one step overlaps the GPU's work for the next."""
        started = time.monotonic()
        with self._lock:
            new_seqs, self._new_seqs = self._new_seqs, []
            aborted_ids, self._aborted_ids = self._aborted_ids, set()
        outputs: list[RequestOutput] = []
        pending, self._pending = self._pending, None
        if pending is not None:
            if not new_seqs and not aborted_ids:
                ahead = self._run_ahead(pending)
                if ahead is not None:
                    outputs = self._resolve(pending)
                    self._pending = ahead
                    self._finish_step(outputs, started, len(ahead.seqs), 1)
                    return outputs
            outputs = self._resolve(pending)
        for seq in new_seqs:
            if seq.image_patches is not None:
                self._vision_waiting.append(seq)
            else:
                self.scheduler.add(seq)
        for request_id in sorted(aborted_ids):
            seq = self._seqs.get(request_id)
            if seq is None or seq.is_finished:
                continue
            self._finish(seq, "abort")
            outputs.append(self._output(seq))
        outputs += self._encode_waiting_images()

        out = self.scheduler.schedule()
        for seq in out.preempted:
            if seq.missing_image_end and seq.status == SequenceStatus.WAITING:
                # its cached prefix is gone with its blocks: the skipped images may need the ViT now
                self.scheduler.waiting.remove(seq)
                self._vision_waiting.insert(0, seq)
        num_tokens = out.num_batched_tokens
        if not out.is_empty:
            launched = self._launch_decode(out)
            if launched is not None:
                self._pending = launched
            else:
                try:
                    sampled = self.runner.execute(out)
                except Exception as exc:  # the batch's requests end; the engine keeps serving the others
                    logger.exception("[glm-engine] model step failed; aborting %d requests", len(out.seqs))
                    for seq in out.seqs:
                        self.scheduler.finish(seq, "abort")
                        outputs.append(self._output(seq, error=f"engine error: {exc}"))
                    sampled = []
                    out.seqs, out.num_scheduled_tokens = [], []
                self.scheduler.update(out, sampled, time.monotonic())
                for seq, token_id in zip(out.seqs, sampled, strict=True):
                    if token_id is not None:
                        outputs.append(self._output(seq))
        self._finish_step(outputs, started, num_tokens, 0 if out.is_empty else 1)
        return outputs

    def _launch_decode(self, out: SchedulerOutput) -> PendingDecode | None:
        """Launch ``out`` without waiting for its tokens when it is a decode-only step that a CUDA graph
        replays and every sequence can be sampled ahead; else None (the caller runs it synchronously)."""
        if self.runner.graphs is None or any(n != 1 for n in out.num_scheduled_tokens):
            return None
        sampler = self.runner.sampler
        if not all(seq.num_output_tokens and sampler.can_run_ahead(seq) for seq in out.seqs):
            return None
        try:
            return self.runner.launch_decode(out.seqs)
        except Exception:  # the synchronous path runs the step again and reports its error
            logger.exception("[glm-engine] decode launch failed; running the step synchronously")
            return None

    def _run_ahead(self, pending: PendingDecode) -> PendingDecode | None:
        """Launch the decode step after ``pending`` before its tokens are read, when nothing else could be
        scheduled: nothing waiting, every running sequence in ``pending``, each sampled ahead, and blocks
        for one more position. Sequences that ``pending``'s token ends by length sit it out; one that
        ends on a stop token or string runs one step for nothing (its result is dropped)."""
        if (
            self.scheduler.waiting
            or self._vision_waiting
            or self._vision_inflight is not None
            or len(self.scheduler.running) != len(pending.seqs)
        ):
            return None
        sampler = self.runner.sampler
        seqs = []
        for seq in pending.seqs:
            if seq.status != SequenceStatus.RUNNING:
                return None
            if seq.num_output_tokens + 1 >= seq.sampling.max_tokens or len(seq) + 1 >= self.max_model_len:
                continue
            if not sampler.can_run_ahead(seq):
                return None
            seqs.append(seq)
        blocks = self.block_manager
        if not seqs or sum(blocks.num_missing_blocks(seq, 2) for seq in seqs) > blocks.num_free_blocks:
            return None
        for seq in seqs:
            blocks.allocate(seq, 2)  # the position after pending's token
        try:
            return self.runner.launch_decode(seqs, previous=pending)
        except Exception:
            logger.exception("[glm-engine] decode launch failed; running the next step synchronously")
            return None

    def _resolve(self, pending: PendingDecode) -> list[RequestOutput]:
        """Read ``pending``'s tokens and apply them like a synchronous step (sequences that ended in the
        meantime are skipped)."""
        tokens = pending.tokens()
        live = [
            (seq, t)
            for seq, t in zip(pending.seqs, tokens, strict=True)
            if seq.status == SequenceStatus.RUNNING
        ]
        out = SchedulerOutput([seq for seq, _ in live], [1] * len(live))
        self.scheduler.update(out, [t for _, t in live], time.monotonic())
        return [self._output(seq) for seq in out.seqs]

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` in the scheduler, or before it got there (images not encoded yet)."""
        inflight = self._vision_inflight
        if any(s is seq for s in self._vision_waiting) or (
            inflight is not None and any(s is seq for s, _ in inflight.plans)
        ):
            self._vision_waiting = [s for s in self._vision_waiting if s is not seq]
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
            seq.image_patches = seq.image_grid_thw = None
        else:
            self.scheduler.finish(seq, reason)

    def _encode_waiting_images(self) -> list[RequestOutput]:
        """Give the oldest waiting requests their image embeddings, then hand them to the scheduler.

        Each request first maps its cached prefix (`BlockManager.match_prefix`): images wholly inside it
        need no embeddings. The others come from the image cache by hash, else from one packed ViT
        forward over the batch (at most max_num_vision_patches patches). Runs only while the prefill
        queue holds less than one step of tokens, so images are encoded just ahead of their prefill and
        decodes are not held up by encoding far ahead."""
        outputs = self._collect_vision()
        if not self._vision_waiting or self._vision_inflight is not None:
            return outputs
        queued = sum(len(s) - s.num_computed_tokens for s in self.scheduler.waiting)
        if queued >= self.engine_config.max_num_batched_tokens:
            return outputs
        budget = self.engine_config.max_num_vision_patches
        batch, num_patches = [], 0
        for seq in self._vision_waiting:
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            needed = self._images_to_embed(seq)
            n = sum(int(seq.image_grid_thw[i].prod()) for i in needed if not self._has_embeds(seq, i))
            if batch and num_patches + n > budget:
                break
            batch.append((seq, needed))
            num_patches += n
        self._vision_waiting = self._vision_waiting[len(batch) :]
        plans = [(seq, self._lookup_embeds(seq, needed)) for seq, needed in batch]
        jobs = [(seq, i) for seq, plan in plans for i, rows in plan.items() if rows is None]
        vision = _VisionBatch(plans, jobs)
        try:
            if jobs:
                self._launch_vision(vision)
        except Exception as exc:  # these requests end; the engine keeps serving the others
            return outputs + self._fail_vision(vision, exc)
        if vision.ready is not None:
            self._vision_inflight = vision
            return outputs
        return outputs + self._finish_vision(vision)

    def _collect_vision(self) -> list[RequestOutput]:
        """Hand the launched ViT batch to the scheduler once its stream has passed its event."""
        vision = self._vision_inflight
        if vision is None:
            return []
        if not self.scheduler.running and not self.scheduler.waiting:
            vision.ready.synchronize()  # nothing else to run: wait here rather than spin
        elif not vision.ready.query():
            return []
        self._vision_inflight = None
        torch.cuda.current_stream(self.device).wait_event(vision.ready)
        vision.embeds.record_stream(torch.cuda.current_stream(self.device))
        return self._finish_vision(vision)

    def _finish_vision(self, vision: _VisionBatch) -> list[RequestOutput]:
        """Split the batch's ViT output per image (into the image cache), give each request its
        embeddings and hand it to the scheduler (requests aborted meanwhile are skipped)."""
        try:
            offset = 0
            by_seq = {id(seq): plan for seq, plan in vision.plans}
            for seq, i in vision.jobs:
                start, end, image_hash = seq.image_spans[i]
                rows = vision.embeds[offset : offset + end - start]
                offset += end - start
                by_seq[id(seq)][i] = rows
                self.image_cache.put(image_hash, rows)
        except Exception as exc:
            return self._fail_vision(vision, exc)
        for seq, plan in vision.plans:
            if seq.is_finished:
                continue
            self._assemble_embeds(seq, plan)
            self.scheduler.add(seq)
        return []

    def _fail_vision(self, vision: _VisionBatch, exc: Exception) -> list[RequestOutput]:
        logger.exception("[glm-engine] vision encoder failed; aborting %d requests", len(vision.plans))
        outputs = []
        for seq, _ in vision.plans:
            if seq.is_finished:
                continue
            self.block_manager.free(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            seq.image_patches = seq.image_grid_thw = None
            outputs.append(self._output(seq, error=f"vision encoder error: {exc}"))
        return outputs

    def _images_to_embed(self, seq: Sequence) -> list[int]:
        """Indices of the images of ``seq`` with tokens past its computed (cached) prefix."""
        return [i for i, (_, end, _) in enumerate(seq.image_spans) if end > seq.num_computed_tokens]

    def _has_embeds(self, seq: Sequence, i: int) -> bool:
        """Whether ``seq.image_embeds`` already holds valid rows for image ``i`` (or the cache does)."""
        start, _, image_hash = seq.image_spans[i]
        if seq.image_embeds is not None and start >= seq.missing_image_end:
            return True
        return image_hash in self.image_cache

    def _lookup_embeds(self, seq: Sequence, needed: list[int]) -> dict[int, torch.Tensor | None]:
        """Image index -> embedding rows already at hand (earlier rows of ``seq`` or the image cache), or
        None (to encode)."""
        plan: dict[int, torch.Tensor | None] = {}
        row = 0
        for i, (start, end, image_hash) in enumerate(seq.image_spans):
            rows = None
            if i in needed:
                if seq.image_embeds is not None and start >= seq.missing_image_end:
                    rows = seq.image_embeds[row : row + end - start]
                else:
                    rows = self.image_cache.get(image_hash)
                plan[i] = rows
            row += end - start
        return plan

    def _launch_vision(self, vision: _VisionBatch) -> None:
        """One packed ViT forward over the images of ``vision.jobs`` into ``vision.embeds``: on the vision
        stream without waiting (``vision.ready`` is recorded after it), or at once on CPU."""
        stream = self._vision_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with (
            torch.inference_mode(),
            torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(),
        ):
            pixels, grids = [], []
            for seq, i in vision.jobs:
                start, end = seq.image_input_offsets[i]
                grid = seq.image_grid_thw[i : i + 1]
                pixels.append(self.patch_normalizer(seq.image_patches[start:end], grid))
                grids.append(grid)
            grid = torch.cat(grids).to(torch.int64).cpu()
            vision.embeds = self.model.encode_images(torch.cat(pixels), grid)  # [sum(image tokens), hidden]
            if stream is not None:
                vision.ready = torch.cuda.Event()
                vision.ready.record(stream)

    def _assemble_embeds(self, seq: Sequence, plan: dict[int, torch.Tensor | None]) -> None:
        """Set ``seq.image_embeds`` from ``plan``; images not in it (inside the cached prefix) get unwritten
        rows, and ``missing_image_end`` marks them. The images' inputs are dropped once every image has
        its rows (kept otherwise: a preemption may need them encoded after all)."""
        if not plan:
            seq.image_embeds = None
            seq.missing_image_end = seq.image_spans[-1][1]
            return
        hidden = self.model_config.hidden_size
        parts, missing_end = [], 0
        for i, (start, end, _) in enumerate(seq.image_spans):
            rows = plan.get(i)
            if rows is None:
                first = next(iter(plan.values()))
                rows = torch.empty(end - start, hidden, dtype=first.dtype, device=first.device)
                missing_end = end
            parts.append(rows)
        seq.image_embeds = parts[0] if len(parts) == 1 else torch.cat(parts)
        seq.missing_image_end = missing_end
        if not missing_end:
            seq.image_patches = seq.image_grid_thw = None

    def _output(self, seq: Sequence, error: str | None = None) -> RequestOutput:
        """The output of ``seq`` for this step: its unreturned tokens and text; ends it on a stop string."""
        first = seq.num_emitted_tokens
        new_token_ids = seq.output_token_ids[first:]
        seq.num_emitted_tokens = seq.num_output_tokens
        logprobs = None if seq.sampling.logprobs is None else seq.logprobs[first : seq.num_output_tokens]
        text = reasoning = ""
        detokenizer = self._detokenizers.get(seq.seq_id)
        if detokenizer is not None:
            sampling = seq.sampling
            text_ids = new_token_ids
            if seq.finish_reason == "stop" and new_token_ids and new_token_ids[-1] in sampling.stop_token_ids:
                text_ids = new_token_ids[:-1]  # a stop id ends the text, it is not part of it
            delta = detokenizer.add(text_ids)
            if delta.stopped and not seq.is_finished:
                self.scheduler.finish(seq, "stop")
            if seq.is_finished:
                tail = detokenizer.finish()
                delta.text += tail.text
                delta.reasoning += tail.reasoning
            text, reasoning = delta.text, delta.reasoning
        return RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=new_token_ids,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            last_token_time=seq.last_token_time,
            text=text,
            reasoning=reasoning,
            error=error,
            num_cached_tokens=seq.num_cached_tokens or 0,
            logprobs=logprobs,
        )

    def _finish_step(
        self, outputs: list[RequestOutput], started: float, num_tokens: int, num_steps: int
    ) -> None:
        now = time.monotonic()
        finished = [o for o in outputs if o.is_finished]
        stats = self._stats
        with self._lock:
            for o in finished:
                self._seqs.pop(o.request_id, None)
                self._detokenizers.pop(o.request_id, None)
                self._aborted_ids.discard(o.request_id)
            self._stats = dataclasses.replace(
                stats,
                num_waiting=len(self.scheduler.waiting)
                + len(self._vision_waiting)
                + (len(self._vision_inflight.plans) if self._vision_inflight is not None else 0),
                num_running=len(self.scheduler.running),
                num_blocks_used=self.block_manager.num_used_blocks,
                num_preemptions=self.scheduler.num_preemptions,
                num_steps=stats.num_steps + num_steps,
                num_finished=stats.num_finished + len(finished),
                num_prompt_tokens=stats.num_prompt_tokens + sum(o.num_prompt_tokens for o in finished),
                num_generation_tokens=stats.num_generation_tokens
                + sum(len(o.new_token_ids) for o in outputs),
                last_step_time=now if num_steps else stats.last_step_time,
                last_step_duration=now - started if num_steps else stats.last_step_duration,
                last_step_num_tokens=num_tokens if num_steps else stats.last_step_num_tokens,
            )

    def abort_all(self) -> list[RequestOutput]:
        """End every unfinished request with "abort" now (call from the stepping thread)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.tokens()  # let the launched step finish; its tokens are dropped with the requests
        with self._lock:
            new_seqs, self._new_seqs = self._new_seqs, []
            self._aborted_ids.clear()
        for seq in new_seqs:
            self.scheduler.add(seq)  # scheduler.finish ends them; patches waiting for the ViT are dropped
            seq.image_patches = seq.image_grid_thw = None
        outputs = []
        inflight, self._vision_inflight = self._vision_inflight, None
        for seq in self._vision_waiting + ([s for s, _ in inflight.plans] if inflight is not None else []):
            if seq.is_finished:
                continue
            self.block_manager.free(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            seq.image_patches = seq.image_grid_thw = None
            outputs.append(self._output(seq))
        self._vision_waiting = []
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, "abort")
            outputs.append(self._output(seq))
        self._finish_step(outputs, time.monotonic(), 0, 0)
        return outputs

    # -- loop thread ------------------------------------------------------------------------------------

    def start(self, callback: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """Run the step loop on a thread; ``callback(outputs)`` after each step that has outputs."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("start: the loop thread is already running")
            self._callback = callback
            self._is_stopping = False
            self._thread = threading.Thread(target=self._loop, name="glm-engine-loop", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after its current step; unfinished requests end with "abort"."""
        with self._cond:
            thread = self._thread
            self._is_stopping = True
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        if self.device.type == "cuda":
            # The current CUDA device is per thread: streams and graphs made here must be on ours.
            torch.cuda.set_device(self.device)
        while True:
            with self._cond:
                while not self._is_stopping and not self._seqs:
                    self._cond.wait()
                if self._is_stopping:
                    break
            try:
                outputs = self.step()
            except Exception:
                logger.exception("[glm-engine] step failed; aborting all requests")
                outputs = self.abort_all()
            self._dispatch(outputs)
        self._dispatch(self.abort_all())

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        with self._lock:
            streams = [(self._streams.get(o.request_id), o) for o in outputs]
            for o in outputs:
                if o.is_finished:
                    self._streams.pop(o.request_id, None)
        for stream, o in streams:
            if stream is not None:
                stream(o)
        if self._callback is not None:
            try:
                self._callback(outputs)
            except Exception:
                logger.exception("[glm-engine] output callback failed")

    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Outputs of ``req`` as they come (the last one has finish_reason set)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._add(req, lambda o: loop.call_soon_threadsafe(queue.put_nowait, o))
        with self._lock:
            is_running = self._thread is not None and self._thread.is_alive() and not self._is_stopping
        if not is_running:
            try:
                self.start()
            except RuntimeError:  # another caller started it in between
                pass
        is_finished = False
        try:
            while not is_finished:
                output = await queue.get()
                is_finished = output.is_finished
                yield output
        finally:
            if not is_finished:
                with self._lock:
                    self._streams.pop(req.request_id, None)
                self.abort(req.request_id)
