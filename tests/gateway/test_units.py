"""Gateway parts that need no server: config, rate limiter, LRU cache, guard, filter, schema, address guard."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth import ApiKeyAuth
from gateway.cache import LruCache, cache_key
from gateway.config import ConfigError, GatewayConfig
from gateway.guard import OutputFilter, PromptGuard
from gateway.images import decoded_size, is_public_address
from gateway.openai_schema import ApiError, parse_chat_request
from gateway.ratelimit import RateLimiter

CONFIG = GatewayConfig()


def test_config_flags_override_env_override_defaults():
    config = GatewayConfig.from_sources(
        ["--port", "9000", "--api-keys", "k1, k2"],
        {
            "GLMV_GATEWAY_PORT": "1234",
            "GLMV_GATEWAY_ALLOW_IMAGE_URLS": "yes",
            "GLMV_GATEWAY_RATE_LIMIT_RPS": "2.5",
        },
    )
    assert (config.port, config.api_keys, config.allow_image_urls, config.rate_limit_rps) == (
        9000,
        ("k1", "k2"),
        True,
        2.5,
    )
    assert GatewayConfig.from_sources([], {}) == GatewayConfig()
    with pytest.raises(ConfigError, match=r"^port \(--port\): invalid literal"):
        GatewayConfig.from_sources(["--port", "x"], {})
    with pytest.raises(
        ConfigError, match=r"^allow_image_urls \(GLMV_GATEWAY_ALLOW_IMAGE_URLS\): expected true/false"
    ):
        GatewayConfig.from_sources([], {"GLMV_GATEWAY_ALLOW_IMAGE_URLS": "maybe"})
    with pytest.raises(ConfigError, match="max_body_bytes must be > 0"):
        GatewayConfig(max_body_bytes=0)


def test_token_bucket():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # buckets are per key
    now[0] = 0.5
    assert limiter.acquire("a") == 0.0
    assert RateLimiter.retry_after(0.2) == 1 and RateLimiter.retry_after(1.01) == 2
    assert RateLimiter(0, 1).acquire("a") == 0.0
    assert limiter.acquire("c", 2) == 0.0 and limiter.acquire("c", 2) == pytest.approx(0.5)  # 1 of 2 left
    assert limiter.acquire("c") == 0.0  # a refused cost took nothing


def test_lru_cache_evicts_and_expires():
    now = [0.0]
    cache = LruCache(max_entries=2, ttl_s=10, clock=lambda: now[0])

    async def run():
        await cache.set("a", {"v": 1})
        await cache.set("b", {"v": 2})
        assert await cache.get("a") == {"v": 1}  # a is now most recent
        await cache.set("c", {"v": 3})  # evicts b
        assert await cache.get("b") is None
        assert len(cache) == 2
        now[0] = 11
        assert await cache.get("a") is None  # expired

    asyncio.run(run())


def test_cache_key_depends_on_images_and_sampling():
    body = {
        "model": CONFIG.served_model_name,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
    }
    req = parse_chat_request(body, CONFIG)
    assert cache_key(req, [b"x"]) == cache_key(parse_chat_request(dict(body), CONFIG), [b"x"])
    assert cache_key(req, [b"x"]) != cache_key(req, [b"y"])
    assert cache_key(req, []) != cache_key(parse_chat_request({**body, "max_tokens": 5}, CONFIG), [])
    assert req.is_deterministic
    assert not parse_chat_request({**body, "temperature": 0.7}, CONFIG).is_deterministic
    assert parse_chat_request({**body, "temperature": 0.7, "seed": 1}, CONFIG).is_deterministic


def test_prompt_guard_and_output_filter():
    guard = PromptGuard(("Ignore the above",))
    guard.check([{"role": "user", "content": "describe the image"}])
    with pytest.raises(ApiError) as info:
        guard.check([{"role": "user", "content": [{"type": "text", "text": "Please IGNORE   the above."}]}])
    assert (
        info.value.status == 400
        and info.value.code == "prompt_rejected"
        and info.value.param == "messages[0]"
    )
    out = OutputFilter(("darn",))
    assert out.apply("Darn it, darned") == "**** it, darned"
    stream = out.stream()
    pieces = [stream.feed(p) for p in ("oh d", "ar", "n! da", "rn")] + [stream.flush()]
    assert "".join(pieces) == "oh ****! ****"


def test_api_keys():
    auth = ApiKeyAuth(("secret",))
    assert auth.check("Bearer secret") == "secret"
    for header, code in (
        (None, "missing_api_key"),
        ("Bearer nope", "invalid_api_key"),
        ("Basic secret", "missing_api_key"),
    ):
        with pytest.raises(ApiError) as info:
            auth.check(header)
        assert (info.value.status, info.value.code) == (401, code)
    assert ApiKeyAuth(()).check(None) is None


def test_address_guard():
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
    ):
        assert not is_public_address(address), address
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700:4700::1111")
    assert decoded_size("aGVsbG8=") == 5 and decoded_size("aGk=") == 2


@pytest.mark.parametrize(
    ("patch", "status", "param", "text"),
    [
        ({"n": 9}, 400, "n", "n must be between 1 and 8 (max_choices), got 9."),
        ({"n": 0}, 400, "n", "n must be between 1 and 8 (max_choices), got 0."),
        ({"n": 2.5}, 400, "n", "'n' must be an integer, got 2.5."),
        (
            {"max_tokens": 0},
            400,
            "max_tokens",
            "max_tokens must be between 1 and 4096 (max_tokens_limit), got 0.",
        ),
        ({"temperature": 3}, 400, "temperature", "'temperature' must be in [0.0, 2.0], got 3."),
        ({"stop": [1]}, 400, "stop", "'stop' must be a non-empty string or an array of them."),
        (
            {"model": "gpt-4"},
            404,
            "model",
            "The model 'gpt-4' does not exist; this server serves 'glm-4.6v-flash'.",
        ),
        ({"messages": []}, 400, "messages", "'messages' must be a non-empty array."),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            400,
            "messages[0].content[0]",
            None,
        ),
        (
            {"chat_template_kwargs": {"enable_thinking": "no"}},
            400,
            "chat_template_kwargs.enable_thinking",
            None,
        ),
        (
            {"ignore_eos": True},
            400,
            "ignore_eos",
            "'ignore_eos' is not supported by this server; use 'min_tokens'.",
        ),
        ({"best_of": 2}, 400, "best_of", "'best_of' is not supported by this server."),
        (
            {"logit_bias": {"151329": -100}},
            400,
            "logit_bias",
            "'logit_bias' is supported only as {} (no token biases), got {'151329': -100}.",
        ),
        (
            {"parallel_tool_calls": False},
            400,
            "parallel_tool_calls",
            "'parallel_tool_calls' is supported only as true (an answer may call several tools), got False.",
        ),
        (
            {"store": True},
            400,
            "store",
            "'store' is supported only as false (completions are not stored), got True.",
        ),
        (
            {"stream_options": {"include_usage": True}},
            400,
            "stream_options",
            "'stream_options' is only allowed with 'stream': true.",
        ),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": True}},
            400,
            "stream_options.continuous_usage_stats",
            "stream_options.continuous_usage_stats is not supported by this server; it takes include_usage.",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            400,
            "stream_options.include_usage",
            "stream_options.include_usage must be a boolean.",
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "name": "alice"}]},
            400,
            "messages[0].name",
            "'messages[0].name' is not supported by this server; GLM-4.6V's chat template has no participant "
            "names.",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "a", "refusal": "no"},
                ]
            },
            400,
            "messages[1].refusal",
            "'messages[1].refusal' is not supported by this server.",
        ),
        (
            {"chat_template_kwargs": {"tools_first": True}},
            400,
            "chat_template_kwargs.tools_first",
            "chat_template_kwargs.tools_first is not read by GLM-4.6V's chat template; it reads enable_thinking.",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}},
                            {"type": "text", "text": "hi"},
                        ],
                    }
                ]
            },
            400,
            "messages[0].content[0].image_url.detail",
            "messages[0].content[0].image_url.detail 'low' is not supported: images keep their detail up to "
            "the processor's pixel limit (auto or high).",
        ),
    ],
)
def test_request_validation(patch, status, param, text):
    body = {"model": CONFIG.served_model_name, "messages": [{"role": "user", "content": "hi"}], **patch}
    with pytest.raises(ApiError) as info:
        parse_chat_request(body, CONFIG)
    assert (info.value.status, info.value.param) == (status, param)
    if text is not None:
        assert info.value.message == text


def test_fields_that_change_nothing_are_accepted():
    """What OpenAI clients send that asks for nothing this server does not do: a null for any field, and the
    neutral values of NEUTRAL_FIELDS; the request parses as it does without them."""
    base = {"model": CONFIG.served_model_name, "messages": [{"role": "user", "content": "hi"}]}
    neutral = {
        "user": "customer-42",
        "store": False,
        "metadata": {"ticket": "7"},
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "logit_bias": {},
        "modalities": ["text"],
        "functions": None,
        "reasoning_effort": None,
    }
    assert parse_chat_request({**base, **neutral}, CONFIG) == parse_chat_request(base, CONFIG)
    # an answer sent back as history with the SDK's extras (empty) and its reasoning
    answer = {"role": "assistant", "content": "hello"}
    sent_back = {**answer, "reasoning_content": "greeting", "refusal": None, "annotations": [], "audio": None}
    history = {**base, "messages": [*base["messages"], answer, {"role": "user", "content": "and?"}]}
    resent = {**history, "messages": [*base["messages"], sent_back, {"role": "user", "content": "and?"}]}
    assert parse_chat_request(resent, CONFIG).messages == parse_chat_request(history, CONFIG).messages
    detail = {
        **base,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:,", "detail": "high"}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    }
    assert parse_chat_request(detail, CONFIG).images[0].url == "data:,"


def test_messages_become_ensemble_messages():
    body = {
        "model": CONFIG.served_model_name,
        "max_completion_tokens": 9,
        "stop": "END",
        "seed": 3,
        "chat_template_kwargs": {"enable_thinking": False},
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": "data:image/png;base64,BBBB"},
                ],
            },
        ],
    }
    req = parse_chat_request(body, CONFIG)
    assert req.messages[1]["content"] == [
        {"type": "text", "text": "compare"},
        {"type": "image"},
        {"type": "image"},
    ]
    assert [r.param for r in req.images] == [
        "messages[1].content[1].image_url",
        "messages[1].content[2].image_url",
    ]
    assert req.prompt == "compare" and req.max_tokens == 9
    assert req.sampling == {"stop": ["END"], "seed": 3, "enable_thinking": False}
