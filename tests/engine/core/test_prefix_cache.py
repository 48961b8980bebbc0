"""Prefix KV cache and image-embedding cache in the engine (tiny random checkpoint, CPU): greedy token
ids are identical with the caches on and off, what is found is exactly what should be, and every block
is back to free at the end."""

from __future__ import annotations

import pytest
import torch

from engine.llm_engine import GenerationRequest, LLMEngine, RequestOutput
from engine.model.rope import get_mrope_positions
from tests.engine.test_llm_engine import (
    BLOCK_SIZE,
    greedy,
    make_engine,
    prompt,
    run_to_end,
    tokens,
)
from tests.engine.test_llm_engine import model as model  # noqa: F401 - module fixtures
from tests.engine.test_llm_engine import model_config as model_config  # noqa: F401

OFF = {"enable_prefix_caching": False, "image_cache_mb": 0}


def image_prompt(
    mc, question: list[int], images: list[tuple[torch.Tensor, tuple[int, int, int]]], head=(5, 6)
):
    """[head] + one image block per image + question; uint8 patches of the images; positions."""
    merge_area = mc.vision_config.spatial_merge_size**2
    ids = list(head)
    for _, (t, h, w) in images:
        ids += [mc.image_start_token_id] + [mc.image_token_id] * (t * h * w // merge_area)
        ids += [mc.image_end_token_id]
    ids += question
    grid = torch.tensor([g for _, g in images], dtype=torch.int64)
    positions, delta = get_mrope_positions(ids, grid, mc)
    patches = torch.cat([p for p, _ in images])
    return ids, {
        "image_pixels": patches,
        "image_grid_thw": grid,
        "mrope_positions": positions,
        "mrope_delta": delta,
    }


def image(mc, seed: int, grid=(1, 4, 6)) -> tuple[torch.Tensor, tuple[int, int, int]]:
    num_patches = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_patches, mc.vision_config.patch_dim), generator=g).to(torch.uint8), grid


def serve_one_by_one(ex: LLMEngine, reqs: list[GenerationRequest]) -> list[list[RequestOutput]]:
    return [run_to_end(ex, {0: [req]})[req.request_id] for req in reqs]


def same_with_cache_off(model, mc, reqs_fn, **engine) -> tuple[list, list, LLMEngine]:
    """Serve reqs_fn() one by one with the caches on and off; the tokens must be identical."""
    on = make_engine(model, mc, **engine)
    off = make_engine(model, mc, **{**engine, **OFF})
    outs_on = serve_one_by_one(on, reqs_fn())
    outs_off = serve_one_by_one(off, reqs_fn())
    assert [tokens(o) for o in outs_on] == [tokens(o) for o in outs_off]
    assert all(o[-1].num_cached_tokens == 0 for o in outs_off)
    return outs_on, outs_off, on


def test_same_image_other_questions_skip_vit_and_prefill(model, model_config):
    mc = model_config
    img = image(mc, 1)

    def reqs():
        out = []
        for k, question in enumerate(([7, 8, 9], [10, 11, 12, 13], [7, 8, 9])):
            ids, kw = image_prompt(mc, question, [img])
            out.append(GenerationRequest(f"q{k}", ids, greedy(6), **kw))
        return out

    outs, _, ex = same_with_cache_off(model, mc, reqs)
    ids0, _ = image_prompt(mc, [7, 8, 9], [img])
    common = len(image_prompt(mc, [], [img])[0])  # head + image block: 2 + 1 + 6 + 1 = 10 tokens
    assert [o[-1].num_cached_tokens for o in outs] == [
        0,
        common // BLOCK_SIZE * BLOCK_SIZE,
        (len(ids0) - 1) // BLOCK_SIZE * BLOCK_SIZE,
    ]
    stats = ex.stats()
    # q1's cached prefix (8 tokens) ends inside the image (tokens 3..8): its rows come from the image
    # cache; q2's (12 tokens) holds the whole image: not looked up at all
    assert (stats.num_image_cache_misses, stats.num_image_cache_hits) == (1, 1)
    assert stats.prefix_cache.num_hit_tokens == sum(o[-1].num_cached_tokens for o in outs)


def test_image_met_again_outside_the_prefix_comes_from_the_image_cache(model, model_config):
    mc = model_config
    img = image(mc, 2)

    def reqs():
        a_ids, a = image_prompt(mc, [7, 8], [img], head=(5, 6))
        b_ids, b = image_prompt(mc, [7, 8], [img], head=(9, 9, 9, 9, 9))  # another system prompt
        return [GenerationRequest("a", a_ids, greedy(5), **a), GenerationRequest("b", b_ids, greedy(5), **b)]

    outs, _, ex = same_with_cache_off(model, mc, reqs)
    assert [o[-1].num_cached_tokens for o in outs] == [0, 0]
    stats = ex.stats()
    assert (stats.num_image_cache_misses, stats.num_image_cache_hits) == (1, 1)


