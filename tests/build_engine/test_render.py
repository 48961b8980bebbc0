"""build_engine.render: ${placeholder} substitution; unfilled placeholders are errors naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engine.render import TEMPLATE_DIR, RenderError, placeholders, render_repository, render_template


def test_render_template() -> None:
    assert (
        render_template("count: ${n} kind: $kind", {"n": 2, "kind": "KIND_CPU"}) == "count: 2 kind: KIND_CPU"
    )


def test_unfilled_placeholder_is_named() -> None:
    with pytest.raises(RenderError) as info:
        render_template("a: ${a} b: ${b}", {"a": 1}, "llm/config.pbtxt")
    assert str(info.value).startswith("llm/config.pbtxt: no value for placeholder ${b}")


def test_every_template_placeholder_is_known(tmp_path: Path) -> None:
    from build_engine.render import MODEL_NAMES

    names = set()
    for model in MODEL_NAMES:
        names |= placeholders((TEMPLATE_DIR / model / "config.pbtxt").read_text())
    values = {name: "1" for name in names}
    out = render_repository(TEMPLATE_DIR, tmp_path / "repo", values)
    for model in MODEL_NAMES:
        text = (out / model / "config.pbtxt").read_text()
        assert "${" not in text
        assert (out / model / "1" / "model.py").is_file() or model == "ensemble"
    values.pop(sorted(names)[0])
    with pytest.raises(RenderError, match=sorted(names)[0]):
        render_repository(TEMPLATE_DIR, tmp_path / "repo2", values)
