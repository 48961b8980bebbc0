"""benchmarks.preprocess_idle on CPU: one row per condition, each with its wall and thread CPU time and the
preprocessing stages of a follow-up request."""

from __future__ import annotations

import json
from pathlib import Path


def test_preprocess_idle_times_each_condition(tmp_path: Path) -> None:
    from benchmarks.preprocess_idle import main

    argv = ["--out", str(tmp_path), "--gaps-ms", "1,2.5", "--touch-mb", "1", "--rounds", "3"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "preprocess_idle.json").read_text())
    rows = doc["rows"]
    assert list(rows) == ["back_to_back", "after_1_ms_idle", "after_2.5_ms_idle", "after_touching_1_mb"]
    for row in rows.values():
        assert set(row["stages_ms"]) == {"images", "template", "tokens", "positions"}
        assert 0 < sum(row["stages_ms"].values()) <= row["wall_ms"]
        assert 0 < row["thread_cpu_ms"]
    assert doc["meta"]["commit"] and doc["meta"]["args"]["touch_mb"] == 1
