"""ResizeCache and the Preprocessor with a shared directory: a second instance (another process in Triton)
answers an image the first one resized without decoding or resizing it, byte for byte the same; the
directory stays within its bytes, oldest first, except files handed out by reference in the last seconds; a
damaged entry is a miss and goes away; a reference is read only inside the server's own directory."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.processing.preprocess import Preprocessor
from engine.processing.resize_cache import PROTECT_S, ResizeCache, read_shared_ref


def png(seed: int, size=(300, 200)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"), "RGB").save(buf, "PNG")
    return buf.getvalue()


def test_a_second_instance_reads_what_the_first_resized(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    shared = {"shared_resize_cache_dir": tmp_path, "shared_resize_cache_bytes": 64 << 20}
    first = Preprocessor(tiny_checkpoint, **shared)
    second = Preprocessor(tiny_checkpoint, **shared)
    image = png(1)
    want = first("What is this?", [image])
    first.resize_cache.flush()

    def no_resize(*args, **kwargs):
        raise AssertionError("resized again")

    monkeypatch.setattr(second, "_resize", no_resize)
    got = second("What is this?", [image])
    assert second.resize_cache.num_shared_hits == 1
    np.testing.assert_array_equal(got.image_rgb, want.image_rgb)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    assert got.image_hashes == want.image_hashes
    # one image is handed out as the cache's own array, read-only in either instance: no copy, and nobody
    # can change what the next request about it gets
    again = first("Another question?", [image])
    assert np.shares_memory(again.image_rgb, first.resize_cache.get(again_key(first, image))[0])
    for out in (want, got, again):
        assert not out.image_rgb.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            out.image_rgb[0] = 1
    # settings are part of the directory's name: another image processor config never reads these entries
    (entry,) = list(tmp_path.iterdir())
    assert entry.name.startswith("glmv-resize-") and len(list(entry.glob("*.rgb"))) == 1


def again_key(pre: Preprocessor, image: bytes) -> str:
    import hashlib

    return hashlib.sha256(image).hexdigest()  # the resize cache's key: the file's digest


def test_the_directory_keeps_its_bytes_oldest_first(tmp_path: Path):
    rgb = np.zeros((10, 10, 3), np.uint8)
    entry_bytes = 80 + rgb.nbytes
    cache = ResizeCache(0, shared_dir=tmp_path, shared_max_bytes=3 * entry_bytes)
    for i in range(3):
        cache.put(f"k{i}", rgb + i, "ab" * 32)
        cache.flush()
        os.utime(tmp_path / f"k{i}.rgb", (time.time() - 100 + i, time.time() - 100 + i))
    assert ResizeCache(0, tmp_path, 3 * entry_bytes).get("k0")[1] == "ab" * 32  # a hit refreshes k0
    cache.put("k3", rgb + 3, "cd" * 32)
    cache.flush()
    assert sorted(p.name for p in tmp_path.glob("*.rgb")) == ["k0.rgb", "k2.rgb", "k3.rgb"]
    reader = ResizeCache(0, tmp_path, 3 * entry_bytes)
    got = reader.get("k3")
    assert got[1] == "cd" * 32 and (got[0] == 3).all() and got[0].shape == (10, 10, 3)


def test_an_image_written_by_its_request_leaves_the_trim_to_the_writer_thread(tmp_path: Path, monkeypatch):
    """`put(write_now=True)`: the file is there when `put` returns, and the directory is trimmed back to its
    bytes (oldest first) by the writer thread, never by the request's."""
    rgb = np.zeros((10, 10, 3), np.uint8)
    entry_bytes = 80 + rgb.nbytes
    cache = ResizeCache(0, shared_dir=tmp_path, shared_max_bytes=2 * entry_bytes)
    old = time.time() - PROTECT_S - 5
    for i in range(2):
        cache.put(f"k{i}", rgb + i, "ab" * 32)
        cache.flush()
        os.utime(tmp_path / f"k{i}.rgb", (old + i, old + i))
    trims = []
    trim = cache._trim
    monkeypatch.setattr(
        cache, "_trim", lambda budget: (trims.append(threading.current_thread().name), trim(budget))
    )
    cache.put("k2", rgb + 2, "cd" * 32, write_now=True)
    assert cache.shared_ref("k2") == str(tmp_path / "k2.rgb")
    cache.flush()
    assert trims == ["resize-cache-writer"]
    assert sorted(p.name for p in tmp_path.glob("*.rgb")) == ["k1.rgb", "k2.rgb"]
    assert ResizeCache(0, tmp_path, 2 * entry_bytes).get("k2")[1] == "cd" * 32


