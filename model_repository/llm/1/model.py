"""Triton `llm`: decoupled Python model around `engine.llm_engine.LLMEngine` (TensorRT-LLM tensor names).

Threads: the engine loop (LLMEngine.start) calls `_on_outputs` after each step, which only queues work;
a sender thread builds the response tensors and calls `response_sender.send` (so a slow client never
blocks the engine); a cancellation thread polls `is_cancelled()` every `cancellation_check_period_ms` for
at most `cancellation_checks_per_period` streams (longest unasked first) and aborts the engine request; a
stats thread publishes gauges every `stats_check_period_ms`.

Per request: streaming → one response per engine step that produced tokens (`output_ids` = the new
tokens, `text_output`/`reasoning_output` = the new text) while at most `stream_responses_per_step`
requests stream; with more, each stream gets a response every k = ceil(streams / that) steps carrying the
k steps' tokens (the first token and the last response are never held). Every streamed response passes
through the single postprocessing instance, whose cost per response caps the server's response rate:
this keeps the response rate under that cap at any concurrency while the token rate keeps growing;
non-streaming → one response at the end
(`output_ids` = prompt + completion unless `exclude_input_in_output`, texts whole). The last response
carries COMPLETE_FINAL and `finish_reason` (stop | length | abort); a request refused by the engine gets a
final error response. `stop=true` cancels every request sent with the same `request_key` (or, without
one, the same Triton request id); the ensemble's postprocessing sends it when the client cancels. When the
engine loop is not running, new requests get an UNAVAILABLE error.

Images come as `image_rgb` (the resized RGB images, flat uint8) + `image_grid_thw`, which the engine
patchifies, normalizes and encodes on its own GPU in its loop thread, or as `prompt_embedding_table`
(embeddings made elsewhere, e.g. by the vision_encoder model); one or the other.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

logger = logging.getLogger("glmv-llm")

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def _param(config: dict, key: str, default: str = "") -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    return default if (not value or value.startswith("${")) else value


def _tensor(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _image_hashes(request, image_grid_thw) -> list[bytes] | None:
    """The `image_hash` input (one per image, from preprocessing), or None (the engine hashes the
    pixels itself)."""
    hashes = _tensor(request, "image_hash")
    if hashes is None or image_grid_thw is None or hashes.size == 0:
        return None
    return [h if isinstance(h, bytes) else str(h).encode() for h in hashes.reshape(-1)]


def _scalar(request, name: str, default=None):
    array = _tensor(request, name)
    if array is None or array.size == 0:
        return default
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text(request, name: str) -> str:
    value = _scalar(request, name, b"")
    return (value if isinstance(value, bytes) else str(value).encode()).decode("utf-8", errors="replace")


def _guide(request, guide_class):
    """engine.sample.structured.Guide from `guided_decoding_guide_type` / `guided_decoding_guide`, or None."""
    guide_type = _text(request, "guided_decoding_guide_type")
    return guide_class(guide_type, _text(request, "guided_decoding_guide")) if guide_type else None


def _logprobs(request) -> int | None:
    """SamplingParams.logprobs: None unless `return_log_probs`; then `top_logprobs` (default 0)."""
    if not _scalar(request, "return_log_probs", False):
        return None
    return int(_scalar(request, "top_logprobs", 0))


@dataclass
class RequestState:
    engine_id: str
    triton_id: str
    sender: object
    is_streaming: bool
    exclude_input: bool
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    last_token_time: float | None = None
    is_cancelled: bool = False
    has_first_token: bool = False
    is_done: bool = False  # the final response is sent: the sender must not be touched again
    held: list = field(default_factory=list)  # streamed outputs not sent yet (merged into the next response)
    # Output tensors that stay the same for every response of the request, made once: building a
    # pb_utils.Tensor is most of a response's cost, and one already in shared memory is not copied again.
    fixed_tensors: list = field(default_factory=list)
    first_token_tensor: object = None
    last_cancel_check: float = 0.0  # time.monotonic() of the last is_cancelled() asked for it
    logprobs: list = field(default_factory=list)  # (logprob, top) of each output token (non-streaming)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # `kill -USR1 <pid of this stub>` prints every thread's Python stack to the server log: where a
        # stuck engine loop or sender is waiting.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        config = json.loads(args["model_config"])
        python_path = _param(config, "python_path")
        if python_path and os.path.isdir(python_path) and python_path not in sys.path:
            sys.path.insert(0, python_path)
        import torch

        from engine.llm_engine import GenerationRequest, LLMEngine
        from engine.sample.sampler import SamplingParams

        self.GenerationRequest = GenerationRequest
        self.SamplingParams = SamplingParams
        from engine.sample.structured import Guide

        self.Guide = Guide
        self.token_texts = None  # engine.sample.logprobs.TokenTexts, made on the first request with logprobs
        self.empty_log_probs = None  # the shared empty `output_log_probs` tensor
        # Several threads share the GIL here (engine loop, sender, cancellation, stats). With the default
        # 5 ms switch interval the engine loop could wait that long for the GIL after every GPU sync; a
        # short interval hands it back within 0.2 ms.
        sys.setswitchinterval(float(_param(config, "gil_switch_interval_ms", "0.2")) / 1000.0)
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("llm: the model must be decoupled (model_transaction_policy)")
        overrides = {}
        if args.get("model_instance_kind") == "GPU":
            overrides["device"] = f"cuda:{args['model_instance_device_id']}"
            import torch

            # CUDA graphs, streams and default allocations follow the current device: make it this instance's.
            torch.cuda.set_device(int(args["model_instance_device_id"]))
        engine_dir = _param(config, "engine_dir")
        engine_raw = json.loads(open(os.path.join(engine_dir, "engine_config.json")).read())
        if not str(overrides.get("device", engine_raw.get("engine", {}).get("device", "cpu"))).startswith(
            "cuda"
        ):
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        self.engine = LLMEngine.from_engine_dir(engine_dir, **overrides)
        if self.engine.device.type == "cuda" and _param(config, "warmup", "true").lower() != "false":
            # kernels compiled and every CUDA graph captured before the first request, not during serving
            self.engine.warmup()
        self.cancel_period_s = float(_param(config, "cancellation_check_period_ms", "10")) / 1000.0
        self.stats_period_s = float(_param(config, "stats_check_period_ms", "100")) / 1000.0
        self.cancel_checks_per_period = max(1, int(_param(config, "cancellation_checks_per_period", "8")))
        self.stream_responses_per_step = max(1, int(_param(config, "stream_responses_per_step", "16")))
        # LLMEngine times are time.monotonic(); responses carry wall-clock ns.
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()

        self.lock = threading.Lock()
        # Held while a response is sent and while is_cancelled() is asked: asking a response sender whose
        # final response went out reads freed server memory (Triton 2.51 crashes in
        # TRITONBACKEND_ResponseFactoryIsCancelled).
        self.sender_lock = threading.Lock()
        self.states: dict[str, RequestState] = {}
        self.shared_tensors: dict[tuple[str, object], object] = {}  # _shared_tensor's, by (name, value)
        self.triton_ids: dict[str, set[str]] = {}
        self.send_queue: queue.Queue = queue.Queue()
        self.is_shutting_down = threading.Event()
        self._init_metrics(args)

        self.engine.start(self._on_outputs)
        self.threads = [
            threading.Thread(target=self._sender_loop, name="llm-sender", daemon=True),
            threading.Thread(target=self._cancellation_loop, name="llm-cancel", daemon=True),
            threading.Thread(target=self._stats_loop, name="llm-stats", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    # -- metrics ----------------------------------------------------------------------------------------

    def _init_metrics(self, args: dict) -> None:
        # One series per instance: with one llm per GPU, the instances would otherwise overwrite each
        # other's gauges (Prometheus' own `instance` label names the pod, not the GPU).
        labels = {
            "model": args["model_name"],
            "version": args["model_version"],
            "model_instance": args.get("model_instance_name", args["model_name"]),
        }
        # The families must outlive their metrics: keep references on self.
        self.families = []
        requests = pb_utils.MetricFamily(
            name="nv_trt_llm_request_metrics",
            description="Requests in the engine by state (waiting | scheduled | active)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        blocks = pb_utils.MetricFamily(
            name="nv_trt_llm_kv_cache_block_metrics",
            description="Paged KV cache blocks (used | free | max)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.families += [requests, blocks]
        self.m_waiting = requests.Metric(labels={**labels, "request_type": "waiting"})
        self.m_running = requests.Metric(labels={**labels, "request_type": "scheduled"})
        self.m_active = requests.Metric(labels={**labels, "request_type": "active"})
        self.m_blocks_used = blocks.Metric(labels={**labels, "kv_cache_block_type": "used"})
        self.m_blocks_free = blocks.Metric(labels={**labels, "kv_cache_block_type": "free"})
        self.m_blocks_max = blocks.Metric(labels={**labels, "kv_cache_block_type": "max"})
        self.m_blocks_cached = blocks.Metric(labels={**labels, "kv_cache_block_type": "cached"})
        # prefix and image caches: counters advanced from the engine's totals (see _stats_loop)
        self.cache_counters = {}
        for name, description in (
            ("glmv_prefix_cache_queried_tokens_total", "Tokens looked up in the prefix cache"),
            ("glmv_prefix_cache_hit_tokens_total", "Tokens found in the prefix cache (not computed again)"),
            ("glmv_kv_cache_reused_blocks_total", "KV blocks mapped from the prefix cache"),
            ("glmv_kv_cache_evicted_blocks_total", "Cached KV blocks evicted for new content"),
            ("glmv_image_cache_hits_total", "Images whose ViT embeddings came from the image cache"),
            ("glmv_image_cache_misses_total", "Images looked up in the image cache and not found"),
        ):
            family = pb_utils.MetricFamily(
                name=name, description=description, kind=pb_utils.MetricFamily.COUNTER
            )
            self.families.append(family)
            self.cache_counters[name] = [family.Metric(labels=labels), 0]
        ttft = pb_utils.MetricFamily(
            name="glmv_time_to_first_token_seconds",
            description="Arrival at the engine to the first generated token",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        itl = pb_utils.MetricFamily(
            name="glmv_inter_token_latency_seconds",
            description="Time between generated tokens of one request",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        preemptions = pb_utils.MetricFamily(
            name="glmv_preemptions_total",
            description="Sequences preempted (by recompute) for lack of KV blocks",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.families += [ttft, itl, preemptions]
        self.m_ttft = ttft.Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.m_itl = itl.Metric(labels=labels, buckets=ITL_BUCKETS)
        self.m_preemptions = preemptions.Metric(labels=labels)
        self.m_finished = pb_utils.MetricFamily(
            name="glmv_requests_finished_total",
            description="Requests finished, by finish_reason",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.families.append(self.m_finished)
        self.m_finished_by_reason = {
            reason: self.m_finished.Metric(labels={**labels, "finish_reason": reason})
            for reason in ("stop", "length", "abort")
        }
        self.num_preemptions_seen = 0

    def _stats_loop(self) -> None:
        while not self.is_shutting_down.wait(self.stats_period_s):
            try:
                stats = self.engine.stats()
                self.m_waiting.set(stats.num_waiting)
                self.m_running.set(stats.num_running)
                with self.lock:
                    self.m_active.set(len(self.states))
                self.m_blocks_used.set(stats.num_blocks_used)
                self.m_blocks_free.set(stats.num_blocks_total - stats.num_blocks_used)
                self.m_blocks_max.set(stats.num_blocks_total)
                self.m_blocks_cached.set(stats.prefix_cache.num_cached_blocks)
                prefix = stats.prefix_cache
                for name, total in (
                    ("glmv_prefix_cache_queried_tokens_total", prefix.num_queried_tokens),
                    ("glmv_prefix_cache_hit_tokens_total", prefix.num_hit_tokens),
                    ("glmv_kv_cache_reused_blocks_total", prefix.num_reused_blocks),
                    ("glmv_kv_cache_evicted_blocks_total", prefix.num_evicted_blocks),
                    ("glmv_image_cache_hits_total", stats.num_image_cache_hits),
                    ("glmv_image_cache_misses_total", stats.num_image_cache_misses),
                ):
                    counter = self.cache_counters[name]
                    if total > counter[1]:
                        counter[0].increment(total - counter[1])
                        counter[1] = total
                if stats.num_preemptions > self.num_preemptions_seen:
                    self.m_preemptions.increment(stats.num_preemptions - self.num_preemptions_seen)
                    self.num_preemptions_seen = stats.num_preemptions
            except Exception:
                logger.exception("llm: stats update failed")

    # -- requests ---------------------------------------------------------------------------------------

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._handle(request, sender)
            except ValueError as exc:
                self._send_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:
                self._send_error(sender, f"llm: {type(exc).__name__}: {exc}")
        return None

    def _handle(self, request, sender) -> None:
        key = _scalar(request, "request_key")
        if isinstance(key, bytes):
            key = key.decode("utf-8", errors="replace")
        # Requests are found for `stop` by their request_key (set by preprocessing), else the Triton id.
        triton_id = key or request.request_id() or ""
        if _scalar(request, "stop", False):
            if not triton_id:
                raise ValueError("stop: a stop request needs the request id (or request_key) to cancel")
            with self.lock:
                engine_ids = list(self.triton_ids.get(triton_id, ()))
            for engine_id in engine_ids:
                self.engine.abort(engine_id)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if not self.engine.stats().is_loop_running:
            self._send_error(sender, "llm: the engine loop is not running", pb_utils.TritonError.UNAVAILABLE)
            return
        import torch

        input_ids = _tensor(request, "input_ids")
        if input_ids is None:
            raise ValueError("input_ids: missing")
        prompt = input_ids.reshape(-1).astype(np.int64)
        input_length = _scalar(request, "input_lengths")
        if input_length is not None:
            if not 0 < input_length <= prompt.size:
                raise ValueError(
                    f"input_lengths: {input_length} must be in [1, {prompt.size}] (len(input_ids))"
                )
            prompt = prompt[: int(input_length)]
        max_tokens = int(_scalar(request, "request_output_len", 16))
        stop_token_ids = ()
        end_id = _scalar(request, "end_id")
        if end_id is not None:
            stop_token_ids = (int(end_id),)
        seed = _scalar(request, "seed")
        sampling = self.SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_scalar(request, "temperature", 1.0)),
            top_k=int(_scalar(request, "runtime_top_k", 0)),
            top_p=float(_scalar(request, "runtime_top_p", 1.0)) or 1.0,  # TensorRT-LLM: top_p <= 0 is unset
            seed=None if seed is None else int(seed),
            repetition_penalty=float(_scalar(request, "repetition_penalty", 1.0)),
            presence_penalty=float(_scalar(request, "presence_penalty", 0.0)),
            frequency_penalty=float(_scalar(request, "frequency_penalty", 0.0)),
            min_tokens=int(_scalar(request, "min_tokens", 0)),
            stop_token_ids=stop_token_ids,
            logprobs=_logprobs(request),
        )
        rgb = _tensor(request, "image_rgb")
        grid = _tensor(request, "image_grid_thw")
        image_rgb = image_grid_thw = None
        if rgb is not None or grid is not None:
            if rgb is None or grid is None:
                missing = "image_rgb" if rgb is None else "image_grid_thw"
                raise ValueError(f"{missing}: image_rgb and image_grid_thw go together")
            if rgb.size > 0:
                image_rgb = torch.from_numpy(np.ascontiguousarray(rgb.reshape(-1)))
                image_grid_thw = torch.from_numpy(np.ascontiguousarray(grid.reshape(-1, 3), dtype=np.int64))
        table = _tensor(request, "prompt_embedding_table")
        if image_rgb is not None and table is not None and table.size:
            raise ValueError("image_rgb: give image_rgb + image_grid_thw or prompt_embedding_table, not both")
        image_embeds = None
        if table is not None:
            table = table.reshape(-1, table.shape[-1])
            if table.shape[0] > 0:
                image_embeds = torch.from_numpy(np.ascontiguousarray(table))
        positions = _tensor(request, "mrope_positions")
        mrope_positions = None
        if positions is not None and positions.size:
            mrope_positions = torch.from_numpy(np.ascontiguousarray(positions.reshape(3, -1), dtype=np.int64))
        stop_words = _tensor(request, "stop_words")
        stop_strings = tuple(
            (w if isinstance(w, bytes) else str(w).encode()).decode("utf-8", errors="replace")
            for w in ([] if stop_words is None else stop_words.reshape(-1))
        )
        stop_strings = tuple(s for s in stop_strings if s)
        streaming = bool(_scalar(request, "streaming", False))
        engine_id = uuid.uuid4().hex
        gen = self.GenerationRequest(
            request_id=engine_id,
            prompt_token_ids=prompt.tolist(),
            sampling=sampling,
            image_embeds=image_embeds,
            image_patches=image_rgb,  # the engine patchifies flat RGB on its device
            image_grid_thw=image_grid_thw,
            mrope_positions=mrope_positions,
            mrope_delta=int(_scalar(request, "mrope_position_deltas", 0)),
            image_hashes=_image_hashes(request, image_grid_thw),
            stop_strings=stop_strings if self.engine.tokenizer is not None else (),
            is_thinking=bool(_scalar(request, "is_thinking", False)),
            guide=_guide(request, self.Guide),
        )
        state = RequestState(
            engine_id=engine_id,
            triton_id=triton_id,
            sender=sender,
            is_streaming=streaming,
            exclude_input=bool(_scalar(request, "exclude_input_in_output", False)),
            prompt_ids=prompt.tolist(),
        )
        with self.lock:
            self.states[engine_id] = state
            if triton_id:
                self.triton_ids.setdefault(triton_id, set()).add(engine_id)
        try:
            self.engine.add_request(gen)
        except Exception:
            self._forget(state)
            raise

    def _forget(self, state: RequestState) -> None:
        with self.lock:
            self.states.pop(state.engine_id, None)
            ids = self.triton_ids.get(state.triton_id)
            if ids is not None:
                ids.discard(state.engine_id)
                if not ids:
                    del self.triton_ids[state.triton_id]

    @staticmethod
    def _send_error(sender, message: str, code=None) -> None:
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        try:
            sender.send(
                pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
        except Exception:
            logger.exception("llm: could not send an error response")

    # -- engine → client --------------------------------------------------------------------------------

    def _on_outputs(self, outputs) -> None:
        """Engine loop thread: hand the outputs to the sender thread, nothing else."""
        self.send_queue.put(outputs)

    def _sender_loop(self) -> None:
        while True:
            outputs = self.send_queue.get()
            if outputs is None:
                return
            with self.lock:
                num_streams = sum(1 for s in self.states.values() if s.is_streaming)
            every = max(1, -(-num_streams // self.stream_responses_per_step))  # steps per response
            for output in outputs:
                try:
                    output = self._coalesce(output, every)
                    if output is None:
                        continue
                    with self.sender_lock:
                        self._send_output(output)
                except Exception:
                    logger.exception("llm: sending a response failed")

    def _coalesce(self, output, every: int):
        """The output to send now (several steps' outputs merged), or None to hold this one back."""
        with self.lock:
            state = self.states.get(output.request_id)
        if state is None or not state.is_streaming:
            return output
        if not state.held and (every == 1 or output.is_finished or not state.has_first_token):
            return output
        state.held.append(output)
        if len(state.held) < every and not output.is_finished:
            return None
        held, state.held = state.held, []
        return dataclasses.replace(
            held[-1],
            new_token_ids=[t for o in held for t in o.new_token_ids],
            text="".join(o.text for o in held),
            reasoning="".join(o.reasoning for o in held),
            first_token_time=held[0].first_token_time,
            logprobs=None if held[-1].logprobs is None else [lp for o in held for lp in o.logprobs or ()],
        )

    def _send_output(self, output) -> None:
        with self.lock:
            state = self.states.get(output.request_id)
        if state is None:
            return
        now_tokens = output.new_token_ids
        if now_tokens:
            if not state.has_first_token and output.first_token_time is not None:
                state.has_first_token = True
                self.m_ttft.observe(max(0.0, output.first_token_time - output.arrival_time))
            elif state.last_token_time is not None and output.last_token_time is not None:
                gap = output.last_token_time - state.last_token_time
                self.m_itl.observe(max(0.0, gap) / len(now_tokens))
            state.last_token_time = output.last_token_time
        state.output_ids.extend(now_tokens)
        if output.logprobs is not None and not state.is_streaming:
            state.logprobs.extend(output.logprobs)
        state.text.append(output.text)
        state.reasoning.append(output.reasoning)
        is_final = output.is_finished
        if is_final:
            state.is_done = True
            self._forget(state)
            if output.finish_reason in self.m_finished_by_reason:
                self.m_finished_by_reason[output.finish_reason].increment(1)
        if output.error and is_final and output.finish_reason == "abort" and not state.is_cancelled:
            self._send_error(state.sender, f"llm: {output.error}")
            return
        if state.is_cancelled and is_final:
            try:
                state.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:
                pass
            return
        if not state.is_streaming and not is_final:
            return
        if state.is_streaming:
            ids, text, reasoning = now_tokens, output.text, output.reasoning
            new_ids, logprobs = now_tokens, output.logprobs
        else:
            ids = state.output_ids if state.exclude_input else state.prompt_ids + state.output_ids
            text, reasoning = "".join(state.text), "".join(state.reasoning)
            new_ids, logprobs = state.output_ids, state.logprobs if output.logprobs is not None else None
        if not state.fixed_tensors:
            state.fixed_tensors = [
                pb_utils.Tensor("num_input_tokens", np.array([output.num_prompt_tokens], np.int32)),
                pb_utils.Tensor("num_cached_tokens", np.array([output.num_cached_tokens], np.int32)),
                pb_utils.Tensor(
                    "kv_cache_reused_blocks",
                    np.array([output.num_cached_tokens // self.engine.block_manager.block_size], np.int32),
                ),
                pb_utils.Tensor("arrival_time_ns", np.array([self._wall_ns(output.arrival_time)], np.int64)),
                pb_utils.Tensor("request_key", np.array([state.triton_id.encode()], dtype=np.object_)),
            ]
        first = state.first_token_tensor
        if first is None:
            first = pb_utils.Tensor(
                "first_token_time_ns", np.array([self._wall_ns(output.first_token_time)], np.int64)
            )
            if output.first_token_time is not None:  # fixed from now on
                state.first_token_tensor = first
        tensors = [
            pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32)),
            self._shared_tensor("sequence_length", len(ids), np.int32),
            self._text_tensor("text_output", text),
            self._text_tensor("reasoning_output", reasoning),
            self._shared_tensor("finish_reason", (output.finish_reason or "").encode(), np.object_),
            self._shared_tensor("num_output_tokens", output.num_output_tokens, np.int32),
            first,
            pb_utils.Tensor(
                "last_token_time_ns", np.array([self._wall_ns(output.last_token_time)], np.int64)
            ),
            *state.fixed_tensors,
            *self._logprob_tensors(new_ids, logprobs),
        ]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if is_final else 0
        state.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

    def _logprob_tensors(self, token_ids: list[int], logprobs: list | None) -> list:
        """`output_log_probs` FP32 [n] (one per token of output_ids' new tokens) and `logprobs`, the
        tokens' OpenAI `logprobs.content` items as JSON (eos and stop ids left out); empty when not asked."""
        if logprobs is None:
            if self.empty_log_probs is None:
                self.empty_log_probs = pb_utils.Tensor("output_log_probs", np.zeros(0, np.float32))
            return [self.empty_log_probs, self._shared_tensor("logprobs", b"", np.object_)]
        if self.token_texts is None:
            from engine.sample.logprobs import TokenTexts

            self.token_texts = TokenTexts(self.engine.tokenizer)
        from engine.sample.logprobs import content_items

        skip = frozenset(self.engine.model_config.eos_token_ids)
        items = content_items(token_ids, logprobs, self.token_texts, skip)
        return [
            pb_utils.Tensor("output_log_probs", np.array([lp for lp, _ in logprobs], np.float32)),
            pb_utils.Tensor("logprobs", np.array([json.dumps(items).encode()], dtype=np.object_)),
        ]

    def _text_tensor(self, name: str, text: str):
        """A [1] BYTES tensor of ``text``; the empty one is shared (`_shared_tensor`)."""
        if text:
            return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))
        return self._shared_tensor(name, b"", np.object_)

    def _shared_tensor(self, name: str, value, dtype):
        """A [1] tensor made once per (name, value) and shared by every response that carries it."""
        key = (name, value)
        tensor = self.shared_tensors.get(key)
        if tensor is None:
            if len(self.shared_tensors) >= 65536:
                self.shared_tensors.clear()
            tensor = self.shared_tensors[key] = pb_utils.Tensor(name, np.array([value], dtype=dtype))
        return tensor

    def _wall_ns(self, monotonic_s: float | None) -> int:
        return 0 if monotonic_s is None else int(monotonic_s * 1e9) + self.wall_offset_ns

    # -- cancellation -----------------------------------------------------------------------------------

    def _cancellation_loop(self) -> None:
        # Each is_cancelled() is a round trip to the server holding the GIL: at most
        # `cancellation_checks_per_period` streams per period, those asked longest ago first (with 32
        # streams each is asked every 40 ms, with 128 every 160 ms).
        while not self.is_shutting_down.wait(self.cancel_period_s):
            with self.lock:
                states = [s for s in self.states.values() if not s.is_cancelled]
            states = sorted(states, key=lambda s: s.last_cancel_check)[: self.cancel_checks_per_period]
            now = time.monotonic()
            for state in states:
                state.last_cancel_check = now
                try:
                    with self.sender_lock:
                        is_cancelled = not state.is_done and state.sender.is_cancelled()
                    if is_cancelled:
                        state.is_cancelled = True
                        self.engine.abort(state.engine_id)
                except Exception:
                    logger.exception("llm: cancellation check failed")

    def finalize(self) -> None:
        self.is_shutting_down.set()
        self.engine.stop(timeout=30)  # unfinished requests end with "abort" (sent as final responses)
        self.send_queue.put(None)
        for thread in self.threads:
            thread.join(timeout=10)
        # Metrics are released here, while the stub still serves them: a MetricFamily left for the stub's
        # own teardown clears its metrics through the stub being destroyed and the stub segfaults on
        # every shutdown (triton-inference-server/server#8662).
        self.m_finished_by_reason.clear()
        self.cache_counters.clear()
        # Likewise the response tensors kept for reuse: freed now, not after the stub's shared memory is gone.
        self.shared_tensors.clear()
        self.states.clear()
        for name in [n for n in vars(self) if n.startswith("m_")]:
            delattr(self, name)
        self.families.clear()
