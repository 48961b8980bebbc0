"""OutputProcessor with the tiny checkpoint's tokenizer: each token and its text reach the caller once,
a stop id is not part of the text, a stop string ends the sequence through ``finish``, logprobs follow
the tokens, and the thinking part goes to ``reasoning``."""

from __future__ import annotations

import pytest

from engine.core.sequence import Sequence, SequenceStatus
from engine.processing.output_processor import OutputProcessor
from engine.request import GenerationRequest
from engine.sample.sampler import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))


def word_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


class Finisher:
    """The scheduler's ``finish`` as the output processor calls it: records and ends the sequence."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, seq: Sequence, reason: str) -> None:
        self.calls.append((seq.seq_id, reason))
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason


def start(proc: OutputProcessor, request_id: str, sampling: SamplingParams, **kwargs) -> Sequence:
    proc.add(GenerationRequest(request_id, [1, 2], sampling, **kwargs))
    return Sequence(request_id, [1, 2], sampling)


def test_tokens_and_text_reach_the_caller_once(tokenizer):
    proc, finish = OutputProcessor(tokenizer), Finisher()
    seq = start(proc, "a", SamplingParams(max_tokens=32))
    ids = word_ids(tokenizer, "hello world, this is a test")
    text, got = "", []
    for k, token in enumerate(ids):
        seq.append_token(token, float(k))
        if k % 2:  # outputs of several tokens, and steps with no output asked
            out = proc.output(seq, finish)
            got += out.new_token_ids
            text += out.text
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, "length"
    last = proc.output(seq, finish)
    got += last.new_token_ids
    text += last.text
    assert got == ids and text == tokenizer.decode(ids) and last.is_finished and not finish.calls
    assert (last.num_prompt_tokens, last.num_output_tokens, last.first_token_time) == (2, len(ids), 0.0)
    proc.pop("a")
    assert proc.output(seq, finish).text == ""  # forgotten: tokens only


def test_stop_id_is_not_text_and_stop_string_finishes(tokenizer):
    proc, finish = OutputProcessor(tokenizer), Finisher()
    stop_id = word_ids(tokenizer, "!")[0]
    seq = start(proc, "s", SamplingParams(max_tokens=32, stop_token_ids=[stop_id]))
    for token in word_ids(tokenizer, "good") + [stop_id]:
        seq.append_token(token, 0.0)
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, "stop"
    out = proc.output(seq, finish)
    assert out.text == "good" and out.new_token_ids[-1] == stop_id

    seq = start(proc, "t", SamplingParams(max_tokens=32), stop_strings=("world",))
    ids = word_ids(tokenizer, "hello world again")
    outs = []
    for token in ids:
        seq.append_token(token, 0.0)
        outs.append(proc.output(seq, finish))
        if seq.is_finished:
            break
    assert finish.calls == [("t", "stop")] and outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == "hello "


def test_logprobs_follow_the_new_tokens(tokenizer):
    proc, finish = OutputProcessor(None), Finisher()  # no tokenizer: tokens and logprobs only
    seq = start(proc, "l", SamplingParams(max_tokens=8, logprobs=1))
    for k in range(3):
        seq.append_token(10 + k, 0.0)
        seq.logprobs.append((-0.1 * k, ((10 + k, -0.1 * k),)))
    first = proc.output(seq, finish)
    seq.append_token(20, 0.0)
    seq.logprobs.append((-2.0, ((20, -2.0),)))
    second = proc.output(seq, finish)
    assert first.new_token_ids == [10, 11, 12] and [lp for lp, _ in first.logprobs] == [0.0, -0.1, -0.2]
    assert second.new_token_ids == [20] and second.logprobs == [(-2.0, ((20, -2.0),))]
    assert first.text == second.text == ""


def test_thinking_goes_to_reasoning(tokenizer):
    proc, finish = OutputProcessor(tokenizer), Finisher()
    if proc.think_end_id is None:
        pytest.skip("the tokenizer has no </think> token")
    seq = start(proc, "r", SamplingParams(max_tokens=32), is_thinking=True)
    ids = word_ids(tokenizer, "let me see") + [proc.think_end_id] + word_ids(tokenizer, "yes")
    for token in ids:
        seq.append_token(token, 0.0)
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, "length"
    out = proc.output(seq, finish)
    assert out.reasoning.strip() == "let me see" and out.text.strip() == "yes"
