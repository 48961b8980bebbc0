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
