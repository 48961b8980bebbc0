"""requirements/gpu.txt is requirements/cpu.txt without torch and triton.

The GPU image installs torch for CUDA itself, and that torch build pins the triton it was built with;
cpu.txt pins triton only for its CPU interpreter (tests of engine/kernels/fused.py).
"""

from __future__ import annotations

from conftest import REPO_ROOT

GPU_IMAGE_PROVIDES = ("torch==", "triton==")


def pins(name: str) -> list[str]:
    lines = (REPO_ROOT / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_gpu_requirements_are_cpu_requirements_without_torch_and_triton() -> None:
    cpu = pins("cpu.txt")
    gpu = pins("gpu.txt")
    expected = [line for line in cpu if not line.startswith(GPU_IMAGE_PROVIDES)]
    assert gpu == expected, (
        "update requirements/gpu.txt: it is requirements/cpu.txt minus the torch and triton lines"
    )
    assert any(line.startswith("triton==") for line in cpu), "requirements/cpu.txt must pin triton"
