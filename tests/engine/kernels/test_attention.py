"""Paged attention over a mixed batch equals dense causal attention of each sequence on its own."""

from __future__ import annotations

import random

import pytest
import torch

from engine.kernels.attention import (
    AttentionMetadata,
    _paged_attention_fast,
    paged_attention,
    write_kv_cache,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 40
SCALE = HEAD_DIM**-0.5


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [S, H(kv), D] of one whole sequence -> [S, H, D] (GQA by repeat_interleave, as transformers)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class PagedSequences:
    """Sequences of random q/k/v fed through the paged cache in steps of given chunk sizes."""

    def __init__(self, lengths: list[int], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.q = [torch.randn(n, NUM_HEADS, HEAD_DIM, generator=gen) for n in lengths]
        self.k = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in lengths]
        self.v = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in lengths]
        blocks = list(range(1, NUM_BLOCKS))
        random.Random(seed).shuffle(blocks)  # non-contiguous, out-of-order block tables
        self.block_tables = []
        for n in lengths:
            need = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
            self.block_tables.append([blocks.pop() for _ in range(need)])
        self.done = [0] * len(lengths)
        self.kv_cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)

    def step(self, chunks: dict[int, int], impl) -> dict[int, torch.Tensor]:
        """Run `chunks` {seq: new tokens} in one batch; returns each seq's output rows."""
        seqs = sorted(chunks)
        q_lens = [chunks[s] for s in seqs]
        seq_lens = [self.done[s] + chunks[s] for s in seqs]
        attn = AttentionMetadata.build(q_lens, seq_lens, [self.block_tables[s] for s in seqs], BLOCK_SIZE)
        rows = [slice(self.done[s], self.done[s] + chunks[s]) for s in seqs]
        q = torch.cat([self.q[s][r] for s, r in zip(seqs, rows, strict=True)])
        k = torch.cat([self.k[s][r] for s, r in zip(seqs, rows, strict=True)])
        v = torch.cat([self.v[s][r] for s, r in zip(seqs, rows, strict=True)])
        out = impl(q, k, v, self.kv_cache, attn, SCALE)
        result, start = {}, 0
        for s, n in zip(seqs, q_lens, strict=True):
            result[s] = out[start : start + n]
            start += n
            self.done[s] += n
        return result


def fast_impl(q, k, v, kv_cache, attn, scale):
    """The CUDA path (SDPA per prefill, batched decode gather), run here on CPU."""
    write_kv_cache(kv_cache, k, v, attn.slot_mapping)
    return _paged_attention_fast(q, k, v, kv_cache, attn, scale)


SCHEDULES = {
    # prefill in one go, then decode steps batched together
    "prefill_then_decode": [{0: 5, 1: 9}, {0: 1, 1: 1}, {0: 1, 1: 1}, {0: 1}],
    # chunked prefill of seq 1 mixed with decode of seq 0 and a fresh prefill of seq 2
    "chunked_mix": [{0: 6}, {0: 1, 1: 4}, {0: 1, 1: 3, 2: 7}, {1: 5, 2: 1}, {0: 1, 1: 1, 2: 1}],
    # single-token steps only (decode-like from the first token)
    "token_by_token": [{0: 1, 1: 1}] * 6,
}


@pytest.mark.parametrize("impl", [paged_attention, fast_impl], ids=["reference", "fast"])
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=str)
def test_paged_attention_equals_dense_causal(schedule, impl):
    steps = SCHEDULES[schedule]
    lengths = [sum(step.get(s, 0) for step in steps) for s in range(3)]
    paged = PagedSequences(lengths)
    outputs: dict[int, list[torch.Tensor]] = {s: [] for s in range(3)}
    for step in steps:
        for s, out in paged.step(step, impl).items():
            outputs[s].append(out)
    for s, n in enumerate(lengths):
        if n == 0:
            continue
        expected = dense_causal(paged.q[s], paged.k[s], paged.v[s])
        torch.testing.assert_close(torch.cat(outputs[s]), expected, atol=1e-5, rtol=1e-5)


def test_padding_slots_are_not_written():
    paged = PagedSequences([3])
    attn = AttentionMetadata.build([3], [3], paged.block_tables, BLOCK_SIZE)
    padded = AttentionMetadata(
        slot_mapping=torch.cat([attn.slot_mapping, torch.tensor([-1])]),
        query_lens=attn.query_lens,
        seq_lens=attn.seq_lens,
        cu_query_lens=attn.cu_query_lens,
        block_tables=attn.block_tables,
    )
    assert padded.has_padding and padded.max_seq_len == 3 and padded.query_lens_cpu == (3,)
    q = torch.cat([paged.q[0], torch.randn(1, NUM_HEADS, HEAD_DIM)])
    k = torch.cat([paged.k[0], torch.full((1, NUM_KV_HEADS, HEAD_DIM), 7.0)])
    v = torch.cat([paged.v[0], torch.full((1, NUM_KV_HEADS, HEAD_DIM), 7.0)])
    out = paged_attention(q, k, v, paged.kv_cache, padded, SCALE)
    torch.testing.assert_close(out[:3], dense_causal(paged.q[0], paged.k[0], paged.v[0]))
    assert not (paged.kv_cache == 7.0).any()


def test_metadata_build_slots_and_prefix_sums():
    attn = AttentionMetadata.build([2, 1], [5, 9], [[3, 7], [4, 1, 6]], block_size=4)
    # seq 0 tokens 3, 4 -> block 3 offset 3, block 7 offset 0; seq 1 token 8 -> block 6 offset 0
    assert attn.slot_mapping.tolist() == [15, 28, 24]
    assert attn.cu_query_lens.tolist() == [0, 2, 3]
    assert attn.block_tables.tolist() == [[3, 7, 0], [4, 1, 6]]
    assert (attn.max_query_len, attn.max_seq_len) == (2, 9)
    with pytest.raises(ValueError, match="block_tables"):
        AttentionMetadata.build([1], [9], [[0, 1]], block_size=4)


def test_reference_is_independent_of_batch_neighbours():
    paged = PagedSequences([6, 6])
    both = paged.step({0: 6, 1: 6}, paged_attention)
    alone = PagedSequences([6, 6])
    only = alone.step({1: 6}, paged_attention)
    torch.testing.assert_close(both[1], only[1])
