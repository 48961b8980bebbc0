from __future__ import annotations

import io

import pytest
from PIL import Image

from benchmarks.corpus import KINDS, STANDARD_SIZES, Corpus, font_note, make_sample, parse_size


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", STANDARD_SIZES)
def test_every_kind_and_size_decodes_at_its_size(kind: str, size: tuple[int, int]) -> None:
    sample = make_sample(kind, size, "en", seed=3)
    assert len(sample.images) == 1
    image = Image.open(io.BytesIO(sample.images[0]))
    assert image.size == size
    assert image.format == ("JPEG" if kind == "product" else "PNG")
    assert sample.question and sample.answer


def test_same_arguments_give_the_same_bytes_and_other_seeds_differ() -> None:
    a = make_sample("document", (448, 448), "zh", seed=1)
    b = make_sample("document", (448, 448), "zh", seed=1)
    c = make_sample("document", (448, 448), "zh", seed=2)
    assert a == b
    assert a.images != c.images


def test_questions_match_the_language_and_the_drawn_answer() -> None:
    zh = make_sample("document", (1288, 728), "zh", seed=0)
    assert "表格" in zh.question and zh.answer.isdigit()
    en = make_sample("product", (1288, 728), "en", seed=0)
    assert en.question.startswith("What product")
    assert "¥" in en.answer
    assert font_note()  # says which font draws Chinese, or why English is drawn instead


def test_several_images_per_request() -> None:
    sample = make_sample("screenshot", (448, 448), "en", num_images=3)
    assert len(sample.images) == 3


def test_bad_arguments_name_the_setting() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_sample("video", (448, 448))
    with pytest.raises(ValueError, match="lang"):
        make_sample("document", (448, 448), "fr")
    with pytest.raises(ValueError, match="28x28"):
        make_sample("document", (20, 448))
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("1288*728")
    assert parse_size("1288x728") == (1288, 728)


def test_corpus_cycles_over_kinds_languages_and_sizes() -> None:
    corpus = Corpus(sizes=[(448, 448), (224, 224)], pool_size=4)
    assert len(corpus) == 12  # at least one sample per (size, kind, language)
    combos = {(s.kind, s.lang, s.size) for s in corpus.samples}
    assert len(combos) == 12
    assert corpus.sample(0) is corpus.sample(12)