def test_a_hash_still_being_computed_goes_into_the_header_after_the_pixels(tmp_path: Path):
    """`put(write_now=True)` with the content hash as a Future: the pixels are written while it is pending,
    the header once it is known; `put` returns it, and the entry reads back whole."""
    from concurrent.futures import Future

    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    cache = ResizeCache(0, shared_dir=tmp_path, shared_max_bytes=1 << 20)
    pending: Future = Future()
    threading.Timer(0.05, pending.set_result, ["ab" * 32]).start()
    assert cache.put("k", rgb, pending, write_now=True) == "ab" * 32
    assert (tmp_path / "k.rgb").stat().st_size == 80 + rgb.nbytes
    got = ResizeCache(0, tmp_path, 1 << 20).get("k")
    assert got[1] == "ab" * 32 and (got[0] == rgb).all()
    assert cache.get("k")[1] == "ab" * 32  # this process's LRU has it too


def test_a_damaged_entry_is_a_miss_and_goes_away(tmp_path: Path):
    cache = ResizeCache(0, shared_dir=tmp_path, shared_max_bytes=1 << 20)
    cache.put("k", np.ones((4, 4, 3), np.uint8), "ef" * 32)
    cache.flush()
    path = tmp_path / "k.rgb"
    path.write_bytes(path.read_bytes()[:-1])
    assert cache.get("k") is None and not path.exists()


def test_files_handed_out_by_reference_are_kept_for_a_while(tmp_path: Path):
    rgb = np.zeros((10, 10, 3), np.uint8)
    entry_bytes = 80 + rgb.nbytes
    cache = ResizeCache(0, shared_dir=tmp_path, shared_max_bytes=2 * entry_bytes)
    assert cache.shared_ref("k0") is None  # nothing written yet
    old = time.time() - PROTECT_S - 5
    for i in range(2):
        cache.put(f"k{i}", rgb + i, "ab" * 32)
        cache.flush()
        os.utime(tmp_path / f"k{i}.rgb", (old + i, old + i))
    assert cache.shared_ref("k0") == str(tmp_path / "k0.rgb")  # refreshed: k1 is now the oldest
    cache.put("k2", rgb + 2, "cd" * 32)
    cache.flush()
    assert sorted(p.name for p in tmp_path.glob("*.rgb")) == ["k0.rgb", "k2.rgb"]
    # over its bytes, but both files were touched within PROTECT_S: the directory keeps them for now
    cache.put("k3", rgb + 3, "ef" * 32)
    cache.flush()
    assert sorted(p.name for p in tmp_path.glob("*.rgb")) == ["k0.rgb", "k2.rgb", "k3.rgb"]
    for name in ("k0", "k2"):
        os.utime(tmp_path / f"{name}.rgb", (old, old))
    cache.put("k4", rgb + 4, "ef" * 32)
    cache.flush()
    assert sorted(p.name for p in tmp_path.glob("*.rgb")) == ["k3.rgb", "k4.rgb"]


