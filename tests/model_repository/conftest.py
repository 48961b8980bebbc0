"""A tiny engine directory + a real Triton server on it (module scope: one server per test module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

ENGINE_FLAGS = (
    "--max-seq-len", "512",
    "--max-output-tokens", "400",
    "--default-max-tokens", "8",
    "--max-images-per-request", "2",
    "--max-image-bytes", "300000",
    "--max-image-pixels", "4000000",
    "--preprocessing-instances", "1",
    "--max-batch-size", "32",
    "--stream-responses-per-s", "200",  # 32 streams: a response every 160 ms each, longer than any step here
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from build_engine.cli import main

    out = tmp_path_factory.mktemp("tiny_engine") / "engine"
    assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(out), *ENGINE_FLAGS]) == 0
    return out


@pytest.fixture(scope="module")
def server(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from build_engine.launcher import TritonServer

    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    with TritonServer(
        tiny_engine / "model_repository",
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=log,
        startup_timeout_s=300,
        exit_timeout_s=10,
    ) as srv:
        yield srv
    # Every request of the module ended: the server stops without hitting its exit timeout.
    assert srv.process.returncode == 0, srv.log_tail()
    assert "Exit timeout expired" not in log.read_text()
