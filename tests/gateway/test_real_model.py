"""The whole path with the real ensemble and a tiny random engine: Triton ← glmv_client ← gateway ← OpenAI SDK / page.

The engine is built once per session (``python -m build_engine --preset tiny``) and served by the
launcher's Triton; answers are greedy, so every route must give the same text token for token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from glmv_client import Client, Delta, Finish

pytestmark = pytest.mark.slow
MODEL = "glm-4.6v-flash"


@pytest.fixture(scope="module")
def real_triton(tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from build_engine.launcher import TritonServer

    log_file = tmp_path_factory.mktemp("real_triton") / "triton.log"
    with TritonServer(
        tiny_model_repository, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file
    ) as server:
        yield server
    print(f"triton log: {log_file}")


@pytest.fixture(scope="module")
def real_gateway(real_triton, gateway_server_class) -> Iterator[object]:
    from gateway.config import GatewayConfig

    with gateway_server_class(
        GatewayConfig(triton_url=real_triton.grpc_url, api_keys=("real-key",))
    ) as server:
        yield server


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "gradient.png"
    img = Image.new("RGB", (64, 48))
    img.putdata([(x * 4, y * 5, 128) for y in range(48) for x in range(64)])
    img.save(path)
    return path


def data_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("thinking", [True, False])
def test_openai_sdk_matches_glmv_client_greedy(real_triton, real_gateway, photo, thinking):
    openai = pytest.importorskip("openai")
    question = "What is in this picture?"
    with Client(real_triton.grpc_url, timeout=300) as client:
        reference = client.analyze([photo], question, temperature=0, max_tokens=24, enable_thinking=thinking)
        streamed = list(
            client.stream([photo], question, temperature=0, max_tokens=24, enable_thinking=thinking)
        )
    assert reference.usage.completion_tokens > 0
    assert "".join(d.text for d in streamed if isinstance(d, Delta)) == reference.text
    assert "".join(d.reasoning for d in streamed if isinstance(d, Delta)) == reference.reasoning
    assert isinstance(streamed[-1], Finish)
    assert (streamed[-1].usage.prompt_tokens, streamed[-1].usage.completion_tokens) == (
        reference.usage.prompt_tokens,
        reference.usage.completion_tokens,
    )
    # the same prompt again: all of it but the block of its last token comes from the prefix cache
    assert streamed[-1].usage.cached_tokens == (reference.usage.prompt_tokens - 1) // 16 * 16

    sdk = openai.OpenAI(base_url=f"{real_gateway.url}/v1", api_key="real-key", timeout=300)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(photo)}},
                {"type": "text", "text": question},
            ],
        }
    ]
    extra = {"chat_template_kwargs": {"enable_thinking": thinking}}
    full = sdk.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24, extra_body=extra
    )
    assert full.choices[0].message.content == reference.text
    assert (getattr(full.choices[0].message, "reasoning_content", None) or "") == reference.reasoning
    assert full.choices[0].finish_reason == reference.finish_reason
    assert full.usage.prompt_tokens == reference.usage.prompt_tokens
    assert full.usage.completion_tokens == reference.usage.completion_tokens

    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == reference.text
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reference.reasoning
    assert chunks[-1].usage.completion_tokens == reference.usage.completion_tokens


def test_http_protocol_matches_grpc(real_triton, photo):
    with (
        Client(real_triton.grpc_url) as grpc_client,
        Client(real_triton.http_url, protocol="http") as http_client,
    ):
        a = grpc_client.analyze([photo], "Describe.", temperature=0, max_tokens=12)
        b = http_client.analyze([photo], "Describe.", temperature=0, max_tokens=12)
        c = "".join(
            d.text + d.reasoning
            for d in http_client.stream([photo], "Describe.", temperature=0, max_tokens=12)
            if isinstance(d, Delta)
        )
    assert (a.text, a.reasoning, a.usage) == (b.text, b.reasoning, b.usage)
    assert c == a.reasoning + a.text


def test_readiness_probe(real_gateway):
    r = httpx.get(f"{real_gateway.url}/readyz", timeout=120)
    assert r.status_code == 200 and r.json() == {"status": "ready", "reason": "ready"}


def test_page_with_the_real_model(real_gateway, photo, browser, artifacts_dir):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(real_gateway.url + "/")
    page.wait_for_selector("#settings[open]")  # the page asks for the key this gateway requires
    assert page.text_content("#error") == "This server needs an API key: enter it under Settings."
    page.fill("#api-key", "real-key")
    page.set_checked("#thinking", False)
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#attachments img")
    page.fill("#max-tokens", "32")
    for turns, question in enumerate(
        ["这张图片里有什么？ What is in this picture?", "Which corner is brightest?"], 1
    ):
        page.fill("#question", question)
        page.click("#send")
        page.wait_for_function(
            "n => document.querySelectorAll('.turn.assistant').length === n && "
            "!document.getElementById('send').disabled",
            arg=turns,
            timeout=120000,
        )
        assert page.is_hidden("#error"), page.text_content("#error")
    first, second = (page.locator(".turn.assistant .stats").nth(i).text_content() for i in (0, 1))
    assert "TTFT" in first and "finish: " in first
    assert "prompt tokens cached" in second  # the follow-up reuses the image and the first turn's KV
    page.screenshot(path=str(artifacts_dir / "page.png"), full_page=True)


def test_follow_up_on_the_same_image_reports_cached_prompt_tokens(real_triton, real_gateway, photo):
    """A second question about a picture (sent as a data URI the first time and as raw base64 by
    glmv_client the second) reuses the KV of the shared prefix: usage says how many prompt tokens, and
    the answer is the one a cold engine gives (the first question's answer is checked the same way)."""
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{real_gateway.url}/v1", api_key="real-key", max_retries=0)

    def ask(question: str):
        return sdk.chat.completions.create(
            model=MODEL,
            temperature=0,
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_uri(photo)}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            extra_body={"enable_thinking": False},
        )

    first = ask("Describe the colours of this gradient in one word, please.")
    with Client(real_triton.grpc_url, timeout=300) as client:
        again = client.analyze(
            [photo],
            "Describe the colours of this gradient in one word, please.",
            temperature=0,
            max_tokens=8,
            enable_thinking=False,
        )
    second = ask("Which corner is brightest?")
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert again.usage.cached_tokens >= first.usage.prompt_tokens - 16  # all but the last block
    assert again.text == first.choices[0].message.content
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens % 16 == 0  # whole blocks of the shared prefix


