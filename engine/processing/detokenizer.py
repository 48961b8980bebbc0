"""Incremental detokenization of one sequence: UTF-8 safe text deltas, stop strings, reasoning split.

Contract of ``IncrementalDetokenizer``:
  * ``add(new_token_ids) -> Delta(text, reasoning, stopped)``; ``finish() -> Delta`` flushes what was held
    back. Concatenating every delta's ``text`` (and ``reasoning``) gives the decoded output exactly, minus
    special tokens and minus everything from the first stop string on.
  * Never emits half a character: decoding restarts from a prefix offset (vLLM style) and the newest text
    is held back while it ends with U+FFFD (a multi-byte character split over tokens).
  * Stop strings: the first occurrence ends the sequence (``stopped=True``); the text excludes the stop
    string and what follows. While streaming, the last ``len(longest stop string) - 1`` characters are
    held back so a stop string split across steps is never half emitted. Tokens after a stop are ignored.
  * Reasoning: text goes to ``reasoning`` between ``think_start_id`` and ``think_end_id`` and to ``text``
    elsewhere; ``is_thinking=True`` means the output starts inside reasoning (the prompt already opened
    ``<think>``, or the model thinks first by default). The think tokens themselves are never emitted.
    Stop strings are searched in each part separately.
The tokenizer needs ``decode(ids, skip_special_tokens=True)`` (HF tokenizers and ``tokenizers.Tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Delta:
    text: str = ""
    reasoning: str = ""
    stopped: bool = False


def think_token_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """Ids of "<think>" and "</think>" in ``tokenizer`` (None when it has no such token)."""

    def lookup(token: str) -> int | None:
        if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
            return tokenizer.token_to_id(token)
        token_id = tokenizer.convert_tokens_to_ids(token)
        return None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)

    return lookup("<think>"), lookup("</think>")


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        stop_strings: list[str] | tuple[str, ...] = (),
        is_thinking: bool = False,
        think_start_id: int | None = None,
        think_end_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.num_held_chars = max((len(s) for s in self.stop_strings), default=1) - 1
        self.is_thinking = is_thinking
        self.think_start_id = think_start_id
        self.think_end_id = think_end_id
        self.is_stopped = False
        self.token_ids: list[int] = []  # tokens of the current part (since the last think token)
        self.prefix_offset = 0  # token_ids[prefix_offset:read_offset] decode to text already taken
        self.read_offset = 0
        self.pending = ""  # decoded text of the current part not emitted yet

    def add(self, new_token_ids: list[int]) -> Delta:
        delta = Delta()
        for token_id in new_token_ids:
            if self.is_stopped:
                break
            if token_id in (self.think_start_id, self.think_end_id):
                self._flush_part(delta)
                self.is_thinking = token_id == self.think_start_id
                continue
            self.token_ids.append(token_id)
            self.pending += self._decode_new()
            self._check_stop(delta)
        if not self.is_stopped:
            self._emit(delta, self.pending[: max(0, len(self.pending) - self.num_held_chars)])
        return delta

    def finish(self) -> Delta:
        """Flush held-back text (also the trailing text of an incomplete character) at the end."""
        delta = Delta(stopped=self.is_stopped)
        if not self.is_stopped:
            self._flush_part(delta)
        return delta

    def _decode_new(self) -> str:
        prefix = self.tokenizer.decode(
            self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return full[len(prefix) :]
        return ""

    def _check_stop(self, delta: Delta) -> None:
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self._emit(delta, self.pending[: min(hits)])
            self.pending = ""
            self.is_stopped = delta.stopped = True

    def _flush_part(self, delta: Delta) -> None:
        """End the current text part: emit everything decoded, even an incomplete trailing character."""
        tail = self.tokenizer.decode(self.token_ids[self.prefix_offset :], skip_special_tokens=True)
        prefix = self.tokenizer.decode(
            self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        self.pending += tail[len(prefix) :]
        self._check_stop(delta)
        if not self.is_stopped:
            self._emit(delta, self.pending)
        self.token_ids, self.prefix_offset, self.read_offset = [], 0, 0

    def _emit(self, delta: Delta, text: str) -> None:
        if not text:
            return
        self.pending = self.pending[len(text) :]
        if self.is_thinking:
            delta.reasoning += text
        else:
            delta.text += text
