"""Synchronous client for the glmv-serve Triton ensemble.

``Client(url, protocol="grpc"|"http")``:

- ``analyze(images, prompt, **sampling) -> Result`` — one whole answer.
- ``stream(images, prompt, **sampling)`` — yields :class:`Delta` items, then one :class:`Finish`.
  Closing the generator early (``break``) cancels the request on the server.

gRPC uses ``stream_infer`` (the ensemble is decoupled, so even one answer travels on a stream);
HTTP uses Triton's ``generate`` / ``generate_stream`` endpoints (decoupled models cannot use
``/infer``). Requests are validated first (:mod:`glmv_client.request`). A request is retried, with
backoff, only when the connection failed before any response arrived. ``timeout`` bounds the
whole request (stream included); on expiry the request is cancelled and
:class:`RequestTimeoutError` raised.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .errors import RequestTimeoutError, ServerError, ServerUnavailableError
from .images import ImageLike
from .request import GenerateRequest, Limits, build_request, generate_json, one_sequence, tensor_values
from .results import (
    Assembler,
    Delta,
    Finish,
    Response,
    Result,
    Sequences,
    event_lines,
    response_from_grpc,
    response_from_json,
)

OUTPUTS = (
    "text_output",
    "reasoning_output",
    "finish_reason",
    "num_input_tokens",
    "num_cached_tokens",
    "num_output_tokens",
    "arrival_time_ns",
    "first_token_time_ns",
    "last_token_time_ns",
)


def output_names(req: GenerateRequest) -> tuple[str, ...]:
    """The outputs to ask for: ``logprobs`` and ``sequence_index`` only when the request needs them (older
    servers lack them)."""
    names = OUTPUTS + ("logprobs",) if req.logprobs is not None else OUTPUTS
    return names + ("sequence_index",) if req.num_return_sequences > 1 else names


DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
_UNAVAILABLE = ("StatusCode.UNAVAILABLE",)


def grpc_channel_args(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options that raise gRPC's 4 MiB default to the server's message limit."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def grpc_inputs(req: GenerateRequest) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in tensor_values(req).items():
        inp = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def is_connection_error(err: BaseException) -> bool:
    """True for a transport failure (nothing reached the model), which is safe to retry."""
    if isinstance(err, InferenceServerException):
        return err.status() in _UNAVAILABLE
    return isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout))


def server_error(err: InferenceServerException) -> ServerError:
    return ServerError(err.message() or str(err), status=err.status())


class ClientSettings:
    """Connection and request settings shared by `Client` and `AsyncClient` (validated here once)."""

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: str = "grpc",
        timeout: float | None = 600.0,
        model: str = "ensemble",
        *,
        limits: Limits | None = None,
        max_retries: int = 2,
        retry_backoff: float = 0.2,
        headers: dict[str, str] | None = None,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url = url.removeprefix("grpc://") if protocol == "grpc" else url
        self.protocol = protocol
        self.timeout = timeout
        self.model = model
        self.limits = limits or Limits()
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.headers = headers
        self._open()

    def _open(self) -> None:
        """Set up the transport state (each client class its own)."""

    def _http_base_url(self) -> str:
        return self.url if self.url.startswith(("http://", "https://")) else f"http://{self.url}"


class Client(ClientSettings):
    """Blocking client; thread-safe (each call takes its own gRPC stream)."""

    def _open(self) -> None:
        self._idle: list[grpcclient.InferenceServerClient] = []
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        if self.protocol == "http":
            self._http = httpx.Client(
                base_url=self._http_base_url(), timeout=self.timeout, headers=self.headers
            )

    # -- public API ---------------------------------------------------------------------------

    def analyze(self, images: ImageLike | Sequence[ImageLike] | None, prompt: str, **sampling: Any) -> Result:
        """The whole answer to ``prompt`` about ``images``."""
        req = one_sequence(build_request(images, prompt, limits=self.limits, stream=False, **sampling))
        asm = Assembler(is_stream=False)
        with contextlib.closing(self._responses(req, asm)) as responses:
            for resp in responses:
                asm.add(resp)
        return asm.result()

    def stream(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str, **sampling: Any
    ) -> Iterator[Delta | Finish]:
        """Yield :class:`Delta` items as the answer is generated, then one :class:`Finish`."""
        req = build_request(images, prompt, limits=self.limits, stream=True, **sampling)
        return self._stream(req)

    def is_ready(self) -> bool:
        """True when the server is up and the model is loaded."""
        try:
            if self.protocol == "http":
                assert self._http is not None
                r = self._http.get(f"/v2/models/{self.model}/ready")
                return r.status_code == 200
            client = self._acquire()
            try:
                ok = client.is_server_ready() and client.is_model_ready(self.model)
            except InferenceServerException:
                client.close()
                raise
            self._release(client)
            return bool(ok)
        except (InferenceServerException, httpx.HTTPError):
            return False

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _stream(self, req: GenerateRequest) -> Iterator[Delta | Finish]:
        sequences = Sequences(req.num_return_sequences)
        with contextlib.closing(self._responses(req, sequences)) as responses:
            for resp in responses:
                yield from sequences.add(resp)
        yield from sequences.unfinished()

    def _responses(self, req: GenerateRequest, asm: Assembler | Sequences) -> Iterator[Response]:
        request_id = req.request_id or uuid.uuid4().hex
        attempt = 0
        while True:
            asm.restart()
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            received = False
            gen = (
                self._grpc(req, request_id, deadline)
                if self.protocol == "grpc"
                else self._generate(req, deadline)
            )
            try:
                with contextlib.closing(gen):
                    for resp in gen:
                        received = True
                        yield resp
                return
            except (InferenceServerException, httpx.HTTPError) as err:
                if received or not is_connection_error(err):
                    if isinstance(err, InferenceServerException):
                        raise server_error(err) from None
                    raise ServerError(f"{type(err).__name__}: {err}") from None
                if attempt >= self.max_retries:
                    raise ServerUnavailableError(
                        f"cannot reach {self.url} over {self.protocol} after {attempt + 1} attempts: {err}"
                    ) from None
                time.sleep(self.retry_backoff * 2**attempt)
                attempt += 1

    def _acquire(self) -> grpcclient.InferenceServerClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return grpcclient.InferenceServerClient(
            self.url, channel_args=grpc_channel_args(self.limits.max_message_bytes)
        )

    def _release(self, client: grpcclient.InferenceServerClient) -> None:
        with self._lock:
            self._idle.append(client)

    def _grpc(self, req: GenerateRequest, request_id: str, deadline: float | None) -> Iterator[Response]:
        client = self._acquire()
        responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        is_done = False
        try:
            client.start_stream(
                callback=lambda result, error: responses.put((result, error)), headers=self.headers
            )
            try:
                client.async_stream_infer(
                    self.model,
                    grpc_inputs(req),
                    outputs=[grpcclient.InferRequestedOutput(n) for n in output_names(req)],
                    request_id=request_id,
                )
            except InferenceServerException as exc:
                # A stream that broke at once (e.g. connection refused) reports why through the callback.
                try:
                    _, reported = responses.get(timeout=1.0)
                except queue.Empty:
                    reported = None
                raise (reported or exc) from None
            finished = 0  # sequences ended (num_return_sequences)
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                try:
                    if remaining is not None and remaining <= 0:
                        raise queue.Empty
                    result, error = responses.get(timeout=remaining)
                except queue.Empty:
                    raise RequestTimeoutError(
                        f"no complete answer from {self.url} within {self.timeout} s (timeout); request cancelled"
                    ) from None
                if error is not None:
                    raise error
                resp = response_from_grpc(result.get_response())
                yield resp
                finished += bool(resp.finish_reason)
                if finished == req.num_return_sequences:
                    is_done = True
                    return
        finally:
            # Cancels the request on the server unless it finished (timeout, error, early close).
            client.stop_stream(cancel_requests=not is_done)
            if is_done:
                self._release(client)
            else:
                client.close()

    def _generate(self, req: GenerateRequest, deadline: float | None) -> Iterator[Response]:
        assert self._http is not None
        path = f"/v2/models/{self.model}/{'generate_stream' if req.stream else 'generate'}"
        timeout = httpx.Timeout(self.timeout)
        try:
            with self._http.stream("POST", path, json=generate_json(req), timeout=timeout) as r:
                if r.status_code != 200:
                    r.read()
                    raise ServerError(http_error_message(r), status=r.status_code)
                if not req.stream:
                    r.read()
                    yield checked_json_response(json.loads(r.text), r.status_code)
                    return
                finished = 0  # sequences ended (num_return_sequences)
                for line in event_lines(r.iter_text()):
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
            raise RequestTimeoutError(
                f"no complete answer from {self.url} within {self.timeout} s (timeout); request cancelled"
            ) from None


def http_error_message(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", r.text))
    except ValueError:
        return r.text or f"HTTP {r.status_code}"


def checked_json_response(obj: dict[str, Any], status: int) -> Response:
    if "error" in obj:
        raise ServerError(str(obj["error"]), status=status if status != 200 else None)
    return response_from_json(obj)
