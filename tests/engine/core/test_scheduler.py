"""Scheduler decisions step by step: who runs, how many tokens, chunk splits, preemption victims."""

from __future__ import annotations

import pytest

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.sample.sampler import SamplingParams

EOS = 2


def make_scheduler(
    *,
    num_blocks=64,
    block_size=4,
    max_num_seqs=8,
    max_num_batched_tokens=16,
    max_model_len=64,
    chunked=True,
    prefill_with_decodes=None,
    prefix_caching=False,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        eos_token_ids=[EOS],
        enable_chunked_prefill=chunked,
        max_num_prefill_tokens_with_decodes=prefill_with_decodes,
    )


def make_seq(seq_id: str, num_prompt_tokens: int, **sampling) -> Sequence:
    sampling.setdefault("max_tokens", 8)
    return Sequence(seq_id, [10 + i for i in range(num_prompt_tokens)], SamplingParams(**sampling))


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(seq.seq_id, n) for seq, n in zip(out.seqs, out.num_scheduled_tokens, strict=True)]


def step(sched: Scheduler, token_id: int = 100) -> tuple[SchedulerOutput, list[tuple[str, int]], list[str]]:
    """One schedule + update where every sampling sequence samples ``token_id``."""
    out = sched.schedule()
    scheduled = plan(out)
    sampled = [token_id if out.samples(i) else None for i in range(len(out.seqs))]
    finished = sched.update(out, sampled)
    return out, scheduled, [s.seq_id for s in finished]


def test_fcfs_chunked_prefill_and_decode_first():
    sched = make_scheduler(max_num_batched_tokens=8)
    a, b, c = make_seq("a", 10), make_seq("b", 3), make_seq("c", 5)
    for seq in (a, b, c):
        sched.add(seq)
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 8)]  # a takes the whole budget; b waits behind it
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 2), ("b", 3), ("c", 3)]  # a finishes its prompt, b whole, c a chunk
    assert (len(a), len(b), len(c)) == (11, 4, 5)
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 1), ("b", 1), ("c", 2)]  # decodes first, then c's last chunk
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 1), ("b", 1), ("c", 1)]
    assert [s.num_output_tokens for s in (a, b, c)] == [3, 3, 2]


def test_stall_free_steps_cap_prompt_tokens_beside_decodes():
    sched = make_scheduler(max_num_batched_tokens=16, prefill_with_decodes=3)
    a = make_seq("a", 4)
    sched.add(a)
    assert step(sched)[1] == [("a", 4)]  # no decodes yet: the whole budget
    sched.add(make_seq("b", 7))
    sched.add(make_seq("c", 2))
    assert step(sched)[1] == [("a", 1), ("b", 3)]  # beside a decode: 3 prompt tokens in all
    assert step(sched)[1] == [("a", 1), ("b", 3)]
    assert step(sched)[1] == [("a", 1), ("b", 1), ("c", 2)]
    assert step(sched)[1] == [("a", 1), ("b", 1), ("c", 1)]
    off = make_scheduler(max_num_batched_tokens=16, prefill_with_decodes=3, chunked=False)
    off.add(make_seq("a", 4))
    step(off)
    off.add(make_seq("b", 7))
    assert step(off)[1] == [("a", 1), ("b", 7)]  # without chunked prefill a prompt is never cut


def test_new_requests_join_running_batch():
    sched = make_scheduler()
    a = make_seq("a", 4)
    sched.add(a)
    assert step(sched)[1] == [("a", 4)]
    assert step(sched)[1] == [("a", 1)]
    sched.add(make_seq("b", 6))
    assert step(sched)[1] == [("a", 1), ("b", 6)]
    assert step(sched)[1] == [("a", 1), ("b", 1)]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    for name in "abc":
        sched.add(make_seq(name, 2, max_tokens=2))
    assert step(sched)[1] == [("a", 2), ("b", 2)]
    assert [s.seq_id for s in sched.waiting] == ["c"]
    out, scheduled, finished = step(sched)
    assert scheduled == [("a", 1), ("b", 1)] and finished == ["a", "b"]
    assert step(sched)[1] == [("c", 2)]


