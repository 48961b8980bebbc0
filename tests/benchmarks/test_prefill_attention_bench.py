"""benchmarks.prefill_attention_bench on CPU: it refuses to run without a GPU, naming why; the committed H100
run holds every candidate at every length, each with a time or its error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import prefill_attention_bench
from benchmarks.results import REPO_ROOT

COMMITTED = (
    REPO_ROOT
    / "benchmarks/results/2026-12-07-h100-idle-poll-b9a00b3/prefill-attention/prefill_attention.json"
)


def test_refuses_without_a_gpu(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exc:
        prefill_attention_bench.main(["--out", str(tmp_path)])
    assert exc.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_committed_run_has_every_candidate() -> None:
    doc = json.loads(COMMITTED.read_text())
    names = list(prefill_attention_bench.candidates(0.1))
    assert names[0] == "flash_varlen"  # the reference of the differences
    assert set(doc["rows"]) == {"296", "1236", "2560", "4096"}
    for row in doc["rows"].values():
        assert list(row) == names
        assert row["flash_varlen"]["max_abs_diff"] == 0.0
        for result in row.values():
            assert "error" in result or (result["ms"] > 0 and result["first_call_ms"] > 0)
    assert doc["device"].startswith("NVIDIA H100")
