"""ImageCache: LRU by bytes, copies on put, counts hits and misses; no hash or no capacity stores nothing."""

from __future__ import annotations

import torch

from engine.core.image_cache import ImageCache


def rows(value: float, n: int = 4) -> torch.Tensor:
    return torch.full((n, 8), value)  # n * 32 bytes


def test_lru_within_capacity_and_copies():
    cache = ImageCache(capacity_bytes=256)
    source = rows(1.0)
    cache.put(b"a", source)
    source.fill_(9.0)  # the cache holds its own copy
    cache.put(b"b", rows(2.0))
    assert torch.equal(cache.get(b"a"), rows(1.0))  # a becomes the most recently used
    cache.put(b"c", rows(3.0))  # 384 bytes > 256: b, the least recently used, goes
    assert b"b" not in cache and b"a" in cache and b"c" in cache
    assert cache.num_bytes == 256
    assert cache.get(b"b") is None
    assert (cache.num_hits, cache.num_misses) == (1, 1)
    cache.put(b"big", rows(4.0, n=9))  # larger than the whole capacity: not stored
    assert b"big" not in cache and len(cache) == 2


def test_no_hash_or_no_capacity_stores_and_counts_nothing():
    cache = ImageCache(capacity_bytes=256)
    cache.put(None, rows(1.0))
    assert None not in cache and cache.get(None) is None and len(cache) == 0
    off = ImageCache(capacity_bytes=0)
    off.put(b"a", rows(1.0))
    assert off.get(b"a") is None and (off.num_hits, off.num_misses) == (0, 0)
