from __future__ import annotations

import pytest

from benchmarks.baseline_hf import grid_for
from benchmarks.roofline import (
    decode_roofline_ms,
    decoder_param_counts,
    fp8_read_bytes,
    full_size_config,
    kv_bytes_per_token,
)


def test_glm46v_flash_decoder_counts_are_exact() -> None:
    counts = decoder_param_counts(full_size_config())
    assert counts["total"] == 9_400_279_040  # decoder + embedding + lm_head of GLM-4.6V-Flash
    assert counts["per_token_read"] * 2 == 17_559_044_096  # bf16 bytes one decode step reads
    assert kv_bytes_per_token(full_size_config()) == 40 * 1024


def test_decode_floor_on_an_h100() -> None:
    cfg = full_size_config()
    assert decode_roofline_ms(cfg, 3.02e12) == pytest.approx(5.814, abs=1e-3)
    # 32 sequences of 1000 tokens add 32 * 1000 * 40 KiB of KV reads
    extra = decode_roofline_ms(cfg, 3.02e12, batch=32, context_len=1000) - decode_roofline_ms(cfg, 3.02e12)
    assert extra == pytest.approx(32 * 1000 * 40960 / 3.02e12 * 1e3)


def test_counts_read_dict_configs_too() -> None:
    text = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 96,
        "vocab_size": 99,
    }
    per_layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 64 * 192 + 96 * 64 + 4 * 64
    assert decoder_param_counts({"text_config": text})["layers"] == 2 * per_layer


def test_baseline_image_grids_match_the_processor_table() -> None:
    assert grid_for(448, 448) == (32, 32)  # 256 LLM tokens
    assert grid_for(1288, 728) == (52, 92)  # 1196 LLM tokens
    gh, gw = grid_for(1288, 728)
    assert gh * gw // 4 == 1196


def test_fp8_read_bytes_are_what_the_quantized_decoder_holds(tmp_path) -> None:
    """The fp8 floor's bytes equal the parameters a decode step reads from a tiny checkpoint quantized by
    the engine (its layers' weights, scales, biases and norms, the final norm and the lm_head)."""
    from build_engine.checkpoint import make_tiny_checkpoint
    from engine.config import ModelConfig
    from engine.model.decoder import Glm4vModel
    from engine.model.quant import quantize_decoder_fp8_

    path = make_tiny_checkpoint(tmp_path / "tiny", "tiny", seed=0)
    config = ModelConfig.from_pretrained(path)
    model = Glm4vModel.from_pretrained(path, "cpu", "bfloat16", config)
    assert quantize_decoder_fp8_(model) == 4 * config.num_hidden_layers + 1
    read = [model.language_model.layers, model.language_model.norm, model.lm_head]
    held = sum(t.numel() * t.element_size() for m in read for t in m.parameters())
    assert fp8_read_bytes(config) == held
    assert fp8_read_bytes(full_size_config()) == 8_787_402_752
