"""engine.processing.resample: PIL's bicubic resize bit for bit, for upscales, downscales, mixed, extreme
aspect ratios, tiny and large images, and both pass orders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.processing.resample import VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS, resize_bicubic


def pil_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


@pytest.mark.parametrize(
    ("source", "size"),
    [
        ((1920, 1080), (1932, 1092)),  # a screenshot to the full-size processor's size
        ((3840, 2160), (2912, 1624)),  # 4K, both down
        ((100, 60), (112, 56)),  # width up, height down by more than twice the width: vertical first
        ((640, 480), (644, 476)),
        ((57, 300), (56, 308)),  # width down, height up
        ((1288, 728), (1288, 700)),  # one pass only
        ((1288, 728), (1260, 728)),
        ((1, 1), (28, 28)),
        ((7000, 50), (2000, 28)),
    ],
)
def test_named_sizes_equal_pil(source: tuple[int, int], size: tuple[int, int]) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bicubic(torch.from_numpy(rgb), size).numpy(), pil_resize(rgb, size))


def test_random_sizes_and_contents_equal_pil() -> None:
    """Noise, smooth values and hard black/white edges (where the filter's negative lobes clip)."""
    rng = np.random.default_rng(1)
    for trial in range(120):
        width, height = (int(v) for v in rng.integers(2, 300, 2))
        size = tuple(int(v) for v in rng.integers(1, 360, 2))
        if size == (width, height):
            continue
        kind = trial % 3
        if kind == 0:
            rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        elif kind == 1:
            rgb = np.clip(rng.normal(128, 90, (height, width, 3)), 0, 255).astype(np.uint8)
        else:
            rgb = (rng.random((height, width, 3)) > 0.5).astype(np.uint8) * 255
        got = resize_bicubic(torch.from_numpy(rgb), size).numpy()
        np.testing.assert_array_equal(got, pil_resize(rgb, size), err_msg=f"{(width, height)} -> {size}")


def test_one_channel_equals_pil() -> None:
    gray = np.random.default_rng(2).integers(0, 256, (90, 120, 1), dtype=np.uint8)
    got = resize_bicubic(torch.from_numpy(gray), (140, 84)).numpy()[..., 0]
    np.testing.assert_array_equal(got, pil_resize(gray[..., 0], (140, 84)))


def test_pass_order_follows_the_installed_pillow() -> None:
    """Pillow 13 begins with the vertical pass where the height shrinks by more than twice what the width
    does, Pillow 12 never: the two orders round differently, and the default is the installed Pillow's."""
    rgb = np.random.default_rng(3).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    source = torch.from_numpy(rgb)
    installed = resize_bicubic(source, (112, 56), VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS).numpy()
    other = resize_bicubic(source, (112, 56), not VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS).numpy()
    np.testing.assert_array_equal(installed, pil_resize(rgb, (112, 56)))
    assert (other != installed).any()
    assert VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS == (int(Image.__version__.split(".")[0]) >= 13)


@pytest.mark.gpu
def test_on_the_gpu_equal_to_pil_without_the_host_waiting() -> None:
    """On CUDA: the same pixels as PIL, from a pinned source, for the sizes the server resizes; a second
    image of a size seen before reuses its coefficients."""
    rng = np.random.default_rng(4)
    for source, size in [((1920, 1080), (1932, 1092)), ((3840, 2160), (2912, 1624)), ((100, 60), (112, 56))]:
        for _ in range(2):
            rgb = rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
            pinned = torch.from_numpy(rgb).pin_memory()
            got = resize_bicubic(pinned.to("cuda", non_blocking=True), size).cpu().numpy()
            np.testing.assert_array_equal(got, pil_resize(rgb, size))
