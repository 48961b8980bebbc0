"""What a caller gives the engine (GenerationRequest) and gets back for each step (RequestOutput)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.sample.sampler import SamplingParams
from engine.sample.structured import Guide


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    image_embeds: torch.Tensor | None = None
    """[num_image_tokens, hidden], rows in prompt order. With image_grid_thw and image_hashes (the images'
    sizes and identities, e.g. from ``LLMEngine.held_image_embeds``) their blocks are cached by content."""
    image_pixels: torch.Tensor | None = None
    """The images for the engine to encode: uint8 RGB patches [num_patches, patch_dim], float pixel
    values [num_patches, patch_dim], or the resized RGB images flat [sum(H*W*3)] uint8 (stills; patchified
    and normalized on the device). Exclusive with image_embeds."""
    image_grid_thw: torch.Tensor | None = None
    """[num_images, 3] (t, h, w) patches per image, with image_pixels (or with image_embeds)."""
    image_source_sizes: torch.Tensor | None = None
    """[num_images, 2] int64 (height, width) of each flat RGB image in image_pixels when they are not yet at
    their image_grid_thw's size: the engine resizes them on its device as PIL's bicubic resize does
    (engine.processing.resample), bit for bit. None: every image is at its grid's size."""
    image_hashes: list[bytes] | None = None
    """Content hash of each image as the model sees it (resized pixels and their size), for the prefix and
    image-embedding caches; None: the engine hashes image_pixels itself (host tensors only)."""
    image_refs: list[str] | None = None
    """The images as files of the host's shared resize directory (engine.processing.resize_cache), in
    place of image_pixels, with image_grid_thw and image_hashes: the engine takes their embeddings from its
    image cache when it holds every one, else reads the files (each checked against its hash and grid)."""
    mrope_positions: torch.Tensor | None = None
    """[3, prompt_len] int64; None: text-only (arange)."""
    mrope_delta: int = 0
    """Position of output token i (i >= prompt_len) is i + mrope_delta."""
    arrival_time: float = field(default_factory=time.monotonic)
    stop_strings: tuple[str, ...] = ()
    """Strings that end the sequence (needs the engine's tokenizer)."""
    is_thinking: bool = False
    """The output starts inside <think> (routes text to ``reasoning`` until </think>)."""
    guide: Guide | None = None
    """Hold the answer to a JSON schema, any JSON, a regex or a grammar (engine.sample.structured; needs the
    engine's tokenizer). Compiled in ``add_request`` (cached by guide)."""


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
