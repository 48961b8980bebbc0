"""BlockManager: exact block ids, ref counts and free-list order."""

from __future__ import annotations

import pytest
import torch

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence
from engine.sample.sampler import SamplingParams


def make_seq(num_prompt_tokens: int, seq_id: str = "s") -> Sequence:
    return Sequence(seq_id, list(range(1, num_prompt_tokens + 1)), SamplingParams())


def test_allocate_prompt_then_decode_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(5)
    assert bm.can_allocate(seq, 5)
    assert bm.allocate(seq, 5) == [0, 1]
    assert seq.block_table == [0, 1]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (6, 2)
    seq.num_computed_tokens = 5
    seq.token_ids.append(42)
    # tokens 5, 6, 7 fit in block 1; token 8 needs a new block
    for _ in range(3):
        assert bm.allocate(seq, 1) == []
        seq.num_computed_tokens += 1
    assert bm.allocate(seq, 1) == [2]
    assert seq.block_table == [0, 1, 2]
    assert bm.ref_counts[:4] == [1, 1, 1, 0]


def test_chunked_allocation_extends_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(10)
    assert bm.allocate(seq, 3) == [0]
    seq.num_computed_tokens = 3
    assert bm.allocate(seq, 3) == [1]
    seq.num_computed_tokens = 6
    assert bm.allocate(seq, 4) == [2]
    assert seq.block_table == [0, 1, 2]


def test_no_room_is_false_then_error():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = make_seq(8, "a"), make_seq(5, "b")
    bm.allocate(a, 8)
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(b, 5)
    assert bm.can_allocate(b, 4)
    with pytest.raises(RuntimeError, match="needs 2 blocks, only 1 are free"):
        bm.allocate(b, 5)
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_free_returns_blocks_in_table_order_to_the_back():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq(4, "a"), make_seq(3, "b")
    assert bm.allocate(a, 4) == [0, 1]
    assert bm.allocate(b, 3) == [2, 3]
    bm.free(a)
    assert list(bm.free_block_ids) == [4, 5, 0, 1]
    assert a.block_table == [] and a.num_computed_tokens == 0
    c = make_seq(5, "c")
    assert bm.allocate(c, 5) == [4, 5, 0]
    bm.free(b)
    bm.free(c)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 6
    assert bm.ref_counts == [0] * 6


def test_shared_block_is_refcounted():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq(2, "a"), make_seq(2, "b")
    bm.allocate(a, 2)
    b.block_table = list(a.block_table)  # a holder that shares a's block
    bm.ref_counts[0] += 1
    bm.free(a)
    assert bm.ref_counts[0] == 1 and bm.num_used_blocks == 1
    bm.free(b)
    assert bm.num_used_blocks == 0


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)


def test_num_kv_blocks_from_budget():
    from engine.config import EngineConfig
    from engine.runner.model_runner import num_kv_blocks

    cpu = torch.device("cpu")
    # 1000 bytes per token, 16-token blocks: 16000 bytes per block
    assert num_kv_blocks(EngineConfig(kv_cache_memory_bytes=100_000), 1000, cpu) == 6
    assert num_kv_blocks(EngineConfig(num_kv_blocks=3, kv_cache_memory_bytes=100_000), 1000, cpu) == 3
    assert num_kv_blocks(EngineConfig(), 1000, cpu) == (1 << 30) // 16000
    with pytest.raises(
        ValueError, match=r"^kv_cache_memory_bytes: a budget of 15999 bytes holds no KV block"
    ):
        num_kv_blocks(EngineConfig(kv_cache_memory_bytes=15_999), 1000, cpu)


# -- prefix caching --------------------------------------------------------------------------------------


