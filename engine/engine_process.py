"""The engine in a process of its own: ``EngineProcess`` takes the calls the llm model makes of an
``LLMEngine`` and runs the engine in a child process, so the engine loop never waits for a GIL that the
caller's threads hold (in Triton: the model's ``execute``, the response sender, the cancellation poller).

Contract (the same as ``LLMEngine``'s for these calls):
  * ``EngineProcess(engine_dir, overrides, warmup)`` starts the child (``python -m engine.engine_process``)
    and returns once the engine is loaded (and, with ``warmup`` on CUDA, warmed up and its graphs
    captured); a child that fails to start raises RuntimeError with its error.
  * ``add_request(req)`` checks the request here, with the engine's own checks (``InputProcessor``: the
    same ValueError naming the field; a guided request's guide is parsed here and compiled by the child
    only), sends it and returns without waiting for the child. What only the child can find wrong (an image
    reference whose file has gone, a guide that parses but does not compile) ends the request with an error
    output. ``abort``, ``stats``, ``is_running`` and
    ``has_unfinished`` may be called from any thread.
  * ``start(callback)``: ``callback(outputs)`` is called on this process's receiver thread for each
    engine step with outputs. ``stop(timeout)`` ends the loop (unfinished requests end with "abort") and
    the child.
  * When the child dies, every request it had ends with an "abort" output carrying an error, and
    ``is_running()`` turns false; the caller refuses new requests. A new child is started at once (waiting
    1, 2, 4 ... 60 s between starts that fail); ``is_running()`` turns true again once it is ready.
    ``stats()`` counts on from the dead child's counters; ``num_engine_restarts`` counts the new children.
  * ``model_config``, ``engine_config``, ``tokenizer``, ``device`` and ``max_model_len`` are read from the
    engine directory here (the tokenizer is loaded in both processes).

The wire is one socket pair. A message is pickled (protocol 5) with its large arrays out of band: each is
written from its own buffer and read straight into its destination, on CUDA pinned memory, so an image's
pixels cross in one copy each way and reach the GPU without another. Tensors cross as arrays of bytes with
their dtype and shape (bfloat16 included); CUDA tensors do not cross.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import EngineDir
from engine.core.scheduler import check_prompt_length
from engine.core.stats import EngineStats
from engine.processing.input_processor import InputProcessor
from engine.processing.resize_cache import shared_resize_dir_name
from engine.request import GenerationRequest, RequestOutput

logger = logging.getLogger("glm-engine")

OUT_OF_BAND_BYTES = 64 << 10  # arrays this large cross out of band
SOCKET_BUFFER_BYTES = 8 << 20  # asked of the kernel, which caps it at net.core.wmem_max / rmem_max
REPLY_TIMEOUT_S = 120.0  # how long a call waits for the child's answer
RESTART_DELAY_MAX_S = 60.0  # the longest wait between two failed starts of a new child
_SIZES = struct.Struct("<I")
_TENSOR_FIELDS = ("image_embeds", "image_pixels", "image_grid_thw", "image_source_sizes", "mrope_positions")
# EngineStats's counters since start: a new child's count on from its predecessors'
_COUNTERS = (
    "num_preemptions",
    "num_steps",
    "num_steps_ahead",
    "num_finished",
    "num_prompt_tokens",
    "num_generation_tokens",
    "num_image_cache_hits",
    "num_image_cache_misses",
    "num_image_refs_held",
    "num_image_refs_read",
    "num_image_refs_shared",
    "num_grammars_compiled",
    "num_gc_full_collections",
    "gc_full_seconds",
)
_PREFIX_COUNTERS = (
    "num_queried_tokens",
    "num_hit_tokens",
    "num_reused_blocks",
    "num_new_blocks",
    "num_evicted_blocks",
)


class Wire:
    """One end of the socket pair: ``send`` (any thread, serialized) and ``recv`` (one thread)."""

    def __init__(self, conn: Connection, pin: bool = False) -> None:
        self.conn = conn
        self.pin = pin  # out-of-band buffers read into pinned memory
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < OUT_OF_BAND_BYTES:
                return True  # in band
            buffers.append(buffer)
            return False

        head = pickle.dumps(message, protocol=5, buffer_callback=out_of_band)
        sizes = struct.pack(f"<I{len(buffers)}Q", len(buffers), *(b.raw().nbytes for b in buffers))
        with self._lock:
            self.conn.send_bytes(sizes + head)
            for buffer in buffers:  # the bytes alone, straight from the buffer (their sizes went ahead)
                view = buffer.raw()
                while view.nbytes:
                    view = view[os.write(self.conn.fileno(), view) :]

    def recv(self) -> Any:
        data = self.conn.recv_bytes()
        (count,) = _SIZES.unpack_from(data)
        sizes = struct.unpack_from(f"<{count}Q", data, _SIZES.size)
        buffers = []
        for size in sizes:
            if self.pin:
                buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()
            else:
                buffer = np.empty(size, np.uint8)
            view = memoryview(buffer)
            while view.nbytes:  # straight into the destination, no staging copy
                read = os.readv(self.conn.fileno(), [view])
                if read == 0:
                    raise EOFError
                view = view[read:]
            buffers.append(buffer)
        return pickle.loads(memoryview(data)[_SIZES.size + 8 * count :], buffers=buffers)

    def close(self) -> None:
        self.conn.close()


def _pack_tensor(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], np.ndarray]:
    if tensor.device.type != "cpu":
        raise ValueError(
            f"a {tensor.device.type} tensor cannot go to the engine process; send it on the host"
        )
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), flat.numpy()


def _unpack_tensor(packed: tuple[str, tuple[int, ...], np.ndarray]) -> torch.Tensor:
    dtype, shape, data = packed
    return torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)


def pack_request(req: GenerationRequest) -> GenerationRequest:
    """``req`` with its tensors as (dtype, shape, bytes) for the wire."""
    return dataclasses.replace(
        req,
        **{
            name: _pack_tensor(value)
            for name in _TENSOR_FIELDS
            if isinstance(value := getattr(req, name), torch.Tensor)
        },
    )


def unpack_request(req: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(
        req,
        **{
            name: _unpack_tensor(value)
            for name in _TENSOR_FIELDS
            if isinstance(value := getattr(req, name), tuple)
        },
    )


@dataclasses.dataclass
class _Child:
    """One child process and its end of the wire."""

    process: subprocess.Popen
    wire: Wire


def _warm_up_guide_parser() -> None:
    """Parse one guide, so that xgrammar is imported before a guided request needs it (``check_guide``)."""
    from engine.sample.structured import Guide, check_guide

    try:
        check_guide(Guide("json"))
    except Exception as exc:  # no xgrammar here: guided requests say so when they come
        logger.info("[glm-engine] no guide parser at start (%s: %s)", type(exc).__name__, exc)


class EngineProcess:
    def __init__(
        self,
        engine_dir: str | Path,
        overrides: dict[str, Any] | None = None,
        warmup: bool = True,
        start_timeout_s: float = 1800.0,
        restart: bool = True,
    ) -> None:
        """Start the child on ``engine_dir`` (``overrides``: EngineConfig fields) and wait until it is
        ready (``warmup``: on CUDA, warm up and capture its graphs first). ``restart``: start a new child
        when this one dies."""
        self._overrides = dict(overrides or {})
        d = EngineDir.open(engine_dir)
        self.model_config = d.model_config()
        self.engine_config = d.engine_config(**self._overrides)
        self.tokenizer = d.tokenizer()
        self.image_ref_dir_name = shared_resize_dir_name(d.path)
        self.device = torch.device(self.engine_config.device)
        self._engine_dir = d.path
        self._warmup = warmup
        self._start_timeout_s = start_timeout_s
        self._restart = restart
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()
        self._live: set[str] = set()  # requests added and not finished
        self._callback: Callable[[list[RequestOutput]], None] | None = None
        self._is_stopping = threading.Event()
        self._is_dead = False
        self._last_stats = EngineStats()
        self._past_totals = EngineStats()  # the counters of the children before this one
        self.num_restarts = 0
        self._restarter: threading.Thread | None = None
        # xgrammar's import (~1 s) while the child starts, not in the first guided request's check
        self.guide_parser_warmup = threading.Thread(
            target=_warm_up_guide_parser, name="glm-guide-parser-init", daemon=True
        )
        self.guide_parser_warmup.start()
        self._child, ready = self._spawn()
        self.max_model_len = int(ready["max_model_len"])
        self.device = torch.device(ready["device"])
        limits = ready["prompt_limits"]
        # the engine's request checks, run here (on the host: nothing pinned, no CUDA in this process)
        self._checks = InputProcessor(
            self.model_config,
            self.max_model_len,
            lambda num_tokens: check_prompt_length(num_tokens, *limits),
            torch.device("cpu"),
            self.tokenizer,
            compile_grammars=False,  # a guide is parsed here and compiled by the child
        )
        self._receiver = self._receive(self._child)

    @property
    def _process(self) -> subprocess.Popen:
        """The child process now (a new one after a restart)."""
        return self._child.process

    def _spawn(self) -> tuple[_Child, dict[str, Any]]:
        """A new child, ready: (the child, its "ready" message)."""
        parent_sock, child_sock = socket.socketpair()
        # buffers a screenshot's pixels fit in: a send does not wait for the reader
        for sock in (parent_sock, child_sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        # the child imports what this process imports: this package, then this process's own path (a Python
        # stub ignores PYTHONPATH and finds its packages otherwise)
        package_root = str(Path(__file__).resolve().parents[1])
        paths = dict.fromkeys([package_root, *(p for p in sys.path if p and os.path.isdir(p))])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        command = [
            python_executable(),
            "-m",
            "engine.engine_process",
            str(child_sock.fileno()),
            str(self._engine_dir),
            json.dumps(self._overrides),
            "1" if self._warmup else "0",
            # the child's threads hand the GIL over as this process's do, and it runs as many torch threads
            repr(sys.getswitchinterval()),
            str(torch.get_num_threads()),
        ]
        try:
            process = subprocess.Popen(command, pass_fds=(child_sock.fileno(),), env=env)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        child = _Child(process, Wire(Connection(parent_sock.detach())))
        try:
            return child, self._wait_ready(child)
        except BaseException:
            if process.poll() is None:
                process.kill()
            process.wait()
            child.wire.close()
            raise

    def _wait_ready(self, child: _Child) -> dict[str, Any]:
        deadline = time.monotonic() + self._start_timeout_s
        while not child.wire.conn.poll(1.0):
            if child.process.poll() is not None:
                raise RuntimeError(
                    f"engine process: exited with code {child.process.returncode} while starting"
                )
            if self._is_stopping.is_set():
                raise RuntimeError("engine process: stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine process: not ready within {self._start_timeout_s:.0f} s")
        try:
            kind, payload = child.wire.recv()
        except (EOFError, OSError):
            child.process.wait(30)
            raise RuntimeError(
                f"engine process: exited with code {child.process.returncode} while starting"
            ) from None
        if kind != "ready":
            child.process.wait(30)
            raise RuntimeError(f"engine process: could not start:\n{payload}")
        return payload

    def _receive(self, child: _Child) -> threading.Thread:
        receiver = threading.Thread(
            target=self._receive_loop, args=(child,), name="glm-engine-receiver", daemon=True
        )
        receiver.start()
        return receiver

    # -- calls (any thread) ---------------------------------------------------------------------------

    def _call(self, *message: Any, timeout_s: float = REPLY_TIMEOUT_S) -> Any:
        future: Future = Future()
        with self._lock:
            if self._is_dead:
                raise RuntimeError("engine process: not running")
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            wire = self._child.wire
        try:
            wire.send((message[0], call_id, *message[1:]))
            return future.result(timeout_s)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def add_request(self, req: GenerationRequest) -> str:
        self._check(req)
        packed = pack_request(req)
        with self._lock:
            if self._is_dead:
                raise RuntimeError("engine process: not running")
            if req.request_id in self._live:
                raise ValueError(f"request_id: {req.request_id!r} is already in use by an unfinished request")
            self._live.add(req.request_id)
            wire = self._child.wire
        try:
            wire.send(("add", packed))
        except BaseException:
            with self._lock:
                if req.request_id not in self._live:
                    return req.request_id  # the child died meanwhile: its error output has ended the request
                self._live.discard(req.request_id)
            raise
        return req.request_id

    def _check(self, req: GenerationRequest) -> None:
        """The engine's checks of ``req`` (ValueError naming the field); images sent as references stand
        here as embeddings of no memory (their rows are the grid's; the child reads or finds them)."""
        if req.image_refs:  # the paths' shape here; the files are the child's to read
            rows = self._checks.check_image_refs(req, self.image_ref_dir_name)
            stand_in = torch.empty((rows, self.model_config.hidden_size), device="meta")
            req = dataclasses.replace(req, image_refs=None, image_embeds=stand_in)
        self._checks.process(req)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._is_dead or request_id not in self._live:
                return
            wire = self._child.wire
        try:
            wire.send(("abort", request_id))
        except OSError:
            pass  # the receiver ends it with the others

    def stats(self) -> EngineStats:
        """The child's ``LLMEngine.stats()``, its counters counting those of the children before it (the
        last one seen, not running, while there is no child)."""
        try:
            stats = self._call("stats", timeout_s=10.0)
            self._last_stats = stats
            is_running = self.is_running()
        except Exception:
            stats, is_running = self._last_stats, False
        stats = self._totals(stats)
        return stats if is_running else dataclasses.replace(stats, is_loop_running=False)

    def _totals(self, stats: EngineStats) -> EngineStats:
        """``stats`` with the counters of the children before this one added."""
        past = self._past_totals
        return dataclasses.replace(
            stats,
            **{name: getattr(stats, name) + getattr(past, name) for name in _COUNTERS},
            prefix_cache=dataclasses.replace(
                stats.prefix_cache,
                **{
                    name: getattr(stats.prefix_cache, name) + getattr(past.prefix_cache, name)
                    for name in _PREFIX_COUNTERS
                },
            ),
            num_engine_restarts=self.num_restarts,
        )

    def is_running(self) -> bool:
        """Whether a child is there and its loop started (and not stopping)."""
        with self._lock:
            return self._callback is not None and not self._is_dead and not self._is_stopping.is_set()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    def warmup(self) -> None:
        """Done by the child before it reports ready (``warmup``)."""

    # -- loop -----------------------------------------------------------------------------------------

    def start(self, callback: Callable[[list[RequestOutput]], None] | None = None) -> None:
        with self._lock:
            if self._callback is not None:
                raise RuntimeError("start: the loop is already running")
            self._callback = callback or (lambda outputs: None)
            wire = self._child.wire
        wire.send(("start",))

    def stop(self, timeout: float | None = None) -> None:
        """Stop the child's loop (unfinished requests end with "abort", their outputs delivered) and the
        child; kill it if it has not exited within ``timeout``. A child being started is killed."""
        with self._lock:
            if self._is_stopping.is_set():
                return
            self._is_stopping.set()
            child, receiver, restarter = self._child, self._receiver, self._restarter
        if restarter is not None:
            restarter.join(timeout)
            with self._lock:
                child, receiver = self._child, self._receiver
        try:
            child.wire.send(("stop",))
        except OSError:
            pass
        receiver.join(timeout)
        try:
            child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        receiver.join(1.0)

    def _receive_loop(self, child: _Child) -> None:
        while True:
            try:
                message = child.wire.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "outputs":
                outputs = message[1]
                with self._lock:
                    for output in outputs:
                        if output.is_finished:
                            self._live.discard(output.request_id)
                    callback = self._callback
                if callback is not None:
                    try:
                        callback(outputs)
                    except Exception:
                        logger.exception("[glm-engine] output callback failed")
            elif kind == "reply":
                with self._lock:
                    future = self._calls.get(message[1])
                if future is not None:
                    future.set_result(message[2])
        self._end(child)

    def _end(self, child: _Child) -> None:
        """The child is gone: its requests end with an error, pending calls fail; a new child is started
        (``restart``) unless this one was stopped."""
        code = child.process.wait()
        with self._lock:
            self._is_dead = True
            live, self._live = sorted(self._live), set()
            calls = list(self._calls.values())
            callback = self._callback
            expected = self._is_stopping.is_set()
            restart = self._restart and not expected
            self._past_totals = self._totals(self._last_stats)
            self._last_stats = EngineStats()
        if not expected:
            logger.error("[glm-engine] the engine process exited (code %s)", code)
        for future in calls:
            future.set_exception(RuntimeError(f"engine process: exited (code {code})"))
        if live and callback is not None:
            error = f"the engine process exited (code {code}) before this request ended"
            callback([_error_output(request_id, error) for request_id in live])
        child.wire.close()
        if restart:
            with self._lock:
                if not self._is_stopping.is_set():
                    self._restarter = threading.Thread(
                        target=self._restart_loop, name="glm-engine-restart", daemon=True
                    )
                    self._restarter.start()

    def _restart_loop(self) -> None:
        """Start children until one is ready (waiting 1, 2, 4 ... 60 s between failures) or ``stop``."""
        delay_s = 1.0
        while not self._is_stopping.is_set():
            logger.warning("[glm-engine] starting a new engine process")
            try:
                child, _ = self._spawn()
            except Exception as exc:
                if self._is_stopping.is_set():
                    return
                logger.error("[glm-engine] %s; trying again in %.0f s", exc, delay_s)
                self._is_stopping.wait(delay_s)
                delay_s = min(2 * delay_s, RESTART_DELAY_MAX_S)
                continue
            with self._lock:
                if not self._is_stopping.is_set():
                    self._child = child
                    self._is_dead = False
                    self.num_restarts += 1
                    callback = self._callback
                    self._receiver = self._receive(child)
                    if callback is not None:
                        child.wire.send(("start",))
                    logger.warning(
                        "[glm-engine] a new engine process is serving (restart %d)", self.num_restarts
                    )
                    return
            child.wire.send(("stop",))  # stopped while it started
            child.process.wait()
            child.wire.close()
            return


def _error_output(request_id: str, error: str) -> RequestOutput:
    """The final output of a request that the engine ended with ``error``."""
    now = time.monotonic()
    return RequestOutput(request_id, [], "abort", 0, 0, now, None, None, error=error)


def python_executable() -> str:
    """A Python interpreter of this environment (Triton's Python stub is not one: its
    ``sys.executable`` may name the stub or nothing)."""
    for candidate in (sys.executable, str(Path(sys.prefix) / "bin" / "python3")):
        if candidate and Path(candidate).name.startswith("python") and Path(candidate).is_file():
            return candidate
    raise RuntimeError(f"engine process: no Python interpreter found (sys.executable {sys.executable!r})")


# -- the child -------------------------------------------------------------------------------------------


def _child_main(
    fd: int, engine_dir: str, overrides: dict[str, Any], warmup: bool, switch_s: float, num_threads: int
) -> int:
    from engine.llm_engine import LLMEngine

    sys.setswitchinterval(switch_s)
    torch.set_num_threads(num_threads)
    # ended by its parent only ("stop", or the socket's end when the parent is gone), never half-way by a
    # signal meant for the server's process group: requests then end with "abort", not a dead child
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(fd)
    wire = Wire(conn)
    try:
        engine = LLMEngine.from_engine_dir(engine_dir, **overrides)
        if engine.device.type == "cuda":
            wire.pin = True
            if warmup:
                engine.warmup()
    except BaseException:
        wire.send(("failed", traceback.format_exc()))
        return 1
    ready = {
        "max_model_len": engine.max_model_len,
        "device": str(engine.device),
        "prompt_limits": engine.scheduler.prompt_limits(),
    }
    wire.send(("ready", ready))

    outbox: queue.Queue = queue.Queue()

    def send_outputs() -> None:  # the loop only queues: a slow reader never holds a step
        while (outputs := outbox.get()) is not None:
            try:
                wire.send(("outputs", outputs))
            except OSError:
                return

    sender = threading.Thread(target=send_outputs, name="glm-engine-outbox", daemon=True)
    sender.start()
    while True:
        try:
            message = wire.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        kind = message[0]
        if kind == "add":
            req = unpack_request(message[1])
            try:
                engine.add_request(req)
            except Exception as exc:  # checked by the parent already: what only this process could find
                error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                outbox.put([_error_output(req.request_id, error)])
        elif kind == "abort":
            engine.abort(message[1])
        elif kind == "stats":
            wire.send(("reply", message[1], engine.stats()))
        elif kind == "start":
            engine.start(outbox.put)
        elif kind == "stop":
            break
    engine.stop(timeout=30)  # unfinished requests end with "abort", queued before the sentinel
    outbox.put(None)
    sender.join(30)
    conn.close()
    return 0


if __name__ == "__main__":
    fd, engine_dir, overrides, warmup, switch_s, num_threads = sys.argv[1:]
    sys.exit(
        _child_main(
            int(fd), engine_dir, json.loads(overrides), warmup == "1", float(switch_s), int(num_threads)
        )
    )
