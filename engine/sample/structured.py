"""Guided decoding: answers held to a JSON schema, any JSON, a regex or an EBNF grammar (xgrammar).

xgrammar is the grammar engine of vLLM, SGLang and TensorRT-LLM: it compiles a grammar against the
tokenizer's vocabulary once (a persistent pushdown automaton with most tokens' validity precomputed per
state), so filling a step's token mask costs microseconds per sequence, for many sequences at once on a
thread pool; a random model (the worst case for a grammar) still only ever samples allowed tokens.

Contract:
  * ``Guide(type, value)``: ``type`` is one of ``GUIDE_TYPES`` (TensorRT-LLM's
    ``guided_decoding_guide_type`` values): "json" (a JSON object, any keys; ``value`` ignored), "json_schema"
    (``value`` a JSON schema, strict: no properties beyond the schema's), "regex", "ebnf_grammar"
    (xgrammar's EBNF, root rule ``root``).
  * ``GrammarCompiler(tokenizer, vocab_size, stop_token_ids)`` (one per engine).
    ``compile(guide) -> CompiledGrammar`` raises ``ValueError`` starting with ``guided_decoding_guide``
    (or ``guided_decoding_guide_type``) and the reason; results are cached by (type, value), so a schema
    is compiled once (``num_compiled`` counts real compilations). Thread-safe: the input processor compiles in
    ``add_request``, on the caller's thread, never on the engine loop.
  * ``GrammarState(compiled)``: one sequence's matcher. ``sync(output_token_ids)`` feeds it the tokens it
    has not seen (so preemption, dropped run-ahead tokens and retries never put it out of step);
    ``is_terminated`` once it accepted a stop token.
  * ``apply_grammars(logits, rows, states)``: in place, sets the logits of the tokens each grammar forbids
    to -inf for the given rows (one batched mask fill, one masked write). A grammar that has finished
    (its root rule complete) allows only the stop tokens.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
MAX_CACHED_GRAMMARS = 512


@dataclass(frozen=True)
class Guide:
    type: str
    """One of GUIDE_TYPES."""
    value: str = ""
    """The schema (JSON text), regex or EBNF grammar; empty for "json"."""


class GrammarCompiler:
    """Compiles guides against one tokenizer; an LRU cache keyed by (type, value)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int] | tuple[int, ...]) -> None:
        """``tokenizer``: a ``tokenizers.Tokenizer`` or a transformers tokenizer; ``vocab_size``: the
        model's logits width (may exceed the tokenizer's); ``stop_token_ids``: ids that end an answer."""
        import xgrammar as xgr

        if not hasattr(tokenizer, "convert_ids_to_tokens"):  # a bare tokenizers.Tokenizer
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=4, cache_enabled=False)
        self._cache: OrderedDict[Guide, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0

    def compile(self, guide: Guide) -> Any:
        if guide.type not in GUIDE_TYPES:
            raise ValueError(
                f"guided_decoding_guide_type: {guide.type!r} must be one of {', '.join(GUIDE_TYPES)}"
            )
        key = Guide(guide.type, "" if guide.type == "json" else guide.value)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(key)
        with self._lock:
            self._cache[key] = compiled
            self.num_compiled += 1
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, guide: Guide) -> Any:
        if guide.type != "json" and not guide.value:
            raise ValueError(f"guided_decoding_guide: empty; a {guide.type} guide needs a value")
        try:
            if guide.type == "json":
                return self._compiler.compile_grammar(_json_schema_ebnf('{"type": "object"}', strict=False))
            if guide.type == "json_schema":
                schema = json.loads(guide.value)
                if not isinstance(schema, dict):
                    raise ValueError(f"a JSON schema is an object, not {type(schema).__name__}")
                return self._compiler.compile_grammar(_json_schema_ebnf(guide.value))
            if guide.type == "regex":
                return self._compiler.compile_regex(guide.value)
            return self._compiler.compile_grammar(guide.value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"guided_decoding_guide: not valid JSON ({exc})") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"guided_decoding_guide: invalid {guide.type} ({reason})") from None