def test_chunked_prefill_off_waits_for_whole_prompt():
    sched = make_scheduler(max_num_batched_tokens=8, chunked=False)
    sched.add(make_seq("a", 6))
    sched.add(make_seq("b", 4))
    assert step(sched)[1] == [("a", 6)]  # b (4) does not fit the remaining 2
    assert step(sched)[1] == [("a", 1), ("b", 4)]
    with pytest.raises(ValueError, match=r"^prompt_token_ids: .* 9 tokens, over the limit of 8"):
        sched.add(make_seq("c", 9))


def test_reject_prompt_over_max_model_len():
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError, match=r"17 tokens, over the limit of 16 tokens \(max_model_len"):
        sched.add(make_seq("a", 17))
    with pytest.raises(ValueError, match="empty"):
        sched.add(make_seq("b", 0))
    assert not sched.has_unfinished()


def test_preempt_newest_by_recompute_and_resume():
    # 4 blocks of 2 slots: a and b (3-token prompts) fill the cache after their first decode
    sched = make_scheduler(num_blocks=4, block_size=2)
    bm = sched.block_manager
    a, b = make_seq("a", 3, max_tokens=4), make_seq("b", 3, max_tokens=4)
    sched.add(a)
    sched.add(b)
    assert step(sched, 101)[1] == [("a", 3), ("b", 3)]
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    assert step(sched, 102)[1] == [("a", 1), ("b", 1)]  # token 3 fits in the second block
    out, scheduled, _ = step(sched, 103)  # a's token 4 needs a block: b (newest) is preempted
    assert scheduled == [("a", 1)] and [s.seq_id for s in out.preempted] == ["b"]
    assert a.block_table == [0, 1, 2] and b.block_table == []
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [101, 102] and sched.num_preemptions == 1
    assert list(sched.waiting) == [b]
    # b needs 3 blocks for its 5 tokens; only block 3 is free until a finishes
    _, scheduled, finished = step(sched, 104)
    assert scheduled == [("a", 1)] and finished == ["a"]
    assert a.output_token_ids == [101, 102, 103, 104] and bm.num_used_blocks == 0
    _, scheduled, _ = step(sched, 105)
    assert scheduled == [("b", 5)]  # prompt + its 2 tokens re-prefilled, then it samples token 3
    assert b.output_token_ids == [101, 102, 105]
    assert b.block_table == [3, 0, 1]
    _, scheduled, finished = step(sched, 106)
    assert scheduled == [("b", 1)] and finished == ["b"]
    assert bm.num_used_blocks == 0 and not sched.has_unfinished()


def test_newest_preempts_itself():
    sched = make_scheduler(num_blocks=4, block_size=2)
    a, b = make_seq("a", 3), make_seq("b", 4)
    sched.add(a)
    sched.add(b)
    step(sched)
    out, scheduled, _ = step(sched)  # b's token 4 needs a block, b is the newest: b yields, a runs
    assert scheduled == [("a", 1)] and out.preempted == [b]
    assert a.block_table == [0, 1] and list(sched.block_manager.free_block_ids) == [2, 3]


def test_running_prefill_preempts_when_blocks_run_out():
    # a decodes, b is mid-prefill; when b's next chunk finds no blocks, b (the newest) yields
    sched = make_scheduler(num_blocks=5, block_size=2, max_num_batched_tokens=4)
    a, b = make_seq("a", 2, max_tokens=20), make_seq("b", 10)
    sched.add(a)
    sched.add(b)
    assert step(sched)[1] == [("a", 2), ("b", 2)]
    assert step(sched)[1] == [("a", 1), ("b", 3)]  # a: blocks [0, 2]; b: 5 tokens in [1, 3, 4]
    out, scheduled, _ = step(sched)  # b's next 3 tokens need a 4th block: none free
    assert scheduled == [("a", 1)] and out.preempted == [b]
    assert b.num_computed_tokens == 0 and list(sched.waiting) == [b]


