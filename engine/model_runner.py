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
The runner owns the KV cache tensors; ``num_kv_blocks`` sizes them from a memory budget.
"""

from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata
from engine.config import EngineConfig, ModelConfig
from engine.sampling import Sampler
from engine.scheduler import SchedulerOutput

logger = logging.getLogger("glm-engine")


def num_kv_blocks(engine_config: EngineConfig, kv_bytes_per_token: int, device: torch.device) -> int:
    """KV cache blocks for this engine.

    ``num_kv_blocks`` if set; else ``kv_cache_memory_bytes``; else on CUDA the part of
    ``gpu_memory_utilization * total`` not already in use (weights and everything else on the GPU; call it
    after loading the model), on CPU 1 GiB. Raises ValueError when that leaves no block.
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


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        num_blocks: int,
        sampler: Sampler,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.engine_config = engine_config
        self.block_size = engine_config.block_size
        self.device = torch.device(engine_config.device)
        self.sampler = sampler
        self.kv_caches = model.allocate_kv_caches(
            num_blocks, self.block_size, self.device, engine_config.torch_dtype
        )  # per layer [2, num_blocks, block_size, num_kv_heads, head_dim]
        # TODO(engine): CUDA graphs for decode-only steps, one per batch-size bucket (1, 2, 4, 8, 16, ...
        # max_num_seqs): capture model.forward on static input_ids/positions/slot_mapping/block_tables
        # buffers padded to the bucket (padding slot -1) and replay when every sequence decodes. Guard
        # with self.device.type == "cuda"; the paged decode path must then avoid host syncs.

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int | None]:
        input_ids, positions, input_embeds, attn, sample_rows = self.prepare(out)
        hidden = self.model.forward(input_ids, positions, attn, self.kv_caches, input_embeds)  # [T, hidden]
        sampled: list[int | None] = [None] * len(out.seqs)
        if sample_rows:
            rows = torch.tensor([row for _, row in sample_rows], device=self.device)
            logits = self.model.compute_logits(hidden[rows])  # [num_sampling, vocab] fp32
            token_ids = self.sampler(logits, [out.seqs[i] for i, _ in sample_rows])
            for (i, _), token_id in zip(sample_rows, token_ids, strict=True):
                sampled[i] = token_id
        return sampled

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
        input_embeds = None
        if image_parts:
            embeds = self.model.language_model.embed_tokens(ids.to(self.device))  # [T, hidden]
            is_image = ids == self.model_config.image_token_id
            for offset, i, rows in image_parts:
                n = out.num_scheduled_tokens[i]
                idx = torch.nonzero(is_image[offset : offset + n]).squeeze(1) + offset
                embeds[idx.to(self.device)] = rows.to(self.device, embeds.dtype)
            input_embeds = embeds
        attn = AttentionMetadata.build(
            query_lens, seq_lens, [seq.block_table for seq in out.seqs], self.block_size, self.device
        )
        return (
            ids.to(self.device),
            torch.cat(positions, dim=1).to(self.device),
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
