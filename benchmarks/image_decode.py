"""What decoding a new image costs the preprocessing model: ``python -m benchmarks.image_decode --out DIR``.

CPU only, in this process (no Triton): a tiny checkpoint with the full-size model's image processor (its
pixel limit keeps a 1288×728 screenshot at 1288×728), and the `Preprocessor` with no resize cache, so every
request decodes, resizes and hashes its image. For each corpus kind (screenshots and documents are PNG,
product photos JPEG) and size: the median time per request and of its `images` stage, with PNGs decoded by
libspng (`engine.processing.images.pyspng`) and by PIL (`pyspng` set to None): each image both ways in
turn, the first way alternating by round, so that drift of the host shows in both. Writes
``image_decode.json`` (meta: device, date, commit) into ``--out`` and prints a table.

``--compare resize``: new images sent by reference (each round on fresh shared directories), resized by PIL
in preprocessing against stored at their decoded size for the engine to resize on its device
(``Preprocessor(resize_on_device=True)``, glmv-build ``--resize-on-device``); the engine's own resize is not
in these figures. Writes ``image_resize.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.results import make_meta

KINDS = ("screenshot", "document", "product")


def _time_ms(pre, sample) -> tuple[float, float]:
    """(ms for the request, ms of its images stage)."""
    started = time.perf_counter()
    out = pre("What does it say?", list(sample.images))
    return (time.perf_counter() - started) * 1e3, out.stage_seconds["images"] * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="1288x728,1920x1080,448x448")
    ap.add_argument("--samples", type=int, default=12, help="images per kind and size (each a new one)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds over the images, each image both ways in each"
    )
    ap.add_argument(
        "--compare",
        choices=("decoder", "resize"),
        default="decoder",
        help="decoder: libspng against PIL; resize: new images by reference, resized in preprocessing "
        "against stored at their decoded size for the engine to resize (--resize-on-device; the engine's "
        "resize not included)",
    )
    args = ap.parse_args(argv)
    if args.compare == "resize":
        return _compare_resize(args)
    from benchmarks.corpus import parse_size
    from engine.processing import images
    from engine.processing.preprocess import Preprocessor

    if images.pyspng is None:
        raise SystemExit("pyspng is not importable here: nothing to compare")
    spng = images.pyspng
    rows = []
    with tempfile.TemporaryDirectory(prefix="glmv-image-decode-") as tmp:
        pre = Preprocessor(_full_size_checkpoint(Path(tmp)), resize_cache_bytes=0)
        pre.warm_up()
        for size_text in args.sizes.split(","):
            for kind, samples in _samples_by_kind(parse_size(size_text), args.samples).items():
                if not samples:
                    continue
                times: dict[str, tuple[list[float], list[float]]] = {"libspng": ([], []), "PIL": ([], [])}
                ways = [("libspng", spng), ("PIL", None)]
                for r in range(args.rounds):
                    for sample in samples:  # each image both ways in turn, the first way alternating by round
                        for name, module in ways if r % 2 == 0 else ways[::-1]:
                            images.pyspng = module
                            total, stage = _time_ms(pre, sample)
                            times[name][0].append(total)
                            times[name][1].append(stage)
                images.pyspng = spng
                row = {
                    "size": size_text,
                    "kind": kind,
                    "format": samples[0].images[0][:4].hex(),
                    "n": len(samples),
                }
                for name, (total, stage) in times.items():
                    row[f"{name}_request_ms"] = round(statistics.median(total), 3)
                    row[f"{name}_images_ms"] = round(statistics.median(stage), 3)
                rows.append(row)
                print(
                    f"{size_text} {kind}: per request {row['PIL_request_ms']:.2f} -> {row['libspng_request_ms']:.2f} ms, "
                    f"images stage {row['PIL_images_ms']:.2f} -> {row['libspng_images_ms']:.2f} ms (PIL -> libspng)"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": make_meta(vars(args) | {"out": str(args.out)}, "tiny + full-size image processor"),
        "rows": rows,
    }
    (args.out / "image_decode.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _full_size_checkpoint(out: Path) -> Path:
    """A tiny checkpoint with the full-size model's image processor."""
    from build_engine.checkpoint import FULL_SIZE_MAX_IMAGE_TOKENS, make_tiny_checkpoint, preprocessor_config

    checkpoint = make_tiny_checkpoint(out, preset="tiny", seed=0)
    (checkpoint / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(FULL_SIZE_MAX_IMAGE_TOKENS))
    )
    return checkpoint


def _samples_by_kind(size: tuple[int, int], count: int) -> dict[str, list]:
    """Up to ``count`` corpus samples of each kind at ``size``, the same ones in every run."""
    from benchmarks.corpus import Corpus

    corpus = Corpus(sizes=[size], pool_size=8 * count, seed=4242)
    by_kind: dict[str, list] = {kind: [] for kind in KINDS}
    for i in range(8 * count):
        sample = corpus.sample(i)
        if len(by_kind[sample.kind]) < count:
            by_kind[sample.kind].append(sample)
    return by_kind


def _compare_resize(args: argparse.Namespace) -> int:
    """Per kind and size: ms per request of a new image sent by reference, resized by PIL here against
    stored at its decoded size (``resize_on_device``); each round on fresh shared directories, so that
    every image is new to both, each image both ways in turn."""
    from benchmarks.corpus import parse_size
    from engine.processing.preprocess import Preprocessor

    rows = []
    with tempfile.TemporaryDirectory(prefix="glmv-image-resize-") as tmp:
        checkpoint = _full_size_checkpoint(Path(tmp) / "checkpoint")
        for size_text in args.sizes.split(","):
            for kind, samples in _samples_by_kind(parse_size(size_text), args.samples).items():
                times: dict[str, list[float]] = {"preprocessing": [], "device": []}
                for r in range(args.rounds):
                    pres = {
                        name: Preprocessor(
                            checkpoint,
                            resize_cache_bytes=0,
                            shared_resize_cache_dir=Path(tmp) / f"shared-{r}-{name}",
                            shared_resize_cache_bytes=4 << 30,
                            resize_on_device=name == "device",
                        )
                        for name in times
                    }
                    for sample in samples:
                        for name in list(times) if r % 2 == 0 else list(times)[::-1]:
                            started = time.perf_counter()
                            out = pres[name](
                                "What does it say?", list(sample.images), pixels_by_reference=True
                            )
                            times[name].append((time.perf_counter() - started) * 1e3)
                            if not out.image_refs:
                                raise SystemExit(f"{size_text} {kind}: not sent by reference")
                    shutil.rmtree(Path(tmp) / f"shared-{r}-preprocessing", ignore_errors=True)
                    shutil.rmtree(Path(tmp) / f"shared-{r}-device", ignore_errors=True)
                row = {"size": size_text, "kind": kind, "n": len(samples)}
                row.update(
                    {f"{name}_request_ms": round(statistics.median(v), 3) for name, v in times.items()}
                )
                rows.append(row)
                print(
                    f"{size_text} {kind}: per request {row['preprocessing_request_ms']:.2f} (resized here) -> "
                    f"{row['device_request_ms']:.2f} ms (stored at its decoded size)"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = make_meta(vars(args) | {"out": str(args.out)}, "tiny + full-size image processor")
    (args.out / "image_resize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
