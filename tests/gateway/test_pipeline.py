"""The chat pipeline's parts that need no server: the cache-and-count step, answer bodies and SSE chunks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from glmv_client import Delta, Finish
from glmv_client.errors import ServerUnavailableError
from glmv_client.results import Timings, Usage

from gateway.config import GatewayConfig
from gateway.openai_schema import ChatRequest, parse_chat_request
from gateway.pipeline import (
    CacheLookup,
    ChunkWriter,
    completion_from,
    look_up,
    record,
    strip_box_markers,
    triton_kwargs,
)
from gateway.state import Gateway

MODEL = "glm-4.6v-flash"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
CALL_TEXT = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"


def request(**fields: Any) -> ChatRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(body, GatewayConfig())


def sample(gw: Gateway, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def finish(reason: str, usage: Usage) -> Finish:
    return Finish(reason, usage, Timings(ttft=0.0, total=0.0))


def decode(events: list[str]) -> list[Any]:
    """SSE events → their payloads (JSON objects, or the string "[DONE]")."""
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    payloads = [e[len("data: ") : -2] for e in events]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_box_markers_are_stripped_and_counted():
    gw = Gateway(GatewayConfig())
    text = "<|begin_of_box|>42<|end_of_box|> and <|begin_of_box|>7<|end_of_box|>"
    assert strip_box_markers(text, gw.metrics) == "42 and 7"
    assert sample(gw, "glmv_gateway_box_markers_stripped_total") == 4
    assert strip_box_markers("plain", gw.metrics) == "plain"
    assert sample(gw, "glmv_gateway_box_markers_stripped_total") == 4


def test_triton_kwargs_carry_messages_limit_and_sampling():
    req = request(max_tokens=7, temperature=0, seed=3, stop="END")
    assert triton_kwargs(req) == {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "temperature": 0.0,
        "seed": 3,
        "stop": ["END"],
    }


def test_a_deterministic_answer_is_counted_once_stored_and_replayed():
    gw = Gateway(GatewayConfig())
    req = request(temperature=0)

    async def run() -> tuple[CacheLookup, dict[str, Any], CacheLookup]:
        miss = await look_up(gw, req, [b"image"])
        answer = await record(gw, miss, "A cat.", "It is furry.", "stop", Usage(13, 12, cached_tokens=4))
        return miss, answer, await look_up(gw, req, [b"image"])

    miss, answer, hit = asyncio.run(run())
    assert miss.key is not None and miss.answer is None and miss.headers == {"x-glmv-cache": "miss"}
    assert answer == {
        "text": "A cat.",
        "reasoning": "It is furry.",
        "finish_reason": "stop",
        "usage": {
            "prompt_tokens": 13,
            "completion_tokens": 12,
            "total_tokens": 25,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    assert hit == CacheLookup(miss.key, answer) and hit.headers == {"x-glmv-cache": "hit"}
    assert sample(gw, "glmv_gateway_cache_lookups_total", result="miss") == 1
    assert sample(gw, "glmv_gateway_cache_lookups_total", result="hit") == 1
    assert sample(gw, "glmv_gateway_tokens_total", kind="prompt") == 13
    assert sample(gw, "glmv_gateway_tokens_total", kind="completion") == 12


def test_an_answer_that_did_not_finish_normally_is_counted_not_stored():
    gw = Gateway(GatewayConfig())
    req = request(temperature=0)

    async def run() -> CacheLookup:
        miss = await look_up(gw, req, [])
        await record(gw, miss, "A c", "", "abort", Usage(5, 2))
        return await look_up(gw, req, [])

    again = asyncio.run(run())
    assert again.answer is None and again.headers == {"x-glmv-cache": "miss"}
    assert sample(gw, "glmv_gateway_cache_lookups_total", result="miss") == 2
    assert sample(gw, "glmv_gateway_tokens_total", kind="prompt") == 5
    assert sample(gw, "glmv_gateway_tokens_total", kind="completion") == 2


def test_requests_that_are_not_cacheable_are_not_looked_up():
    cases = [
        (GatewayConfig(), request(temperature=0.5)),  # sampled: each answer differs
        (GatewayConfig(), request(temperature=0, logprobs=True)),  # the cache keeps no logprobs
        (GatewayConfig(cache_size=0), request(temperature=0)),  # the cache is off
    ]
    for config, req in cases:
        gw = Gateway(config)

        async def run(gw: Gateway = gw, req: ChatRequest = req) -> CacheLookup:
            lookup = await look_up(gw, req, [])
            await record(gw, lookup, "x", "", "stop", Usage(3, 1))
            return lookup

        lookup = asyncio.run(run())
        assert lookup == CacheLookup() and lookup.headers == {}, req
        assert sample(gw, "glmv_gateway_cache_lookups_total", result="miss") == 0
        assert sample(gw, "glmv_gateway_tokens_total", kind="prompt") == 3
        if gw.cache is not None:
            assert asyncio.run(look_up(gw, request(temperature=0), [])).answer is None


def test_a_whole_answer_is_filtered_and_its_tool_calls_parsed():
    gw = Gateway(GatewayConfig(output_filter_words=("secret",)))
    answer = {
        "text": f"<|begin_of_box|>a secret<|end_of_box|>\n{CALL_TEXT}",
        "reasoning": "the SECRET plan",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 3},
    }
    logprobs = [{"token": "a", "logprob": -0.5}]
    usage = answer["usage"]
    body = completion_from(
        request(tools=[WEATHER]), [answer], [logprobs], usage, gw.output_filter, gw.metrics
    )
    choice = body["choices"][0]
    assert choice["message"]["content"] == "a ******"
    assert choice["message"]["reasoning_content"] == "the ****** plan"
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["finish_reason"] == "tool_calls" and choice["logprobs"] is None
    assert body["usage"] == answer["usage"] and body["model"] == MODEL
    assert sample(gw, "glmv_gateway_box_markers_stripped_total") == 2

    hidden = completion_from(
        request(include_reasoning=False, logprobs=True),
        [answer],
        [logprobs],
        usage,
        gw.output_filter,
        gw.metrics,
    )
    assert "reasoning_content" not in hidden["choices"][0]["message"]
    assert hidden["choices"][0]["logprobs"] == {"content": logprobs}
    assert hidden["choices"][0]["finish_reason"] == "stop"


def test_a_stream_holds_back_filtered_words_and_ends_with_usage():
    gw = Gateway(GatewayConfig(output_filter_words=("secret",)))
    writer = ChunkWriter(
        request(stream=True, stream_options={"include_usage": True}), gw.output_filter, gw.metrics
    )
    events = [writer.start()]
    events += writer.delta(Delta(text="", reasoning="Think<|end_of_box|>ing"))
    events += writer.delta(Delta(text="the <|begin_of_box|>sec", reasoning=""))
    events += writer.delta(Delta(text="ret is out", reasoning=""))
    events += writer.finish(finish("length", Usage(2, 6, cached_tokens=1)))
    events += writer.end(Usage(2, 6, cached_tokens=1))
    payloads = decode(events)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["id"] for c in chunks} == {writer.completion_id} and {c["model"] for c in chunks} == {MODEL}
    assert [c["choices"][0]["delta"] for c in chunks[:-2]] == [
        {"role": "assistant", "content": ""},
        {"content": "the ****** "},  # held back until "sec" + "ret" could be masked whole
        {"reasoning_content": "Thinking"},  # a word as long as a filtered one waits for the end
        {"content": "is out"},
    ]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 6,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    assert sample(gw, "glmv_gateway_box_markers_stripped_total") == 2


def test_a_stream_sends_each_tool_call_whole():
    gw = Gateway(GatewayConfig())
    writer = ChunkWriter(
        request(stream=True, tools=[WEATHER], include_reasoning=False), gw.output_filter, gw.metrics
    )
    first = writer.delta(Delta(text="Checking." + CALL_TEXT[:15], reasoning="hidden"))
    second = writer.delta(Delta(text=CALL_TEXT[15:], reasoning="hidden"))
    end = decode(writer.finish(finish("stop", Usage(1, 1))) + writer.end(Usage(1, 1)))
    assert [c["choices"][0]["delta"] for c in decode(first)] == [{"content": "Checking."}]
    [call] = decode(second)
    assert call["choices"][0]["delta"]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    assert call["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert [c if c == "[DONE]" else c["choices"][0]["finish_reason"] for c in end] == ["tool_calls", "[DONE]"]


def test_a_stream_sends_logprobs_of_tokens_without_text():
    gw = Gateway(GatewayConfig())
    items = ({"token": "<eos>", "logprob": -0.1},)
    wanted = ChunkWriter(request(stream=True, logprobs=True), gw.output_filter, gw.metrics)
    [chunk] = decode(wanted.delta(Delta(text="", reasoning="", logprobs=items)))
    assert chunk["choices"][0]["delta"] == {"content": ""}
    assert chunk["choices"][0]["logprobs"] == {"content": list(items)}
    unwanted = ChunkWriter(request(stream=True), gw.output_filter, gw.metrics)
    assert unwanted.delta(Delta(text="", reasoning="", logprobs=items)) == []
    # the tokens no delta carried (the end-of-answer token) ride on the finish chunk
    last = Finish("stop", Usage(1, 2), Timings(ttft=0.0, total=0.0), logprobs=items)
    [chunk] = decode(wanted.finish(last))
    assert chunk["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": {"content": list(items)},
    }
    assert decode(unwanted.finish(last))[0]["choices"][0]["logprobs"] is None


def test_an_error_mid_stream_is_an_error_event_then_done():
    gw = Gateway(GatewayConfig())
    writer = ChunkWriter(request(stream=True), gw.output_filter, gw.metrics)
    payloads = decode(writer.error(ServerUnavailableError("connection refused")))
    assert payloads == [
        {
            "error": {
                "message": "The inference server is unavailable: connection refused",
                "type": "server_error",
                "param": None,
                "code": "backend_unavailable",
            }
        },
        "[DONE]",
    ]
