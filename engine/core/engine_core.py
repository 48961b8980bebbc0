"""The engine core: one step of scheduler + runner over the requests it holds, on one thread.

``step(new_seqs, aborted) -> list[RequestOutput]``: new requests join (those with images through the
vision queue, the others straight to the scheduler), aborted ones end, the vision queue hands over
requests whose embeddings are ready, the scheduler picks the step and the runner runs it. A request gets
an output in a step when it got new tokens or finished; every request's last output has
``finish_reason`` set and its KV blocks are free by then. A model error ends the requests of that batch
with "abort" and ``error`` set; the core keeps serving the others.

Decode steps run one ahead of the host where they can: a decode-only step that replays a CUDA graph is
launched without waiting for its tokens; the next step is launched (its input tokens still on the GPU)
before the first one's tokens are read, so the host's work for one step overlaps the GPU's for the next.
When the next step cannot run ahead (new requests, images to encode), its ViT work is still launched
before the launched step's tokens are read, so the GPU goes on from one to the other while the host
applies the tokens.
With a grammar in the batch the next step's forward is launched first; while it runs, the previous tokens
are read and the grammars' masks filled from them; the step is sampled, and only then are the previous
tokens applied to the sequences and turned into outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from engine.config import EngineConfig, ModelConfig
from engine.core.block_manager import BlockManager
from engine.core.image_cache import ImageCache
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.stats import EngineStats
from engine.core.vision_queue import VisionQueue
from engine.processing.output_processor import OutputProcessor
from engine.request import RequestOutput
from engine.runner.model_runner import ModelRunner, PendingDecode

logger = logging.getLogger("glm-engine")


class EngineCore:
    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        runner: ModelRunner,
        num_blocks: int,
        max_model_len: int,
        output_processor: OutputProcessor,
    ) -> None:
        self.model_config = model_config
        self.engine_config = engine_config
        self.runner = runner
        self.max_model_len = max_model_len
        self.output_processor = output_processor
        self.block_manager = BlockManager(
            num_blocks, engine_config.block_size, enable_prefix_caching=engine_config.enable_prefix_caching
        )
        self.image_cache = ImageCache(engine_config.image_cache_mb << 20)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=engine_config.max_num_seqs,
            max_num_batched_tokens=engine_config.max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=model_config.eos_token_ids,
            enable_chunked_prefill=engine_config.enable_chunked_prefill,
            max_num_prefill_tokens_with_decodes=engine_config.max_num_prefill_tokens_with_decodes,
        )
        self.vision = VisionQueue(
            runner,
            self.scheduler,
            self.block_manager,
            self.image_cache,
            max_num_batched_tokens=engine_config.max_num_batched_tokens,
            max_num_vision_patches=engine_config.max_num_vision_patches,
            hidden_size=model_config.hidden_size,
            patches_per_step=engine_config.vision_patches_per_step,
            depth=model_config.vision_config.depth,
        )
        self.stats = EngineStats(num_blocks_total=num_blocks)
        """Counters after the last step (replaced, never mutated: any thread may read it)."""
        self._pending: PendingDecode | None = None  # a launched decode step (see step)

    def step(self, new_seqs: list[Sequence], aborted: list[Sequence]) -> list[RequestOutput]:
        """One engine step; returns the outputs it produced."""
        started = time.monotonic()
        outputs: list[RequestOutput] = []
        pending, self._pending = self._pending, None
        resolved = None
        if pending is not None:
            ahead, resolved = self._run_ahead(pending) if not new_seqs and not aborted else (None, None)
            if ahead is not None:
                self._pending = ahead
                outputs = resolved if resolved is not None else self._resolve(pending)
                self._record_step(outputs, started, len(ahead.seqs), 1, ahead=True)
                return outputs
        for seq in new_seqs:
            if seq.image_pixels is not None:
                self.vision.add(seq)
            else:
                self.scheduler.add(seq)
        # the ViT's work of this step is launched before a launched decode step's tokens are read: its
        # kernels queue behind that step's, and the host reads and applies the tokens while they run
        failed = self.vision.step()
        if pending is not None:
            outputs = resolved if resolved is not None else self._resolve(pending)
        for seq in aborted:
            if seq.is_finished:
                continue
            self._finish(seq, "abort")
            outputs.append(self._output(seq))
        outputs += [self._output(seq, error) for seq, error in failed]

        out = self.scheduler.schedule()
        for seq in out.preempted:
            if seq.missing_image_end and seq.status == SequenceStatus.WAITING:
                # its cached prefix is gone with its blocks: the skipped images may need the ViT now
                self.scheduler.waiting.remove(seq)
                self.vision.add(seq, first=True)
        num_tokens = out.num_batched_tokens
        if not out.is_empty:
            launched = self._launch_decode(out)
            if launched is not None:
                self._pending = launched
            else:
                try:
                    sampled = self.runner.execute(out)
                    # the next step's share of a split ViT forward, queued now: it runs while the host
                    # applies these tokens and prepares that step
                    outputs += [self._output(seq, error) for seq, error in self.vision.advance_ahead()]
                except Exception as exc:  # the batch's requests end; the engine keeps serving the others
                    logger.exception("[glm-engine] model step failed; aborting %d requests", len(out.seqs))
                    for seq in out.seqs:
                        self.scheduler.finish(seq, "abort")
                        outputs.append(self._output(seq, error=f"engine error: {exc}"))
                    sampled = []
                    out.seqs, out.num_scheduled_tokens = [], []
                self.scheduler.update(out, sampled, time.monotonic())
                for seq, token_id in zip(out.seqs, sampled, strict=True):
                    if token_id is not None:
                        outputs.append(self._output(seq))
        self._record_step(outputs, started, num_tokens, 0 if out.is_empty else 1)
        return outputs

    def abort_all(self, new_seqs: list[Sequence]) -> list[RequestOutput]:
        """End every request held here and every one of ``new_seqs`` with "abort" now."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.tokens()  # let the launched step finish; its tokens are dropped with the requests
        for seq in new_seqs:
            self.scheduler.add(seq)  # scheduler.finish ends them; patches waiting for the ViT are dropped
            seq.image_pixels = seq.image_grid_thw = None
        outputs = []
        for seq in self.vision.drain():
            if seq.is_finished:
                continue
            self._end_before_scheduling(seq, "abort")
            outputs.append(self._output(seq))
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, "abort")
            outputs.append(self._output(seq))
        self._record_step(outputs, time.monotonic(), 0, 0)
        return outputs

    @property
    def pending(self) -> PendingDecode | None:
        """The decode step launched and not read yet."""
        return self._pending

    # -- decode run-ahead -------------------------------------------------------------------------------

    def _launch_decode(self, out: SchedulerOutput) -> PendingDecode | None:
        """Launch ``out`` without waiting for its tokens when it is a decode-only step that a CUDA graph
        replays and every sequence can be sampled ahead; else None (the caller runs it synchronously)."""
        if self.runner.graphs is None or any(n != 1 for n in out.num_scheduled_tokens):
            return None
        sampler = self.runner.sampler
        if not all(seq.num_output_tokens and sampler.can_run_ahead(seq) for seq in out.seqs):
            return None
        try:
            return self.runner.launch_decode(out.seqs)
        except Exception:  # the synchronous path runs the step again and reports its error
            logger.exception("[glm-engine] decode launch failed; running the step synchronously")
            return None

    def _run_ahead(self, pending: PendingDecode) -> tuple[PendingDecode | None, list[RequestOutput] | None]:
        """Launch the decode step after ``pending`` before its tokens are read, when nothing else could be
        scheduled: nothing waiting, every running sequence in ``pending``, none with penalties or logprobs,
        and blocks for one more position. Sequences that ``pending``'s token ends by length sit it out; one
        that ends on a stop token or string runs one step for nothing (its result is dropped).

        Returns (the launched step or None, ``pending``'s outputs if it was read here or None). When a
        sequence's sampling needs its last token on the host (a grammar), ``pending`` is read while the new
        step's forward runs, and the new step is sampled after that (its masks fed pending's tokens)."""
        if (
            self.scheduler.waiting
            or not self.vision.is_idle
            or len(self.scheduler.running) != len(pending.seqs)
        ):
            return None, None
        sampler = self.runner.sampler
        seqs = []
        for seq in pending.seqs:
            if seq.status != SequenceStatus.RUNNING:
                return None, None
            if seq.num_output_tokens + 1 >= seq.sampling.max_tokens or len(seq) + 1 >= self.max_model_len:
                continue
            if not sampler.can_run_ahead(seq):
                return None, None
            seqs.append(seq)
        blocks = self.block_manager
        if not seqs or sum(blocks.num_missing_blocks(seq, 2) for seq in seqs) > blocks.num_free_blocks:
            return None, None
        for seq in seqs:
            blocks.allocate(seq, 2)  # the position after pending's token
        read: list[list[int]] = []  # pending's tokens, when read before the new step is sampled
        before_sample = None
        if any(sampler.needs_last_token(seq) for seq in seqs):

            def before_sample():
                # the grammars take pending's tokens while the new step's forward runs; the tokens are
                # applied to the sequences once its sampling is launched
                read.append(pending.tokens())
                rows = {id(seq): j for j, seq in enumerate(pending.seqs)}
                return sampler.prepare_masks(
                    seqs,
                    [read[0][rows[id(seq)]] for seq in seqs],
                    self.model_config.vocab_size,
                    pinned=pending.ready is not None,
                )

        try:
            launched = self.runner.launch_decode(seqs, previous=pending, before_sample=before_sample)
        except Exception:
            logger.exception("[glm-engine] decode launch failed; running the next step synchronously")
            launched = None
        return launched, (self._resolve(pending, read[0]) if read else None)

    def _resolve(self, pending: PendingDecode, tokens: list[int] | None = None) -> list[RequestOutput]:
        """Read ``pending``'s tokens (unless given) and apply them like a synchronous step (sequences that
        ended in the meantime are skipped)."""
        tokens = pending.tokens() if tokens is None else tokens
        live = [
            (seq, t)
            for seq, t in zip(pending.seqs, tokens, strict=True)
            if seq.status == SequenceStatus.RUNNING
        ]
        out = SchedulerOutput([seq for seq, _ in live], [1] * len(live))
        self.scheduler.update(out, [t for _, t in live], time.monotonic())
        return [self._output(seq) for seq in out.seqs]

    # -- ending requests, outputs, counters ---------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` in the scheduler, or before it got there (images not encoded yet)."""
        if self.vision.remove(seq):
            self._end_before_scheduling(seq, reason)
        else:
            self.scheduler.finish(seq, reason)

    def _end_before_scheduling(self, seq: Sequence, reason: str) -> None:
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.image_pixels = seq.image_grid_thw = None

    def _output(self, seq: Sequence, error: str | None = None) -> RequestOutput:
        return self.output_processor.output(seq, self.scheduler.finish, error)

    def _record_step(
        self,
        outputs: list[RequestOutput],
        started: float,
        num_tokens: int,
        num_steps: int,
        ahead: bool = False,
    ) -> None:
        now = time.monotonic()
        finished = [o for o in outputs if o.is_finished]
        stats = self.stats
        self.stats = dataclasses.replace(
            stats,
            num_waiting=len(self.scheduler.waiting) + len(self.vision),
            num_running=len(self.scheduler.running),
            num_blocks_used=self.block_manager.num_used_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=stats.num_steps + num_steps,
            num_steps_ahead=stats.num_steps_ahead + ahead,
            num_finished=stats.num_finished + len(finished),
            num_prompt_tokens=stats.num_prompt_tokens + sum(o.num_prompt_tokens for o in finished),
            num_generation_tokens=stats.num_generation_tokens + sum(len(o.new_token_ids) for o in outputs),
            last_step_time=now if num_steps else stats.last_step_time,
            last_step_duration=now - started if num_steps else stats.last_step_duration,
            last_step_num_tokens=num_tokens if num_steps else stats.last_step_num_tokens,
        )
