"""Engine outputs → the llm's Triton responses (TensorRT-LLM output names, config.pbtxt).

Contract:
* `coalesce(state, output, interval, now)`: a streaming request gets at most one response per `interval`
  seconds; outputs in between are held and merged into the next (tokens, text, reasoning and logprobs
  joined; timings of the first and the last). The first token and the final output are never held.
  Returns the output to send now, or None.
* `Responses.send(state, output)` answers one output of a request whose state already took it in
  (`RequestState.add_output`): streaming → the new tokens and text; non-streaming → nothing until the
  final output, then `output_ids` = prompt + completion (completion only with `exclude_input_in_output`)
  and the whole texts. An engine error ends the request with an error response; a cancelled request ends
  with an empty final response. The final response carries COMPLETE_FINAL and `finish_reason`. Every
  response carries `sequence_index`; of a request with several sequences, each sequence's last response
  carries its `finish_reason` and only the last of them COMPLETE_FINAL.
* `lean_stream` (the ensemble sets it): a stream's responses between its first (the first token) and its
  last carry `text_output`, `num_output_tokens`, `last_token_time_ns` and `request_key`, plus
  `reasoning_output` when not empty, `sequence_index` when not 0 and the logprobs when asked; the first and
  the last carry every output. Without it every response carries every output.
* Tensors that repeat across responses are made once (`_shared_tensor`, `RequestState.fixed_tensors`):
  building a pb_utils.Tensor is most of a response's cost.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

logger = logging.getLogger("glmv-llm")

MAX_SHARED_TENSORS = 65536  # the shared-tensor cache starts over past this many (name, value) pairs


def send_error(sender, message: str, code=None) -> None:
    """A final error response (errors sending it are logged: the client may be gone)."""
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    try:
        sender.send(
            pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        )
    except Exception:
        logger.exception("llm: could not send an error response")


def coalesce(state, output, interval: float, now: float):
    """The output to send now (several steps' outputs merged), or None to hold this one back.
    ``interval``: the least time between two responses of a stream, seconds; ``now``: time.monotonic()."""
    if not state.is_streaming:
        return output
    due = output.is_finished or not state.has_first_token or now - state.last_sent >= interval
    if not state.held and due:
        state.last_sent = now
        return output
    state.held.append(output)
    if not due:
        return None
    state.last_sent = now
    held, state.held = state.held, []
    return dataclasses.replace(
        held[-1],
        new_token_ids=[t for o in held for t in o.new_token_ids],
        text="".join(o.text for o in held),
        reasoning="".join(o.reasoning for o in held),
        first_token_time=held[0].first_token_time,
        logprobs=None if held[-1].logprobs is None else [lp for o in held for lp in o.logprobs or ()],
    )


class Responses:
    """Builds and sends the responses of one llm instance (the sender thread)."""

    def __init__(self, engine, wall_offset_ns: int) -> None:
        self.engine = engine
        # engine times are time.monotonic(); responses carry wall-clock ns
        self.wall_offset_ns = wall_offset_ns
        self.shared_tensors: dict[tuple[str, object], object] = {}  # _shared_tensor's, by (name, value)
        self.empty_log_probs = None  # the shared empty `output_log_probs` tensor
        self.token_texts = None  # engine.sample.logprobs.TokenTexts, made on the first request with logprobs

    def send(self, state, output, is_final: bool | None = None) -> None:
        """``is_final``: this response ends the request (default: when the output is its sequence's last;
        of a request with several sequences, only the last sequence's last response does)."""
        is_last = output.is_finished
        is_final = is_last if is_final is None else is_final
        if output.error and is_last and output.finish_reason == "abort" and not state.is_cancelled:
            send_error(state.sender, f"llm: {output.error}")
            return
        if state.is_cancelled and is_last:
            if is_final:
                try:
                    state.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:  # the client that cancelled may be gone; nothing is left to tell it
                    pass
            return
        if not state.is_streaming and not is_last:
            return
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if is_final else 0
        state.sender.send(
            pb_utils.InferenceResponse(output_tensors=self._tensors(state, output)), flags=flags
        )

    def clear(self) -> None:
        """Free the tensors kept for reuse (finalize: while the stub's shared memory is still there)."""
        self.shared_tensors.clear()
        self.empty_log_probs = None

    def _tensors(self, state, output) -> list:
        if (
            state.lean_stream
            and state.is_streaming
            and not output.is_finished
            and state.first_token_tensor is not None
        ):
            return self._lean_tensors(state, output)
        if state.is_streaming:
            ids, text, reasoning = output.new_token_ids, output.text, output.reasoning
            new_ids, logprobs = output.new_token_ids, output.logprobs
        else:
            ids = state.output_ids if state.exclude_input else state.prompt_ids + state.output_ids
            text, reasoning = "".join(state.text), "".join(state.reasoning)
            new_ids, logprobs = state.output_ids, state.logprobs if output.logprobs is not None else None
        if not state.fixed_tensors:
            state.fixed_tensors = [
                pb_utils.Tensor("num_input_tokens", np.array([output.num_prompt_tokens], np.int32)),
                pb_utils.Tensor("num_cached_tokens", np.array([output.num_cached_tokens], np.int32)),
                pb_utils.Tensor(
                    "kv_cache_reused_blocks",
                    np.array([output.num_cached_tokens // self.engine.engine_config.block_size], np.int32),
                ),
                pb_utils.Tensor("arrival_time_ns", np.array([self._wall_ns(output.arrival_time)], np.int64)),
                pb_utils.Tensor("request_key", np.array([state.triton_id.encode()], dtype=np.object_)),
            ]
        first = state.first_token_tensor
        if first is None:
            first = pb_utils.Tensor(
                "first_token_time_ns", np.array([self._wall_ns(output.first_token_time)], np.int64)
            )
            if output.first_token_time is not None:  # fixed from now on
                state.first_token_tensor = first
        return [
            pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32)),
            self._shared_tensor("sequence_length", len(ids), np.int32),
            self._text_tensor("text_output", text),
            self._text_tensor("reasoning_output", reasoning),
            self._shared_tensor("finish_reason", (output.finish_reason or "").encode(), np.object_),
            self._shared_tensor("num_output_tokens", output.num_output_tokens, np.int32),
            self._shared_tensor("sequence_index", state.sequence_index, np.int32),
            first,
            pb_utils.Tensor(
                "last_token_time_ns", np.array([self._wall_ns(output.last_token_time)], np.int64)
            ),
            *state.fixed_tensors,
            *self._logprob_tensors(new_ids, logprobs),
        ]

    def _lean_tensors(self, state, output) -> list:
        """A `lean_stream` response between the stream's first and its last: the new text, the count and
        time of its last token and the `request_key` (postprocessing asks about cancellation by it), with
        `reasoning_output` when there is some, `sequence_index` when not 0 and the logprobs when asked.
        Each tensor crosses two processes per response, so fewer tensors is less of the hop's cost."""
        tensors = [
            self._text_tensor("text_output", output.text),
            self._shared_tensor("num_output_tokens", output.num_output_tokens, np.int32),
            pb_utils.Tensor(
                "last_token_time_ns", np.array([self._wall_ns(output.last_token_time)], np.int64)
            ),
            state.fixed_tensors[-1],  # request_key
        ]
        if output.reasoning:
            tensors.append(self._text_tensor("reasoning_output", output.reasoning))
        if state.sequence_index:
            tensors.append(self._shared_tensor("sequence_index", state.sequence_index, np.int32))
        if output.logprobs is not None:
            tensors += self._logprob_tensors(output.new_token_ids, output.logprobs)
        return tensors

    def _logprob_tensors(self, token_ids: list[int], logprobs: list | None) -> list:
        """`output_log_probs` FP32 [n] (one per token of output_ids' new tokens) and `logprobs`, the
        tokens' OpenAI `logprobs.content` items as JSON (eos and stop ids left out); empty when not asked."""
        if logprobs is None:
            if self.empty_log_probs is None:
                self.empty_log_probs = pb_utils.Tensor("output_log_probs", np.zeros(0, np.float32))
            return [self.empty_log_probs, self._shared_tensor("logprobs", b"", np.object_)]
        from engine.sample.logprobs import TokenTexts, content_items  # python_path is on sys.path by now

        if self.token_texts is None:
            self.token_texts = TokenTexts(self.engine.tokenizer)
        skip = frozenset(self.engine.model_config.eos_token_ids)
        items = content_items(token_ids, logprobs, self.token_texts, skip)
        return [
            pb_utils.Tensor("output_log_probs", np.array([lp for lp, _ in logprobs], np.float32)),
            pb_utils.Tensor("logprobs", np.array([json.dumps(items).encode()], dtype=np.object_)),
        ]

    def _text_tensor(self, name: str, text: str):
        """A [1] BYTES tensor of ``text``; the empty one is shared (`_shared_tensor`)."""
        if text:
            return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))
        return self._shared_tensor(name, b"", np.object_)

    def _shared_tensor(self, name: str, value, dtype):
        """A [1] tensor made once per (name, value) and shared by every response that carries it."""
        key = (name, value)
        tensor = self.shared_tensors.get(key)
        if tensor is None:
            if len(self.shared_tensors) >= MAX_SHARED_TENSORS:
                self.shared_tensors.clear()
            tensor = self.shared_tensors[key] = pb_utils.Tensor(name, np.array([value], dtype=dtype))
        return tensor

    def _wall_ns(self, monotonic_s: float | None) -> int:
        return 0 if monotonic_s is None else int(monotonic_s * 1e9) + self.wall_offset_ns