def cached_manager(num_blocks: int = 8, block_size: int = 4) -> BlockManager:
    return BlockManager(num_blocks, block_size, enable_prefix_caching=True)


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Allocate and 'compute' all of ``seq`` (as a prefill step would), then commit its blocks."""
    bm.allocate(seq, seq.num_new_tokens)
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)
    return seq


def token_seq(ids: list[int], seq_id: str = "s", **kwargs) -> Sequence:
    return Sequence(seq_id, ids, SamplingParams(), **kwargs)


def test_full_blocks_are_found_by_content_and_refcounted():
    bm = cached_manager()
    a = computed(bm, token_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    assert a.block_table == [0, 1, 2] and bm.stats.num_cached_blocks == 2  # the partial block has no hash
    b = token_seq([1, 2, 3, 4, 5, 6, 7, 8, 10, 11], "b")
    assert bm.match_prefix(b) == 8
    assert b.block_table == [0, 1] and b.num_computed_tokens == 8 and b.num_cached_tokens is None
    assert bm.ref_counts[:3] == [2, 2, 1]
    assert bm.allocate(b, b.num_new_tokens) == [3]
    bm.free(a)
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert list(bm.free_block_ids) == [4, 5, 6, 7, 2] and list(bm.cached_free) == []
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.ref_counts == [0] * 8
    # cached blocks sit in the LRU pool, tail first (evicted before the head of the prefix)
    assert list(bm.cached_free) == [1, 0]
    s = bm.stats
    assert (s.num_queried_tokens, s.num_hit_tokens, s.num_reused_blocks) == (10, 8, 2)


def test_a_prompt_looked_up_again_while_it_waits_counts_once():
    """A sequence that found nothing is looked up again each step while it waits (for the ViT): the
    counters take it once; once its blocks are freed (a preemption), its next lookup counts again."""
    bm = cached_manager()
    waiting = token_seq([7, 7, 7, 7, 7, 7, 7, 7, 7], "w")
    for _ in range(3):
        assert bm.match_prefix(waiting) == 0
    assert (bm.stats.num_queried_tokens, bm.stats.num_hit_tokens) == (9, 0)
    computed(bm, waiting)
    bm.free(waiting)
    waiting.num_computed_tokens = 0
    assert bm.match_prefix(waiting) == 8
    assert (bm.stats.num_queried_tokens, bm.stats.num_hit_tokens, bm.stats.num_reused_blocks) == (18, 8, 2)


def test_match_leaves_the_last_token_and_never_ends_on_the_last_block():
    bm = cached_manager()
    computed(bm, token_seq([1, 2, 3, 4, 5, 6, 7, 8], "a"))
    same = token_seq([1, 2, 3, 4, 5, 6, 7, 8], "b")  # fully cached, ends on a block boundary
    assert bm.match_prefix(same) == 4 and same.block_table == [0]
    longer = token_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "c")
    assert bm.match_prefix(longer) == 8 and longer.block_table == [0, 1]
    assert bm.match_prefix(token_seq([1, 2, 3, 4, 9, 9, 9, 9, 9], "d")) == 4


def test_eviction_takes_plain_free_blocks_first_then_the_least_recently_freed():
    bm = cached_manager(num_blocks=4, block_size=2)
    a = computed(bm, token_seq([1, 2, 3, 4], "a"))
    b = computed(bm, token_seq([5, 6, 7, 8], "b"))
    bm.free(a)
    bm.free(b)
    assert list(bm.cached_free) == [1, 0, 3, 2] and bm.num_free_blocks == 4
    c = token_seq([9, 9, 9], "c")
    assert bm.allocate(c, 3) == [1, 0]  # no plain free id left: a's blocks go, tail first
    assert bm.stats.num_evicted_blocks == 2 and bm.stats.num_cached_blocks == 2
    assert bm.match_prefix(token_seq([1, 2, 3, 4, 0], "a2")) == 0
    assert bm.match_prefix(token_seq([5, 6, 7, 8, 0], "b2")) == 4


def test_equal_blocks_computed_twice_keep_one_cached_copy():
    bm = cached_manager()
    a = computed(bm, token_seq([1, 2, 3, 4, 5], "a"))
    b = computed(bm, token_seq([1, 2, 3, 4, 6], "b"))  # computed beside a, without a lookup
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    assert bm.hash_of_block[0] is not None and bm.hash_of_block[2] is None
    bm.free(b)
    assert list(bm.free_block_ids)[-2:] == [2, 3]  # b's copy is plain free again
    bm.free(a)
    assert bm.num_used_blocks == 0


def test_image_identity_and_positions_are_part_of_the_hash():
    bm = cached_manager(num_blocks=16, block_size=4)
    image_id = 99
    ids = [1, 2] + [image_id] * 4 + [3, 4, 5]
    positions = torch.arange(9).expand(3, -1).clone()

    def seq(seq_id, image_hash, pos=positions):
        return token_seq(
            ids,
            seq_id,
            image_token_id=image_id,
            image_sizes=[4],
            image_hashes=[image_hash],
            mrope_positions=pos,
        )

    computed(bm, seq("a", b"cat"))
    assert bm.match_prefix(seq("same image", b"cat")) == 8
    assert bm.match_prefix(seq("other image", b"dog")) == 0  # block 0 already holds image tokens
    moved = positions.clone()
    moved[1:, 6:] += 1  # same tokens and image, other positions from token 6 on
    assert bm.match_prefix(seq("other positions", b"cat", moved)) == 4
    unknown = token_seq(ids, "no hash", image_token_id=image_id, mrope_positions=positions)
    assert bm.match_prefix(unknown) == 0 and unknown.is_hash_stopped
