"""InputProcessor on the tiny checkpoint's config: the image inputs' offsets and content hashes that the
prefix and image caches key on, and the checks a guided request meets before it reaches the engine."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.processing.input_processor import InputProcessor
from engine.request import GenerationRequest
from engine.sample.sampler import SamplingParams
from engine.sample.structured import Guide


@pytest.fixture(scope="module")
def model_config(tiny_checkpoint) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint)


def processor(model_config: ModelConfig, max_model_len: int = 256) -> InputProcessor:
    def check_prompt(n: int) -> None:
        if n < 1:
            raise ValueError("prompt_token_ids: the prompt is empty (needs at least 1 token)")

    return InputProcessor(model_config, max_model_len, check_prompt, torch.device("cpu"))


def image_prompt(mc: ModelConfig, grids: list[tuple[int, int, int]]) -> list[int]:
    merge_area = mc.vision_config.spatial_merge_size**2
    ids = [5]
    for t, h, w in grids:
        ids += (
            [mc.image_start_token_id]
            + [mc.image_token_id] * (t * h * w // merge_area)
            + [mc.image_end_token_id]
        )
    return ids + [6]


def flat_rgb(mc: ModelConfig, grids: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    patch = mc.vision_config.patch_size
    size = sum(h * w for _, h, w in grids) * patch * patch * 3
    return torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def request(mc, grids, pixels, **kwargs) -> GenerationRequest:
    return GenerationRequest(
        "r",
        image_prompt(mc, grids),
        SamplingParams(max_tokens=2),
        image_pixels=pixels,
        image_grid_thw=torch.tensor(grids),
        **kwargs,
    )


def test_flat_rgb_images_get_byte_offsets_and_content_hashes(model_config):
    mc = model_config
    grids = [(1, 4, 4), (1, 2, 6)]
    pixels = flat_rgb(mc, grids, seed=0)
    seq = processor(mc).process(request(mc, grids, pixels))
    patch = mc.vision_config.patch_size
    first = 4 * 4 * patch * patch * 3
    assert seq.image_input_offsets == [(0, first), (first, pixels.numel())]
    merge_area = mc.vision_config.spatial_merge_size**2
    assert [end - start for start, end, _ in seq.image_spans] == [16 // merge_area, 12 // merge_area]
    hashes = [h for _, _, h in seq.image_spans]
    assert len(set(hashes)) == 2 and all(len(h) == 16 for h in hashes)
    # the same image gets the same hash in any request and at any place; a changed pixel does not
    swapped = torch.cat([pixels[first:], pixels[:first]])
    again = processor(mc).process(request(mc, grids[::-1], swapped))
    assert [h for _, _, h in again.image_spans] == hashes[::-1]
    changed = pixels.clone()
    changed[first + 5] ^= 1
    other = processor(mc).process(request(mc, grids, changed))
    assert [h for _, _, h in other.image_spans] == [hashes[0], other.image_spans[1][2]]
    assert other.image_spans[1][2] != hashes[1]


def test_given_image_hashes_are_checked_and_used(model_config):
    mc = model_config
    grids = [(1, 4, 4), (1, 2, 6)]
    pixels = flat_rgb(mc, grids, seed=1)
    seq = processor(mc).process(request(mc, grids, pixels, image_hashes=[b"a", b"b"]))
    assert [h for _, _, h in seq.image_spans] == [b"a", b"b"]
    for bad in ([b"a"], [b"a", b""]):
        with pytest.raises(
            ValueError, match=r"^image_hash: \d hashes for 2 images \(one non-empty hash each\)$"
        ):
            processor(mc).process(request(mc, grids, pixels, image_hashes=bad))


def test_flat_rgb_of_the_wrong_size_names_the_bytes_needed(model_config):
    mc = model_config
    grids = [(1, 4, 4)]
    pixels = flat_rgb(mc, grids, seed=2)
    with pytest.raises(
        ValueError, match=rf"^image_pixels: {pixels.numel() - 1} bytes of RGB, image_grid_thw"
    ):
        processor(mc).process(request(mc, grids, pixels[:-1]))


def test_guided_requests_need_a_tokenizer_and_no_min_tokens(model_config, tiny_checkpoint):
    from tokenizers import Tokenizer

    guide = Guide("json")
    req = GenerationRequest("g", [5, 6], SamplingParams(max_tokens=4), guide=guide)
    with pytest.raises(ValueError, match=r"^guided_decoding_guide: this engine has no tokenizer"):
        processor(model_config).process(req)
    with_tokenizer = processor(model_config)
    with_tokenizer.tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    req.sampling = SamplingParams(max_tokens=4, min_tokens=2)
    with pytest.raises(ValueError, match=r"^min_tokens: 2 must be 0 with guided_decoding_guide"):
        with_tokenizer.process(req)
    req.sampling = SamplingParams(max_tokens=4)
    assert with_tokenizer.process(req).grammar is not None
    assert with_tokenizer.grammar_compiler() is with_tokenizer.grammar_compiler()
