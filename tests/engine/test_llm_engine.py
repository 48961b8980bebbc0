"""LLMEngine on the tiny random checkpoint: our batched, paged, preempting engine gives the tokens of a
plain full-recompute loop (and of transformers generate()), whatever the batch and the arrival order."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.kernels.attention import AttentionMetadata
from engine.llm_engine import GenerationRequest, LLMEngine, RequestOutput
from engine.model.decoder import Glm4vModel
from engine.model.rope import get_mrope_positions
from engine.sample.sampler import SamplingParams

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def model_config(tiny_checkpoint) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def model(tiny_checkpoint, model_config) -> Glm4vModel:
    return Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "float32", model_config)


def make_engine(model, model_config, tokenizer=None, **engine) -> LLMEngine:
    engine = {"block_size": BLOCK_SIZE, "num_kv_blocks": 256, "max_model_len": 256, **engine}
    return LLMEngine(model_config, EngineConfig(**engine), model=model, tokenizer=tokenizer)


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, 800, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


@torch.inference_mode()
def reference_greedy(
    model,
    model_config,
    prompt_ids,
    max_tokens,
    image_embeds=None,
    mrope_positions=None,
    delta=0,
    ignore_eos=False,
):
    """Full recompute of the whole sequence every token, one sequence, no scheduler, no paging reuse."""
    device = model.device
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        n = len(ids)
        num_blocks = -(-n // BLOCK_SIZE)
        kv_caches = model.allocate_kv_caches(num_blocks, BLOCK_SIZE, device, torch.float32)
        attn = AttentionMetadata.build([n], [n], [list(range(num_blocks))], BLOCK_SIZE, device)
        positions = torch.arange(n).expand(3, -1).clone()
        if mrope_positions is not None:
            positions[:, : len(prompt_ids)] = mrope_positions
            positions[:, len(prompt_ids) :] += delta
        input_ids = torch.tensor(ids, device=device)
        embeds = None
        if image_embeds is not None:  # only prompt image tokens take image rows
            num_prompt = len(prompt_ids)
            embeds = torch.cat(
                [
                    model.get_input_embeddings(input_ids[:num_prompt], image_embeds),
                    model.language_model.embed_tokens(input_ids[num_prompt:]),
                ]
            )
        hidden = model(input_ids, positions.to(device), attn, kv_caches, embeds)
        token_id = int(model.compute_logits(hidden[-1:]).argmax(-1))
        ids.append(token_id)
        if token_id in model_config.eos_token_ids and not ignore_eos:
            break
    return ids[len(prompt_ids) :]


def run_to_end(
    ex: LLMEngine,
    arrivals: dict[int, list[GenerationRequest]] | None = None,
    before_step: Callable[[int], object] | None = None,
) -> dict[str, list[RequestOutput]]:
    """Step until done; ``arrivals[k]`` are added before step k, then ``before_step(k)`` is called (an
    abort, a mark). Returns every output per request."""
    arrivals = dict(arrivals or {})
    outputs: dict[str, list[RequestOutput]] = {}
    step = 0
    while arrivals or ex.has_unfinished():
        for req in arrivals.pop(step, []):
            ex.add_request(req)
        if before_step is not None:
            before_step(step)
        for out in ex.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 1000
    assert ex.block_manager.num_used_blocks == 0
    return outputs


def tokens(outs: list[RequestOutput]) -> list[int]:
    assert [o.finish_reason is not None for o in outs] == [False] * (len(outs) - 1) + [True]
    return [t for o in outs for t in o.new_token_ids]


def test_greedy_matches_reference_loop_and_transformers(model, model_config, hf_model):
    ex = make_engine(model, model_config)
    prompts = {"a": prompt(0, 5), "b": prompt(1, 13), "c": prompt(2, 1)}
    for request_id, ids in prompts.items():
        outs = run_to_end(ex, {0: [GenerationRequest(request_id, ids, greedy(10))]})[request_id]
        expected = reference_greedy(model, model_config, ids, 10)
        assert tokens(outs) == expected
        assert outs[-1].finish_reason == ("stop" if len(expected) < 10 else "length")
        hf = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=list(model_config.eos_token_ids),
            pad_token_id=model_config.pad_token_id,
        )[0, len(ids) :].tolist()
        assert expected == hf


def test_staggered_arrivals_and_chunked_prefill_give_tokens_of_each_alone(model, model_config):
    ex = make_engine(model, model_config, max_num_batched_tokens=16, max_num_seqs=6)
    ex.warmup()
    assert ex.stats().num_finished == 1 and ex.block_manager.num_used_blocks == 0
    reqs = [GenerationRequest(f"r{i}", prompt(10 + i, 3 + 4 * i), greedy(6 + i % 3)) for i in range(9)]
    arrivals = {0: reqs[:2], 1: [reqs[2]], 3: reqs[3:5], 4: [reqs[5]], 7: reqs[6:8], 9: [reqs[8]]}
    outputs = run_to_end(ex, arrivals)
    for req in reqs:
        assert tokens(outputs[req.request_id]) == reference_greedy(
            model, model_config, req.prompt_token_ids, req.sampling.max_tokens
        ), req.request_id
    stats = ex.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_blocks_used, stats.num_finished) == (0, 0, 0, 10)
    assert stats.num_preemptions == 0 and stats.num_steps > 0 and stats.last_step_time is not None


def test_preemption_by_recompute_gives_same_tokens(model, model_config):
    ex = make_engine(model, model_config, num_kv_blocks=10, max_num_batched_tokens=32)  # 40 token slots
    reqs = [GenerationRequest(f"p{i}", prompt(30 + i, 6 + i), greedy(12, ignore_eos=True)) for i in range(4)]
    outputs = run_to_end(ex, {0: reqs})
    assert ex.stats().num_preemptions > 0
    for req in reqs:
        outs = outputs[req.request_id]
        assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 12
        assert tokens(outs) == reference_greedy(
            model, model_config, req.prompt_token_ids, 12, ignore_eos=True
        )


def test_image_embeds_cut_by_chunks(model, model_config):
    mc = model_config
    ids = [5, 6, mc.image_start_token_id] + [mc.image_token_id] * 6 + [mc.image_end_token_id, 7, 8, 9]
    positions, delta = get_mrope_positions(ids, torch.tensor([[1, 4, 6]]), mc)
    embeds = torch.randn(6, mc.hidden_size, generator=torch.Generator().manual_seed(0))
    req = GenerationRequest(
        "img", ids, greedy(8), image_embeds=embeds, mrope_positions=positions, mrope_delta=delta
    )
    ex = make_engine(model, mc, max_num_batched_tokens=5)  # chunks [0,5) [5,10) [10,13)
    outs = run_to_end(ex, {0: [req]})["img"]
    assert tokens(outs) == reference_greedy(model, mc, ids, 8, embeds, positions, delta)
    assert delta != 0


def image_request(mc, request_id: str, grids: list[tuple[int, int, int]], seed: int):
    """A prompt with one image block per grid, uint8 patches for them, and the M-RoPE positions."""
    merge_area = mc.vision_config.spatial_merge_size**2
    ids = [5, 6]
    for t, h, w in grids:
        ids += [mc.image_start_token_id] + [mc.image_token_id] * (t * h * w // merge_area)
        ids += [mc.image_end_token_id]
    ids += [7, 8]
    grid = torch.tensor(grids, dtype=torch.int64)
    num_patches = int(grid.prod(dim=1).sum())
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 256, (num_patches, mc.vision_config.patch_dim), generator=generator)
    positions, delta = get_mrope_positions(ids, grid, mc)
    return ids, patches.to(torch.uint8), grid, positions, delta


def test_image_pixels_encoded_in_the_engine_match_precomputed_embeds(model, model_config):
    """uint8 patches: normalized like the image processor, encoded in packed ViT forwards across
    requests (budget of 2 images' patches per forward), same tokens as embeds encoded up front."""
    from engine.runner.model_runner import CLIP_MEAN, CLIP_STD

    mc = model_config
    grids = [[(1, 4, 6)], [(1, 4, 4), (1, 2, 6)], [(1, 6, 4)]]
    reqs, references = [], {}
    for i, g in enumerate(grids):
        ids, patches, grid, positions, delta = image_request(mc, f"p{i}", g, seed=i)
        per_channel = mc.vision_config.patch_dim // 3
        mean = torch.tensor(CLIP_MEAN).repeat_interleave(per_channel)
        std = torch.tensor(CLIP_STD).repeat_interleave(per_channel)
        pixels = (patches.float() * torch.tensor(1 / 255, dtype=torch.float32) - mean) / std
        embeds = model.encode_images(pixels, grid)
        references[f"p{i}"] = reference_greedy(model, mc, ids, 6, embeds, positions, delta)
        reqs.append(
            GenerationRequest(
                f"p{i}",
                ids,
                greedy(6),
                image_pixels=patches,
                image_grid_thw=grid,
                mrope_positions=positions,
                mrope_delta=delta,
            )
        )
    reqs.append(GenerationRequest("text", prompt(9, 5), greedy(6)))
    references["text"] = reference_greedy(model, mc, prompt(9, 5), 6)
    ex = make_engine(model, mc, max_num_vision_patches=40, max_num_batched_tokens=8)
    outputs = run_to_end(ex, {0: reqs[:2], 1: reqs[2:]})
    assert {rid: tokens(outs) for rid, outs in outputs.items()} == references
    assert ex.stats().num_finished == 4 and not ex.core.vision.waiting


def test_flat_rgb_images_patchified_in_the_engine_give_the_same_tokens(model, model_config):
    """The llm receives the resized RGB images flat: patchified on the device, same tokens as patches."""
    mc = model_config
    ex = make_engine(model, mc)
    grids = [(1, 4, 6), (1, 2, 2)]
    ids, _, grid, positions, delta = image_request(mc, "rgb", grids, seed=5)
    patch = mc.vision_config.patch_size
    rgb = torch.cat(
        [
            torch.randint(0, 256, (h * patch * w * patch * 3,), generator=torch.Generator().manual_seed(h))
            for _, h, w in grids
        ]
    ).to(torch.uint8)
    patches = ex.runner.patch_normalizer.patchify(rgb, grid)
    assert patches.shape == (28, mc.vision_config.patch_dim) and patches.dtype == torch.uint8
    common = {"image_grid_thw": grid, "mrope_positions": positions, "mrope_delta": delta}
    outputs = run_to_end(
        ex,
        {
            0: [
                GenerationRequest("flat", ids, greedy(6), image_pixels=rgb, **common),
                GenerationRequest("rows", ids, greedy(6), image_pixels=patches, **common),
            ]
        },
    )
    assert tokens(outputs["flat"]) == tokens(outputs["rows"])
    bad = [
        ({"image_pixels": rgb[:-1]}, r"^image_pixels: 16463 bytes of RGB, image_grid_thw .* needs 16464"),
        ({"image_pixels": rgb.to(torch.int16)}, r"^image_pixels: flat RGB images must be uint8"),
        (
            {"image_grid_thw": torch.tensor([[2, 4, 6], [1, 2, 2]])},
            r"^image_grid_thw: flat RGB images are stills",
        ),
    ]
    for change, match in bad:
        kwargs = {**common, "image_pixels": rgb, **change}
        with pytest.raises(ValueError, match=match):
            ex.add_request(GenerationRequest("bad", ids, greedy(2), **kwargs))


def test_images_at_their_source_size_are_resized_in_the_engine_like_pil(model, model_config):
    """Flat RGB images sent at another size than their grid's, with image_source_sizes: the engine resizes
    them as PIL's bicubic resize does, so the tokens are those of the images PIL resized first."""
    from PIL import Image

    mc = model_config
    ex = make_engine(model, mc)
    grids = [(1, 4, 6), (1, 2, 2)]
    sources = [(70, 45), (20, 33)]  # (height, width) of each image as decoded
    ids, _, grid, positions, delta = image_request(mc, "rgb", grids, seed=5)
    patch = mc.vision_config.patch_size
    rng = np.random.default_rng(3)
    decoded = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sources]
    resized = [
        np.asarray(Image.fromarray(rgb).resize((gw * patch, gh * patch), Image.Resampling.BICUBIC))
        for rgb, (_, gh, gw) in zip(decoded, grids, strict=True)
    ]
    common = {"image_grid_thw": grid, "mrope_positions": positions, "mrope_delta": delta}
    source = torch.from_numpy(np.concatenate([rgb.reshape(-1) for rgb in decoded]))
    sizes = torch.tensor(sources)
    outputs = run_to_end(
        ex,
        {
            0: [
                GenerationRequest(
                    "source", ids, greedy(6), image_pixels=source, image_source_sizes=sizes, **common
                ),
                GenerationRequest(
                    "pil",
                    ids,
                    greedy(6),
                    image_pixels=torch.from_numpy(np.concatenate([rgb.reshape(-1) for rgb in resized])),
                    **common,
                ),
            ]
        },
    )
    assert tokens(outputs["source"]) == tokens(outputs["pil"])
    bad = [
        (
            {"image_pixels": source[:-1]},
            r"^image_pixels: 11429 bytes of RGB, image_source_sizes .* need 11430",
        ),
        (
            {"image_source_sizes": sizes[:1]},
            r"^image_source_sizes: shape \(1, 2\) torch.int64 must be \[2, 2\]",
        ),
        (
            {"image_source_sizes": torch.tensor([[70, 45], [0, 33]])},
            r"^image_source_sizes: .* must all be >= 1",
        ),
    ]
    for change, match in bad:
        kwargs = {**common, "image_pixels": source, "image_source_sizes": sizes, **change}
        with pytest.raises(ValueError, match=match):
            ex.add_request(GenerationRequest("bad", ids, greedy(2), **kwargs))


