"""Asyncio client with the same API as :class:`glmv_client.Client`.

gRPC goes through ``tritonclient.grpc.aio`` (one ``ModelStreamInfer`` call per request, many
concurrent requests on one channel); HTTP through ``httpx.AsyncClient``. Leaving ``stream()`` early
(``break``, task cancellation, ``aclose()``) cancels the gRPC call, which cancels the request on
the server.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpc
from tritonclient.utils import InferenceServerException

from .client import (
    ClientSettings,
    checked_json_response,
    grpc_channel_args,
    grpc_inputs,
    http_error_message,
    is_connection_error,
    output_names,
)
from .errors import RequestTimeoutError, ServerError, ServerUnavailableError
from .images import ImageLike
from .request import GenerateRequest, build_request, generate_json, one_sequence
from .results import (
    Assembler,
    Delta,
    Finish,
    Response,
    Result,
    Sequences,
    aevent_lines,
    response_from_grpc,
)


class AsyncClient(ClientSettings):
    """Asyncio client; safe for many concurrent requests."""

    def _open(self) -> None:
        self._grpc: aiogrpc.InferenceServerClient | None = None
        self._http: httpx.AsyncClient | None = None
        if self.protocol == "http":
            self._http = httpx.AsyncClient(
                base_url=self._http_base_url(), timeout=self.timeout, headers=self.headers
            )

    # -- public API ---------------------------------------------------------------------------

    async def analyze(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str, **sampling: Any
    ) -> Result:
        """The whole answer to ``prompt`` about ``images``.

        Asked of the server as a stream and folded here: Triton 2.51 hands an ensemble's cancellation only
        to the steps after it, so a request that sends no response before its last could not be stopped
        when this call is cancelled (a gateway client that went away)."""
        req = one_sequence(build_request(images, prompt, limits=self.limits, stream=True, **sampling))
        asm = Assembler(is_stream=True)
        responses = self._responses(req, asm)
        try:
            async for resp in responses:
                asm.add(resp)
        finally:
            await responses.aclose()
        return asm.result()

    def stream(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str, **sampling: Any
    ) -> AsyncIterator[Delta | Finish]:
        """Yield :class:`Delta` items as the answer is generated, then one :class:`Finish`."""
        req = build_request(images, prompt, limits=self.limits, stream=True, **sampling)
        return self._stream(req)

    async def is_ready(self) -> bool:
        """True when the server is up and the model is loaded."""
        try:
            if self.protocol == "http":
                assert self._http is not None
                r = await self._http.get(f"/v2/models/{self.model}/ready")
                return r.status_code == 200
            client = self._grpc_client()
            return bool(await client.is_server_ready() and await client.is_model_ready(self.model))
        except (InferenceServerException, httpx.HTTPError):
            return False

    async def close(self) -> None:
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------

    async def _stream(self, req: GenerateRequest) -> AsyncIterator[Delta | Finish]:
        sequences = Sequences(req.num_return_sequences)
        responses = self._responses(req, sequences)
        try:
            async for resp in responses:
                for item in sequences.add(resp):
                    yield item
        finally:
            await responses.aclose()
        for item in sequences.unfinished():
            yield item

    def _grpc_client(self) -> aiogrpc.InferenceServerClient:
        if self._grpc is None:
            self._grpc = aiogrpc.InferenceServerClient(
                self.url, channel_args=grpc_channel_args(self.limits.max_message_bytes)
            )
        return self._grpc

    async def _responses(self, req: GenerateRequest, asm: Assembler | Sequences) -> AsyncIterator[Response]:
        request_id = req.request_id or uuid.uuid4().hex
        attempt = 0
        while True:
            asm.restart()
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            received = False
            gen = (
                self._grpc_responses(req, request_id, deadline)
                if self.protocol == "grpc"
                else self._generate(req, deadline)
            )
            try:
                async for resp in gen:
                    received = True
                    yield resp
                return
            except (InferenceServerException, httpx.HTTPError) as err:
                if received or not is_connection_error(err):
                    if isinstance(err, InferenceServerException):
                        raise ServerError(err.message() or str(err), status=err.status()) from None
                    raise ServerError(f"{type(err).__name__}: {err}") from None
                if attempt >= self.max_retries:
                    raise ServerUnavailableError(
                        f"cannot reach {self.url} over {self.protocol} after {attempt + 1} attempts: {err}"
                    ) from None
            finally:
                await gen.aclose()
            await asyncio.sleep(self.retry_backoff * 2**attempt)
            attempt += 1

    def _timeout_error(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"no complete answer from {self.url} within {self.timeout} s (timeout); request cancelled"
        )

    async def _grpc_responses(
        self, req: GenerateRequest, request_id: str, deadline: float | None
    ) -> AsyncIterator[Response]:
        request = {
            "model_name": self.model,
            "inputs": grpc_inputs(req),
            "outputs": [grpcclient.InferRequestedOutput(n) for n in output_names(req)],
            "request_id": request_id,
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        call = self._grpc_client().stream_infer(requests(), headers=self.headers)
        is_done = False
        finished = 0  # sequences ended (num_return_sequences)
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise self._timeout_error()
                # Not asyncio.wait_for: on Python < 3.12 it returns the result when a cancellation lands in
                # the same loop step as the response, and the cancelled caller then runs on unaware, its
                # request generating to the end. asyncio.wait always raises the cancellation.
                next_response = asyncio.ensure_future(call.__anext__())
                try:
                    done, _ = await asyncio.wait({next_response}, timeout=remaining)
                finally:
                    if not next_response.done():
                        # Cancelling the task that awaits a gRPC read leaks the read's native buffers in
                        # grpcio (grpc/grpc#43360, ~0.5 KB a request); cancelling the call ends the read.
                        call.cancel()
                        await asyncio.wait({next_response})
                if not done:
                    raise self._timeout_error()
                try:
                    result, error = next_response.result()
                except StopAsyncIteration:
                    raise ServerError("the stream ended without a finish_reason") from None
                except Exception as exc:  # grpc.aio.AioRpcError
                    raise _aio_rpc_error(exc) from None
                if error is not None:
                    raise error
                resp = response_from_grpc(result.get_response())
                yield resp
                finished += bool(resp.finish_reason)
                if finished == req.num_return_sequences:
                    is_done = True
                    return
        finally:
            if not is_done:
                call.cancel()

    async def _generate(self, req: GenerateRequest, deadline: float | None) -> AsyncIterator[Response]:
        assert self._http is not None
        path = f"/v2/models/{self.model}/{'generate_stream' if req.stream else 'generate'}"
        try:
            async with self._http.stream("POST", path, json=generate_json(req)) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise ServerError(http_error_message(r), status=r.status_code)
                if not req.stream:
                    await r.aread()
                    yield checked_json_response(json.loads(r.text), r.status_code)
                    return
                finished = 0  # sequences ended (num_return_sequences)
                async for line in aevent_lines(r.aiter_text()):
                    if deadline is not None and time.monotonic() > deadline:
                        raise httpx.ReadTimeout("deadline passed")
                    if not line.startswith("data:"):
                        continue
                    resp = checked_json_response(json.loads(line[5:]), r.status_code)
                    yield resp
                    finished += bool(resp.finish_reason)
                    if finished == req.num_return_sequences:
                        return
                raise ServerError("generate_stream ended without a finish_reason", status=r.status_code)
        except httpx.TimeoutException as err:
            if isinstance(err, httpx.ConnectTimeout):
                raise
            raise self._timeout_error() from None


def _aio_rpc_error(exc: Exception) -> Exception:
    """An AioRpcError as the InferenceServerException the retry logic understands."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return InferenceServerException(msg=details() or str(exc), status=str(code()))
    return exc
