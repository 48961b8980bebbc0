"""Triton request → engine request, and the llm's per-request state.

Contract:
* Inputs carry TensorRT-LLM's names (config.pbtxt). `parse_request` raises ValueError naming the input for
  a bad one (the model answers INVALID_ARG with that message); the engine's own checks run in
  `LLMEngine.add_request`.
* Inputs are read through `InputTensors` (each looked up and converted once per request).
* `request_key(inputs)` is the id a `stop` request cancels by: the `request_key` input (set by
  preprocessing), else the Triton request id, else "".
* `RequestTable` holds the requests in flight by engine id and by that key; it is shared by the execute,
  sender and cancellation threads (its own lock). A `RequestState`'s fields are written by the sender
  thread only, except `is_cancelled` / `last_cancel_check` (the cancellation thread).
* `num_return_sequences` (1 to the model's `max_num_return_sequences`) asks for several sequences of one
  prompt: `parse_request` returns the first; `siblings` makes the others (a seed moved by the index, the
  same `request_key`), which share one `SequenceGroup` and the request's response sender.
* The engine is imported inside the functions that use it: it is importable once `setup_model` has put
  `python_path` on sys.path, after this module is imported.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .triton_model import InputTensors  # common/, copied by glmv-build

if TYPE_CHECKING:
    from engine.request import GenerationRequest
    from engine.sample.sampler import SamplingParams
    from engine.sample.structured import Guide


def _tensor(inputs: InputTensors, name: str) -> np.ndarray | None:
    return inputs.array(name)


def _scalar(inputs: InputTensors, name: str, default=None):
    """The input's first value (a Python scalar or bytes), or `default` when it is missing or empty."""
    array = _tensor(inputs, name)
    if array is None or array.size == 0:
        return default
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text(inputs: InputTensors, name: str) -> str:
    value = _scalar(inputs, name, b"")
    return (value if isinstance(value, bytes) else str(value).encode()).decode("utf-8", errors="replace")


def request_key(inputs: InputTensors) -> str:
    key = _scalar(inputs, "request_key")
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="replace")
    return key or inputs.request.request_id() or ""


def is_stop(inputs: InputTensors) -> bool:
    return bool(_scalar(inputs, "stop", False))


@dataclass
class SequenceGroup:
    """The sequences of one request with `num_return_sequences` > 1: one response sender, one final
    response. All go to the engine together; it computes their shared prompt and images once (the later
    ones wait for the blocks the first is computing and map them). Touched by the sender thread only (the
    cancellation thread reads `is_done` under the model's sender lock)."""

    states: list[RequestState]
    num_open: int  # sequences whose last response is not sent yet
    is_done: bool = False  # the request's final response is sent: its sender must not be touched again


@dataclass
class RequestState:
    engine_id: str
    triton_id: str  # request_key(): what `stop` finds it by
    sender: object
    is_streaming: bool
    exclude_input: bool
    prompt_ids: list[int]
    # `lean_stream`: a stream's responses between its first and its last carry only what changes
    # (Responses._tensors); the ensemble's postprocessing puts the rest back
    lean_stream: bool = False
    # `cancel_by_stop`: the cancellation thread does not poll is_cancelled() for it; a `stop` with its
    # request_key cancels it (the ensemble's requests: Triton 2.51 never marks a running step cancelled)
    cancel_by_stop: bool = False
    output_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    last_token_time: float | None = None
    is_cancelled: bool = False
    has_first_token: bool = False
    is_done: bool = False  # the final response is sent: the sender must not be touched again
    held: list = field(default_factory=list)  # streamed outputs not sent yet (merged into the next response)
    last_sent: float = 0.0  # time.monotonic() of the stream's last response
    # Output tensors that stay the same for every response of the request, made once: building a
    # pb_utils.Tensor is most of a response's cost, and one already in shared memory is not copied again.
    fixed_tensors: list = field(default_factory=list)
    first_token_tensor: object = None
    last_cancel_check: float = 0.0  # time.monotonic() of the last is_cancelled() asked for it
    logprobs: list = field(default_factory=list)  # (logprob, top) of each output token (non-streaming)
    sequence_index: int = 0  # the `sequence_index` output: which of the request's sequences this is
    group: SequenceGroup | None = None  # with num_return_sequences > 1

    @property
    def is_sender_done(self) -> bool:
        """The request's final response is sent (for a group: the last sequence's)."""
        return self.group.is_done if self.group is not None else self.is_done

    def add_output(self, output) -> tuple[float | None, float | None]:
        """Take in one (possibly coalesced) engine output. Returns (seconds from arrival to the first token,
        seconds per token since the previous output), each None when this output gives none."""
        ttft = itl = None
        new_tokens = output.new_token_ids
        if new_tokens:
            if not self.has_first_token and output.first_token_time is not None:
                self.has_first_token = True
                ttft = max(0.0, output.first_token_time - output.arrival_time)
            elif self.last_token_time is not None and output.last_token_time is not None:
                itl = max(0.0, output.last_token_time - self.last_token_time) / len(new_tokens)
            self.last_token_time = output.last_token_time
        self.output_ids.extend(new_tokens)
        if output.logprobs is not None and not self.is_streaming:
            self.logprobs.extend(output.logprobs)
        self.text.append(output.text)
        self.reasoning.append(output.reasoning)
        return ttft, itl


