"""Request preprocessing: image validation + processing, chat template rendering, tokenization, M-RoPE.

Pure Python (PIL, numpy, torch, transformers' tokenizer and image processor); used by the `preprocessing`
Triton model and by tests. `Preprocessor` puts together the rooms beside it: `limits` (InputError,
PreprocessLimits, validate_sampling), `images` (decode_image_bytes, open_image), `chat` (build_messages,
parse_tools) and `resize_cache`. Contract:

* Every bad input raises `InputError` whose message starts with the field name and states the limit:
  `image_input[1]: image is 12000000 bytes, over the limit of 10485760 bytes (max_image_bytes)`.
* Images (`image_input[i]`): raw file bytes, base64, or a `data:` URI. The decoded format must be PNG,
  JPEG, WebP, BMP or GIF (first frame). Checked before any pixel is decoded: byte size
  (`max_image_bytes`), format, and width x height from the header (`max_image_pixels`, `min_image_pixels`),
  so a decompression bomb is never decoded. Then the image is decoded (corrupt/truncated -> error).
* Image processing follows transformers' `Glm46VImageProcessorPil` with the engine dir's
  `preprocessor_config.json` (its `smart_resize` with factor 28, PIL bicubic, CLIP mean/std, patchify in
  merge-window order) in a numpy path that is 3-6x faster on large images. A request's images stop after
  the resize: `image_rgb` (the resized RGB images, flat uint8, 8x fewer bytes than float32 patches) and
  `image_grid_thw` [n, 3] int64; the llm patchifies and normalizes them on its GPU
  (`engine.model.vision.PatchNormalizer`). `Preprocessor.patchify` gives the uint8 patches [sum(gh*gw), 1176] and
  `Preprocessor.normalize` the float32 pixel_values, within 1e-6 of the processor's output (float
  rounding only; the grid is identical). `image_hashes` identify what the model sees: the sha256 hex of
  each resized image's size and RGB bytes (of a large image's parts' sha256s: `content_hash`), so the
  same picture hits the engine's prefix and image caches however it was encoded or sent. A small LRU of
  resized images by file digest (`resize_cache_bytes`) lets an image sent again skip its decode and resize
  (its header is still checked against the limits).
  With `pixels_by_reference`, a new image's shared file is written before the request goes on (its
  content hash computed on a hash thread meanwhile, the file's header written last), and when
  every image of a request is in the shared resize directory (`ResizeCache.shared_ref`), `image_refs`
  holds their files there and `image_rgb` is empty: the llm takes the embeddings it holds for them, or
  reads the files. An image the directory cannot take (no directory, too little free space) goes by value,
  and with it every image of its request.
  A request's images (two or more) are opened, decoded, resized and hashed on a few threads
  (`IMAGE_THREADS`), side by side and beside the prompt's template and tokenizer; errors are raised in
  image order, before the prompt's own.
* The prompt: `messages` (OpenAI-shaped JSON; `{"type": "image"}` / `image_url` parts take the images in
  order) or `text_input` with the images before the text in one user turn, rendered with the tokenizer's
  chat template (`add_generation_prompt=True`, `enable_thinking`); each `<|image|>` id is expanded to
  gh*gw/merge**2 copies. The prompt must leave room for one output token within `max_seq_len`.
* `mrope_positions` [3, L] int64 and `mrope_delta` come from `engine.model.rope.get_mrope_positions`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.config import EngineDir, ModelConfig
from engine.processing.chat import build_messages, parse_tools
from engine.processing.images import ImageInfo, decode_image_bytes, open_image
from engine.processing.limits import InputError, PreprocessLimits
from engine.processing.resize_cache import ResizeCache, shared_resize_dir_name

__all__ = ["STAGES", "PreprocessedRequest", "Preprocessor", "resized_size", "shared_resize_dir_name"]

# Threads per Preprocessor that open, decode, resize and hash a request's images (start_images).
IMAGE_THREADS = max(1, min(4, os.cpu_count() or 1))


class _Prepared(NamedTuple):
    """One image of a request, prepared: its resized RGB [h, w, 3] uint8 (read-only; None when only its
    shared file's header was read), its hash, its resize cache key if it was found there or its shared
    file written for this request (else None), its resized (height, width), and the image it came from."""

    rgb: np.ndarray | None
    image_hash: str
    cached_key: str | None
    size: tuple[int, int]
    info: ImageInfo


@dataclass
class PreprocessedRequest:
    input_ids: np.ndarray  # [L] int32, image tokens expanded
    image_rgb: np.ndarray  # flat uint8: the resized RGB images one after the other (resize_images)
    image_grid_thw: np.ndarray  # [num_images, 3] int64
    mrope_positions: np.ndarray  # [3, L] int64
    mrope_delta: int
    image_hashes: list[str] = field(default_factory=list)
    """sha256 hex of each resized image (its size and RGB bytes): what the model sees."""
    image_refs: list[str] = field(default_factory=list)
    """With ``pixels_by_reference`` and every image in the shared resize directory: each image's file there
    (``ResizeCache.shared_ref``), and ``image_rgb`` is empty."""
    prompt: str = ""  # the rendered chat template (before image expansion)
    is_thinking: bool = False  # the prompt leaves a <think> open: output starts as reasoning
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Where the call's time went (``STAGES``): the images (their share on this thread and the wait for
    their threads), the chat template, the tokens (tokenizer and image expansion), the positions."""


STAGES = ("images", "template", "tokens", "positions")


def resized_size(
    width: int, height: int, *, patch: int, merge: int, temporal: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(width, height) the image processor resizes a width x height image to: its smart_resize, with the
    processor's patch, merge and temporal sizes and its pixel limits (``size``'s shortest_edge and
    longest_edge in preprocessor_config.json)."""
    from transformers.models.glm46v.image_processing_pil_glm46v import smart_resize

    h, w = smart_resize(
        height=height,
        width=width,
        num_frames=temporal,
        factor=patch * merge,
        temporal_factor=temporal,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    return w, h


HASH_PART_BYTES = 1 << 20  # an image of at least two such parts is hashed in parts, side by side
HASH_PARTS = 4  # at most (the first on the calling thread, the others on `_HASH_PART_THREADS`)
# its threads start at the first large image
_HASH_PART_THREADS = ThreadPoolExecutor(HASH_PARTS - 1, thread_name_prefix="glmv-hash-part")


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def content_hash(rgb: np.ndarray, size: tuple[int, int] | None = None) -> str:
    """An image's content hash: sha256 hex of its size and RGB bytes (what the model sees). An image stored
    at its decoded size for the engine to resize to ``size`` (height, width): of that size, its own and its
    bytes (what the model sees follows from them). Bytes spanning two or more `HASH_PART_BYTES` parts
    (a 1288×728 screenshot's 2.8 MB: two) go in up to `HASH_PARTS` equal parts hashed side by side
    (hashlib leaves the GIL for the data), and the hash is that of the size and the parts' sha256s: the
    parts follow from the size, so one picture has one hash."""
    if size is None or tuple(size) == rgb.shape[:2]:
        digest = hashlib.sha256(b"%d,%d;" % rgb.shape[:2])
    else:
        digest = hashlib.sha256(b"%d,%d;from %d,%d;" % (*size, *rgb.shape[:2]))
    data = memoryview(np.ascontiguousarray(rgb)).cast("B")
    parts = min(HASH_PARTS, len(data) // HASH_PART_BYTES)
    if parts < 2:
        digest.update(data)
        return digest.hexdigest()
    step = -(-len(data) // parts)
    rest = [_HASH_PART_THREADS.submit(_sha256, data[i : i + step]) for i in range(step, len(data), step)]
    digest.update(b"parts %d;" % parts)
    digest.update(_sha256(data[:step]))
    for part in rest:
        digest.update(part.result())
    return digest.hexdigest()


class Preprocessor:
    """Turns (text or messages, images) into engine inputs for one engine directory."""

    def __init__(
        self,
        engine_dir: str | Path | EngineDir,
        limits: PreprocessLimits | None = None,
        resize_cache_bytes: int = 512 << 20,
        shared_resize_cache_dir: str | Path | None = None,
        shared_resize_cache_bytes: int = 0,
        resize_on_device: bool = False,
    ) -> None:
        """``resize_cache_bytes``: resized images kept by file digest in this process (0: none);
        ``shared_resize_cache_dir`` / ``_bytes``: a directory that the preprocessing instances of the host
        share, and its size (engine.processing.resize_cache). ``resize_on_device``: a new image that needs
        a resize and goes by reference is stored at its decoded size, for the engine to resize on its GPU
        (``image_source_sizes``), instead of resized here."""
        from transformers import AutoTokenizer
        from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

        d = engine_dir if isinstance(engine_dir, EngineDir) else None
        self.engine_dir = d.path if d is not None else Path(engine_dir)
        self.limits = limits or PreprocessLimits()
        self.resize_on_device = resize_on_device
        self.resize_cache = ResizeCache(
            resize_cache_bytes,
            shared_dir=None
            if shared_resize_cache_dir is None
            else Path(shared_resize_cache_dir) / shared_resize_dir_name(self.engine_dir),
            shared_max_bytes=shared_resize_cache_bytes,
        )
        self.model_config = (
            d.model_config() if d is not None else ModelConfig.from_pretrained(self.engine_dir)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.engine_dir))
        processor_file = self.engine_dir / "preprocessor_config.json"
        settings = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
        settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
        self.image_processor = Glm46VImageProcessorPil(**settings)
        self.merge_size = int(self.image_processor.merge_size)
        # the engine's device resize is PIL's bicubic one (engine.processing.resample)
        self._bicubic = int(self.image_processor.resample) == 3
        from engine.model.vision import PatchNormalizer

        proc = self.image_processor
        patch, merge, temporal = self._geometry()
        # The llm's own patchify + normalize (engine.model.vision), run here on the CPU for callers that want
        # patches or pixel values (the vision_encoder model, tests): one implementation of both.
        self.normalizer = PatchNormalizer(
            3 * temporal * patch**2,
            tuple(proc.image_mean),
            tuple(proc.image_std),
            float(proc.rescale_factor),
            "cpu",
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=temporal,
        )
        self.think_start_id = self._token_id("<think>")
        self.think_end_id = self._token_id("</think>")
        self._image_threads: ThreadPoolExecutor | None = None  # start_images, made on first use
        # content hashes of new images whose shared files are being written (its own threads: an image
        # thread may wait for one)
        self._hash_threads: ThreadPoolExecutor | None = None

    def warm_up(self) -> None:
        """Run one small request through every stage (image decode and resize, chat template, tokenizer,
        M-RoPE positions), so the first real request does not pay their one-time setup (~14 ms on
        CPU); the caches are left as they were."""

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, format="PNG")
        cache, self.resize_cache = self.resize_cache, ResizeCache(0)
        try:
            self("warm-up", [buffer.getvalue()])
        finally:
            self.resize_cache = cache

    def _token_id(self, token: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            return None
        return int(token_id)

    # -- images ---------------------------------------------------------------------------------------

    def load_images(self, raw_images: list[bytes | str]) -> list[ImageInfo]:
        """Each image opened and checked (`open_image`), decoded unless the resize cache has it."""
        self._check_image_count(raw_images)
        return [self._load_image(i, raw) for i, raw in enumerate(raw_images)]

    def _check_image_count(self, raw_images: list[bytes | str]) -> None:
        if len(raw_images) > self.limits.max_images_per_request:
            raise InputError(
                f"image_input: {len(raw_images)} images, over the limit of "
                f"{self.limits.max_images_per_request} per request (max_images_per_request)"
            )

    def _load_image(self, i: int, raw: bytes | str) -> ImageInfo:
        field_name = f"image_input[{i}]"
        data = decode_image_bytes(raw, field_name)
        file_hash = hashlib.sha256(data).hexdigest()
        is_known = file_hash in self.resize_cache
        return open_image(
            data,
            field_name,
            self.limits,
            decode=not is_known,
            file_hash=file_hash,
            png_fast_if=self._png_fast_if,
        )

    def _png_fast_if(self, width: int, height: int) -> bool:
        """Whether a width x height PNG goes to libspng: one the processor keeps at its size, or, with
        resize_on_device and a shared directory, any (the engine resizes it: no PIL image is made here
        unless it goes by value)."""
        return (self.resize_on_device and self._bicubic and self.resize_cache.shared_dir is not None) or (
            self._keeps_size(width, height)
        )

    def _keeps_size(self, width: int, height: int) -> bool:
        """Whether the processor leaves a width x height image at its size (no resize)."""
        return self._target_size(width, height) == (width, height)

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) smart_resize gives a width x height image, with this processor's settings."""
        patch, merge, temporal = self._geometry()
        proc = self.image_processor
        return resized_size(
            width,
            height,
            patch=patch,
            merge=merge,
            temporal=temporal,
            min_pixels=proc.size["shortest_edge"],
            max_pixels=proc.size["longest_edge"],
        )

    def start_images(self, raw_images: list[bytes | str], by_reference: bool = False) -> list[Future]:
        """Each image loaded and prepared (`load_images`, then `prepare_images`' work for it) on the image
        threads: a request's images side by side, and beside the prompt's template and tokenizer (PIL's
        decode and resize and hashlib's digest leave the GIL); a single image here, at once.
        ``by_reference``: an image found only in the shared resize directory is not read, only its file's
        header (`finish_images` reads it if the pixels go after all). `finish_images` collects them."""
        self._check_image_count(raw_images)

        def prepare(i: int, raw: bytes | str) -> _Prepared:
            return self._prepare_image(self._load_image(i, raw), by_reference)

        if len(raw_images) == 1:  # here: a thread's handoff costs a follow-up more than the overlap saves
            done: Future = Future()
            try:
                done.set_result(prepare(0, raw_images[0]))
            except BaseException as exc:
                done.set_exception(exc)
            return [done]
        if not raw_images:
            return []
        if self._image_threads is None:
            self._image_threads = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="glmv-image")
        return [self._image_threads.submit(prepare, i, raw) for i, raw in enumerate(raw_images)]

    def finish_images(
        self, started: list[Future], by_reference: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """`prepare_images`' result of `start_images`' work and, with ``by_reference`` when every image
        is in the shared resize directory, their files there (the RGB then empty); raises the first
        image's error in image order (after every image has ended)."""
        wait(started)
        prepared = [future.result() for future in started]
        refs = []
        for image in prepared if by_reference else ():
            ref = None if image.cached_key is None else self.resize_cache.shared_ref(image.cached_key)
            if ref is None:  # an image whose shared file is not there (not written, or gone): the pixels go
                refs = []
                break
            refs.append(ref)
        if refs:
            hashes = [image.image_hash for image in prepared]
            return np.zeros(0, np.uint8), self._grids(prepared), hashes, refs
        # the pixels go: those of images seen only by their file's header are read (or made) now
        prepared = [image if image.rgb is not None else self._prepare_image(image.info) for image in prepared]
        return (*self._assemble(prepared), [])

    def _geometry(self) -> tuple[int, int, int]:
        proc = self.image_processor
        return int(proc.patch_size), int(proc.merge_size), int(proc.temporal_patch_size)

    def resize_images(self, images: list[ImageInfo]) -> tuple[np.ndarray, np.ndarray]:
        """The resized RGB images, flat uint8 [sum(H*W*3)] (each [H, W, 3] row-major, one after the other;
        read-only: for one image it is the resize cache's own array), and image_grid_thw [n, 3] int64
        (H = gh * patch, W = gw * patch). What the llm receives."""
        rgb, grid, _ = self.prepare_images(images)
        return rgb, grid

    def prepare_images(self, images: list[ImageInfo]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """`resize_images` and each resized image's hash (sha256 hex of its size and RGB bytes)."""
        return self._assemble([self._prepare_image(info) for info in images])

    def _prepare_image(self, info: ImageInfo, by_reference: bool = False) -> _Prepared:
        """One image: from the resize cache, else decoded (if it was not), resized, hashed and put there.
        ``by_reference``: an image that only the shared directory holds comes from its file's header,
        without its pixels, and a new image's shared file is written now (the request sends its path);
        otherwise that file is written meanwhile and this request sends the pixels."""
        known = self.resize_cache.get(info.file_hash, shared=not by_reference)
        if known is not None:
            return _Prepared(known[0], known[1], info.file_hash, self._grid_size(known[0].shape[:2]), info)
        header = self.resize_cache.shared_header(info.file_hash) if by_reference else None
        if header is not None:
            height, width, image_hash = header
            return _Prepared(None, image_hash, info.file_hash, self._grid_size((height, width)), info)
        if not info.is_decoded:  # its cache entry went between the check and here
            info.image.load()
        shared = by_reference and self.resize_cache.shared_dir is not None
        width, height = self._target_size(info.width, info.height)
        keeps_size = (width, height) == (info.width, info.height)
        if shared and self.resize_on_device and not keeps_size and self._bicubic:
            rgb = self._rgb(info)  # at its decoded size: the engine resizes it on its device
        else:
            rgb = self._resize(info, (width, height))
        size = (height, width)
        if shared:
            # its shared file's pixels are written here while a hash thread computes the content hash
            if self._hash_threads is None:
                self._hash_threads = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="glmv-image-hash")
            image_hash = self._hash_threads.submit(content_hash, rgb, size)
        else:
            image_hash = content_hash(rgb)
        image_hash = self.resize_cache.put(info.file_hash, rgb, image_hash, write_now=by_reference)
        return _Prepared(rgb, image_hash, info.file_hash if by_reference else None, size, info)

    def _grid_size(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(height, width) the model sees of an image stored at ``shape`` (height, width): the processor's
        size for it, the same for an image resized already (smart_resize of its own output is the identity,
        or refuses the aspect ratio its rounding gave: then the stored size is the one)."""
        try:
            width, height = self._target_size(int(shape[1]), int(shape[0]))
        except ValueError:
            return int(shape[0]), int(shape[1])
        return height, width

    def _grids(self, prepared: list[_Prepared]) -> np.ndarray:
        patch = self._geometry()[0]
        grids = [(1, image.size[0] // patch, image.size[1] // patch) for image in prepared]
        return np.asarray(grids, dtype=np.int64).reshape(-1, 3)

    def _assemble(self, prepared: list[_Prepared]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if not prepared:
            return np.zeros(0, np.uint8), np.zeros((0, 3), np.int64), []
        parts = [self._at_size(image.rgb, image.size).reshape(-1) for image in prepared]
        rgb = parts[0] if len(parts) == 1 else np.concatenate(parts)  # one image: its cached array, no copy
        return rgb, self._grids(prepared), [image.image_hash for image in prepared]

    def _at_size(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``rgb`` resized here to ``size`` (height, width) if it is stored at its decoded size."""
        if rgb.shape[:2] == tuple(size):
            return rgb
        from PIL import Image

        resample = Image.Resampling(int(self.image_processor.resample))
        return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample=resample), dtype=np.uint8)

    def _rgb(self, info: ImageInfo) -> np.ndarray:
        """One image -> uint8 [H, W, 3] at its decoded size: RGB, transparency on white (libspng's RGB as
        it is, with no copy)."""
        pixels = info.pixels
        if pixels is not None and pixels.ndim == 3 and pixels.shape[2] == 3:
            return pixels
        return np.asarray(self._rgb_image(info), dtype=np.uint8)

    def _rgb_image(self, info: ImageInfo):
        from PIL import Image

        image = info.pil_image()
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # transparency is composited onto white, as transformers' convert_to_rgb does
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def _resize(self, info: ImageInfo, target: tuple[int, int]) -> np.ndarray:
        """One image -> uint8 [h, w, 3]: RGB (transparency on white), resized to smart_resize's size
        ``target`` (w, h)."""
        from PIL import Image

        if tuple(target) == (info.width, info.height):
            return self._rgb(info)  # at the model's size already (libspng's RGB: no copy)
        resample = Image.Resampling(int(self.image_processor.resample))
        return np.asarray(self._rgb_image(info).resize(target, resample=resample), dtype=np.uint8)

    # -- prompt ---------------------------------------------------------------------------------------

    def render(self, messages: list[dict], enable_thinking: bool, tools: list[dict] | None = None) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=enable_thinking,
            )
        except Exception as exc:  # jinja errors on a malformed conversation
            raise InputError(f"messages: the chat template cannot render them ({exc})") from None

    def __call__(
        self,
        text: str | None = None,
        images: list[bytes | str] | None = None,
        *,
        messages_json: str | None = None,
        enable_thinking: bool | None = None,
        tools_json: str | None = None,
        pixels_by_reference: bool = False,
    ) -> PreprocessedRequest:
        """``pixels_by_reference``: when every image is in the shared resize directory, hand their files
        there (``image_refs``) instead of the pixels (``image_rgb`` empty)."""
        import torch

        from engine.model.rope import get_mrope_positions

        t0 = time.perf_counter()
        started = self.start_images(list(images or []), pixels_by_reference)
        t1 = time.perf_counter()
        try:
            messages = build_messages(text, messages_json, len(started))
            thinking = self.limits.enable_thinking if enable_thinking is None else bool(enable_thinking)
            prompt = self.render(messages, thinking, parse_tools(tools_json))
        except Exception:
            self.finish_images(started)  # an image's own error comes first: the images are read first
            raise
        t2 = time.perf_counter()
        image_rgb, grid, image_hashes, image_refs = self.finish_images(started, pixels_by_reference)
        t3 = time.perf_counter()
        num_tokens_per_image = [int(t * h * w) // self.merge_size**2 for t, h, w in grid.tolist()]
        if sum(num_tokens_per_image) > self.limits.max_image_tokens_per_request:
            raise InputError(
                f"image_input: the images take {sum(num_tokens_per_image)} tokens, over the limit of "
                f"{self.limits.max_image_tokens_per_request} (max_image_tokens_per_request)"
            )
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        image_id = self.model_config.image_token_id
        expanded: list[int] = []
        image_idx = 0
        for token_id in ids:
            if token_id == image_id:
                if image_idx >= len(num_tokens_per_image):
                    raise InputError(
                        f"text_input: the prompt has more image placeholders than the {len(started)} images given"
                    )
                expanded.extend([image_id] * num_tokens_per_image[image_idx])
                image_idx += 1
            else:
                expanded.append(int(token_id))
        if image_idx != len(num_tokens_per_image):
            raise InputError(
                f"image_input: {len(started)} images but the rendered prompt has {image_idx} image placeholders"
            )
        max_prompt = self.limits.max_seq_len - 1
        if len(expanded) > max_prompt:
            raise InputError(
                f"text_input: the prompt is {len(expanded)} tokens (with images), over the limit of "
                f"{max_prompt} (max_seq_len {self.limits.max_seq_len} minus one output token)"
            )
        t4 = time.perf_counter()
        positions, delta = get_mrope_positions(expanded, torch.from_numpy(grid), self.model_config)
        input_ids = np.asarray(expanded, dtype=np.int32)
        t5 = time.perf_counter()
        return PreprocessedRequest(
            input_ids=input_ids,
            image_rgb=image_rgb,
            image_grid_thw=grid,
            mrope_positions=positions.numpy().astype(np.int64),
            mrope_delta=int(delta),
            image_hashes=image_hashes,
            image_refs=image_refs,
            prompt=prompt,
            is_thinking=self._is_thinking(input_ids),
            stage_seconds={
                "images": t1 - t0 + t3 - t2,
                "template": t2 - t1,
                "tokens": t4 - t3,
                "positions": t5 - t4,
            },
        )

    def _is_thinking(self, ids: np.ndarray) -> bool:
        """Whether the prompt ends inside a thinking block: its last think-start comes after its last
        think-end."""
        if self.think_start_id is None:
            return False
        starts = np.flatnonzero(ids == self.think_start_id)
        if not starts.size:
            return False
        ends = np.flatnonzero(ids == self.think_end_id) if self.think_end_id is not None else starts[:0]
        return int(starts[-1]) > (int(ends[-1]) if ends.size else -1)
