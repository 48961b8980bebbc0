"""Triton `preprocessing`: one request → engine inputs (engine.processing.preprocess does the work).

Bad inputs are answered with an INVALID_ARG error whose message starts with the field name; the model
keeps serving. Exports `glmv_preprocess_latency_seconds` (histogram) and error counts.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from .triton_model import (
    LEAN_KEY_SUFFIX,
    InputTensors,
    StubHeap,
    setup_model,
)  # common/, copied by glmv-build

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
STAGE_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
PREPROCESS_STAGES = ("images", "template", "tokens", "positions")  # engine.processing.preprocess.STAGES


def _scalar(inputs: InputTensors, name: str):
    array = inputs.array(name)
    if array is None:
        return None
    array = array.reshape(-1)
    if array.size != 1:
        raise ValueError(f"{name}: expected one value, got {array.size}")
    return array[0].item()


def _strings(inputs: InputTensors, name: str) -> list[bytes]:
    array = inputs.array(name)
    if array is None:
        return []
    return [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)]


def _text(inputs: InputTensors, name: str) -> str:
    values = _strings(inputs, name)
    return values[0].decode("utf-8", errors="replace") if values else ""


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = setup_model(args)
        from engine.config import EngineDir
        from engine.processing.input_bounds import TEXT_INPUTS, InputBounds
        from engine.processing.limits import InputError, PreprocessLimits, validate_sampling
        from engine.processing.preprocess import Preprocessor

        self.InputError = InputError
        self.validate_sampling = validate_sampling
        engine_dir = EngineDir.open(parameters.get("engine_dir"))
        self.limits = PreprocessLimits.from_engine_dir(engine_dir)
        self.bounded_inputs = (*TEXT_INPUTS, "image_input")
        self.bounds = InputBounds.from_limits(self.limits)
        # Resized images by file digest, shared by this host's instances (any of them may get a follow-up).
        shared_dir = parameters.get(
            "shared_resize_cache_dir", "/dev/shm" if os.path.isdir("/dev/shm") else ""
        )
        self.preprocessor = Preprocessor(
            engine_dir,
            self.limits,
            shared_resize_cache_dir=shared_dir or tempfile.gettempdir(),
            shared_resize_cache_bytes=parameters.get_int("shared_resize_cache_mb", 512) << 20,
            resize_on_device=parameters.get_bool("resize_on_device", False),
        )
        # An image already in the shared directory (a follow-up's) goes to the llm as its file's path there,
        # not as 2.8 MB of pixels through Triton (the llm reads the file only if it does not hold the
        # image's embeddings).
        self.pixels_by_reference = parameters.get_bool("pixels_by_reference", True)
        # the first request of each instance would pay the stages' one-time setup; Triton hands follow-ups
        # to any instance, so every instance does it now
        self.preprocessor.warm_up()
        from engine.processing import images

        pb_utils.Logger.log_info(
            f"preprocessing: PNG decoder {'libspng' if images.pyspng is not None else 'PIL (pyspng not importable)'}"
        )
        self.default_max_tokens = parameters.get_int("default_max_tokens", 256)
        self.lean_stream = parameters.get_bool("lean_stream", False)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        # The families must outlive their metrics: keep references on self.
        self.latency_family = pb_utils.MetricFamily(
            name="glmv_preprocess_latency_seconds",
            description="Time to preprocess one request (decode, resize, template, tokenize)",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self.latency = self.latency_family.Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.cpu_family = pb_utils.MetricFamily(
            name="glmv_preprocess_cpu_seconds",
            description="CPU time of the thread that preprocessed one request (a request's other images run "
            "on other threads): well below glmv_preprocess_latency_seconds, the thread waited for the GIL "
            "or for a core; close to it, the host's core is that slow",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self.cpu = self.cpu_family.Metric(labels={**labels, "stage": "request"}, buckets=STAGE_BUCKETS)
        self.errors_family = pb_utils.MetricFamily(
            name="glmv_preprocess_errors_total",
            description="Requests refused by preprocessing",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.errors = self.errors_family.Metric(labels=labels)
        self.stage_family = pb_utils.MetricFamily(
            name="glmv_preprocess_stage_seconds",
            description="Time of one request's preprocessing by stage: its inputs read and checked, its "
            "images, chat template, tokens and positions, and its output tensors",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self.stages = {
            stage: self.stage_family.Metric(labels={**labels, "stage": stage}, buckets=STAGE_BUCKETS)
            for stage in ("inputs", *PREPROCESS_STAGES, "outputs")
        }
        # last: the tokenizer, the image processor and the warmed-up stages are frozen with the rest
        self.heap = StubHeap(args)

    def finalize(self) -> None:
        # Released while the stub still serves them: a MetricFamily left for the stub's own teardown
        # segfaults it on every shutdown (triton-inference-server/server#8662).
        del self.latency, self.cpu, self.errors, self.stages
        del self.latency_family, self.cpu_family, self.errors_family, self.stage_family
        self.heap.release()

    def execute(self, requests):
        responses = []
        for request in requests:
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=self._process(InputTensors(request)))
                )
            except (self.InputError, ValueError) as exc:
                self.errors.increment(1)
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                    )
                )
            except Exception as exc:  # a bug must answer the request, not kill the stub
                self.errors.increment(1)
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}: {exc}")
                    )
                )
            self.latency.observe(time.perf_counter() - started)
            self.cpu.observe(time.thread_time() - cpu_started)
        self.heap.publish()
        return responses

    def _process(self, inputs: InputTensors) -> list:
        started = time.perf_counter()
        for name in self.bounded_inputs:  # by bytes, before any decoding or tokenizing
            self.bounds.check(name, _strings(inputs, name))
        texts = _strings(inputs, "text_input")
        messages = _strings(inputs, "messages")
        text = texts[0].decode("utf-8", errors="replace") if texts else None
        messages_json = messages[0].decode("utf-8", errors="replace") if messages else None
        max_tokens = _scalar(inputs, "max_tokens")
        max_tokens = (
            min(self.default_max_tokens, self.limits.max_output_tokens)
            if max_tokens is None
            else int(max_tokens)
        )
        sampling = {
            "temperature": _scalar(inputs, "temperature"),
            "top_p": _scalar(inputs, "top_p"),
            "top_k": _scalar(inputs, "top_k"),
            "repetition_penalty": _scalar(inputs, "repetition_penalty"),
            "presence_penalty": _scalar(inputs, "presence_penalty"),
            "frequency_penalty": _scalar(inputs, "frequency_penalty"),
            "min_tokens": _scalar(inputs, "min_tokens"),
            "seed": _scalar(inputs, "seed"),
        }
        self.validate_sampling(max_tokens=max_tokens, limits=self.limits, **sampling)
        stop_words = [w.decode("utf-8", errors="replace") for w in _strings(inputs, "stop_words")]
        if len(stop_words) > self.limits.max_stop_words:
            raise self.InputError(
                f"stop_words: {len(stop_words)} stop strings, over the limit of {self.limits.max_stop_words}"
            )
        enable_thinking = _scalar(inputs, "enable_thinking")
        guide_type = _text(inputs, "guided_decoding_guide_type")
        if guide_type and enable_thinking:
            raise self.InputError(
                "enable_thinking: must be false with guided_decoding_guide_type (the grammar holds the "
                "answer from its first token)"
            )
        if guide_type:
            enable_thinking = False
        called = time.perf_counter()
        out = self.preprocessor(
            text,
            _strings(inputs, "image_input"),
            messages_json=messages_json,
            enable_thinking=None if enable_thinking is None else bool(enable_thinking),
            tools_json=_text(inputs, "tools") or None,
            pixels_by_reference=self.pixels_by_reference,
        )
        guide = _text(inputs, "guided_decoding_guide")
        if guide and not guide_type:
            raise self.InputError(
                "guided_decoding_guide_type: missing (json, json_schema, regex, ebnf_grammar)"
            )
        top_logprobs = _scalar(inputs, "top_logprobs")
        if top_logprobs is not None and not 0 <= top_logprobs <= 20:
            raise self.InputError(f"top_logprobs: {top_logprobs} is out of range (must be in [0, 20])")
        seed = sampling["seed"]
        if seed is None:  # unseeded sampling: a fresh seed per request
            seed = random.getrandbits(63)

        returned = time.perf_counter()
        client_lean = bool(_scalar(inputs, "client_lean_stream"))
        request_key = uuid.uuid4().hex.encode() + (LEAN_KEY_SUFFIX if client_lean else b"")
        tensors = [
            pb_utils.Tensor("input_ids", out.input_ids.astype(np.int32)),
            pb_utils.Tensor("input_lengths", np.array([len(out.input_ids)], np.int32)),
            pb_utils.Tensor("request_output_len", np.array([max_tokens], np.int32)),
            pb_utils.Tensor("image_rgb", np.ascontiguousarray(out.image_rgb, dtype=np.uint8)),
            pb_utils.Tensor("image_grid_thw", out.image_grid_thw.astype(np.int64)),
            pb_utils.Tensor("mrope_positions", np.ascontiguousarray(out.mrope_positions, dtype=np.int64)),
            pb_utils.Tensor("mrope_position_deltas", np.array([out.mrope_delta], np.int64)),
            pb_utils.Tensor("image_hash", np.array([h.encode() for h in out.image_hashes], dtype=np.object_)),
            pb_utils.Tensor("image_ref", np.array([r.encode() for r in out.image_refs], dtype=np.object_)),
            pb_utils.Tensor("seed", np.array([seed], np.uint64)),
            pb_utils.Tensor("is_thinking", np.array([out.is_thinking], np.bool_)),
            # Unique per request: postprocessing uses it to stop the llm when the client cancels
            # (Triton does not pass an ensemble's cancellation to a step that is already running). It ends
            # in LEAN_KEY_SUFFIX when the client takes lean responses itself: postprocessing, which cannot be
            # given an ensemble input beside the llm's outputs, tells by it.
            pb_utils.Tensor("request_key", np.array([request_key], dtype=np.object_)),
            # the llm's responses between a stream's first and last carry only what changes;
            # postprocessing puts back the rest (fewer tensors through the hop that every response takes),
            # or passes them on as they are to a client that asked for lean responses
            pb_utils.Tensor("lean_stream", np.array([self.lean_stream or client_lean])),
            # the llm need not poll is_cancelled() for it (never true inside the ensemble): the request_key's
            # `stop` from postprocessing cancels it
            pb_utils.Tensor("cancel_by_stop", np.array([True])),
        ]
        self.stages["inputs"].observe(called - started)
        for stage, seconds in out.stage_seconds.items():
            self.stages[stage].observe(seconds)
        self.stages["outputs"].observe(time.perf_counter() - returned)
        return tensors
