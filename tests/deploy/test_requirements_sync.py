"""requirements/gpu.txt is requirements/cpu.txt without torch (the GPU image installs torch for CUDA itself)."""

from __future__ import annotations

from conftest import REPO_ROOT


def pins(name: str) -> list[str]:
    lines = (REPO_ROOT / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_gpu_requirements_are_cpu_requirements_without_torch() -> None:
    cpu = pins("cpu.txt")
    gpu = pins("gpu.txt")
    expected = [line for line in cpu if not line.startswith("torch==")]
    assert gpu == expected, "update requirements/gpu.txt: it is requirements/cpu.txt minus the torch line"
