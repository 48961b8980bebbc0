"""BlockManager: exact block ids, ref counts and free-list order."""

from __future__ import annotations

import pytest
import torch

from engine.block_manager import BlockManager
from engine.sampling import SamplingParams
from engine.sequence import Sequence


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
        assert bm.append_slot(seq) == []
        seq.num_computed_tokens += 1
    assert bm.append_slot(seq) == [2]
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
    from engine.model_runner import num_kv_blocks

    cpu = torch.device("cpu")
    # 1000 bytes per token, 16-token blocks: 16000 bytes per block
    assert num_kv_blocks(EngineConfig(kv_cache_memory_bytes=100_000), 1000, cpu) == 6
    assert num_kv_blocks(EngineConfig(num_kv_blocks=3, kv_cache_memory_bytes=100_000), 1000, cpu) == 3
    assert num_kv_blocks(EngineConfig(), 1000, cpu) == (1 << 30) // 16000
    with pytest.raises(
        ValueError, match=r"^kv_cache_memory_bytes: a budget of 15999 bytes holds no KV block"
    ):
        num_kv_blocks(EngineConfig(kv_cache_memory_bytes=15_999), 1000, cpu)
