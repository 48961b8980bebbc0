"""Requests in: checks a GenerationRequest (a ValueError naming the field and the limit) and builds its
Sequence: the prompt and sampling limits, the images' patches or embeddings against the image tokens, the
images' content hashes (for the prefix and image caches) and the compiled grammar of a guided request.
Runs on the caller's thread, before the request reaches the engine core."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import torch

from engine.config import ModelConfig
from engine.core.sequence import Sequence
from engine.request import GenerationRequest
from engine.sample.structured import GrammarCompiler, GrammarState, check_guide


class InputProcessor:
    def __init__(
        self,
        model_config: ModelConfig,
        max_model_len: int,
        check_prompt: Any,
        device: torch.device,
        tokenizer: Any = None,
        compile_grammars: bool = True,
    ) -> None:
        """``check_prompt(num_tokens)``: the scheduler's check that a prompt can ever be scheduled.
        ``compile_grammars=False``: a guided request's guide is only parsed (``check_guide``: the same errors
        but the rare one only compiling finds), for checks made where no engine runs."""
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.check_prompt = check_prompt
        self.device = device
        self.tokenizer = tokenizer
        self.compile_grammars = compile_grammars
        self._lock = threading.Lock()
        self._grammar_compiler: GrammarCompiler | None = None  # made on the first guided request

    def process(self, req: GenerationRequest) -> Sequence:
        """Validate ``req`` (ValueError naming the field) and build its Sequence."""
        if not isinstance(req.request_id, str) or not req.request_id:
            raise ValueError(f"request_id: {req.request_id!r} must be a non-empty string")
        req.sampling.validate()
        prompt = [int(t) for t in req.prompt_token_ids]
        self.check_prompt(len(prompt))
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
        embeds_by_image = req.image_embeds is not None and req.image_pixels is None
        if embeds_by_image and req.image_grid_thw is not None:
            # encoded images with their grids and hashes: their blocks can be cached like encoded pixels'
            self.check_grid(req.image_grid_thw)
            num_rows = req.image_embeds.shape[0]
            grid_rows = self.grid_tokens(req.image_grid_thw)
            if grid_rows != num_rows:
                raise ValueError(
                    f"image_grid_thw: {req.image_grid_thw.tolist()} gives {grid_rows} image tokens for "
                    f"{num_rows} rows of image_embeds"
                )
        elif req.image_pixels is not None or req.image_grid_thw is not None:
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
            raise ValueError("stop_strings: this engine has no tokenizer to match stop strings")
        generator = None
        if req.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        has_patches = req.image_pixels is not None and req.image_pixels.shape[0] > 0
        image_sizes = image_hashes = input_offsets = None
        if has_patches:
            grid = req.image_grid_thw
            merge_area = self.model_config.vision_config.spatial_merge_size**2
            image_sizes = [int(t * h * w) // merge_area for t, h, w in grid.tolist()]
            input_offsets = self._image_input_offsets(req.image_pixels, grid, req.image_source_sizes)
            image_hashes = self._image_hashes(req, input_offsets)
        elif embeds_by_image and req.image_grid_thw is not None and req.image_grid_thw.shape[0] > 0:
            merge_area = self.model_config.vision_config.spatial_merge_size**2
            image_sizes = [int(t * h * w) // merge_area for t, h, w in req.image_grid_thw.tolist()]
            image_hashes = self._given_hashes(req) if req.image_hashes is not None else None
        pixels = req.image_pixels if has_patches else None
        on_host = pixels is not None and not pixels.is_cuda and not pixels.is_pinned()
        if on_host and torch.device(self.device).type == "cuda":
            # Pinned here, on the caller's thread: a copy from pageable memory to the GPU waits for all the
            # work queued before it, so the ViT's input would hold the engine loop until the step launched
            # ahead of it has run; from pinned memory the copy is queued like a kernel.
            pixels = torch.empty_like(pixels, pin_memory=True).copy_(pixels)
        seq = Sequence(
            req.request_id,
            prompt,
            req.sampling,
            image_embeds=req.image_embeds,
            image_pixels=pixels,
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
        if has_patches and req.image_source_sizes is not None:
            seq.image_source_sizes = [(int(h), int(w)) for h, w in req.image_source_sizes.tolist()]
        if req.guide is not None:
            if req.sampling.min_tokens:
                raise ValueError(
                    f"min_tokens: {req.sampling.min_tokens} must be 0 with guided_decoding_guide "
                    "(the grammar decides where the answer ends)"
                )
            if self.compile_grammars:
                seq.grammar = GrammarState(self.grammar_compiler().compile(req.guide))
            else:
                self._require_tokenizer()
                check_guide(req.guide)
        return seq

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of guided requests' grammars (one per engine, its cache keyed by guide)."""
        with self._lock:
            if self._grammar_compiler is None:
                self._require_tokenizer()
                self._grammar_compiler = GrammarCompiler(
                    self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids
                )
            return self._grammar_compiler

    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError("guided_decoding_guide: this engine has no tokenizer to build a grammar")

    def num_grammars_compiled(self) -> int:
        """Guides compiled to grammars since start (cached ones are not compiled again)."""
        with self._lock:
            return 0 if self._grammar_compiler is None else self._grammar_compiler.num_compiled

    def _check_patches(self, req: GenerationRequest, num_image_tokens: int) -> None:
        vision = self.model_config.vision_config
        merge = vision.spatial_merge_size
        if req.image_embeds is not None:
            raise ValueError("image_pixels: give image_pixels with image_grid_thw, or image_embeds, not both")
        if req.image_pixels is None or req.image_grid_thw is None:
            missing = "image_grid_thw" if req.image_grid_thw is None else "image_pixels"
            raise ValueError(f"{missing}: image_pixels and image_grid_thw go together")
        grid = req.image_grid_thw
        self.check_grid(grid)
        num_patches = int(grid.prod(dim=1).sum()) if grid.shape[0] else 0
        patches = req.image_pixels
        if patches.ndim == 1:  # the resized RGB images, flat: stills only
            if patches.dtype != torch.uint8:
                raise ValueError(f"image_pixels: flat RGB images must be uint8, not {patches.dtype}")
            if any(t != 1 for t in grid[:, 0].tolist()):
                raise ValueError(f"image_grid_thw: flat RGB images are stills (t = 1), got {grid.tolist()}")
            sources = req.image_source_sizes
            if sources is not None:
                self._check_source_sizes(sources, grid)
                expected = int(sum(h * w for h, w in sources.tolist())) * 3
                if patches.shape[0] != expected:
                    raise ValueError(
                        f"image_pixels: {patches.shape[0]} bytes of RGB, image_source_sizes "
                        f"{sources.tolist()} need {expected}"
                    )
            else:
                expected = self._rgb_size(grid)
                if patches.shape[0] != expected:
                    raise ValueError(
                        f"image_pixels: {patches.shape[0]} bytes of RGB, image_grid_thw {grid.tolist()} needs "
                        f"{expected}"
                    )
        elif req.image_source_sizes is not None:
            raise ValueError("image_source_sizes: only with flat RGB images in image_pixels")
        elif tuple(patches.shape) != (num_patches, vision.patch_dim):
            raise ValueError(
                f"image_pixels: shape {tuple(patches.shape)} must be [{num_patches}, {vision.patch_dim}] "
                f"for image_grid_thw {grid.tolist()}"
            )
        if patches.dtype != torch.uint8 and not patches.dtype.is_floating_point:
            raise ValueError(f"image_pixels: dtype {patches.dtype} must be uint8 or floating point")
        if num_patches // merge**2 != num_image_tokens:
            raise ValueError(
                f"image_pixels: {num_patches // merge**2} image tokens for {num_image_tokens} image tokens "
                f"(id {self.model_config.image_token_id}) in prompt_token_ids"
            )

    def check_image_refs(self, req: GenerationRequest, dir_name: str | None) -> int:
        """Check a request that names its images by their files in the shared resize directory
        ``dir_name`` (``image_refs``: one per hash and grid row, each an entry's path there; refused alike
        whether or not the image cache holds the image); returns its image tokens. ValueError naming
        ``image_ref``."""
        from engine.processing.resize_cache import check_shared_ref

        refs, grid, hashes = req.image_refs, req.image_grid_thw, req.image_hashes
        if dir_name is None:
            raise ValueError("image_ref: this engine reads no shared image directory; send the pixels")
        if req.image_pixels is not None or req.image_embeds is not None:
            raise ValueError("image_ref: give the images' pixels, embeddings or references, one of them")
        if grid is None or hashes is None or not len(refs) == len(hashes) == grid.shape[0]:
            raise ValueError(
                f"image_ref: {len(refs)} references, {len(hashes or ())} hashes and "
                f"{0 if grid is None else grid.shape[0]} grid rows (one of each per image)"
            )
        for i, ref in enumerate(refs):
            check_shared_ref(ref, dir_name, f"image_ref[{i}]")
        self.check_grid(grid)
        return self.grid_tokens(grid)

    @staticmethod
    def _check_source_sizes(sources: torch.Tensor, grid: torch.Tensor) -> None:
        """ValueError naming image_source_sizes unless it is [n, 2] positive integers, one row per grid row."""
        if sources.ndim != 2 or sources.shape != (grid.shape[0], 2) or sources.dtype.is_floating_point:
            raise ValueError(
                f"image_source_sizes: shape {tuple(sources.shape)} {sources.dtype} must be "
                f"[{grid.shape[0]}, 2] integers (height, width per image)"
            )
        if bool((sources < 1).any()):
            raise ValueError(f"image_source_sizes: {sources.tolist()} must all be >= 1")

    def check_grid(self, grid: torch.Tensor) -> None:
        """ValueError naming image_grid_thw unless it is [n, 3] integers, each t, h, w >= 1, h and w whole merges."""
        merge = self.model_config.vision_config.spatial_merge_size
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.dtype.is_floating_point:
            raise ValueError(
                f"image_grid_thw: shape {tuple(grid.shape)} {grid.dtype} must be [n, 3] integers"
            )
        for t, h, w in grid.tolist():
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise ValueError(
                    f"image_grid_thw: {[t, h, w]} must have t, h, w >= 1 and h, w divisible by {merge}"
                )

    def grid_tokens(self, grid: torch.Tensor) -> int:
        """Image tokens of the images of ``grid`` (patches over the merge area)."""
        merge_area = self.model_config.vision_config.spatial_merge_size**2
        return sum(int(t * h * w) // merge_area for t, h, w in grid.tolist())

    def _rgb_size(self, grid: torch.Tensor) -> int:
        """Bytes of the flat RGB images of this grid (stills)."""
        patch = self.model_config.vision_config.patch_size
        return int(sum(h * w for _, h, w in grid.tolist())) * patch**2 * 3

    def _image_input_offsets(
        self, patches: torch.Tensor, grid: torch.Tensor, sources: torch.Tensor | None = None
    ) -> list[tuple[int, int]]:
        """[start, end) of each image in ``patches`` along dim 0 (bytes of flat RGB, at their source sizes
        when given, else patch rows)."""
        offsets, start = [], 0
        for i in range(grid.shape[0]):
            if sources is not None:
                size = int(sources[i, 0]) * int(sources[i, 1]) * 3
            else:
                size = self._rgb_size(grid[i : i + 1]) if patches.ndim == 1 else int(grid[i].prod())
            offsets.append((start, start + size))
            start += size
        return offsets

    @staticmethod
    def _given_hashes(req: GenerationRequest) -> list[bytes]:
        grid = req.image_grid_thw
        hashes = [bytes(h) for h in req.image_hashes]
        if len(hashes) != grid.shape[0] or not all(hashes):
            raise ValueError(
                f"image_hash: {len(hashes)} hashes for {grid.shape[0]} images (one non-empty hash each)"
            )
        return hashes

    def _image_hashes(self, req: GenerationRequest, offsets: list[tuple[int, int]]) -> list[bytes] | None:
        """The request's image hashes, checked; computed from host patches when it gave none."""
        grid = req.image_grid_thw
        if req.image_hashes is not None:
            return self._given_hashes(req)
        patches = req.image_pixels
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