def test_a_reference_is_read_only_inside_the_servers_own_directory(tmp_path: Path):
    shared = tmp_path / "glmv-resize-0123456789abcdef"
    cache = ResizeCache(0, shared_dir=shared, shared_max_bytes=1 << 20)
    key = "a" * 64
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    cache.put(key, rgb, "cd" * 32)
    cache.flush()
    ref = cache.shared_ref(key)
    got, image_hash = read_shared_ref(ref, shared.name)
    np.testing.assert_array_equal(got, rgb)
    assert image_hash == "cd" * 32 and got.flags.writeable  # handed to torch as it is
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / f"{key}.rgb").write_bytes((shared / f"{key}.rgb").read_bytes())
    for bad in ("/etc/passwd", str(other / f"{key}.rgb"), str(shared / "notes.txt"), f"{key}.rgb",
                str(shared / ".." / shared.name / "x.rgb")):  # fmt: skip
        with pytest.raises(ValueError, match=r"^image_ref\[0\]: .* is not an entry of this server's shared"):
            read_shared_ref(bad, shared.name, "image_ref[0]")
    into = np.zeros(rgb.nbytes + 4, np.uint8)  # read straight into a slice of a bigger buffer
    got, _ = read_shared_ref(ref, shared.name, out=into[2:-2])
    np.testing.assert_array_equal(got, rgb)
    assert into[:2].tolist() == into[-2:].tolist() == [0, 0] and np.shares_memory(got, into)
    with pytest.raises(
        ValueError, match=r"^image_ref\[1\]: a \d+x\d+ image \(\d+ bytes\), not the \d+ bytes of its"
    ):
        read_shared_ref(ref, shared.name, "image_ref[1]", out=into)
    with pytest.raises(ValueError, match=r"^image_ref: .* could not be read .*send the request again"):
        read_shared_ref(str(shared / f"{'b' * 64}.rgb"), shared.name)
    (shared / f"{'c' * 64}.rgb").write_bytes(b"GLMVRGB1 not an entry")
    with pytest.raises(ValueError, match=r"^image_ref: .* does not hold a resized image"):
        read_shared_ref(str(shared / f"{'c' * 64}.rgb"), shared.name)


def test_images_in_the_shared_directory_go_by_reference(tiny_checkpoint: Path, tmp_path: Path):
    """A new image's shared file is written before the request goes on, so it goes by reference as an
    image seen before does; an image the directory cannot take goes by value, and with it every image of
    its request."""
    pre = Preprocessor(tiny_checkpoint, shared_resize_cache_dir=tmp_path, shared_resize_cache_bytes=64 << 20)
    image, other = png(7), png(8, (120, 90))
    by_value = pre("What is this?", [image])  # not asked: the pixels (its file is written meanwhile)
    assert by_value.image_refs == [] and by_value.image_rgb.size
    new = Preprocessor(
        tiny_checkpoint, shared_resize_cache_dir=tmp_path / "new", shared_resize_cache_bytes=64 << 20
    )
    first = new("What is this?", [image], pixels_by_reference=True)
    (ref,) = first.image_refs  # written before the request went on
    assert first.image_rgb.size == 0 and Path(ref).parent.parent == tmp_path / "new"
    got, image_hash = read_shared_ref(ref, Path(ref).parent.name)
    np.testing.assert_array_equal(got.reshape(-1), by_value.image_rgb)
    assert [image_hash] == first.image_hashes == by_value.image_hashes
    again = new("What is this?", [image], pixels_by_reference=True)
    assert again.image_refs == [ref] and again.image_rgb.size == 0
    for out in (first, again):
        np.testing.assert_array_equal(out.image_grid_thw, by_value.image_grid_thw)
        np.testing.assert_array_equal(out.input_ids, by_value.input_ids)
        np.testing.assert_array_equal(out.mrope_positions, by_value.mrope_positions)
    both = new("And these?", [image, other], pixels_by_reference=True)
    assert len(both.image_refs) == 2 and both.image_refs[0] == ref and both.image_rgb.size == 0
    # all or nothing: a directory too small for the bigger image sends both by value
    patch = int(new.image_processor.patch_size)
    sizes = [int(h * w) * patch**2 * 3 + 80 for _, h, w in both.image_grid_thw.tolist()]
    assert sizes[0] != sizes[1]
    small = Preprocessor(
        tiny_checkpoint, shared_resize_cache_dir=tmp_path / "small", shared_resize_cache_bytes=min(sizes)
    )
    mixed = small("And these?", [image, other], pixels_by_reference=True)
    grid = mixed.image_grid_thw
    assert (
        mixed.image_refs == [] and mixed.image_rgb.size == int((grid[:, 1] * grid[:, 2]).sum()) * patch**2 * 3
    )
    np.testing.assert_array_equal(both.image_grid_thw, mixed.image_grid_thw)
    assert new("What is this?", [image]).image_refs == []


