"""Locust users for glmv-serve: Triton gRPC streaming, the OpenAI gateway (SSE), and an abandoning client.

    # Triton gRPC, 32 users, 2 minutes, CSV + HTML reports
    locust -f benchmarks/locustfile.py TritonGrpcUser --host localhost:8001 --headless -u 32 -r 8 -t 2m \\
        --csv runs/triton --html runs/triton.html --image-sizes 1288x728 --max-tokens 128
    # the OpenAI-compatible gateway
    locust -f benchmarks/locustfile.py OpenAIUser --host http://localhost:8080 --headless -u 32 -r 8 -t 2m

Name the user class on the command line: without one Locust runs every class below.

Each request fires these Locust request events (``name`` is the image size, e.g. ``1288x728``):

| request_type | response_time | response_length |
|---|---|---|
| ``ttft`` | send → first output token (ms) | 0 |
| ``itl``  | mean gap between output tokens of this request (ms) | output tokens − 1 |
| ``e2e``  | send → final response (ms); a failed request is an ``e2e`` failure with the server's message | output tokens |
| ``abandon`` (AbandonUser) | send → cancel after ``--abandon-after`` tokens (ms) | tokens received |

Options (command line or environment): ``--image-sizes`` / ``GLMV_IMAGE_SIZES`` (comma list of WxH),
``--max-tokens`` / ``GLMV_MAX_TOKENS``, ``--temperature``, ``--model-name`` (Triton model or OpenAI model),
``--ignore-eos`` (min_tokens = max_tokens, default on), ``--kinds``, ``--langs``, ``--images-per-request``,
``--abandon-after``.
"""

from __future__ import annotations

import itertools
import json
import queue
import time
import uuid

from locust import User, between, events, task

from benchmarks.clients import RequestParams, _data_uri, _scalar, triton_inputs
from benchmarks.corpus import KINDS, LANGS, Corpus, parse_size
from benchmarks.metrics import StreamTimer

_CORPUS: Corpus | None = None
_COUNTER = itertools.count()
_GRPC_GEVENT_READY = False


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("glmv-serve")
    group.add_argument(
        "--image-sizes", env_var="GLMV_IMAGE_SIZES", default="1288x728", help="comma list of WxH"
    )
    group.add_argument("--max-tokens", env_var="GLMV_MAX_TOKENS", type=int, default=128)
    group.add_argument("--temperature", env_var="GLMV_TEMPERATURE", type=float, default=0.0)
    group.add_argument(
        "--model-name", env_var="GLMV_MODEL", default="", help="default: ensemble / first OpenAI model"
    )
    group.add_argument(
        "--ignore-eos", env_var="GLMV_IGNORE_EOS", default="true", help="true: min_tokens = max_tokens"
    )
    group.add_argument("--kinds", env_var="GLMV_KINDS", default=",".join(KINDS))
    group.add_argument("--langs", env_var="GLMV_LANGS", default=",".join(LANGS))
    group.add_argument("--images-per-request", env_var="GLMV_IMAGES_PER_REQUEST", type=int, default=1)
    group.add_argument(
        "--abandon-after", env_var="GLMV_ABANDON_AFTER", type=int, default=2, help="AbandonUser: tokens"
    )
    group.add_argument("--request-timeout", env_var="GLMV_REQUEST_TIMEOUT", type=float, default=600.0)


def _init_grpc_gevent() -> None:
    """grpc's blocking calls must yield to Locust's greenlets; done once, before the first channel."""
    global _GRPC_GEVENT_READY
    if not _GRPC_GEVENT_READY:
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _GRPC_GEVENT_READY = True


def _options(user: User):
    return user.environment.parsed_options


def _corpus(user: User) -> Corpus:
    global _CORPUS
    if _CORPUS is None:
        opts = _options(user)
        _CORPUS = Corpus(
            sizes=[parse_size(s) for s in opts.image_sizes.split(",")],
            kinds=opts.kinds.split(","),
            langs=opts.langs.split(","),
            num_images=opts.images_per_request,
        )
    return _CORPUS


def _params(user: User) -> RequestParams:
    opts = _options(user)
    return RequestParams(
        max_tokens=opts.max_tokens,
        temperature=opts.temperature,
        seed=0,
        ignore_eos=str(opts.ignore_eos).lower() in ("1", "true", "yes", "on"),
        timeout_s=opts.request_timeout,
    )


def _fire(user: User, request_type: str, name: str, seconds: float, length: int = 0, exception=None) -> None:
    user.environment.events.request.fire(
        request_type=request_type,
        name=name,
        response_time=seconds * 1000.0,
        response_length=length,
        exception=exception,
        context={},
    )


def _report(user: User, name: str, timer: StreamTimer) -> None:
    record = timer.record
    if record.error is not None:
        _fire(user, "e2e", name, record.e2e_s or 0.0, exception=RuntimeError(record.error))
        return
    if record.ttft_s is not None:
        _fire(user, "ttft", name, record.ttft_s)
    if record.itl_s:
        _fire(user, "itl", name, sum(record.itl_s) / len(record.itl_s), length=len(record.itl_s))
    _fire(user, "e2e", name, record.e2e_s or 0.0, length=record.num_output_tokens)


