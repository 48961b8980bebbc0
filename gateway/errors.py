"""HTTP answers for failures: glmv_client errors → OpenAI-shaped ApiError, and the request body cap.

400 invalid request (client-side checks, or a server message naming an ensemble input), 502 the
inference server failed, 503 unreachable, 504 timed out, 413 body over ``max_body_bytes``.
"""

from __future__ import annotations

from fastapi import Request
from glmv_client.errors import (
    InvalidRequestError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)

from .openai_schema import ApiError


def api_error_from(exc: Exception) -> ApiError:
    """The HTTP answer for an error raised by glmv_client."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        param = "messages" if exc.field.startswith("images") else exc.field
        return ApiError(400, exc.message, param=param, code="invalid_request")
    if isinstance(exc, ServerError):
        if exc.is_invalid_request:
            field = exc.field or None
            param = "messages" if field in ("image_input", "text_input", "messages") else field
            if field == "num_return_sequences":  # n over the server's --max-num-return-sequences
                param = "n"
            return ApiError(400, exc.message, param=param, code="invalid_request")
        return ApiError(
            502, f"The inference server failed: {exc.message}", type="server_error", code="backend_error"
        )
    if isinstance(exc, ServerUnavailableError):
        return ApiError(
            503,
            f"The inference server is unavailable: {exc}",
            type="server_error",
            code="backend_unavailable",
        )
    if isinstance(exc, RequestTimeoutError):
        return ApiError(
            504, f"The inference server timed out: {exc}", type="server_error", code="backend_timeout"
        )
    return ApiError(
        500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _body_too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _body_too_large(None, limit)
    return bytes(body)


def _body_too_large(size: int | None, limit: int) -> ApiError:
    amount = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return ApiError(
        413,
        f"Request body is {amount}, over the limit of {limit} bytes (max_body_bytes).",
        code="request_too_large",
    )