def test_another_instance_sends_a_shared_image_by_reference_from_its_header(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch
):
    """An instance that meets an image only in the shared directory sends its file from the header alone
    (its pixels never read, nothing kept in its LRU); when the file goes before the request is finished,
    the pixels are read after all (here: made anew, the file gone), equal to the first instance's."""
    shared = {"shared_resize_cache_dir": tmp_path, "shared_resize_cache_bytes": 64 << 20}
    first, second = Preprocessor(tiny_checkpoint, **shared), Preprocessor(tiny_checkpoint, **shared)
    image = png(11, (260, 180))
    want = first("What is this?", [image])
    first.resize_cache.flush()

    def no_read(key):
        raise AssertionError("the pixels of a file sent by reference were read")

    with monkeypatch.context() as patched:
        patched.setattr(second.resize_cache, "_read_shared", no_read)
        got = second("Another question?", [image], pixels_by_reference=True)
    (ref,) = got.image_refs
    assert got.image_rgb.size == 0 and got.image_hashes == want.image_hashes
    np.testing.assert_array_equal(got.image_grid_thw, want.image_grid_thw)
    assert not second.resize_cache._entries and second.resize_cache.num_shared_hits == 1
    # the file goes between the images' start and the request's end: the pixels go, made anew
    third = Preprocessor(tiny_checkpoint, **shared)
    started = third.start_images([image], by_reference=True)
    Path(ref).unlink()
    rgb, grid, hashes, refs = third.finish_images(started, by_reference=True)
    assert refs == [] and hashes == want.image_hashes
    np.testing.assert_array_equal(rgb, want.image_rgb)
    np.testing.assert_array_equal(grid, want.image_grid_thw)


def test_a_shared_header_is_read_only_from_a_whole_entry(tmp_path: Path):
    cache = ResizeCache(0, shared_dir=tmp_path, shared_max_bytes=64 << 20)
    rgb = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    cache.put("k", rgb, "ab" * 32)
    cache.flush()
    path = tmp_path / "k.rgb"
    os.utime(path, (1, 1))
    assert cache.shared_header("k") == (6, 4, "ab" * 32)
    assert path.stat().st_mtime > 1  # a hit: trimmed last
    assert cache.shared_header("missing") is None
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # cut short
    assert cache.shared_header("k") is None
    path.write_bytes(b"NOTGLMV!" + data[8:])
    assert cache.shared_header("k") is None
    assert ResizeCache(0).shared_header("k") is None  # no shared directory


