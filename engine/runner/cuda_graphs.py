"""CUDA graphs of the decoder: decode steps (``DecodeGraphs``) and prompt chunks (``PrefillGraphs``, fresh
and with cached context), captured at start-up or on first use, replayed by ``ModelRunner``.

Padding rows write into one scratch KV block past the block manager's range (``scratch_block_id``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from engine.kernels.attention import AttentionMetadata, to_device

logger = logging.getLogger("glm-engine")


def decode_metadata(
    slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int
) -> AttentionMetadata:
    """Attention metadata of static rows that each decode one token: graph-safe (no host reads)."""
    batch, width = block_tables.shape
    device = block_tables.device
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        query_lens=torch.ones(batch, dtype=torch.int32, device=device),
        seq_lens=seq_lens,
        cu_query_lens=torch.arange(batch + 1, dtype=torch.int32, device=device),
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=width * block_size,
        query_lens_cpu=(1,) * batch,
        seq_lens_cpu=(1,) * batch,
        has_padding=False,
    )


class DecodeGraphs:
    """CUDA graphs of steps of one row per token (one-token steps, short continuation chunks as rows),
    captured on first use or by `capture_all`.

    A graph is keyed by (batch bucket, width bucket): the batch is padded up to the bucket, and
    ``block_tables`` is cut to a fixed width (blocks) that covers the longest sequence, so the decode
    gather reads no more than the next power of two of the context. Inputs are copied into static
    buffers before replay; the result rows past the batch are padding.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        *,
        max_num_seqs: int,
        max_num_blocks_per_seq: int,
        scratch_block_id: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block_id = scratch_block_id
        self.batch_buckets = sorted(
            {b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16)) | {max_num_seqs}
        )
        widths, width = set(), max(1, 256 // block_size)
        while width < max_num_blocks_per_seq:
            widths.add(width)
            width *= 2
        self.width_buckets = sorted(widths | {max_num_blocks_per_seq})
        device = kv_caches[0].device
        max_batch, max_width = self.batch_buckets[-1], self.width_buckets[-1]
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_width, dtype=torch.int32, device=device)
        # rows that take an image embedding instead of their token's (image tokens of a prompt chunk)
        self.image_rows = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self.image_embeds = torch.zeros(
            max_batch, model.config.hidden_size, dtype=kv_caches[0].dtype, device=device
        )
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _point_at_scratch(self) -> None:
        """Every row of the static buffers one token long, reading and writing the scratch block."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_block_id * self.block_size)
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        self.block_tables[:, 0] = self.scratch_block_id

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (one shared memory pool), so no step pays for a
        capture later. Call while no sequence runs: the buffers point every row at the scratch block."""
        self._point_at_scratch()
        for batch in reversed(self.batch_buckets):
            for width in reversed(self.width_buckets):
                if (batch, width) not in self.graphs:
                    self.graphs[(batch, width)] = self.capture(batch, width)

    def run(
        self, seqs: list, input_ids: torch.Tensor | None = None, counts: list[int] | None = None
    ) -> torch.Tensor | None:
        """Hidden states [len(seqs), hidden] of each sequence's next token; None when no graph fits.

        ``input_ids`` [len(seqs)] on the device: the tokens are one step ahead of the host (the last
        sampled tokens, not yet appended): each sequence runs position ``num_computed_tokens + 1`` with
        that token (its blocks must already cover that position).

        ``counts`` (host tokens only): a sequence with n tokens runs its positions ``num_computed_tokens``
        .. + n - 1 as n rows in order (a short prompt chunk), each attending the context up to itself,
        as the rows of a causal chunk do; the result then has sum(counts) rows. Image tokens take their
        rows of ``seq.image_embeds``."""
        ahead = 0 if input_ids is None else 1
        if counts is not None and ahead:
            raise ValueError("counts: the tokens of a step run ahead are one per sequence")
        counts = counts or [1] * len(seqs)
        num_rows = sum(counts)
        batch = next((b for b in self.batch_buckets if b >= num_rows), None)
        max_blocks = max(len(seq.block_table) for seq in seqs)
        width = next((w for w in self.width_buckets if w >= max_blocks), None)
        if batch is None or width is None:
            return None
        # Plain lists first (ids, 3 position rows, slots, seq_lens; the block table rows), then one host
        # tensor for each of the two dtypes: no per-sequence torch calls.
        block_size, scratch = self.block_size, self.scratch_block_id
        rows = [[0] * batch for _ in range(7)]
        ids, pos_t, pos_h, pos_w, slots, lens, is_image = rows
        image_parts: list[tuple[list[int], torch.Tensor]] = []  # (rows, their image embeddings)
        slots[num_rows:] = [scratch * block_size] * (batch - num_rows)
        lens[:] = [1] * batch
        tables = []
        i = 0
        for seq, n in zip(seqs, counts, strict=True):
            table = seq.block_table
            row_table = table + [0] * (width - len(table))
            start = seq.num_computed_tokens + ahead
            prompt_end = min(start + n, seq.num_prompt_tokens)
            mrope = None  # `ModelRunner.positions(seq, start, start + n)` without building tensors
            if start < prompt_end and seq.mrope_positions is not None:
                mrope = seq.mrope_positions[:, start:prompt_end].tolist()
            if seq.image_token_indices and start < prompt_end:
                first, last = seq.image_rows(start, start + n)
                if last > first:
                    image_rows = [i + p - start for p in seq.image_token_indices[first:last]]
                    for row in image_rows:
                        is_image[row] = 1
                    image_parts.append((image_rows, seq.image_embeds[first:last]))
            for pos in range(start, start + n):
                if not ahead:
                    ids[i] = seq.token_ids[pos]
                slots[i] = table[pos // block_size] * block_size + pos % block_size
                lens[i] = pos + 1
                if pos >= seq.num_prompt_tokens:
                    pos_t[i] = pos_h[i] = pos_w[i] = pos + seq.mrope_delta
                elif mrope is None:
                    pos_t[i] = pos_h[i] = pos_w[i] = pos
                else:
                    pos_t[i], pos_h[i], pos_w[i] = (row[pos - start] for row in mrope)
                tables.append(row_table)
                i += 1
        tables += [[scratch] + [0] * (width - 1)] * (batch - num_rows)
        host = torch.tensor(rows, dtype=torch.long)  # [7, batch]
        self.image_rows[:batch].copy_(host[6], non_blocking=True)
        if image_parts:
            index = torch.tensor([row for image_rows, _ in image_parts for row in image_rows])
            embeds = torch.cat([e for _, e in image_parts]) if len(image_parts) > 1 else image_parts[0][1]
            self.image_embeds.index_copy_(
                0,
                to_device(index, self.image_embeds.device),
                embeds.to(self.image_embeds.device, self.image_embeds.dtype),
            )
        if ahead:
            self.input_ids[:num_rows].copy_(input_ids)
        else:
            self.input_ids[:batch].copy_(host[0], non_blocking=True)
        self.positions[:, :batch].copy_(host[1:4], non_blocking=True)
        self.slot_mapping[:batch].copy_(host[4], non_blocking=True)
        self.seq_lens[:batch].copy_(host[5], non_blocking=True)
        self.block_tables[:batch, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        if (batch, width) not in self.graphs:
            self.graphs[(batch, width)] = self.capture(batch, width)
        graph, hidden = self.graphs[(batch, width)]
        graph.replay()
        return hidden[:num_rows]

    def capture(self, batch: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture model.forward on the static buffers' first ``batch`` rows (their current values are
        valid inputs: run() fills them first)."""
        with torch.cuda.device(self.slot_mapping.device):  # streams and the graph on the model's GPU
            return self._capture(batch, width)

    def trial_graph(self, batch: int, width: int) -> torch.cuda.CUDAGraph:
        """A graph of ``batch`` rows and ``width`` blocks over the scratch block, in a pool of its own and
        kept out of ``graphs`` (to time a setting: engine.runner.model_runner.choose_decode_pdl). Call
        while no sequence runs."""
        self._point_at_scratch()
        with torch.cuda.device(self.slot_mapping.device):
            graph, _, _ = capture_forward(self.step_forward, self.forward_args(batch, width), None)
        return graph

    def forward_args(self, batch: int, width: int) -> tuple:
        """`step_forward`'s arguments over the static buffers' first ``batch`` rows and ``width`` blocks."""
        attn = decode_metadata(
            self.slot_mapping[:batch],
            self.seq_lens[:batch],
            self.block_tables[:batch, :width],
            self.block_size,
        )
        return (
            self.input_ids[:batch],
            self.positions[:, :batch],
            attn,
            self.kv_caches,
            self.image_rows[:batch],
            self.image_embeds[:batch],
        )

    def step_forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn,
        kv_caches: list[torch.Tensor],
        image_rows: torch.Tensor,
        image_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """model.forward of a step, the rows flagged in ``image_rows`` taking ``image_embeds``."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        embeds = torch.where(image_rows[:, None], image_embeds, embeds)
        return self.model.forward(input_ids, positions, attn, kv_caches, embeds)

    def _capture(self, batch: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The warm-up writes the same K/V the replay will write, so running it is harmless.
        graph, hidden, self.pool = capture_forward(
            self.step_forward, self.forward_args(batch, width), self.pool
        )
        logger.debug("[glm-engine] captured a decode CUDA graph: batch %d, %d blocks", batch, width)
        return graph, hidden


def capture_forward(forward, args: tuple, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """Run ``forward(*args)`` once on a side stream (Triton kernels compile, cuBLAS picks its algorithms),
    then capture it into a CUDA graph sharing ``pool`` (None: a new pool). Returns the graph, its static
    output and the pool."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        hidden = forward(*args)
    return graph, hidden, pool if pool is not None else graph.pool()


def prefill_buckets(max_num_tokens: int, largest: int = 2048) -> list[int]:
    """Token counts that prefill graphs are captured for: finer where the host dominates (small), coarser
    where the GPU does; up to min(max_num_tokens, largest)."""
    top = min(max_num_tokens, largest)
    steps = [(128, 32), (512, 64), (1024, 128), (largest, 256)]  # (up to, step)
    buckets, size = set(), 0
    for limit, step in steps:
        while size + step <= limit:
            size += step
            buckets.add(size)
    return sorted({b for b in buckets if b < top} | {top})


class PrefillGraphs:
    """CUDA graphs of fresh prompt chunks (every sequence starts at position 0), keyed by token bucket.

    Inputs are the embeddings (image rows already in place), M-RoPE positions and KV slots of the packed
    chunks; they are copied into static buffers padded to the bucket. The padding rows form one extra
    sequence (so every row of the varlen attention is written) whose K/V go to the scratch block. At most
    ``max_seqs`` sequences per replay (the varlen call's batch is fixed at capture). The graphs share a
    memory pool of their own (the decode graph's output of the same step stays valid).

    Context graphs, keyed by (token bucket, context bucket), run chunks that attend to KV already in the
    cache (a prefix-cache hit, a later chunk of a long prompt): the step's context slots (every
    sequence's positions 0..end through its block table, then the padding sequence's rows) go into a
    static buffer padded to the context bucket, and each layer gathers them for one varlen flash call
    (`engine.kernels.attention.context_prefill_attention`).

    Mixed-step graphs (``max_decodes`` > 0) run one-token decodes and prompt chunks in one replay: see
    `mixed_key` and `run_mixed`.
    """

    MIXED_DECODE_TOKENS = 2048  # longest context of a decode in a mixed step (the kernel's block tables)
    MIXED_CONTEXT = 4096  # the chunks' gathered contexts in a mixed step (with decode and padding rows)

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        *,
        max_num_tokens: int,
        scratch_block_id: int,
        max_seqs: int = 16,
        max_context: int = 0,
        max_decodes: int = 0,
        max_blocks_per_seq: int = 0,
        mixed_chunk_tokens: int = 256,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_seqs = max_seqs
        self.block_size = block_size
        self.buckets = prefill_buckets(max_num_tokens)
        self.scratch_slot = scratch_block_id * block_size
        # context graphs: coarser token buckets (powers of two) x context buckets (powers of two)
        self.context_token_buckets = sorted(
            {b for b in (32, 64, 128, 256, 512, 1024) if b < self.buckets[-1]}
        )
        self.context_token_buckets.append(self.buckets[-1])
        # up to twice the longest context: room for a few sequences' contexts in one step
        self.context_buckets: list[int] = []
        size = 1 << (self.buckets[-1] - 1).bit_length()
        while max_context and size <= 2 * max_context:
            self.context_buckets.append(size)
            size *= 2
        device = kv_caches[0].device
        top = self.buckets[-1]
        hidden_size = model.language_model.embed_tokens.weight.shape[1]
        self.embeds = torch.zeros(top, hidden_size, dtype=model.dtype, device=device)
        self.positions = torch.zeros(3, top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), self.scratch_slot, dtype=torch.long, device=device)
        self.cu_lens = torch.zeros(max_seqs + 2, dtype=torch.int32, device=device)
        top_context = self.context_buckets[-1] if self.context_buckets else 0
        self.context_slots = torch.full((top_context,), self.scratch_slot, dtype=torch.long, device=device)
        self.cu_context = torch.zeros(max_seqs + 2, dtype=torch.int32, device=device)
        # Mixed steps (`mixed_key`): up to max_decodes decode rows whose contexts fit MIXED_DECODE_TOKENS,
        # beside chunks of up to mixed_chunk_tokens tokens whose contexts (with the decode and padding rows)
        # fit MIXED_CONTEXT: one graph per (token bucket, decode-row bucket), all captured at start-up.
        self.decode_buckets: list[int] = []
        self.mixed_width = self.mixed_context = self.mixed_tokens = 0
        if max_decodes and max_blocks_per_seq and self.context_buckets:
            self.decode_buckets = sorted(
                {b for b in (1, 2, 4, 8) if b < max_decodes} | set(range(16, max_decodes, 16)) | {max_decodes}
            )
            self.mixed_width = min(max_blocks_per_seq, max(1, self.MIXED_DECODE_TOKENS // block_size))
            self.mixed_context = next(
                (c for c in self.context_buckets if c >= self.MIXED_CONTEXT), self.context_buckets[-1]
            )
            self.mixed_tokens = self.bucket(max_decodes + mixed_chunk_tokens) or self.buckets[-1]
            self.decode_seq_lens = torch.ones(max_decodes, dtype=torch.int32, device=device)
            self.decode_tables = torch.zeros(max_decodes, self.mixed_width, dtype=torch.int32, device=device)
            self.decode_mask = torch.zeros(max_decodes, dtype=torch.bool, device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, num_tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= num_tokens), None)

    def fits(self, counts: list[int]) -> bool:
        return 0 < len(counts) <= self.max_seqs and self.bucket(sum(counts)) is not None

    def context_bucket(self, counts: list[int], context_lens: list[int]) -> tuple[int, int] | None:
        """(token bucket, context bucket) of a context graph for these chunks, or None."""
        num_tokens = sum(counts)
        bucket = next((b for b in self.context_token_buckets if b >= num_tokens), None)
        if bucket is None or not 0 < len(counts) <= self.max_seqs:
            return None
        need = sum(context_lens) + bucket - num_tokens  # the padding sequence attends to its own rows
        context = next((c for c in self.context_buckets if c >= need), None)
        return None if context is None else (bucket, context)

    def fits_context(self, counts: list[int], context_lens: list[int]) -> bool:
        return self.context_bucket(counts, context_lens) is not None

    def mixed_key(
        self, num_decodes: int, counts: list[int], context_lens: list[int], max_blocks: int
    ) -> tuple[str, int, int] | None:
        """The graph of a mixed step, or None (the step runs a decode graph and a prefill graph):
        ``num_decodes`` one-token decodes (their block tables at most ``max_blocks`` long) and chunks of
        ``counts`` tokens over ``context_lens`` positions. ("mixed", token bucket, decode-row bucket)."""
        if not self.decode_buckets or not 0 < num_decodes <= self.decode_buckets[-1]:
            return None
        num_tokens = num_decodes + sum(counts)
        bucket = self.bucket(num_tokens)
        if bucket is None or bucket > self.mixed_tokens or not 0 < len(counts) + 1 <= self.max_seqs:
            return None
        if num_decodes + sum(context_lens) + bucket - num_tokens > self.mixed_context:
            return None
        if max_blocks > self.mixed_width:
            return None
        rows = next(b for b in self.decode_buckets if b >= num_decodes)
        return ("mixed", bucket, rows) if rows <= bucket else None

    def mixed_keys(self) -> list[tuple[str, int, int]]:
        """Every mixed-step graph (captured at start-up by `capture_all`)."""
        return [
            ("mixed", bucket, rows)
            for bucket in self.buckets
            if bucket <= self.mixed_tokens
            for rows in self.decode_buckets
            if rows <= bucket
        ]

    def run_mixed(
        self,
        key: tuple[str, int, int],
        input_embeds: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        decode_slots: list[int],
        decode_lens: list[int],
        decode_tables: list[list[int]],
        counts: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Hidden states [D + sum(counts), hidden] of a mixed step (`mixed_key`). Rows 0..D-1 are the
        decodes: decode i's new token sits at ``decode_slots[i]``, position ``decode_lens[i] - 1`` of the
        context in block table ``decode_tables[i]``. The chunks follow, as in `run_context`."""
        _, bucket, rows = key
        context, width = self.mixed_context, self.mixed_width
        num_decodes = len(decode_slots)
        num_tokens = num_decodes + sum(counts)
        self.embeds[:num_tokens].copy_(input_embeds)
        self.positions[:, :num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(slot_mapping)
        self.slot_mapping[num_tokens:bucket].fill_(self.scratch_slot)
        # the varlen call's first sequence: the decode rows over their own new K/V
        slots, cu_context = self.context_slots_for(
            context_lens, block_tables, bucket - num_tokens, context, leading=decode_slots
        )
        self.context_slots[:context].copy_(torch.from_numpy(slots), non_blocking=True)
        cu = torch.tensor([self.cu_lens_for([num_decodes, *counts], bucket), cu_context], dtype=torch.int32)
        self.cu_lens.copy_(cu[0], non_blocking=True)
        self.cu_context.copy_(cu[1], non_blocking=True)
        # the decode kernel's rows: padding rows read one position of the scratch block and are masked out
        scratch_block = self.scratch_slot // self.block_size
        tables = [[scratch_block] + [0] * (width - 1)] * rows
        for i, table in enumerate(decode_tables):
            tables[i] = table[:width] + [0] * (width - len(table))
        lens = list(decode_lens) + [1] * (rows - num_decodes)
        mask = [1] * num_decodes + [0] * (rows - num_decodes)
        self.decode_tables[:rows, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        host = torch.tensor([lens, mask], dtype=torch.int32)
        self.decode_seq_lens[:rows].copy_(host[0], non_blocking=True)
        self.decode_mask[:rows].copy_(host[1].bool(), non_blocking=True)
        if key not in self.graphs:
            self.graphs[key] = self.capture_mixed(key)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden[:num_tokens]

    def capture_mixed(self, key: tuple[str, int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture a mixed step's graph on the static buffers (their current values are valid inputs)."""
        with torch.cuda.device(self.embeds.device):
            graph, hidden, self.pool = capture_forward(
                self.model.forward, self.mixed_forward_args(key), self.pool
            )
        logger.debug(
            "[glm-engine] captured a mixed-step CUDA graph: %d tokens, %d decode rows", key[1], key[2]
        )
        return graph, hidden

    def mixed_forward_args(self, key: tuple[str, int, int]) -> tuple:
        """model.forward's arguments of a mixed step: a context graph's, plus the decode rows' metadata."""
        _, bucket, rows = key
        context, width = self.mixed_context, self.mixed_width
        args = self.forward_args(bucket, context)
        args[2].decode = decode_metadata(
            self.slot_mapping[:rows],
            self.decode_seq_lens[:rows],
            self.decode_tables[:rows, :width],
            self.block_size,
        )
        args[2].decode_mask = self.decode_mask[:rows]
        return args

    def cu_lens_for(self, counts: list[int], bucket: int) -> list[int]:
        """Prefix sums of the chunks, then the padding sequence up to ``bucket``, then empty sequences."""
        cu = [0]
        for n in counts:
            cu.append(cu[-1] + n)
        cu.append(bucket)
        return cu + [bucket] * (self.max_seqs + 2 - len(cu))

    def capture_all(self) -> None:
        """Capture every bucket now, largest first. Call while no sequence runs (all rows are padding)."""
        self.slot_mapping.fill_(self.scratch_slot)
        self.context_slots.fill_(self.scratch_slot)
        self.positions.zero_()
        for bucket in reversed(self.buckets):
            if bucket not in self.graphs:
                self.cu_lens.copy_(torch.tensor(self.cu_lens_for([], bucket), dtype=torch.int32))
                self.graphs[bucket] = self.capture(bucket)
        for context in reversed(self.context_buckets):
            for bucket in reversed(self.context_token_buckets):
                if (bucket, context) not in self.graphs:
                    self.cu_lens.copy_(torch.tensor(self.cu_lens_for([], bucket), dtype=torch.int32))
                    self.cu_context.copy_(self.cu_lens)
                    self.graphs[(bucket, context)] = self.capture(bucket, context)
        if not self.decode_buckets:
            return
        # mixed steps: every decode row points at the scratch block and none is live
        self.decode_seq_lens.fill_(1)
        self.decode_mask.zero_()
        self.decode_tables.zero_()
        self.decode_tables[:, 0] = self.scratch_slot // self.block_size
        for key in reversed(self.mixed_keys()):
            if key not in self.graphs:
                self.cu_lens.copy_(torch.tensor(self.cu_lens_for([], key[1]), dtype=torch.int32))
                self.cu_context.copy_(self.cu_lens)
                self.graphs[key] = self.capture_mixed(key)

    def run(
        self,
        input_embeds: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        counts: list[int],
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the packed chunks (T = sum(counts); check `fits` first)."""
        num_tokens = sum(counts)
        bucket = self.bucket(num_tokens)
        self.embeds[:num_tokens].copy_(input_embeds)
        self.positions[:, :num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(slot_mapping)
        self.slot_mapping[num_tokens:bucket].fill_(self.scratch_slot)
        cu = torch.tensor(self.cu_lens_for(counts, bucket), dtype=torch.int32)
        self.cu_lens.copy_(cu, non_blocking=True)
        if bucket not in self.graphs:
            self.graphs[bucket] = self.capture(bucket)
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:num_tokens]

    def run_context(
        self,
        input_embeds: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        counts: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of chunks with cached context: chunk b's tokens are the last
        ``counts[b]`` of its ``context_lens[b]`` positions (check `fits_context` first)."""
        num_tokens = sum(counts)
        bucket, context = self.context_bucket(counts, context_lens)
        self.embeds[:num_tokens].copy_(input_embeds)
        self.positions[:, :num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(slot_mapping)
        self.slot_mapping[num_tokens:bucket].fill_(self.scratch_slot)
        slots, cu_context = self.context_slots_for(context_lens, block_tables, bucket - num_tokens, context)
        self.context_slots[:context].copy_(torch.from_numpy(slots), non_blocking=True)
        cu = torch.tensor([self.cu_lens_for(counts, bucket), cu_context], dtype=torch.int32)
        self.cu_lens.copy_(cu[0], non_blocking=True)
        self.cu_context.copy_(cu[1], non_blocking=True)
        if (bucket, context) not in self.graphs:
            self.graphs[(bucket, context)] = self.capture(bucket, context)
        graph, hidden = self.graphs[(bucket, context)]
        graph.replay()
        return hidden[:num_tokens]

    def context_slots_for(
        self,
        context_lens: list[int],
        block_tables: list[list[int]],
        num_padding: int,
        context: int,
        leading: list[int] | None = None,
    ) -> tuple[np.ndarray, list[int]]:
        """The flat slots of every context (positions 0..len-1 through its block table), then the padding
        sequence's rows (scratch slot), padded to ``context``; and the contexts' prefix sums (padding
        sequence, then empty ones). ``leading``: the slots of a first context given as they are."""
        offsets = np.arange(self.block_size, dtype=np.int64)
        parts, cu = [], [0]
        if leading is not None:
            parts.append(np.asarray(leading, dtype=np.int64))
            cu.append(len(leading))
        for length, table in zip(context_lens, block_tables, strict=True):
            blocks = np.asarray(table[: -(-length // self.block_size)], dtype=np.int64)
            parts.append((blocks[:, None] * self.block_size + offsets).reshape(-1)[:length])
            cu.append(cu[-1] + length)
        cu.append(cu[-1] + num_padding)
        slots = np.full(context, self.scratch_slot, dtype=np.int64)
        if parts:
            flat = np.concatenate(parts)
            slots[: flat.shape[0]] = flat
        return slots, cu + [cu[-1]] * (self.max_seqs + 2 - len(cu))

    def forward_args(self, bucket: int, context: int = 0) -> tuple:
        """model.forward's arguments over the first ``bucket`` rows of the static buffers (and the first
        ``context`` context slots: a context graph)."""
        device = self.embeds.device
        if context:
            attn = AttentionMetadata(
                slot_mapping=self.slot_mapping[:bucket],
                query_lens=self.cu_lens[1:] - self.cu_lens[:-1],
                seq_lens=self.cu_context[1:] - self.cu_context[:-1],
                cu_query_lens=self.cu_lens,
                block_tables=torch.zeros(self.max_seqs + 1, 1, dtype=torch.int32, device=device),
                max_query_len=bucket,
                max_seq_len=context,
                query_lens_cpu=(bucket,),
                seq_lens_cpu=(context,),
                has_padding=False,
                context_slots=self.context_slots[:context],
                cu_seq_lens=self.cu_context,
            )
            return (None, self.positions[:, :bucket], attn, self.kv_caches, self.embeds[:bucket])
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            query_lens=self.cu_lens[1:] - self.cu_lens[:-1],
            seq_lens=self.cu_lens[1:] - self.cu_lens[:-1],
            cu_query_lens=self.cu_lens,
            block_tables=torch.zeros(self.max_seqs + 1, 1, dtype=torch.int32, device=device),
            max_query_len=bucket,
            max_seq_len=bucket,
            query_lens_cpu=(bucket,),
            seq_lens_cpu=(bucket,),
            has_padding=False,
            all_fresh=True,
        )
        return (None, self.positions[:, :bucket], attn, self.kv_caches, self.embeds[:bucket])

    def capture(self, bucket: int, context: int = 0) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture model.forward over the first ``bucket`` rows of the static buffers (valid inputs)."""
        with torch.cuda.device(self.embeds.device):
            graph, hidden, self.pool = capture_forward(
                self.model.forward, self.forward_args(bucket, context), self.pool
            )
        logger.debug("[glm-engine] captured a prefill CUDA graph: %d tokens, context %d", bucket, context)
        return graph, hidden
