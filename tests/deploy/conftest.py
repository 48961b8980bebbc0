"""Fixtures for the deployment checks: the repository root and linters installed from requirements/cpu.txt."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_tool(name: str) -> Path:
    """A command installed into this Python environment (next to the interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; it comes with requirements/cpu.txt (bash scripts/setup.sh)")
    return Path(found)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
