"""Paged KV-cache block accounting.

Contract:
  * The cache has ``num_blocks`` blocks of ``block_size`` token slots; block ids are ``0..num_blocks-1``.
    Token ``i`` of a sequence lives in slot ``block_table[i // block_size] * block_size + i % block_size``.
  * Free ids form a FIFO: ``allocate`` takes from the front, ``free`` returns a sequence's blocks to the
    back in block-table order. A fresh manager hands out 0, 1, 2, ...
  * Every block has a ref count (1 per holder; > 1 is left for prefix sharing). A block is free exactly
    when its ref count is 0, so ``num_free_blocks + num_used_blocks == num_blocks`` always.
  * "No room" is an answer, not an error: ``can_allocate`` / ``can_append`` return False and the caller
    (the scheduler) decides to wait or preempt. ``allocate`` / ``append_slot`` without room raise
    ``RuntimeError`` (a scheduler bug).
"""

from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks ``seq`` still needs so that its first ``num_computed_tokens + num_new_tokens`` slots exist."""
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Extend ``seq.block_table`` to hold ``num_computed_tokens + num_new_tokens`` tokens.

        Returns the newly added block ids (empty when the last block still has room).
        """
        num_missing = self.num_missing_blocks(seq, num_new_tokens)
        if num_missing > self.num_free_blocks:
            raise RuntimeError(
                f"allocate: {seq.seq_id} needs {num_missing} blocks, only {self.num_free_blocks} are free"
            )
        new_block_ids = [self.free_block_ids.popleft() for _ in range(num_missing)]
        for block_id in new_block_ids:
            self.ref_counts[block_id] = 1
        seq.block_table.extend(new_block_ids)
        return new_block_ids

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (the decode step of ``seq``)."""
        return self.can_allocate(seq, 1)

    def append_slot(self, seq: Sequence) -> list[int]:
        return self.allocate(seq, 1)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks; blocks whose ref count reaches 0 go back to the free list."""
        for block_id in seq.block_table:
            assert self.ref_counts[block_id] > 0, f"block {block_id} freed twice"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
