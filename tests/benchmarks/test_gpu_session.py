"""benchmarks/gpu_session.sh refuses a harness budget too small to reach Triton before it spends anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.results import REPO_ROOT


def run_session(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """benchmarks/gpu_session.sh with PART=6 and ``variables`` in its environment."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PART": "6", **variables}
    return subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_session.sh")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("variable", ["VARIANT_BUDGET", "AB_BUDGET", "HARNESS_BUDGET"])
def test_a_harness_budget_under_150_s_is_refused_at_once(variable: str, tmp_path: Path) -> None:
    result = run_session(tmp_path, **{variable: "149"})
    assert result.returncode == 2
    assert result.stderr == f"{variable}=149: a harness run needs at least 150 s to reach Triton\n"
    assert result.stdout == ""  # nothing installed, nothing run


@pytest.mark.parametrize("skip", ["none", "roofline"])
def test_variants_keeping_the_baseline_under_400_s_are_refused_at_once(skip: str, tmp_path: Path) -> None:
    """A variant's run that keeps transformers' baseline has ~150 s reserved for it out of the serve phase:
    under 400 s it would skip serving, so the script refuses it before the device time goes."""
    result = run_session(tmp_path, VARIANTS="default:", VARIANT_SKIP=skip, VARIANT_BUDGET="399")
    assert result.returncode == 2
    assert result.stderr == (
        f"VARIANT_BUDGET=399 with the baseline (VARIANT_SKIP={skip}): needs at least 400 s, or skip the baseline\n"
    )
    assert result.stdout == ""
