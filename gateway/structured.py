"""Answers a program reads: ``response_format``, ``logprobs``, ``tools`` / ``tool_choice`` of the OpenAI API.

Contract:
  * ``parse_structured(body) -> Structured`` checks the request's fields (``ApiError`` 400 naming the
    field) and gives the glmv_client keyword arguments for them: ``guide_type`` / ``guide`` (the
    ensemble's ``guided_decoding_guide_type`` / ``guided_decoding_guide``), ``logprobs`` (None, or the
    number of top logprobs), ``tools``. ``response_format`` ``json_object`` → guide "json";
    ``json_schema`` → guide "json_schema" (the engine holds every answer to the schema; a schema it cannot
    compile is answered 400 by the server, naming ``guided_decoding_guide``); ``text`` → none.
  * ``tool_choice``: "none" renders no tools and parses nothing; "auto" (the default with tools) renders
    them and parses GLM's tool calls out of the answer; "required" and a named function also hold the
    answer to a grammar of one or more (resp. exactly one, of that name) tool calls.
  * GLM-4.6V writes a tool call as ``<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n…
    </tool_call>``. ``parse_tool_calls(text, tools)`` → (content outside the calls, OpenAI ``tool_calls``);
    an argument whose schema type is not string is read as JSON when it parses, else kept as a string.
    ``ToolCallStream`` does the same on streamed text: ``feed(delta) -> (content, calls)`` holds back text
    that may start a call and emits each call whole once its ``</tool_call>`` arrives.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .openai_schema import ApiError

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
MAX_VALUE_CHARS = 256  # an argument value in a grammar-held call: at most this many characters
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_CALL = re.compile(r"<tool_call>\s*([^\n<]*?)\s*(?:\n|(?=<arg_key>)|(?=</tool_call>))(.*?)</tool_call>", re.S)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


@dataclass(frozen=True)
class Structured:
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    """glmv_client keyword arguments: guide_type, guide, logprobs, tools."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The request's function tools (empty: no tool parsing)."""
    wants_logprobs: bool = False


def parse_structured(body: dict[str, Any]) -> Structured:
    kwargs: dict[str, Any] = {}
    _response_format(body.get("response_format"), kwargs)
    wants_logprobs = body.get("logprobs")
    if wants_logprobs is not None and not isinstance(wants_logprobs, bool):
        raise ApiError(400, "'logprobs' must be a boolean.", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise ApiError(
                400, f"'top_logprobs' must be an integer in [0, 20], got {top!r}.", param="top_logprobs"
            )
        if not wants_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    if wants_logprobs:
        kwargs["logprobs"] = top or 0
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice == "none" or not tools:
        if isinstance(choice, dict) or choice == "required":
            raise ApiError(400, f"'tool_choice' {choice!r} needs 'tools'.", param="tool_choice")
        if choice not in ("none", "auto"):
            raise ApiError(
                400, "'tool_choice' must be none, auto, required or a named function.", param="tool_choice"
            )
        return Structured(kwargs, [], bool(wants_logprobs))
    kwargs["tools"] = tools
    if choice == "auto":
        return Structured(kwargs, tools, bool(wants_logprobs))
    if choice == "required":
        names = [t["function"]["name"] for t in tools]
        is_single = False
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        name = choice["function"]["name"]
        if name not in {t["function"]["name"] for t in tools}:
            raise ApiError(
                400, f"'tool_choice' names {name!r}, which is not in 'tools'.", param="tool_choice"
            )
        names, is_single = [name], True
    else:
        raise ApiError(
            400, "'tool_choice' must be none, auto, required or a named function.", param="tool_choice"
        )
    if "guide_type" in kwargs:
        raise ApiError(
            400, "'response_format' and a required tool_choice cannot be combined.", param="response_format"
        )
    kwargs["guide_type"], kwargs["guide"] = "ebnf_grammar", tool_call_grammar(tools, names, is_single)
    return Structured(kwargs, tools, bool(wants_logprobs))


def _response_format(value: Any, kwargs: dict[str, Any]) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        kwargs["guide_type"], kwargs["guide"] = "json", ""
        return
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "'response_format.json_schema.schema' must be a JSON schema object.",
                param="response_format.json_schema.schema",
            )
        kwargs["guide_type"], kwargs["guide"] = "json_schema", json.dumps(schema, ensure_ascii=False)
        return
    raise ApiError(
        400, "'response_format.type' must be text, json_object or json_schema.", param="response_format.type"
    )


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, "'tools' must be an array of function tools.", param="tools")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ApiError(
                400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.", param=f"tools[{i}]"
            )
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ApiError(
                400,
                f"tools[{i}].function.name must match {NAME_PATTERN.pattern}, got {name!r}.",
                param=f"tools[{i}].function.name",
            )
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ApiError(
                400,
                f"tools[{i}].function.parameters must be a JSON schema object.",
                param=f"tools[{i}].function.parameters",
            )
    return value


