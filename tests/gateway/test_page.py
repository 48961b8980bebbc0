"""The web page in real headless Chromium (Debian's /usr/bin/chromium) against the gateway + fixture Triton.

The fixture ensemble answers with the words of every text in the conversation, in order, then
``| images=<n> sizes=<bytes,...> temperature=<t> seed=<s>``, so each answer shows exactly what the
page sent. Screenshots of each layout go to ``artifacts/``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}
TAIL = "temperature=0 seed=-"


@pytest.fixture(scope="session")
def wide_png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 12), (30, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path: Path, png_bytes: bytes, wide_png_bytes: bytes) -> list[Path]:
    paths = [tmp_path / "red.png", tmp_path / "blue.png"]
    paths[0].write_bytes(png_bytes)
    paths[1].write_bytes(wide_png_bytes)
    return paths


def open_page(browser: Any, gw: Any, viewport: dict[str, int], **context: Any) -> tuple[Any, list[dict]]:
    """A page on the gateway, and the JSON bodies it posts to /v1/chat/completions, in order."""
    page = browser.new_context(viewport=viewport, **context).new_page()
    bodies: list[dict] = []

    def record(request: Any) -> None:
        if request.url.endswith("/v1/chat/completions"):
            bodies.append(request.post_data_json)

    page.on("request", record)
    page.goto(gw.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'glm-4.6v-flash'")
    return page, bodies


def ask(page: Any, question: str) -> str:
    """Asks and waits for the answer to finish; returns the answer's text."""
    count = page.locator(".turn.assistant").count()
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_function(
        "n => document.querySelectorAll('.turn.assistant').length === n && "
        "!document.getElementById('send').disabled",
        arg=count + 1,
        timeout=20000,
    )
    return page.locator(".turn.assistant .answer").nth(count).text_content()


def settings(page: Any, *, thinking: bool | None = None, max_tokens: int | None = None) -> None:
    page.evaluate("document.getElementById('settings').open = true")
    if thinking is not None:
        page.set_checked("#thinking", thinking)
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))


def stats(page: Any, index: int = -1) -> list[str]:
    return page.eval_on_selector_all(
        ".turn.assistant .stats", "(all, i) => [...all.at(i).children].map((s) => s.textContent)", index
    )


def assert_no_horizontal_overflow(page: Any) -> None:
    width, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner


def image_part(path: Path) -> dict:
    import base64

    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_follow_up_questions_keep_the_images_and_the_history(
    browser, make_gateway, images, artifacts_dir, viewport
):
    gw = make_gateway()
    page, bodies = open_page(browser, gw, viewport)
    page.set_input_files("#file", [str(p) for p in images])
    page.wait_for_function("document.querySelectorAll('#attachments img').length === 2")
    page.set_input_files("#file", str(images[0]))  # a third, then removed again
    page.wait_for_function("document.querySelectorAll('#attachments img').length === 3")
    page.locator("#attachments .remove").nth(2).click()
    assert page.locator("#attachments img").count() == 2
    sizes = ",".join(str(p.stat().st_size) for p in images)

    first = ask(page, "图片 里 有 什么 what")
    assert first == f"图片 里 有 什么 what | images=2 sizes={sizes} {TAIL}"
    assert page.locator("#attachments img").count() == 0  # the images moved into the first turn
    assert page.locator(".turn.user").nth(0).locator("img").count() == 2
    reasoning = page.locator(".turn.assistant .reasoning-box").nth(0)
    assert reasoning.is_visible() and reasoning.get_attribute("open") is None  # collapsed
    assert reasoning.locator(".reasoning").text_content() == "thinking about 2 images"

    second = ask(page, "and the colour")
    assert second == f"图片 里 有 什么 what {first} and the colour | images=2 sizes={sizes} {TAIL}"
    assert bodies[1]["messages"] == [
        {
            "role": "user",
            "content": [
                image_part(images[0]),
                image_part(images[1]),
                {"type": "text", "text": "图片 里 有 什么 what"},
            ],
        },
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": "and the colour"}]},
    ]
    assert bodies[1]["stream"] is True and bodies[1]["chat_template_kwargs"] == {"enable_thinking": True}
    assert page.get_attribute("#question", "placeholder") == "Ask a follow-up question · 继续提问"
    page.locator(".turn.assistant .reasoning-box summary").nth(1).click()
    assert page.locator(".turn.assistant .reasoning-box").nth(1).get_attribute("open") == ""
    assert_no_horizontal_overflow(page)
    page.screenshot(path=str(artifacts_dir / f"page_conversation_{viewport['width']}.png"), full_page=True)

    page.click("#new-conversation")
    assert page.locator("#thread > li").count() == 0 and page.is_visible("#empty")
    third = ask(page, "fresh start")
    assert third == f"fresh start | images=0 sizes= {TAIL}"
    assert bodies[2]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "fresh start"}]}]
    assert page.is_hidden("#error")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_long_answers_wrap_inside_the_page(browser, make_gateway, images, artifacts_dir, viewport):
    gw = make_gateway()
    page, _ = open_page(browser, gw, viewport)
    assert_no_horizontal_overflow(page)
    page.set_input_files("#file", str(images[1]))
    page.wait_for_selector("#attachments img")
    run, code = "x" * 3000, "y" * 2000
    answer = ask(page, f"{run} and `{code}` wrap")
    assert answer.startswith(f"{run} and {code} wrap | images=1")
    assert page.locator(".turn.assistant .answer code").text_content() == code
    assert_no_horizontal_overflow(page)
    ask(page, "and a follow-up")
    assert_no_horizontal_overflow(page)
    page.screenshot(path=str(artifacts_dir / f"page_long_{viewport['width']}.png"), full_page=True)


