"""One request's state inside the engine.

Token regions of a sequence (``token_ids`` = prompt + output)::

    |<------------- num_prompt_tokens ------------->|<--- output tokens --->|
    |<--- num_computed_tokens (KV in cache) --->|<-- num_new_tokens -->|

``num_new_tokens`` is what still has to go through the model: the rest of the prompt while prefilling,
1 (the last sampled token) while decoding, the whole prompt + output after a preemption by recompute.
A step that reaches ``len(token_ids)`` samples one new token.
"""

from __future__ import annotations

import enum
import time
from bisect import bisect_left
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.sample.sampler import SamplingParams

if TYPE_CHECKING:
    from engine.sample.structured import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        image_embeds: torch.Tensor | None = None,
        image_pixels: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mrope_positions: torch.Tensor | None = None,
        mrope_delta: int = 0,
        image_token_id: int | None = None,
        image_sizes: list[int] | None = None,
        image_hashes: list[bytes] | None = None,
        arrival_time: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.image_embeds = image_embeds  # [num_image_tokens, hidden] in prompt order, or None
        # Images still to encode (the engine runs the ViT and sets image_embeds before scheduling):
        self.image_pixels = image_pixels  # [num_patches, patch_dim] uint8 RGB or float pixel values
        self.image_grid_thw = image_grid_thw  # [num_images, 3] int64
        self.mrope_positions = mrope_positions  # [3, num_prompt_tokens] int64, or None (text-only)
        self.mrope_delta = mrope_delta
        # prompt indices of image tokens, sorted: rows of image_embeds in the same order
        self.image_token_indices: list[int] = (
            [i for i, t in enumerate(prompt_token_ids) if t == image_token_id]
            if image_token_id is not None
            else []
        )
        # (start, end, content hash or None) of each image's tokens in the prompt, in order. Without
        # per-image sizes, one span covers all image tokens (no identity: its blocks are never cached).
        self.image_spans: list[tuple[int, int, bytes | None]] = _image_spans(
            self.image_token_indices, image_sizes, image_hashes
        )
        self.generator = generator
        self.grammar: GrammarState | None = (
            None  # guided decoding (engine.sample.structured); set by the input processor
        )
        # (logprob, top (token id, logprob) pairs) of output token i, when sampling.logprobs is set
        self.logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = []
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # prefix cache (engine.core.block_manager)
        self.block_hashes: list[bytes] = []  # hashes of the first full blocks of token_ids
        self.is_hash_stopped = False  # a block with an image of unknown identity: no hashes past it
        self.num_committed_blocks = 0  # leading blocks already offered to the cache
        self.is_prefix_queried = False  # its prompt was looked up in the cache since it last held blocks
        self.num_cached_tokens: int | None = None  # prompt tokens found in the cache at first admission
        self.missing_image_end = 0  # image tokens before this index have no embeddings (cache hit)
        self.image_input_offsets: list[tuple[int, int]] | None = (
            None  # each image's [start, end) in image_pixels
        )
        # each image's (height, width) in image_pixels when not at its grid's size (resized on the device)
        self.image_source_sizes: list[tuple[int, int]] | None = None
        self._positions_np = None
        self.finish_reason: str | None = None
        self.num_emitted_tokens = 0  # output tokens already handed to the caller
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, {self.status.name}, len={len(self)}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the last sampled token still needs a forward pass."""
        return self.num_new_tokens > 1 or self.num_output_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Rows [first, last) of image_embeds for the image tokens at token indices [start, end)."""
        return bisect_left(self.image_token_indices, start), bisect_left(self.image_token_indices, end)

    def positions_bytes(self, start: int, end: int) -> bytes:
        """The M-RoPE positions of tokens [start, end) as int64 bytes [3, end - start] (for block hashes):
        the same bytes for a token whether it is a prompt or an output token."""
        if self._positions_np is None:
            self._positions_np = self.mrope_positions.cpu().numpy().astype(np.int64)
        num_prompt = self.num_prompt_tokens
        if end <= num_prompt:
            return np.ascontiguousarray(self._positions_np[:, start:end]).tobytes()
        first = max(start, num_prompt)
        rows = np.broadcast_to(np.arange(first, end, dtype=np.int64) + self.mrope_delta, (3, end - first))
        if start < num_prompt:
            rows = np.concatenate([self._positions_np[:, start:num_prompt], rows], axis=1)
        return np.ascontiguousarray(rows).tobytes()

    def append_token(self, token_id: int, now: float) -> None:
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now


def _image_spans(
    indices: list[int], sizes: list[int] | None, hashes: list[bytes] | None
) -> list[tuple[int, int, bytes | None]]:
    """Split the sorted image token indices into one span per image (``sizes`` tokens each)."""
    if not indices:
        return []
    if sizes is None or sum(sizes) != len(indices):
        return [(indices[0], indices[-1] + 1, None)]
    spans, offset = [], 0
    for i, size in enumerate(sizes):
        if size == 0:
            continue
        start, end = indices[offset], indices[offset + size - 1] + 1
        spans.append((start, end, None if hashes is None else hashes[i]))
        offset += size
    return spans
