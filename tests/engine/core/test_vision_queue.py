"""The vision queue of a real engine (tiny checkpoint, CPU): ViT batches stay within the patch budget,
oldest first; images wait while a step's worth of prompt tokens is already queued; a failed ViT forward
ends only its batch's requests, with the error, and the engine serves the rest."""

from __future__ import annotations

from engine.request import GenerationRequest
from tests.engine.test_llm_engine import greedy, image_request, make_engine, prompt, run_to_end
from tests.engine.test_llm_engine import model as model  # noqa: F401
from tests.engine.test_llm_engine import model_config as model_config  # noqa: F401


class RecordingRunner:
    """Wraps the engine's real runner: records each ViT batch's patch count, can fail one on purpose."""

    def __init__(self, runner, fail_on: int | None = None) -> None:
        self.runner, self.fail_on, self.batches = runner, fail_on, []

    def encode_images(self, images):
        self.batches.append(sum(int(grid.prod()) for _, grid in images))
        if self.fail_on == len(self.batches):
            raise RuntimeError("out of memory (on purpose)")
        return self.runner.encode_images(images)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def image_req(mc, request_id: str, grids, seed: int) -> GenerationRequest:
    ids, patches, grid, positions, delta = image_request(mc, request_id, grids, seed=seed)
    return GenerationRequest(
        request_id,
        ids,
        greedy(3),
        image_pixels=patches,
        image_grid_thw=grid,
        mrope_positions=positions,
        mrope_delta=delta,
    )


def test_batches_keep_the_patch_budget_oldest_first(model, model_config):  # noqa: F811
    ex = make_engine(model, model_config, max_num_vision_patches=40, image_cache_mb=0)
    recorder = RecordingRunner(ex.runner)
    ex.core.vision.runner = recorder
    grids = [[(1, 4, 6)], [(1, 4, 4), (1, 2, 6)], [(1, 6, 4)], [(1, 2, 2)]]  # 24, 28, 24, 4 patches
    reqs = [image_req(model_config, f"v{i}", g, seed=i) for i, g in enumerate(grids)]
    outputs = run_to_end(ex, {0: reqs})
    assert recorder.batches == [24, 28, 28]  # 24+28 > 40; then 28 alone; then 24+4
    assert all(outs[-1].finish_reason == "length" for outs in outputs.values())


def test_images_wait_while_a_step_of_prompt_tokens_is_queued(model, model_config):  # noqa: F811
    ex = make_engine(model, model_config, max_num_batched_tokens=16, max_num_seqs=1)
    recorder = RecordingRunner(ex.runner)
    ex.core.vision.runner = recorder
    ex.add_request(GenerationRequest("long", prompt(1, 20), greedy(8, ignore_eos=True)))
    ex.add_request(GenerationRequest("queued", prompt(2, 20), greedy(2, ignore_eos=True)))
    ex.step()  # "long" prefills; "queued" (20 tokens >= 16) waits for a slot
    ex.add_request(image_req(model_config, "img", [(1, 4, 4)], seed=5))
    ex.step()
    assert recorder.batches == [] and [s.seq_id for s in ex.core.vision.waiting] == ["img"]
    run_to_end(ex)
    assert recorder.batches == [16]


def test_a_failed_vit_forward_ends_its_batch_only(model, model_config):  # noqa: F811
    ex = make_engine(model, model_config, max_num_vision_patches=24, image_cache_mb=0)
    ex.core.vision.runner = RecordingRunner(ex.runner, fail_on=1)
    reqs = [
        image_req(model_config, "bad", [(1, 4, 6)], seed=0),
        image_req(model_config, "ok", [(1, 4, 4)], seed=1),
    ]
    reqs.append(GenerationRequest("text", prompt(3, 6), greedy(3, ignore_eos=True)))
    outputs = run_to_end(ex, {0: reqs})
    bad = outputs["bad"][-1]
    assert bad.finish_reason == "abort" and bad.error == "vision encoder error: out of memory (on purpose)"
    assert [o.finish_reason for o in (outputs["ok"][-1], outputs["text"][-1])] == ["length", "length"]
    assert sum(len(o.new_token_ids) for o in outputs["ok"]) == 3
    assert not ex.core.vision.waiting and ex.core.vision.inflight is None
    assert ex.stats().num_waiting == 0 and not ex.core.scheduler.running


