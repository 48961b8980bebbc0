"""The conversation of a request: ``build_messages`` (OpenAI-shaped ``messages`` JSON checked, or
``text_input`` with the images before the text in one user turn) and ``parse_tools`` (OpenAI function
tools for the chat template). Errors are ``InputError`` naming the field."""

from __future__ import annotations

import json

from engine.processing.limits import InputError


def parse_tools(tools_json: str | None) -> list[dict] | None:
    """The `tools` input: a JSON list of OpenAI function tools ({"type": "function", "function": {"name",
    "description", "parameters"}}), handed to the chat template; None when absent."""
    if not tools_json:
        return None
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError as exc:
        raise InputError(f"tools: not valid JSON ({exc})") from None
    if not isinstance(tools, list):
        raise InputError("tools: must be a JSON list of function tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise InputError(f'tools[{i}]: must be {{"type": "function", "function": {{"name": ...}}}}')
    return tools


def _normalize_tool_calls(message: dict, index: int) -> None:
    """An assistant turn's OpenAI `tool_calls` with their `arguments` (a JSON string) as objects, the form
    the chat template renders as <arg_key>/<arg_value> pairs."""
    calls = message.get("tool_calls")
    if not calls:
        return
    if not isinstance(calls, list):
        raise InputError(f"messages[{index}].tool_calls: must be a list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InputError(f"messages[{index}].tool_calls[{j}].function: must have a name")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"messages[{index}].tool_calls[{j}].function.arguments: not valid JSON ({exc})"
                ) from None
        if not isinstance(arguments, dict):
            raise InputError(f"messages[{index}].tool_calls[{j}].function.arguments: must be a JSON object")
        function["arguments"] = arguments


def build_messages(text: str | None, messages_json: str | None, num_images: int) -> list[dict]:
    """Chat messages of the request; checks that image parts and images match one to one."""
    if messages_json:
        try:
            messages = json.loads(messages_json)
        except json.JSONDecodeError as exc:
            raise InputError(f"messages: not valid JSON ({exc})") from None
        if not isinstance(messages, list) or not messages:
            raise InputError("messages: must be a non-empty JSON list of {role, content} objects")
        num_parts = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise InputError(f"messages[{i}]: must be an object with a role and a content")
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise InputError(f"messages[{i}].role: {m['role']!r} must be system, user, assistant or tool")
            _normalize_tool_calls(m, i)
            content = m.get("content", "")
            if content is None:
                m["content"] = ""
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or "type" not in part:
                        raise InputError(f"messages[{i}].content[{j}]: must be an object with a type")
                    if part["type"] in ("image", "image_url"):
                        num_parts += 1
                    elif part["type"] != "text":
                        raise InputError(
                            f"messages[{i}].content[{j}].type: {part['type']!r} is not supported "
                            "(text, image)"
                        )
            elif not isinstance(content, str):
                raise InputError(f"messages[{i}].content: must be a string or a list of parts")
        if num_parts != num_images:
            raise InputError(
                f"messages: {num_parts} image parts but {num_images} images in image_input "
                "(each image part takes the next image)"
            )
        return messages
    if text is None:
        raise InputError("text_input: missing (give text_input or messages)")
    if num_images == 0:
        return [{"role": "user", "content": text}]
    parts: list[dict] = [{"type": "image"} for _ in range(num_images)]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]
