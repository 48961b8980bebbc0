"""engine.processing.preprocess: image validation, exact equality with transformers' GLM-4.6V processor, limits."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.processing.limits import InputError, PreprocessLimits, validate_sampling
from engine.processing.preprocess import Preprocessor


def pixel_values_of(pre: Preprocessor, image_rgb: np.ndarray, image_grid_thw: np.ndarray) -> np.ndarray:
    """The float32 pixel values the engine's PatchNormalizer makes of the preprocessing model's output."""
    import torch

    # a copy: the preprocessor's array may be its resize cache's own, read-only
    return pre.normalizer(torch.from_numpy(image_rgb.copy()), torch.from_numpy(image_grid_thw)).numpy()


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: PIL reads the size without decoding."""

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0"))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def pre(tiny_checkpoint: Path) -> Preprocessor:
    return Preprocessor(tiny_checkpoint)


class ReferenceProcessor:
    """Glm46VProcessor's image path (it cannot be built without torchvision): the checkpoint's image
    processor, then each `<|image|>` in the text replaced by grid.prod() // merge**2 copies, then tokenized."""

    def __init__(self, checkpoint: Path) -> None:
        from transformers import AutoTokenizer
        from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.image_processor = Glm46VImageProcessorPil.from_pretrained(checkpoint)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text: list[str], images: list, return_tensors: str = "np") -> dict:
        out = dict(self.image_processor(images, return_tensors="np"))
        merge_length = self.image_processor.merge_size**2
        pieces = text[0].split("<|image|>")
        expanded = pieces[0]
        for grid, piece in zip(out["image_grid_thw"], pieces[1:], strict=True):
            expanded += "<|image|>" * int(grid.prod() // merge_length) + piece
        ids = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        image_id = self.tokenizer.convert_tokens_to_ids("<|image|>")
        out["input_ids"] = np.array([ids])
        out["mm_token_type_ids"] = (out["input_ids"] == image_id).astype(np.int64)
        return out


@pytest.fixture(scope="module")
def hf_processor(tiny_checkpoint: Path) -> ReferenceProcessor:
    return ReferenceProcessor(tiny_checkpoint)


def test_text_only_matches_chat_template(pre: Preprocessor, hf_processor) -> None:
    out = pre("What is in this image?")
    messages = [{"role": "user", "content": "What is in this image?"}]
    expected = hf_processor.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert out.prompt == expected
    assert out.input_ids.tolist() == hf_processor.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert (
        out.image_rgb.shape == (0,) and out.image_rgb.dtype == np.uint8 and out.image_grid_thw.shape == (0, 3)
    )
    assert out.mrope_positions.tolist() == [list(range(len(out.input_ids)))] * 3
    assert out.mrope_delta == 0


def test_every_call_says_where_its_time_went(pre: Preprocessor) -> None:
    from engine.processing.preprocess import STAGES

    out = pre("What is this?", [encode(noise_image(64, 48, seed=3))])
    assert tuple(out.stage_seconds) == STAGES and all(t >= 0 for t in out.stage_seconds.values())
    assert out.stage_seconds["images"] > 0  # a PNG decoded, resized and hashed


def test_thinking_switch(pre: Preprocessor) -> None:
    off = pre("hi", enable_thinking=False)
    assert off.prompt.endswith("hi/nothink<|assistant|>\n<think></think>\n")
    assert not off.is_thinking
    on = pre("hi", enable_thinking=True)
    assert "/nothink" not in on.prompt


@pytest.mark.parametrize("sizes", [[(90, 60)], [(90, 60), (200, 120)]])
def test_images_match_transformers_processor(pre: Preprocessor, hf_processor, tiny_checkpoint, sizes) -> None:
    from transformers import Glm4vConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vModel

    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    files = [encode(img) for img in images]
    out = pre("Describe the images.", files)

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Describe the images."}]
    text = hf_processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ref = hf_processor(text=[text], images=[Image.open(io.BytesIO(f)) for f in files], return_tensors="np")
    assert out.input_ids.tolist() == ref["input_ids"][0].tolist()
    # Our numpy image path computes the processor's function; only float rounding may differ.
    np.testing.assert_allclose(
        pixel_values_of(pre, out.image_rgb, out.image_grid_thw), ref["pixel_values"], rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(out.image_grid_thw, ref["image_grid_thw"])
    assert out.image_hashes == pixel_hashes(pre, out)

    # M-RoPE positions equal transformers' get_rope_index.
    import torch

    config = Glm4vConfig.from_pretrained(tiny_checkpoint)
    model = Glm4vModel._from_config(config)
    ids = torch.from_numpy(out.input_ids.astype(np.int64))[None]
    mm_token_type_ids = torch.from_numpy(ref["mm_token_type_ids"])
    positions, deltas = model.get_rope_index(
        ids, mm_token_type_ids, image_grid_thw=torch.from_numpy(out.image_grid_thw)
    )
    assert out.mrope_positions.tolist() == positions[:, 0].tolist()
    assert out.mrope_delta == int(deltas.reshape(-1)[0])


def test_base64_and_data_uri_equal_raw(pre: Preprocessor) -> None:
    raw = encode(noise_image(64, 64), "JPEG")
    b64 = base64.b64encode(raw)
    uri = b"data:image/jpeg;base64," + b64
    outs = [pre("q", [x]) for x in (raw, b64, uri, uri.decode())]
    for out in outs[1:]:
        np.testing.assert_array_equal(out.image_rgb, outs[0].image_rgb)
        assert out.image_hashes == outs[0].image_hashes == pixel_hashes(pre, outs[0])


def pixel_hashes(pre: Preprocessor, out) -> list[str]:
    """sha256 of each resized image's 'height,width;' and RGB bytes, cut from the flat image_rgb (images
    under two of content_hash's parts)."""
    patch = pre._geometry()[0]
    hashes, offset = [], 0
    for _, gh, gw in out.image_grid_thw.tolist():
        h, w = gh * patch, gw * patch
        rgb = out.image_rgb[offset : offset + h * w * 3]
        offset += h * w * 3
        hashes.append(hashlib.sha256(b"%d,%d;" % (h, w) + rgb.tobytes()).hexdigest())
    return hashes


def test_image_hash_is_the_pixels_not_the_file(pre: Preprocessor) -> None:
    """The same picture as PNG and as BMP (lossless both) hashes the same; another picture does not."""
    picture = noise_image(80, 60, seed=3)
    png, bmp = pre("q", [encode(picture, "PNG")]), pre("q", [encode(picture, "BMP")])
    assert png.image_hashes == bmp.image_hashes
    other = pre("q", [encode(noise_image(80, 60, seed=4), "PNG")])
    assert other.image_hashes != png.image_hashes


def test_a_large_image_is_hashed_in_parts_side_by_side() -> None:
    """Bytes of two or more HASH_PART_BYTES go in equal parts (at most HASH_PARTS): the hash is that of the
    size and the parts' sha256s, the same for any memory layout of the pixels, and changes with any byte."""
    from engine.processing import preprocess

    rng = np.random.default_rng(7)
    for height, width, parts in ((728, 1288, 2), (1080, 1920, 4), (300, 400, 1)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        data = rgb.tobytes()
        if parts == 1:
            want = hashlib.sha256(b"%d,%d;" % (height, width) + data).hexdigest()
        else:
            step = -(-len(data) // parts)
            digests = b"".join(hashlib.sha256(data[i : i + step]).digest() for i in range(0, len(data), step))
            want = hashlib.sha256(b"%d,%d;parts %d;" % (height, width, parts) + digests).hexdigest()
        assert preprocess.content_hash(rgb) == want
        assert preprocess.content_hash(np.asfortranarray(rgb)) == want  # another layout of the same pixels
        for index in (0, len(data) // 2, len(data) - 1):  # a byte in the first, a middle and the last part
            changed = rgb.copy().reshape(-1)
            changed[index] ^= 1
            assert preprocess.content_hash(changed.reshape(rgb.shape)) != want
    # the size stored for the engine's resize is part of the hash
    assert preprocess.content_hash(rgb, (150, 200)) != preprocess.content_hash(rgb)


def test_an_image_sent_again_skips_decode_and_resize(tiny_checkpoint) -> None:
    pre = Preprocessor(tiny_checkpoint, resize_cache_bytes=1 << 20)
    raw = encode(noise_image(64, 48, seed=5), "PNG")
    first = pre("q", [raw])
    (info,) = pre.load_images([raw])
    assert info.image._im is None and info.pixels is None  # header only: the pixels were not decoded again
    again = pre("q", [raw])
    np.testing.assert_array_equal(again.image_rgb, first.image_rgb)
    assert again.image_hashes == first.image_hashes
    small = Preprocessor(tiny_checkpoint, resize_cache_bytes=0)
    small("q", [raw])
    decoded = small.load_images([raw])[0]
    assert not small.resize_cache._entries and (decoded.pixels is not None or decoded.image._im is not None)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_supported_formats(pre: Preprocessor, fmt: str) -> None:
    out = pre("q", [encode(noise_image(60, 40), fmt)])
    assert out.image_grid_thw.shape == (1, 3)


def test_gif_uses_first_frame(pre: Preprocessor) -> None:
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    buf = io.BytesIO()
    red.save(buf, "GIF", save_all=True, append_images=[blue])
    only_red = encode(red, "GIF")
    np.testing.assert_array_equal(pre("q", [buf.getvalue()]).image_rgb, pre("q", [only_red]).image_rgb)


def test_rgba_and_grayscale_are_accepted(pre: Preprocessor) -> None:
    for mode in ("RGBA", "L", "P"):
        assert pre("q", [encode(noise_image(56, 56, mode=mode))]).image_grid_thw.shape == (1, 3)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_image_errors_name_the_field_and_limit(tiny_checkpoint: Path) -> None:
    pre = Preprocessor(tiny_checkpoint, PreprocessLimits(max_image_bytes=50_000, max_images_per_request=2))
    good = encode(noise_image(40, 40))
    assert error_of(pre, "q", [good, b""]).startswith("image_input[1]: image is empty")
    assert error_of(pre, "q", [b"\x89PNG\r\n\x1a\n" + b"garbage" * 10]).startswith("image_input[0]: corrupt")
    jpeg = encode(noise_image(200, 200), "JPEG")
    truncated = jpeg[: len(jpeg) // 2]
    assert error_of(pre, "q", [truncated]).startswith("image_input[0]: corrupt or truncated JPEG")
    assert error_of(pre, "q", [b"not an image at all!"]).startswith("image_input[0]: not a PNG/JPEG")
    big = encode(noise_image(200, 200))
    msg = error_of(pre, "q", [big])
    assert msg.startswith(f"image_input[0]: image is {len(big)} bytes, over the limit of 50000 bytes")
    assert "max_image_bytes" in msg
    tiff = encode(noise_image(40, 40), "TIFF")
    assert error_of(pre, "q", [tiff]).startswith("image_input[0]: image format TIFF is not supported")
    msg = error_of(pre, "q", [good, good, good])
    assert msg.startswith("image_input: 3 images, over the limit of 2") and "max_images_per_request" in msg
    assert "aspect ratio" in error_of(pre, "q", [encode(Image.new("RGB", (1000, 4)))])


def test_a_requests_images_run_side_by_side_errors_in_image_order(tiny_checkpoint: Path, monkeypatch) -> None:
    """Two new images are resized at the same time on the image threads (each one's resize waits for the
    other's to start); the result equals the images prepared one by one. With several bad images the
    first one's error is raised, and an image's error comes before the prompt's."""
    import threading

    from engine.processing import preprocess

    if preprocess.IMAGE_THREADS < 2:
        pytest.skip("one core: one image thread")
    pre = Preprocessor(tiny_checkpoint, resize_cache_bytes=0)
    files = [encode(noise_image(60, 40, seed=1)), encode(noise_image(50, 70, seed=2))]
    serial = pre.prepare_images(pre.load_images(files))
    both_started = threading.Barrier(2, timeout=20)
    resize, threads = pre._resize, set()

    def resize_together(*args):
        threads.add(threading.current_thread().name)
        both_started.wait()  # broken (an error) if the other image's resize does not run meanwhile
        return resize(*args)

    monkeypatch.setattr(pre, "_resize", resize_together)
    out = pre("What differs?", files)
    assert len(threads) == 2 and all(name.startswith("glmv-image") for name in threads)
    np.testing.assert_array_equal(out.image_rgb, serial[0])
    np.testing.assert_array_equal(out.image_grid_thw, serial[1])
    assert out.image_hashes == serial[2]
    monkeypatch.setattr(pre, "_resize", resize)
    corrupt = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    assert error_of(pre, "q", [files[0], corrupt, b""]).startswith("image_input[1]: corrupt")
    assert error_of(pre, None, [corrupt], messages_json="{not json").startswith("image_input[0]: corrupt")


def test_decompression_bomb_is_refused_from_the_header(pre: Preprocessor) -> None:
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 100
    msg = error_of(pre, "q", [bomb])
    assert msg.startswith("image_input[0]: image is 900000000 pixels, over the limit of 67108864 pixels")
    assert "max_image_pixels" in msg
    medium = png_header_only(9000, 9000)  # over our limit, under PIL's own bomb limit
    msg = error_of(pre, "q", [medium])
    assert msg.startswith("image_input[0]: image is 9000x9000 = 81000000 pixels, over the limit of 67108864")


def test_prompt_length_limit(tiny_checkpoint: Path) -> None:
    pre = Preprocessor(tiny_checkpoint, PreprocessLimits(max_seq_len=64))
    msg = error_of(pre, "word " * 200)
    assert msg.startswith("text_input: the prompt is") and "max_seq_len 64" in msg
    image = encode(noise_image(300, 300))
    assert error_of(pre, "q", [image]).startswith("text_input: the prompt is")


def test_messages(pre: Preprocessor) -> None:
    import json

    img = encode(noise_image(56, 56))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
    ]
    out = pre(None, [img], messages_json=json.dumps(messages))
    assert out.prompt.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|>")
    assert error_of(pre, None, [], messages_json=json.dumps(messages)).startswith(
        "messages: 1 image parts but 0 images"
    )
    assert error_of(pre, None, [], messages_json="{not json").startswith("messages: not valid JSON")
    assert error_of(pre, None, [], messages_json='[{"role": "robot", "content": "x"}]').startswith(
        "messages[0].role"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"max_tokens": 4, "temperature": -0.1}, "temperature"),
        ({"max_tokens": 4, "temperature": float("nan")}, "temperature"),
        ({"max_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_tokens": 4, "top_k": -1}, "top_k"),
        ({"max_tokens": 4, "repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 4, "presence_penalty": 3.0}, "presence_penalty"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ],
)
def test_sampling_errors(kwargs: dict, field: str) -> None:
    limits = PreprocessLimits(max_output_tokens=4096)
    assert error_of(validate_sampling, limits=limits, **kwargs).startswith(f"{field}: ")


def test_sampling_ok() -> None:
    validate_sampling(max_tokens=16, limits=PreprocessLimits(), temperature=0.0, top_p=1.0, top_k=0, seed=7)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
@pytest.mark.parametrize("size", [(1000, 333), (57, 300), (448, 448)])
def test_pixel_values_match_processor_for_modes_and_sizes(pre: Preprocessor, mode: str, size) -> None:
    rng = np.random.default_rng(7)
    rgba = Image.fromarray((rng.random((size[1], size[0], 4)) * 255).astype("uint8"), "RGBA")
    data = encode(rgba.convert(mode))
    rgb, grid = pre.resize_images(pre.load_images([data]))
    pixel_values = pixel_values_of(pre, rgb, grid)
    ref = pre.image_processor([Image.open(io.BytesIO(data))], return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)


def test_flat_rgb_of_several_images_patchified_like_the_processor(pre: Preprocessor) -> None:
    """What the llm receives (flat RGB of two images + grid) becomes, through the engine's PatchNormalizer,
    the processor's pixel_values for the same two images."""
    import torch

    rng = np.random.default_rng(3)
    files = [
        encode(Image.fromarray((rng.random((300, 500, 3)) * 255).astype("uint8"), "RGB")),
        encode(Image.fromarray((rng.random((100, 60, 3)) * 255).astype("uint8"), "RGB")),
    ]
    rgb, grid = pre.resize_images(pre.load_images(files))
    assert (
        rgb.dtype == np.uint8
        and rgb.ndim == 1
        and rgb.size == pre.normalizer.rgb_size(torch.from_numpy(grid))
    )
    ref = pre.image_processor([Image.open(io.BytesIO(f)) for f in files], return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    pixel_values = pre.normalizer(torch.from_numpy(rgb), torch.from_numpy(grid)).numpy()  # the llm's route
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
    patches = pre.normalizer.patchify(torch.from_numpy(rgb), torch.from_numpy(grid))  # uint8 patches
    np.testing.assert_array_equal(pixel_values, pre.normalizer(patches).numpy())
    with pytest.raises(ValueError, match=r"^image_pixels: shape \(3, 1175\) must be \[N, 1176\]"):
        pre.normalizer(torch.zeros(3, 1175, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^image_grid_thw: needed to patchify flat RGB images"):
        pre.normalizer(torch.from_numpy(rgb))


def png_rgb16(width: int, height: int, seed: int = 0) -> bytes:
    """A 16-bit RGB PNG (PIL opens it as 8-bit "RGB", keeping each sample's high byte)."""

    samples = (
        np.random.default_rng(seed).integers(0, 1 << 16, (height, width * 3), dtype=np.uint16).astype(">u2")
    )
    rows = b"".join(b"\0" + row.tobytes() for row in samples)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_variants() -> dict[str, tuple[bytes, bool]]:
    """PNG files of each kind, and whether libspng decodes them (else PIL). 140x112 is a size the tiny
    checkpoint's processor keeps; libspng decodes only images the processor does not resize."""
    w, h = 140, 112
    rgba = noise_image(w, h, seed=11, mode="RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[..., 3] = (np.arange(w, dtype=np.uint8) * 2)[None, :]  # alpha values from 0 to 254
    frames = io.BytesIO()
    noise_image(w, h, seed=1).save(frames, "PNG", save_all=True, append_images=[noise_image(w, h, seed=2)])
    return {
        "rgb": (encode(noise_image(w, h, seed=10)), True),
        "rgb_optimized": (encode(noise_image(w, h, seed=10), optimize=True, compress_level=9), True),
        "rgba": (encode(Image.fromarray(alpha, "RGBA")), True),
        "gray": (encode(noise_image(w, h, seed=12, mode="L")), True),
        "rgb_resized": (encode(noise_image(120, 90, seed=10)), False),
        "gray_alpha": (encode(noise_image(w, h, seed=13, mode="LA")), False),
        "palette": (encode(noise_image(w, h, seed=14, mode="P")), False),
        "rgb_transparent_colour": (encode(noise_image(w, h, seed=15), transparency=(0, 0, 0)), False),
        "rgb16": (png_rgb16(w, h), False),
        "animated": (frames.getvalue(), False),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "rgb",
        "rgb_optimized",
        "rgba",
        "gray",
        "rgb_resized",
        "gray_alpha",
        "palette",
        "rgb_transparent_colour",
        "rgb16",
        "animated",
    ],
)
def test_png_decoded_by_libspng_gives_pils_pixels(tiny_checkpoint: Path, monkeypatch, kind: str) -> None:
    """The still 8-bit gray / RGB / RGBA PNGs the processor keeps at their size go through libspng, the others
    through PIL; either way a request's pixels and image hash are those of PIL's decode (PIL alone: pyspng
    absent)."""
    from engine.processing import images

    data, by_spng = png_variants()[kind]
    pre = Preprocessor(tiny_checkpoint, resize_cache_bytes=0)
    info = pre.load_images([data])[0]
    assert (info.pixels is not None) is by_spng
    if by_spng:
        with Image.open(io.BytesIO(data)) as reference:
            np.testing.assert_array_equal(
                np.asarray(info.pil_image()), np.asarray(reference.convert(info.image.mode))
            )
    fast = pre("q", [data])
    monkeypatch.setattr(images, "pyspng", None)
    assert pre.load_images([data])[0].pixels is None
    slow = pre("q", [data])
    np.testing.assert_array_equal(fast.image_rgb, slow.image_rgb)
    np.testing.assert_array_equal(fast.image_grid_thw, slow.image_grid_thw)
    assert fast.image_hashes == slow.image_hashes


def test_libspng_rgb_at_the_models_size_is_not_copied(tiny_checkpoint: Path) -> None:
    """An RGB PNG already at the size the processor gives it: its libspng pixels are the request's RGB."""
    pre = Preprocessor(tiny_checkpoint, resize_cache_bytes=0)
    patch, merge, _ = pre._geometry()
    side = patch * merge * 4
    info = pre.load_images([encode(noise_image(side, side, seed=3))])[0]
    assert info.pixels is not None
    rgb, grid = pre.resize_images([info])
    assert np.shares_memory(rgb, info.pixels)
    assert grid.tolist() == [[1, side // patch, side // patch]]


def test_a_png_libspng_refuses_gets_pils_error(pre: Preprocessor) -> None:
    """A PNG whose header is whole and whose pixel data is cut short: libspng refuses it, PIL names it."""
    data = encode(noise_image(200, 150, seed=9))
    cut = data[: len(data) // 2]
    assert error_of(pre, "q", [cut]).startswith("image_input[0]: corrupt or truncated PNG image")
