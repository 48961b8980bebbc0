"""Our GLM-4.6V model equals transformers' Glm4vForConditionalGeneration on the tiny checkpoint (float32).

ViT features, first-step logits, and greedy token ids through the paged KV cache (chunked prefill mixed
with decode of other sequences) against `generate()`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from engine.kernels.attention import AttentionMetadata
from engine.model.decoder import Glm4vModel
from engine.model.rope import get_mrope_positions

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Glm4vModel:
    return Glm4vModel.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


@dataclass
class Prompt:
    input_ids: list[int]
    grid_thw: torch.Tensor | None  # [n, 3]
    pixel_values: torch.Tensor | None  # [N, 1176]


def make_prompt(model: Glm4vModel, grids: list[tuple[int, int, int]], seed: int) -> Prompt:
    """[text] + (BOI, placeholders, EOI, text) per image; random text ids below the special tokens."""
    config = model.config
    rng = random.Random(seed)
    low_special = min(config.eos_token_ids + (config.image_start_token_id, config.image_token_id))

    def text(n: int) -> list[int]:
        return [rng.randrange(30, low_special) for _ in range(n)]

    ids = text(5)
    for grid in grids:
        ids += [config.image_start_token_id] + [config.image_token_id] * config.num_image_tokens(grid)
        ids += [config.image_end_token_id] + text(3)
    if not grids:
        return Prompt(ids, None, None)
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), config.vision_config.patch_dim, generator=gen)
    return Prompt(ids, grid_thw, pixel_values)


PROMPTS = {"text_only": [], "one_image": [(1, 4, 6)], "two_images": [(1, 4, 6), (1, 6, 4)]}


def hf_inputs(model: Glm4vModel, prompt: Prompt) -> dict:
    input_ids = torch.tensor([prompt.input_ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if prompt.grid_thw is not None:
        inputs["pixel_values"] = prompt.pixel_values
        inputs["image_grid_thw"] = prompt.grid_thw
        inputs["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    return inputs


def test_vision_encoder_equals_transformers(hf_model, model):
    prompt = make_prompt(model, [(1, 4, 6), (1, 6, 4), (1, 2, 2)], seed=1)
    with torch.no_grad():
        expected = hf_model.model.visual(prompt.pixel_values, grid_thw=prompt.grid_thw).pooler_output
    got = model.visual.encode(prompt.pixel_values, prompt.grid_thw)
    assert got.shape == (prompt.pixel_values.shape[0] // 4, model.config.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Packing images together changes nothing: each image alone gives its own rows.
    first = model.visual.encode(prompt.pixel_values[:24], prompt.grid_thw[:1])
    torch.testing.assert_close(first, got[:6], atol=1e-5, rtol=1e-5)


def test_vision_layouts_are_kept_per_grid_and_follow_the_position_table(hf_model, model, monkeypatch):
    """Position embeddings and rotary tables are computed once per grid (a two-frame grid reuses its
    frame's); a changed position table is seen at once; the cache stays under its patch budget."""
    import engine.model.vision

    visual = model.visual
    visual._layouts.clear()
    prompt = make_prompt(model, [(1, 4, 6), (1, 4, 6)], seed=2)
    with torch.no_grad():
        expected = hf_model.model.visual(prompt.pixel_values, grid_thw=prompt.grid_thw).pooler_output
        got = visual.encode(prompt.pixel_values, prompt.grid_thw)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert [key[:2] for key in visual._layouts] == [(4, 6)]
        # the same 48 patches as one two-frame grid: one attention block per frame, same rows
        frames = visual.encode(prompt.pixel_values, torch.tensor([[2, 4, 6]]))
        torch.testing.assert_close(frames, got, atol=1e-6, rtol=1e-6)
        assert len(visual._layouts) == 1
        table = visual.embeddings.position_embedding.weight
        hf_table = hf_model.model.visual.embeddings.position_embedding.weight
        saved = table.clone()
        try:
            table.mul_(2.0)
            hf_table.mul_(2.0)
            changed = visual.encode(prompt.pixel_values, prompt.grid_thw)
            expected = hf_model.model.visual(prompt.pixel_values, grid_thw=prompt.grid_thw).pooler_output
            torch.testing.assert_close(changed, expected, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(changed, got)
        finally:
            table.copy_(saved)
            hf_table.copy_(saved)
        monkeypatch.setattr(engine.model.vision, "LAYOUT_CACHE_PATCHES", 40)
        visual.encode(make_prompt(model, [(1, 6, 4)], seed=3).pixel_values, torch.tensor([[1, 6, 4]]))
        assert [key[:2] for key in visual._layouts] == [(6, 4)]  # 24 + 24 > 40: older grids dropped


def test_vision_encoder_rejects_bad_shapes(model):
    with pytest.raises(ValueError, match="pixel_values"):
        model.visual.encode(torch.zeros(10, 1176), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="grid_thw"):
        model.visual.encode(torch.zeros(15, 1176), torch.tensor([[1, 3, 5]]))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prefill_logits_equal_transformers(hf_model, model, name):
    prompt = make_prompt(model, PROMPTS[name], seed=7)
    with torch.no_grad():
        expected = hf_model(**hf_inputs(model, prompt)).logits[0]  # [L, vocab]
    image_embeds = None
    if prompt.grid_thw is not None:
        image_embeds = model.encode_images(prompt.pixel_values, prompt.grid_thw)
    ids = torch.tensor(prompt.input_ids)
    positions, _ = get_mrope_positions(ids, prompt.grid_thw, model.config)
    block_size = 4
    num_blocks = (len(ids) + block_size - 1) // block_size
    kv_caches = model.allocate_kv_caches(num_blocks + 1, block_size)
    attn = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(1, num_blocks + 1))], block_size)
    hidden = model(ids, positions, attn, kv_caches, model.get_input_embeddings(ids, image_embeds))
    torch.testing.assert_close(model.compute_logits(hidden), expected, atol=1e-4, rtol=1e-4)


