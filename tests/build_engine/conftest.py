"""A tiny engine directory for the launcher tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from build_engine.cli import main

    out = tmp_path_factory.mktemp("tiny_engine") / "engine"
    flags = ["--max-seq-len", "256", "--default-max-tokens", "4", "--preprocessing-instances", "1"]
    assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(out), *flags]) == 0
    return out
