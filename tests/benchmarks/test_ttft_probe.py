"""benchmarks.ttft_probe's requests on CPU: its large images take the sizes the preprocessing model gives the
full-size checkpoint's images (`full_size_image_size`, which vit_attention_bench uses too), so the probe's
first step alone and the harness's large_images sub-phase measure the same prompt; and a request with
several images runs through the engine."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.mark.parametrize(
    "size",
    [(3840, 2160), (2560, 1440), (1920, 1080), (1288, 728), (448, 448), (800, 3000), (4032, 3024)],
)
def test_probe_sizes_are_the_servers(tiny_checkpoint: Path, tmp_path: Path, size) -> None:
    from build_engine.checkpoint import FULL_SIZE_MAX_IMAGE_TOKENS, full_size_image_size, preprocessor_config
    from engine.processing.limits import PreprocessLimits
    from engine.processing.preprocess import Preprocessor

    # the tiny checkpoint with the full-size checkpoint's image processor settings
    engine_dir = tmp_path / "full_processor"
    shutil.copytree(tiny_checkpoint, engine_dir)
    (engine_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(FULL_SIZE_MAX_IMAGE_TOKENS))
    )
    pre = Preprocessor(engine_dir, PreprocessLimits(max_image_pixels=4032 * 3024), resize_cache_bytes=0)
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buf, "PNG")
    _, grid = pre.resize_images(pre.load_images([buf.getvalue()]))
    width, height = full_size_image_size(*size)
    assert grid.tolist() == [[1, height // 14, width // 14]]
    if size == (3840, 2160):
        assert (width, height) == (2912, 1624)  # 6032 image tokens: the server's 6072-token prompt


def test_probe_request_with_four_images_runs(tiny_checkpoint: Path) -> None:
    from benchmarks.ttft_probe import _first_step_ms, _request
    from engine.config import EngineConfig, ModelConfig
    from engine.llm_engine import LLMEngine

    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    ex = LLMEngine(mc, EngineConfig(max_model_len=1024, num_kv_blocks=256), None)
    gen = torch.Generator().manual_seed(0)
    special = {mc.image_token_id, mc.image_start_token_id, mc.image_end_token_id}
    for images in (1, 4):
        req = _request(ex, mc, (112, 84), f"r{images}", gen, images=images)
        # the probe's text ids are the full vocabulary's: fold them into the tiny one
        ids = [t if t in special else t % 200 for t in req.prompt_token_ids]
        req = dataclasses.replace(req, prompt_token_ids=ids)
        assert req.image_grid_thw.tolist() == [[1, 6, 8]] * images
        assert ids.count(mc.image_token_id) == images * 12
        assert req.image_pixels.numel() == images * 84 * 112 * 3
        assert int(np.asarray(req.mrope_positions).max()) + 1 - req.mrope_delta == len(ids)
        assert _first_step_ms(ex, req) > 0
        assert not ex.has_unfinished()


def test_large_image_ratios_set_the_servers_ttft_beside_the_first_step_alone() -> None:
    from benchmarks.ttft_probe import large_image_ratios

    def run(client: float, server: float) -> dict:
        return {"requests": 3, "errors": 0, "ttft_ms": {"p50": client}, "server_ttft_ms": {"p50": server}}

    harness = {
        "phases": {
            "serve": {
                "large_images": {
                    "1920x1080": run(262.0, 166.0),
                    "4x1288x728": run(287.0, 252.0),
                    "2560x1440": run(516.0, 352.0),  # not probed: left out
                    "client_gc": {"full_collections": 0, "ms": 0.0},
                    "engine": {"steps": 33},
                }
            }
        }
    }
    sizes = {"1920x1080": {"first_step_ms": 200.0}, "4x1288x728": {"first_step_ms": 210.0}}
    assert large_image_ratios(sizes, harness) == {
        "1920x1080": {
            "alone_ms": 200.0,
            "server_ttft_ms": 166.0,
            "client_ttft_ms": 262.0,
            "server_ratio": 0.83,
            "client_ratio": 1.31,
        },
        "4x1288x728": {
            "alone_ms": 210.0,
            "server_ttft_ms": 252.0,
            "client_ttft_ms": 287.0,
            "server_ratio": 1.2,
            "client_ratio": 1.367,
        },
    }
    assert large_image_ratios(sizes, {"phases": {"serve": {}}}) == {}


def test_follow_up_only_runs_the_served_follow_up(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`--follow-up-only`'s part on CPU: the follow-up reaches the engine without pixels (the embeddings its
    engine holds), every table is written, and its steps are timed."""
    from benchmarks.ttft_probe import follow_up_only
    from engine.config import EngineConfig, ModelConfig
    from engine.llm_engine import LLMEngine

    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    ex = LLMEngine(mc, EngineConfig(max_model_len=1024, num_kv_blocks=256), None)
    res = follow_up_only(ex, mc, ["112x84"], tmp_path, torch.Generator().manual_seed(0))
    row = res["112x84"]
    assert row["held_embeddings"] is True
    assert row["prompt_tokens"] == 30 + 12 + 2
    assert len(row["follow_up_served_runs_ms"]) == 5 and row["follow_up_served_first_step_ms"] > 0
    assert row["follow_up_served_step_ms"] and all(t > 0 for t in row["follow_up_served_step_ms"])
    assert "Self CPU" in (tmp_path / "ttft_profile_followup_served_112x84.txt").read_text()
    host = (tmp_path / "ttft_host_followup_served_112x84.txt").read_text()
    assert "engine_core.py" in host and "cumulative" in host
    assert not ex.has_unfinished()
