"""What ``analyze`` returns and what ``stream`` yields, and how responses are folded into them.

A stream yields :class:`Delta` items (new answer text and new reasoning text, either may be
empty but not both) and ends with exactly one :class:`Finish`; with ``num_return_sequences`` n > 1, the
items of the n sequences interleave, each carrying its sequence's ``index``, and each sequence ends with
its own :class:`Finish` (n in all). ``analyze`` returns a
:class:`Result`. Timings are in seconds: ``ttft`` and ``total`` are measured by the client
(send → first text or reasoning, send → last response); ``server_ttft`` and ``server_total`` come
from the server's ``*_time_ns`` outputs when present.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the server's prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    ttft: float | None  # seconds from send to the first text/reasoning (None: nothing generated)
    total: float  # seconds from send to the last response
    server_ttft: float | None = None  # first_token_time_ns - arrival_time_ns
    server_total: float | None = None  # last_token_time_ns - arrival_time_ns


@dataclass(frozen=True)
class Delta:
    text: str
    reasoning: str
    logprobs: tuple[dict[str, Any], ...] = ()  # OpenAI logprobs.content items of this delta's tokens
    index: int = 0  # the sequence (num_return_sequences > 1)


@dataclass(frozen=True)
class Finish:
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: tuple[dict[str, Any], ...] = ()  # items of tokens no delta carried (no text of their own)
    index: int = 0  # the sequence (num_return_sequences > 1)


@dataclass(frozen=True)
class Result:
    text: str
    reasoning: str
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: tuple[dict[str, Any], ...] = ()  # OpenAI logprobs.content items, when asked for


@dataclass(frozen=True)
class Response:
    """One ensemble response, decoded."""

    text: str
    reasoning: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    arrival_time_ns: int | None = None
    num_cached_tokens: int = 0
    first_token_time_ns: int | None = None
    last_token_time_ns: int | None = None
    logprobs: tuple[dict[str, Any], ...] = field(default=())
    sequence_index: int = 0


def _logprob_items(raw: Any) -> tuple[dict[str, Any], ...]:
    """The `logprobs` output (JSON list of items, empty when not asked) as a tuple."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return tuple(json.loads(raw)) if raw else ()


_SCALARS = {
    "BOOL": ("<?", 1), "INT8": ("<b", 1), "UINT8": ("<B", 1), "INT16": ("<h", 2), "UINT16": ("<H", 2),
    "INT32": ("<i", 4), "UINT32": ("<I", 4), "INT64": ("<q", 8), "UINT64": ("<Q", 8),
    "FP32": ("<f", 4), "FP64": ("<d", 8),
}  # fmt: skip


def response_from_grpc(response: Any) -> Response:
    """Decode a gRPC ``ModelInferResponse`` (``InferResult.get_response()``) in one pass over its outputs:
    the values ``InferResult.as_numpy(name)[0]`` gives, without its search of the outputs by name and an
    array for each of the ten names (most of a streamed token's decoding time in the gateway)."""
    outputs = {
        out.name: (out.datatype, raw)
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=False)
    }

    def first(name: str) -> Any:
        datatype, raw = outputs.get(name, ("", b""))
        if datatype == "BYTES":
            if len(raw) < 4:
                return None
            size = int.from_bytes(raw[:4], "little")
            return raw[4 : 4 + size]
        layout = _SCALARS.get(datatype)
        if layout is None or len(raw) < layout[1]:
            return None
        return struct.unpack_from(layout[0], raw)[0]

    def text(name: str) -> str:
        value = first(name)
        if value is None:
            return ""
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

    def integer(name: str) -> int | None:
        value = first(name)
        return None if value is None or isinstance(value, bytes) else int(value)

    return Response(
        text=text("text_output"),
        reasoning=text("reasoning_output"),
        finish_reason=text("finish_reason"),
        num_input_tokens=integer("num_input_tokens") or 0,
        num_output_tokens=integer("num_output_tokens") or 0,
        num_cached_tokens=integer("num_cached_tokens") or 0,
        arrival_time_ns=integer("arrival_time_ns"),
        first_token_time_ns=integer("first_token_time_ns"),
        last_token_time_ns=integer("last_token_time_ns"),
        logprobs=_logprob_items(text("logprobs")),
        sequence_index=integer("sequence_index") or 0,
    )


def response_from_json(obj: dict[str, Any]) -> Response:
    """Decode one HTTP generate / generate_stream JSON object (scalars or 1-element lists)."""

    def value(name: str) -> Any:
        v = obj.get(name)
        if isinstance(v, list):
            v = v[0] if v else None
        return v

    def integer(name: str) -> int | None:
        v = value(name)
        return None if v is None or v == "" else int(v)

    return Response(
        text=str(value("text_output") or ""),
        reasoning=str(value("reasoning_output") or ""),
        finish_reason=str(value("finish_reason") or ""),
        num_input_tokens=integer("num_input_tokens") or 0,
        num_output_tokens=integer("num_output_tokens") or 0,
        num_cached_tokens=integer("num_cached_tokens") or 0,
        arrival_time_ns=integer("arrival_time_ns"),
        first_token_time_ns=integer("first_token_time_ns"),
        last_token_time_ns=integer("last_token_time_ns"),
        logprobs=_logprob_items(value("logprobs")),
        sequence_index=integer("sequence_index") or 0,
    )


