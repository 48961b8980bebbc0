"""Triton `postprocessing`: llm outputs → the ensemble's user-facing tensors.

Our llm sends text_output / reasoning_output / finish_reason / counts / timings and they are passed on.
When only `output_ids` + `sequence_length` arrive (a TensorRT-LLM backend in the llm step), the ids are
decoded here (special tokens skipped), text and reasoning are split at `</think>`, and the counts are
taken from the ids.

Cancellation: Triton passes an ensemble's cancellation only to steps scheduled after it, so the running
llm never sees it, but the next postprocessing request arrives cancelled. Postprocessing then sends the
llm a `stop` request for the `request_key` (BLS), which aborts the sequence and frees its KV blocks.
The cancelled request itself is still answered normally: answering it with an error leaves the ensemble
request in flight forever in Triton 2.51 (the server then cannot shut down).

Our llm streams with `lean_stream` (set by preprocessing): its responses between a stream's first and
last carry only what changes (text, output count, last token time, request_key; reasoning, sequence_index
and logprobs when they have a value). The values fixed for the stream (`FIXED`: input and cached token
counts, arrival and first-token times) are kept from its first response, by request_key and sequence
index, and put back here, so every response of the ensemble still carries every output, unless the client
asked for lean responses itself (the ensemble input `lean_stream`; Triton refuses an ensemble input beside
a decoupled model's outputs in one step, so preprocessing marks the request_key, `LEAN_KEY_SUFFIX` of triton_model.py): then
the llm streams lean whatever the instance count, and its lean responses go on as they came (`LEAN`: the
outputs among them), nothing kept and nothing put back; the first and last still carry every output.

Cost per streamed response is what bounds the server's token rate, so the hot path is lean: the llm's
tensors are passed on as they are (same names), and `is_cancelled()` (a round trip to the server, about as
costly as the rest of the response) is asked on a stream's first and final response and, in between, at
most once per max(`cancellation_check_period_ms`, streams / `cancellation_checks_per_s`) per stream: the
streams asked within the last second share `cancellation_checks_per_s`, so at 32 streams and 500 a second
each is asked every 64 ms, at 128 every 256 ms, and the checks cost the same share of the instance at any
concurrency.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from .triton_model import LEAN_KEY_SUFFIX, StubHeap, setup_model  # common/, copied by glmv-build

PASS_THROUGH = ("text_output", "reasoning_output", "finish_reason")
# kept per stream from its first response (the llm's lean responses leave them out)
FIXED = (
    ("num_input_tokens", np.int32),
    ("num_cached_tokens", np.int32),
    ("arrival_time_ns", np.int64),
    ("first_token_time_ns", np.int64),
)
# what a lean response passes on to a client that asked for lean responses (those the llm sent)
LEAN = (
    "text_output",
    "reasoning_output",
    "num_output_tokens",
    "sequence_index",
    "last_token_time_ns",
    "output_log_probs",
    "logprobs",
)
MAX_STREAMS = 65536  # requests whose fixed values are kept (past it the oldest go: one that ended unseen)
PASS_THROUGH_INT = (
    ("num_input_tokens", np.int32),
    ("num_cached_tokens", np.int32),
    ("num_output_tokens", np.int32),
    ("sequence_index", np.int32),  # 0 when the llm sends none (a single sequence)
    ("arrival_time_ns", np.int64),
    ("first_token_time_ns", np.int64),
    ("last_token_time_ns", np.int64),
)


def _bytes_tensor(name: str, value: bytes) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([value], dtype=np.object_))


def _logprob_tensors(inputs: dict) -> list:
    """`output_log_probs` and `logprobs` as the llm sent them (empty when it sent none)."""
    log_probs, items = inputs.get("output_log_probs"), inputs.get("logprobs")
    return [
        log_probs if log_probs is not None else pb_utils.Tensor("output_log_probs", np.zeros(0, np.float32)),
        items if items is not None else _bytes_tensor("logprobs", b""),
    ]


class CancelChecks:
    """Which responses postprocessing asks is_cancelled() of: a stream's first and last, and in between
    once per max(``period_s``, streams / ``per_s``), the streams being those asked lately."""

    def __init__(self, period_s: float, per_s: float) -> None:
        if per_s <= 0:
            raise ValueError(f"cancellation_checks_per_s must be > 0, got {per_s}")
        self.period_s, self.per_s = period_s, per_s
        # request_key -> when is_cancelled() was last asked for that stream (oldest first)
        self.last: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def period(self) -> float:
        """Seconds between two is_cancelled() of one stream now."""
        return max(self.period_s, len(self.last) / self.per_s)

    def should_check(self, key: bytes | None, is_final: bool, now: float) -> bool:
        if key is None:
            return True
        if is_final:
            self.last.pop(key, None)
            return True
        last = self.last.get(key)
        period = self.period()
        if last is not None and now - last < period:
            return False
        self.last[key] = now
        self.last.move_to_end(key)
        # forget the streams not asked for a while (ended without their final response reaching here):
        # they would lengthen every other stream's period
        horizon = now - max(1.0, 4 * period)
        while next(iter(self.last.values())) < horizon:  # this stream's entry, the newest, stays
            self.last.popitem(last=False)
        return True

    def forget(self, key: bytes) -> None:
        self.last.pop(key, None)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = setup_model(args)
        self.engine_dir = parameters.get("engine_dir")
        self.tokenizer = None  # loaded on the first id-only response
        self.llm_model_name = parameters.get("llm_model_name", "llm")
        self.stopped_keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.checks = CancelChecks(
            parameters.get_float("cancellation_check_period_ms", 10.0) / 1000.0,
            parameters.get_float("cancellation_checks_per_s", 500.0),
        )
        # request_key -> {sequence_index: the FIXED tensors of its first response} of the streams in flight
        self.fixed: collections.OrderedDict[bytes, dict[int, dict]] = collections.OrderedDict()
        # every streamed response passes here: a full collection of this stub would hold them all
        self.heap = StubHeap(args)

    def finalize(self) -> None:
        self.heap.release()

    def _decode(self, ids: list[int]) -> tuple[str, str]:
        if self.tokenizer is None:
            # imported here: the engine (and torch under it) loads only if a TensorRT-LLM backend sends ids
            from engine.config import EngineDir

            engine_dir = EngineDir.open(self.engine_dir)
            self.tokenizer = engine_dir.tokenizer()
            if self.tokenizer is None:
                raise FileNotFoundError(f"tokenizer.json not found in {engine_dir.path}")
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        reasoning = ""
        if "</think>" in text:
            reasoning, _, text = text.partition("</think>")
            reasoning = reasoning.split("<think>", 1)[-1]
        clean = self.tokenizer.decode(
            self.tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=True
        )
        return clean, reasoning.strip()

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {tensor.name(): tensor for tensor in request.inputs()}  # looked up once per response
            key = inputs.get("request_key")
            key = None if key is None else bytes(key.as_numpy().reshape(-1)[0])
            finish = inputs.get("finish_reason")
            is_final = finish is not None and bytes(finish.as_numpy().reshape(-1)[0]) != b""
            if self.checks.should_check(key, is_final, time.monotonic()) and request.is_cancelled():
                self._stop_llm(key)
            try:
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=self._process(inputs, key, is_final))
                )
            except Exception as exc:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"postprocessing: {exc}"))
                )
        self.heap.publish()
        return responses

    def _stop_llm(self, key: bytes | None) -> None:
        """Ask the llm to abort the cancelled request (once per request_key)."""
        if key is None or key in self.stopped_keys:
            return
        self.fixed.pop(key, None)  # its last response, an empty one, does not come here
        self.checks.forget(key)
        self.stopped_keys[key] = None
        if len(self.stopped_keys) > 4096:
            self.stopped_keys.popitem(last=False)
        stop = pb_utils.InferenceRequest(
            model_name=self.llm_model_name,
            requested_output_names=["finish_reason"],
            inputs=[
                pb_utils.Tensor("input_ids", np.zeros(1, np.int32)),
                pb_utils.Tensor("stop", np.array([True])),
                pb_utils.Tensor("request_key", np.array([key], dtype=np.object_)),
            ],
        )
        try:
            for response in stop.exec(decoupled=True):
                if response.has_error():
                    pb_utils.Logger.log_warn(f"postprocessing: stop failed: {response.error().message()}")
        except Exception as exc:
            pb_utils.Logger.log_warn(f"postprocessing: stop failed: {exc}")

    def _fixed_tensors(self, inputs: dict, key: bytes | None, is_final: bool) -> dict:
        """The FIXED tensors to add to this response, by name: none when it carries them (a stream's first
        full response is kept for its lean ones, unless it is the last), else those kept from its first."""
        if key is None:
            return {}
        index = inputs.get("sequence_index")
        index = 0 if index is None else int(index.as_numpy().reshape(-1)[0])
        streams = self.fixed.get(key)  # the request's sequences: index -> tensors
        if inputs.get("num_input_tokens") is None:  # a lean response
            kept = {} if streams is None else streams.get(index, {})
        else:
            kept = {}
            if not is_final and (
                streams is None or index not in streams
            ):  # a stream's first: keep its values
                if streams is None:
                    streams = self.fixed[key] = {}
                    while len(self.fixed) > MAX_STREAMS:
                        self.fixed.popitem(last=False)
                streams[index] = {
                    name: pb_utils.Tensor(name, np.array(inputs[name].as_numpy().reshape(-1)[:1], dtype))
                    for name, dtype in FIXED
                    if inputs.get(name) is not None
                }
        if is_final and streams is not None:
            streams.pop(index, None)
            if not streams:
                del self.fixed[key]
        return kept

    def _process(self, inputs: dict, key: bytes | None, is_final: bool) -> list:
        if (
            inputs.get("text_output") is not None
        ):  # our llm: its tensors are the ensemble's outputs as they are
            if key is not None and key.endswith(LEAN_KEY_SUFFIX):
                if inputs.get("num_input_tokens") is None:  # a lean response: on as it came
                    return [inputs[name] for name in LEAN if name in inputs]
                fixed = {}  # a full one (a stream's first or last) carries its own
            else:
                fixed = self._fixed_tensors(inputs, key, is_final)
            out = [inputs["text_output"]]
            for name in PASS_THROUGH[1:]:
                tensor = inputs.get(name)
                out.append(tensor if tensor is not None else _bytes_tensor(name, b""))
            for name, dtype in PASS_THROUGH_INT:
                tensor = inputs.get(name)
                if tensor is None:
                    tensor = fixed.get(name)
                out.append(tensor if tensor is not None else pb_utils.Tensor(name, np.zeros(1, dtype)))
            return out + _logprob_tensors(inputs)

        # ids only (a TensorRT-LLM backend): decoded here
        def get(name: str):
            tensor = inputs.get(name)
            return None if tensor is None else tensor.as_numpy().reshape(-1)

        ids = get("output_ids")
        length = get("sequence_length")
        ids = [] if ids is None else ids.tolist()
        if length is not None:
            ids = ids[: int(length[0])]
        text, reasoning = self._decode([i for i in ids if i >= 0])
        finish = get("finish_reason")
        out = [
            _bytes_tensor("text_output", text.encode()),
            _bytes_tensor("reasoning_output", reasoning.encode()),
            _bytes_tensor("finish_reason", bytes(finish[0]) if finish is not None else b""),
        ]
        for name, dtype in PASS_THROUGH_INT:
            value = get(name)
            if value is None and name == "num_output_tokens":
                value = length if length is not None else np.zeros(1)
            out.append(pb_utils.Tensor(name, np.array([0 if value is None else value[0]], dtype=dtype)))
        return out + _logprob_tensors(inputs)
