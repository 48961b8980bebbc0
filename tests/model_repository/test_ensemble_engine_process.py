"""Every test of test_ensemble again on a server whose llm runs its engine in a child process
(glmv-build --engine-process), then what happens when that child dies: the request in flight ends with an
error naming it, and new requests are refused as UNAVAILABLE."""

from __future__ import annotations

import os
import queue
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.model_repository.conftest import ENGINE_FLAGS
from tests.model_repository.test_ensemble import *  # noqa: F403 (the same tests, on this module's server)
from tests.model_repository.test_ensemble import Stream, grpc_generate, grpc_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from build_engine.cli import main

    out = tmp_path_factory.mktemp("tiny_engine_process") / "engine"
    assert (
        main(["--checkpoint", str(tiny_checkpoint), "--output", str(out), *ENGINE_FLAGS, "--engine-process"])
        == 0
    )
    return out


def engine_children(engine_dir: Path) -> list[int]:
    """The pids of the engine processes serving ``engine_dir``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"engine.engine_process" in argv and str(engine_dir).encode() in argv:
                pids.append(int(entry))
    return pids


def test_zz_a_dead_engine_process_ends_its_requests_and_the_llm_refuses_new_ones(server, tiny_engine: Path):
    """Runs last in this module: it kills the server's engine."""
    (pid,) = engine_children(tiny_engine)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = grpc_inputs("Tell me a long story.", max_tokens=400, min_tokens=np.array([400], np.int32))  # noqa: F405
    client.async_stream_infer("ensemble", inputs, request_id="in-flight")
    result, error = responses.get(timeout=60)
    assert error is None, error
    os.kill(pid, 9)
    while error is None:
        result, error = responses.get(timeout=60)
    assert "the engine process exited (code -9) before this request ended" in error.message(), error
    client.stop_stream()
    client.close()
    s = Stream(server.grpc_url)
    try:
        s.send(grpc_inputs())
        (refused,) = s.collect().values()
    finally:
        s.close()
    assert "llm: the engine loop is not running" in refused.message(), refused
    with pytest.raises(Exception, match="the engine loop is not running"):
        grpc_generate(server, [])
