"""The GLM-4.6V-Flash-WEB image's calls, sent exactly as its README and example client send them, to the
real gateway in front of a real Triton serving the fixture ensemble (deterministic echo answers)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from openai.types.chat import ChatCompletion

QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (20, 120, 220)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_b64(jpeg_bytes: bytes) -> str:
    return base64.b64encode(jpeg_bytes).decode()


def echo(question: str, image: bytes | None, temperature: str = "-") -> str:
    """The fixture ensemble's answer to a question with at most one image."""
    images = f"images=1 sizes={len(image)}" if image is not None else "images=0 sizes="
    return f"{question} | {images} temperature={temperature} seed=-"


def test_infer_json(make_gateway, jpeg_b64, jpeg_bytes):
    gw = make_gateway()
    body = {"image": jpeg_b64, "text": QUESTION, "max_new_tokens": 128}
    r = httpx.post(f"{gw.url}/infer", json=body, timeout=30)
    assert r.status_code == 200
    assert r.json() == {"response": echo(QUESTION, jpeg_bytes)}


def test_infer_json_sent_by_curl_as_a_form_content_type(make_gateway, jpeg_b64, jpeg_bytes):
    # curl -d '{...}' labels the JSON application/x-www-form-urlencoded.
    gw = make_gateway()
    raw = json.dumps({"image": jpeg_b64, "text": QUESTION, "max_new_tokens": 128})
    headers = {"content-type": "application/x-www-form-urlencoded"}
    r = httpx.post(f"{gw.url}/infer", content=raw, headers=headers, timeout=30)
    assert (r.status_code, r.json()) == (200, {"response": echo(QUESTION, jpeg_bytes)})


def test_infer_multipart_upload(make_gateway, jpeg_bytes):
    gw = make_gateway()
    r = httpx.post(
        f"{gw.url}/infer",
        files={"image": ("photo.jpg", jpeg_bytes, "image/jpeg")},
        data={"question": QUESTION},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.json() == {"response": echo(QUESTION, jpeg_bytes)}
    r = httpx.post(
        f"{gw.url}/infer",
        files={"image": ("photo.jpg", jpeg_bytes, "image/jpeg")},
        data={"question": QUESTION, "max_new_tokens": "6", "temperature": "0.5"},
        timeout=30,
    )
    assert r.json() == {"response": "What is"}  # 4 reasoning words + 2 answer words: cut by length


def test_seed_chat_body_answers_openai_shaped(make_gateway, jpeg_b64, jpeg_bytes):
    gw = make_gateway()
    body = {"image": jpeg_b64, "prompt": QUESTION, "max_tokens": 256, "temperature": 0.7}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    completion = ChatCompletion.model_validate(r.json())  # the official SDK's response type
    assert completion.object == "chat.completion" and completion.model == "glm-4.6v-flash"
    assert completion.choices[0].message.content == echo(QUESTION, jpeg_bytes, "0.7")
    assert completion.choices[0].finish_reason == "stop"
    assert r.json()["choices"][0]["message"]["content"] == echo(QUESTION, jpeg_bytes, "0.7")


def test_seed_chat_body_streams(make_gateway, jpeg_b64, jpeg_bytes):
    gw = make_gateway()
    body = {"image": jpeg_b64, "prompt": QUESTION, "max_tokens": 256, "stream": True}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == echo(QUESTION, jpeg_bytes)


def test_health(make_gateway):
    gw = make_gateway()
    for path in ("/health", "/healthz"):
        r = httpx.get(f"{gw.url}{path}")
        assert (r.status_code, r.json()) == (200, {"status": "alive"})


def error(r: httpx.Response) -> tuple[int, str | None, str, str | None]:
    err = r.json()["error"]
    return r.status_code, err["param"], err["message"], err["code"]


def test_unsupported_fields_are_refused_by_name(make_gateway, jpeg_b64):
    gw = make_gateway()
    body = {"image": jpeg_b64, "prompt": QUESTION, "max_tokens": 256, "top_k": 5}
    assert error(httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)) == (
        400,
        "top_k",
        "'top_k' is not supported here; the supported fields are image, prompt, max_tokens, temperature, "
        "top_p, stream, model.",
        "unsupported_parameter",
    )
    body = {"image": jpeg_b64, "text": QUESTION, "do_sample": True}
    assert error(httpx.post(f"{gw.url}/infer", json=body, timeout=30)) == (
        400,
        "do_sample",
        "'do_sample' is not supported here; the supported fields are image, text, question, max_new_tokens, "
        "temperature, top_p.",
        "unsupported_parameter",
    )


def test_infer_bad_fields_name_the_field(make_gateway, jpeg_b64, jpeg_bytes):
    gw = make_gateway(max_tokens_limit=512, max_tokens_default=256)
    url = f"{gw.url}/infer"
    r = httpx.post(url, json={"image": jpeg_b64, "text": QUESTION, "max_new_tokens": 1000}, timeout=30)
    assert error(r) == (
        400,
        "max_new_tokens",
        "max_new_tokens must be between 1 and 512 (max_tokens_limit), got 1000.",
        None,
    )
    r = httpx.post(
        url, files={"image": ("a.jpg", jpeg_bytes)}, data={"question": QUESTION, "max_new_tokens": "x"}
    )
    assert error(r) == (400, "max_new_tokens", "'max_new_tokens' must be an integer, got 'x'.", None)
    r = httpx.post(url, json={"image": jpeg_b64}, timeout=30)
    assert error(r) == (
        400,
        "question",
        "'text' (or 'question') is required and must be a non-empty string.",
        None,
    )
    r = httpx.post(url, json={"image": "not base64!", "text": QUESTION}, timeout=30)
    status, param, message, code = error(r)
    assert (status, param, code) == (400, "image", "invalid_image")
    assert message.startswith("'image' is not valid base64 (")
    r = httpx.post(url, json={"image": jpeg_b64, "text": QUESTION, "question": QUESTION}, timeout=30)
    assert error(r) == (400, "question", "Give the question as 'text' or as 'question', not both.", None)


def test_seed_calls_keep_the_gateway_limits(make_gateway, jpeg_b64, jpeg_bytes):
    gw = make_gateway(max_image_bytes=100, api_keys=("k",))
    body = {"image": jpeg_b64, "text": QUESTION}
    assert httpx.post(f"{gw.url}/infer", json=body, timeout=30).status_code == 401
    auth = {"Authorization": "Bearer k"}
    r = httpx.post(f"{gw.url}/infer", json=body, headers=auth, timeout=30)
    assert error(r) == (
        413,
        "image",
        f"image: image is {len(jpeg_bytes)} bytes, over the limit of 100 bytes (max_image_bytes).",
        "image_too_large",
    )
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"image": jpeg_b64, "prompt": QUESTION},
        headers=auth,
        timeout=30,
    )
    assert error(r)[:2] == (413, "image")
    r = httpx.post(f"{gw.url}/infer", json={"text": "just text"}, headers=auth, timeout=30)
    assert r.json() == {"response": echo("just text", None)}
