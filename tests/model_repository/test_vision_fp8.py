"""test_ensemble's two image paths again on a server built with `--dtype bfloat16 --vision-dtype fp8`: the
standalone vision_encoder model quantizes its ViT as the llm's own ViT does, so an embedding table from it
and the llm's own encoding of the same pixels give the same greedy ids (on the CPU both run the FP8
layers' dequantized path, the weights as FP8 holds them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_repository.conftest import ENGINE_FLAGS
from tests.model_repository.test_ensemble import (  # noqa: F401
    test_rgb_images_and_vision_encoder_embeddings_give_the_llm_one_answer,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from build_engine.cli import main

    out = tmp_path_factory.mktemp("tiny_engine_vision_fp8") / "engine"
    flags = ["--checkpoint", str(tiny_checkpoint), "--output", str(out), *ENGINE_FLAGS]
    assert main([*flags, "--dtype", "bfloat16", "--vision-dtype", "fp8"]) == 0
    return out


def test_the_vision_encoders_table_is_the_fp8_vits(server, tiny_engine: Path) -> None:
    """vision_encoder's table for a request's pixels is what the engine's own FP8 ViT makes of them (the
    same model built from the engine directory in this process), bit for bit, and not the 16-bit ViT's."""
    import numpy as np
    import torch
    import tritonclient.grpc as grpcclient

    from engine.config import EngineDir
    from engine.llm_engine import LLMEngine
    from engine.model.decoder import Glm4vModel
    from engine.model.quant import Fp8Linear
    from engine.processing.preprocess import Preprocessor
    from tests.model_repository.test_ensemble import IMAGES, QUESTION, pixel_values_of, tensor

    pre = Preprocessor(tiny_engine)
    out = pre(QUESTION, IMAGES["two_images"])
    pixels = pixel_values_of(pre, out.image_rgb, out.image_grid_thw)
    grid = out.image_grid_thw
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = [tensor("pixel_values", pixels[None], "FP32"), tensor("image_grid_thw", grid[None], "INT64")]
    table = client.infer("vision_encoder", inputs).as_numpy("prompt_embedding_table")[0]
    engine_dir = EngineDir.open(tiny_engine)
    fp8 = LLMEngine.from_engine_dir(tiny_engine).model
    bf16 = Glm4vModel.from_pretrained(engine_dir.weights_dir, "cpu", "bfloat16", engine_dir.model_config())
    assert isinstance(fp8.visual.blocks[0].attn.qkv, Fp8Linear)
    with torch.no_grad():
        want, full = (
            m.encode_images(torch.from_numpy(pixels), torch.from_numpy(grid)).float().numpy()
            for m in (fp8, bf16)
        )
    np.testing.assert_array_equal(table, want)
    assert not np.array_equal(table, full)