class Assembler:
    """Folds the responses of one request into deltas, a finish and a result."""

    def __init__(self, is_stream: bool) -> None:
        self.is_stream = is_stream
        self.start = time.monotonic()
        self.first_token_at: float | None = None
        self.text_parts: list[str] = []
        self.reasoning_parts: list[str] = []
        self.last: Response | None = None
        # the first response: it carries the stream's fixed values (prompt and cached tokens, arrival and
        # first-token times), which lean responses leave out
        self.first: Response | None = None
        self.logprobs: list[dict[str, Any]] = []  # every item so far
        self.pending_logprobs: list[dict[str, Any]] = []  # items no delta has carried yet

    def restart(self) -> None:
        self.start = time.monotonic()

    def add(self, resp: Response) -> Delta | None:
        """Record one response; the delta it carries (None when it carries no text)."""
        self.last = resp
        if self.first is None:
            self.first = resp
        if not self.is_stream:
            self.logprobs = []
        self.logprobs.extend(resp.logprobs)
        self.pending_logprobs.extend(resp.logprobs)
        if not (resp.text or resp.reasoning):
            return None
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.is_stream:
            self.text_parts.append(resp.text)
            self.reasoning_parts.append(resp.reasoning)
        else:  # a non-streaming response carries the whole answer
            self.text_parts = [resp.text]
            self.reasoning_parts = [resp.reasoning]
        carried, self.pending_logprobs = tuple(self.pending_logprobs), []
        return Delta(text=resp.text, reasoning=resp.reasoning, logprobs=carried)

    @property
    def is_finished(self) -> bool:
        return self.last is not None and bool(self.last.finish_reason)

    def finish(self) -> Finish:
        last = self.last or Response("", "", "abort", 0, 0)
        if not last.num_input_tokens and self.first is not None:  # a lean response: the first's values
            last = dataclasses.replace(
                last,
                num_input_tokens=self.first.num_input_tokens,
                num_cached_tokens=self.first.num_cached_tokens,
                arrival_time_ns=self.first.arrival_time_ns,
                first_token_time_ns=self.first.first_token_time_ns,
            )
        now = time.monotonic()
        server_ttft = server_total = None
        if last.arrival_time_ns:
            if last.first_token_time_ns:
                server_ttft = max(0, last.first_token_time_ns - last.arrival_time_ns) / 1e9
            if last.last_token_time_ns:
                server_total = max(0, last.last_token_time_ns - last.arrival_time_ns) / 1e9
        if self.is_stream:
            ttft = None if self.first_token_at is None else self.first_token_at - self.start
        else:
            ttft = server_ttft
        return Finish(
            finish_reason=last.finish_reason or "abort",
            usage=Usage(last.num_input_tokens, last.num_output_tokens, last.num_cached_tokens),
            timings=Timings(
                ttft=ttft, total=now - self.start, server_ttft=server_ttft, server_total=server_total
            ),
            logprobs=tuple(self.pending_logprobs),
        )

    def result(self) -> Result:
        fin = self.finish()
        return Result(
            text="".join(self.text_parts),
            reasoning="".join(self.reasoning_parts),
            finish_reason=fin.finish_reason,
            usage=fin.usage,
            timings=fin.timings,
            logprobs=tuple(self.logprobs),
        )


class Sequences:
    """Folds the responses of one streamed request into the Delta and Finish items of its sequences
    (``num_return_sequences``; one for most requests), each item carrying its sequence's index."""

    def __init__(self, num_sequences: int) -> None:
        self.assemblers = [Assembler(is_stream=True) for _ in range(num_sequences)]
        self.finished: set[int] = set()

    def restart(self) -> None:
        for asm in self.assemblers:
            asm.restart()

    def add(self, resp: Response) -> list[Delta | Finish]:
        """The items one response gives: its delta (if it carries text), then its sequence's finish (if it
        is the sequence's last)."""
        index = resp.sequence_index
        if not 0 <= index < len(self.assemblers):
            raise ValueError(f"sequence_index {index} of a request for {len(self.assemblers)} sequences")
        asm = self.assemblers[index]
        items: list[Delta | Finish] = []
        delta = asm.add(resp)
        if delta is not None:
            items.append(dataclasses.replace(delta, index=index) if index else delta)
        if resp.finish_reason and index not in self.finished:
            self.finished.add(index)
            items.append(self._finish(index))
        return items

    def unfinished(self) -> list[Finish]:
        """The finish of every sequence the responses did not end (finish_reason "abort" when none came)."""
        left = [i for i in range(len(self.assemblers)) if i not in self.finished]
        self.finished.update(left)
        return [self._finish(i) for i in left]

    def _finish(self, index: int) -> Finish:
        fin = self.assemblers[index].finish()
        return dataclasses.replace(fin, index=index) if index else fin


def event_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of a server-sent event stream, split at LF (CRLF) only, as SSE defines them.

    ``str.splitlines`` (and so httpx's ``iter_lines``) also splits at U+0085, U+2028 and U+2029, which
    Triton's ``generate_stream`` writes unescaped inside its JSON: one answer containing them would read as a
    broken event."""
    pending = ""
    for text in chunks:
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending


async def aevent_lines(chunks: AsyncIterable[str]) -> AsyncIterator[str]:
    """``event_lines`` over an async stream of text."""
    pending = ""
    async for text in chunks:
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending
