"""Paged causal attention over a mixed batch of prefill chunks and decode tokens.

Contract:
* KV cache of one layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; [0] keys, [1] values.
  Token j of a sequence lives in block `block_table[j // block_size]` at offset `j % block_size`, i.e.
  flat slot `block_id * block_size + offset`.
* A step's new tokens are packed sequence after sequence: sequence b owns rows
  `cu_query_lens[b]:cu_query_lens[b+1]` (`query_lens[b]` tokens). `seq_lens[b]` is the context length
  INCLUDING these new tokens, so new token i of sequence b sits at position `seq_lens[b]-query_lens[b]+i`
  and attends to the cached tokens 0..that position (causal), with GQA (query head h reads kv head
  h // (num_heads // num_kv_heads)).
* `paged_attention` first writes the new k/v into the cache at `slot_mapping` (slot -1 = padding token:
  not written, its output is garbage; padding rows come after all sequences' rows), then attends. Its result for a sequence does not depend on the
  other sequences in the batch. `rotate_and_write_kv` applies the rotary and does that write in one
  kernel on the Triton path (`engine.kernels.fused.rotary_write_kv_`); `paged_attention(...,
  kv_written=True)` then only attends.
* `_paged_attention_reference` (per-sequence loop, float32 softmax) is the spec and runs on any device.
  On CUDA, `paged_attention` uses torch SDPA per prefill chunk and, for decode tokens (query_len 1), the
  Triton kernel `engine.kernels.fused.paged_decode_attention` (split-K over the context, K/V read through the
  block table, only live blocks) when `engine.kernels.fused.use_triton` allows it, else one batched gather +
  masked SDPA (GLMV_DISABLE_TRITON_KERNELS=1 restores that path). Under Triton's CPU interpreter
  (TRITON_INTERPRET=1) decode-only steps run the kernel too; everything else on CPU runs the reference.
* CUDA graphs: a decode-only step (every query_len 1) reads only device tensors of the metadata
  (slot_mapping, seq_lens, block_tables), so `model.forward` can be captured once per batch size on static
  metadata buffers (fixed block_tables width) and replayed after copying new values into them (checked
  on an H200: replay equals eager exactly). Padding sequences in a captured batch must point at a
  scratch block rather than use slot -1 (dropping -1 slots needs a host sync). The decode kernel sizes its
  grid from the block_tables width (never from seq_lens values), so it is captured like the SDPA path.
* `all_fresh` metadata (prefill CUDA graphs, `engine.runner.model_runner.PrefillGraphs`): every sequence's chunk
  starts at position 0, so it attends only to its own new tokens; on CUDA one varlen flash call over
  `cu_query_lens` (device tensor, zero-length sequences allowed) does every sequence without a host sync,
  elsewhere `_fresh_prefill_reference`. Padding rows are given as one more sequence (slots in the scratch
  block), so no row is left unwritten.
* `context_slots` metadata (prefill graphs of chunks with cached context: prefix-cache hits, chunked
  prefill): `context_slots` [C] lists the flat cache slots of every sequence's whole context (positions
  0..seq_len-1, its new tokens included), sequence after sequence, and `cu_seq_lens` [B+1] their prefix
  sums. After the write, the context K/V are gathered by those slots and one varlen flash call (causal,
  aligned to the end of each context) attends every chunk to its context; elsewhere
  `_context_prefill_reference`. No host sync: graph-safe with fixed C, B and max lengths.
* `decode` metadata beside `context_slots` (mixed steps: running decodes and prompt chunks through one
  graph, one pass over the weights): the step's decode rows come first and also form the varlen call's
  first sequence, over their own new K/V only (a few cheap rows, so the call stays one call); then the
  paged decode kernel attends each of the first `decode.num_seqs` rows over its whole context, and its
  result replaces the varlen call's where `decode_mask` holds (the rows past the step's decodes belong to
  chunks or padding and keep theirs). Graph-safe the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine.kernels.fused import (
    apply_interleaved_rotary_,
    paged_decode_attention,
    paged_decode_supported,
    rotary_write_kv_,
)


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``. On CUDA the copy goes through pinned memory and is queued on
    the current stream without waiting: a blocking copy (``torch.tensor(..., device=)``, ``.to(device)``)
    waits until the GPU has run everything queued before it, so the host could not prepare a step while
    the work queued ahead of it (a ViT pass) runs."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class AttentionMetadata:
    """Where a step's new tokens go in the paged KV cache and what they attend to. B sequences, T tokens."""

    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token (-1: padding, not written)
    query_lens: torch.Tensor  # [B] int32, new tokens of each sequence this step
    seq_lens: torch.Tensor  # [B] int32, context length of each sequence including its new tokens
    cu_query_lens: torch.Tensor  # [B+1] int32, prefix sums of query_lens
    block_tables: torch.Tensor  # [B, max_blocks] int32, block ids of each sequence (padded with 0)
    max_query_len: int = 0  # max(query_lens); 0: computed on construction
    max_seq_len: int = 0  # max(seq_lens); 0: computed on construction
    query_lens_cpu: tuple[int, ...] = ()  # host copy of query_lens; (): computed on construction
    seq_lens_cpu: tuple[int, ...] = ()  # host copy of seq_lens; (): computed on construction
    has_padding: bool | None = None  # any slot_mapping < 0; None: computed on construction
    all_fresh: bool = False  # every sequence's chunk starts at position 0 (no cached context; CUDA varlen)
    context_slots: torch.Tensor | None = None  # [C] int64 flat slots of each sequence's context (see above)
    cu_seq_lens: torch.Tensor | None = None  # [B+1] int32 prefix sums of the contexts in context_slots
    # Mixed steps (decodes and prompt chunks in one pass over the weights; needs context_slots): the first
    # ``decode.num_seqs`` rows of q are also one-token decodes with this metadata (block_tables, seq_lens),
    # whose result replaces the varlen call's for the rows where ``decode_mask`` holds (see above).
    decode: AttentionMetadata | None = None
    decode_mask: torch.Tensor | None = None  # [decode.num_seqs] bool
    _plan: Any = field(default=None, repr=False, compare=False)  # per-step cache of the CUDA path
    _plan_captured: bool = field(default=False, repr=False, compare=False)  # _plan built in a graph capture

    def __post_init__(self) -> None:
        if not self.query_lens_cpu:
            self.query_lens_cpu = tuple(int(x) for x in self.query_lens.tolist())
        if not self.seq_lens_cpu:
            self.seq_lens_cpu = tuple(int(x) for x in self.seq_lens.tolist())
        if self.has_padding is None:
            self.has_padding = bool((self.slot_mapping < 0).any())
        if not self.max_query_len:
            self.max_query_len = max(self.query_lens_cpu, default=0)
        if not self.max_seq_len:
            self.max_seq_len = max(self.seq_lens_cpu, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from host lists: the slot of new token i of seq b is that of position seq_len-query_len+i."""
        if not len(query_lens) == len(seq_lens) == len(block_tables):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            if not 0 < q_len <= s_len:
                raise ValueError(f"query_lens: {q_len} must be in [1, seq_len={s_len}]")
            if len(table) * block_size < s_len:
                raise ValueError(
                    f"block_tables: {len(table)} blocks of {block_size} cannot hold {s_len} tokens"
                )
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        max_blocks = max((len(t) for t in block_tables), default=0)
        table_rows = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        cu = [0]
        for q_len in query_lens:
            cu.append(cu[-1] + q_len)
        num_seqs = len(query_lens)
        lens = to_device(torch.tensor([query_lens, seq_lens], dtype=torch.int32).view(2, num_seqs), device)
        return cls(
            slot_mapping=to_device(torch.tensor(slots, dtype=torch.int64), device),
            query_lens=lens[0],
            seq_lens=lens[1],
            cu_query_lens=to_device(torch.tensor(cu, dtype=torch.int32), device),
            block_tables=to_device(torch.tensor(table_rows, dtype=torch.int32), device).view(
                len(block_tables), -1
            ),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            has_padding=False,
        )


def write_kv_cache(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [T, num_kv_heads, head_dim] at flat slots slot_mapping [T] (all >= 0: drop padding first)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, num_kv_heads, head_dim] of one sequence from its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]  # [seq_len, num_kv_heads, head_dim]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


def _causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, H, D] at the last Q of S positions; k, v [S, Hkv, D] -> [Q, H, D]; float32 softmax."""
    num_q, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qf = q.float().view(num_q, num_kv_heads, group, head_dim)  # [Q, Hkv, G, D]
    scores = torch.einsum("qhgd,shd->hgqs", qf, k.float()) * scale  # [Hkv, G, Q, S]
    q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("hgqs,shd->qhgd", probs, v.float())  # [Q, Hkv, G, D]
    return out.reshape(num_q, num_heads, head_dim).to(q.dtype)


def _paged_attention_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The spec: one sequence at a time. q [T, H, D] -> [T, H, D]."""
    out = torch.empty_like(q)
    start = 0
    # the lengths are read from the tensors, not the host tuples: a CPU stand-in of a CUDA graph replays
    # this on static metadata whose host tuples were fixed at capture
    for b, (q_len, s_len) in enumerate(zip(attn.query_lens.tolist(), attn.seq_lens.tolist(), strict=True)):
        k, v = gather_context(kv_cache, attn.block_tables[b], s_len)
        out[start : start + q_len] = _causal_gqa_attention(q[start : start + q_len], k, v, scale)
        start += q_len
    return out


@dataclass
class _FastPlan:
    """Index tensors of one step for `_paged_attention_fast`, built once and shared by all layers."""

    prefills: list[tuple[int, int, int, torch.Tensor, torch.Tensor | None]]  # (row, Q, S, blocks, mask)
    decode_rows: torch.Tensor | None  # [Bd] rows of the decode tokens; None: every row (decode-only step)
    decode_tables: torch.Tensor | None  # [Bd, max_blocks] int64 block ids; None: no decode tokens
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, max_blocks * block_size] True = attend
    decode_seq_lens: torch.Tensor | None = None  # [Bd] int64 context lengths (mixed steps only)


def _fast_plan(attn: AttentionMetadata, block_size: int) -> _FastPlan:
    device = attn.block_tables.device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    # A plan made outside a CUDA graph capture must not be baked into the graph (its mask would go
    # stale on replay): while capturing, build it again inside the capture.
    if attn._plan is not None and attn._plan_captured == capturing:
        return attn._plan
    attn._plan_captured = capturing
    if attn.max_query_len == 1:
        # Decode-only step: built from device tensors alone (no host copies), so the step can be
        # captured in a CUDA graph when block_tables keeps a fixed width.
        positions = torch.arange(attn.block_tables.shape[1] * block_size, device=device)
        mask = positions[None, :] < attn.seq_lens.long()[:, None]  # [B, S]
        attn._plan = _FastPlan([], None, attn.block_tables.long(), mask[:, None, None, :])
        return attn._plan
    prefills = []
    decode_seqs, decode_rows = [], []
    row = 0
    for b, (q_len, s_len) in enumerate(zip(attn.query_lens_cpu, attn.seq_lens_cpu, strict=True)):
        if q_len == 1 and s_len > 1:
            decode_seqs.append(b)
            decode_rows.append(row)
        else:
            blocks = attn.block_tables[b, : (s_len + block_size - 1) // block_size].long()
            mask = None
            if q_len != s_len:
                q_pos = torch.arange(s_len - q_len, s_len, device=device)
                mask = torch.arange(s_len, device=device)[None, :] <= q_pos[:, None]  # [Q, S]
            prefills.append((row, q_len, s_len, blocks, mask))
        row += q_len
    plan = _FastPlan(prefills, None, None, None)
    if decode_seqs:
        max_blocks = (max(attn.seq_lens_cpu[b] for b in decode_seqs) + block_size - 1) // block_size
        index = torch.tensor(decode_seqs, dtype=torch.int64).to(device, non_blocking=True)
        plan.decode_rows = torch.tensor(decode_rows, dtype=torch.int64).to(device, non_blocking=True)
        plan.decode_tables = attn.block_tables[index, :max_blocks].long()
        seq_lens = attn.seq_lens[index].long()  # [Bd]
        plan.decode_seq_lens = seq_lens
        positions = torch.arange(max_blocks * block_size, device=device)
        plan.decode_mask = (positions[None, :] < seq_lens[:, None])[:, None, None, :]
    attn._plan = plan
    return plan


def _use_decode_kernel(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    return paged_decode_supported(q, kv_cache[0], kv_cache[1])


def _paged_decode_step(
    q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float
) -> torch.Tensor:
    """A decode-only step (every query_len 1) through the Triton kernel: row b is sequence b's token.

    Reads only device tensors of the metadata (block_tables, seq_lens), no host sync: CUDA-graph safe."""
    num_seqs = attn.num_seqs
    if q.shape[0] == num_seqs:
        return paged_decode_attention(q, kv_cache[0], kv_cache[1], attn.block_tables, attn.seq_lens, scale)
    out = torch.empty_like(q)  # padding rows (after all sequences' rows) stay garbage
    paged_decode_attention(
        q[:num_seqs], kv_cache[0], kv_cache[1], attn.block_tables, attn.seq_lens, scale, out=out[:num_seqs]
    )
    return out


def _paged_attention_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """SDPA per prefill chunk; all decode tokens (query_len 1) in one batched call. q [T, H, D].

    Decode tokens go through the Triton paged-decode kernel when `_use_decode_kernel` holds (a decode-only
    step then needs no plan at all), else through one batched gather + masked SDPA.
    k, v [T, Hkv, D] are the new tokens (already in the cache); a chunk with no cached context uses
    them directly. Host syncs happen only while building the step's plan (first layer).
    """
    use_kernel = _use_decode_kernel(q, kv_cache)
    if use_kernel and attn.max_query_len == 1:
        return _paged_decode_step(q, kv_cache, attn, scale)
    _, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    plan = _fast_plan(attn, kv_cache.shape[2])
    out = torch.empty_like(q)
    for row, q_len, s_len, blocks, mask in plan.prefills:
        qb = q[row : row + q_len].transpose(0, 1)[None]  # [1, H, Q, D] (4-D: fused SDPA kernels)
        if mask is None:
            kb = k[row : row + q_len].transpose(0, 1)[None]  # [1, Hkv, S, D]
            vb = v[row : row + q_len].transpose(0, 1)[None]
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kb = kv_cache[0, blocks].flatten(0, 1)[:s_len].transpose(0, 1)  # [Hkv, S, D]
            vb = kv_cache[1, blocks].flatten(0, 1)[:s_len].transpose(0, 1)
            kb = kb.repeat_interleave(group, dim=0)[None]  # [1, H, S, D]
            vb = vb.repeat_interleave(group, dim=0)[None]
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out[row : row + q_len] = ob[0].transpose(0, 1)

    if plan.decode_tables is not None and use_kernel and plan.decode_rows is not None:
        od = paged_decode_attention(
            q[plan.decode_rows], kv_cache[0], kv_cache[1], plan.decode_tables, plan.decode_seq_lens, scale
        )
        out[plan.decode_rows] = od
    elif plan.decode_tables is not None:
        kd = kv_cache[0][plan.decode_tables].flatten(1, 2).transpose(1, 2)  # [Bd, Hkv, S, D]
        vd = kv_cache[1][plan.decode_tables].flatten(1, 2).transpose(1, 2)
        qd = q if plan.decode_rows is None else q[plan.decode_rows]
        qd = qd.view(-1, num_kv_heads, group, head_dim)  # [Bd, Hkv, G, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.decode_mask, scale=scale)
        od = od.reshape(-1, num_heads, head_dim)
        if plan.decode_rows is None:
            return od
        out[plan.decode_rows] = od
    return out


def fresh_prefill_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `fresh_prefill_attention` (flash varlen) takes this dtype and head size."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def fresh_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_lens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Causal attention of packed prompt chunks that all start at position 0, in one varlen flash call.

    q [T, H, D], k/v [T, Hkv, D] (last dim contiguous; GQA in the kernel), cu_lens [B+1] int32 prefix sums
    on the device (zero-length sequences allowed), max_len >= the longest. No host sync: CUDA-graph safe
    with fixed T, B and max_len. Returns [T, H, D]; rows past cu_lens[-1] are left unwritten."""
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_lens, cu_lens, max_len, max_len, 0.0, True, False, scale=scale
    )[0]
    return out


