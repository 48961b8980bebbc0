"""Several Triton servers behind one gateway (gateway/backends.py): which server answers which request.

The first tests check the placement rules on their own; the last ones run two real Triton servers with the
tiny engine behind a real gateway, called with the OpenAI SDK: every question about an image goes to one
server (its follow-ups hit that server's prefix cache), both servers get images, and a server that goes
away leaves its images to the other without a failed request.
"""

from __future__ import annotations

import base64
import io
import re
from collections import Counter

import httpx
import pytest
from glmv_client import AsyncClient

from gateway.backends import Backends, affinity_key
from gateway.config import ConfigError, GatewayConfig

MODEL = "glm-4.6v-flash"
QUESTION = "Look at the picture carefully and answer in a few words, without any preamble: "


def backends(*urls: str, **kwargs) -> Backends:
    return Backends(list(urls), AsyncClient, **kwargs)


def keys(n: int) -> list[bytes]:
    return [affinity_key([f"image {i}".encode()], []) for i in range(n)]


def test_each_key_prefers_one_server_and_the_servers_share_the_keys() -> None:
    b = backends("a:1", "b:2")
    first = [b.order(k)[0].url for k in keys(2000)]
    assert first == [b.order(k)[0].url for k in keys(2000)]  # stable
    assert first == [backends("b:2", "a:1").order(k)[0].url for k in keys(2000)]  # not the list's order
    share = Counter(first)["a:1"] / len(first)
    assert 0.45 < share < 0.55, share


def test_a_new_server_takes_keys_only_from_the_others_never_moves_them_between_them() -> None:
    two, three = backends("a:1", "b:2"), backends("a:1", "b:2", "c:3")
    moved = [(two.order(k)[0].url, three.order(k)[0].url) for k in keys(3000)]
    assert all(after in (before, "c:3") for before, after in moved)
    assert 0.28 < sum(after == "c:3" for _, after in moved) / len(moved) < 0.38


def test_a_server_over_its_load_bound_is_tried_after_the_others() -> None:
    b = backends("a:1", "b:2", load_factor=1.25)
    key = next(k for k in keys(50) if b.order(k)[0].url == "a:1")
    a, other = b.order(key)
    a.in_flight = 1  # bound = ceil(1.25 * (1 + 0 + 1) / 2) = 2: under it
    assert b.order(key)[0] is a
    a.in_flight = 2  # at the bound: the other server first
    assert [x.url for x in b.order(key)] == ["b:2", "a:1"]
    other.in_flight = 2  # bound ceil(1.25 * 5 / 2) = 4: the key's own order again
    assert b.order(key)[0] is a
    with b.lease(a):
        assert a.in_flight == 3
    assert a.in_flight == 2


def test_an_unreachable_server_is_tried_last_until_it_is_back() -> None:
    b = backends("a:1", "b:2", retry_after_s=60)
    key = next(k for k in keys(50) if b.order(k)[0].url == "a:1")
    b.mark_down(b.order(key)[0])
    assert [x.url for x in b.order(key)] == ["b:2", "a:1"]
    b.mark_down(b.order(key)[0])
    assert [x.url for x in b.order(key)] == ["a:1", "b:2"]  # all down: the key's own order
    for backend in b:
        b.mark_up(backend)
    assert b.order(key)[0].url == "a:1"
    assert [x.url for x in backends("a:1").order(key)] == ["a:1"]


