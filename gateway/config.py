"""The gateway's one configuration object, parsed from CLI flags and environment variables here only.

Every field of :class:`GatewayConfig` has a flag ``--field-name`` and an environment variable
``GLMV_GATEWAY_FIELD_NAME``; a flag wins over the variable, the variable over the default. Lists
(API keys, guard phrases, filter words) are comma-separated. Bad values fail at start-up with a
message naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

MiB = 1024 * 1024
ENV_PREFIX = "GLMV_GATEWAY_"


class ConfigError(ValueError):
    """A setting has a bad value; the message names it."""


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of the OpenAI-compatible gateway."""

    triton_url: str = "localhost:8001"  # Triton gRPC address; several, comma-separated (gateway/backends.py)
    backend_load_factor: float = 1.25  # several servers: a server takes at most this x its share of requests
    backend_retry_s: float = 5.0  # several servers: an unreachable one is tried last for this long
    triton_model: str = "ensemble"  # Triton model answering requests
    served_model_name: str = "glm-4.6v-flash"  # the model id clients send and /v1/models lists
    host: str = "0.0.0.0"
    port: int = 8080
    api_keys: tuple[str, ...] = ()  # Bearer keys; empty = open
    rate_limit_rps: float = 0.0  # requests per second per key (or client IP when open); 0 = off
    rate_limit_burst: int = 10  # token-bucket size
    max_body_bytes: int = 16 * MiB  # request body cap (413 above it)
    max_image_bytes: int = 10 * MiB  # one decoded image (413 above it)
    max_images_per_request: int = 4
    max_tokens_default: int = 1024  # max_tokens when a request gives none
    max_tokens_limit: int = 4096  # largest max_tokens accepted (keep <= the server's max_output_tokens)
    max_choices: int = 8  # largest n accepted (keep <= the server's --max-num-return-sequences)
    allow_image_urls: bool = False  # fetch http(s) image URLs (private addresses always refused)
    image_url_timeout_s: float = 10.0
    request_timeout_s: float = 600.0  # whole request to Triton, stream included
    cache_size: int = 256  # exact-match response cache entries (in-memory LRU); 0 = off
    cache_ttl_s: float = 3600.0
    redis_url: str = ""  # use Redis for the response cache when set (needs the redis package)
    prompt_guard_phrases: tuple[str, ...] = ()  # case-insensitive phrases refused with 400 prompt_rejected
    output_filter_words: tuple[str, ...] = ()  # words masked with '*' in answers
    drain_timeout_s: float = 30.0  # on SIGTERM, seconds open requests get to finish
    readiness_ttl_s: float = 5.0  # how long a readiness probe result is reused
    readiness_timeout_s: float = 30.0  # the 1-token probe's timeout
    static_dir: str = ""  # web page directory; empty = the bundled page

    def __post_init__(self) -> None:
        positive = (
            "port",
            "max_body_bytes",
            "max_image_bytes",
            "max_images_per_request",
            "max_tokens_default",
            "max_choices",
        )
        for name in positive + ("max_tokens_limit", "rate_limit_burst"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("rate_limit_rps", "cache_size", "cache_ttl_s", "readiness_ttl_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("image_url_timeout_s", "request_timeout_s", "readiness_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.triton_urls:
            raise ConfigError("triton_url must name at least one Triton gRPC address (host:port)")
        if len(set(self.triton_urls)) != len(self.triton_urls):
            raise ConfigError(f"triton_url names a server twice: {self.triton_url}")
        if self.backend_load_factor < 1:
            raise ConfigError(f"backend_load_factor must be >= 1, got {self.backend_load_factor}")
        if self.backend_retry_s < 0:
            raise ConfigError(f"backend_retry_s must be >= 0, got {self.backend_retry_s}")
        if self.max_tokens_default > self.max_tokens_limit:
            raise ConfigError(
                f"max_tokens_default ({self.max_tokens_default}) is over max_tokens_limit ({self.max_tokens_limit})"
            )
        if self.port > 65535:
            raise ConfigError(f"port must be <= 65535, got {self.port}")
        if any(not k for k in self.api_keys):
            raise ConfigError("api_keys must not contain empty keys")

    @property
    def triton_urls(self) -> tuple[str, ...]:
        """The Triton servers of ``triton_url`` (comma-separated), in the order given."""
        return tuple(url.strip() for url in self.triton_url.split(",") if url.strip())

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        """Defaults, overridden by ``GLMV_GATEWAY_*`` variables, overridden by flags."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f, raw, f"{ENV_PREFIX}{f.name.upper()}")
        args = build_parser().parse_args(list(argv) if argv is not None else [])
        for f in fields(cls):
            raw = getattr(args, f.name)
            if raw is not None:
                values[f.name] = _convert(f, raw, "--" + f.name.replace("_", "-"))
        return cls(**values)


def _convert(f: dataclasses.Field[Any], raw: str, source: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"expected true/false, got {raw!r}")
            return low in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        return raw
    except ValueError as exc:
        raise ConfigError(f"{f.name} ({source}): {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="OpenAI-compatible HTTP gateway and web page in front of the glmv-serve Triton ensemble. "
        f"Every flag also reads {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}TRITON_URL).",
    )
    for f in fields(GatewayConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"default: {f.default!r}",
        )
    return parser