def context_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_query_lens: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Chunks attending to their whole contexts, one varlen flash call: q [T, H, D] packed by
    cu_query_lens, k/v [C, Hkv, D] packed by cu_seq_lens (each context ends with its chunk's tokens);
    causal with the mask aligned to each context's end. No host sync (CUDA-graph safe)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_query_lens, cu_seq_lens, max_query_len, max_seq_len, 0.0, True, False, scale=scale
    )[0]


def _context_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_query_lens: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The spec of `context_prefill_attention`: query i of a chunk of Q rows over a context of S keys sees
    keys 0..S-Q+i."""
    out = torch.zeros_like(q)
    q_bounds, k_bounds = cu_query_lens.tolist(), cu_seq_lens.tolist()
    for b in range(len(q_bounds) - 1):
        q0, q1, k0, k1 = q_bounds[b], q_bounds[b + 1], k_bounds[b], k_bounds[b + 1]
        if q1 > q0:
            out[q0:q1] = _causal_gqa_attention(q[q0:q1], k[k0:k1], v[k0:k1], scale)
    return out


def _fresh_prefill_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The spec of `fresh_prefill_attention`: causal attention within each [cu_lens[i], cu_lens[i+1])."""
    out = torch.zeros_like(q)
    bounds = cu_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            out[start:end] = _causal_gqa_attention(q[start:end], k[start:end], v[start:end], scale)
    return out


