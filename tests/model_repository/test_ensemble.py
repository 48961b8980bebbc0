"""The real Triton server on a tiny engine: transports agree with the engine, concurrency, errors, cancel;
last, the llm's engine process (a child of its Triton model) is killed and a new one takes over."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.engine.processing.test_preprocess import pixel_values_of, png_header_only

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
QUESTION = "What is in this image?"


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


IMAGES = {"text": [], "one_image": [png(90, 60, 1)], "two_images": [png(90, 60, 1), png(64, 100, 2)]}


def grpc_inputs(
    text: str = QUESTION, images: list[bytes] = (), stream: bool = True, max_tokens: int = MAX_TOKENS, **extra
) -> list[grpcclient.InferInput]:
    tensors = {
        "text_input": np.array([text.encode()], dtype=np.object_),
        "max_tokens": np.array([max_tokens], np.int32),
        "temperature": np.array([0.0], np.float32),
        "stream": np.array([stream]),
    }
    if images:
        tensors["image_input"] = np.array(list(images), dtype=np.object_)
    tensors.update(extra)
    inputs = []
    for name, array in tensors.items():
        dtype = {
            np.dtype(np.object_): "BYTES",
            np.dtype(np.int32): "INT32",
            np.dtype(np.float32): "FP32",
            np.dtype(np.float64): "FP64",
            np.dtype(np.bool_): "BOOL",
            np.dtype(np.uint64): "UINT64",
        }[array.dtype]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def llm_first_response(client, tensors: list) -> list[int] | Exception:
    """The `output_ids` of the llm's first response to `tensors` (non-streaming: the whole answer), or the
    error it answered with."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("llm", tensors)
    result, error = responses.get(timeout=60)
    client.stop_stream()
    return error if error is not None else result.as_numpy("output_ids").tolist()


def llm_prompt_tensors(out) -> list:
    """The llm's prompt tensors of a PreprocessedRequest: greedy, MAX_TOKENS, output ids only."""
    return [
        tensor("input_ids", out.input_ids.astype(np.int32), "INT32"),
        tensor("request_output_len", np.array([MAX_TOKENS], np.int32), "INT32"),
        tensor("temperature", np.array([0.0], np.float32), "FP32"),
        tensor("mrope_positions", out.mrope_positions, "INT64"),
        tensor("mrope_position_deltas", np.array([out.mrope_delta], np.int64), "INT64"),
        tensor("exclude_input_in_output", np.array([True]), "BOOL"),
    ]