class _TritonStreamUser(User):
    """One gRPC bidirectional stream to the Triton ensemble per user; subclasses add the task."""

    abstract = True
    wait_time = between(0, 0)
    host = "localhost:8001"

    def on_start(self) -> None:
        _init_grpc_gevent()
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        url = (self.environment.host or self.host).removeprefix("grpc://").removeprefix("http://")
        self._model = _options(self).model_name or "ensemble"
        self._responses: queue.Queue = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        self._client.start_stream(callback=self._on_response)

    def _on_response(self, result, error) -> None:
        self._responses.put((time.perf_counter(), result, error))

    def on_stop(self) -> None:
        try:
            self._client.stop_stream(cancel_requests=True)
            self._client.close()
        except Exception:
            pass

    def _send(self, stop_after: int | None = None) -> tuple[str, StreamTimer]:
        sample = _corpus(self).sample(next(_COUNTER))
        params = _params(self)
        name = f"{sample.size[0]}x{sample.size[1]}"
        request_id = uuid.uuid4().hex[:16]
        timer = StreamTimer()
        self._client.async_stream_infer(
            self._model, triton_inputs(sample, params, self._grpc), request_id=request_id
        )
        deadline = time.perf_counter() + params.timeout_s
        while True:
            try:
                received, result, error = self._responses.get(
                    timeout=max(0.01, deadline - time.perf_counter())
                )
            except queue.Empty:
                timer.fail(f"timeout: no final response within {params.timeout_s:.0f} s")
                return name, timer
            if error is not None:
                timer.fail(str(error))
                return name, timer
            if result.get_response().id != request_id:
                continue  # a late response of an earlier (abandoned) request
            count = _scalar(result, "num_output_tokens")
            if count is not None:
                timer.tokens(int(count), at=received)
            else:
                timer.tokens(new=1, at=received)
            finish_reason = _scalar(result, "finish_reason")
            if finish_reason:
                timer.finish(finish_reason, at=received)
                return name, timer
            if stop_after is not None and timer.record.num_output_tokens >= stop_after:
                return name, timer


class TritonGrpcUser(_TritonStreamUser):
    """Streams requests to the Triton ensemble and waits for each whole answer."""

    @task
    def chat(self) -> None:
        name, timer = self._send()
        _report(self, name, timer)


class AbandonUser(_TritonStreamUser):
    """Cancels its stream after ``--abandon-after`` tokens (a client that goes away mid-answer)."""

    @task
    def chat(self) -> None:
        name, timer = self._send(stop_after=_options(self).abandon_after)
        record = timer.record
        if record.error is not None or record.finish_reason:
            _report(self, name, timer)
            return
        # Cancel every request on this stream, then open a fresh one for the next task.
        self._client.stop_stream(cancel_requests=True)
        _fire(self, "abandon", name, time.perf_counter() - record.start_s, length=record.num_output_tokens)
        self._responses = queue.Queue()
        self._client.start_stream(callback=self._on_response)


class OpenAIUser(User):
    """Streams chat completions through the OpenAI-compatible gateway (SSE)."""

    wait_time = between(0, 0)
    host = "http://localhost:8080"

    def on_start(self) -> None:
        import requests

        self._session = requests.Session()
        self._url = (self.environment.host or self.host).rstrip("/")
        self._model = _options(self).model_name or self._first_model()

    def _first_model(self) -> str:
        try:
            return self._session.get(f"{self._url}/v1/models", timeout=10).json()["data"][0]["id"]
        except Exception:
            return "glm-4.6v-flash"

    @task
    def chat(self) -> None:
        sample = _corpus(self).sample(next(_COUNTER))
        params = _params(self)
        name = f"{sample.size[0]}x{sample.size[1]}"
        content = [{"type": "image_url", "image_url": {"url": _data_uri(img)}} for img in sample.images]
        content.append({"type": "text", "text": sample.question})
        body = {
            "model": self._model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.ignore_eos:
            body["min_tokens"] = params.max_tokens
        body["seed"] = next(_COUNTER)  # never answered by the gateway's exact-match cache
        timer = StreamTimer()
        try:
            with self._session.post(
                f"{self._url}/v1/chat/completions", json=body, stream=True, timeout=params.timeout_s
            ) as resp:
                if resp.status_code != 200:
                    timer.fail(f"HTTP {resp.status_code}: {resp.text[:500]}")
                else:
                    self._read_sse(resp, timer)
        except Exception as exc:
            timer.fail(f"{type(exc).__name__}: {exc}")
        _report(self, name, timer)

    @staticmethod
    def _read_sse(resp, timer: StreamTimer) -> None:
        finish_reason, completion_tokens = None, None
        for raw in resp.iter_lines():
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                err = chunk["error"]
                timer.fail(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                return
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                    timer.tokens(new=1)
                finish_reason = choice.get("finish_reason") or finish_reason
            if chunk.get("usage"):
                completion_tokens = chunk["usage"].get("completion_tokens")
        if finish_reason is None:
            timer.fail("stream ended without a finish_reason")
        else:
            timer.finish(finish_reason, completion_tokens)