@dataclass
class PagedSeq:
    token_ids: list[int]
    num_prompt_tokens: int
    positions: torch.Tensor  # [3, prompt_len]
    delta: int
    image_embeds: torch.Tensor | None  # [num_image_tokens, hidden]
    chunk_size: int
    block_table: list[int]
    num_computed: int = 0


def greedy_paged(
    model: Glm4vModel, prompts: list[Prompt], max_new_tokens: int, chunk_sizes: list[int], block_size: int = 4
) -> list[list[int]]:
    """Greedy decode of all prompts together: chunked prefill, then one token per step, one batch per step.

    Images of all prompts are encoded in one packed ViT call. Blocks are handed out shuffled as sequences
    grow. Decode position of token i is i + delta.
    """
    config = model.config
    grids = [p.grid_thw for p in prompts if p.grid_thw is not None]
    all_embeds = None
    if grids:
        pixel_values = torch.cat([p.pixel_values for p in prompts if p.pixel_values is not None])
        all_embeds = model.encode_images(pixel_values, torch.cat(grids))
    seqs, image_row = [], 0
    for prompt, chunk_size in zip(prompts, chunk_sizes, strict=True):
        positions, delta = get_mrope_positions(prompt.input_ids, prompt.grid_thw, config)
        num_image = sum(1 for t in prompt.input_ids if t == config.image_token_id)
        embeds = None if all_embeds is None else all_embeds[image_row : image_row + num_image]
        image_row += num_image
        seqs.append(
            PagedSeq(list(prompt.input_ids), len(prompt.input_ids), positions, delta, embeds, chunk_size, [])
        )

    max_len = max(len(p.input_ids) for p in prompts) + max_new_tokens
    num_blocks = len(prompts) * (max_len // block_size + 1) + 1
    free_blocks = list(range(1, num_blocks))
    random.Random(0).shuffle(free_blocks)
    kv_caches = model.allocate_kv_caches(num_blocks, block_size)

    while any(len(s.token_ids) - s.num_prompt_tokens < max_new_tokens for s in seqs):
        batch = [s for s in seqs if len(s.token_ids) - s.num_prompt_tokens < max_new_tokens]
        ids, positions, image_rows, query_lens, seq_lens = [], [], [], [], []
        for s in batch:
            start = s.num_computed
            end = min(len(s.token_ids), start + s.chunk_size)
            while len(s.block_table) * block_size < end:
                s.block_table.append(free_blocks.pop())
            chunk = s.token_ids[start:end]
            ids += chunk
            prompt_end = min(end, s.num_prompt_tokens)
            if start < prompt_end:
                positions.append(s.positions[:, start:prompt_end])
                if s.image_embeds is not None:
                    before = sum(1 for t in s.token_ids[:start] if t == config.image_token_id)
                    inside = sum(1 for t in chunk if t == config.image_token_id)
                    image_rows.append(s.image_embeds[before : before + inside])
            if end > s.num_prompt_tokens:
                first = max(start, s.num_prompt_tokens)
                positions.append(torch.arange(first, end).add(s.delta).expand(3, -1))
            query_lens.append(end - start)
            seq_lens.append(end)
        device = model.device
        input_ids = torch.tensor(ids, device=device)
        image_embeds = torch.cat(image_rows) if image_rows else None
        attn = AttentionMetadata.build(
            query_lens, seq_lens, [s.block_table for s in batch], block_size, device
        )
        input_embeds = model.get_input_embeddings(input_ids, image_embeds)
        hidden = model(input_ids, torch.cat(positions, dim=1).to(device), attn, kv_caches, input_embeds)
        row = 0
        for s, n, end in zip(batch, query_lens, seq_lens, strict=True):
            row += n
            s.num_computed = end
            if end == len(s.token_ids):
                s.token_ids.append(int(model.compute_logits(hidden[row - 1 : row]).argmax(-1)))
    return [s.token_ids[s.num_prompt_tokens :] for s in seqs]


def hf_greedy(hf_model, model: Glm4vModel, prompt: Prompt) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            **hf_inputs(model, prompt), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, top_k=None, top_p=None
        )
    return out[0, len(prompt.input_ids) :].tolist()


def assert_same_greedy(ours: list[int], expected: list[int], eos_ids: tuple[int, ...]) -> None:
    """generate() may stop early at an eos; up to there the ids must be identical."""
    assert ours[: len(expected)] == expected
    if len(expected) < MAX_NEW_TOKENS:
        assert expected[-1] in eos_ids


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_decode_equals_generate(hf_model, model, name):
    prompt = make_prompt(model, PROMPTS[name], seed=11)
    expected = hf_greedy(hf_model, model, prompt)
    (ours,) = greedy_paged(model, [prompt], MAX_NEW_TOKENS, chunk_sizes=[len(prompt.input_ids)])
    assert_same_greedy(ours, expected, model.config.eos_token_ids)


def test_batched_chunked_greedy_equals_generate(hf_model, model):
    """All three prompts in one batch per step; prefill chunks of 5, 7 and 9 overlap other seqs' decode."""
    prompts = [make_prompt(model, PROMPTS[name], seed=20 + i) for i, name in enumerate(PROMPTS)]
    outputs = greedy_paged(model, prompts, MAX_NEW_TOKENS, chunk_sizes=[5, 7, 9])
    for prompt, ours in zip(prompts, outputs, strict=True):
        assert_same_greedy(ours, hf_greedy(hf_model, model, prompt), model.config.eos_token_ids)