class Stream:
    """One gRPC bidirectional stream; responses are grouped by request id."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.queue: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.queue.put((result, error)))

    def send(self, inputs, request_id: str = "") -> None:
        self.client.async_stream_infer(
            "ensemble", inputs, request_id=request_id, enable_empty_final_response=True
        )

    def collect(self, num_requests: int = 1, timeout: float = 120.0) -> dict[str, list[dict] | Exception]:
        results: dict[str, list[dict] | Exception] = {}
        done = 0
        deadline = time.monotonic() + timeout
        while done < num_requests:
            result, error = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                # Errors of a stream carry no request id; tests with errors send one request at a time.
                results[f"error{done}"] = error
                done += 1
                continue
            response = result.get_response()
            parts = results.setdefault(response.id, [])
            if response.outputs:
                arrays = {o.name: result.as_numpy(o.name) for o in response.outputs}
                # first element of each output; an empty one (output_log_probs when not asked) stays empty
                parts.append({name: a[0] if a.size else a for name, a in arrays.items()})
            if response.parameters["triton_final_response"].bool_param:
                done += 1
        return results

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def joined(parts: list[dict]) -> tuple[str, str, str]:
    text = b"".join(p["text_output"] for p in parts).decode()
    reasoning = b"".join(p.get("reasoning_output", b"") for p in parts).decode()  # lean: only when not empty
    return text, reasoning, parts[-1]["finish_reason"].decode()


def grpc_generate(
    server, images: list[bytes], stream: bool = True, text: str = QUESTION, **extra
) -> tuple[str, str, str]:
    s = Stream(server.grpc_url)
    try:
        s.send(grpc_inputs(text, images, stream, **extra))
        (result,) = s.collect().values()
    finally:
        s.close()
    if isinstance(result, Exception):
        raise result
    if not stream:
        assert len(result) == 1
    return joined(result)


def http_payload(images: list[bytes], stream: bool) -> dict:
    payload = {"text_input": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream}
    if images:
        payload["image_input"] = [base64.b64encode(i).decode() for i in images]
    return payload


def engine_generate(engine_dir: Path, images: list[bytes]) -> tuple[str, str, str]:
    from engine.llm_engine import GenerationRequest, LLMEngine
    from engine.processing.limits import PreprocessLimits
    from engine.processing.preprocess import Preprocessor
    from engine.sample.sampler import SamplingParams

    pre = Preprocessor(engine_dir, PreprocessLimits.from_engine_dir(engine_dir))
    out = pre(QUESTION, images)
    ex = LLMEngine.from_engine_dir(engine_dir)
    embeds = None
    if images:
        # the reference encodes numpy-normalized pixels up front; the server sends uint8 patches to the llm
        embeds = ex.model.encode_images(
            torch.from_numpy(pixel_values_of(pre, out.image_rgb, out.image_grid_thw)),
            torch.from_numpy(out.image_grid_thw),
        )
    ex.add_request(
        GenerationRequest(
            "direct",
            out.input_ids.tolist(),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            image_embeds=embeds,
            mrope_positions=torch.from_numpy(out.mrope_positions),
            mrope_delta=out.mrope_delta,
            is_thinking=out.is_thinking,
        )
    )
    text, reasoning, finish = [], [], None
    while finish is None:
        for o in ex.step():
            text.append(o.text)
            reasoning.append(o.reasoning)
            finish = o.finish_reason
    return "".join(text), "".join(reasoning), finish


@pytest.mark.parametrize("case", list(IMAGES))
def test_transports_and_engine_agree(server, tiny_engine: Path, case: str) -> None:
    images = IMAGES[case]
    expected = engine_generate(tiny_engine, images)
    assert expected[2] in ("stop", "length")
    assert grpc_generate(server, images, stream=True) == expected
    assert grpc_generate(server, images, stream=True, lean_stream=np.array([True])) == expected
    assert grpc_generate(server, images, stream=False) == expected

    with httpx.Client(base_url=f"http://{server.http_url}", timeout=60) as http:
        r = http.post("/v2/models/ensemble/generate", json=http_payload(images, stream=False))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["text_output"], body["reasoning_output"], body["finish_reason"]) == expected
        assert body["num_output_tokens"] <= MAX_TOKENS and body["num_input_tokens"] > 0
        assert body["arrival_time_ns"] <= body["first_token_time_ns"] <= body["last_token_time_ns"]

        r = http.post("/v2/models/ensemble/generate_stream", json=http_payload(images, stream=True))
        assert r.status_code == 200, r.text
        events = [line for line in r.text.split("\n\n") if line.startswith("data: ")]
        parts = [json.loads(e[len("data: ") :]) for e in events]
        assert all("error" not in p for p in parts), parts
        text = "".join(p["text_output"] for p in parts)
        reasoning = "".join(p["reasoning_output"] for p in parts)
        assert (text, reasoning, parts[-1]["finish_reason"]) == expected
        assert [p["finish_reason"] for p in parts[:-1]] == [""] * (len(parts) - 1)
        counts = [p["num_output_tokens"] for p in parts]
        assert counts == sorted(counts) and len(parts) >= 2

        # lean: the same answer; between the first and last event only what changed
        r = http.post(
            "/v2/models/ensemble/generate_stream",
            json=http_payload(images, stream=True) | {"lean_stream": True},
        )
        assert r.status_code == 200, r.text
        events = [line for line in r.text.split("\n\n") if line.startswith("data: ")]
        parts = [json.loads(e[len("data: ") :]) for e in events]
        text = "".join(p["text_output"] for p in parts)
        reasoning = "".join(p.get("reasoning_output", "") for p in parts)
        assert (text, reasoning, parts[-1]["finish_reason"]) == expected
        assert len(parts) >= 3  # a first, a last and lean ones between
        lean = {"text_output", "num_output_tokens", "last_token_time_ns", "reasoning_output"}
        # (Triton's JSON adds parameters such as sequence_id: the ensemble's outputs are what is compared)
        assert all(set(p) & ENSEMBLE_OUTPUTS <= lean for p in parts[1:-1]), [sorted(p) for p in parts]
        assert set(parts[0]) & ENSEMBLE_OUTPUTS == ENSEMBLE_OUTPUTS
        assert parts[-1]["num_input_tokens"] == body["num_input_tokens"]


def test_32_concurrent_streams_get_their_own_answers(server) -> None:
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(32)]
    images = [[] if i % 4 else [png(56 + 8 * (i % 3), 56, i)] for i in range(32)]
    s = Stream(server.grpc_url)
    try:
        alone = {}
        for i, prompt in enumerate(prompts):
            s.send(grpc_inputs(prompt, images[i]), request_id=f"r{i}")
            alone.update(s.collect())
        for i, prompt in enumerate(prompts):
            s.send(grpc_inputs(prompt, images[i]), request_id=f"r{i}")
        together = s.collect(num_requests=32)
    finally:
        s.close()
    assert sorted(together) == sorted(alone) == sorted(f"r{i}" for i in range(32))
    for rid in alone:
        assert joined(together[rid]) == joined(alone[rid]), rid
        counts = [p["num_output_tokens"] for p in together[rid]]
        assert counts == sorted(counts) and counts[0] == 1, (rid, counts)  # the first token is never held
    # 32 streams with --stream-responses-per-s 200 (one response per 160 ms each, several steps of this
    # CPU engine): several steps' tokens share a response, and nothing is lost (the joined texts above are
    # equal); alone, a stream may get a response every 5 ms: more responses than together (counted over
    # the 32 streams: one stream alone may meet a slow spell of a busy machine and share a few steps)
    assert sum(len(together[r]) for r in together) < sum(
        together[r][-1]["num_output_tokens"] for r in together
    )
    assert sum(len(alone[r]) for r in alone) > sum(len(together[r]) for r in together)


BAD_INPUTS = [
    ("zero bytes", {"images": [b""]}, "image_input[0]: image is empty"),
    ("corrupt", {"images": [b"\x89PNG\r\n\x1a\n" + b"junk" * 50]}, "image_input[0]: corrupt"),
    ("byte limit", {"images": [png(400, 400)]}, "over the limit of 300000 bytes (max_image_bytes)"),
    ("pixel bomb", {"images": [png_header_only(30000, 30000)]}, "image_input[0]: image is 900000000 pixels"),
    ("pixel limit", {"images": [png_header_only(3000, 3000)]}, "(max_image_pixels)"),
    ("format", {"images": [b"II*\x00" + b"\x00" * 100]}, "image_input[0]: not a PNG/JPEG/WebP/BMP/GIF image"),
    ("too many images", {"images": [png(56, 56)] * 3}, "image_input: 3 images, over the limit of 2"),
    ("prompt too long", {"text": "word " * 600}, "text_input: the prompt is"),
    (
        "text bytes",
        {"text": "x" * 8193},
        "text_input: 8193 bytes, over the limit of 8192 bytes (max_text_bytes",
    ),
    ("stop_words bytes", {"stop_words": np.array([b"s" * 8193], np.object_)}, "stop_words: 8193 bytes, over"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens: 0 is out of range"),
    ("max_tokens over", {"max_tokens": 401}, "max_tokens: 401 is over the limit of 400"),
    ("temperature < 0", {"temperature": np.array([-1.0], np.float32)}, "temperature: -1.0 is out of range"),
    ("temperature NaN", {"temperature": np.array([np.nan], np.float32)}, "temperature: nan is out of range"),
    ("top_p 0", {"top_p": np.array([0.0], np.float32)}, "top_p: 0.0 is out of range"),
    ("top_p > 1", {"top_p": np.array([1.5], np.float32)}, "top_p: 1.5 is out of range"),
    ("wrong dtype", {"temperature": np.array([0.5], np.float64)}, "temperature"),
    ("bad messages", {"messages": np.array([b"{not json"], dtype=np.object_)}, "messages: not valid JSON"),
    (
        "num_return_sequences 0",
        {"num_return_sequences": np.array([0], np.int32)},
        "num_return_sequences: 0 must be in [1, 8]",
    ),
    (
        "num_return_sequences over",
        {"num_return_sequences": np.array([9], np.int32)},
        "num_return_sequences: 9 must be in [1, 8] (the llm's max_num_return_sequences)",
    ),
]


@pytest.mark.parametrize(("case", "request_kwargs", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_and_server_stays_ready(server, case, request_kwargs, message) -> None:
    kwargs = dict(request_kwargs)
    text = kwargs.pop("text", QUESTION)
    images = kwargs.pop("images", [])
    max_tokens = kwargs.pop("max_tokens", MAX_TOKENS)
    s = Stream(server.grpc_url)
    try:
        s.send(grpc_inputs(text, images, max_tokens=max_tokens, **kwargs))
        (result,) = s.collect().values()
    finally:
        s.close()
    assert isinstance(result, InferenceServerException), result
    assert message in result.message(), result.message()
    assert server.is_ready()
    text, _, finish = grpc_generate(server, [])
    assert finish in ("stop", "length")


def metric(server, name: str, labels: str) -> float:
    body = httpx.get(server.metrics_url, timeout=10).text
    found = re.search(rf"^{name}{{[^}}]*{labels}[^}}]*}} (\S+)$", body, re.MULTILINE)
    assert found, f"{name} {labels} not in metrics"
    return float(found.group(1))


def aborted_and_used(server, expected_aborted: float, timeout: float = 20.0) -> tuple[float, float]:
    """(requests finished by abort, KV blocks in use), once they read (expected_aborted, 0) or at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        aborted = metric(server, "glmv_requests_finished_total", 'finish_reason="abort"')
        used = metric(server, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="used"')
        if (aborted, used) == (expected_aborted, 0) or time.monotonic() > deadline:
            return aborted, used
        time.sleep(0.1)


def test_cancel_mid_stream_aborts_and_frees_kv(server) -> None:
    aborted_before = metric(server, "glmv_requests_finished_total", 'finish_reason="abort"')
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = grpc_inputs("Tell me a long story.", max_tokens=400, min_tokens=np.array([400], np.int32))
    client.async_stream_infer("ensemble", inputs, request_id="cancel-me")
    for _ in range(2):
        result, error = responses.get(timeout=60)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()

    assert aborted_and_used(server, aborted_before + 1) == (aborted_before + 1, 0)
    # finish_reason "abort" (not "length"): it was cut short of the 400 tokens min_tokens forced.
    assert server.is_ready()
    assert grpc_generate(server, [])[2] in ("stop", "length")


def test_metrics_are_exported(server) -> None:
    grpc_generate(server, IMAGES["one_image"])
    assert metric(server, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="max"') > 0
    assert metric(server, "glmv_time_to_first_token_seconds_count", 'model="llm"') > 0
    assert metric(server, "glmv_inter_token_latency_seconds_count", 'model="llm"') >= 0
    # fine buckets where the inter-token targets lie (20 and 25 ms are edges)
    for edge in ("0.0175", "0.02", "0.0225", "0.025", "0.03"):
        assert metric(server, "glmv_inter_token_latency_seconds_bucket", f'le="{edge}"') >= 0, edge
    assert metric(server, "glmv_preprocess_latency_seconds_count", 'model="preprocessing"') > 0
    # the preprocessing thread's CPU time per request, beside its wall time
    cpu_count = metric(server, "glmv_preprocess_cpu_seconds_count", 'stage="request"')
    assert cpu_count == metric(server, "glmv_preprocess_latency_seconds_count", 'model="preprocessing"')
    assert 0 < metric(server, "glmv_preprocess_cpu_seconds_sum", 'stage="request"')
    for stage in ("inputs", "images", "template", "tokens", "positions", "outputs"):
        assert metric(server, "glmv_preprocess_stage_seconds_count", f'stage="{stage}"') > 0, stage
    for stage in ("inputs", "parse", "add"):
        assert metric(server, "glmv_llm_request_stage_seconds_count", f'stage="{stage}"') > 0, stage
    assert metric(server, "nv_trt_llm_request_metrics", 'request_type="waiting"') >= 0
    assert metric(server, "glmv_preemptions_total", 'model="llm"') >= 0
    assert wait_for_metric(server, "glmv_engine_steps_total", 'model="llm"', above=0) > 0
    # no CUDA graphs on a CPU: every decode step waits for the previous one's tokens
    assert metric(server, "glmv_engine_steps_ahead_total", 'model="llm"') == 0
    # the engine's process collects once when its loop starts, then freezes what it holds
    assert wait_for_metric(server, "glmv_engine_gc_collections_total", 'model="llm"', above=0) >= 1
    assert metric(server, "glmv_engine_gc_seconds_total", 'model="llm"') > 0
    # and each Python model's stub froze its own heap when it was set up (the llm's: imports, threads and
    # the engine's handle; preprocessing's: tokenizer and image processor), counting its collections since
    frozen = {
        model: metric(server, "glmv_model_gc_frozen_objects", f'model="{model}"')
        for model in ("preprocessing", "llm", "postprocessing")
    }
    assert frozen["llm"] > 50_000 and frozen["preprocessing"] > 50_000 and frozen["postprocessing"] > 5_000, (
        frozen
    )
    for model in frozen:
        assert metric(server, "glmv_model_gc_collections_total", f'model="{model}"') >= 0
        assert metric(server, "glmv_model_gc_seconds_total", f'model="{model}"') >= 0
    # one series per llm instance (one instance per GPU must not overwrite another's gauges)
    labels = 'kv_cache_block_type="max",model="llm",model_instance="llm_0_0"'
    assert metric(server, "nv_trt_llm_kv_cache_block_metrics", labels) > 0


ENSEMBLE_OUTPUTS = {
    "text_output",
    "reasoning_output",
    "finish_reason",
    "num_input_tokens",
    "num_cached_tokens",
    "num_output_tokens",
    "sequence_index",
    "arrival_time_ns",
    "first_token_time_ns",
    "last_token_time_ns",
    "output_log_probs",
    "logprobs",
}
STREAM_FIXED = ("num_input_tokens", "num_cached_tokens", "arrival_time_ns", "first_token_time_ns")


def test_every_streamed_response_of_the_ensemble_carries_every_output(server) -> None:
    """Inside the ensemble the llm streams lean responses (between a stream's first and last, only what
    changes); postprocessing puts the rest back, so every response a client gets has every output, with
    the stream's own values."""
    stream = Stream(server.grpc_url)
    for i, images in enumerate((IMAGES["one_image"], IMAGES["two_images"])):
        stream.send(
            grpc_inputs(images=images, max_tokens=12, min_tokens=np.array([12], np.int32)), request_id=f"r{i}"
        )
    results = stream.collect(num_requests=2)
    stream.close()
    finals = []
    for parts in results.values():
        assert len(parts) >= 3, parts  # a first, a last and lean ones between
        assert all(set(p) == ENSEMBLE_OUTPUTS for p in parts)
        final = parts[-1]
        for name in STREAM_FIXED:
            assert [p[name] for p in parts] == [final[name]] * len(parts), name
        assert final["num_input_tokens"] > 0 and 0 < final["arrival_time_ns"] <= final["first_token_time_ns"]
        counts = [int(p["num_output_tokens"]) for p in parts]
        assert counts == sorted(counts) and counts[-1] == 12
        assert [p["finish_reason"] for p in parts[:-1]] == [b""] * (len(parts) - 1)
        finals.append(final)
    # two requests, two streams' values (nothing of one put into the other's responses)
    assert finals[0]["num_input_tokens"] != finals[1]["num_input_tokens"]

    # several sequences on one stream: each sequence's responses carry its own values
    stream = Stream(server.grpc_url)
    extra = {"min_tokens": np.array([12], np.int32), "num_return_sequences": np.array([2], np.int32)}
    stream.send(grpc_inputs(images=IMAGES["one_image"], max_tokens=12, **extra), request_id="two")
    parts = stream.collect()["two"]
    stream.close()
    assert all(set(p) == ENSEMBLE_OUTPUTS for p in parts)
    for index in (0, 1):
        mine = [p for p in parts if p["sequence_index"] == index]
        assert len(mine) >= 3 and mine[-1]["finish_reason"] == b"length"
        for name in STREAM_FIXED:
            assert [p[name] for p in mine] == [mine[-1][name]] * len(mine), (index, name)


def test_a_client_that_asks_for_lean_streams_gets_what_changes_between_first_and_last(server) -> None:
    """`lean_stream=true` on the ensemble: the responses between a stream's first and last carry only
    text_output, num_output_tokens and last_token_time_ns (reasoning_output, sequence_index and logprobs
    when they have a value); the first and last carry every output. The answer is the same as a full
    stream's, with either count of postprocessing instances (the llm streams lean for such a client)."""
    runs = {}
    for lean in (False, True):
        stream = Stream(server.grpc_url)
        extra = {"min_tokens": np.array([12], np.int32), "num_return_sequences": np.array([2], np.int32)}
        if lean:
            extra["lean_stream"] = np.array([True])
        stream.send(grpc_inputs(images=IMAGES["one_image"], max_tokens=12, **extra), request_id="r")
        runs[lean] = stream.collect()["r"]
        stream.close()
    lean_changing = {"text_output", "num_output_tokens", "last_token_time_ns"}
    for index in (0, 1):
        full = [p for p in runs[False] if p["sequence_index"] == index]
        lean = [p for p in runs[True] if p.get("sequence_index", 0) == index]
        assert len(lean) >= 3
        assert set(lean[0]) == set(lean[-1]) == ENSEMBLE_OUTPUTS
        for part in lean[1:-1]:
            assert lean_changing <= set(part) <= lean_changing | {"reasoning_output", "sequence_index"}, part
            assert ("sequence_index" in part) == (index != 0)
        assert b"".join(p["text_output"] for p in lean) == b"".join(p["text_output"] for p in full)
        # (how many steps a response carries depends on the response budget's timing, not on lean)
        counts = [int(p["num_output_tokens"]) for p in lean]
        assert counts == sorted(counts) and counts[-1] == int(full[-1]["num_output_tokens"]) == 12
        for name in ("finish_reason", "num_input_tokens", "num_cached_tokens", "sequence_index"):
            assert lean[-1][name] == full[-1][name], name
        assert (
            0 < lean[0]["arrival_time_ns"] <= lean[0]["first_token_time_ns"] <= lean[-1]["last_token_time_ns"]
        )


def _llm_text_inputs(num_tokens: int) -> list[grpcclient.InferInput]:
    """The llm's inputs for `num_tokens` forced greedy tokens of a text prompt, streamed."""
    return [
        tensor("input_ids", np.array([3, 4, 5, 6, 7], np.int32), "INT32"),
        tensor("request_output_len", np.array([num_tokens], np.int32), "INT32"),
        tensor("min_tokens", np.array([num_tokens], np.int32), "INT32"),
        tensor("temperature", np.array([0.0], np.float32), "FP32"),
        tensor("streaming", np.array([True]), "BOOL"),
    ]


def _llm_stream(server, lean: bool) -> list[dict]:
    """The llm alone, streaming 10 greedy tokens of a text prompt (`lean_stream` as given): each response's
    outputs by name."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = _llm_text_inputs(10)
    if lean:
        inputs.append(tensor("lean_stream", np.array([True]), "BOOL"))
    client.async_stream_infer("llm", inputs, enable_empty_final_response=True)
    parts = []
    while True:
        result, error = responses.get(timeout=60)
        assert error is None, error
        response = result.get_response()
        if response.outputs:
            parts.append({o.name: result.as_numpy(o.name) for o in response.outputs})
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return parts


def test_llm_lean_stream_sends_the_fixed_outputs_on_the_first_and_last_response_only(server) -> None:
    whole, lean = _llm_stream(server, lean=False), _llm_stream(server, lean=True)
    every = set(whole[0])
    assert {"output_ids", "num_input_tokens", "kv_cache_reused_blocks", "finish_reason"} <= every
    assert all(set(p) == every for p in whole)  # without lean_stream: every output on every response
    assert len(lean) >= 3 and set(lean[0]) == every and set(lean[-1]) == every
    for part in lean[1:-1]:
        assert set(part) == {"text_output", "num_output_tokens", "last_token_time_ns", "request_key"}

    def text(parts: list[dict]) -> bytes:
        return b"".join(bytes(p["text_output"][0]) for p in parts)

    assert text(lean) == text(whole) != b""
    for name in ("num_output_tokens", "num_input_tokens", "finish_reason"):
        assert lean[-1][name].tolist() == whole[-1][name].tolist(), name
    assert [int(p["num_output_tokens"][0]) for p in lean] == sorted(
        int(p["num_output_tokens"][0]) for p in lean
    )


def _llm_long_stream(server, **extra) -> grpcclient.InferenceServerClient:
    """The llm alone, streaming 400 forced tokens of a text prompt; returns once two responses came."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = _llm_text_inputs(400)
    inputs += [tensor(name, array, dtype) for name, (array, dtype) in extra.items()]
    client.async_stream_infer("llm", inputs)
    for _ in range(2):
        result, error = responses.get(timeout=60)
        assert error is None, error
    return client


def test_llm_polls_a_direct_clients_cancel_but_not_a_cancel_by_stop_request(server) -> None:
    """A client calling the llm directly cancels it by leaving (the llm polls is_cancelled()); a request
    with `cancel_by_stop` (the ensemble's: Triton never marks its running llm step cancelled) is not polled,
    and its `stop` ends it."""
    aborted = metric(server, "glmv_requests_finished_total", 'finish_reason="abort"')
    client = _llm_long_stream(server)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert aborted_and_used(server, aborted + 1) == (aborted + 1, 0)

    client = _llm_long_stream(
        server,
        cancel_by_stop=(np.array([True]), "BOOL"),
        request_key=(np.array([b"stop-me"], dtype=np.object_), "BYTES"),
    )
    client.stop_stream(cancel_requests=True)
    client.close()
    time.sleep(0.3)  # thirty of the llm's polling periods: a polled request would have been aborted
    assert metric(server, "glmv_requests_finished_total", 'finish_reason="abort"') == aborted + 1
    assert metric(server, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="used"') > 0
    stopper = grpcclient.InferenceServerClient(server.grpc_url)
    stop = [
        tensor("input_ids", np.zeros(1, np.int32), "INT32"),
        tensor("stop", np.array([True]), "BOOL"),
        tensor("request_key", np.array([b"stop-me"], dtype=np.object_), "BYTES"),
    ]
    stop_responses: queue.Queue = queue.Queue()
    stopper.start_stream(callback=lambda result, error: stop_responses.put((result, error)))
    stopper.async_stream_infer("llm", stop, enable_empty_final_response=True)
    result, error = stop_responses.get(timeout=30)
    assert error is None, error
    stopper.stop_stream()
    stopper.close()
    assert aborted_and_used(server, aborted + 2) == (aborted + 2, 0)


def test_llm_speaks_tensorrt_llm_tensors_and_stop_cancels_by_request_id(server) -> None:
    """The llm step alone (as a TensorRT-LLM client would call it): streaming deltas, then `stop`."""

    def llm_inputs(**tensors) -> list[grpcclient.InferInput]:
        out = []
        for name, (array, dtype) in tensors.items():
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            out.append(tensor)
        return out

    prompt = np.array([3, 4, 5, 6, 7], np.int32)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    generate = llm_inputs(
        input_ids=(prompt, "INT32"),
        input_lengths=(np.array([5], np.int32), "INT32"),
        request_output_len=(np.array([400], np.int32), "INT32"),
        min_tokens=(np.array([400], np.int32), "INT32"),
        temperature=(np.array([0.0], np.float32), "FP32"),
        streaming=(np.array([True]), "BOOL"),
    )
    client.async_stream_infer("llm", generate, request_id="llm-direct", enable_empty_final_response=True)
    first = []
    for _ in range(2):
        result, error = responses.get(timeout=60)
        assert error is None, error
        first.append(result.as_numpy("output_ids").tolist())
        assert result.as_numpy("sequence_length").tolist() == [len(first[-1])]
    assert all(len(ids) >= 1 for ids in first)

    stopper = grpcclient.InferenceServerClient(server.grpc_url)
    stop_responses: queue.Queue = queue.Queue()
    stopper.start_stream(callback=lambda result, error: stop_responses.put((result, error)))
    stop = llm_inputs(input_ids=(np.zeros(1, np.int32), "INT32"), stop=(np.array([True]), "BOOL"))
    stopper.async_stream_infer("llm", stop, request_id="llm-direct", enable_empty_final_response=True)
    result, error = stop_responses.get(timeout=30)
    assert error is None and result.get_response().parameters["triton_final_response"].bool_param
    stopper.stop_stream()
    stopper.close()

    finish = ""
    num_tokens = 0
    while True:
        result, error = responses.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        if response.outputs:
            finish = result.as_numpy("finish_reason")[0].decode()
            num_tokens = int(result.as_numpy("num_output_tokens")[0])
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    assert finish == "abort"
    assert num_tokens < 400


def test_rgb_images_and_vision_encoder_embeddings_give_the_llm_one_answer(server, tiny_engine: Path) -> None:
    """Images reach the llm two ways: resized uint8 RGB (the ensemble's path: the llm runs the ViT) or an
    embedding table from the standalone vision_encoder model (TensorRT-LLM style). Same greedy ids."""
    from engine.processing.limits import PreprocessLimits
    from engine.processing.preprocess import Preprocessor

    pre = Preprocessor(tiny_engine, PreprocessLimits.from_engine_dir(tiny_engine))
    out = pre(QUESTION, IMAGES["two_images"])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    pixels = pixel_values_of(pre, out.image_rgb, out.image_grid_thw)[None]
    grid = out.image_grid_thw[None]
    table = client.infer(
        "vision_encoder", [tensor("pixel_values", pixels, "FP32"), tensor("image_grid_thw", grid, "INT64")]
    ).as_numpy("prompt_embedding_table")
    num_image_tokens = int((out.input_ids == pre.model_config.image_token_id).sum())
    assert table.shape == (1, num_image_tokens, pre.model_config.hidden_size)
    with pytest.raises(InferenceServerException, match=r"pixel_values: \d+ patches do not match"):
        client.infer(
            "vision_encoder",
            [tensor("pixel_values", pixels[:, :-4], "FP32"), tensor("image_grid_thw", grid, "INT64")],
        )

    def generate(image_tensors: list) -> list[int]:
        ids = llm_first_response(client, llm_prompt_tensors(out) + image_tensors)
        assert not isinstance(ids, Exception), ids
        return ids

    from_patches = generate(
        [
            tensor("image_rgb", out.image_rgb, "UINT8"),
            tensor("image_grid_thw", out.image_grid_thw, "INT64"),
        ]
    )
    from_table = generate([tensor("prompt_embedding_table", table, "FP32")])
    assert from_patches == from_table and len(from_patches) == MAX_TOKENS
    # both at once is refused, naming the field
    both = [
        tensor("input_ids", out.input_ids.astype(np.int32), "INT32"),
        tensor("image_rgb", out.image_rgb, "UINT8"),
        tensor("image_grid_thw", out.image_grid_thw, "INT64"),
        tensor("prompt_embedding_table", table, "FP32"),
    ]
    error = llm_first_response(client, both)
    assert isinstance(
        error, InferenceServerException
    ) and "image_rgb: give image_rgb + image_grid_thw or prompt_embedding_table" in str(error)
    client.close()


def test_messages_and_stop_words_over_http(server) -> None:
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=60) as http:
        image = base64.b64encode(IMAGES["one_image"][0]).decode()
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        ]
        base = {"max_tokens": 16, "temperature": 0.0, "image_input": [image]}
        r = http.post("/v2/models/ensemble/generate", json={**base, "messages": json.dumps(messages)})
        assert r.status_code == 200, r.text
        full = r.json()["text_output"]
        assert r.json()["num_input_tokens"] > 0

        # A stop string from the middle of the answer ends it there, with finish_reason "stop".
        clean = [i for i in range(1, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
        if not clean:
            pytest.skip(f"no clean stop string in {full!r}")
        start = clean[len(clean) // 2]
        stop = full[start : start + 2]
        payload = {**base, "messages": json.dumps(messages), "stop_words": [stop]}
        r = http.post("/v2/models/ensemble/generate", json=payload)
        assert r.status_code == 200, r.text
        assert r.json()["text_output"] == full[: full.index(stop)]
        assert r.json()["finish_reason"] == "stop"


def test_postprocessing_decodes_ids_when_only_ids_arrive(server, tiny_engine: Path) -> None:
    """A TensorRT-LLM backend sends only output_ids + sequence_length; postprocessing decodes them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_engine / "tokenizer.json"))
    think = [tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")]
    reasoning_ids = tokenizer.encode("The invoice total", add_special_tokens=False).ids
    answer_ids = tokenizer.encode("The answer is yes.", add_special_tokens=False).ids
    ids = np.array([think[0], *reasoning_ids, think[1], *answer_ids, -1, -1], np.int32)
    inputs = []
    for name, array, dtype in (
        ("output_ids", ids, "INT32"),
        ("sequence_length", np.array([len(ids) - 2], np.int32), "INT32"),
    ):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("postprocessing", inputs)
    assert result.as_numpy("text_output")[0].decode() == "The answer is yes."
    assert result.as_numpy("reasoning_output")[0].decode() == "The invoice total"
    assert result.as_numpy("num_output_tokens").tolist() == [len(ids) - 2]


def wait_for_metric(server, name: str, labels: str, above: float, timeout: float = 10.0) -> float:
    """The metric once it exceeds `above` (the llm's counters follow the engine every 100 ms)."""
    deadline = time.monotonic() + timeout
    while (value := metric(server, name, labels)) <= above and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_images_the_host_has_resized_reach_the_llm_by_reference(server, tiny_engine: Path) -> None:
    """A screenshot goes from preprocessing to the llm as its file in the shared resize directory (no pixels
    through Triton), written before the request goes on when the image is new; the llm takes the
    embeddings it holds, or reads the file when it does not hold them. Answers are the same as with the
    pixels; a reference outside that directory is refused."""
    import hashlib
    import os
    import tempfile

    from engine.processing.limits import PreprocessLimits
    from engine.processing.preprocess import Preprocessor, shared_resize_dir_name

    held_label, read_label = 'model="llm"', 'model="llm"'
    time.sleep(0.3)  # the counters have caught up with earlier tests' requests (updated every 100 ms)
    held_before = metric(server, "glmv_image_refs_held_total", held_label)
    read_before = metric(server, "glmv_image_refs_read_total", read_label)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # preprocessing's default
    shared = Path(base) / shared_resize_dir_name(tiny_engine)
    seed = time.time_ns() % 2**32  # never seen by this host: its first request carries the pixels
    image = png(90, 60, seed)
    first = grpc_generate(server, [image])
    assert (shared / f"{hashlib.sha256(image).hexdigest()}.rgb").is_file()  # written before it went on
    # new to the engine too: the llm read its file
    assert wait_for_metric(server, "glmv_image_refs_read_total", read_label, read_before) == read_before + 1
    assert metric(server, "glmv_image_refs_held_total", held_label) == held_before
    assert grpc_generate(server, [image]) == first
    assert wait_for_metric(server, "glmv_image_refs_held_total", held_label, held_before) == held_before + 1

    # the llm alone, with a reference to an image its engine has never encoded: it reads the file
    pre = Preprocessor(
        tiny_engine,
        PreprocessLimits.from_engine_dir(tiny_engine),
        shared_resize_cache_dir=base,
        shared_resize_cache_bytes=64 << 20,
    )
    other = png(64, 100, seed + 1)
    by_value = pre(QUESTION, [other])
    pre.resize_cache.flush()
    by_ref = pre(QUESTION, [other], pixels_by_reference=True)
    assert by_ref.image_refs and by_ref.image_rgb.size == 0
    client = grpcclient.InferenceServerClient(server.grpc_url)

    def generate(image_tensors: list, hashes: list[str] = by_ref.image_hashes) -> list[int] | Exception:
        grid = tensor("image_grid_thw", by_ref.image_grid_thw, "INT64")
        hash_tensor = tensor("image_hash", np.array([h.encode() for h in hashes], np.object_), "BYTES")
        # min_tokens: every answer MAX_TOKENS long (this random image's answer may meet an end id sooner)
        whole = tensor("min_tokens", np.array([MAX_TOKENS], np.int32), "INT32")
        prompt = llm_prompt_tensors(by_ref) + [whole, grid, hash_tensor]
        return llm_first_response(client, prompt + image_tensors)

    def refs(*paths: str) -> list:
        return [tensor("image_ref", np.array([p.encode() for p in paths], np.object_), "BYTES")]

    from_file = generate(refs(*by_ref.image_refs))
    assert (
        wait_for_metric(server, "glmv_image_refs_read_total", read_label, read_before + 1) == read_before + 2
    )
    from_pixels = generate([tensor("image_rgb", by_value.image_rgb, "UINT8")])
    assert from_file == from_pixels and len(from_file) == MAX_TOKENS
    for bad, message in [
        (refs("/etc/passwd"), "image_ref[0]: '/etc/passwd' is not an entry of this server's shared image"),
        (refs(*by_ref.image_refs, *by_ref.image_refs), "image_ref: 2 references, 1 hashes and 1 grid rows"),
        (
            refs(*by_ref.image_refs) + [tensor("image_rgb", by_value.image_rgb, "UINT8")],
            "image_ref: give image_rgb or image_ref, not both",
        ),
    ]:
        error = generate(bad)
        assert isinstance(error, InferenceServerException) and message in str(error), error
    # an image the engine does not hold, whose file is not there (or holds another image)
    missing = generate(refs(str(shared / f"{'0' * 64}.rgb")), hashes=["f" * 64])
    assert "image_ref[0]: '" in str(missing) and "could not be read" in str(missing), missing
    wrong = generate(refs(*by_ref.image_refs), hashes=["f" * 64])
    assert f"image_ref[0]: the file holds image {by_ref.image_hashes[0]}, not image_hash {'f' * 64}" in str(
        wrong
    ), wrong
    client.close()
    assert grpc_generate(server, [image]) == first  # still serving


# -- last: the engine process dies ---------------------------------------------------------------


def by_sequence(parts: list[dict]) -> dict[int, list[dict]]:
    """A request's responses by their `sequence_index`, each sequence's in order."""
    out: dict[int, list[dict]] = {}
    for part in parts:
        out.setdefault(int(part["sequence_index"]), []).append(part)
    return out


def final_flags(url: str, inputs, request_id: str) -> list[tuple[int, bool]]:
    """(sequence_index, triton_final_response) of every response of one streamed request."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("ensemble", inputs, request_id=request_id, enable_empty_final_response=True)
    flags = []
    while not flags or not flags[-1][1]:
        result, error = responses.get(timeout=120)
        assert error is None, error
        response = result.get_response()
        index = int(result.as_numpy("sequence_index")[0]) if response.outputs else -1
        flags.append((index, response.parameters["triton_final_response"].bool_param))
    client.stop_stream()
    client.close()
    return flags


@pytest.mark.parametrize("stream", [True, False])
def test_num_return_sequences_answers_each_sequence_and_shares_the_prompt(
    server, tiny_engine: Path, stream: bool
) -> None:
    """num_return_sequences=3, greedy, a picture no request sent before: three sequences on one response
    stream, each told by its sequence_index and each the answer one request gets; sequence 0 computes the
    prompt, 1 and 2 (sent when it has answered) find all of it but the last block in the prefix cache;
    only the very last response is final, and each sequence's last carries its finish_reason."""
    from engine.config import EngineDir

    block = EngineDir.open(tiny_engine).engine_config().block_size
    image = [png(88, 64, 70 + stream)]
    s = Stream(server.grpc_url)
    try:
        s.send(grpc_inputs(QUESTION, image, stream, num_return_sequences=np.array([3], np.int32)), "three")
        (parts,) = s.collect().values()
    finally:
        s.close()
    assert not isinstance(parts, Exception), parts
    sequences = by_sequence(parts)
    assert sorted(sequences) == [0, 1, 2]
    one = grpc_generate(server, image, stream=stream)
    prompt = int(parts[0]["num_input_tokens"])
    for index, seq in sequences.items():
        assert joined(seq) == one
        assert [p["finish_reason"] for p in seq[:-1]] == [b""] * (len(seq) - 1)
        assert int(seq[-1]["num_cached_tokens"]) == (0 if index == 0 else (prompt - 1) // block * block)
        if not stream:
            assert len(seq) == 1
    flags = final_flags(
        server.grpc_url,
        grpc_inputs(QUESTION, image, stream, num_return_sequences=np.array([3], np.int32)),
        "flags",
    )
    assert [final for _, final in flags] == [False] * (len(flags) - 1) + [True]
    assert sorted({index for index, _ in flags if index >= 0}) == [0, 1, 2]


def test_num_return_sequences_moves_the_seed_by_the_index(server) -> None:
    """Sampled sequences: sequence i of a request with seed S is what one request with seed S + i gets."""
    sampling = {"temperature": np.array([1.0], np.float32), "seed": np.array([1234], np.uint64)}
    s = Stream(server.grpc_url)
    try:
        s.send(grpc_inputs("Say anything.", num_return_sequences=np.array([3], np.int32), **sampling), "n")
        (parts,) = s.collect().values()
        alone = []
        for i in range(3):
            s.send(
                grpc_inputs(
                    "Say anything.", temperature=sampling["temperature"], seed=np.array([1234 + i], np.uint64)
                ),
                f"s{i}",
            )
            (single,) = s.collect().values()
            alone.append(joined(single))
    finally:
        s.close()
    sequences = by_sequence(parts)
    assert [joined(sequences[i]) for i in range(3)] == alone
    assert len(set(alone)) > 1  # the seeds differ, and so do the answers


def test_num_return_sequences_over_http(server) -> None:
    """HTTP generate_stream carries every sequence (each event with its sequence_index; with stream false,
    one whole answer per sequence, each the answer one request gets); HTTP generate takes one response,
    so Triton refuses several and names generate_stream."""
    payload = {
        "text_input": QUESTION,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "num_return_sequences": 2,
    }
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=60) as http:
        one = http.post("/v2/models/ensemble/generate", json={**payload, "num_return_sequences": 1}).json()
        for stream in (False, True):
            r = http.post("/v2/models/ensemble/generate_stream", json={**payload, "stream": stream})
            assert r.status_code == 200, r.text
            events = [json.loads(e[len("data: ") :]) for e in r.text.split("\n\n") if e.startswith("data: ")]
            texts = {0: "", 1: ""}
            for event in events:
                texts[event["sequence_index"]] += event["text_output"]
            assert texts == {0: one["text_output"], 1: one["text_output"]}
            if not stream:
                assert sorted(e["sequence_index"] for e in events) == [0, 1]
        refused = http.post("/v2/models/ensemble/generate", json=payload).json()
    assert "use generate stream" in refused["error"]


def test_num_return_sequences_cancel_aborts_every_sequence_and_frees_kv(server) -> None:
    aborted_before = metric(server, "glmv_requests_finished_total", 'finish_reason="abort"')
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = grpc_inputs(
        "Tell me a long story.",
        max_tokens=400,
        min_tokens=np.array([400], np.int32),
        num_return_sequences=np.array([3], np.int32),
    )
    client.async_stream_infer("ensemble", inputs, request_id="cancel-three")
    seen = set()
    while len(seen) < 3:  # every sequence is running
        result, error = responses.get(timeout=60)
        assert error is None, error
        seen.add(int(result.as_numpy("sequence_index")[0]))
    client.stop_stream(cancel_requests=True)
    client.close()
    assert aborted_and_used(server, aborted_before + 3) == (aborted_before + 3, 0)
    assert server.is_ready()
    assert grpc_generate(server, [])[2] in ("stop", "length")


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
    inputs = grpc_inputs("Tell me a long story.", max_tokens=400, min_tokens=np.array([400], np.int32))
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