def _context_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Every chunk over its context gathered by ``attn.context_slots`` (K/V already written)."""
    flat_k = kv_cache[0].view(-1, *kv_cache.shape[-2:])  # [num_blocks * block_size, Hkv, D]
    flat_v = kv_cache[1].view(-1, *kv_cache.shape[-2:])
    k_ctx = flat_k.index_select(0, attn.context_slots)  # [C, Hkv, D]
    v_ctx = flat_v.index_select(0, attn.context_slots)
    if q.device.type == "cuda":
        return context_prefill_attention(
            q,
            k_ctx,
            v_ctx,
            attn.cu_query_lens,
            attn.cu_seq_lens,
            attn.max_query_len,
            attn.max_seq_len,
            scale,
        )
    return _context_prefill_reference(q, k_ctx, v_ctx, attn.cu_query_lens, attn.cu_seq_lens, scale)


def rotate_and_write_kv(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) views of qkv [T, H + 2 Hkv, D] after the rotary of its q and k heads (in place), with k
    and v written into kv_cache at ``attn.slot_mapping``: one kernel on the Triton path
    (``rotary_write_kv_``), else ``apply_interleaved_rotary_`` and ``write_kv_cache``. Then
    ``paged_attention(..., kv_written=True)``."""
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if not rotary_write_kv_(qkv, num_heads, num_kv_heads, cos, sin, kv_cache, attn.slot_mapping):
        apply_interleaved_rotary_(qkv[:, : num_heads + num_kv_heads], cos, sin)
        _write_new_kv(kv_cache, k, v, attn)
    return q, k, v


