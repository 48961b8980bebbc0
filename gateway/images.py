"""Image parts → encoded image bytes: data URIs decoded, http(s) URLs fetched behind a guard.

- A ``data:`` URI's decoded size is computed from its base64 length *before* decoding; over
  ``max_image_bytes`` → 413 ``image_too_large``.
- http(s) URLs are fetched only with ``allow_image_urls``. The host is resolved first and every
  address must be public (private, loopback, link-local, multicast, reserved and unspecified
  addresses are refused with 400 ``image_url_forbidden``); the connection then goes to the checked
  address (Host header and TLS SNI keep the name), so a second DNS answer cannot redirect it.
  Redirects are not followed. The body is read up to ``max_image_bytes`` (413 above) within
  ``image_url_timeout_s`` (400 ``image_url_fetch_failed`` on expiry or a non-200 status).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx
from glmv_client.errors import InvalidRequestError
from glmv_client.images import decode_data_uri

from .config import GatewayConfig
from .openai_schema import ApiError, ImageRef


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def decoded_size(b64: str) -> int:
    """Bytes a base64 payload decodes to (without decoding it)."""
    payload = b64.strip()
    return len(payload) * 3 // 4 - payload[-2:].count("=")


async def resolve_images(refs: list[ImageRef], config: GatewayConfig, http: httpx.AsyncClient) -> list[bytes]:
    return [await resolve_image(ref, config, http) for ref in refs]


async def resolve_image(ref: ImageRef, config: GatewayConfig, http: httpx.AsyncClient) -> bytes:
    if ref.url.startswith("data:"):
        _, _, payload = ref.url.partition(",")
        size = decoded_size(payload)
        if size > config.max_image_bytes:
            raise _too_large(ref, size, config)
        try:
            return decode_data_uri(ref.url, ref.param)
        except InvalidRequestError as exc:
            raise ApiError(400, exc.message, param=ref.param, code="invalid_image") from None
    scheme = urlsplit(ref.url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ApiError(
            400,
            f"{ref.param}: the image URL must be a data: URI or an http(s) URL.",
            param=ref.param,
            code="invalid_image",
        )
    if not config.allow_image_urls:
        raise ApiError(
            400,
            f"{ref.param}: image URLs are disabled on this server (allow_image_urls); send the image as a data: URI.",
            param=ref.param,
            code="image_url_not_allowed",
        )
    try:
        return await asyncio.wait_for(_fetch(ref, config, http), config.image_url_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(
            400,
            f"{ref.param}: fetching the image took longer than {config.image_url_timeout_s} s (image_url_timeout_s).",
            param=ref.param,
            code="image_url_fetch_failed",
        ) from None


async def _fetch(ref: ImageRef, config: GatewayConfig, http: httpx.AsyncClient) -> bytes:
    parts = urlsplit(ref.url)
    host = parts.hostname
    if not host:
        raise ApiError(400, f"{ref.param}: the image URL has no host.", param=ref.param, code="invalid_image")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ApiError(
            400,
            f"{ref.param}: cannot resolve {host!r} ({exc.strerror}).",
            param=ref.param,
            code="image_url_fetch_failed",
        ) from None
    addresses = sorted({info[4][0] for info in infos})
    refused = [a for a in addresses if not is_public_address(a)]
    if refused or not addresses:
        raise ApiError(
            400,
            f"{ref.param}: {host!r} resolves to a non-public address ({', '.join(refused) or 'none'}); refused.",
            param=ref.param,
            code="image_url_forbidden",
        )
    address = addresses[0]
    netloc_ip = f"[{address}]" if ":" in address else address
    pinned = urlunsplit((parts.scheme, f"{netloc_ip}:{port}", parts.path or "/", parts.query, ""))
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    request = http.build_request("GET", pinned, headers=headers, extensions=extensions)
    try:
        response = await http.send(request, stream=True, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise ApiError(
            400,
            f"{ref.param}: fetching the image failed ({exc}).",
            param=ref.param,
            code="image_url_fetch_failed",
        ) from None
    try:
        if response.status_code != 200:
            raise ApiError(
                400,
                f"{ref.param}: fetching the image answered HTTP {response.status_code}.",
                param=ref.param,
                code="image_url_fetch_failed",
            )
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_image_bytes:
            raise _too_large(ref, int(declared), config)
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > config.max_image_bytes:
                raise _too_large(ref, len(data), config, at_least=True)
        return bytes(data)
    finally:
        await response.aclose()


def _too_large(ref: ImageRef, size: int, config: GatewayConfig, at_least: bool = False) -> ApiError:
    amount = f"more than {config.max_image_bytes}" if at_least else str(size)
    return ApiError(
        413,
        f"{ref.param}: image is {amount} bytes, over the limit of {config.max_image_bytes} bytes (max_image_bytes).",
        param=ref.param,
        code="image_too_large",
    )