def _ebnf_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(tools: list[dict[str, Any]], names: list[str], is_single: bool) -> str:
    """xgrammar EBNF: one tool call of a name in ``names`` (or one or more, ``is_single`` False), each
    argument key one of the function's parameters, values text without ``<`` (at most MAX_VALUE_CHARS)."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    rules = []
    for k, name in enumerate(names):
        keys = list((by_name[name].get("parameters") or {}).get("properties") or {})
        key_rule = " | ".join(_ebnf_string(key) for key in keys) if keys else "[^<\\n]+"
        rules.append(
            f'call{k} ::= {_ebnf_string(TOOL_CALL_START + name)} "\\n" arg{k}* {_ebnf_string(TOOL_CALL_END)}\n'
            f'arg{k} ::= "<arg_key>" ({key_rule}) "</arg_key>\\n<arg_value>" value "</arg_value>\\n"'
        )
    call = " | ".join(f"call{k}" for k in range(len(names)))
    root = "root ::= call" if is_single else 'root ::= call ("\\n" call)*'
    return "\n".join([root, f"call ::= {call}", *rules, f"value ::= [^<]{{0,{MAX_VALUE_CHARS}}}"]) + "\n"


def _argument(value: str, schema: dict[str, Any]) -> Any:
    if schema.get("type") == "string":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _openai_call(name: str, body: str, tools: list[dict[str, Any]]) -> dict[str, Any]:
    function = next((t["function"] for t in tools if t["function"]["name"] == name), {})
    properties = (function.get("parameters") or {}).get("properties") or {}
    arguments = {
        k.strip(): _argument(v.strip("\n"), properties.get(k.strip(), {})) for k, v in _ARG.findall(body)
    }
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside tool calls, stripped; the OpenAI tool_calls) of a whole answer."""
    calls = [_openai_call(name, body, tools) for name, body in _CALL.findall(text)]
    content = _CALL.sub("", text).strip() if calls else text
    return content, calls


class ToolCallStream:
    """Tool calls out of streamed text: content deltas pass at once, except text that may begin a call."""

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self.tools = tools
        self.buffer = ""
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += delta
        content, calls = "", []
        while True:
            start = self.buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = _partial_prefix(self.buffer, TOOL_CALL_START)
                content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            content += self.buffer[:start]
            end = self.buffer.find(TOOL_CALL_END, start)
            if end < 0:
                self.buffer = self.buffer[start:]
                break
            found = _CALL.match(self.buffer[start : end + len(TOOL_CALL_END)])
            if found:
                call = _openai_call(found.group(1), found.group(2), self.tools)
                calls.append({"index": self.num_calls, **call})
                self.num_calls += 1
            self.buffer = self.buffer[end + len(TOOL_CALL_END) :]
        if self.num_calls:
            content = content.strip("\n") if not content.strip() else content
        return content, calls

    def flush(self) -> str:
        """Text held back at the end (an unfinished call stays text)."""
        rest, self.buffer = self.buffer, ""
        return rest


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
