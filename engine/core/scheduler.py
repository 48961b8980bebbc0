"""Continuous (in-flight) batching scheduler with chunked prefill and preemption by recompute.

Contract of ``schedule() -> SchedulerOutput``:
  * There are no prefill/decode phases: each step gives every scheduled sequence a number of tokens
    (``num_scheduled_tokens``), at most ``max_num_batched_tokens`` in all, over at most ``max_num_seqs``
    running sequences. A sequence samples a token in the step whose tokens reach ``len(seq)``.
  * Order of service: (1) running sequences that decode, 1 token each, oldest first; (2) running
    sequences still prefilling, a chunk each (oldest first); (3) waiting sequences, FCFS: the
    head of the queue gets a chunk or nobody behind it is admitted (one held back for a block that a running
    sequence computes, below, excepted). With chunked prefill off, a prompt
    is only admitted when it fits the remaining budget whole. No new sequence is admitted in a step
    that preempted.
  * Stall-free steps: in a step with decodes, (2) and (3) together get at most
    ``max_num_prefill_tokens_with_decodes`` tokens (None: the rest of the budget), so a long prompt
    is spread over several steps and no decode waits for all of it; a step without decodes gives
    prompts the whole budget.
  * "No room" for a running sequence: the NEWEST running sequence (last admitted) is preempted by
    recompute: its blocks are freed, ``num_computed_tokens`` drops to 0 and it goes to the FRONT of the
    waiting queue; later it re-prefills prompt + tokens generated so far and goes on sampling (the tokens
    it already produced are kept and never produced again). If the newest is the one asking, it preempts
    itself. A victim already scheduled in this step is unscheduled. Nothing is ever dropped.
  * Prefix cache: a waiting sequence with no blocks first maps its longest cached prefix
    (``BlockManager.match_prefix``) and is scheduled from there; a sequence's first admission records
    ``num_cached_tokens``. When the next full block it would compute is one a running sequence has not
    computed yet (the same content: several requests about one new image arriving together), it is held
    back (keeping its place; the queue behind it goes on) until that chunk has run (``num_held_back`` counts
    such waits, one per sequence and step): it then maps that block instead of computing it again.
    ``update`` offers every newly full block to the cache (``BlockManager.commit``).
  * ``add`` rejects (ValueError) a prompt that can never run: longer than ``max_model_len`` (which the
    caller caps at the KV capacity) or, with chunked prefill off, longer than ``max_num_batched_tokens``.
  * ``update(output, sampled)`` advances ``num_computed_tokens``, appends sampled tokens, and finishes
    sequences: "stop" on an eos id (unless ignore_eos) or a stop id, "length" at ``max_tokens`` or
    ``max_model_len``. Finished sequences leave the running list and their blocks are freed at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    """Tokens each of ``seqs`` runs this step, starting at its ``num_computed_tokens``."""
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        """Whether ``seqs[i]`` reaches its last token this step (and so samples)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_scheduled_tokens[i] == len(seq)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        enable_chunked_prefill: bool = True,
        max_num_prefill_tokens_with_decodes: int | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_prefill_tokens_with_decodes = max_num_prefill_tokens_with_decodes
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_held_back = 0  # steps the head of the queue waited for a block a running sequence computes

    # -- queue ------------------------------------------------------------------------------------

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """Raise ValueError when a prompt of this length could never be scheduled."""
        check_prompt_length(
            num_prompt_tokens, self.max_model_len, self.max_num_batched_tokens, self.enable_chunked_prefill
        )

    def prompt_limits(self) -> tuple[int, int, bool]:
        """(max_model_len, max_num_batched_tokens, enable_chunked_prefill): ``check_prompt_length``'s."""
        return self.max_model_len, self.max_num_batched_tokens, self.enable_chunked_prefill

    def add(self, seq: Sequence) -> None:
        self.check_prompt(seq.num_prompt_tokens)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` wherever it is (waiting or running) and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- one step -------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # (1) decodes, then (2) running prefills; stable sort keeps admission order within each group
        prefill_cap = None  # set once the decodes are scheduled (stall-free steps)
        for seq in sorted(self.running, key=lambda s: s.is_prefilling):
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            if seq.is_prefilling and prefill_cap is None:
                budget = prefill_cap = self._prefill_budget(out, budget)
            num_tokens = min(seq.num_new_tokens, budget)
            if num_tokens == 0:
                continue
            while not self.block_manager.can_allocate(seq, num_tokens):
                victim = self.running[-1]
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, num_tokens)
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(num_tokens)
            budget -= num_tokens

        # (3) waiting, FCFS
        if prefill_cap is None:
            budget = self._prefill_budget(out, budget)
        held = 0  # sequences at the front of the queue held back in this step (they keep their places)
        while (
            held < len(self.waiting)
            and not out.preempted
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[held]
            if not seq.block_table:
                if self.block_manager.next_block_in_flight(seq, self.running):
                    # a running sequence computes the same block now: take it from the cache later, and
                    # let the queue behind go on
                    self.num_held_back += 1
                    held += 1
                    continue
                self.block_manager.match_prefix(seq)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            num_tokens = seq.num_new_tokens
            if num_tokens > budget:
                if not self.enable_chunked_prefill:
                    break
                num_tokens = budget
            if not self.block_manager.can_allocate(seq, num_tokens):
                if not self.running and self._release_waiting_blocks(seq):
                    continue
                break
            del self.waiting[held]
            self.block_manager.allocate(seq, num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(num_tokens)
            budget -= num_tokens
        return out

    def _prefill_budget(self, out: SchedulerOutput, budget: int) -> int:
        """What is left of ``budget`` for prompt chunks after the step's decodes (stall-free steps)."""
        cap = self.max_num_prefill_tokens_with_decodes
        if cap is None or not out.seqs or not self.enable_chunked_prefill:
            return budget
        return min(budget, cap)

    def _release_waiting_blocks(self, head: Sequence) -> bool:
        """With nothing running, free the cached blocks that sequences queued behind ``head`` hold, so the
        head can run (those that lack image embeddings for their cached part keep theirs). Whether any
        were freed."""
        released = False
        for seq in self.waiting:
            if seq is not head and seq.block_table and not seq.missing_image_end:
                self.block_manager.free(seq)
                released = True
        return released

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Preempt ``seq`` by recompute; return the budget it gives back (if it was scheduled this step)."""
        num_returned = 0
        if seq in out.seqs:
            i = out.seqs.index(seq)
            out.seqs.pop(i)
            num_returned = out.num_scheduled_tokens.pop(i)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
        return num_returned

    def update(
        self, out: SchedulerOutput, sampled: list[int | None], now: float | None = None
    ) -> list[Sequence]:
        """Apply one step's results. ``sampled[i]`` is the token of ``out.seqs[i]`` (None: mid-prefill).

        Returns the sequences that finished in this step.
        """
        now = time.monotonic() if now is None else now
        finished = []
        for seq, num_tokens, token_id in zip(out.seqs, out.num_scheduled_tokens, sampled, strict=True):
            seq.num_computed_tokens += num_tokens
            self.block_manager.commit(seq)
            if token_id is None:
                continue
            seq.append_token(token_id, now)
            reason = self.stop_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        sp = seq.sampling
        if seq.num_output_tokens > sp.min_tokens:  # the sampler masks eos/stop ids before min_tokens
            if token_id in sp.stop_token_ids or (not sp.ignore_eos and token_id in self.eos_token_ids):
                return "stop"
        if seq.num_output_tokens >= sp.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None


def check_prompt_length(
    num_prompt_tokens: int, max_model_len: int, max_num_batched_tokens: int, enable_chunked_prefill: bool
) -> None:
    """Raise ValueError when a prompt of this length could never be scheduled (``Scheduler.check_prompt``)."""
    if num_prompt_tokens < 1:
        raise ValueError("prompt_token_ids: the prompt is empty (needs at least 1 token)")
    if num_prompt_tokens > max_model_len:
        raise ValueError(
            f"prompt_token_ids: the prompt has {num_prompt_tokens} tokens, over the limit of "
            f"{max_model_len} tokens (max_model_len, capped at the KV cache capacity)"
        )
    if not enable_chunked_prefill and num_prompt_tokens > max_num_batched_tokens:
        raise ValueError(
            f"prompt_token_ids: the prompt has {num_prompt_tokens} tokens, over the limit of "
            f"{max_num_batched_tokens} tokens (max_num_batched_tokens, chunked prefill is off)"
        )
