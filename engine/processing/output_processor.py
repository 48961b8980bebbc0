"""Answers out: turns a Sequence's new tokens into its RequestOutput for the step, with the text and
reasoning deltas of its incremental detokenizer (when the engine has a tokenizer) and its logprobs. A stop
string found in the text ends the sequence (``finish(seq, "stop")``) before its output is built.

``add``/``pop`` run under the engine's lock (any thread); ``output`` on the stepping thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.core.sequence import Sequence
from engine.processing.detokenizer import IncrementalDetokenizer, think_token_ids
from engine.request import GenerationRequest, RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.think_start_id, self.think_end_id = think_token_ids(tokenizer) if tokenizer else (None, None)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add(self, req: GenerationRequest) -> None:
        """Start the request's detokenizer (no-op without a tokenizer)."""
        if self.tokenizer is not None:
            self._detokenizers[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, req.stop_strings, req.is_thinking, self.think_start_id, self.think_end_id
            )

    def pop(self, request_id: str) -> None:
        self._detokenizers.pop(request_id, None)

    def output(
        self,
        seq: Sequence,
        finish: Callable[[Sequence, str], None],
        error: str | None = None,
    ) -> RequestOutput:
        """The output of ``seq`` for this step: its unreturned tokens and text; ends it on a stop string."""
        first = seq.num_emitted_tokens
        new_token_ids = seq.output_token_ids[first:]
        seq.num_emitted_tokens = seq.num_output_tokens
        logprobs = None if seq.sampling.logprobs is None else seq.logprobs[first : seq.num_output_tokens]
        text = reasoning = ""
        detokenizer = self._detokenizers.get(seq.seq_id)
        if detokenizer is not None:
            sampling = seq.sampling
            text_ids = new_token_ids
            if seq.finish_reason == "stop" and new_token_ids and new_token_ids[-1] in sampling.stop_token_ids:
                text_ids = new_token_ids[:-1]  # a stop id ends the text, it is not part of it
            delta = detokenizer.add(text_ids)
            if delta.stopped and not seq.is_finished:
                finish(seq, "stop")
            if seq.is_finished:
                tail = detokenizer.finish()
                delta.text += tail.text
                delta.reasoning += tail.reasoning
            text, reasoning = delta.text, delta.reasoning
        return RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=new_token_ids,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            last_token_time=seq.last_token_time,
            text=text,
            reasoning=reasoning,
            error=error,
            num_cached_tokens=seq.num_cached_tokens or 0,
            logprobs=logprobs,
        )
