"""Shared by the kernel tests: run one of a test file's checks in a fresh Python under Triton's CPU
interpreter, and the distance of two bf16 tensors in representable steps.

TRITON_INTERPRET=1 must be set before triton is imported, so each check runs in its own process: the test
file executes itself (`python tests/engine/kernels/test_x.py CHECK [ARGS]`, through `main`), and the pytest side
calls `run_interpreted(__file__, CHECK, *ARGS)`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_interpreted(script: str, check: str, *args: str) -> None:
    """Run `script`'s CHECKS[check]("cpu", *args) in a fresh Python with TRITON_INTERPRET=1."""
    env = {k: v for k, v in os.environ.items() if k != "GLMV_DISABLE_TRITON_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, script, check, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"check {check} failed under TRITON_INTERPRET=1:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    assert f"ok {check}" in proc.stdout


def main(checks: dict[str, Callable[..., None]]) -> None:
    """The `__main__` side of run_interpreted: run the check named on the command line on the CPU."""
    torch.set_num_threads(1)
    name, *rest = sys.argv[1:]
    checks[name]("cpu", *rest)
    print(f"ok {name}")


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in bf16 representable steps (+0 and -0 are the same point)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()
