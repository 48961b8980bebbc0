"""Sampling parameters and the batched sampler.

Contract:
  * ``SamplingParams`` is a frozen dataclass; ``validate()`` raises ``ValueError`` whose message starts
    with the field name and states the limit it broke.
  * ``Sampler(eos_token_ids)(logits, seqs) -> list[int]`` takes fp32 logits ``[num_seqs, vocab]`` (one row
    per sequence that samples this step) and the matching sequences, and returns one token id per row.
    Per row, in this order:
      1. repetition penalty (HF semantics) over prompt + output tokens: a positive logit is divided by the
         penalty, a negative one multiplied;
      2. presence / frequency penalties (OpenAI semantics) over output tokens:
         ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``;
      3. while ``num_output_tokens < min_tokens``: eos ids and ``stop_token_ids`` are masked to -inf;
      4. a sequence with a grammar (``seq.grammar``, engine.sample.structured) gets the tokens its grammar
         forbids masked to -inf: the masks of all such rows are filled on the host in one batched call
         before anything waits for the logits, so on a GPU they are computed while the forward runs;
      5. temperature 0 -> argmax; otherwise ``logits / temperature``, top-k (0 = off), top-p, then one
         draw. A row with a seed draws from its sequence's own ``torch.Generator`` (one draw per step),
         so its tokens do not depend on which other sequences share the batch.
    A row whose ``sampling.logprobs`` is not None also gets the log-probability of its token under the
    model's distribution (log-softmax of the logits as they came in, before penalties, grammar and
    temperature, as transformers computes them) and, for ``logprobs = k > 0``, the k most likely tokens
    with theirs: ``seq.logprobs[i]`` = ``(logprob, ((token_id, logprob), ...))`` for output token i. Rows
    without grammar or logprobs pay nothing for either.
  * ``Sampler.sample_ids(logits, seqs, ahead)`` is the same without steps 1-2, returning the ids on the logits'
    device without waiting for the GPU (no host sync): the engine launches a decode step before the
    previous one's tokens reach the host, for sequences where ``can_run_ahead(seq)`` holds (no penalty:
    steps 1-2 do nothing; no logprobs); step 3 counts the ``ahead`` tokens still in flight. A sequence with
    a grammar can run ahead too, but its mask needs every earlier token on the host: its step's forward is
    launched first, its previous token read while that forward runs, and only then is it sampled;
    ``needs_last_token(seq)`` says which sequences need that order. ``prepare_masks(seqs, token_ids, ...)``
    feeds the grammars those tokens and fills the masks before the tokens are in the sequences;
    ``sample_ids(..., ahead=1, prepared=)`` then applies them, and the caller applies the tokens to the
    sequences after the sampling is launched.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

logger = logging.getLogger("glm-engine")

if TYPE_CHECKING:
    from engine.sample.structured import GrammarMasks, GrammarState, PreparedMasks

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate (finish_reason "length" when reached)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Per-request seed; the same seed gives the same tokens whatever the batch."""
    repetition_penalty: float = 1.0
    """HF repetition penalty over prompt + output tokens; 1.0 is off."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty over output tokens, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty over output tokens, in [-2, 2]."""
    min_tokens: int = 0
    """Eos and stop ids cannot be sampled before this many output tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end the sequence (finish_reason "stop")."""
    ignore_eos: bool = False
    """Keep generating past eos (only stop_token_ids and max_tokens end the sequence)."""
    logprobs: int | None = None
    """None: no log-probabilities; 0: the sampled token's; k: also the k most likely tokens' (k <= 20)."""

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first bad field and its limit; return self when all is well."""

        def check(ok: bool, field: str, limit: str) -> None:
            if not ok:
                raise ValueError(f"{field}: {getattr(self, field)!r} is out of range ({limit})")

        check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            "must be finite and >= 0",
        )
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be >= 0; 0 turns it off")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**64),
            "seed",
            "must be in [0, 2**64)",
        )
        check(
            math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
            "repetition_penalty",
            "must be in (0, 2]",
        )
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        check(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be <= max_tokens ({self.max_tokens})",
        )
        check(
            self.logprobs is None
            or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
            "logprobs",
            f"must be None or in [0, {MAX_TOP_LOGPROBS}]",
        )
        check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be non-negative token ids",
        )
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingSeq(Protocol):
    """What the sampler reads from a sequence (engine.core.sequence.Sequence has all of it). The object must be
    weak-referenceable and hashable by identity: the sampler caches its prompt ids on the device."""

    sampling: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator | None
    grammar: GrammarState | None
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]]


class Sampler:
    """Batched sampler with per-sequence parameters (see the module docstring for the order of steps)."""

    def __init__(self, eos_token_ids: list[int] | tuple[int, ...]) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self._prompt_ids_cache: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()
        self._masks: GrammarMasks | None = None  # made for the first guided row

    @property
    def masks(self) -> GrammarMasks:
        if self._masks is None:
            from engine.sample.structured import GrammarMasks

            self._masks = GrammarMasks()
        return self._masks

    def __call__(self, logits: torch.Tensor, seqs: list[SamplingSeq]) -> list[int]:
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (logits.shape, len(seqs))
        raw = logits
        logits = logits.float().clone()  # [num_seqs, vocab]
        self.apply_grammars(logits, seqs)
        self.apply_penalties(logits, seqs)
        self.apply_min_tokens(logits, seqs)
        token_ids = self.sample(logits, seqs)
        self.record_logprobs(raw, seqs, token_ids)
        return token_ids

    def warm_up(self, vocab_size: int, device: torch.device) -> None:
        """Run each sampling path once on throw-away rows: greedy, `min_tokens`, seeded and unseeded draws
        with top-k/top-p, penalties with logprobs, through the synchronous call and through `sample_ids`
        (a step launched ahead), and an allow-all grammar mask. On a GPU the first launch of a kernel
        loads it, and that waits for everything queued before it (~40 ms behind queued work on an H100):
        made here, at start, it is no request's first token or a running stream's step that waits."""
        from engine.core.sequence import Sequence

        params = [
            SamplingParams(max_tokens=4, temperature=0.0),
            SamplingParams(max_tokens=4, temperature=0.0, min_tokens=4),
            SamplingParams(max_tokens=4, temperature=0.8, top_k=20, top_p=0.9, seed=0),
            SamplingParams(max_tokens=4, temperature=0.8),
            SamplingParams(
                max_tokens=4, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5, logprobs=2
            ),
        ]
        seqs = []
        for i, sp in enumerate(params):
            generator = None if sp.seed is None else torch.Generator(device=device).manual_seed(sp.seed)
            seq = Sequence(f"__warmup_sampling_{i}__", [1, 2, 3], sp, generator=generator)
            seq.token_ids.append(4)  # one output token: the penalties read the outputs too
            seqs.append(seq)
        logits = torch.zeros(len(seqs), vocab_size, device=device)
        ahead = [seq for seq in seqs if self.can_run_ahead(seq)]  # the first rows
        # the unseeded row draws from the global generator: its state is put back afterwards
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self(logits, seqs)
            self.sample_ids(logits[: len(ahead)], ahead, ahead=1)
        self._warm_up_grammar_masks(logits, vocab_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @staticmethod
    def _warm_up_grammar_masks(logits: torch.Tensor, vocab_size: int) -> None:
        """Apply an allow-all grammar mask once (xgrammar's kernel; on a GPU its first use may also build
        it), where xgrammar is installed; a failure is logged, never raised: guided requests then meet it
        themselves."""
        try:
            import xgrammar as xgr
        except ImportError:
            return
        try:
            bitmask = torch.full((1, -(-vocab_size // 32)), -1, dtype=torch.int32, device=logits.device)
            xgr.apply_token_bitmask_inplace(logits[:1], bitmask, vocab_size=vocab_size)
        except Exception as exc:
            logger.warning("[glm-engine] grammar masks not warmed up (%s: %s)", type(exc).__name__, exc)

    @staticmethod
    def can_run_ahead(seq: SamplingSeq) -> bool:
        """Whether a step of ``seq`` can be launched before its previous token is known on the host:
        penalties read the token history; min_tokens only its length, which `sample_ids` is told; a
        grammar only its last token, which must be on the host before the step is sampled (see
        `needs_last_token`)."""
        sp = seq.sampling
        return (
            sp.repetition_penalty == 1.0
            and sp.presence_penalty == 0.0
            and sp.frequency_penalty == 0.0
            and sp.logprobs is None
        )

    @staticmethod
    def needs_last_token(seq: SamplingSeq) -> bool:
        """Whether sampling ``seq`` needs its previous token on the host (a grammar that is still
        deciding: its mask depends on it)."""
        state = getattr(seq, "grammar", None)
        return state is not None and not state.is_terminated

    def apply_grammars(self, logits: torch.Tensor, seqs: list[SamplingSeq]) -> None:
        """In place: mask what each row's grammar forbids (rows with an unfinished grammar only)."""
        rows, states = [], []
        for i, seq in enumerate(seqs):
            state = getattr(seq, "grammar", None)
            if state is None:
                continue
            state.sync(seq.token_ids[seq.num_prompt_tokens :])
            if not state.is_terminated:
                rows.append(i)
                states.append(state)
        if rows:
            num_seqs, vocab_size = logits.shape
            pinned = logits.device.type == "cuda"
            self.masks.apply(logits, self.masks.fill(num_seqs, vocab_size, rows, states, pinned))

    def prepare_masks(
        self, seqs: list[SamplingSeq], token_ids: list[int], vocab_size: int, pinned: bool
    ) -> PreparedMasks | None:
        """The masks of a step of ``seqs`` whose newest tokens ``token_ids`` (one each) are on the host but
        not yet in the sequences (the grammars are fed them here); pass them to `sample_ids`. None: no
        grammar to mask."""
        jobs = [
            (i, seq.grammar, token_id, len(seq.token_ids) - seq.num_prompt_tokens)
            for i, (seq, token_id) in enumerate(zip(seqs, token_ids, strict=True))
            if self.needs_last_token(seq)
        ]
        return self.masks.prepare(len(seqs), vocab_size, jobs, pinned) if jobs else None

    @staticmethod
    def record_logprobs(raw_logits: torch.Tensor, seqs: list[SamplingSeq], token_ids: list[int]) -> None:
        """Append to ``seq.logprobs`` the log-probability of its sampled token (and its top-k) for rows
        that ask for them, at the index of the token they sampled."""
        rows = [i for i, seq in enumerate(seqs) if seq.sampling.logprobs is not None]
        if not rows:
            return
        logprobs = raw_logits[_on(rows, raw_logits.device)].float().log_softmax(dim=-1)  # [R, vocab]
        chosen = logprobs.gather(1, _on([token_ids[i] for i in rows], logprobs.device)[:, None])
        chosen_list = chosen[:, 0].tolist()
        k = max(seqs[i].sampling.logprobs or 0 for i in rows)
        top_values: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if k:
            values, ids = logprobs.topk(k, dim=-1)  # [R, k], most likely first
            top_values, top_ids = values.tolist(), ids.tolist()
        for j, i in enumerate(rows):
            seq = seqs[i]
            n = seq.sampling.logprobs or 0
            top = tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True))
            del seq.logprobs[len(seq.token_ids) - seq.num_prompt_tokens :]
            seq.logprobs.append((chosen_list[j], top))

    def sample_ids(
        self,
        logits: torch.Tensor,
        seqs: list[SamplingSeq],
        ahead: int = 0,
        prepared: PreparedMasks | None = None,
    ) -> torch.Tensor:
        """Token ids [num_seqs] on the logits' device, no host sync (every seq must `can_run_ahead`).
        ``ahead``: tokens each sequence has beyond ``token_ids`` (sampled, not yet in the sequence). Grammar
        masks are those of ``prepared`` (`prepare_masks`, fed those tokens), else filled here from the
        sequences' tokens, so then ``ahead`` must be 0 when a sequence `needs_last_token`; either way
        applied on the device."""
        logits = logits.float()
        guided = bool(prepared.rows) if prepared is not None else any(self.needs_last_token(s) for s in seqs)
        if guided and ahead and prepared is None:
            raise ValueError(
                "sample_ids: a sequence with a grammar needs its last token on the host (ahead=0)"
            )
        if guided or any(
            len(s.token_ids) - s.num_prompt_tokens + ahead < s.sampling.min_tokens for s in seqs
        ):
            logits = logits.clone()
            if prepared is not None:
                self.masks.apply(logits, prepared)
            else:
                self.apply_grammars(logits, seqs)
            self.apply_min_tokens(logits, seqs, ahead)
        return self._sample(logits, seqs)

    def apply_penalties(self, logits: torch.Tensor, seqs: list[SamplingSeq]) -> None:
        """In place: repetition, then presence/frequency penalties (batched: a few copies per step)."""
        device = logits.device
        rows = [i for i, seq in enumerate(seqs) if seq.sampling.repetition_penalty != 1.0]
        if rows:
            prompt_parts = [self._prompt_token_ids(seqs[i], device) for i in rows]
            prompt_rows = torch.repeat_interleave(
                torch.arange(len(rows)), torch.tensor([len(p) for p in prompt_parts])
            )
            out_rows = [j for j, i in enumerate(rows) for _ in range(seqs[i].num_output_tokens)]
            out_ids = [t for i in rows for t in seqs[i].token_ids[seqs[i].num_prompt_tokens :]]
            seen = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool, device=device)  # [R, vocab]
            seen[prompt_rows.to(device), torch.cat(prompt_parts)] = True
            if out_ids:
                seen[torch.tensor(out_rows, device=device), torch.tensor(out_ids, device=device)] = True
            penalty = torch.tensor([seqs[i].sampling.repetition_penalty for i in rows], device=device)[
                :, None
            ]
            index = torch.tensor(rows, device=device)
            scores = logits[index]  # [R, vocab]
            penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
            logits[index] = torch.where(seen, penalized, scores)

        rows = [
            i
            for i, seq in enumerate(seqs)
            if (seq.sampling.presence_penalty != 0.0 or seq.sampling.frequency_penalty != 0.0)
            and len(seq.token_ids) > seq.num_prompt_tokens
        ]
        if rows:
            out_rows = [
                j
                for j, i in enumerate(rows)
                for _ in range(len(seqs[i].token_ids) - seqs[i].num_prompt_tokens)
            ]
            out_ids = [t for i in rows for t in seqs[i].token_ids[seqs[i].num_prompt_tokens :]]
            counts = torch.zeros(len(rows), logits.shape[1], device=device)  # [R, vocab]
            counts.index_put_(
                (torch.tensor(out_rows, device=device), torch.tensor(out_ids, device=device)),
                torch.ones(len(out_ids), device=device),
                accumulate=True,
            )
            frequency = torch.tensor([seqs[i].sampling.frequency_penalty for i in rows], device=device)[
                :, None
            ]
            presence = torch.tensor([seqs[i].sampling.presence_penalty for i in rows], device=device)[:, None]
            index = torch.tensor(rows, device=device)
            logits[index] -= frequency * counts + presence * (counts > 0).float()

    def _prompt_token_ids(self, seq: SamplingSeq, device: torch.device) -> torch.Tensor:
        """The distinct prompt token ids of ``seq`` on ``device`` (cached while the sequence lives)."""
        ids = self._prompt_ids_cache.get(seq)
        if ids is None:
            ids = torch.tensor(sorted(set(seq.token_ids[: seq.num_prompt_tokens])), dtype=torch.long)
            ids = ids.to(device)
            self._prompt_ids_cache[seq] = ids
        return ids

    def apply_min_tokens(self, logits: torch.Tensor, seqs: list[SamplingSeq], ahead: int = 0) -> None:
        """In place: mask eos and stop ids for rows that have not reached min_tokens (counting ``ahead``
        tokens not yet in ``token_ids``)."""
        rows, ids = [], []
        for i, seq in enumerate(seqs):
            sp = seq.sampling
            if len(seq.token_ids) - seq.num_prompt_tokens + ahead < sp.min_tokens:
                banned = {t for t in (*self.eos_token_ids, *sp.stop_token_ids) if t < logits.shape[1]}
                rows += [i] * len(banned)
                ids += sorted(banned)
        if rows:
            # the values as a tensor made where the logits are: a Python number assigned through an index
            # is copied to the GPU synchronously, so the host would wait there for every step queued before
            # this one (a decode launched ahead of the host lost its lead: +1.1 ms a token on an H100)
            values = logits.new_full((len(rows),), -math.inf)
            logits.index_put_((_on(rows, logits.device), _on(ids, logits.device)), values)

    def sample(self, logits: torch.Tensor, seqs: list[SamplingSeq]) -> list[int]:
        return self._sample(logits, seqs).tolist()

    def _sample(self, logits: torch.Tensor, seqs: list[SamplingSeq]) -> torch.Tensor:
        next_ids = logits.argmax(dim=-1)  # [num_seqs]
        rows = [i for i, seq in enumerate(seqs) if not seq.sampling.is_greedy]
        if rows:
            idx = _on(rows, logits.device)
            probs = self.probs(logits[idx], [seqs[i].sampling for i in rows])  # [num_rows, vocab]
            # Exponential-race sampling: argmax(p / q) with q ~ Exp(1) is a draw from p. Seeded rows draw
            # their noise from their own generator so a row's draw depends only on its own state.
            noise = torch.empty_like(probs)
            unseeded = []
            for j, i in enumerate(rows):
                generator = seqs[i].generator
                if generator is None:
                    unseeded.append(j)
                else:
                    noise[j].exponential_(generator=generator)
            if unseeded:
                index = _on(unseeded, probs.device)
                noise[index] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
            next_ids[idx] = (probs / noise).argmax(dim=-1)
        return next_ids

    @staticmethod
    def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p -> probabilities [num_rows, vocab]."""
        device = logits.device
        temperature = _on([p.temperature for p in params], device, torch.float32).unsqueeze(1)
        logits = logits / temperature
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            vocab_size = logits.shape[1]
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_rows, vocab]
            top_k = _on([p.top_k if p.top_k > 0 else vocab_size for p in params], device)
            ranks = torch.arange(vocab_size, device=device).unsqueeze(0)
            sorted_logits.masked_fill_(ranks >= top_k.unsqueeze(1), -math.inf)
            # top_p 1.0 -> inf so float error in the cumsum never drops a tail token
            top_p = _on([p.top_p if p.top_p < 1.0 else math.inf for p in params], device, torch.float32)
            top_p = top_p.unsqueeze(1)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the mass before it already reaches top_p; the first token always stays.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_logits.masked_fill_(mass_before >= top_p, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter_(1, order, sorted_logits)
        return logits.softmax(dim=-1)


def _on(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small host list on the device without a blocking copy (a blocking one waits for the GPU)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
