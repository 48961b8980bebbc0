"""`ensemble_sync` on the real Triton server and a tiny engine: plain `infer()` as users call it.

tritonclient.http / tritonclient.grpc `infer()` and the KServe v2 JSON `POST /v2/models/ensemble_sync/infer`
get, in one response, exactly the text the streaming `ensemble` sends in pieces (greedy); `ensemble` itself
refuses these calls (it is decoupled).
"""

from __future__ import annotations

import base64
import queue
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.model_repository.test_ensemble import ENSEMBLE_OUTPUTS, QUESTION, png

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2] / "model_repository"
MAX_TOKENS = 8
IMAGE = png(90, 60, 1)


def tensors(text: str = QUESTION, images: list[bytes] = (), **extra: np.ndarray) -> dict[str, np.ndarray]:
    out = {
        "text_input": np.array([text.encode()], dtype=np.object_),
        "max_tokens": np.array([MAX_TOKENS], np.int32),
        "temperature": np.array([0.0], np.float32),
    }
    if images:
        out["image_input"] = np.array(list(images), dtype=np.object_)
    out.update(extra)
    return out


def infer(module, url: str, model: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One plain `infer()` with tritonclient's http or grpc module, as its README shows."""
    client = module.InferenceServerClient(url)
    try:
        inputs = []
        for name, array in arrays.items():
            tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer(model, inputs)
        response = result.get_response()  # http: a dict; grpc: a ModelInferResponse
        outputs = response["outputs"] if isinstance(response, dict) else response.outputs
        names = [o["name"] if isinstance(o, dict) else o.name for o in outputs]
        return {name: result.as_numpy(name) for name in names}
    finally:
        client.close()


def streamed(server, text: str = QUESTION, images: list[bytes] = ()) -> tuple[str, str, str]:
    """(text, reasoning, finish_reason) of the streaming ensemble: its pieces joined."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    parts: dict[str, list[str]] = {"text_output": [], "reasoning_output": [], "finish_reason": []}
    try:
        inputs = []
        for name, array in tensors(text, images, stream=np.array([True])).items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        client.async_stream_infer("ensemble", inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            if response.outputs:
                for name, pieces in parts.items():
                    pieces.append(result.as_numpy(name)[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    return "".join(parts["text_output"]), "".join(parts["reasoning_output"]), parts["finish_reason"][-1]


def answer(outputs: dict[str, np.ndarray]) -> tuple[str, str, str]:
    return tuple(outputs[name][0].decode() for name in ("text_output", "reasoning_output", "finish_reason"))


def io_lines(model: str) -> list[str]:
    text = (REPO / model / "config.pbtxt").read_text()
    return re.findall(r"^\s*\{ name: .*\},?$", text, re.MULTILINE)


def test_inputs_and_outputs_are_the_ensembles() -> None:
    ensemble = [line.strip().rstrip(",") for line in io_lines("ensemble")]
    sync = [line.strip().rstrip(",") for line in io_lines("ensemble_sync")]
    assert len(ensemble) > 20 and sync == ensemble


@pytest.mark.parametrize("images", [[], [IMAGE]], ids=["text", "one_image"])
@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_plain_infer_equals_the_streamed_answer(server, module, images) -> None:
    url = server.http_url if module is httpclient else server.grpc_url
    expected = streamed(server, images=images)
    assert expected[2] in ("stop", "length") and expected[0] + expected[1]
    outputs = infer(module, url, "ensemble_sync", tensors(images=images))
    assert answer(outputs) == expected
    assert set(outputs) == ENSEMBLE_OUTPUTS
    assert 0 < int(outputs["num_output_tokens"][0]) <= MAX_TOKENS
    assert (
        outputs["arrival_time_ns"][0] <= outputs["first_token_time_ns"][0] <= outputs["last_token_time_ns"][0]
    )


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_the_streaming_ensemble_refuses_plain_infer(server, module) -> None:
    url = server.http_url if module is httpclient else server.grpc_url
    with pytest.raises(InferenceServerException, match="decoupled"):
        infer(module, url, "ensemble", tensors())


def test_kserve_v2_json_infer(server) -> None:
    body = {
        "inputs": [
            {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [QUESTION]},
            {
                "name": "image_input",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(IMAGE).decode()],
            },
            {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [MAX_TOKENS]},
            {"name": "temperature", "shape": [1], "datatype": "FP32", "data": [0.0]},
        ]
    }
    r = httpx.post(f"http://{server.http_url}/v2/models/ensemble_sync/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    text, reasoning, finish = streamed(server, images=[IMAGE])
    assert (outputs["text_output"], outputs["reasoning_output"], outputs["finish_reason"]) == (
        [text],
        [reasoning],
        [finish],
    )


def test_concurrent_requests_get_their_own_answers(server) -> None:
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [streamed(server, text=p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda p: answer(infer(grpcclient, server.grpc_url, "ensemble_sync", tensors(p))), prompts
            )
        )
    assert together == alone


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_bad_input_gets_the_ensembles_error(server, module) -> None:
    url = server.http_url if module is httpclient else server.grpc_url
    with pytest.raises(InferenceServerException) as info:
        infer(module, url, "ensemble_sync", tensors(images=[png(400, 400)]))
    assert "image_input[0]: image is" in info.value.message()
    assert "over the limit of 300000 bytes (max_image_bytes)" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(module, url, "ensemble_sync", tensors(max_tokens=np.array([0], np.int32)))
    assert "max_tokens: 0 is out of range" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        infer(module, url, "ensemble_sync", tensors(stream=np.array([True])))
    assert info.value.message().endswith(
        "stream: ensemble_sync answers with one response; stream from the 'ensemble' model "
        "(gRPC stream_infer or HTTP generate_stream)"
    )
    with pytest.raises(InferenceServerException) as info:
        infer(module, url, "ensemble_sync", tensors(num_return_sequences=np.array([2], np.int32)))
    assert "num_return_sequences: 2: ensemble_sync answers with one sequence" in info.value.message()
    one = infer(module, url, "ensemble_sync", tensors(num_return_sequences=np.array([1], np.int32)))
    assert answer(one)[2] in ("stop", "length") and one["sequence_index"].tolist() == [0]
