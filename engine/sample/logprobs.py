"""Log-probabilities in OpenAI's shape: token ids → ``{"token", "logprob", "bytes", "top_logprobs"}``.

Contract:
  * ``TokenTexts(tokenizer)`` (a ``tokenizers.Tokenizer``): ``bytes_of(id)`` is the exact bytes the token
    contributes to the text (a byte-level BPE token may hold part of a UTF-8 character), ``text_of(id)``
    those bytes decoded with U+FFFD for partial characters (OpenAI's ``token``).
  * ``content_items(token_ids, logprobs, texts, skip_ids)`` -> one item per token not in ``skip_ids``
    (eos and stop ids end the answer and have no text), each with its ``top_logprobs`` list (most likely
    first), the shape of ``choices[].logprobs.content`` in the Chat Completions API.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes) → byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenTexts:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = tokenizer.decoder
        self._is_byte_level = decoder is not None and "ByteLevel" in type(decoder).__name__
        self._byte_decoder = _byte_decoder()
        self.bytes_of = lru_cache(maxsize=1 << 16)(self._bytes_of)

    def _bytes_of(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._is_byte_level and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def item(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text_of(token_id), "logprob": logprob, "bytes": list(self.bytes_of(token_id))}


def content_items(
    token_ids: list[int],
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]],
    texts: TokenTexts,
    skip_ids: frozenset[int] | set[int] = frozenset(),
) -> list[dict[str, Any]]:
    items = []
    for token_id, (logprob, top) in zip(token_ids, logprobs, strict=True):
        if token_id in skip_ids:
            continue
        item = texts.item(token_id, logprob)
        item["top_logprobs"] = [texts.item(t, lp) for t, lp in top]
        items.append(item)
    return items