def test_image_pixels_rejected_with_the_field_named(model, model_config):
    mc = model_config
    ex = make_engine(model, mc)
    ids, patches, grid, positions, delta = image_request(mc, "x", [(1, 4, 4)], seed=0)

    def req(**kwargs):
        base = {"image_pixels": patches, "image_grid_thw": grid, "mrope_positions": positions}
        return GenerationRequest("x", ids, greedy(2), **{**base, **kwargs})

    cases = [
        (req(image_grid_thw=None), r"^image_grid_thw: image_pixels and image_grid_thw go together"),
        (req(image_pixels=None), r"^image_pixels: image_pixels and image_grid_thw go together"),
        (req(image_grid_thw=torch.tensor([[1, 3, 4]])), r"^image_grid_thw: \[1, 3, 4\] must have"),
        (req(image_pixels=patches[:-1]), r"^image_pixels: shape \(15, 1176\) must be \[16, 1176\]"),
        (req(image_grid_thw=torch.tensor([[1, 4, 8]])), r"^image_pixels: shape \(16, 1176\) must be \[32,"),
        (req(image_pixels=patches.to(torch.int32)), r"^image_pixels: dtype torch.int32 must be uint8"),
        (req(image_embeds=torch.zeros(4, mc.hidden_size)), r"^image_pixels: give image_pixels .* not both"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            ex.add_request(bad)
    # aborted while its image waits for the ViT: ends with "abort", nothing left behind
    ex.add_request(req())
    ex.add_request(GenerationRequest("big", prompt(1, 40), greedy(2, ignore_eos=True)))
    ex.abort("x")
    first = {o.request_id: o.finish_reason for o in ex.step()}
    assert first["x"] == "abort"
    run_to_end(ex)
    assert not ex.core.vision.waiting and ex.block_manager.num_used_blocks == 0


def test_seeded_sampling_independent_of_batch(model, model_config):
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = tokens(
        run_to_end(make_engine(model, model_config), {0: [GenerationRequest("s", prompt(3, 7), sp)]})["s"]
    )
    others = [
        GenerationRequest(f"o{i}", prompt(40 + i, 5), SamplingParams(max_tokens=5, temperature=1.0))
        for i in range(3)
    ]
    outputs = run_to_end(
        make_engine(model, model_config),
        {0: others[:2], 2: [GenerationRequest("s", prompt(3, 7), sp)], 3: others[2:]},
    )
    assert tokens(outputs["s"]) == alone


def test_abort_frees_blocks_within_next_step(model, model_config):
    ex = make_engine(model, model_config)
    ex.add_request(GenerationRequest("keep", prompt(1, 6), greedy(5, ignore_eos=True)))
    ex.add_request(GenerationRequest("drop", prompt(2, 9), greedy(50, ignore_eos=True)))
    ex.add_request(GenerationRequest("never", prompt(3, 4), greedy(5)))
    ex.abort("never")  # aborted before its first step
    first = ex.step()
    assert {o.request_id: o.finish_reason for o in first} == {"never": "abort", "keep": None, "drop": None}
    ex.step()
    used_before = ex.block_manager.num_used_blocks
    ex.abort("drop")
    outs = {o.request_id: o for o in ex.step()}
    assert outs["drop"].finish_reason == "abort" and outs["drop"].new_token_ids == []
    assert outs["drop"].num_output_tokens == 2
    assert ex.block_manager.num_used_blocks < used_before
    ex.abort("unknown")
    run_to_end(ex)
    assert ex.stats().num_finished == 3


def test_add_request_rejects_bad_requests(model, model_config):
    ex = make_engine(model, model_config, num_kv_blocks=8, max_model_len=64)  # capped at 32 tokens
    assert ex.max_model_len == 32
    cases = [
        (
            GenerationRequest("a", prompt(0, 33), greedy(1)),
            r"^prompt_token_ids: .*33 tokens, over the limit of 32",
        ),
        (GenerationRequest("a", [], greedy(1)), r"^prompt_token_ids: the prompt is empty"),
        (
            GenerationRequest("a", prompt(0, 30), greedy(3)),
            r"^max_tokens: prompt 30 \+ max_tokens 3 = 33 tokens, over the limit of 32 tokens \(max_model_len, "
            r"capped at the KV cache capacity\)$",
        ),
        (
            GenerationRequest("a", prompt(0, 10), SamplingParams(max_tokens=40, min_tokens=40)),
            r"^max_tokens: prompt 10 \+ max_tokens 40 = 50 tokens, over the limit of 32",
        ),
        (GenerationRequest("a", [1, 99999], greedy(1)), r"^prompt_token_ids: token id 99999"),
        (GenerationRequest("a", [1], SamplingParams(top_p=0.0)), r"^top_p: "),
        (
            GenerationRequest("a", [model_config.image_token_id], greedy(1)),
            r"^image_embeds: 0 rows for 1 image",
        ),
        (
            GenerationRequest("a", [1, 2], greedy(1), mrope_positions=torch.zeros(3, 3, dtype=torch.long)),
            r"^mrope_positions",
        ),
        (GenerationRequest("a", [1], greedy(1), stop_strings=("x",)), r"^stop_strings: "),
        (GenerationRequest("", [1], greedy(1)), r"^request_id: "),
    ]
    for req, match in cases:
        with pytest.raises(ValueError, match=match):
            ex.add_request(req)
    ex.add_request(GenerationRequest("dup", [1], greedy(1)))
    with pytest.raises(ValueError, match=r"^request_id: 'dup' is already in use"):
        ex.add_request(GenerationRequest("dup", [1], greedy(1)))
    run_to_end(ex)


def test_text_stop_strings_and_from_engine_dir(tiny_checkpoint, tmp_path, model):
    engine_dir = tmp_path / "engine"
    shutil.copytree(tiny_checkpoint, engine_dir)
    engine = {"block_size": BLOCK_SIZE, "num_kv_blocks": 64, "max_model_len": 128, "dtype": "float32"}
    (engine_dir / "engine_config.json").write_text(
        json.dumps({"engine": engine, "build": {"dtype": "float32"}})
    )
    ex = LLMEngine.from_engine_dir(engine_dir, max_num_seqs=4)
    assert ex.engine_config.max_num_seqs == 4 and ex.block_manager.num_blocks == 64
    ids = prompt(5, 6)
    outs = run_to_end(ex, {0: [GenerationRequest("t", ids, greedy(16, ignore_eos=True))]})["t"]
    full_text = "".join(o.text + o.reasoning for o in outs)
    all_ids = tokens(outs)
    assert full_text == ex.tokenizer.decode(all_ids, skip_special_tokens=True) and len(full_text) > 6
    stop = full_text[3:6]
    outs = run_to_end(
        ex, {0: [GenerationRequest("t", ids, greedy(16, ignore_eos=True), stop_strings=(stop,))]}
    )["t"]
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.text + o.reasoning for o in outs) == full_text[: full_text.find(stop)]
    assert tokens(outs) == all_ids[: len(tokens(outs))]


def test_loop_thread_generate_and_callback(model, model_config):
    ex = make_engine(model, model_config)
    seen: list[RequestOutput] = []
    ex.start(seen.extend)
    reqs = [GenerationRequest(f"g{i}", prompt(50 + i, 4 + i), greedy(6, ignore_eos=True)) for i in range(3)]

    async def collect(req):
        return [o async for o in ex.generate(req)]

    async def main():
        return await asyncio.gather(*(collect(r) for r in reqs))

    results = asyncio.run(main())
    for req, outs in zip(reqs, results, strict=True):
        assert tokens(outs) == reference_greedy(model, model_config, req.prompt_token_ids, 6, ignore_eos=True)
        assert outs[-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in seen) == 18
    assert ex.stats().is_loop_running
    ex.add_request(GenerationRequest("left", prompt(9, 4), greedy(100, ignore_eos=True)))
    ex.stop(timeout=10)
    assert not ex.stats().is_loop_running and not ex.has_unfinished()
    assert seen[-1].request_id == "left" and seen[-1].finish_reason in ("abort", "length", "stop")
    assert ex.block_manager.num_used_blocks == 0


def test_loop_builds_the_vit_attention_plans_while_idle(model, model_config):
    """With vision_attention "auto" the image lengths the ViT met wait for their cuDNN plan until the loop
    has no request; then it builds them, one per pass, and sleeps. Tokens are unchanged."""
    mc = model_config
    ex = make_engine(model, mc, vision_attention="auto")
    kernels = model.visual.attention_kernels
    assert kernels.choice == "auto" and not kernels.pending
    ids, patches, grid, positions, delta = image_request(mc, "img", [(1, 4, 6), (1, 2, 2)], seed=3)
    req = GenerationRequest(
        "img",
        ids,
        greedy(4),
        image_pixels=patches,
        image_grid_thw=grid,
        mrope_positions=positions,
        mrope_delta=delta,
    )
    outs = run_to_end(ex, {0: [req]})["img"]
    assert list(kernels.pending) == [24, 4] and not kernels.planned  # stepped by the caller: no loop yet
    ex.start()
    deadline = time.monotonic() + 10
    while kernels.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kernels.planned == {24, 4} and not kernels.pending

    async def again():
        return [o async for o in ex.generate(dataclasses.replace(req, request_id="again"))]

    assert tokens(asyncio.run(again())) == tokens(outs)
    ex.stop(timeout=10)
    assert not ex.stats().is_loop_running


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_decode_graphs_give_reference_tokens(tiny_checkpoint, model_config, enforce_eager):
    model = Glm4vModel.from_pretrained(tiny_checkpoint, "cuda", "float32", model_config)
    engine = {"block_size": BLOCK_SIZE, "max_model_len": 256, "device": "cuda", "max_num_seqs": 6}
    ex = LLMEngine(
        model_config, EngineConfig(num_kv_blocks=10, **engine), model=model, enforce_eager=enforce_eager
    )
    assert (ex.runner.graphs is None) == enforce_eager
    reqs = [GenerationRequest(f"p{i}", prompt(30 + i, 6 + i), greedy(12, ignore_eos=True)) for i in range(4)]
    outputs = run_to_end(ex, {0: reqs[:3], 2: reqs[3:]})
    assert ex.stats().num_preemptions > 0
    for req in reqs:
        expected = reference_greedy(model, model_config, req.prompt_token_ids, 12, ignore_eos=True)
        assert tokens(outputs[req.request_id]) == expected
    if not enforce_eager:
        assert ex.runner.graphs.graphs  # some steps replayed a graph
        ex.runner.capture_cuda_graphs()
        assert len(ex.runner.graphs.graphs) == len(ex.runner.graphs.batch_buckets) * len(
            ex.runner.graphs.width_buckets
        )
        outputs = run_to_end(ex, {0: reqs})
        for req in reqs:
            assert tokens(outputs[req.request_id]) == reference_greedy(
                model, model_config, req.prompt_token_ids, 12, ignore_eos=True
            )


def test_add_and_abort_from_other_threads_while_loop_runs(model, model_config):
    ex = make_engine(model, model_config, max_num_seqs=4)
    done = threading.Event()
    outputs: dict[str, list[RequestOutput]] = {}

    def collect(batch: list[RequestOutput]) -> None:
        for o in batch:
            outputs.setdefault(o.request_id, []).append(o)
        if sum(1 for outs in outputs.values() if outs[-1].is_finished) == 9:
            done.set()

    ex.start(collect)
    reqs = [GenerationRequest(f"t{i}", prompt(60 + i, 3 + i), greedy(5, ignore_eos=True)) for i in range(8)]
    threads = [
        threading.Thread(target=lambda rs=reqs[i::4]: [ex.add_request(r) for r in rs]) for i in range(4)
    ]
    for t in threads:
        t.start()
    ex.add_request(GenerationRequest("long", prompt(70, 4), greedy(200, ignore_eos=True)))
    ex.abort("long")
    for t in threads:
        t.join()
    assert done.wait(timeout=60)
    ex.stop(timeout=10)
    assert outputs["long"][-1].finish_reason == "abort"
    for req in reqs:
        assert tokens(outputs[req.request_id]) == reference_greedy(
            model, model_config, req.prompt_token_ids, 5, ignore_eos=True
        )
    assert ex.block_manager.num_used_blocks == 0 and ex.stats().num_finished == 9


def test_leaving_generate_early_aborts(model, model_config):
    ex = make_engine(model, model_config)

    async def first_two():
        seen = []
        async for out in ex.generate(GenerationRequest("early", prompt(8, 5), greedy(200, ignore_eos=True))):
            seen.append(out)
            if len(seen) == 2:
                break
        return seen

    seen = asyncio.run(first_two())
    assert [len(o.new_token_ids) for o in seen] == [1, 1]
    for _ in range(100):
        if not ex.has_unfinished():
            break
        time.sleep(0.05)
    assert not ex.has_unfinished() and ex.block_manager.num_used_blocks == 0
    ex.stop(timeout=10)


@pytest.mark.gpu
def test_cuda_vision_stream_runs_beside_decodes_and_gives_reference_tokens(tiny_checkpoint, model_config):
    """float32 on CUDA: images arriving while other requests decode are encoded on the vision stream; the
    requests join once their embeddings are ready and every token equals the reference loop's. A request
    aborted while its ViT runs ends with "abort" and leaves no block behind."""
    from engine.runner.model_runner import CLIP_MEAN, CLIP_STD

    mc = model_config
    model = Glm4vModel.from_pretrained(tiny_checkpoint, "cuda", "float32", mc)
    engine = {
        "block_size": BLOCK_SIZE,
        "max_model_len": 256,
        "device": "cuda",
        "num_kv_blocks": 64,
        "async_vision": True,
    }
    ex = LLMEngine(mc, EngineConfig(**engine), model=model)
    assert ex.runner.vision_stream is not None
    per_channel = mc.vision_config.patch_dim // 3
    mean = torch.tensor(CLIP_MEAN).repeat_interleave(per_channel)
    std = torch.tensor(CLIP_STD).repeat_interleave(per_channel)
    text = [GenerationRequest(f"t{i}", prompt(50 + i, 7), greedy(16, ignore_eos=True)) for i in range(2)]
    images, references = [], {}
    for i, grids in enumerate([[(1, 4, 6)], [(1, 6, 4), (1, 2, 2)]]):
        ids, patches, grid, positions, delta = image_request(mc, f"v{i}", grids, seed=20 + i)
        pixels = (patches.float() * torch.tensor(1 / 255, dtype=torch.float32) - mean) / std
        embeds = model.encode_images(pixels.cuda(), grid)
        references[f"v{i}"] = reference_greedy(model, mc, ids, 6, embeds, positions, delta)
        images.append(
            GenerationRequest(
                f"v{i}", ids, greedy(6), image_pixels=patches, image_grid_thw=grid,
                mrope_positions=positions, mrope_delta=delta,
            )
        )  # fmt: skip
    outputs = run_to_end(ex, {0: text, 3: images[:1], 5: images[1:]})
    for req in text:
        assert tokens(outputs[req.request_id]) == reference_greedy(
            model, mc, req.prompt_token_ids, 16, ignore_eos=True
        )
    assert {k: tokens(outputs[k]) for k in references} == references

    ids, patches, grid, positions, delta = image_request(mc, "gone", [(1, 4, 4)], seed=40)
    ex.add_request(GenerationRequest("busy", prompt(60, 5), greedy(30, ignore_eos=True)))
    ex.step()
    assert not patches.is_pinned()
    ex.add_request(
        GenerationRequest(
            "gone", ids, greedy(4), image_pixels=patches, image_grid_thw=grid, mrope_positions=positions,
            mrope_delta=delta,
        )
    )  # fmt: skip
    # the engine holds a pinned copy: its copy to the GPU does not wait for the steps queued before it
    held = ex._seqs["gone"].image_pixels
    assert held.is_pinned() and torch.equal(held, patches)
    ex.step()
    ex.abort("gone")
    rest = run_to_end(ex)
    assert rest["gone"][-1].finish_reason == "abort" and rest["busy"][-1].finish_reason == "length"
    assert ex.core.vision.inflight is None and ex.block_manager.num_used_blocks == 0


def test_stats_count_full_collections_and_the_loop_runs_on_a_frozen_heap(model, model_config):
    """Every full garbage collection of the process is counted and timed; starting the loop collects
    once and freezes what the process holds (a full collection then skips it), stopping hands it back."""
    import gc

    ex = make_engine(model, model_config)
    before = ex.stats()
    gc.collect()
    after = ex.stats()
    assert after.num_gc_full_collections == before.num_gc_full_collections + 1
    assert after.gc_full_seconds > before.gc_full_seconds
    assert after.num_gc_frozen_objects == 0
    ex.start()
    try:
        frozen = ex.stats().num_gc_frozen_objects
        # what start() froze; frozen objects that die later (another test's thread still ending) leave the
        # permanent generation, so the count now may be a few lower, never higher (nothing else freezes)
        assert frozen > 10_000 and 0 <= frozen - gc.get_freeze_count() < 1_000
        assert ex.stats().num_gc_full_collections == after.num_gc_full_collections + 1
        req = GenerationRequest("after freeze", prompt(9, 4), greedy(5, ignore_eos=True))

        async def collect():
            return [o async for o in ex.generate(req)]

        outs = asyncio.run(collect())
        expected = reference_greedy(model, model_config, req.prompt_token_ids, 5, ignore_eos=True)
        assert tokens(outs) == expected
    finally:
        ex.stop(30)
    assert gc.get_freeze_count() == 0 and ex.stats().num_gc_frozen_objects == 0
