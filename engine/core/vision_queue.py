"""Encoder work, budgeted: requests whose images need ViT embeddings before their prefill.

Each request first maps its cached prefix (`BlockManager.match_prefix`): images wholly inside it need no
embeddings. The others come from the image cache by hash, else from one packed ViT forward over a batch of
requests (at most ``max_num_vision_patches`` patches, oldest first), which encodes an image several
requests of the batch bring (the same hash) once. A batch is formed only while the
prefill queue holds less than one step of tokens, so images are encoded just ahead of their prefill and
decodes are not held up by encoding far ahead. With the runner's vision stream the forward runs beside the
decode steps; its batch joins the scheduler once its event has passed; while sequences decode, a batch
holds at most ``patches_per_step`` patches there too (whole requests), so that batch layouts, and their
CUDA graphs, repeat.

Without it, the forward runs in the engine step, ahead of the decoder's, so every decoding stream waits
for it. While sequences decode, a batch therefore holds at most ``patches_per_step`` patches (whole
requests: one request over it forms a batch alone), and a batch over it is split by blocks across steps:
each step runs as many blocks as ``patches_per_step`` patches through the whole tower cost (at least one),
and the batch joins the scheduler in the step its last block ran. After the first, a step's blocks are
queued at the end of the step before, once its decoder forward has given its tokens (``advance_ahead``): the
GPU runs them while the host finishes that step and prepares this one. While nothing decodes, batches take up
to ``max_num_vision_patches`` and run whole (a split forward's rest runs at once).

Stepping thread only."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from engine.core.block_manager import BlockManager
from engine.core.image_cache import ImageCache
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.model.vision import VisionPass

logger = logging.getLogger("glm-engine")


@dataclass
class VisionBatch:
    """Requests whose images one ViT forward encodes: each one's plan (image index -> rows at hand, or
    None until ``embeds`` is split) and the (request, image index) jobs in ``embeds`` order."""

    plans: list[tuple[Sequence, dict[int, torch.Tensor | None]]]
    jobs: list[tuple[Sequence, int]]
    copies: list[tuple[Sequence, int, int]] = dataclasses.field(default_factory=list)
    """(request, image index, job index): an image a job of the batch encodes too (the same hash)."""
    embeds: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # recorded on the vision stream after the forward (CUDA)
    vision_pass: VisionPass | None = None  # a forward split across steps, until its last block
    ahead: bool = False  # the coming step's blocks already ran (`VisionQueue.advance_ahead`)


class VisionQueue:
    def __init__(
        self,
        runner,
        scheduler: Scheduler,
        block_manager: BlockManager,
        image_cache: ImageCache,
        max_num_batched_tokens: int,
        max_num_vision_patches: int,
        hidden_size: int,
        patches_per_step: int = 0,
        depth: int = 1,
    ) -> None:
        """``patches_per_step``: ViT work per step while others decode, in patches through the whole
        tower (``depth`` blocks); 0: each batch in one step."""
        self.runner = runner
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.image_cache = image_cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_vision_patches = max_num_vision_patches
        self.hidden_size = hidden_size
        self.patches_per_step, self.depth = patches_per_step, depth
        self.waiting: list[Sequence] = []  # images not encoded yet, FIFO
        self.inflight: VisionBatch | None = None

    def __len__(self) -> int:
        """Requests waiting for their embeddings (queued or in the launched batch)."""
        return len(self.waiting) + (len(self.inflight.plans) if self.inflight is not None else 0)

    @property
    def is_idle(self) -> bool:
        return not self.waiting and self.inflight is None

    def add(self, seq: Sequence, first: bool = False) -> None:
        self.waiting.insert(0, seq) if first else self.waiting.append(seq)

    def remove(self, seq: Sequence) -> bool:
        """Drop ``seq`` if it is here (queued or in the launched batch, whose result it then skips)."""
        inflight = self.inflight
        if not any(s is seq for s in self.waiting) and not (
            inflight is not None and any(s is seq for s, _ in inflight.plans)
        ):
            return False
        self.waiting = [s for s in self.waiting if s is not seq]
        return True

    def drain(self) -> list[Sequence]:
        """Every request here, queued or launched; the queue is empty after."""
        inflight, self.inflight = self.inflight, None
        seqs = self.waiting + ([s for s, _ in inflight.plans] if inflight is not None else [])
        self.waiting = []
        return seqs

    def step(self) -> list[tuple[Sequence, str]]:
        """Hand the requests whose embeddings are ready to the scheduler and launch the next batch; returns
        the requests a failed forward ended, with the error."""
        split = self.inflight is not None and self.inflight.vision_pass is not None
        failed = self._collect()
        if not self.waiting or self.inflight is not None or split:  # one split step's blocks at most
            return failed
        queued = sum(len(s) - s.num_computed_tokens for s in self.scheduler.waiting)
        if queued >= self.max_num_batched_tokens:
            return failed
        batch, num_patches = [], 0
        limit = self.max_num_vision_patches
        if self.patches_per_step > 0 and self.scheduler.running:
            # while others decode, a batch keeps to the step's budget (or is one request): in the step, so
            # that the step stays short; on the vision stream, so that batch layouts repeat (each new
            # layout's graph capture waits for the whole GPU)
            limit = min(limit, self.patches_per_step)
        for seq in self.waiting:
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            needed = self._images_to_embed(seq)
            n = sum(int(seq.image_grid_thw[i].prod()) for i in needed if not self._has_embeds(seq, i))
            if batch and num_patches + n > limit:
                break
            batch.append((seq, needed))
            num_patches += n
        self.waiting = self.waiting[len(batch) :]
        plans = [(seq, self._lookup_embeds(seq, needed)) for seq, needed in batch]
        jobs, copies, by_hash = [], [], {}
        for seq, plan in plans:
            for i, rows in plan.items():
                if rows is not None:
                    continue
                image_hash = seq.image_spans[i][2]
                if image_hash is not None and image_hash in by_hash:  # the same image: encoded once
                    copies.append((seq, i, by_hash[image_hash]))
                    continue
                if image_hash is not None:
                    by_hash[image_hash] = len(jobs)
                jobs.append((seq, i))
        num_patches = sum(int(seq.image_grid_thw[i].prod()) for seq, i in jobs)
        vision = VisionBatch(plans, jobs, copies=copies)
        try:
            if jobs:
                images = []
                for seq, i in jobs:
                    start, end = seq.image_input_offsets[i]
                    image = (seq.image_pixels[start:end], seq.image_grid_thw[i : i + 1])
                    sizes = seq.image_source_sizes
                    images.append(image if sizes is None else (*image, sizes[i]))
                if self._budgeted() and num_patches > self.patches_per_step:
                    vision.vision_pass = self.runner.start_images(images)
                    self.inflight = vision
                    return failed + self._collect()
                vision.embeds, vision.ready = self.runner.encode_images(images)
        except Exception as exc:  # these requests end; the engine keeps serving the others
            return failed + self._fail(vision, exc)
        if vision.ready is not None:
            self.inflight = vision
            return failed
        return failed + self._finish(vision)

    def advance_ahead(self) -> list[tuple[Sequence, str]]:
        """Run the coming step's blocks of a split forward now, right after this step's forward: their
        kernels queue behind it and run while the host applies this step's tokens and prepares the next
        step, which then only collects them. Returns the requests a failed forward ended, with the error."""
        vision = self.inflight
        if vision is None or vision.vision_pass is None or vision.ahead or not self._budgeted():
            return []
        try:
            self._advance(vision)
        except Exception as exc:
            self.inflight = None
            return self._fail(vision, exc)
        vision.ahead = True
        return []

    def _budgeted(self) -> bool:
        """Whether this step's ViT work keeps to ``patches_per_step`` (sequences decode, and the forward
        would run in their step: no vision stream)."""
        return (
            self.runner.vision_stream is None and self.patches_per_step > 0 and bool(self.scheduler.running)
        )

    def _advance(self, vision: VisionBatch) -> bool:
        """Run this step's blocks of a split forward; whether its embeddings are done."""
        vision_pass = vision.vision_pass
        blocks = self.depth
        if self.scheduler.running:  # while nothing decodes, nobody waits for the rest
            blocks = self.depth * self.patches_per_step // vision_pass.num_patches
        if not self.runner.advance_images(vision_pass, max(1, blocks)):
            return False
        vision.embeds, vision.vision_pass = vision_pass.out, None
        return True

    def _collect(self) -> list[tuple[Sequence, str]]:
        """Hand the launched batch to the scheduler once its stream has passed its event."""
        vision = self.inflight
        if vision is None:
            return []
        if vision.vision_pass is not None or vision.ahead:
            try:
                if vision.ahead:  # this step's blocks ran at the end of the last step
                    vision.ahead = False
                    # with nothing decoding any more, the rest runs now (as `_advance` does)
                    done = vision.vision_pass is None or (
                        not self.scheduler.running and self._advance(vision)
                    )
                else:
                    done = self._advance(vision)
                if not done:
                    return []
            except Exception as exc:
                self.inflight = None
                return self._fail(vision, exc)
            self.inflight = None
            return self._finish(vision)
        if not self.scheduler.running and not self.scheduler.waiting:
            vision.ready.synchronize()  # nothing else to run: wait here rather than spin
        elif not vision.ready.query():
            return []
        self.inflight = None
        self.runner.wait_vision(vision.embeds, vision.ready)
        return self._finish(vision)

    def _finish(self, vision: VisionBatch) -> list[tuple[Sequence, str]]:
        """Split the batch's ViT output per image (into the image cache), give each request its
        embeddings and hand it to the scheduler (requests ended meanwhile are skipped)."""
        try:
            offset = 0
            by_seq = {id(seq): plan for seq, plan in vision.plans}
            job_rows = []
            for seq, i in vision.jobs:
                start, end, image_hash = seq.image_spans[i]
                rows = vision.embeds[offset : offset + end - start]
                offset += end - start
                by_seq[id(seq)][i] = rows
                job_rows.append(rows)
                self.image_cache.put(image_hash, rows)
            for seq, i, job in vision.copies:
                by_seq[id(seq)][i] = job_rows[job]
        except Exception as exc:
            return self._fail(vision, exc)
        for seq, plan in vision.plans:
            if seq.is_finished:
                continue
            self._assemble_embeds(seq, plan)
            self.scheduler.add(seq)
        return []

    def _fail(self, vision: VisionBatch, exc: Exception) -> list[tuple[Sequence, str]]:
        logger.exception("[glm-engine] vision encoder failed; aborting %d requests", len(vision.plans))
        failed = []
        for seq, _ in vision.plans:
            if seq.is_finished:
                continue
            self.block_manager.free(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            seq.image_pixels = seq.image_grid_thw = None
            failed.append((seq, f"vision encoder error: {exc}"))
        return failed

    @staticmethod
    def _images_to_embed(seq: Sequence) -> list[int]:
        """Indices of the images of ``seq`` with tokens past its computed (cached) prefix."""
        return [i for i, (_, end, _) in enumerate(seq.image_spans) if end > seq.num_computed_tokens]

    def _has_embeds(self, seq: Sequence, i: int) -> bool:
        """Whether ``seq.image_embeds`` already holds valid rows for image ``i`` (or the cache does)."""
        start, _, image_hash = seq.image_spans[i]
        if seq.image_embeds is not None and start >= seq.missing_image_end:
            return True
        return image_hash in self.image_cache

    def _lookup_embeds(self, seq: Sequence, needed: list[int]) -> dict[int, torch.Tensor | None]:
        """Image index -> embedding rows already at hand (earlier rows of ``seq`` or the image cache), or
        None (to encode)."""
        plan: dict[int, torch.Tensor | None] = {}
        row = 0
        for i, (start, end, image_hash) in enumerate(seq.image_spans):
            rows = None
            if i in needed:
                if seq.image_embeds is not None and start >= seq.missing_image_end:
                    rows = seq.image_embeds[row : row + end - start]
                else:
                    rows = self.image_cache.get(image_hash)
                plan[i] = rows
            row += end - start
        return plan

    def _assemble_embeds(self, seq: Sequence, plan: dict[int, torch.Tensor | None]) -> None:
        """Set ``seq.image_embeds`` from ``plan``; images not in it (inside the cached prefix) get unwritten
        rows, and ``missing_image_end`` marks them. The images' inputs are dropped once every image has
        its rows (kept otherwise: a preemption may need them encoded after all)."""
        if not plan:
            seq.image_embeds = None
            seq.missing_image_end = seq.image_spans[-1][1]
            return
        parts, missing_end = [], 0
        for i, (start, end, _) in enumerate(seq.image_spans):
            rows = plan.get(i)
            if rows is None:
                first = next(iter(plan.values()))
                rows = torch.empty(end - start, self.hidden_size, dtype=first.dtype, device=first.device)
                missing_end = end
            parts.append(rows)
        seq.image_embeds = parts[0] if len(parts) == 1 else torch.cat(parts)
        seq.missing_image_end = missing_end
        if not missing_end:
            seq.image_pixels = seq.image_grid_thw = None
