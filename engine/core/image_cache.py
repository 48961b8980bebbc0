"""Image-embedding cache: ViT outputs kept on the engine's device by image content hash.

Contract:
  * ``get(image_hash)`` returns the embeddings [num_image_tokens, hidden] stored for that hash, or None;
    a hit makes the entry the most recently used. Hits and misses are counted. An image without a hash
    (None) is never stored or found, and with capacity 0 nothing is looked up (nor counted).
  * ``put(image_hash, embeds)`` stores a copy (so a packed ViT output is not kept alive by one image),
    then drops least recently used entries until the stored bytes are within ``capacity_bytes``. An entry
    larger than the whole capacity is not stored. Capacity 0 turns the cache off.
  * ``get_all(hashes)`` returns every hash's embeddings, or None (counting nothing) when any is not held:
    the caller's thread asks it at admission (``LLMEngine.held_image_embeds``) while the loop thread stores
    and drops entries; a lock keeps the two apart. A tensor handed out stays valid after its entry is
    dropped (the caller holds it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class ImageCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, image_hash: bytes | None) -> bool:
        return image_hash is not None and image_hash in self._entries

    def get(self, image_hash: bytes | None) -> torch.Tensor | None:
        if image_hash is None or self.capacity_bytes == 0:
            return None
        with self._lock:
            embeds = self._entries.get(image_hash)
            if embeds is None:
                self.num_misses += 1
                return None
            self._entries.move_to_end(image_hash)
            self.num_hits += 1
            return embeds

    def get_all(self, image_hashes: list[bytes]) -> list[torch.Tensor] | None:
        if not image_hashes or self.capacity_bytes == 0:
            return None
        with self._lock:
            if not all(h in self._entries for h in image_hashes):
                return None
            for h in image_hashes:
                self._entries.move_to_end(h)
            self.num_hits += len(image_hashes)
            return [self._entries[h] for h in image_hashes]

    def put(self, image_hash: bytes | None, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if image_hash is None or size > self.capacity_bytes or image_hash in self._entries:
            return
        embeds = embeds.clone()
        with self._lock:
            self._entries[image_hash] = embeds
            self.num_bytes += size
            while self.num_bytes > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.num_bytes -= old.numel() * old.element_size()
