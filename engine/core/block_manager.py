"""Paged KV-cache block accounting, with content-addressed prefix caching.

Contract:
  * The cache has ``num_blocks`` blocks of ``block_size`` token slots; block ids are ``0..num_blocks-1``.
    Token ``i`` of a sequence lives in slot ``block_table[i // block_size] * block_size + i % block_size``.
  * Every block has a ref count (1 per holder). A block is free exactly when its ref count is 0, so
    ``num_free_blocks + num_used_blocks == num_blocks`` always. Free blocks are of two kinds:
      - plain free ids, a FIFO: ``allocate`` takes from the front, ``free`` returns a sequence's
        uncached blocks to the back in block-table order. A fresh manager hands out 0, 1, 2, ...
      - cached free blocks (prefix caching on): full blocks whose content hash is known, kept with their
        KV in an LRU pool. ``allocate`` evicts the least recently freed one only when no plain id is
        left (its hash is forgotten then). ``free`` puts a sequence's cached blocks at the MRU end in
        reverse table order, so a prefix's tail is evicted before its head.
  * A full block's hash chains the parent block's hash, the block's token ids, the identity of the
    images whose placeholder tokens it holds (content hash + the image's start relative to the block:
    the same placeholder ids stand for different images), and the M-RoPE positions of its tokens.
    A block with an image of unknown identity has no hash, nor has any block after it.
  * ``match_prefix(seq)`` (a sequence with no blocks): maps the longest run of cached full blocks of
    ``seq.token_ids`` into its block table (ref count + 1 each) and sets ``num_computed_tokens`` to their
    tokens. At least the last token is left to compute (its logits are needed), and a match never ends
    on the last block of the sequence, so no shared block is ever written.
  * ``commit(seq)`` after ``num_computed_tokens`` advances: each newly full and computed block gets its
    hash and becomes findable (unless an equal block is cached already: then it stays private).
  * "No room" is an answer, not an error: ``can_allocate`` returns False and the caller (the scheduler)
    decides to wait or preempt. ``allocate`` without room raises ``RuntimeError`` (a scheduler bug).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from engine.core.sequence import Sequence


@dataclass(frozen=True)
class PrefixCacheStats:
    num_queried_tokens: int = 0
    """Tokens of the sequences looked up (prompt + output so far), since start."""
    num_hit_tokens: int = 0
    """Of those, tokens found in the cache (not computed again)."""
    num_reused_blocks: int = 0
    """Blocks mapped from the cache into a block table."""
    num_new_blocks: int = 0
    """Blocks allocated empty."""
    num_evicted_blocks: int = 0
    """Cached free blocks given to other content."""
    num_cached_blocks: int = 0
    """Blocks with a known hash now (in use or free)."""


def block_hash(parent: bytes, seq: Sequence, index: int, block_size: int) -> bytes | None:
    """Hash of full block ``index`` of ``seq`` chained on ``parent``; None when an image in it has no hash."""
    start, end = index * block_size, (index + 1) * block_size
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", seq.token_ids[start:end]).tobytes())
    for span_start, span_end, image_hash in seq.image_spans:
        if span_start >= end:
            break
        if span_end <= start:
            continue
        if image_hash is None:
            return None
        h.update(b"i%d:" % (span_start - start))
        h.update(image_hash)
    if seq.mrope_positions is not None:
        h.update(seq.positions_bytes(start, end))
    elif end > seq.num_prompt_tokens and seq.mrope_delta:
        h.update(b"d%d" % seq.mrope_delta)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.hash_of_block: list[bytes | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_reused_blocks = 0
        self.num_new_blocks = 0
        self.num_evicted_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self.num_queried_tokens,
            self.num_hit_tokens,
            self.num_reused_blocks,
            self.num_new_blocks,
            self.num_evicted_blocks,
            len(self.block_of_hash),
        )

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
        new_block_ids = [self._take_free() for _ in range(num_missing)]
        for block_id in new_block_ids:
            self.ref_counts[block_id] = 1
        seq.block_table.extend(new_block_ids)
        self.num_new_blocks += num_missing
        return new_block_ids

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks; a block whose ref count reaches 0 becomes free (cached free
        when it has a hash)."""
        released = []
        for block_id in seq.block_table:
            assert self.ref_counts[block_id] > 0, f"block {block_id} freed twice"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                released.append(block_id)
        for block_id in released:
            if self.hash_of_block[block_id] is None:
                self.free_block_ids.append(block_id)
        for block_id in reversed(released):
            if self.hash_of_block[block_id] is not None:
                self.cached_free[block_id] = None
        seq.block_table = []
        seq.is_prefix_queried = False  # a later admission looks its prompt up again
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0

    # -- prefix cache ----------------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Map ``seq``'s longest cached run of full blocks into its (empty) block table; returns the
        number of tokens found (0 with prefix caching off)."""
        assert not seq.block_table and seq.num_computed_tokens == 0, f"match_prefix: {seq} has blocks"
        if not self.enable_prefix_caching:
            return 0
        num_tokens = len(seq)
        hits = self._cached_run(seq)
        for block_id in hits:
            if self.ref_counts[block_id] == 0:
                del self.cached_free[block_id]
            self.ref_counts[block_id] += 1
        seq.block_table = hits
        seq.num_committed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.is_prefix_queried:  # a sequence found nothing may be looked up again while it waits
            seq.is_prefix_queried = True
            self.num_queried_tokens += num_tokens
        if hits:  # found on the first lookup, or on a later one (a block another sequence computed meanwhile)
            self.num_hit_tokens += seq.num_computed_tokens
            self.num_reused_blocks += len(hits)
        return seq.num_computed_tokens

    def commit(self, seq: Sequence) -> None:
        """Make ``seq``'s full, computed blocks findable by their hash."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for index in range(seq.num_committed_blocks, len(hashes)):
            block_id, h = seq.block_table[index], hashes[index]
            if self.hash_of_block[block_id] is None and h not in self.block_of_hash:
                self.hash_of_block[block_id] = h
                self.block_of_hash[h] = block_id
        seq.num_committed_blocks = num_full

    def next_block_in_flight(self, seq: Sequence, others: list[Sequence]) -> bool:
        """For ``seq`` without blocks: whether the full block it would compute first, past the cached run
        ``match_prefix`` would map (never the block that holds its last token), is a full block of one of
        ``others`` (running sequences) not computed yet: the same content (chained hash), so ``seq`` finds
        it cached once that chunk has run. Changes nothing."""
        if not self.enable_prefix_caching:
            return False
        size = self.block_size
        # only a sequence with a full block still to compute can hold one back (checked first: in most
        # steps every running sequence decodes, and the lookup below is not needed)
        computing = [o for o in others if o is not seq and o.num_computed_tokens // size < len(o) // size]
        if not computing:
            return False
        index = len(self._cached_run(seq))
        end = (index + 1) * size
        if index >= (len(seq) - 1) // size:
            return False
        hashes = self._hashes(seq, index + 1)
        if len(hashes) <= index:
            return False
        for other in computing:
            if other.num_computed_tokens >= end or len(other) < end:
                continue
            theirs = self._hashes(other, index + 1)
            if len(theirs) > index and theirs[index] == hashes[index]:
                return True
        return False

    def _cached_run(self, seq: Sequence) -> list[int]:
        """The cached blocks of ``seq``'s longest run of full blocks from its start, never the block that
        holds its last token."""
        num_tokens = len(seq)
        hashes = self._hashes(seq, num_tokens // self.block_size)
        limit = (num_tokens - 1) // self.block_size
        hits = []
        for h in hashes[:limit]:
            block_id = self.block_of_hash.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of ``seq``'s first ``num_blocks`` full blocks, or fewer: up to the first block with
        no hash. Kept on the sequence (its blocks' content never changes)."""
        hashes = seq.block_hashes
        while len(hashes) < num_blocks and not seq.is_hash_stopped:
            parent = hashes[-1] if hashes else b""
            h = block_hash(parent, seq, len(hashes), self.block_size)
            if h is None:
                seq.is_hash_stopped = True
                break
            hashes.append(h)
        return hashes[:num_blocks]

    def _take_free(self) -> int:
        if self.free_block_ids:
            return self.free_block_ids.popleft()
        block_id, _ = self.cached_free.popitem(last=False)
        del self.block_of_hash[self.hash_of_block[block_id]]
        self.hash_of_block[block_id] = None
        self.num_evicted_blocks += 1
        return block_id