def _json_schema_ebnf(schema: str, strict: bool = True) -> str:
    """xgrammar's grammar for ``schema`` (compact separators; ``strict``: no properties beyond the
    schema's), as EBNF.

    xgrammar 0.2.8 writes the characters of a string with minLength/maxLength as a class that lets raw
    control characters (U+0000-U+001F) in, which a JSON parser rejects (its plain strings exclude them);
    adding them to the excluded range keeps every answer parseable."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    return str(grammar).replace(r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.num_accepted = 0

    def sync(self, output_token_ids: list[int]) -> None:
        """Accept the output tokens the matcher has not seen yet."""
        while self.num_accepted < len(output_token_ids) and not self.matcher.is_terminated():
            if not self.matcher.accept_token(output_token_ids[self.num_accepted]):
                # only a forced end (max_tokens, stop string, abort) follows a token outside the grammar
                self.num_accepted = len(output_token_ids)
                return
            self.num_accepted += 1

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class _MaskBuffers:
    """The bitmasks of the last few steps: host buffers (pinned on a GPU) reused in turn, so a step neither
    allocates pinned memory nor overwrites a mask whose copy to the device may still be queued (each
    buffer's copy is fenced by an event, waited on before the buffer is filled again)."""

    RING = 3

    def __init__(self) -> None:
        import xgrammar as xgr

        # xgrammar fills the masks of a batch on a thread pool, outside the GIL (8 threads were no faster
        # than 4 on an H200 host: most rows take microseconds, a few near a string's maxLength ~1-2 ms)
        self.matcher = xgr.BatchGrammarMatcher(max_threads=max(1, min(4, os.cpu_count() or 1)))
        self.buffers: list[torch.Tensor] = []
        self.fences: list[torch.cuda.Event | None] = []
        self.turn = 0

    def take(self, num_rows: int, num_words: int, pinned: bool) -> tuple[int, torch.Tensor]:
        """(ring index, a [num_rows, num_words] int32 host view with every bit set)."""
        if not self.buffers or self.buffers[0].shape[0] < num_rows or self.buffers[0].shape[1] != num_words:
            rows = max(num_rows, 2 * self.buffers[0].shape[0] if self.buffers else 64)
            self.buffers = [
                torch.empty((rows, num_words), dtype=torch.int32, pin_memory=pinned) for _ in range(self.RING)
            ]
            self.fences = [None] * self.RING
        k, self.turn = self.turn, (self.turn + 1) % self.RING
        if self.fences[k] is not None:
            self.fences[k].synchronize()  # its last copy was queued steps ago: long done
            self.fences[k] = None
        view = self.buffers[k][:num_rows]
        view.fill_(-1)
        return k, view


_local = threading.local()  # one _MaskBuffers per stepping thread


def apply_grammars(logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
    """In place: forbid for each row in ``rows`` (of ``logits`` [num_seqs, vocab]) what its grammar
    forbids. The masks are filled on the host in one batched call (a thread pool) and applied on the
    logits' device in one pass; on a GPU the mask is copied from pinned memory, so nothing here waits for
    the GPU (the forward that produces ``logits`` may still be running)."""
    import xgrammar as xgr

    masks = getattr(_local, "masks", None)
    if masks is None:
        masks = _local.masks = _MaskBuffers()
    num_seqs, vocab_size = logits.shape
    on_gpu = logits.device.type != "cpu"
    # [num_seqs, ceil(vocab / 32)] int32, all bits set: rows outside ``rows`` allow every token
    k, bitmask = masks.take(num_seqs, -(-vocab_size // 32), pinned=on_gpu)
    masks.matcher.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask, indices=rows)
    if on_gpu:
        bitmask = bitmask.to(logits.device, non_blocking=True)
        fence = torch.cuda.Event()
        fence.record()
        masks.fences[k] = fence
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size)
