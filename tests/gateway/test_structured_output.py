"""response_format, logprobs and tools through the gateway: GLM tool-call parsing on hand-written model
outputs, request checks, and the whole path (OpenAI SDK → gateway → Triton → tiny random engine)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from gateway.openai_schema import ApiError
from gateway.structured import ToolCallStream, parse_structured, parse_tool_calls

MODEL = "glm-4.6v-flash"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "天气预报",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "units": {"type": "string"},
            },
            "required": ["city"],
        },
    },
}
LOOKUP = {"type": "function", "function": {"name": "lookup_invoice", "parameters": {"type": "object"}}}


def test_glm_tool_calls_are_parsed_into_openai_tool_calls():
    text = (
        "我来查一下。\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
        '<tool_call>lookup_invoice\n<arg_key>number</arg_key>\n<arg_value>{"id": 7}</arg_value>\n</tool_call>'
    )
    content, calls = parse_tool_calls(text, [WEATHER, LOOKUP])
    assert content == "我来查一下。"
    assert [c["function"]["name"] for c in calls] == ["get_weather", "lookup_invoice"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京", "days": 3}
    assert json.loads(calls[1]["function"]["arguments"]) == {"number": {"id": 7}}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


def test_a_string_parameter_stays_a_string_and_plain_text_has_no_calls():
    text = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n</tool_call>"
    _, calls = parse_tool_calls(text, [WEATHER])
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "123"}
    assert parse_tool_calls("no calls <tool here", [WEATHER]) == ("no calls <tool here", [])


def test_streamed_tool_calls_come_out_whole_whatever_the_cut():
    text = (
        "好的<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>上海</arg_value>\n</tool_call>"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
    )
    for step in (1, 2, 5, 7, len(text)):
        stream = ToolCallStream([WEATHER])
        content, calls = "", []
        for i in range(0, len(text), step):
            c, found = stream.feed(text[i : i + step])
            content += c
            calls += found
        content += stream.flush()
        assert content == "好的"
        assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["上海", "Paris"]
        assert [c["index"] for c in calls] == [0, 1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_fields_are_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        parse_structured(body)
    assert (info.value.status, info.value.param) == (400, param)


def test_required_and_named_tool_choice_become_a_grammar():
    named = parse_structured(
        {"tools": [WEATHER, LOOKUP], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    )
    assert named.client_kwargs["guide_type"] == "ebnf_grammar"
    assert named.client_kwargs["guide"].startswith("root ::= call\ncall ::= call0\n")
    assert '"<tool_call>get_weather"' in named.client_kwargs["guide"]
    auto = parse_structured({"tools": [WEATHER]})
    assert "guide_type" not in auto.client_kwargs and auto.tools == [WEATHER]
    none = parse_structured({"tools": [WEATHER], "tool_choice": "none"})
    assert none.client_kwargs == {} and none.tools == []


@pytest.fixture(scope="module")
def served(
    tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory, gateway_server_class
) -> Iterator[openai.OpenAI]:
    from build_engine.launcher import TritonServer
    from gateway.config import GatewayConfig

    log_file = tmp_path_factory.mktemp("structured_triton") / "triton.log"
    with TritonServer(
        tiny_model_repository, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file
    ) as triton:
        with gateway_server_class(GatewayConfig(triton_url=triton.grpc_url)) as gateway:
            yield openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
        "total": {"type": "number"},
        "currency": {"enum": ["EUR", "人民币"]},
        "lines": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    },
    "required": ["invoice_number", "total", "currency", "lines"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Extract the invoice as JSON."}]


@pytest.mark.slow
def test_json_schema_answers_validate_streamed_or_not(served):
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        answer = served.chat.completions.create(
            model=MODEL, messages=ASK, response_format=fmt, seed=seed, max_tokens=400
        )
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    chunks = served.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, seed=9, max_tokens=400, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    answer = served.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, seed=3, max_tokens=800
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.slow
def test_bad_schema_and_thinking_with_a_schema_are_400(served):
    with pytest.raises(openai.BadRequestError) as info:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}
        served.chat.completions.create(model=MODEL, messages=ASK, response_format=bad, max_tokens=8)
    assert "guided_decoding_guide" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        served.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={"type": "json_object"},
            max_tokens=8,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        )
    assert info.value.body["param"] == "chat_template_kwargs.enable_thinking"


@pytest.mark.slow
def test_logprobs_streamed_and_not(served):
    answer = served.chat.completions.create(
        model=MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    items = answer.choices[0].logprobs.content
    assert items and all(len(i.top_logprobs) == 3 and i.logprob <= 0 for i in items)
    assert all(i.top_logprobs[0].logprob == pytest.approx(i.logprob) for i in items)  # greedy: the top token
    assert "".join(bytes(i.bytes).decode("utf-8", "replace") for i in items).startswith(
        answer.choices[0].message.content[:1]
    )
    chunks = list(
        served.chat.completions.create(
            model=MODEL,
            messages=ASK,
            temperature=0,
            max_tokens=12,
            logprobs=True,
            top_logprobs=3,
            stream=True,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
    )
    streamed = [
        i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content
    ]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in items]
    plain = served.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None


@pytest.mark.slow
def test_named_and_required_tool_choice_give_tool_calls_and_tool_turns_render(served):
    history = [
        {"role": "user", "content": "北京天气？"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "晴, 25C"},
        {"role": "user", "content": "上海呢？"},
    ]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(1):
        answer = served.chat.completions.create(
            model=MODEL,
            messages=history,
            tools=[WEATHER, LOOKUP],
            tool_choice=named,
            seed=seed,
            max_tokens=1500,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        assert set(json.loads(choice.message.tool_calls[0].function.arguments)) <= {"city", "days", "units"}
    chunks = list(
        served.chat.completions.create(
            model=MODEL,
            messages=history,
            tools=[WEATHER, LOOKUP],
            tool_choice="required",
            seed=3,
            max_tokens=1500,
            stream=True,
        )
    )
    calls = [
        t
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for t in c.choices[0].delta.tool_calls
    ]
    assert calls and all(c.function.name in ("get_weather", "lookup_invoice") for c in calls)
    assert chunks[-1].choices[0].finish_reason == "tool_calls" or any(
        c.choices and c.choices[0].finish_reason == "tool_calls" for c in chunks
    )