class SplitRecorder:
    """Wraps the engine's real runner: records (engine step, blocks asked for, whether that step's decoder
    forward had run) of each split ViT step and each whole batch's patch count; can fail the n-th split step
    on purpose. ``virtual_depth``: a tower of that many blocks (the tiny one has 2): the real blocks run
    when that many have been asked for. Pass it the engine to see its forwards."""

    def __init__(
        self, runner, fail_on: int | None = None, virtual_depth: int | None = None, engine=None
    ) -> None:
        self.runner, self.fail_on, self.virtual_depth = runner, fail_on, virtual_depth
        self.step, self.advances, self.whole = 0, [], []
        self.forward_step = -1  # the last engine step whose decoder forward ran
        self.asked: dict[int, int] = {}  # blocks asked for, by pass
        if engine is not None:
            execute = engine.runner.execute
            engine.runner.execute = lambda out: setattr(self, "forward_step", self.step) or execute(out)

    def encode_images(self, images):
        self.whole.append(sum(int(grid.prod()) for _, grid in images))
        return self.runner.encode_images(images)

    def advance_images(self, vision_pass, num_blocks):
        self.advances.append((self.step, num_blocks, self.forward_step == self.step))
        if self.fail_on == len(self.advances):
            raise RuntimeError("out of memory (on purpose)")
        if self.virtual_depth is None:
            return self.runner.advance_images(vision_pass, num_blocks)
        asked = self.asked[id(vision_pass)] = self.asked.get(id(vision_pass), 0) + num_blocks
        if asked < self.virtual_depth:
            return False
        return self.runner.advance_images(vision_pass, 1 << 20)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def run_recorded(ex, recorder, arrivals):
    """`run_to_end`, keeping ``recorder.step`` at the engine step and counting each request's tokens per step."""
    arrivals, outputs, per_step = dict(arrivals), {}, []
    while arrivals or ex.has_unfinished():
        for req in arrivals.pop(recorder.step, []):
            ex.add_request(req)
        counts = {}
        for out in ex.step():
            outputs.setdefault(out.request_id, []).append(out)
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
        per_step.append(counts)
        recorder.step += 1
        assert recorder.step < 1000
    assert ex.block_manager.num_used_blocks == 0
    return outputs, per_step


def image_with_reference(ex, mc, request_id: str, max_tokens: int, seed: int):
    """(a one-image request, its reference greedy tokens)."""
    from tests.engine.test_llm_engine import reference_greedy

    ids, patches, grid, positions, delta = image_request(mc, request_id, [(1, 4, 6)], seed=seed)
    embeds = ex.model.encode_images(ex.runner.patch_normalizer(patches, grid), grid)
    request = GenerationRequest(
        request_id, ids, greedy(max_tokens), image_pixels=patches, image_grid_thw=grid,
        mrope_positions=positions, mrope_delta=delta,
    )  # fmt: skip
    return request, reference_greedy(ex.model, mc, ids, max_tokens, embeds, positions, delta)


