"""benchmarks.preprocess_idle on CPU: one row per condition, each with its wall and thread CPU time and the
preprocessing stages of a follow-up request."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def test_preprocess_idle_times_each_condition(tmp_path: Path) -> None:
    from benchmarks.preprocess_idle import main

    argv = ["--out", str(tmp_path), "--gaps-ms", "1,2.5", "--touch-mb", "1", "--rounds", "3"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "preprocess_idle.json").read_text())
    rows = doc["rows"]
    assert list(rows) == ["back_to_back", "after_1_ms_idle", "after_2.5_ms_idle", "after_touching_1_mb"]
    for row in rows.values():
        assert set(row["stages_ms"]) == {"images", "template", "tokens", "positions"}
        # medians: each stage's is at most the wall's (every round's stage fits in its wall), but medians
        # of the stages need not add up to less than the wall's median
        assert 0 < sum(row["stages_ms"].values()) and max(row["stages_ms"].values()) <= row["wall_ms"]
        assert 0 < row["thread_cpu_ms"]
    assert doc["meta"]["commit"] and doc["meta"]["args"]["touch_mb"] == 1


def test_preprocess_idle_spins_and_holds_the_latency_request(tmp_path: Path) -> None:
    """--spin busy-waits the gaps (rows named so); --cpu-dma-latency-us holds the PM QoS request during the run
    (where this process may open /dev/cpu_dma_latency; else a usage error naming it)."""
    from benchmarks.preprocess_idle import main

    argv = ["--out", str(tmp_path), "--gaps-ms", "2", "--touch-mb", "1", "--rounds", "2", "--spin"]
    if os.access("/dev/cpu_dma_latency", os.W_OK):
        argv += ["--cpu-dma-latency-us", "0"]
    else:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--cpu-dma-latency-us", "0"])
        assert exc.value.code == 2
    assert main(argv) == 0
    doc = json.loads((tmp_path / "preprocess_idle.json").read_text())
    assert list(doc["rows"]) == ["back_to_back", "after_2_ms_spin", "after_touching_1_mb"]
    assert doc["meta"]["args"]["spin"] is True
