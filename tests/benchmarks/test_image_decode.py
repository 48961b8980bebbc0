"""benchmarks.image_decode on CPU: one row per corpus kind and size, each timed with libspng and with PIL."""

from __future__ import annotations

import json
from pathlib import Path


def test_image_decode_times_each_kind_both_ways(tmp_path: Path) -> None:
    from benchmarks.image_decode import KINDS, main
    from engine.processing import images

    assert main(["--out", str(tmp_path), "--sizes", "448x448", "--samples", "2", "--rounds", "1"]) == 0
    assert images.pyspng is not None  # put back after the PIL rounds
    doc = json.loads((tmp_path / "image_decode.json").read_text())
    rows = {row["kind"]: row for row in doc["rows"]}
    assert sorted(rows) == sorted(KINDS)
    assert rows["screenshot"]["format"] == "89504e47" and rows["product"]["format"].startswith("ffd8ff")
    for row in rows.values():
        assert row["size"] == "448x448" and row["n"] == 2
        for name in ("libspng", "PIL"):
            assert 0 < row[f"{name}_images_ms"] <= row[f"{name}_request_ms"]
    assert doc["meta"]["commit"]


def test_image_resize_times_each_kind_both_ways(tmp_path: Path) -> None:
    from benchmarks.image_decode import KINDS, main

    argv = [
        "--out",
        str(tmp_path),
        "--compare",
        "resize",
        "--sizes",
        "500x300",
        "--samples",
        "1",
        "--rounds",
        "1",
    ]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "image_resize.json").read_text())
    assert sorted(row["kind"] for row in doc["rows"]) == sorted(KINDS)
    for row in doc["rows"]:
        assert row["size"] == "500x300" and row["n"] == 1
        assert row["preprocessing_request_ms"] > 0 and row["device_request_ms"] > 0