def test_the_vit_is_split_across_steps_while_others_decode(model, model_config):  # noqa: F811
    """Over ``vision_patches_per_step``, a ViT batch runs a block per step beside a decoding request, which
    gets a token in each of those steps; every token equals the reference's (the split forward is exact).
    The first block runs in the step the batch starts, before its decoder forward; each later one is
    queued right after the forward of the step before its own (`VisionQueue.advance_ahead`), and the
    request's prefill starts in the step of its last block, as when each block ran in its own step. An
    image that arrives while nothing decodes runs whole."""
    from tests.engine.test_llm_engine import reference_greedy, tokens

    mc = model_config
    for depth in (mc.vision_config.depth, 4):
        ex = make_engine(model, mc, vision_patches_per_step=8, image_cache_mb=0)
        virtual = None if depth == mc.vision_config.depth else depth
        recorder = SplitRecorder(ex.runner, virtual_depth=virtual, engine=ex)
        ex.core.vision.runner = recorder
        ex.core.vision.depth = depth
        image, image_ref = image_with_reference(ex, mc, "img", 5, seed=4)
        text = GenerationRequest("text", prompt(3, 6), greedy(12, ignore_eos=True))
        outputs, per_step = run_recorded(ex, recorder, {0: [text], 2: [image]})
        assert depth > 1 and recorder.whole == []
        # 24 patches > 8: one block a step, the block of step s + 1 after step s's forward
        assert recorder.advances == [(2, 1, False)] + [(2 + k, 1, True) for k in range(depth - 1)]
        assert all(per_step[s].get("text") == 1 for s in range(2, 2 + depth))  # the decode went on each step
        assert next(s for s, counts in enumerate(per_step) if "img" in counts) == 2 + depth - 1
        assert tokens(outputs["text"]) == reference_greedy(model, mc, prompt(3, 6), 12, ignore_eos=True)
        assert tokens(outputs["img"]) == image_ref

    alone, alone_ref = image_with_reference(ex, mc, "alone", 4, seed=5)
    outputs, _ = run_recorded(ex, recorder, {recorder.step: [alone]})
    assert recorder.whole == [24] and len(recorder.advances) == depth
    assert tokens(outputs["alone"]) == alone_ref


def test_a_split_vit_forward_finishes_at_once_when_decodes_end(model, model_config):  # noqa: F811
    """The decoding request ends in the step the forward starts (its first block, and the next queued after
    that step's decoder forward): the rest of a 4-block forward runs in the next step, at once."""
    from tests.engine.test_llm_engine import tokens

    mc = model_config
    ex = make_engine(model, mc, vision_patches_per_step=8, image_cache_mb=0)
    recorder = SplitRecorder(ex.runner, virtual_depth=4, engine=ex)
    ex.core.vision.runner = recorder
    ex.core.vision.depth = 4
    image, image_ref = image_with_reference(ex, mc, "img", 4, seed=6)
    text = GenerationRequest(
        "text", prompt(4, 6), greedy(3, ignore_eos=True)
    )  # prefill + 2 decodes: steps 0-2
    outputs, _ = run_recorded(ex, recorder, {0: [text], 2: [image]})
    assert recorder.advances == [(2, 1, False), (2, 1, True), (3, 4, False)]
    assert tokens(outputs["img"]) == image_ref