@pytest.mark.parametrize("max_bytes", [0, 1 << 20])
def test_the_process_lru_keeps_its_bytes(max_bytes: int):
    cache = ResizeCache(max_bytes)
    rgb = np.zeros((100, 100, 3), np.uint8)  # 30 kB each
    for i in range(50):
        cache.put(f"k{i}", rgb, "00" * 32)
    held = [f"k{i}" for i in range(50) if f"k{i}" in cache]
    assert held == ([] if max_bytes == 0 else [f"k{i}" for i in range(50 - (1 << 20) // rgb.nbytes, 50)])


def test_warm_up_runs_every_stage_and_leaves_the_caches_as_they_were(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch
):
    shared = {"shared_resize_cache_dir": tmp_path, "shared_resize_cache_bytes": 64 << 20}
    pre = Preprocessor(tiny_checkpoint, **shared)
    stages = []
    for name in ("_resize", "render"):
        original = getattr(pre, name)
        monkeypatch.setattr(pre, name, lambda *a, _f=original, _n=name, **k: stages.append(_n) or _f(*a, **k))
    pre.warm_up()
    assert stages == ["_resize", "render"]  # one image: prepared at once, then the prompt
    assert not pre.resize_cache._entries and pre.resize_cache._writer is None
    assert not list(pre.resize_cache.shared_dir.iterdir())
    image = png(2)
    pre("What is this?", [image])  # the real cache still works afterwards
    pre.resize_cache.flush()
    assert len(pre.resize_cache._entries) == 1 and len(list(pre.resize_cache.shared_dir.iterdir())) == 1


def test_resize_on_device_stores_new_images_at_their_decoded_size(tiny_checkpoint: Path, tmp_path: Path):
    """With resize_on_device, a new image that needs a resize and goes by reference is stored (its shared
    file too) at its decoded size, hashed over its target size, its own size and its pixels; the grid,
    ids and positions are those of the image resized here. An instance that meets it only in the shared
    directory takes the target size from the file's; sent by value, it is resized here (PIL's pixels) and
    keeps its hash. An image kept at its size is stored and hashed as without the option."""
    from engine.processing.preprocess import content_hash

    shared = {"shared_resize_cache_bytes": 64 << 20}
    plain = Preprocessor(tiny_checkpoint, shared_resize_cache_dir=tmp_path / "plain", **shared)
    image = png(21, (300, 200))  # the tiny processor resizes it
    want = plain("What is this?", [image])
    device = Preprocessor(
        tiny_checkpoint, shared_resize_cache_dir=tmp_path / "device", resize_on_device=True, **shared
    )
    first = device("What is this?", [image], pixels_by_reference=True)
    (ref,) = first.image_refs
    stored, file_hash = read_shared_ref(ref, Path(ref).parent.name)
    decoded = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    np.testing.assert_array_equal(stored, decoded)
    (grid,) = want.image_grid_thw.tolist()
    patch = int(device.image_processor.patch_size)
    target = (grid[1] * patch, grid[2] * patch)
    assert target != decoded.shape[:2]
    assert first.image_hashes == [file_hash] == [content_hash(decoded, target)] != want.image_hashes
    for name in ("image_grid_thw", "input_ids", "mrope_positions"):
        np.testing.assert_array_equal(getattr(first, name), getattr(want, name))
    other = Preprocessor(
        tiny_checkpoint, shared_resize_cache_dir=tmp_path / "device", resize_on_device=True, **shared
    )
    again = other("And now?", [image], pixels_by_reference=True)
    assert again.image_refs == [ref] and again.image_hashes == first.image_hashes
    np.testing.assert_array_equal(again.image_grid_thw, want.image_grid_thw)
    by_value = device("What is this?", [image])  # its entry is stored at the decoded size
    np.testing.assert_array_equal(by_value.image_rgb, want.image_rgb)
    assert by_value.image_hashes == first.image_hashes
    kept = png(22, (140, 112))  # the tiny processor keeps 140x112
    kept_plain, kept_device = plain("q", [kept]), device("q", [kept], pixels_by_reference=True)
    assert kept_device.image_hashes == kept_plain.image_hashes
    np.testing.assert_array_equal(
        read_shared_ref(kept_device.image_refs[0], Path(ref).parent.name)[0].reshape(-1), kept_plain.image_rgb
    )


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_resize_on_device_decodes_pngs_to_be_resized_by_libspng(
    tiny_checkpoint: Path, tmp_path: Path, mode: str
):
    """With resize_on_device and a shared directory, a still PNG the processor resizes is decoded by libspng
    too (without the option: by PIL, whose resize needs a PIL image), into the pixels PIL gives (gray to
    RGB, transparency on white), by reference and, resized here, by value; an RGB one is stored as decoded,
    with no copy."""
    pytest.importorskip("pyspng")
    rng = np.random.default_rng(30)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = (rng.random((200, 300, channels)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(buf, "PNG")
    image = buf.getvalue()
    shared = {"shared_resize_cache_bytes": 64 << 20}
    plain = Preprocessor(tiny_checkpoint, shared_resize_cache_dir=tmp_path / "plain", **shared)
    device = Preprocessor(
        tiny_checkpoint, shared_resize_cache_dir=tmp_path / "device", resize_on_device=True, **shared
    )
    assert plain.load_images([image])[0].pixels is None
    (info,) = device.load_images([image])
    assert info.pixels is not None and info.pixels.shape[:2] == (200, 300)
    rgba = Image.open(io.BytesIO(image)).convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    want_rgb = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    stored = device._rgb(info)
    np.testing.assert_array_equal(stored, want_rgb)
    assert (stored is info.pixels) == (mode == "RGB")
    first = device("What is this?", [image], pixels_by_reference=True)
    (ref,) = first.image_refs
    np.testing.assert_array_equal(read_shared_ref(ref, Path(ref).parent.name)[0], want_rgb)
    fresh = Preprocessor(
        tiny_checkpoint, shared_resize_cache_dir=tmp_path / "fresh", resize_on_device=True, **shared
    )
    by_value = fresh("What is this?", [image])
    np.testing.assert_array_equal(by_value.image_rgb, plain("What is this?", [image]).image_rgb)
