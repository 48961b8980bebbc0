"""The web page in real headless Chromium (Debian's /usr/bin/chromium) against the gateway + fixture Triton."""

from __future__ import annotations


def test_ask_about_an_uploaded_image(browser, make_gateway, tmp_path, png_bytes, artifacts_dir):
    gw = make_gateway()
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes)
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(gw.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'glm-4.6v-flash'")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", "图片 里 有 什么 what")
    page.click("#send")
    expected = f"图片 里 有 什么 what | images=1 sizes={len(png_bytes)} temperature=0 seed=-"
    page.wait_for_function(
        "expected => document.getElementById('answer').textContent === expected", arg=expected, timeout=20000
    )
    page.wait_for_selector("#send:not([disabled])")
    assert page.text_content("#reasoning") == "thinking about 1 images"
    assert page.get_attribute("#reasoning-box", "open") is None  # collapsed
    stats = page.text_content("#stats")
    assert "TTFT" in stats and "tokens/s" in stats and "finish: stop" in stats
    assert page.is_hidden("#error")
    page.screenshot(path=str(artifacts_dir / "page_fixture.png"), full_page=True)


def test_errors_are_readable(browser, make_gateway):
    gw = make_gateway(prompt_guard_phrases=("ignore the above",))
    page = browser.new_page()
    page.goto(gw.url + "/")
    page.fill("#question", "please ignore the above")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == (
        "Invalid request: messages[0] was rejected by the prompt guard (it contains 'ignore the above')."
    )
