"""M-RoPE positions and rotary application against transformers' Glm4v; config rope formats."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.glm4v import modeling_glm4v as hf_glm4v

from engine.config import ModelConfig
from engine.model.rope import (
    MRotaryEmbedding,
    apply_interleaved_rotary,
    apply_rotary_half,
    get_mrope_positions,
    vision_patch_positions,
    vision_rotary_cos_sin,
)


@pytest.fixture(scope="module")
def model_config(tiny_checkpoint) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint)


def build_prompt(config: ModelConfig, layout: list) -> list[int]:
    """layout: ints = that many text tokens; (t, h, w) = an image block BOI + placeholders + EOI."""
    ids: list[int] = []
    for part in layout:
        if isinstance(part, int):
            ids.extend(100 + (i % 50) for i in range(part))
        else:
            ids.append(config.image_start_token_id)
            ids.extend([config.image_token_id] * config.num_image_tokens(part))
            ids.append(config.image_end_token_id)
    return ids


LAYOUTS = [
    [7],
    [2, (1, 4, 6), 3],
    [(1, 2, 2)],
    [3, (1, 4, 6), 2, (1, 6, 4), 1],
    [1, (1, 2, 8), (1, 8, 2), 4, (1, 4, 4)],
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_mrope_positions_equal_transformers_get_rope_index(hf_model, model_config, layout):
    ids = build_prompt(model_config, layout)
    grids = [list(p) for p in layout if not isinstance(p, int)]
    grid_thw = torch.tensor(grids, dtype=torch.int64).view(-1, 3) if grids else None
    positions, delta = get_mrope_positions(ids, grid_thw, model_config)

    input_ids = torch.tensor([ids])
    mm_token_type_ids = (input_ids == model_config.image_token_id).int()
    if grid_thw is None:
        expected = torch.arange(len(ids)).expand(3, -1)
        expected_delta = 0
    else:
        hf_positions, hf_delta = hf_model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=grid_thw
        )
        expected, expected_delta = hf_positions[:, 0], int(hf_delta)
    assert positions.dtype == torch.int64
    assert torch.equal(positions, expected)
    assert delta == expected_delta


def test_mrope_worked_example(model_config):
    t, img = 50, model_config.image_token_id
    boi, eoi = model_config.image_start_token_id, model_config.image_end_token_id
    ids = [t, t, boi] + [img] * 6 + [eoi, t, t, t]
    positions, delta = get_mrope_positions(ids, torch.tensor([[1, 4, 6]]), model_config)
    assert positions.tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9],
    ]
    assert delta == -3


def test_mrope_rejects_mismatched_image_tokens(model_config):
    ids = [1, model_config.image_token_id, 2]
    with pytest.raises(ValueError, match="input_ids: 1 image tokens"):
        get_mrope_positions(ids, torch.tensor([[1, 4, 6]]), model_config)


def test_decoder_rotary_equals_transformers(hf_model, model_config):
    torch.manual_seed(0)
    num_tokens, head_dim = 9, model_config.head_dim
    positions = torch.randint(0, 300, (3, num_tokens))
    q = torch.randn(num_tokens, model_config.num_attention_heads, head_dim)
    k = torch.randn(num_tokens, model_config.num_key_value_heads, head_dim)

    hf_cos, hf_sin = hf_model.model.language_model.rotary_emb(q, positions[:, None, :])  # [1, T, rotary]
    hf_q, hf_k = hf_glm4v.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin
    )  # [1, heads, T, head_dim]

    cos, sin = MRotaryEmbedding(model_config)(positions)
    assert cos.shape == (num_tokens, model_config.rotary_dim // 2)
    torch.testing.assert_close(apply_interleaved_rotary(q, cos, sin), hf_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_interleaved_rotary(k, cos, sin), hf_k[0].transpose(0, 1))


def test_vision_rotary_equals_transformers(hf_model, model_config):
    vision = model_config.vision_config
    grid_thw = torch.tensor([[1, 4, 6], [1, 2, 2]])
    hw = vision_patch_positions(grid_thw, vision.spatial_merge_size)
    hf_hw = hf_glm4v.get_vision_position_ids(grid_thw, vision.spatial_merge_size)
    assert torch.equal(hw, hf_hw)

    torch.manual_seed(0)
    q = torch.randn(hw.shape[0], vision.num_heads, vision.head_dim)
    hf_cos, hf_sin = hf_model.model.visual.rotary_pos_emb(q, hf_hw)
    hf_q, _ = hf_glm4v.apply_rotary_pos_emb_vision(q, q, hf_cos, hf_sin)
    cos, sin = vision_rotary_cos_sin(hw, vision.head_dim, vision.rope_theta)
    torch.testing.assert_close(apply_rotary_half(q, cos, sin), hf_q)


def test_config_reads_457_rope_format(tiny_checkpoint, tmp_path, model_config):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    text = raw["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    text["partial_rotary_factor"] = rope["partial_rotary_factor"]
    text["rope_scaling"] = {"type": "default", "mrope_section": rope["mrope_section"]}
    del raw["vision_config"]["rope_parameters"]
    raw["vision_config"]["model_type"] = "glm4v"
    eos = text.pop("eos_token_id")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert ModelConfig.from_pretrained(tmp_path) == model_config


def test_config_rejects_bad_mrope_section(tiny_checkpoint, tmp_path):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    raw["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig.from_pretrained(tmp_path)