def _write_new_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata) -> None:
    if attn.has_padding:
        keep = attn.slot_mapping >= 0
        write_kv_cache(kv_cache, k[keep], v[keep], attn.slot_mapping[keep])
    else:
        write_kv_cache(kv_cache, k, v, attn.slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    kv_written: bool = False,
) -> torch.Tensor:
    """Write k, v [T, Hkv, D] into kv_cache (unless ``kv_written``: ``rotate_and_write_kv`` did), then
    causal attention for q [T, H, D] -> [T, H, D]."""
    if not kv_written:
        _write_new_kv(kv_cache, k, v, attn)
    if attn.context_slots is not None:
        out = _context_attention(q, kv_cache, attn, scale)
        if attn.decode is not None:
            rows = attn.decode.num_seqs
            decoded = paged_decode_attention(
                q[:rows], kv_cache[0], kv_cache[1], attn.decode.block_tables, attn.decode.seq_lens, scale
            )
            out[:rows] = torch.where(attn.decode_mask[:, None, None], decoded, out[:rows])
        return out
    if attn.all_fresh:
        if q.device.type == "cuda":
            return fresh_prefill_attention(q, k, v, attn.cu_query_lens, attn.max_query_len, scale)
        return _fresh_prefill_reference(q, k, v, attn.cu_query_lens, scale)
    if q.device.type == "cuda":
        return _paged_attention_fast(q, k, v, kv_cache, attn, scale)
    if attn.max_query_len == 1 and _use_decode_kernel(q, kv_cache):  # Triton's CPU interpreter
        return _paged_decode_step(q, kv_cache, attn, scale)
    return _paged_attention_reference(q, kv_cache, attn, scale)