def test_paste_a_screenshot_from_the_clipboard(browser, make_gateway, png_bytes, artifacts_dir):
    gw = make_gateway()
    page, bodies = open_page(browser, gw, PHONE, permissions=["clipboard-read", "clipboard-write"])
    page.evaluate(
        """async (bytes) => {
            const blob = new Blob([new Uint8Array(bytes)], { type: "image/png" });
            await navigator.clipboard.write([new ClipboardItem({ "image/png": blob })]);
        }""",
        list(png_bytes),
    )
    page.focus("#question")
    page.keyboard.press("Control+V")
    page.wait_for_selector("#attachments img")
    page.screenshot(path=str(artifacts_dir / "page_pasted_375.png"))
    answer = ask(page, "what is pasted")
    assert answer.startswith("what is pasted | images=1 sizes=")
    [part] = [p for p in bodies[0]["messages"][0]["content"] if p["type"] == "image_url"]
    assert part["image_url"]["url"].startswith("data:image/png;base64,")
    assert_no_horizontal_overflow(page)


def test_stop_ends_the_stream_and_keeps_the_partial_answer(browser, make_gateway, fixture_log):
    gw = make_gateway()
    page, bodies = open_page(browser, gw, DESKTOP)
    settings(page, thinking=False)
    page.fill("#question", "sleep 1 a b c d")
    page.click("#send")
    # The live counter after the first token: one token, singular, and no rate from a single token.
    page.wait_for_function("document.querySelector('.turn.assistant .stats').textContent.includes('1 token')")
    live = stats(page)
    assert "1 token" in live and not any("tokens/s" in s for s in live)
    page.click("#stop")
    page.wait_for_selector("#send:not([disabled])")
    assert page.is_hidden("#stop")
    assert page.locator(".turn.assistant .answer").text_content() == "sleep"
    assert stats(page)[-1] == "finish: stopped"
    request_log = Path(fixture_log)
    for _ in range(200):
        if request_log.exists() and "cancelled" in request_log.read_text():
            break
        page.wait_for_timeout(50)
    assert "cancelled" in request_log.read_text()

    settings(page, max_tokens=1)
    ask(page, "go on")
    assert bodies[1]["messages"][1:] == [
        {"role": "assistant", "content": "sleep"},
        {"role": "user", "content": [{"type": "text", "text": "go on"}]},
    ]


def test_new_conversation_during_an_answer_drops_it(browser, make_gateway):
    gw = make_gateway()
    page, bodies = open_page(browser, gw, DESKTOP)
    settings(page, thinking=False)
    page.fill("#question", "sleep 1 a b c d")
    page.click("#send")
    page.wait_for_function("document.querySelector('.turn.assistant .answer').textContent === 'sleep'")
    page.click("#new-conversation")
    page.wait_for_selector("#send:not([disabled])")
    assert page.locator("#thread > li").count() == 0 and page.input_value("#question") == ""
    assert ask(page, "fresh") == f"fresh | images=0 sizes= {TAIL}"
    assert bodies[1]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "fresh"}]}]


