from __future__ import annotations

import copy
import json

import pytest

from benchmarks.metrics import RequestRecord, summarize
from benchmarks.plots import main as plots_main
from benchmarks.plots import plot_results
from benchmarks.results import device_slug, make_meta, results_dir, summary_markdown, validate


def _doc() -> dict:
    runs = []
    for c in (1, 4, 8):
        records = [
            RequestRecord(
                start_s=0, ttft_s=0.05 * c, e2e_s=1.0 + c / 10, itl_s=[0.01 * c] * 7, num_output_tokens=8
            )
            for _ in range(4)
        ]
        runs.append({"concurrency": c, **summarize(records, 2.0), "gpu_mem_gb": None})
    runs.append({"rate": 2.5, **summarize([], 1.0), "gpu_mem_gb": 12.5})
    args = {"target": "triton", "image_size": "448x448", "max_tokens": 8, "duration": 2}
    return {"meta": make_meta(args, "tiny"), "runs": runs}


def test_a_runner_document_is_valid() -> None:
    doc = _doc()
    validate(doc)
    assert doc["meta"]["date"].count("-") == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("meta"), "meta: missing"),
        (lambda d: d["meta"].update(date="21/11/2026"), "meta.date"),
        (lambda d: d.update(runs=[]), "runs: missing or empty"),
        (lambda d: d["runs"][0].update(rate=1.0), "exactly one of concurrency / rate"),
        (lambda d: d["runs"][0].update(concurrency=0), "runs[0].concurrency"),
        (lambda d: d["runs"][1].pop("errors"), "runs[1].errors"),
        (lambda d: d["runs"][2]["ttft_ms"].update(p95="fast"), "runs[2].ttft_ms.p95"),
        (lambda d: d["runs"][0].pop("itl_ms"), "runs[0].itl_ms"),
        (lambda d: d["runs"][0].pop("gpu_mem_gb"), "runs[0].gpu_mem_gb"),
    ],
)
def test_schema_violations_are_named(mutate, message: str) -> None:
    doc = copy.deepcopy(_doc())
    mutate(doc)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(doc)


def test_summary_table_has_one_row_per_run() -> None:
    text = summary_markdown(_doc())
    assert "| c=1 | 4 | 0 |" in text
    assert "| 2.5 req/s | 0 | 0 |" in text
    assert "| 12.50 |" in text


def test_results_dir_and_device_slug() -> None:
    meta = {"date": "2026-11-21", "device": "NVIDIA H100 80GB HBM3", "commit": "abc1234-dirty"}
    assert device_slug(meta["device"]) == "h100-80gb-hbm3"
    assert device_slug("cpu (x86_64, 2 cores)") == "cpu"
    assert results_dir("benchmarks/results", meta).name == "2026-11-21-h100-80gb-hbm3-abc1234"


def test_plots_are_written(tmp_path) -> None:
    doc = _doc()
    written = {p.name for p in plot_results(doc, tmp_path)}
    assert {
        "overview.png",
        "ttft.png",
        "itl.png",
        "throughput.png",
        "gpu_mem.png",
        "rate_overview.png",
    } <= written
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert plots_main([str(tmp_path / "results.json")]) == 0


def test_a_snapshot_tree_records_its_own_commit(tmp_path, monkeypatch) -> None:
    """benchmarks/snapshot_tree.sh writes SNAPSHOT_COMMIT: the snapshot's commit beats $GLMV_COMMIT (the
    call's, set for every tree) and the git of the checkout it sits in."""
    import benchmarks.results as results

    monkeypatch.setenv("GLMV_COMMIT", "1111111")
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)
    assert results.git_commit() == "1111111"
    (tmp_path / "SNAPSHOT_COMMIT").write_text("e2fec5b\n")
    assert results.git_commit() == "e2fec5b"
