"""Every test of test_ensemble again on a server whose llm runs its engine in a child process
(glmv-build --engine-process), then what happens when that child dies: the request in flight ends with an
error naming it, new requests are refused as UNAVAILABLE until a new child is ready, then answered."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.model_repository.conftest import ENGINE_FLAGS
from tests.model_repository.test_ensemble import *  # noqa: F403 (the same tests, on this module's server)
from tests.model_repository.test_ensemble import grpc_generate, grpc_inputs, wait_for_metric

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


def test_zz_a_dead_engine_process_ends_its_requests_and_a_new_one_takes_over(server, tiny_engine: Path):
    """Runs last in this module: it kills the server's engine. The request in flight ends with an error
    naming the exit; new requests are refused as UNAVAILABLE until a new child is ready, then answered as
    before; the llm counts the restart."""
    (pid,) = engine_children(tiny_engine)
    answer = grpc_generate(server, [])
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
    refused = 0
    deadline = time.monotonic() + 120
    while True:
        try:
            again = grpc_generate(server, [])
            break
        except Exception as exc:  # until the new child is ready: UNAVAILABLE, naming the engine loop
            assert "llm: the engine loop is not running" in str(exc), exc
            assert time.monotonic() < deadline, "no new engine process within 120 s"
            refused += 1
            time.sleep(0.1)
    assert again == answer
    assert refused > 0  # the tiny engine loads in ~1 s: some requests came before it
    (new_pid,) = engine_children(tiny_engine)
    assert new_pid != pid
    assert wait_for_metric(server, "glmv_engine_restarts_total", 'model="llm"', above=0) == 1
    assert server.is_ready()
