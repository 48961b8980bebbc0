"""Sampler and SamplingParams: exact outcomes on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.sequence import Sequence
from engine.sample.sampler import Sampler, SamplingParams

EOS = 7
VOCAB = 12


def make_seq(sp: SamplingParams, prompt=(1, 2, 3), output=(), seed_generator: bool = True) -> Sequence:
    generator = None
    if sp.seed is not None and seed_generator:
        generator = torch.Generator().manual_seed(sp.seed)
    seq = Sequence("s", list(prompt), sp, generator=generator)
    seq.token_ids.extend(output)
    return seq


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop_token_ids": (-2,)}, "stop_token_ids"),
    ],
)
def test_validate_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**kwargs).validate()


def test_validate_accepts_defaults_and_edges():
    sp = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_tokens=16, max_tokens=16)
    assert sp.validate() is sp


def test_greedy_and_top_k_1_equal_argmax():
    logits = random_logits(4)
    sampler = Sampler([EOS])
    greedy = sampler(logits, [make_seq(SamplingParams(temperature=0.0)) for _ in range(4)])
    top1 = sampler(logits, [make_seq(SamplingParams(temperature=1.3, top_k=1)) for _ in range(4)])
    assert greedy == logits.argmax(-1).tolist()
    assert top1 == greedy


def test_seed_reproducible_regardless_of_batch():
    sampler = Sampler([EOS])
    sp = SamplingParams(temperature=1.0, seed=1234)
    logits = random_logits(1, seed=5)[0]

    def draws(batch_size: int, row: int) -> list[int]:
        seq = make_seq(sp)
        others = [make_seq(SamplingParams(temperature=0.8, seed=i)) for i in range(batch_size - 1)]
        others += [make_seq(SamplingParams(temperature=1.0))]  # unseeded row uses the global RNG
        tokens = []
        for step in range(20):
            batch = others[:row] + [seq] + others[row:]
            rows = random_logits(len(batch), seed=100 + step)
            rows[row] = logits
            tokens.append(sampler(rows, batch)[row])
        return tokens

    alone = draws(1, 0)
    assert draws(4, 2) == alone
    assert draws(3, 0) == alone
    assert len(set(alone)) > 1  # it is really sampling


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = Sampler.probs(logits, [SamplingParams(top_p=0.8)])
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = Sampler.probs(logits, [SamplingParams(top_p=0.81)])
    assert torch.allclose(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    probs = Sampler.probs(logits, [SamplingParams(top_k=2, top_p=1.0)])
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_sampled_tokens_stay_inside_top_k():
    sampler = Sampler([EOS])
    logits = random_logits(1, seed=3)
    allowed = set(logits[0].topk(3).indices.tolist())
    seq = make_seq(SamplingParams(temperature=5.0, top_k=3, seed=0))
    seen = {sampler(logits, [seq])[0] for _ in range(50)}
    assert seen <= allowed and len(seen) > 1


def test_repetition_penalty_hf_semantics():
    logits = torch.zeros(1, VOCAB)
    logits[0, 1], logits[0, 2], logits[0, 5], logits[0, 9] = 2.0, -2.0, 4.0, 1.0
    seq = make_seq(SamplingParams(repetition_penalty=2.0), prompt=(1, 2), output=(5, 5))
    out = logits.clone()
    Sampler([EOS]).apply_penalties(out, [seq])
    expected = logits.clone()
    expected[0, 1], expected[0, 2], expected[0, 5] = 1.0, -4.0, 2.0  # 9 is not in the history
    assert torch.equal(out, expected)


def test_presence_and_frequency_penalties_over_output_only():
    logits = torch.zeros(1, VOCAB)
    sp = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    seq = make_seq(sp, prompt=(4, 4, 4), output=(3, 3, 3, 8))
    Sampler([EOS]).apply_penalties(logits, [seq])
    expected = torch.zeros(1, VOCAB)
    expected[0, 3] = -(0.25 * 3 + 0.5)
    expected[0, 8] = -(0.25 * 1 + 0.5)
    assert torch.equal(logits, expected)  # prompt token 4 untouched


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 10.0
    logits[:, 9] = 9.0
    logits[:, 4] = 1.0
    sp = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(9,))
    early = make_seq(sp, output=(4,))  # 1 output token < 2: eos and 9 masked
    done = make_seq(sp, output=(4, 4))
    assert Sampler([EOS])(logits, [early, done]) == [4, EOS]


def test_sample_ids_counts_tokens_in_flight_for_min_tokens():
    """A step sampled ahead of the host has one more output token than token_ids shows."""
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = 10.0
    logits[:, 4] = 1.0
    sp = SamplingParams(temperature=0.0, min_tokens=3)
    seqs = [make_seq(sp, output=(4,)), make_seq(sp, output=(4, 4)), make_seq(SamplingParams(temperature=0.0))]
    sampler = Sampler([EOS])
    assert sampler.sample_ids(logits, seqs).tolist() == [4, 4, EOS]
    assert sampler.sample_ids(logits, seqs, ahead=1).tolist() == [4, EOS, EOS]  # 2 + 1 reaches 3
    assert logits[:, EOS].eq(10.0).all()  # the caller's logits are left alone
    assert all(Sampler.can_run_ahead(seq) for seq in seqs)
    assert not Sampler.can_run_ahead(make_seq(SamplingParams(repetition_penalty=1.2)))
    assert not Sampler.can_run_ahead(make_seq(SamplingParams(presence_penalty=0.5)))


@pytest.mark.gpu
def test_sampling_ahead_never_waits_for_the_gpu():
    """`sample_ids` (the path of a decode step launched ahead of the host) queues its work without a host
    sync for every row it takes: greedy, seeded, top-k/top-p, min_tokens counting the token in flight
    (torch's sync debug mode raises on a synchronizing call)."""
    logits = torch.randn(4, 151552, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    seqs = [
        make_seq(SamplingParams(temperature=0.0), seed_generator=False),
        make_seq(SamplingParams(temperature=0.0, seed=3, min_tokens=8, stop_token_ids=(9,)), output=(4,)),
        make_seq(SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_tokens=2), output=(4,)),
        make_seq(SamplingParams(temperature=1.0), seed_generator=False),
    ]
    seqs[1].generator = torch.Generator("cuda").manual_seed(3)
    sampler = Sampler([EOS])
    want = sampler.sample_ids(logits, seqs, ahead=1)  # first use of each kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sampler.sample_ids(logits, seqs, ahead=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got[:2].tolist() == want[:2].tolist()  # the greedy rows
    assert got[1].item() not in (EOS, 9)


def test_warm_up_runs_every_path_and_leaves_requests_alone(caplog):
    """`Sampler.warm_up` (the engine's warmup runs it, so that no request is the first to launch a
    sampling kernel) goes through each path; the draws after it, seeded or from the global generator,
    equal those of a sampler that never warmed up."""
    warmed, fresh = Sampler([EOS]), Sampler([EOS])
    logits = random_logits(2, seed=3)
    seeded = SamplingParams(temperature=0.9, top_k=5, seed=11)
    unseeded = SamplingParams(temperature=0.9, top_p=0.8)
    torch.manual_seed(5)
    want = fresh(logits, [make_seq(seeded), make_seq(unseeded)])
    torch.manual_seed(5)
    warmed.warm_up(VOCAB, torch.device("cpu"))
    assert warmed(logits, [make_seq(seeded), make_seq(unseeded)]) == want
    assert "not warmed up" not in caplog.text  # the grammar mask's kernel ran too (xgrammar is installed)


def test_penalties_do_not_touch_other_rows():
    logits = random_logits(2)
    plain = make_seq(SamplingParams(temperature=0.0), output=(1, 2))
    penalized = make_seq(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=(1, 2))
    out = logits.clone()
    Sampler([EOS]).apply_penalties(out, [plain, penalized])
    assert torch.equal(out[0], logits[0])
    assert not torch.equal(out[1], logits[1])
