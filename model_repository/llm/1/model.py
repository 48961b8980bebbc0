"""Triton `llm`: decoupled Python model around `engine.llm_engine.LLMEngine` (TensorRT-LLM tensor names).

This file keeps the lifecycle and the threads; `request.py` turns a Triton request into an engine request
and keeps the per-request state, `response.py` builds and sends the responses, `metrics.py` owns the
metrics, and `triton_model.py` (model_repository/common/, copied here by glmv-build) reads the parameters.

Threads: the engine loop (LLMEngine.start; with the `engine_process` parameter, the default, the engine runs
in a child process, engine.engine_process, whose outputs arrive on a receiver thread) calls `_on_outputs` after each
step, which only queues work;
a sender thread builds the response tensors and calls `response_sender.send` (so a slow client never
blocks the engine); a cancellation thread polls `is_cancelled()` every `cancellation_check_period_ms` for
at most `cancellation_checks_per_period` streams (longest unasked first) and aborts the engine request,
except for requests sent with `cancel_by_stop=true` (the ensemble's: Triton 2.51 never marks a running
step cancelled, so asking would only cost a round trip each; postprocessing sends their `stop`); a
stats thread publishes gauges every `stats_check_period_ms`.

Per request: streaming → one response per engine step that produced tokens (`output_ids` = the new
tokens, `text_output`/`reasoning_output` = the new text), as long as the streams together stay within
`stream_responses_per_s`; with more streams, each gets at most one response per streams / that seconds,
carrying the tokens of the steps in between (the first token and the last response are never held).
Every streamed response is built by the sender thread (on the engine loop's GIL) and passes through the
single postprocessing instance: this keeps the response rate under what both can take at any
concurrency while the token rate keeps growing;
non-streaming → one response at the end
(`output_ids` = prompt + completion unless `exclude_input_in_output`, texts whole). The last response
carries COMPLETE_FINAL and `finish_reason` (stop | length | abort); a request refused by the engine gets a
final error response. With `num_return_sequences` n > 1, the request's n sequences (request.SequenceGroup)
share its sender and go to the engine together (it computes their images and prompt once); each response
carries `sequence_index` and only the last sequence's last response is COMPLETE_FINAL. `stop=true` cancels
every request sent with the same `request_key` (or, without one, the same Triton request id); the
ensemble's postprocessing sends it when the client cancels. When the engine loop is not running, new
requests get an UNAVAILABLE error.

Images come as `image_rgb` (the resized RGB images, flat uint8) + `image_grid_thw`, which the engine
patchifies, normalizes and encodes on its own GPU in its loop thread, as `image_ref` (their files in the
host's shared resize directory, with `image_grid_thw` and `image_hash`: the engine takes the embeddings it
holds or reads the files), or as `prompt_embedding_table` (embeddings made elsewhere, e.g. by the
vision_encoder model); one of them.
"""

from __future__ import annotations

import faulthandler
import logging
import queue
import signal
import sys
import threading
import time

import triton_python_backend_utils as pb_utils

from .metrics import LlmMetrics
from .request import RequestTable, is_stop, num_return_sequences, parse_request, request_key, siblings
from .response import Responses, coalesce, send_error
from .triton_model import (  # common/, copied by glmv-build
    InputTensors,
    StubHeap,
    gpu_instance_device,
    limit_cpu_threads,
    setup_model,
)