def test_stop_conditions():
    sched = make_scheduler(max_model_len=8)
    stop_id = make_seq("stop_id", 2, stop_token_ids=(55,))
    eos = make_seq("eos", 2)
    ignore = make_seq("ignore", 2, ignore_eos=True, max_tokens=2)
    long = make_seq("long", 7, max_tokens=8)
    for seq in (stop_id, eos, ignore, long):
        sched.add(seq)
    out = sched.schedule()
    finished = sched.update(out, [55, EOS, EOS, 9])
    assert [s.seq_id for s in finished] == ["stop_id", "eos", "long"]
    assert [s.finish_reason for s in finished] == ["stop", "stop", "length"]  # long hit max_model_len
    out = sched.schedule()
    assert plan(out) == [("ignore", 1)]
    assert [s.finish_reason for s in sched.update(out, [EOS])] == ["length"]
    assert sched.block_manager.num_used_blocks == 0


def test_finish_waiting_and_running():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_seq("a", 3), make_seq("b", 3)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(b, "abort")
    sched.finish(a, "abort")
    assert (a.finish_reason, b.finish_reason) == ("abort", "abort")
    assert not sched.has_unfinished() and sched.block_manager.num_used_blocks == 0


def test_a_sequence_waits_for_a_block_a_running_sequence_computes():
    """Two identical 10-token prompts (block size 4) added together, prefix caching on: the second is held
    back while the first computes the blocks it would compute too (keeping its place: a different prompt
    behind it is admitted in that step); it then maps the first's two full blocks and computes only its last
    two tokens."""
    sched = make_scheduler(max_num_batched_tokens=32, prefix_caching=True)
    a, b, c = make_seq("a", 10), make_seq("b", 10), make_seq("c", 3)
    for seq in (a, b, c):
        sched.add(seq)
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 10), ("c", 3)] and sched.num_held_back == 1
    assert list(sched.waiting) == [b]
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 1), ("c", 1), ("b", 2)]
    assert (b.num_cached_tokens, b.block_table[:2]) == (8, a.block_table[:2])
    bm = sched.block_manager
    assert (bm.num_queried_tokens, bm.num_hit_tokens, bm.num_reused_blocks) == (23, 8, 2)


def test_held_back_sequences_keep_their_order_and_let_other_prompts_pass():
    """Three identical prompts and a different one between them: the two later copies wait (in their order)
    while the first computes the shared blocks; the different prompt, behind the first copy held back, is
    admitted in the same step; in the next both copies map the shared blocks together."""
    sched = make_scheduler(max_num_batched_tokens=32, prefix_caching=True)
    a, b, d = make_seq("a", 10), make_seq("b", 10), make_seq("d", 10)
    c = Sequence("c", [50 + i for i in range(8)], SamplingParams(max_tokens=8))
    for seq in (a, b, c, d):
        sched.add(seq)
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 10), ("c", 8)] and sched.num_held_back == 2
    assert list(sched.waiting) == [b, d]
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 1), ("c", 1), ("b", 2), ("d", 2)] and sched.num_held_back == 2
    assert b.block_table[:2] == d.block_table[:2] == a.block_table[:2]
    assert (b.num_cached_tokens, d.num_cached_tokens, c.num_cached_tokens) == (8, 8, 0)


def test_with_caching_off_identical_prompts_are_admitted_together():
    sched = make_scheduler(max_num_batched_tokens=32)
    a, b = make_seq("a", 10), make_seq("b", 10)
    sched.add(a)
    sched.add(b)
    _, scheduled, _ = step(sched)
    assert scheduled == [("a", 10), ("b", 10)] and sched.num_held_back == 0
