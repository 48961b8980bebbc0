"""The engine's front door: requests in, per-step token outputs out, one loop thread.

Wiring (docs/DESIGN.md has the room map): ``InputProcessor`` checks a request and builds its sequence on
the caller's thread; ``EngineCore`` (scheduler, vision queue, KV blocks, caches) steps on one thread and
drives ``ModelRunner``, the one door into the model; ``OutputProcessor`` turns sequences into outputs.

Contract:
  * ``add_request(req) -> request_id`` validates at once (ValueError naming the field: sampling params,
    empty or too long prompt, image_embeds rows or image_pixels/image_grid_thw vs image tokens,
    mrope_positions shape, duplicate id) and queues the request; it joins the running batch at the next
    step.
  * Images come either encoded (``image_embeds``) or as patches (``image_pixels`` uint8 RGB or float
    pixel values, with ``image_grid_thw``): the engine then runs the ViT itself, packing the patches of
    several requests into one forward just ahead of their prefill (``engine.core.vision_queue``). The
    embeddings stay on the device. ``held_image_embeds(hashes)`` (any thread) hands out the embeddings
    the image cache holds for every one of those images, or None. A request may name its images by their
    files in the host's shared resize directory (``image_refs``; engines made by ``from_engine_dir``):
    ``add_request`` takes their held embeddings, else reads the files.
  * ``step() -> list[RequestOutput]``: one step (``engine.core.engine_core``). ``new_token_ids`` are the
    tokens not returned before (a request preempted by recompute never returns a token twice). Every
    request's last output has ``finish_reason`` set: "stop" (eos, stop id, stop string), "length"
    (max_tokens, max_model_len) or "abort"; its KV blocks are free by then.
  * ``abort(request_id)``: the request ends within the next step with an "abort" output (unknown or
    finished ids are ignored).
  * ``add_request``, ``abort``, ``stats`` and ``has_unfinished`` may be called from any thread; ``step``
    from one thread at a time: the loop thread after ``start(callback)``, else the caller.
  * ``start(callback)`` runs ``step()`` on a thread while there is work (when idle it does the runner's
    ``idle_work``, cuDNN plans of the image sizes met, one at a time, then sleeps on a condition) and calls
    ``callback(outputs)`` after each step with outputs. ``stop()`` ends the loop; requests
    still unfinished end with "abort". ``generate(req)`` is an async iterator over one request's outputs
    (it starts the loop if needed; leaving the iterator early aborts the request).
  * With a tokenizer (``from_engine_dir`` loads ``tokenizer.json``), outputs also carry ``text`` and
    ``reasoning`` deltas and ``GenerationRequest.stop_strings`` end sequences inside the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig, EngineDir, ModelConfig
from engine.core.engine_core import EngineCore
from engine.core.gc_watch import freeze_heap, gc_watch, unfreeze_heap
from engine.core.sequence import Sequence
from engine.core.stats import EngineStats
from engine.processing.input_processor import InputProcessor
from engine.processing.output_processor import OutputProcessor
from engine.request import GenerationRequest, RequestOutput
from engine.runner.model_runner import ModelRunner, load_model, num_kv_blocks, prepare_model
from engine.sample.sampler import Sampler, SamplingParams
from engine.sample.structured import GrammarCompiler

logger = logging.getLogger("glm-engine")


class LLMEngine:
    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        weights_dir: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        enforce_eager: bool = False,
        image_processor_config: dict[str, Any] | None = None,
    ) -> None:
        """Load the model (``weights_dir``; None: random weights of the config's shape, unless ``model``
        is given), size and allocate the KV cache, build the processors, core and runner.
        ``enforce_eager=True`` turns CUDA graphs off. ``image_processor_config``: the checkpoint's
        preprocessor_config.json for uint8 ``image_pixels``; None: CLIP mean/std and 1/255."""
        self.model_config = model_config
        self.engine_config = engine_config
        device = torch.device(engine_config.device)
        if device.type == "cuda" and device.index is None:  # the loop thread sets it by index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if model is None:
            model = load_model(model_config, engine_config, device, weights_dir)
        prepare_model(model, engine_config, device, enforce_eager)
        self.model = model
        block_size = engine_config.block_size
        num_blocks = num_kv_blocks(
            engine_config, model_config.kv_bytes_per_token(engine_config.dtype), device
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
        self.runner = ModelRunner(
            model,
            model_config,
            engine_config.replace(device=str(device)),
            num_blocks,
            Sampler(model_config.eos_token_ids),
            max_model_len=self.max_model_len,
            enforce_eager=enforce_eager,
            image_processor_config=image_processor_config,
        )
        self.tokenizer = tokenizer
        self.output_processor = OutputProcessor(tokenizer)
        self.core = EngineCore(
            model_config, engine_config, self.runner, num_blocks, self.max_model_len, self.output_processor
        )
        self.input_processor = InputProcessor(
            model_config, self.max_model_len, self.core.scheduler.check_prompt, device, tokenizer
        )

        self._gc = gc_watch()
        self._num_gc_frozen = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._seqs: dict[str, Sequence] = {}  # unfinished requests by id
        self._new_seqs: list[Sequence] = []  # added, not yet handed to the core
        self._aborted_ids: set[str] = set()
        self._streams: dict[str, Callable[[RequestOutput], None]] = {}  # generate() queues
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._callback: Callable[[list[RequestOutput]], None] | None = None
        self._loop_stream: torch.cuda.Stream | None = None  # the loop thread's own stream, if it has one
        self.image_ref_dir_name: str | None = None  # the shared resize directory's name (from_engine_dir)
        self.num_image_refs_held = 0  # images sent as image_refs whose embeddings the image cache held
        self.num_image_refs_read = 0  # images sent as image_refs read from their files
        self.num_image_refs_shared = 0  # images sent as image_refs whose pixels another request had read
        # the pixels read for image_refs, by (image hashes, sizes), while a request still holds them: requests
        # about one new image that arrive together read its file once (its embeddings are not cached yet)
        self._ref_pixels: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path | EngineDir, **overrides: Any) -> LLMEngine:
        """Engine for a ``glmv-build`` engine directory; ``overrides`` replace EngineConfig fields."""
        from engine.processing.resize_cache import shared_resize_dir_name

        d = engine_dir if isinstance(engine_dir, EngineDir) else EngineDir.open(engine_dir)
        engine = cls(
            d.model_config(),
            d.engine_config(**overrides),
            d.weights_dir,
            tokenizer=d.tokenizer(),
            image_processor_config=d.image_processor_config(),
        )
        engine.image_ref_dir_name = shared_resize_dir_name(d.path)
        return engine

    # the core's parts, for callers that inspect them (tests, probes)
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def image_cache(self):
        return self.core.image_cache

    # -- requests (any thread) ----------------------------------------------------------------------

    def add_request(self, req: GenerationRequest) -> str:
        return self._add(req, None)

    def _add(self, req: GenerationRequest, stream: Callable[[RequestOutput], None] | None) -> str:
        if req.image_refs:
            req = self._resolve_image_refs(req)
        seq = self.input_processor.process(req)
        with self._cond:
            if req.request_id in self._seqs:
                raise ValueError(f"request_id: {req.request_id!r} is already in use by an unfinished request")
            self._seqs[req.request_id] = seq
            self.output_processor.add(req)
            if stream is not None:
                self._streams[req.request_id] = stream
            self._new_seqs.append(seq)
            self._cond.notify_all()
        return req.request_id

    def _resolve_image_refs(self, req: GenerationRequest) -> GenerationRequest:
        """``req`` with its ``image_refs`` replaced by the images' held embeddings, or by their pixels read
        from the files (each checked against its hash; one whose file holds it at another size than its grid's
        goes with ``image_source_sizes``); ValueError naming ``image_ref[i]``."""
        from engine.processing.resize_cache import read_shared_ref, shared_ref_size

        self.input_processor.check_image_refs(req, self.image_ref_dir_name)
        refs, grid, hashes = req.image_refs, req.image_grid_thw, req.image_hashes
        embeds = self.held_image_embeds(hashes)
        if embeds is not None:
            self.num_image_refs_held += len(refs)
            return dataclasses.replace(req, image_refs=None, image_embeds=embeds)
        patch = self.model_config.vision_config.patch_size
        targets = [(int(h) * patch, int(w) * patch) for _, h, w in grid.tolist()]
        # a file may hold an image not yet at its grid's size: the runner resizes it on the device
        dims = [
            shared_ref_size(ref, self.image_ref_dir_name, f"image_ref[{i}]") for i, ref in enumerate(refs)
        ]
        sizes = [h * w * 3 for h, w in dims]
        sources = None if dims == targets else torch.tensor(dims, dtype=torch.int64)
        key = (tuple(bytes(h) for h in hashes), tuple(dims))
        pixels = self._ref_pixels.get(key)
        if pixels is not None:  # read for a request still in flight: the same bytes (never written to)
            self.num_image_refs_shared += len(refs)
            return dataclasses.replace(req, image_refs=None, image_pixels=pixels, image_source_sizes=sources)
        # every image read into one buffer, pinned on CUDA: no copy to join them or to pin them
        pinned = self.device.type == "cuda"
        flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pinned).numpy()
        start = 0
        for i, (ref, image_hash, size) in enumerate(zip(refs, hashes, sizes, strict=True)):
            field = f"image_ref[{i}]"
            _, file_hash = read_shared_ref(ref, self.image_ref_dir_name, field, flat[start : start + size])
            if file_hash.encode() != bytes(image_hash):
                raise ValueError(
                    f"{field}: the file holds image {file_hash}, not image_hash {bytes(image_hash).decode()}"
                )
            start += size
        self.num_image_refs_read += len(refs)
        pixels = self._ref_pixels[key] = torch.from_numpy(flat)
        return dataclasses.replace(req, image_refs=None, image_pixels=pixels, image_source_sizes=sources)

    def held_image_embeds(self, image_hashes: list[bytes]) -> torch.Tensor | None:
        """The embeddings [num_image_tokens, hidden] of these images one after the other, taken from the
        image cache, or None when it does not hold every one of them. A request that brings them as
        ``image_embeds`` (with ``image_grid_thw`` and ``image_hashes``, for the prefix cache) needs no
        pixels; the tensors stay valid whatever the cache drops afterwards."""
        parts = self.core.image_cache.get_all(image_hashes)
        if parts is None:
            return None
        if len(parts) == 1:
            return parts[0]
        # queued where the loop queues its steps (they read it), after the copies that stored the parts
        stream = self._loop_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return torch.cat(parts)

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of guided requests' grammars (one per engine, its cache keyed by guide)."""
        return self.input_processor.grammar_compiler()

    def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._seqs:
                self._aborted_ids.add(request_id)
                self._cond.notify_all()

    def is_running(self) -> bool:
        """Whether the loop thread (``start``) is alive."""
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._seqs)

    def stats(self) -> EngineStats:
        stats = self.core.stats
        with self._lock:
            num_new = len(self._new_seqs)
            is_running = self._thread is not None and self._thread.is_alive()
        cache = self.core.image_cache
        return dataclasses.replace(
            stats,
            num_waiting=stats.num_waiting + num_new,
            is_loop_running=is_running,
            # counters the stepping thread only adds to: read here, not copied after every step
            prefix_cache=self.core.block_manager.stats,
            num_image_cache_hits=cache.num_hits,
            num_image_cache_misses=cache.num_misses,
            image_cache_bytes=cache.num_bytes,
            num_image_refs_held=self.num_image_refs_held,
            num_image_refs_read=self.num_image_refs_read,
            num_image_refs_shared=self.num_image_refs_shared,
            num_gc_full_collections=self._gc.num_full,
            gc_full_seconds=self._gc.seconds,
            num_gc_frozen_objects=self._num_gc_frozen,
            num_grammars_compiled=self.input_processor.num_grammars_compiled(),
        )

    # -- stepping (one thread) ----------------------------------------------------------------------

    def warmup(self) -> None:
        """Run one throw-away request (a full-budget prefill chunk, then decodes) so the first real request
        pays no kernel start-up, run every sampling path once (`Sampler.warm_up`), then capture the CUDA
        graphs. Call before serving (no request running).
        Meanwhile a thread makes the grammar compiler (its view of the vocabulary: ~0.5 s for GLM's
        151,552 tokens), so the first guided request does not wait for it."""
        if self.tokenizer is not None:
            threading.Thread(target=self._make_grammar_compiler, name="glm-grammar-init", daemon=True).start()
        num_tokens = max(1, min(self.engine_config.max_num_batched_tokens, self.max_model_len - 2))
        self.runner.warm_up_vision()
        self.add_request(
            GenerationRequest("__warmup__", [0] * num_tokens, SamplingParams(max_tokens=2, ignore_eos=True))
        )
        while self.has_unfinished():
            self.step()
        self.runner.sampler.warm_up(self.model_config.vocab_size, self.device)
        self.runner.capture_cuda_graphs()

    def _make_grammar_compiler(self) -> None:
        try:
            self.grammar_compiler()
        except Exception as exc:  # no xgrammar here: guided requests say so when they come
            logger.info("[glm-engine] no grammar compiler at start (%s: %s)", type(exc).__name__, exc)

    def step(self) -> list[RequestOutput]:
        """One engine step (``EngineCore.step``); returns the outputs it produced."""
        with self._lock:
            new_seqs, self._new_seqs = self._new_seqs, []
            aborted_ids, self._aborted_ids = self._aborted_ids, set()
            aborted = [self._seqs[i] for i in sorted(aborted_ids) if i in self._seqs]
        outputs = self.core.step(new_seqs, aborted)
        self._retire(outputs)
        return outputs

    def abort_all(self) -> list[RequestOutput]:
        """End every unfinished request with "abort" now (call from the stepping thread)."""
        with self._lock:
            new_seqs, self._new_seqs = self._new_seqs, []
            self._aborted_ids.clear()
        outputs = self.core.abort_all(new_seqs)
        self._retire(outputs)
        return outputs

    def _retire(self, outputs: list[RequestOutput]) -> None:
        """Forget the requests that finished in ``outputs``."""
        with self._lock:
            for o in outputs:
                if o.is_finished:
                    self._seqs.pop(o.request_id, None)
                    self.output_processor.pop(o.request_id)
                    self._aborted_ids.discard(o.request_id)

    # -- loop thread ------------------------------------------------------------------------------------

    def start(self, callback: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """Run the step loop on a thread; ``callback(outputs)`` after each step that has outputs. What the
        process holds by then (the model, its graphs, the imports) is frozen for the garbage collector
        first (engine.core.gc_watch): a full collection then never walks it on the loop's thread."""
        frozen = freeze_heap()  # outside the lock: a collection may run finalizers
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("start: the loop thread is already running")
            self._num_gc_frozen = frozen
            self._callback = callback
            self._is_stopping = False
            self._thread = threading.Thread(target=self._loop, name="glm-engine-loop", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after its current step; unfinished requests end with "abort". The heap frozen by
        ``start`` is handed back to the collector (an engine made and dropped in a long-lived process must
        not keep what it froze)."""
        with self._cond:
            thread = self._thread
            self._is_stopping = True
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self._num_gc_frozen:
            unfreeze_heap()
            self._num_gc_frozen = 0

    def _loop(self) -> None:
        stream = contextlib.nullcontext()
        if self.device.type == "cuda":
            # The current CUDA device is per thread: streams and graphs made here must be on ours.
            torch.cuda.set_device(self.device)
            if self.runner.vision_stream is not None:
                # the ViT runs on its own stream beside the steps: where both wait for the GPU's
                # multiprocessors, the steps' kernels go first (a lower number is a higher priority)
                self._loop_stream = torch.cuda.Stream(self.device, priority=-5)
                stream = torch.cuda.stream(self._loop_stream)
        with stream:
            while True:
                with self._cond:
                    while not self._is_stopping and not self._seqs and not self.runner.has_idle_work:
                        self._cond.wait()
                    if self._is_stopping:
                        break
                    is_idle = not self._seqs
                if is_idle:  # no request: a piece of the runner's idle work, then look again
                    try:
                        self.runner.idle_work()
                    except Exception:
                        logger.exception("[glm-engine] idle work failed")
                    continue
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


__all__ = ["GenerationRequest", "LLMEngine", "RequestOutput", "SamplingParams"]
