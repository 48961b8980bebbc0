"""benchmarks/gpu_session.sh refuses a harness budget too small to reach Triton before it spends anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.results import REPO_ROOT


@pytest.mark.parametrize("variable", ["VARIANT_BUDGET", "AB_BUDGET", "HARNESS_BUDGET"])
def test_a_harness_budget_under_150_s_is_refused_at_once(variable: str, tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PART": "6", variable: "149"}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_session.sh")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == f"{variable}=149: a harness run needs at least 150 s to reach Triton\n"
    assert result.stdout == ""  # nothing installed, nothing run
