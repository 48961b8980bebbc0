from __future__ import annotations

import json

import numpy as np
import pytest
from glmv_client.errors import InvalidRequestError, ServerError, field_of
from glmv_client.request import Limits, build_request, generate_json, tensor_values
from glmv_client.results import Delta, Response, Sequences

LIMITS = Limits()


@pytest.mark.parametrize(
    ("kwargs", "field", "text"),
    [
        ({"max_tokens": 0}, "max_tokens", "0 is out of range [1, 4096]"),
        ({"max_tokens": 1.5}, "max_tokens", "must be an integer"),
        ({"temperature": -0.1}, "temperature", "-0.1 is out of range >= 0.0"),
        ({"temperature": float("nan")}, "temperature", "out of range"),
        ({"top_p": 0.0}, "top_p", "0.0 is out of range (0.0, 1.0]"),
        ({"top_k": -1}, "top_k", "-1 is out of range >= 0"),
        ({"seed": 2**64}, "seed", "out of range"),
        ({"presence_penalty": 3.0}, "presence_penalty", "out of range [-2.0, 2.0]"),
        ({"stop": ["ok", ""]}, "stop[1]", "must be a non-empty string"),
        ({"stop": ["s"] * 17}, "stop", "17 stop strings, over the limit of 16"),
        ({"enable_thinking": "yes"}, "enable_thinking", "must be a bool"),
        ({"min_tokens": 600}, "min_tokens", "600 is out of range [0, 512]"),
    ],
)
def test_sampling_checks_name_the_field(kwargs, field, text):
    with pytest.raises(InvalidRequestError) as info:
        build_request(None, "hi", limits=LIMITS, **kwargs)
    assert info.value.field == field
    assert text in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_image_count_and_prompt_checks(png_bytes):
    with pytest.raises(
        InvalidRequestError, match=r"^images: 5 images, over the limit of 4 \(max_images_per_request\)$"
    ):
        build_request([png_bytes] * 5, "hi", limits=Limits(max_images_per_request=4))
    with pytest.raises(InvalidRequestError, match=r"^images: 9 images, over the limit of 8 "):
        build_request([png_bytes] * 9, "hi", limits=LIMITS)
    with pytest.raises(InvalidRequestError, match="^prompt: must not be empty"):
        build_request(None, "  ", limits=LIMITS)
    with pytest.raises(InvalidRequestError, match="1 image parts but 0 images"):
        build_request(None, "", limits=LIMITS, messages=[{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(InvalidRequestError, match=r"^messages\[0\].role: unknown role 'robot'"):
        build_request(None, "", limits=LIMITS, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="max_message_bytes"):
        build_request([png_bytes], "hi", limits=Limits(max_message_bytes=1000))


def test_tensors_follow_the_contract(png_bytes):
    req = build_request(
        [png_bytes, png_bytes],
        "什么?",
        limits=LIMITS,
        max_tokens=7,
        temperature=0,
        top_p=0.5,
        top_k=3,
        seed=42,
        stop="END",
        enable_thinking=False,
        stream=True,
    )
    t = tensor_values(req)
    assert {k: (v.dtype.str, v.shape) for k, v in t.items()} == {
        "text_input": ("|O", (1,)),
        "max_tokens": ("<i4", (1,)),
        "stream": ("|b1", (1,)),
        "lean_stream": ("|b1", (1,)),  # a stream's middle responses: only what changed (Assembler)
        "image_input": ("|O", (2,)),
        "temperature": ("<f4", (1,)),
        "top_p": ("<f4", (1,)),
        "top_k": ("<i4", (1,)),
        "seed": ("<u8", (1,)),
        "stop_words": ("|O", (1,)),
        "enable_thinking": ("|b1", (1,)),
    }
    assert t["text_input"][0] == "什么?".encode()
    assert t["image_input"][1] == png_bytes
    assert t["seed"][0] == np.uint64(42)
    body = generate_json(req)
    assert body["text_input"] == "什么?" and body["stop_words"] == ["END"] and body["seed"] == 42
    assert len(body["image_input"]) == 2 and "repetition_penalty" not in body
    assert body["lean_stream"] is True
    whole = build_request([png_bytes], "hi", limits=LIMITS, stream=False)
    assert "lean_stream" not in tensor_values(whole) and "lean_stream" not in generate_json(whole)


def test_messages_are_sent_as_json(png_bytes):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    req = build_request([png_bytes], "", limits=LIMITS, messages=messages)
    assert json.loads(tensor_values(req)["messages"][0].decode()) == messages


def test_server_error_field_parsing():
    assert field_of("image_input[1]: image is 12000000 bytes, over the limit") == "image_input"
    assert field_of("in ensemble 'ensemble', max_tokens: too big") == "max_tokens"
    assert field_of("Stub process 'ensemble_0_0' is not healthy.") is None
    assert field_of("num_return_sequences: 9 must be in [1, 8]") == "num_return_sequences"
    assert ServerError("top_p: bad").is_invalid_request
    assert not ServerError("engine crashed", status="StatusCode.INTERNAL").is_invalid_request


def _infer_response(outputs: dict[str, np.ndarray]):
    """A gRPC ModelInferResponse holding ``outputs`` as Triton serializes them."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    response = service_pb2.ModelInferResponse(model_name="ensemble", id="r1")
    for name, array in outputs.items():
        out = response.outputs.add(
            name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape)
        )
        out.name = name
        if array.dtype != np.object_:
            raw = array.tobytes()
        else:  # a 0-d object array holding the length-prefixed bytes
            raw = serialize_byte_tensor(array).item() if array.size else b""
        response.raw_output_contents.append(raw)
    return response


def test_grpc_responses_decode_as_tritonclient_reads_them():
    from glmv_client.results import response_from_grpc
    from tritonclient.grpc import InferResult

    items = [{"token": "猫", "logprob": -0.5, "top_logprobs": []}]
    outputs = {
        "text_output": np.array(["一只\u2028猫 cat".encode()], dtype=np.object_),
        "reasoning_output": np.array([b""], dtype=np.object_),
        "finish_reason": np.array([b"stop"], dtype=np.object_),
        "num_input_tokens": np.array([1236], dtype=np.int32),
        "num_output_tokens": np.array([7], dtype=np.int32),
        "num_cached_tokens": np.array([1216], dtype=np.int32),
        "arrival_time_ns": np.array([1_764_800_000_123_456_789], dtype=np.int64),
        "first_token_time_ns": np.array([1_764_800_000_223_456_789], dtype=np.int64),
        "logprobs": np.array([json.dumps(items).encode()], dtype=np.object_),
    }
    response = _infer_response(outputs)
    got = response_from_grpc(response)
    result = InferResult(response)
    assert got.text == result.as_numpy("text_output")[0].decode() == "一只\u2028猫 cat"
    assert (got.reasoning, got.finish_reason) == ("", "stop")
    assert (got.num_input_tokens, got.num_output_tokens, got.num_cached_tokens) == (1236, 7, 1216)
    assert got.arrival_time_ns == int(result.as_numpy("arrival_time_ns")[0]) == 1_764_800_000_123_456_789
    assert got.first_token_time_ns == 1_764_800_000_223_456_789
    assert got.last_token_time_ns is None  # not sent
    assert got.logprobs == tuple(items)

    empty = response_from_grpc(_infer_response({"text_output": np.array([], dtype=np.object_)}))
    assert (empty.text, empty.finish_reason, empty.num_output_tokens, empty.arrival_time_ns) == (
        "",
        "",
        0,
        None,
    )


def test_a_lean_stream_cut_short_keeps_its_first_responses_values():
    """Lean responses leave out the stream's fixed values; a sequence that ends without its last response
    (its finish made by ``unfinished``) takes them from its first response."""
    first = Response("A", "", "", 17, 1, arrival_time_ns=100, num_cached_tokens=16, first_token_time_ns=150)
    lean = Response(" b", "", "", 0, 2, last_token_time_ns=190)  # what a lean response decodes to
    sequences = Sequences(1)
    assert sequences.add(first) == [Delta("A", "")]
    assert sequences.add(lean) == [Delta(" b", "")]
    (finish,) = sequences.unfinished()
    assert finish.finish_reason == "abort"
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens, finish.usage.cached_tokens) == (
        17,
        2,
        16,
    )
    assert (finish.timings.server_ttft, finish.timings.server_total) == (50e-9, 90e-9)
