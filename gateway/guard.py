"""Prompt guard (refuse requests containing configured phrases) and output word filter (mask words).

Matching is case-insensitive over whitespace-normalised text. The stream filter holds back the
last few characters of each delta so a word split across deltas is still masked.
"""

from __future__ import annotations

import re
from typing import Any

from .openai_schema import ApiError


class PromptGuard:
    def __init__(self, phrases: tuple[str, ...]) -> None:
        self.phrases = tuple(" ".join(p.lower().split()) for p in phrases if p.strip())

    def check(self, messages: list[dict[str, Any]]) -> None:
        """Raise 400 ``prompt_rejected`` when a system/user text contains a configured phrase."""
        if not self.phrases:
            return
        for i, msg in enumerate(messages):
            if msg["role"] == "assistant":
                continue
            content = msg["content"]
            texts = (
                [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
            )
            normalised = " ".join(" ".join(texts).lower().split())
            for phrase in self.phrases:
                if phrase in normalised:
                    raise ApiError(
                        400,
                        f"messages[{i}] was rejected by the prompt guard (it contains {phrase!r}).",
                        param=f"messages[{i}]",
                        code="prompt_rejected",
                    )


class OutputFilter:
    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = tuple(w for w in (w.strip() for w in words) if w)
        self._pattern = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b", re.IGNORECASE)
            if self.words
            else None
        )
        self.hold = max((len(w) for w in self.words), default=0)

    @property
    def is_enabled(self) -> bool:
        return self._pattern is not None

    def apply(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: "*" * len(m.group(0)), text)

    def stream(self) -> StreamFilter:
        return StreamFilter(self)


class StreamFilter:
    """Filters a stream of deltas: ``feed(delta)`` returns what is safe to send, ``flush()`` the rest."""

    def __init__(self, output_filter: OutputFilter) -> None:
        self._filter = output_filter
        self._pending = ""

    def feed(self, delta: str) -> str:
        if not self._filter.is_enabled:
            return delta
        self._pending += delta
        filtered = self._filter.apply(self._pending)
        # Hold back a tail that could be the start of a filtered word (cut at a word boundary).
        cut = len(filtered) - self._filter.hold
        while cut > 0 and filtered[cut - 1].isalnum() and filtered[cut].isalnum():
            cut -= 1
        if cut <= 0:
            self._pending = filtered
            return ""
        out, self._pending = filtered[:cut], filtered[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = self._filter.apply(self._pending), ""
        return out