def _counter(triton, name: str) -> float:
    """The sum of a counter's series on Triton's metrics endpoint."""
    import re

    body = httpx.get(triton.metrics_url, timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", body, re.MULTILINE))


def test_n_choices_compute_the_prompt_once(real_triton, real_gateway, tmp_path):
    """n = 3 greedy choices about a picture no request sent before: each is the answer one choice gets,
    and choices 1 and 2, sent once choice 0 has answered, find all of the prompt but its last block in the
    prefix cache (the llm's hit counter grows by exactly that, twice); usage counts the prompt once."""
    from PIL import Image

    openai = pytest.importorskip("openai")
    path = tmp_path / "stripes.png"
    img = Image.new("RGB", (56, 56))
    img.putdata([((x * 9) % 256, 40, (y * 7) % 256) for y in range(56) for x in range(56)])
    img.save(path)
    sdk = openai.OpenAI(base_url=f"{real_gateway.url}/v1", api_key="real-key", max_retries=0, timeout=300)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(path)}},
                {"type": "text", "text": "Name the stripes' colours."},
            ],
        }
    ]
    hits = "glmv_prefix_cache_hit_tokens_total"
    queried = "glmv_prefix_cache_queried_tokens_total"
    before = None  # once the counters hold still: earlier tests' requests are all counted
    while before != (before := (_counter(real_triton, hits), _counter(real_triton, queried))):
        time.sleep(0.5)
    three = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=10,
        n=3,
        extra_body={"enable_thinking": False},
    )
    prompt = three.usage.prompt_tokens
    expected = (before[0] + 2 * ((prompt - 1) // 16 * 16), before[1] + 3 * prompt)
    deadline = time.monotonic() + 20  # the llm's stats thread advances the counters
    while (after := (_counter(real_triton, hits), _counter(real_triton, queried))) != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after == expected
    one = sdk.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=10, extra_body={"enable_thinking": False}
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens_details.cached_tokens == 0  # choice 0 found nothing
    assert (
        three.usage.completion_tokens == 3 * one.usage.completion_tokens and prompt == one.usage.prompt_tokens
    )