def test_a_failed_or_aborted_split_forward_ends_only_its_requests(model, model_config):  # noqa: F811
    """A split forward that raises ends its batch's requests with the error; one whose request is aborted
    mid-way runs out without it; the decoding request is unaffected, and no block or queue entry is left."""
    from tests.engine.test_llm_engine import reference_greedy

    mc = model_config
    # the third block (queued after step 3's forward) fails; or the request is aborted after step 2
    for fail_on, abort in ((3, False), (None, True)):
        ex = make_engine(model, mc, vision_patches_per_step=8, image_cache_mb=0)
        recorder = SplitRecorder(ex.runner, fail_on=fail_on, virtual_depth=4, engine=ex)
        ex.core.vision.runner = recorder
        ex.core.vision.depth = 4
        image, _ = image_with_reference(ex, mc, "img", 4, seed=7)
        text = GenerationRequest("text", prompt(5, 6), greedy(10, ignore_eos=True))
        ex.add_request(text)
        outputs = {}
        for step in range(3):  # the text prefills and decodes; then the image's first block
            if step == 2:
                ex.add_request(image)
            for out in ex.step():
                outputs.setdefault(out.request_id, []).append(out)
            recorder.step += 1
        assert ex.core.vision.inflight is not None and ex.core.vision.inflight.vision_pass is not None
        if abort:
            ex.abort("img")
        rest, _ = run_recorded(ex, recorder, {})
        for rid, outs in rest.items():
            outputs.setdefault(rid, []).extend(outs)
        last = outputs["img"][-1]
        if abort:
            assert last.finish_reason == "abort" and last.error is None
        else:
            assert last.finish_reason == "abort"
            assert last.error == "vision encoder error: out of memory (on purpose)"
        assert sum(len(o.new_token_ids) for o in outputs["img"]) == 0
        if not abort:  # the failing block was the one queued after step 3's forward
            assert recorder.advances == [(2, 1, False), (2, 1, True), (3, 1, True)]
        ref = reference_greedy(model, mc, prompt(5, 6), 10, ignore_eos=True)
        assert [t for o in outputs["text"] for t in o.new_token_ids] == ref
        assert ex.core.vision.is_idle and ex.stats().num_waiting == 0 and not ex.core.scheduler.running


def test_while_others_decode_a_vit_batch_keeps_to_the_step_budget(model, model_config):  # noqa: F811
    """Images that fit ``vision_patches_per_step`` one by one but not together run whole in separate
    steps while a request decodes; with nothing decoding they share one forward."""
    from tests.engine.test_llm_engine import tokens

    for decoding, expected in ((True, [24, 16]), (False, [40])):
        outputs, recorder = two_images(model, model_config, SplitRecorder, 24, decoding)
        assert recorder.whole == expected and recorder.advances == []
        assert all(len(tokens(outs)) > 0 for outs in outputs.values())


def two_images(model, mc, recorder_class, patches_per_step: int, decoding: bool):  # noqa: F811
    """(outputs, recorder) of two image requests (24 and 16 patches) arriving together, while a text
    request decodes or with nothing else running, through a ``recorder_class`` around the real runner."""
    ex = make_engine(model, mc, vision_patches_per_step=patches_per_step, image_cache_mb=0)
    recorder = recorder_class(ex.runner)
    ex.core.vision.runner = recorder
    images = [image_req(mc, "a", [(1, 4, 6)], seed=8), image_req(mc, "b", [(1, 4, 4)], seed=9)]
    arrivals = {0: images}
    if decoding:
        arrivals = {0: [GenerationRequest("text", prompt(6, 6), greedy(8, ignore_eos=True))], 2: images}
    outputs, _ = run_recorded(ex, recorder, arrivals)
    return outputs, recorder


class StandInVisionStream(SplitRecorder):
    """The real runner as if it had a vision stream (CPU has none): each batch's forward runs at once and
    its stand-in event has passed."""

    vision_stream = "stand-in"

    class Passed:
        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            pass

    def encode_images(self, images):
        embeds, _ = super().encode_images(images)
        return embeds, self.Passed()

    def wait_vision(self, embeds, ready) -> None:
        pass


def test_on_the_vision_stream_batches_keep_to_the_step_budget_while_others_decode(model, model_config):  # noqa: F811
    """With a vision stream nothing is split by blocks, but while a request decodes a batch still holds at
    most ``vision_patches_per_step`` patches (whole requests), so that batch layouts repeat; with nothing
    decoding the images share one forward. Tokens equal the engine's without the stream."""
    from tests.engine.test_llm_engine import tokens

    for decoding, expected in ((True, [24, 16]), (False, [40])):
        results = []
        for recorder_class in (SplitRecorder, StandInVisionStream):
            outputs, recorder = two_images(model, model_config, recorder_class, 8, decoding)
            results.append({k: tokens(v) for k, v in outputs.items()})
            if recorder_class is StandInVisionStream:
                assert recorder.whole == expected and recorder.advances == []
        assert results[0] == results[1]