def test_the_affinity_key_is_the_first_image_or_the_opening_of_the_conversation() -> None:
    system = {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
    q1 = {"role": "user", "content": [{"type": "text", "text": "what is this?"}]}
    a1 = {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}
    q2 = {"role": "user", "content": [{"type": "text", "text": "what colour?"}]}
    assert affinity_key([b"png-1"], [q1]) == affinity_key([b"png-1", b"png-2"], [system, q1, a1, q2])
    assert affinity_key([b"png-1"], [q1]) != affinity_key([b"png-2"], [q1])
    assert affinity_key([], [system, q1]) == affinity_key([], [system, q1, a1, q2])  # a resent conversation
    assert affinity_key([], [system, q1]) != affinity_key([], [system, q2])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"triton_url": " , "}, "triton_url must name at least one Triton gRPC address"),
        ({"triton_url": "a:1,b:2,a:1"}, "triton_url names a server twice: a:1,b:2,a:1"),
        ({"backend_load_factor": 0.9}, "backend_load_factor must be >= 1, got 0.9"),
        ({"backend_retry_s": -1.0}, "backend_retry_s must be >= 0, got -1.0"),
    ],
)
def test_bad_backend_settings_are_refused_naming_them(fields, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        GatewayConfig(**fields)


def test_triton_url_takes_a_list() -> None:
    config = GatewayConfig.from_sources(["--triton-url", "a:8001, b:8001"], {})
    assert config.triton_urls == ("a:8001", "b:8001")
    assert GatewayConfig().triton_urls == ("localhost:8001",)


# -- two real servers ---------------------------------------------------------------------------------


def ensemble_requests(server) -> int:
    """Requests the server's ensemble has answered (Triton's own metrics)."""
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    match = re.search(r'^nv_inference_request_success\{model="ensemble",version="1"\} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (56, 56))
    img.putdata(
        [
            ((x * seed) % 256, (y * 7 + seed) % 256, (x + y + 3 * seed) % 256)
            for y in range(56)
            for x in range(56)
        ]
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def images_for(urls: list[str], per_server: int) -> dict[str, list[bytes]]:
    """``per_server`` images that each server of ``urls`` is first in line for."""
    order = Backends(urls, AsyncClient)
    chosen: dict[str, list[bytes]] = {url: [] for url in urls}
    seed = 0
    while any(len(v) < per_server for v in chosen.values()):
        seed += 1
        data = png_bytes(seed)
        first = order.order(affinity_key([data], []))[0].url
        if len(chosen[first]) < per_server:
            chosen[first].append(data)
    return chosen


def ask(openai_client, image: str, question: str, stream: bool):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": question},
            ],
        }
    ]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0, seed=None)
    if stream:
        chunks = list(
            openai_client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        )
        return chunks[-1].usage
    return openai_client.chat.completions.create(**kwargs).usage


@pytest.mark.slow
def test_an_images_questions_go_to_one_server_and_move_when_it_goes_away(
    tiny_model_repository, gateway_server_class, tmp_path
):
    """Two servers: every question about an image goes to one of them and hits its prefix cache, both get
    images; then one server stops and every image is answered by the other (failovers counted, /readyz
    still ready, naming the server that is gone)."""
    openai = pytest.importorskip("openai")
    from build_engine.launcher import TritonServer

    with TritonServer(
        tiny_model_repository, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "a.log"
    ) as a:
        b = TritonServer(
            tiny_model_repository, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "b.log"
        )
        with b:
            chosen = images_for([a.grpc_url, b.grpc_url], 3)  # 3 images first in line for each server
            images = [(url, data) for url, datas in chosen.items() for data in datas]
            config = GatewayConfig(
                triton_url=f"{a.grpc_url},{b.grpc_url}", cache_size=0, readiness_ttl_s=0, backend_retry_s=600
            )
            with gateway_server_class(config) as gateway:
                client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
                for i, (url, data) in enumerate(images):
                    cached = []
                    for turn, question in enumerate(
                        ["what is this?", "what colour is it?", "is there text?"]
                    ):
                        before = {s.grpc_url: ensemble_requests(s) for s in (a, b)}
                        usage = ask(client, data_uri(data), QUESTION + question, stream=turn % 2 == 1)
                        after = {s.grpc_url: ensemble_requests(s) for s in (a, b)}
                        assert [s for s in after if after[s] > before[s]] == [url], (i, turn)
                        cached.append(usage.prompt_tokens_details.cached_tokens)
                    # the first question reuses at most the chat template's opening; the next ones the image too
                    assert cached[1] > cached[0] and cached[2] > cached[0], (i, cached)
                metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
                for server in (a, b):
                    assert metric(metrics, "glmv_gateway_backend_requests_total", server.grpc_url) == 9

                b.stop()  # b goes away while the gateway runs
                for i, (_, data) in enumerate(images):  # b's images too: each moves to a at once
                    assert ask(client, data_uri(data), "and now?", stream=i % 2 == 0).completion_tokens > 0
                    assert b.process is not None and b.process.poll() is not None
                ready = httpx.get(gateway.url + "/readyz", timeout=60)
                assert ready.status_code == 200, ready.text
                reason = ready.json()["reason"]
                assert reason.startswith("ready on 1 of 2 Triton servers; "), reason
                assert f"{b.grpc_url}: Triton at {b.grpc_url}" in reason
                metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
                assert metric(metrics, "glmv_gateway_backend_failovers_total", b.grpc_url) == 1  # then down
                assert metric(metrics, "glmv_gateway_backend_requests_total", a.grpc_url) == 9 + 6


def metric(text: str, name: str, backend: str) -> float:
    match = re.search(rf'^{name}\{{backend="{re.escape(backend)}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0
