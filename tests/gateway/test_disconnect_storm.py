"""A storm of cut requests through every path ends every request in the engine: nothing generates on.

Paths: the gateway's SSE stream closed after 3 chunks, the gateway's JSON answer abandoned, Triton's gRPC
stream cancelled, Triton's HTTP ``generate_stream`` closed. Every request asks for ``min_tokens ==
max_tokens`` (no early stop), so each must end with finish_reason "abort"; one that ran on would end with
"length". Afterwards no request is active and no KV block is in use.
"""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow
MODEL = "glm-4.6v-flash"
NUM_TOKENS = 4000  # far more than a cut request reaches: one that is not aborted ends with "length"


@pytest.fixture(scope="module")
def storm_triton(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from build_engine.cli import main
    from build_engine.launcher import TritonServer

    out = tmp_path_factory.mktemp("storm_engine") / "engine"
    flags = ["--max-seq-len", "4096", "--max-batch-size", "32", "--preprocessing-instances", "1"]
    assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(out), *flags]) == 0
    with TritonServer(
        out / "model_repository", http_port=0, grpc_port=0, metrics_port=0, log_file=out / "triton.log"
    ) as server:
        yield server


def metric(server, name: str, labels: str) -> float:
    body = httpx.get(server.metrics_url, timeout=10).text
    found = re.search(rf"^{name}{{[^}}]*{labels}[^}}]*}} (\S+)$", body, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def finished(server) -> dict[str, float]:
    return {
        reason: metric(server, "glmv_requests_finished_total", f'finish_reason="{reason}"')
        for reason in ("stop", "length", "abort")
    }


def chat_body(stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "stream": stream,
        "max_tokens": NUM_TOKENS,
        "min_tokens": NUM_TOKENS,
        "temperature": 0.8,
    }


def cut_gateway_stream(url: str) -> int:
    """Read the role chunk and 3 content chunks, then close the connection."""
    chunks = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat_body(True), timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks += 1
                if chunks == 4:
                    break
    return chunks


def cut_gateway_json(url: str) -> int:
    """Wait for the answer until the request generates, then go away."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=chat_body(False), timeout=httpx.Timeout(120, read=1))
    return 1


def cut_triton_grpc(grpc_url: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, value, dtype in (
        ("text_input", np.array([b"Tell me a very long story."], np.object_), "BYTES"),
        ("max_tokens", np.array([NUM_TOKENS], np.int32), "INT32"),
        ("min_tokens", np.array([NUM_TOKENS], np.int32), "INT32"),
        ("stream", np.array([True]), "BOOL"),
    ):
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer("ensemble", inputs)
    for _ in range(3):
        _, error = responses.get(timeout=120)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()
    return 3


def cut_triton_http(http_url: str) -> int:
    body = {
        "text_input": "Tell me a very long story.",
        "max_tokens": NUM_TOKENS,
        "min_tokens": NUM_TOKENS,
        "stream": True,
    }
    chunks = 0
    with httpx.stream(
        "POST", f"http://{http_url}/v2/models/ensemble/generate_stream", json=body, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                assert "error" not in json.loads(line[5:])
                chunks += 1
                if chunks == 3:
                    break
    return chunks


def test_disconnect_storm_aborts_every_request_and_frees_kv(storm_triton, gateway_server_class) -> None:
    from gateway.config import GatewayConfig

    before = finished(storm_triton)
    with gateway_server_class(GatewayConfig(triton_url=storm_triton.grpc_url)) as gateway:
        jobs = (
            [(cut_gateway_stream, gateway.url)] * 40
            + [(cut_gateway_json, gateway.url)] * 4
            + [(cut_triton_grpc, storm_triton.grpc_url)] * 6
            + [(cut_triton_http, storm_triton.http_url)] * 6
        )
        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(lambda job: job[0](job[1]), jobs))
        assert all(n >= 1 for n in results)

        # Every request reached the engine (each answered at least one chunk, or waited 3 s in it) and must
        # end there; one left running ends with "length" after NUM_TOKENS tokens.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            now = finished(storm_triton)
            if sum(now.values()) - sum(before.values()) >= len(jobs):
                break
            time.sleep(0.5)
    now = finished(storm_triton)
    assert now["length"] - before["length"] == 0
    assert now["stop"] - before["stop"] == 0
    assert now["abort"] - before["abort"] == len(jobs)
    assert metric(storm_triton, "nv_trt_llm_request_metrics", 'request_type="active"') == 0
    assert metric(storm_triton, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="used"') == 0
