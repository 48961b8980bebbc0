"""Fixtures for the client tests: a real Triton serving the fixture "ensemble" (tests/client/fixture_repo)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURE_REPO = Path(__file__).parent / "fixture_repo"


@pytest.fixture(scope="session")
def fixture_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixture") / "requests.log"


@pytest.fixture(scope="session")
def fixture_triton(fixture_log: Path) -> Iterator[object]:
    """Triton (the launcher's) on free ports with the echoing fixture model named "ensemble"."""
    from build_engine.launcher import TritonServer

    server = TritonServer(
        FIXTURE_REPO, http_port=0, grpc_port=0, metrics_port=0, env={"GLMV_FIXTURE_LOG": str(fixture_log)}
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()
