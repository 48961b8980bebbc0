"""glmv_client against a real Triton serving the fixture ensemble: both protocols, sync and async."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from glmv_client import (
    AsyncClient,
    Client,
    Delta,
    Finish,
    InvalidRequestError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)
from glmv_client.cli import main as cli_main
from glmv_client.client import grpc_channel_args

PROTOCOLS = ("grpc", "http")


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def wait_for_line(path, line: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_analyze(fixture_triton, protocol, png_bytes):
    with Client(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
        assert client.is_ready()
        result = client.analyze([png_bytes, png_bytes], "what is this", temperature=0, seed=7)
    size = len(png_bytes) if protocol == "grpc" else len(base64.b64encode(png_bytes))  # HTTP sends base64
    assert result.text == f"what is this | images=2 sizes={size},{size} temperature=0 seed=7"
    assert result.reasoning == "thinking about 2 images"
    assert result.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        23,
        12,
        35,
    )
    assert result.timings.total > 0 and result.timings.server_ttft is not None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream(fixture_triton, protocol):
    with Client(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
        items = list(client.stream(None, "one two three", max_tokens=6, enable_thinking=False))
    assert items[:-1] == [Delta("one", ""), Delta(" two", ""), Delta(" three", ""), Delta(" |", "")] + [
        Delta(" images=0", ""),
        Delta(" sizes=", ""),
    ]
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "length"
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (3, 6)
    assert finish.timings.ttft is not None and finish.timings.ttft <= finish.timings.total


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_text_with_unicode_line_separators(fixture_triton, protocol):
    # Triton's generate_stream writes U+2028, U+2029 and U+0085 raw inside its JSON; only LF ends an event
    prompt = "one\u2028two three\u0085four five\u2029six"
    expected = prompt + " | images=0 sizes= temperature=- seed=-"
    with Client(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
        items = list(client.stream(None, prompt, enable_thinking=False))

    async def run():
        async with AsyncClient(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
            return [item async for item in client.stream(None, prompt, enable_thinking=False)]

    for got in (items, asyncio.run(run())):
        assert "".join(i.text for i in got if isinstance(i, Delta)) == expected
        assert isinstance(got[-1], Finish) and got[-1].finish_reason == "stop"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_error_keeps_the_message(fixture_triton, protocol):
    with Client(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
        with pytest.raises(ServerError) as info:
            client.analyze(None, "fail now")
    assert "max_tokens: the fixture was asked to fail" in info.value.message
    assert info.value.field == "max_tokens" and info.value.is_invalid_request


def test_server_side_image_limit_is_a_field_error(fixture_triton):
    big = b"\x89PNG\r\n\x1a\n" + bytes(1_000_001)
    with Client(fixture_triton.grpc_url, timeout=30) as client, pytest.raises(ServerError) as info:
        client.analyze([b"\x89PNG\r\n\x1a\n", big], "hi")
    assert "image_input[1]: image is 1000009 bytes, over the limit of 1000000 bytes (max_image_bytes)" in str(
        info.value
    )
    assert info.value.field == "image_input"


def test_timeout_cancels_the_request(fixture_triton, fixture_log):
    with Client(fixture_triton.grpc_url, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError, match=r"within 0.5 s \(timeout\)"):
            client.analyze(None, "sleep 0.2 a b c d e f g", request_id="timeout-1")
        assert time.monotonic() - start < 2.0
    assert isinstance(RequestTimeoutError("x"), TimeoutError)
    assert wait_for_line(fixture_log, "cancelled timeout-1")


def test_leaving_a_stream_early_cancels_it(fixture_triton, fixture_log):
    with Client(fixture_triton.grpc_url, timeout=30) as client:
        stream = client.stream(None, "sleep 0.1 a b c d e f g h", request_id="early-exit-1")
        first = next(stream)
        assert isinstance(first, Delta)
        stream.close()
    assert wait_for_line(fixture_log, "cancelled early-exit-1")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server_is_retried_then_reported(protocol):
    from build_engine.launcher import free_port

    url = f"localhost:{free_port()}"
    with Client(url, protocol=protocol, timeout=5, max_retries=2, retry_backoff=0.01) as client:
        with pytest.raises(ServerUnavailableError, match="after 3 attempts"):
            client.analyze(None, "hi")
        assert not client.is_ready()


def test_grpc_message_size_option():
    assert grpc_channel_args(64 * 1024 * 1024) == [
        ("grpc.max_send_message_length", 67108864),
        ("grpc.max_receive_message_length", 67108864),
    ]


def several(items) -> tuple[dict[int, str], list[tuple[int, str]]]:
    """A several-sequence stream's texts by index and its (index, finish_reason) in order."""
    texts: dict[int, str] = {}
    for item in items:
        if isinstance(item, Delta):
            texts[item.index] = texts.get(item.index, "") + item.text
    return texts, [(i.index, i.finish_reason) for i in items if isinstance(i, Finish)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_num_return_sequences(fixture_triton, protocol):
    """num_return_sequences=3: the sequences' items interleave, each Delta and Finish carrying its
    sequence's index; one Finish per sequence; the request ends after the last; analyze refuses it."""
    expected = {i: f"a b | images=0 sizes= temperature=- seed={7 + i}" for i in range(3)}
    asked = {"max_tokens": 20, "enable_thinking": False, "seed": 7, "num_return_sequences": 3}
    with Client(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
        items = list(client.stream(None, "a b", **asked))
        with pytest.raises(InvalidRequestError, match=r"^num_return_sequences: 2: analyze\(\) returns one"):
            client.analyze(None, "a b", num_return_sequences=2)
        with pytest.raises(InvalidRequestError, match=r"^num_return_sequences: "):
            client.stream(None, "a b", num_return_sequences=9)
        assert client.analyze(None, "a b", enable_thinking=False, seed=7).text == expected[0]

    assert several(items) == (expected, [(0, "stop"), (1, "stop"), (2, "stop")])
    assert [item.index for item in items[:3]] == [0, 1, 2]  # interleaved as the server sent them
    assert isinstance(items[-1], Finish)

    async def run():
        async with AsyncClient(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
            return [item async for item in client.stream(None, "a b", **asked)]

    assert several(asyncio.run(run())) == several(items)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client(fixture_triton, protocol, fixture_log):
    async def run():
        async with AsyncClient(url_of(fixture_triton, protocol), protocol=protocol, timeout=30) as client:
            assert await client.is_ready()
            results = await asyncio.gather(
                *(client.analyze(None, f"q{i} x", temperature=0) for i in range(4))
            )
            items = [item async for item in client.stream(None, "a b", enable_thinking=False)]
            with pytest.raises(ServerError, match="max_tokens: the fixture was asked to fail"):
                await client.analyze(None, "fail")
            return results, items

    results, items = asyncio.run(run())
    assert [r.text for r in results] == [f"q{i} x | images=0 sizes= temperature=0 seed=-" for i in range(4)]
    assert (
        "".join(i.text for i in items if isinstance(i, Delta)) == "a b | images=0 sizes= temperature=- seed=-"
    )
    assert isinstance(items[-1], Finish) and items[-1].finish_reason == "stop"


def test_async_timeout_and_cancel(fixture_triton, fixture_log):
    async def run():
        async with AsyncClient(fixture_triton.grpc_url, timeout=0.5) as client:
            with pytest.raises(RequestTimeoutError):
                await client.analyze(None, "sleep 0.2 a b c d e f", request_id="async-timeout-1")
        async with AsyncClient(fixture_triton.grpc_url, timeout=30) as client:
            task = asyncio.ensure_future(
                client.analyze(None, "sleep 0.2 a b c d e f", request_id="async-cancel-1")
            )
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    assert wait_for_line(fixture_log, "cancelled async-timeout-1")
    assert wait_for_line(fixture_log, "cancelled async-cancel-1")


def test_cli(fixture_triton, tmp_path, png_bytes, capsys):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes)
    code = cli_main(
        ["ask", str(image), "hello cli", "--url", fixture_triton.grpc_url, "--no-thinking", "--stream"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out == f"hello cli | images=1 sizes={len(png_bytes)} temperature=- seed=-\n"
    assert "finish=stop" in err
    code = cli_main(["ask", str(image), "q", "--url", fixture_triton.grpc_url, "--temperature", "-1"])
    assert code == 2
    assert "temperature: -1.0 is out of range >= 0.0" in capsys.readouterr().err
