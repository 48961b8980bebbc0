"""Malformed request bodies get OpenAI-shaped 400s (never a plain-text 500), and SSE survives line splitters."""

from __future__ import annotations

import json

import httpx

from gateway.json_body import sse_event as sse

MODEL = "glm-4.6v-flash"


def post_raw(url: str, raw: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )


def test_json_nested_100000_levels_is_a_400(make_gateway) -> None:
    gw = make_gateway()
    r = post_raw(gw.url, b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": {
            "message": "The request body nests JSON arrays/objects more than 64 levels deep (the limit).",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_json",
        }
    }
    too_deep = b'{"model": "%s", "messages": [], "x": %s}' % (MODEL.encode(), b"[" * 70 + b"]" * 70)
    r = post_raw(gw.url, too_deep)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{gw.url}/healthz").status_code == 200


def test_lone_surrogate_in_a_message_is_a_400(make_gateway) -> None:
    gw = make_gateway()
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}' % MODEL.encode()
    r = post_raw(gw.url, raw)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": {
            "message": "messages[0].content: the text holds a lone surrogate U+D800 at character 3, which is "
            "not valid Unicode; send each surrogate pair whole.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "invalid_unicode",
        }
    }
    paired = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud83d\\ude00 there"}]}' % (
        MODEL.encode()
    )
    r = post_raw(gw.url, paired)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("hi \U0001f600 there |")


def test_sse_events_survive_unicode_line_splitting() -> None:
    """U+0085, U+2028, U+2029 are line ends for str.splitlines(): escaped, one event stays one line."""
    text = "a\u2028b\u2029c\x85d é 中"
    event = sse({"choices": [{"delta": {"content": text}}]})
    assert event == 'data: {"choices":[{"delta":{"content":"a\\u2028b\\u2029c\\u0085d é 中"}}]}\n\n'
    lines = event.splitlines()
    assert lines == [event[:-2], ""]
    assert json.loads(lines[0][len("data: ") :])["choices"][0]["delta"]["content"] == text
    assert sse("[DONE]") == "data: [DONE]\n\n"