class RequestTable:
    """The requests in flight, by engine id and by `request_key` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, RequestState] = {}
        self._engine_ids: dict[str, set[str]] = {}  # triton_id -> engine ids

    def add(self, state: RequestState) -> None:
        with self._lock:
            self._states[state.engine_id] = state
            if state.triton_id:
                self._engine_ids.setdefault(state.triton_id, set()).add(state.engine_id)

    def get(self, engine_id: str) -> RequestState | None:
        with self._lock:
            return self._states.get(engine_id)

    def forget(self, state: RequestState) -> None:
        with self._lock:
            self._states.pop(state.engine_id, None)
            ids = self._engine_ids.get(state.triton_id)
            if ids is not None:
                ids.discard(state.engine_id)
                if not ids:
                    del self._engine_ids[state.triton_id]

    def engine_ids(self, triton_id: str) -> list[str]:
        with self._lock:
            return list(self._engine_ids.get(triton_id, ()))

    def num_active(self) -> int:
        with self._lock:
            return len(self._states)

    def num_streaming(self) -> int:
        with self._lock:
            return sum(1 for s in self._states.values() if s.is_streaming)

    def to_poll(self) -> list[RequestState]:
        """Those whose cancellation is polled: not cancelled yet, and not `cancel_by_stop`."""
        with self._lock:
            return [s for s in self._states.values() if not (s.is_cancelled or s.cancel_by_stop)]

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._engine_ids.clear()


def parse_request(
    inputs: InputTensors, sender, triton_id: str, has_tokenizer: bool
) -> tuple[GenerationRequest, RequestState]:
    """The engine request (under a fresh engine id) and its state; ValueError naming a bad input."""
    from engine.request import GenerationRequest

    input_ids = _tensor(inputs, "input_ids")
    if input_ids is None:
        raise ValueError("input_ids: missing")
    prompt = input_ids.reshape(-1).astype(np.int64)
    input_length = _scalar(inputs, "input_lengths")
    if input_length is not None:
        if not 0 < input_length <= prompt.size:
            raise ValueError(f"input_lengths: {input_length} must be in [1, {prompt.size}] (len(input_ids))")
        prompt = prompt[: int(input_length)]
    sampling = _sampling(inputs)
    refs = _tensor(inputs, "image_ref")
    ref_paths = None
    if refs is not None and refs.size:
        image_rgb = image_embeds = None
        image_grid_thw, image_hashes, ref_paths = _image_refs(
            [r if isinstance(r, bytes) else str(r).encode() for r in refs.reshape(-1)], inputs
        )
    else:
        image_rgb, image_grid_thw, image_embeds = _images(inputs)
        image_hashes = _image_hashes(inputs, image_grid_thw)
    positions = _tensor(inputs, "mrope_positions")
    mrope_positions = None
    if positions is not None and positions.size:
        mrope_positions = torch.from_numpy(np.ascontiguousarray(positions.reshape(3, -1), dtype=np.int64))
    stop_words = _tensor(inputs, "stop_words")
    stop_strings = tuple(
        (w if isinstance(w, bytes) else str(w).encode()).decode("utf-8", errors="replace")
        for w in ([] if stop_words is None else stop_words.reshape(-1))
    )
    stop_strings = tuple(s for s in stop_strings if s)
    engine_id = uuid.uuid4().hex
    generation_request = GenerationRequest(
        request_id=engine_id,
        prompt_token_ids=prompt.tolist(),
        sampling=sampling,
        image_embeds=image_embeds,
        image_pixels=image_rgb,  # the engine patchifies flat RGB on its device
        image_grid_thw=image_grid_thw,
        mrope_positions=mrope_positions,
        mrope_delta=int(_scalar(inputs, "mrope_position_deltas", 0)),
        image_hashes=image_hashes,
        image_refs=ref_paths,
        stop_strings=stop_strings if has_tokenizer else (),
        is_thinking=bool(_scalar(inputs, "is_thinking", False)),
        guide=_guide(inputs),
    )
    state = RequestState(
        engine_id=engine_id,
        triton_id=triton_id,
        sender=sender,
        is_streaming=bool(_scalar(inputs, "streaming", False)),
        exclude_input=bool(_scalar(inputs, "exclude_input_in_output", False)),
        prompt_ids=prompt.tolist(),
        lean_stream=bool(_scalar(inputs, "lean_stream", False)),
        cancel_by_stop=bool(_scalar(inputs, "cancel_by_stop", False)),
    )
    return generation_request, state


def num_return_sequences(inputs: InputTensors, limit: int) -> int:
    """The `num_return_sequences` input (1 when not given); ValueError naming it past [1, limit]."""
    value = _scalar(inputs, "num_return_sequences")
    if value is None:
        return 1
    if not 1 <= int(value) <= limit:
        raise ValueError(
            f"num_return_sequences: {int(value)} must be in [1, {limit}] (the llm's max_num_return_sequences)"
        )
    return int(value)


def siblings(
    generation_request: GenerationRequest, state: RequestState, n: int
) -> list[tuple[GenerationRequest, RequestState]]:
    """Sequences 1..n-1 of the request whose sequence 0 is (generation_request, state), in one group with
    it: each its own engine id and the seed moved by its index (the same prompt, images and settings)."""
    group = SequenceGroup(states=[state], num_open=n)
    state.group = group
    seed = generation_request.sampling.seed
    out = []
    for index in range(1, n):
        engine_id = uuid.uuid4().hex
        sampling = dataclasses.replace(
            generation_request.sampling, seed=None if seed is None else (seed + index) % 2**64
        )
        sibling = RequestState(
            engine_id=engine_id,
            triton_id=state.triton_id,
            sender=state.sender,
            is_streaming=state.is_streaming,
            exclude_input=state.exclude_input,
            prompt_ids=state.prompt_ids,
            lean_stream=state.lean_stream,
            cancel_by_stop=state.cancel_by_stop,
            sequence_index=index,
            group=group,
        )
        group.states.append(sibling)
        out.append(
            (dataclasses.replace(generation_request, request_id=engine_id, sampling=sampling), sibling)
        )
    return out


def _sampling(inputs: InputTensors) -> SamplingParams:
    from engine.sample.sampler import SamplingParams

    end_id = _scalar(inputs, "end_id")
    seed = _scalar(inputs, "seed")
    return SamplingParams(
        max_tokens=int(_scalar(inputs, "request_output_len", 16)),
        temperature=float(_scalar(inputs, "temperature", 1.0)),
        top_k=int(_scalar(inputs, "runtime_top_k", 0)),
        top_p=float(_scalar(inputs, "runtime_top_p", 1.0)) or 1.0,  # TensorRT-LLM: top_p <= 0 is unset
        seed=None if seed is None else int(seed),
        repetition_penalty=float(_scalar(inputs, "repetition_penalty", 1.0)),
        presence_penalty=float(_scalar(inputs, "presence_penalty", 0.0)),
        frequency_penalty=float(_scalar(inputs, "frequency_penalty", 0.0)),
        min_tokens=int(_scalar(inputs, "min_tokens", 0)),
        stop_token_ids=() if end_id is None else (int(end_id),),
        logprobs=_logprobs(inputs),
    )


def _logprobs(inputs: InputTensors) -> int | None:
    """SamplingParams.logprobs: None unless `return_log_probs`; then `top_logprobs` (default 0)."""
    if not _scalar(inputs, "return_log_probs", False):
        return None
    return int(_scalar(inputs, "top_logprobs", 0))


def _images(inputs: InputTensors) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(image_rgb [sum of h*w*3] uint8, image_grid_thw [num_images, 3], image_embeds [num_tokens, hidden]):
    the resized RGB images with their grids, or an embedding table made elsewhere; not both."""
    rgb = _tensor(inputs, "image_rgb")
    grid = _tensor(inputs, "image_grid_thw")
    image_rgb = image_grid_thw = None
    if rgb is not None or grid is not None:
        if rgb is None or grid is None:
            missing = "image_rgb" if rgb is None else "image_grid_thw"
            raise ValueError(f"{missing}: image_rgb and image_grid_thw go together")
        if rgb.size > 0:
            image_rgb = torch.from_numpy(np.ascontiguousarray(rgb.reshape(-1)))
            image_grid_thw = torch.from_numpy(np.ascontiguousarray(grid.reshape(-1, 3), dtype=np.int64))
    table = _tensor(inputs, "prompt_embedding_table")
    if image_rgb is not None and table is not None and table.size:
        raise ValueError("image_rgb: give image_rgb + image_grid_thw or prompt_embedding_table, not both")
    image_embeds = None
    if table is not None:
        table = table.reshape(-1, table.shape[-1])
        if table.shape[0] > 0:
            image_embeds = torch.from_numpy(np.ascontiguousarray(table))
    return image_rgb, image_grid_thw, image_embeds