def test_two_images_where_only_the_second_changes(model, model_config):
    mc = model_config
    first, second, other = image(mc, 3), image(mc, 4, (1, 2, 2)), image(mc, 5, (1, 2, 2))

    def reqs():
        a_ids, a = image_prompt(mc, [7, 8], [first, second])
        b_ids, b = image_prompt(mc, [7, 8], [first, other])
        return [GenerationRequest("a", a_ids, greedy(5), **a), GenerationRequest("b", b_ids, greedy(5), **b)]

    outs, _, ex = same_with_cache_off(model, mc, reqs)
    second_start = 2 + 1 + 6 + 1 + 1  # head, first image block, start of the second image's tokens
    assert outs[1][-1].num_cached_tokens == second_start // BLOCK_SIZE * BLOCK_SIZE
    stats = ex.stats()
    assert (stats.num_image_cache_misses, stats.num_image_cache_hits) == (3, 1)


def test_conversation_resent_turn_by_turn(model, model_config):
    mc = model_config
    img = image(mc, 6)
    history: list[int] = []
    on = make_engine(model, mc)
    off = make_engine(model, mc, **OFF)
    questions = ([7, 8, 9], [10, 11], [12, 13, 14, 15], [16])
    previous_len = 0
    for turn, question in enumerate(questions):
        ids, kw = image_prompt(mc, history + question, [img])
        results = []
        for ex in (on, off):
            outs = run_to_end(ex, {0: [GenerationRequest(f"t{turn}", ids, greedy(4, ignore_eos=True), **kw)]})
            results.append(outs[f"t{turn}"])
        assert tokens(results[0]) == tokens(results[1])
        if turn:
            # everything up to the previous turn's answer is cached (the answer's own KV included)
            assert results[0][-1].num_cached_tokens >= (previous_len // BLOCK_SIZE) * BLOCK_SIZE
        previous_len = len(ids) + 4 - 1
        history += question + tokens(results[0])


def test_block_boundary_and_fully_cached_prompts(model, model_config):
    mc = model_config

    def reqs():
        base = prompt(11, 12)  # exactly three blocks
        return [
            GenerationRequest("a", base, greedy(4)),
            GenerationRequest("boundary", base + [3, 4, 5], greedy(4)),  # cached part ends on a boundary
            GenerationRequest("full", base, greedy(4)),  # fully cached: the last block is computed again
        ]

    outs, _, _ = same_with_cache_off(model, mc, reqs)
    assert [o[-1].num_cached_tokens for o in outs] == [0, 12, 8]


def test_concurrent_sequences_share_blocks_and_give_them_all_back(model, model_config):
    mc = model_config
    shared = prompt(12, 20)

    def arrivals():
        return {
            0: [GenerationRequest("first", shared + [1, 2], greedy(8, ignore_eos=True))],
            2: [GenerationRequest(f"s{k}", shared + [3 + k], greedy(8, ignore_eos=True)) for k in range(3)],
        }

    on = make_engine(model, mc, max_num_batched_tokens=64)
    seen_shared = []
    original_step = on.step

    def step():
        out = original_step()
        seen_shared.append(max(on.block_manager.ref_counts))
        return out

    on.step = step
    outs_on = run_to_end(on, arrivals())
    outs_off = run_to_end(make_engine(model, mc, max_num_batched_tokens=64, **OFF), arrivals())
    assert {k: tokens(v) for k, v in outs_on.items()} == {k: tokens(v) for k, v in outs_off.items()}
    assert [outs_on[f"s{k}"][-1].num_cached_tokens for k in range(3)] == [20, 20, 20]
    assert max(seen_shared) == 4  # the first 5 blocks were held by all four sequences at once
    assert on.block_manager.ref_counts == [0] * on.block_manager.num_blocks


def test_identical_image_requests_arriving_together_compute_the_prompt_once(model, model_config):
    """Four requests about one new image, added in the same step (several questions at once, or the n
    choices of one request): the image's ViT runs once for the four, and the three later ones wait while
    the first computes the prompt, then map all of it but its last block; tokens as with the caches off."""
    mc = model_config
    ids, extra = image_prompt(mc, [40, 41, 42], [image(mc, 5)])

    def arrivals():
        return {0: [GenerationRequest(f"q{k}", ids, greedy(6, ignore_eos=True), **extra) for k in range(4)]}

    on = make_engine(model, mc, max_num_batched_tokens=256)
    encoded = []
    encode = on.model.encode_images

    def counting(*args, **kwargs):
        rows = encode(*args, **kwargs)
        encoded.append(rows.shape[0])
        return rows

    on.model.encode_images = counting
    try:
        outs_on = run_to_end(on, arrivals())
    finally:
        del on.model.encode_images  # the model is shared with the other engines of the module
    outs_off = run_to_end(make_engine(model, mc, max_num_batched_tokens=256, **OFF), arrivals())
    assert {k: tokens(v) for k, v in outs_on.items()} == {k: tokens(v) for k, v in outs_off.items()}
    image_tokens = ids.count(mc.image_token_id)
    assert encoded == [image_tokens]  # one image's rows, once
    cached = (len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert [outs_on[f"q{k}"][-1].num_cached_tokens for k in range(4)] == [0, cached, cached, cached]
    stats = on.stats()
    assert (stats.num_image_cache_hits, stats.num_image_cache_misses) == (0, 4)
    assert on.block_manager.ref_counts == [0] * on.block_manager.num_blocks


def test_preemption_and_abort_of_sequences_with_shared_blocks(model, model_config):
    mc = model_config
    shared = prompt(13, 16)
    engine = {"num_kv_blocks": 14, "max_model_len": 48, "max_num_batched_tokens": 64}

    def arrivals():
        return {
            0: [GenerationRequest("lead", shared + [1], greedy(20, ignore_eos=True))],
            2: [GenerationRequest(f"f{k}", shared + [2 + k], greedy(20, ignore_eos=True)) for k in range(3)],
        }

    on = make_engine(model, mc, **engine)
    outs_on = run_to_end(on, arrivals())
    assert on.scheduler.num_preemptions > 0
    outs_off = run_to_end(make_engine(model, mc, **engine, **OFF), arrivals())
    assert {k: tokens(v) for k, v in outs_on.items()} == {k: tokens(v) for k, v in outs_off.items()}
    bm = on.block_manager
    assert bm.ref_counts == [0] * bm.num_blocks and bm.num_free_blocks == bm.num_blocks

    # abort one of two sequences sharing a prefix mid-decode: the other goes on, nothing is lost
    on.add_request(GenerationRequest("keep", shared + [7], greedy(10, ignore_eos=True)))
    on.add_request(GenerationRequest("drop", shared + [8], greedy(10, ignore_eos=True)))
    on.step()
    on.step()
    assert bm.ref_counts[on._seqs["keep"].block_table[0]] == 2
    on.abort("drop")
    rest = run_to_end(on)
    assert rest["drop"][-1].finish_reason == "abort" and rest["keep"][-1].finish_reason == "length"
    assert bm.ref_counts == [0] * bm.num_blocks and bm.num_free_blocks == bm.num_blocks


def test_eviction_under_a_small_cache_keeps_tokens_exact(model, model_config):
    mc = model_config
    engine = {"num_kv_blocks": 12, "max_model_len": 40}

    def reqs():
        return [GenerationRequest(f"r{k}", prompt(20 + k % 3, 14) + [k], greedy(5)) for k in range(9)]

    _, _, on = same_with_cache_off(model, mc, reqs, **engine)
    stats = on.block_manager.stats
    assert stats.num_evicted_blocks > 0 and stats.num_hit_tokens > 0


def test_preempted_sequence_whose_image_was_skipped_is_encoded_again(model, model_config):
    """A sequence that skipped the ViT for an image inside its cached prefix loses that prefix when it
    is preempted and its blocks are evicted: it goes back to the vision queue and still gives the same
    tokens."""
    mc = model_config
    img = image(mc, 7)
    engine = {"num_kv_blocks": 12, "max_model_len": 40, "max_num_batched_tokens": 64, "image_cache_mb": 0}
    ids, kw = image_prompt(mc, [7, 8], [img])
    warm = GenerationRequest("warm", ids, greedy(2), **kw)
    ids2, kw2 = image_prompt(mc, [9, 9], [img])

    def arrivals():
        return {
            0: [GenerationRequest("img", ids2, greedy(16, ignore_eos=True), **kw2)],
            1: [
                GenerationRequest(f"t{k}", prompt(30 + k, 12), greedy(16, ignore_eos=True)) for k in range(2)
            ],
        }

    on = make_engine(model, mc, **engine)
    run_to_end(on, {0: [warm]})
    outs_on = run_to_end(on, arrivals())
    assert outs_on["img"][-1].num_cached_tokens > 0 and on.scheduler.num_preemptions > 0
    off = make_engine(model, mc, **{**engine, **OFF})
    outs_off = run_to_end(off, arrivals())
    assert {k: tokens(v) for k, v in outs_on.items()} == {k: tokens(v) for k, v in outs_off.items()}


def test_images_brought_as_the_embeddings_the_engine_holds_need_no_pixels(model, model_config):
    """`held_image_embeds` hands out the embeddings of images the image cache holds; a request that brings
    them (with its grids and hashes, no pixels) gets the tokens of the same request with pixels, and finds
    its blocks in the prefix cache as if the pixels had come."""
    import pytest

    mc = model_config
    first, second = image(mc, 11), image(mc, 12, (1, 2, 2))
    hashes = [b"first-image", b"second-image"]

    def req(rid: str, question: list[int], embeds: torch.Tensor | None = None, **extra) -> GenerationRequest:
        ids, kw = image_prompt(mc, question, [first, second])
        kw["image_hashes"] = hashes
        if embeds is not None:
            kw["image_embeds"], kw["image_pixels"] = embeds, None
        return GenerationRequest(rid, ids, greedy(6), **{**kw, **extra})

    ex = make_engine(model, mc)
    assert ex.held_image_embeds(hashes) is None  # nothing encoded yet
    serve_one_by_one(ex, [req("a", [7, 8, 9])])
    assert ex.held_image_embeds([hashes[0], b"never-seen"]) is None  # all or nothing
    held = ex.held_image_embeds(hashes)
    assert held.shape == (6 + 1, mc.hidden_size)  # both images' rows, one after the other
    (by_embeds,) = serve_one_by_one(ex, [req("b", [10, 11, 12, 13], held)])
    (by_pixels,) = serve_one_by_one(make_engine(model, mc, **OFF), [req("b", [10, 11, 12, 13])])
    assert tokens(by_embeds) == tokens(by_pixels)
    images_end = 2 + (1 + 6 + 1) + (1 + 1 + 1)  # head, both image blocks
    assert by_embeds[-1].num_cached_tokens == images_end // BLOCK_SIZE * BLOCK_SIZE
    stats = ex.stats()
    assert (stats.num_image_cache_misses, stats.num_image_cache_hits) == (2, 2)  # a encoded; b held both
    assert ex.block_manager.num_used_blocks == 0
    for bad, match in [
        (
            req("c", [7], held[:-1]),
            r"^image_grid_thw: \[\[1, 4, 6\], \[1, 2, 2\]\] gives 7 image tokens for 6",
        ),
        (req("c", [7], held, image_hashes=hashes[:1]), r"^image_hash: 1 hashes for 2 images"),
    ]:
        with pytest.raises(ValueError, match=match):
            ex.add_request(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_identical_image_requests_arriving_together_compute_it_once(
    tiny_checkpoint, model_config, enforce_eager
):
    """float32 on CUDA, the vision stream and (unless eager) CUDA graphs: four requests about one new image
    and a text prompt between them, added in one step: the ViT gets the image once; the text prompt runs
    while the three later copies wait, which then map all of the prompt but its last block; tokens equal the
    caches off on the same GPU; every block back."""
    from engine.config import EngineConfig
    from engine.model.decoder import Glm4vModel

    mc = model_config
    model = Glm4vModel.from_pretrained(tiny_checkpoint, "cuda", "float32", mc)
    ids, extra = image_prompt(mc, [40, 41, 42], [image(mc, 5)])

    def arrivals():
        reqs = [GenerationRequest(f"q{k}", ids, greedy(6, ignore_eos=True), **extra) for k in range(4)]
        reqs.insert(2, GenerationRequest("text", prompt(70, 9), greedy(6, ignore_eos=True)))
        return {0: reqs}

    def engine(**more):
        config = EngineConfig(
            block_size=BLOCK_SIZE,
            num_kv_blocks=64,
            max_model_len=256,
            max_num_batched_tokens=256,
            device="cuda",
            async_vision=True,
            **more,
        )
        return LLMEngine(mc, config, model=model, enforce_eager=enforce_eager)

    on = engine()
    assert (on.runner.graphs is None) == enforce_eager
    images = []  # (call, images passed) of every ViT call
    for name in ("encode_images", "start_images"):
        method = getattr(on.runner, name)

        def counting(batch, _method=method, _name=name):
            images.append((_name, len(batch)))
            return _method(batch)

        setattr(on.runner, name, counting)
    outs_on = run_to_end(on, arrivals())
    outs_off = run_to_end(engine(**OFF), arrivals())
    assert {k: tokens(v) for k, v in outs_on.items()} == {k: tokens(v) for k, v in outs_off.items()}
    assert [n for _, n in images] == [1]  # one image, once
    cached = (len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert [outs_on[f"q{k}"][-1].num_cached_tokens for k in range(4)] == [0, cached, cached, cached]
    assert outs_on["text"][-1].num_cached_tokens == 0
    assert on.core.scheduler.num_held_back >= 3
    assert on.block_manager.ref_counts == [0] * on.block_manager.num_blocks
