"""test_ensemble's answers again on a server built with --resize-on-device: new images that need a resize go
to the llm at their decoded size and the engine resizes them (here on the CPU, with the same integer
arithmetic as on a GPU); the answers equal those of the engine fed PIL's resized pixels. The server's
shared image directory is one of its own, so that the images are new to it (files other servers wrote
for the same images would hold them resized)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.model_repository.conftest import ENGINE_FLAGS
from tests.model_repository.test_ensemble import IMAGES, test_transports_and_engine_agree  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared_images")


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint: Path, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from build_engine.cli import main

    out = tmp_path_factory.mktemp("tiny_engine_resize_on_device") / "engine"
    flags = ["--checkpoint", str(tiny_checkpoint), "--output", str(out), *ENGINE_FLAGS, "--resize-on-device"]
    assert main(flags) == 0
    config = out / "model_repository" / "preprocessing" / "config.pbtxt"
    pre = config.read_text()
    assert 'key: "resize_on_device" value: { string_value: "true" }' in pre
    config.write_text(
        pre + f'parameters {{ key: "shared_resize_cache_dir" value: {{ string_value: "{shared_dir}" }} }}\n'
    )
    return out


def test_zz_the_shared_files_hold_the_images_at_their_decoded_size(
    server, tiny_engine: Path, shared_dir: Path
):
    """After the answers above (zz: run last): the server's shared files hold the test images as decoded,
    which the processor resizes, so the engine did the resizing."""
    import numpy as np
    from PIL import Image

    from engine.processing.preprocess import Preprocessor
    from engine.processing.resize_cache import read_shared_ref

    files = sorted(shared_dir.glob("*/*.rgb"))
    stored = {read_shared_ref(str(f), f.parent.name)[0].shape[:2] for f in files}
    pre = Preprocessor(tiny_engine)
    decoded = set()
    for image in IMAGES["two_images"]:
        width, height = Image.open(io.BytesIO(image)).size
        assert not pre._keeps_size(width, height)
        decoded.add((height, width))
    assert stored == decoded, (stored, decoded)
    assert np.all([f.stat().st_size > 0 for f in files])