logger = logging.getLogger("glmv-llm")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # `kill -USR1 <pid of this stub>` prints every thread's Python stack to the server log: where a
        # stuck engine loop or sender is waiting.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        parameters = setup_model(args)
        from engine.config import EngineDir
        from engine.llm_engine import LLMEngine

        # Several threads share the GIL here (engine loop, sender, cancellation, stats). With the default
        # 5 ms switch interval the engine loop could wait that long for the GIL after every GPU sync; a
        # short interval hands it back within 0.2 ms.
        sys.setswitchinterval(parameters.get_float("gil_switch_interval_ms", 0.2) / 1000.0)
        if not pb_utils.using_decoupled_model_transaction_policy(parameters.config):
            raise pb_utils.TritonModelException("llm: the model must be decoupled (model_transaction_policy)")
        engine_dir = EngineDir.open(parameters.get("engine_dir"))
        overrides = {}
        device_index = gpu_instance_device(args)
        if device_index is not None:
            overrides["device"] = f"cuda:{device_index}"
        if not overrides.get("device", engine_dir.engine_config().device).startswith("cuda"):
            limit_cpu_threads()
        warmup = parameters.get_bool("warmup", True)
        if parameters.get_bool("engine_process", True):
            # the engine in a child process: its loop never waits for this process's GIL
            from engine.engine_process import EngineProcess

            self.engine = EngineProcess(engine_dir.path, overrides, warmup=warmup)
        else:
            self.engine = LLMEngine.from_engine_dir(engine_dir, **overrides)
            if self.engine.device.type == "cuda" and warmup:
                # kernels compiled and every CUDA graph captured before the first request, not during serving
                self.engine.warmup()
        self.cancel_period_s = parameters.get_float("cancellation_check_period_ms", 10.0) / 1000.0
        self.stats_period_s = parameters.get_float("stats_check_period_ms", 100.0) / 1000.0
        self.cancel_checks_per_period = max(1, parameters.get_int("cancellation_checks_per_period", 8))
        self.stream_responses_per_s = max(1.0, parameters.get_float("stream_responses_per_s", 1000.0))
        self.max_num_return_sequences = max(1, parameters.get_int("max_num_return_sequences", 8))

        self.requests = RequestTable()
        self.responses = Responses(self.engine, wall_offset_ns=time.time_ns() - time.monotonic_ns())
        self.metrics = LlmMetrics(args)
        # Held while a response is sent and while is_cancelled() is asked: asking a response sender whose
        # final response went out reads freed server memory (Triton 2.51 crashes in
        # TRITONBACKEND_ResponseFactoryIsCancelled).
        self.sender_lock = threading.Lock()
        self.send_queue: queue.Queue = queue.Queue()
        self.is_shutting_down = threading.Event()

        self.engine.start(self._on_outputs)
        self.threads = [
            threading.Thread(target=self._sender_loop, name="llm-sender", daemon=True),
            threading.Thread(target=self._cancellation_loop, name="llm-cancel", daemon=True),
            threading.Thread(target=self._stats_loop, name="llm-stats", daemon=True),
        ]
        for thread in self.threads:
            thread.start()
        # last: what is made above lives as long as the model, and a full collection of this process would
        # otherwise walk it on the sender's thread (the engine's child freezes its own heap when it starts)
        self.heap = StubHeap(args)

    # -- requests ---------------------------------------------------------------------------------------

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._handle(request, sender)
            except ValueError as exc:
                send_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:
                send_error(sender, f"llm: {type(exc).__name__}: {exc}")
        return None

    def _handle(self, request, sender) -> None:
        started = time.perf_counter()
        inputs = InputTensors(request)
        triton_id = request_key(inputs)
        if is_stop(inputs):
            if not triton_id:
                raise ValueError("stop: a stop request needs the request id (or request_key) to cancel")
            for engine_id in self.requests.engine_ids(triton_id):
                self.engine.abort(engine_id)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if not self.engine.is_running():
            send_error(sender, "llm: the engine loop is not running", pb_utils.TritonError.UNAVAILABLE)
            return
        looked_up = time.perf_counter()
        n = num_return_sequences(inputs, self.max_num_return_sequences)
        generation_request, state = parse_request(
            inputs,
            sender,
            triton_id,
            has_tokenizer=self.engine.tokenizer is not None,
        )
        others = siblings(generation_request, state, n) if n > 1 else []
        parsed = time.perf_counter()
        # sequences 1.. right behind sequence 0: the engine computes what they share once
        for index, (each_request, each) in enumerate([(generation_request, state), *others]):
            self.requests.add(each)
            try:
                self.engine.add_request(each_request)
            except Exception as exc:
                self.requests.forget(each)
                if index == 0:
                    raise  # nothing of the request runs: execute() answers the error
                logger.exception("llm: a sequence of the request could not be added")
                with self.sender_lock:
                    each.is_done = True
                    if not state.group.is_done:
                        self._end_group(state.group)
                        send_error(sender, f"llm: {type(exc).__name__}: {exc}")
                break
        self.metrics.observe_stages(
            {"inputs": looked_up - started, "parse": parsed - looked_up, "add": time.perf_counter() - parsed}
        )

    # -- engine → client --------------------------------------------------------------------------------

    def _on_outputs(self, outputs) -> None:
        """Engine loop thread: hand the outputs to the sender thread, nothing else."""
        self.send_queue.put(outputs)

    def _sender_loop(self) -> None:
        while True:
            outputs = self.send_queue.get()
            if outputs is None:
                return
            # the least time between two responses of a stream
            interval = self.requests.num_streaming() / self.stream_responses_per_s
            now = time.monotonic()
            for output in outputs:
                try:
                    state = self.requests.get(output.request_id)
                    if state is None:
                        continue
                    output = coalesce(state, output, interval, now)
                    if output is None:
                        continue
                    with self.sender_lock:
                        self._send_output(state, output)
                except Exception:
                    logger.exception("llm: sending a response failed")

    def _send_output(self, state, output) -> None:
        self.metrics.observe_latencies(*state.add_output(output))
        if output.is_finished:
            state.is_done = True
            self.requests.forget(state)
            self.metrics.count_finished(output.finish_reason)
        group = state.group
        if group is None:
            self.responses.send(state, output)
            return
        if group.is_done:  # the request ended already (an error): nothing more goes to its sender
            return
        if output.is_finished:
            group.num_open -= 1
        if output.is_finished and output.error and output.finish_reason == "abort" and not state.is_cancelled:
            self._end_group(group)  # one sequence failed: the request ends with its error (sent below)
        elif output.is_finished and group.num_open == 0:
            group.is_done = True
        self.responses.send(state, output, is_final=output.is_finished and group.is_done)

    def _end_group(self, group) -> None:
        """A group's request ends before its sequences do (an error): nothing more goes to its sender, and
        the sequences still running are aborted (ids the engine never got are ignored by it)."""
        group.is_done = True
        for each in group.states:
            if not each.is_done:
                self.engine.abort(each.engine_id)

    # -- cancellation and stats -------------------------------------------------------------------------

    def _cancellation_loop(self) -> None:
        # Each is_cancelled() is a round trip to the server holding the GIL: at most
        # `cancellation_checks_per_period` streams per period, those asked longest ago first (with 32
        # streams each is asked every 40 ms, with 128 every 160 ms).
        while not self.is_shutting_down.wait(self.cancel_period_s):
            states = self.requests.to_poll()
            states = sorted(states, key=lambda s: s.last_cancel_check)[: self.cancel_checks_per_period]
            now = time.monotonic()
            for state in states:
                state.last_cancel_check = now
                try:
                    with self.sender_lock:
                        is_cancelled = not state.is_sender_done and state.sender.is_cancelled()
                        cancelled = state.group.states if state.group is not None else [state]
                        if is_cancelled:
                            for each in cancelled:  # a group's sequences share the sender
                                each.is_cancelled = True
                    if is_cancelled:
                        for each in cancelled:
                            if not each.is_done:
                                self.engine.abort(each.engine_id)
                except Exception:
                    logger.exception("llm: cancellation check failed")

    def _stats_loop(self) -> None:
        while not self.is_shutting_down.wait(self.stats_period_s):
            try:
                self.metrics.update(self.engine.stats(), num_active=self.requests.num_active())
                heap = getattr(self, "heap", None)  # made after this thread starts
                if heap is not None:
                    heap.publish()
            except Exception:
                logger.exception("llm: stats update failed")

    def finalize(self) -> None:
        self.is_shutting_down.set()
        self.engine.stop(timeout=30)  # unfinished requests end with "abort" (sent as final responses)
        self.send_queue.put(None)
        for thread in self.threads:
            thread.join(timeout=10)
        # Released now, while the stub still serves them: the response tensors kept for reuse, and the
        # metrics (LlmMetrics.release says why).
        self.responses.clear()
        self.requests.clear()
        self.metrics.release()
        self.heap.release()
