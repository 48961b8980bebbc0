"""Request bodies in, SSE events out: JSON that every client can read, and nothing that crashes a handler.

Contract:
- `parse_json_body(raw)` returns the decoded JSON value or raises `ApiError` 400: `invalid_json` for bytes
  that are not UTF-8 JSON, `invalid_json` naming the limit for nesting deeper than `MAX_JSON_DEPTH`
  (the decoder would otherwise hit Python's recursion limit), and `invalid_unicode` naming the JSON path
  of a string (or key) holding a lone surrogate (`"\\ud800"` is valid JSON but no valid Unicode text, and
  cannot be encoded for Triton).
- `sse_event(data)` is one `data: …` event. JSON is written with UTF-8 text as is, except the characters
  that Unicode-aware line splitters (Python's `str.splitlines()`, httpx's `iter_lines()`) take for line
  ends while the SSE format does not: U+0085, U+2028 and U+2029 are written as `\\u` escapes, which every
  JSON parser decodes to the same characters. Control characters are escaped by JSON itself.
"""

from __future__ import annotations

import json
from typing import Any

from .openai_schema import ApiError

__all__ = ["MAX_JSON_DEPTH", "parse_json_body", "sse_event"]

MAX_JSON_DEPTH = 64
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body; ApiError 400 for anything a handler could not work with."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    _check_tree(body)
    return body


def _too_deep() -> ApiError:
    return ApiError(
        400,
        f"The request body nests JSON arrays/objects more than {MAX_JSON_DEPTH} levels deep (the limit).",
        code="invalid_json",
    )


def _check_tree(body: Any) -> None:
    """Depth and lone surrogates, iteratively (no recursion on attacker-chosen depth)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path or "(body)")
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise _too_deep()
            if isinstance(value, dict):
                for key, item in value.items():
                    child = f"{path}.{key}" if path else str(key)
                    _check_text(key, f"{child} (key)")
                    stack.append((item, child, depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code_point = ord(text[exc.start])
        raise ApiError(
            400,
            f"{path}: the text holds a lone surrogate U+{code_point:04X} at character {exc.start}, "
            "which is not valid Unicode; send each surrogate pair whole.",
            param=path.split(".")[0].split("[")[0] or None,
            code="invalid_unicode",
        ) from None


def sse_event(data: dict[str, Any] | str) -> str:
    """One server-sent event; dicts become compact JSON safe for Unicode-aware line splitting."""
    if isinstance(data, str):
        payload = data
    else:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        if any(ch in payload for ch in "\x85\u2028\u2029"):
            payload = payload.translate(_LINE_BREAKS)
    return f"data: {payload}\n\n"
