"""IncrementalDetokenizer on the tiny checkpoint's real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from engine.processing.detokenizer import Delta, IncrementalDetokenizer, think_token_ids

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)


def stream(detok: IncrementalDetokenizer, token_ids: list[int], chunk: int = 1) -> list[Delta]:
    deltas = [detok.add(token_ids[i : i + chunk]) for i in range(0, len(token_ids), chunk)]
    return [*deltas, detok.finish()]


def joined(deltas: list[Delta]) -> tuple[str, str]:
    return "".join(d.text for d in deltas), "".join(d.reasoning for d in deltas)


def test_multibyte_character_is_never_split(tokenizer):
    text = "龘好 hello 图像"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids[:1]) == "\ufffd"  # the first character really spans several tokens
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert all("\ufffd" not in d.text for d in deltas)
    assert [d.text for d in deltas[:3]] == ["", "", "龘"]
    assert joined(deltas) == (text, "")


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunking_does_not_change_text(tokenizer, chunk):
    text = "回答: 这是模型的推理服务 OK"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert joined(stream(IncrementalDetokenizer(tokenizer), ids, chunk)) == (text, "")


def test_special_tokens_skipped(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer.encode("ab", add_special_tokens=False) + [eos]
    assert joined(stream(IncrementalDetokenizer(tokenizer), ids)) == ("ab", "")


def test_stop_string_split_across_steps(tokenizer):
    ids = tokenizer.encode("hello STOP world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop_strings=["STOP"])
    deltas = [detok.add([t]) for t in ids]
    stopped_at = next(i for i, d in enumerate(deltas) if d.stopped)
    assert tokenizer.decode(ids[: stopped_at + 1]).endswith("STOP")
    assert all("S" not in d.text for d in deltas)  # no part of the stop string ever leaked
    assert joined(deltas) == ("hello ", "")
    assert detok.add(ids[:2]) == Delta() and detok.finish() == Delta(stopped=True)


def test_held_back_text_flushed_at_finish(tokenizer):
    ids = tokenizer.encode("abcdef", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop_strings=["xyz!"])  # holds back 3 characters
    streamed = "".join(detok.add([t]).text for t in ids)
    assert streamed == "abc"
    assert detok.finish() == Delta(text="def")


def test_reasoning_split(tokenizer):
    start, end = think_token_ids(tokenizer)
    assert (start, end) == (
        tokenizer.convert_tokens_to_ids("<think>"),
        tokenizer.convert_tokens_to_ids("</think>"),
    )
    ids = tokenizer.encode("<think>想一想</think>答案是 42", add_special_tokens=False)
    assert start in ids and end in ids
    detok = IncrementalDetokenizer(tokenizer, is_thinking=False, think_start_id=start, think_end_id=end)
    assert joined(stream(detok, ids)) == ("答案是 42", "想一想")
    # the prompt already opened <think>: output starts in reasoning
    ids = tokenizer.encode("先想</think>再答", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, is_thinking=True, think_start_id=start, think_end_id=end)
    assert joined(stream(detok, ids, chunk=3)) == ("再答", "先想")


def test_stop_string_inside_answer_after_reasoning(tokenizer):
    start, end = think_token_ids(tokenizer)
    ids = tokenizer.encode("<think>a##b</think>c##d", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ["##"], think_start_id=start, think_end_id=end)
    deltas = stream(detok, ids)
    assert joined(deltas) == ("", "a")
    assert any(d.stopped for d in deltas)