def _image_refs(refs: list[bytes], inputs: InputTensors) -> tuple[torch.Tensor, list[bytes], list[str]]:
    """(image_grid_thw, image_hashes, the files' paths) of a request whose images come as `image_ref`: per
    image, its file in the host's shared resize directory (engine.processing.resize_cache), sent by
    preprocessing in place of the pixels (`image_rgb` empty), with `image_grid_thw` and `image_hash`. The
    engine checks them (one reference, hash and grid row per image, each path an entry of its directory)
    and takes the images' embeddings from its image cache, or reads the files
    (`GenerationRequest.image_refs`)."""
    rgb = _tensor(inputs, "image_rgb")
    grid = _tensor(inputs, "image_grid_thw")
    hashes = _tensor(inputs, "image_hash")
    if rgb is not None and rgb.size:
        raise ValueError("image_ref: give image_rgb or image_ref, not both")
    if _tensor(inputs, "prompt_embedding_table") is not None:
        raise ValueError("image_ref: give prompt_embedding_table or image_ref, not both")
    if grid is None or hashes is None:
        raise ValueError("image_ref: needs image_grid_thw and image_hash, one row and one hash per image")
    hashes = [h if isinstance(h, bytes) else str(h).encode() for h in hashes.reshape(-1)]
    paths = [ref.decode("utf-8", errors="replace") for ref in refs]
    return torch.from_numpy(np.ascontiguousarray(grid.reshape(-1, 3), dtype=np.int64)), hashes, paths


def _image_hashes(inputs: InputTensors, image_grid_thw) -> list[bytes] | None:
    """The `image_hash` input (one per image, from preprocessing), or None (the engine hashes the
    pixels itself)."""
    hashes = _tensor(inputs, "image_hash")
    if hashes is None or image_grid_thw is None or hashes.size == 0:
        return None
    return [h if isinstance(h, bytes) else str(h).encode() for h in hashes.reshape(-1)]


def _guide(inputs: InputTensors) -> Guide | None:
    """The structured-output Guide of `guided_decoding_guide_type` / `guided_decoding_guide`, or None."""
    from engine.sample.structured import Guide

    guide_type = _text(inputs, "guided_decoding_guide_type")
    return Guide(guide_type, _text(inputs, "guided_decoding_guide")) if guide_type else None
