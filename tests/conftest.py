"""Shared fixtures: one CPU thread per test process, and a tiny random GLM-4V checkpoint per session.
Tests marked `gpu` are skipped where no CUDA device is visible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make_tiny_checkpoint(preset="tiny", seed=0)`: a ~1 M-parameter checkpoint transformers loads."""
    from build_engine.checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint: Path):
    """The transformers reference model of `tiny_checkpoint`, float32, eval mode."""
    from transformers import Glm4vForConditionalGeneration

    return Glm4vForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