def test_answers_render_markdown_without_raw_html(browser, make_gateway):
    gw = make_gateway()
    page, _ = open_page(browser, gw, DESKTOP)
    settings(page, thinking=False)
    page.evaluate("window.pwned = 0")
    question = (
        "**bold** `code` <img src=x onerror=window.pwned=1> <script>window.pwned=2</script> "
        "[link](javascript:window.pwned=3) ![pic](http://127.0.0.1:9/x.png) [ok](https://example.org)"
    )
    answer = ask(page, question)
    turn = page.locator(".turn.assistant .answer")
    assert turn.locator("strong").text_content() == "bold"
    assert turn.locator("code").text_content() == "code"
    assert turn.locator("img, script").count() == 0
    assert "<img src=x onerror=window.pwned=1> <script>window.pwned=2</script>" in answer
    assert page.evaluate("window.pwned") == 0
    links = turn.locator("a")
    assert [links.nth(i).get_attribute("href") for i in range(links.count())] == [None, "https://example.org"]
    assert links.nth(1).get_attribute("rel") == "noopener noreferrer"
    assert page.locator(".turn.assistant .reasoning-box").is_hidden()  # thinking off: no reasoning panel
    html = page.evaluate(
        "renderMarkdown('```\\n<b>x</b>\\n```\\n\\n| a | b |\\n|---|---|\\n| 1 | <i>2</i> |')"
    )
    assert html == (
        "<pre><code>&lt;b&gt;x&lt;/b&gt;\n</code></pre>\n<table>\n<thead>\n<tr>\n<th>a</th>\n<th>b</th>\n"
        "</tr>\n</thead>\n<tbody><tr>\n<td>1</td>\n<td>&lt;i&gt;2&lt;/i&gt;</td>\n</tr>\n</tbody></table>"
    )


def test_copy_button_copies_the_markdown_source(browser, make_gateway):
    gw = make_gateway()
    page, _ = open_page(browser, gw, DESKTOP, permissions=["clipboard-read", "clipboard-write"])
    answer_source = f"**bold** words | images=0 sizes= {TAIL}"
    ask(page, "**bold** words")
    page.click(".turn.assistant .copy")
    page.wait_for_selector(".turn.assistant .copy:text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == answer_source


def test_stats_count_tokens_and_mark_cached_answers(browser, make_gateway):
    gw = make_gateway()
    page, _ = open_page(browser, gw, DESKTOP)
    settings(page, thinking=False, max_tokens=1)
    assert ask(page, "one") == "one"
    first = stats(page)
    assert first[0].startswith("TTFT ") and first[1] == "1 token" and first[-1] == "finish: length"
    page.click("#new-conversation")
    assert ask(page, "one") == "one"  # the same deterministic request: answered by the gateway's cache
    again = stats(page)
    assert again[0] == "from the response cache" and again[1] == "1 token" and again[-1] == "finish: length"
    assert not any(s.startswith("TTFT") or "tokens/s" in s for s in again)

    page.click("#new-conversation")
    settings(page, max_tokens=64)
    ask(page, "sleep 0.1 a b c d e f")  # streamed over about a second: a rate is shown
    streamed = stats(page)
    assert streamed[1] == "13 tokens" and streamed[2].endswith(" tokens/s")


def test_errors_are_readable_and_give_the_question_back(browser, make_gateway, images):
    gw = make_gateway(prompt_guard_phrases=("ignore the above",))
    page, _ = open_page(browser, gw, DESKTOP)
    page.set_input_files("#file", str(images[0]))
    page.wait_for_selector("#attachments img")
    page.fill("#question", "please ignore the above")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == (
        "Invalid request: messages[0] was rejected by the prompt guard (it contains 'ignore the above')."
    )
    page.wait_for_selector("#send:not([disabled])")
    assert page.locator("#thread > li").count() == 0
    assert page.input_value("#question") == "please ignore the above"
    assert page.locator("#attachments img").count() == 1
