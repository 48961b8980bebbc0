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

CUDA graphs (CUDA only, off with ``enforce_eager``):
  * ``DecodeGraphs``: a step where every sequence runs exactly one text token replays a graph captured for
    (batch bucket, block-table width bucket); padding rows write into one scratch KV block past the block
    manager's range.
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

import logging
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, fresh_prefill_supported
from engine.config import EngineConfig, ModelConfig
from engine.sampling import Sampler
from engine.scheduler import SchedulerOutput

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


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        num_blocks: int,
        sampler: Sampler,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.engine_config = engine_config
        self.block_size = engine_config.block_size
        self.device = torch.device(engine_config.device)
        self.sampler = sampler
        if enforce_eager is None:
            enforce_eager = bool(getattr(engine_config, "enforce_eager", False))
        use_graphs = self.device.type == "cuda" and not enforce_eager
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
        self.prefill_graphs: PrefillGraphs | None = None
        if (
            use_graphs
            and getattr(engine_config, "prefill_cuda_graphs", True)
            and fresh_prefill_supported(model.dtype, model_config.head_dim)
        ):
            self.prefill_graphs = PrefillGraphs(
                model,
                self.kv_caches,
                self.block_size,
                max_num_tokens=engine_config.max_num_batched_tokens,
                scratch_block_id=self.scratch_block_id,
                max_context=max_model_len or engine_config.max_model_len,
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

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int | None]:
        if self.graphs is not None and all(n == 1 for n in out.num_scheduled_tokens):
            hidden = self.graphs.run(out.seqs)  # [num_seqs, hidden] or None (no graph for this step)
            if hidden is not None:
                return self._sample(out, [(hidden, self._one_token_rows(out.seqs, range(len(out.seqs))))])
        if self.prefill_graphs is not None:
            parts = self._execute_split(out)
            if parts is not None:
                return self._sample(out, parts)
        input_ids, positions, input_embeds, attn, sample_rows = self.prepare(out)
        hidden = self.model.forward(input_ids, positions, attn, self.kv_caches, input_embeds)  # [T, hidden]
        return self._sample(out, [(hidden, sample_rows)])

    @torch.inference_mode()
    def launch_decode(self, seqs: list, previous: PendingDecode | None = None) -> PendingDecode | None:
        """Launch a one-token step of ``seqs`` (all decoding, all `Sampler.can_run_ahead`) from a decode
        graph, and its sampling, without waiting for the GPU. With ``previous``, each sequence's input is
        its token of that step, still on the device, one position past the host's state. None (nothing
        launched) when no graph fits."""
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
        token_ids = self.sampler.sample_ids(logits, seqs, ahead=int(previous is not None))  # [n], device
        if token_ids.is_cuda:
            host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            host.copy_(token_ids, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return PendingDecode(seqs, token_ids, host, ready)
        return PendingDecode(seqs, token_ids, token_ids, None)

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


class DecodeGraphs:
    """CUDA graphs of steps where every sequence runs one text token, captured on first use.

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
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (one shared memory pool), so no step pays for a
        capture later. Call while no sequence runs: the buffers point every row at the scratch block."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_block_id * self.block_size)
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        self.block_tables[:, 0] = self.scratch_block_id
        for batch in reversed(self.batch_buckets):
            for width in reversed(self.width_buckets):
                if (batch, width) not in self.graphs:
                    self.graphs[(batch, width)] = self.capture(batch, width)

    def run(self, seqs: list, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Hidden states [len(seqs), hidden] of each sequence's next token; None when no graph fits.

        ``input_ids`` [len(seqs)] on the device: the tokens are one step ahead of the host (the last
        sampled tokens, not yet appended): each sequence runs position ``num_computed_tokens + 1`` with
        that token (its blocks must already cover that position)."""
        ahead = 0 if input_ids is None else 1
        if any(seq.image_token_indices and seq.num_computed_tokens < seq.num_prompt_tokens for seq in seqs):
            return None  # a 1-token prompt chunk may be an image token (needs input_embeds)
        num_seqs = len(seqs)
        batch = next((b for b in self.batch_buckets if b >= num_seqs), None)
        max_blocks = max(len(seq.block_table) for seq in seqs)
        width = next((w for w in self.width_buckets if w >= max_blocks), None)
        if batch is None or width is None:
            return None
        # Plain lists first (ids, 3 position rows, slots, seq_lens; the block table rows), then one host
        # tensor for each of the two dtypes: no per-sequence torch calls.
        block_size, scratch = self.block_size, self.scratch_block_id
        rows = [[0] * batch for _ in range(6)]
        ids, pos_t, pos_h, pos_w, slots, lens = rows
        slots[num_seqs:] = [scratch * block_size] * (batch - num_seqs)
        lens[:] = [1] * batch
        tables = []
        for i, seq in enumerate(seqs):
            pos = seq.num_computed_tokens + ahead
            table = seq.block_table
            if not ahead:
                ids[i] = seq.token_ids[pos]
            slots[i] = table[pos // block_size] * block_size + pos % block_size
            lens[i] = pos + 1
            # `ModelRunner.positions(seq, pos, pos + 1)` without building tensors
            if pos >= seq.num_prompt_tokens:
                pos_t[i] = pos_h[i] = pos_w[i] = pos + seq.mrope_delta
            elif seq.mrope_positions is None:
                pos_t[i] = pos_h[i] = pos_w[i] = pos
            else:
                pos_t[i], pos_h[i], pos_w[i] = (int(p) for p in seq.mrope_positions[:, pos])
            tables.append(table + [0] * (width - len(table)))
        tables += [[scratch] + [0] * (width - 1)] * (batch - num_seqs)
        host = torch.tensor(rows, dtype=torch.long)  # [6, batch]
        if ahead:
            self.input_ids[:num_seqs].copy_(input_ids)
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
        return hidden[:num_seqs]

    def capture(self, batch: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture model.forward on the static buffers' first ``batch`` rows (their current values are
        valid inputs: run() fills them first)."""
        with torch.cuda.device(self.slot_mapping.device):  # streams and the graph on the model's GPU
            return self._capture(batch, width)

    def forward_args(self, batch: int, width: int) -> tuple:
        """model.forward's arguments over the static buffers' first ``batch`` rows and ``width`` blocks."""
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            query_lens=torch.ones(batch, dtype=torch.int32, device=self.slot_mapping.device),
            seq_lens=self.seq_lens[:batch],
            cu_query_lens=torch.arange(batch + 1, dtype=torch.int32, device=self.slot_mapping.device),
            block_tables=self.block_tables[:batch, :width],
            max_query_len=1,
            max_seq_len=width * self.block_size,
            query_lens_cpu=(1,) * batch,
            seq_lens_cpu=(1,) * batch,
            has_padding=False,
        )
        return (self.input_ids[:batch], self.positions[:, :batch], attn, self.kv_caches, None)

    def _capture(self, batch: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The warm-up writes the same K/V the replay will write, so running it is harmless.
        graph, hidden, self.pool = capture_forward(self.model, self.forward_args(batch, width), self.pool)
        logger.info("[glm-engine] captured a decode CUDA graph: batch %d, %d blocks", batch, width)
        return graph, hidden


def capture_forward(
    model: torch.nn.Module, args: tuple, pool
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """Run ``model.forward(*args)`` once on a side stream (Triton kernels compile, cuBLAS picks its
    algorithms), then capture it into a CUDA graph sharing ``pool`` (None: a new pool). Returns the graph,
    its static output and the pool."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.forward(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        hidden = model.forward(*args)
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
    (`engine.attention.context_prefill_attention`).
    """

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
        self.graphs: dict[int | tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
        self, context_lens: list[int], block_tables: list[list[int]], num_padding: int, context: int
    ) -> tuple[np.ndarray, list[int]]:
        """The flat slots of every context (positions 0..len-1 through its block table), then the padding
        sequence's rows (scratch slot), padded to ``context``; and the contexts' prefix sums (padding
        sequence, then empty ones)."""
        offsets = np.arange(self.block_size, dtype=np.int64)
        parts, cu = [], [0]
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
                self.model, self.forward_args(bucket, context), self.pool
            )
        logger.info("[glm-engine] captured a prefill CUDA graph: %d tokens, context %d", bucket, context)
        return graph, hidden
