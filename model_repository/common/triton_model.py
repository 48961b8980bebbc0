"""What every glmv Python model does first, in one place; `glmv-build` copies this file into each Python
model's version folder, beside its model.py, which imports it as `from .triton_model import ...` (the
stub imports model.py as `<version>.model`).

Contract:
* `setup_model(args)` parses `args["model_config"]`, puts the `python_path` parameter (the project root,
  where `engine` lives) first on sys.path when it names a directory, and returns the `ModelParameters`.
  Call it before importing anything from the project.
* A parameter has one meaning in every model: missing, empty or still an unrendered `${placeholder}`
  means "use the default". `get_int` / `get_float` raise ValueError naming the parameter for a value that
  is not a number.
* `gpu_instance_device(args)`: for a KIND_GPU instance the CUDA device index, made the current device
  (CUDA graphs, streams and default allocations follow it); None for a KIND_CPU instance.
* `limit_cpu_threads()`: torch on at most 4 threads; every model stub on the host shares its cores.
* `InputTensors(request)`: a request's input tensors by name, each turned into numpy once. Triton's
  `pb_utils.get_input_tensor_by_name` builds the list of all the request's tensors again on every call and
  walks it; a model that reads ~25 inputs per request paid that ~25 times.
* `setup_model` also sends the project's loggers to stderr at INFO (`log_to_stderr`): Triton's log then
  has the engine's start-up lines (KV cache size, CUDA graphs captured and how long it took).
* `StubHeap(args)`, made at the end of `initialize`: the stub's heap is collected once and frozen
  (`gc.freeze`: a later full collection walks only what was made after it; the llm stub holds ~180k objects
  after its imports, ~70 ms a full collection on a 2-core machine, on whichever thread set it off, its
  response sender's included), and its full collections are counted and timed from then on:
  `glmv_model_gc_collections_total`, `glmv_model_gc_seconds_total` and `glmv_model_gc_frozen_objects` by
  model, version and instance; `publish()` brings the counters up to date (call it from a thread of the
  model, never from a collector callback), `release()` from `finalize`.

This module imports neither Triton nor torch at import time (torch only inside the functions that need it),
so it loads in the lightest model and in tests.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LEAN_KEY_SUFFIX",
    "InputTensors",
    "ModelParameters",
    "gpu_instance_device",
    "limit_cpu_threads",
    "log_to_stderr",
    "setup_model",
]


# ends the request_key preprocessing makes for a client that asked for lean streamed responses (the ensemble
# input `lean_stream`): postprocessing then passes the llm's lean responses on as they came
LEAN_KEY_SUFFIX = b"/lean"


@dataclass(frozen=True)
class ModelParameters:
    """The `parameters` of a model's config.pbtxt (string values)."""

    config: dict[str, Any]
    """The parsed model config (args["model_config"])."""

    @classmethod
    def from_model_config(cls, model_config: str | dict[str, Any]) -> ModelParameters:
        return cls(json.loads(model_config) if isinstance(model_config, str) else model_config)

    def get(self, key: str, default: str = "") -> str:
        """The parameter's string value; `default` when it is missing, empty or an unrendered `${...}`."""
        value = self.config.get("parameters", {}).get(key, {}).get("string_value", "")
        return default if not value or value.startswith("${") else value

    def get_int(self, key: str, default: int) -> int:
        value = self.get(key)
        if not value:
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key}: parameter {value!r} is not an integer") from None

    def get_float(self, key: str, default: float) -> float:
        value = self.get(key)
        if not value:
            return default
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}: parameter {value!r} is not a number") from None

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.get(key).lower()
        if not value:
            return default
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}: parameter {value!r} is not true or false")
        return value in ("true", "1", "yes")


def setup_model(args: dict[str, Any]) -> ModelParameters:
    """The model's parameters, with `python_path` first on sys.path (see the module contract)."""
    parameters = ModelParameters.from_model_config(args["model_config"])
    log_to_stderr()
    python_path = parameters.get("python_path")
    if python_path and os.path.isdir(python_path) and python_path not in sys.path:
        sys.path.insert(0, python_path)
    return parameters


def log_to_stderr() -> None:
    """The project's loggers ("glm-engine", "glmv-llm") at INFO on stderr, which Triton keeps in its log
    (a stub has no logging set up: only warnings would show). Once per process."""
    import logging

    for name in ("glm-engine", "glmv-llm"):
        logger = logging.getLogger(name)
        if not any(getattr(h, "glmv", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.glmv = True
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def gpu_instance_device(args: dict[str, Any]) -> int | None:
    """The CUDA device index of a KIND_GPU instance, made the current device; None for a CPU instance."""
    if args.get("model_instance_kind") != "GPU":
        return None
    import torch

    index = int(args["model_instance_device_id"])
    torch.cuda.set_device(index)
    return index


def limit_cpu_threads() -> None:
    """At most 4 torch threads: every model stub on the host shares its cores."""
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


class InputTensors:
    """The input tensors of one Triton request by name (looked up once), as numpy arrays (each converted
    once); ``request`` is the request itself."""

    def __init__(self, request) -> None:
        self.request = request
        self._tensors = {tensor.name(): tensor for tensor in request.inputs()}
        self._arrays: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def array(self, name: str):
        """The input ``name`` as a numpy array, or None when the request does not have it."""
        if name not in self._arrays:
            tensor = self._tensors.get(name)
            self._arrays[name] = None if tensor is None else tensor.as_numpy()
        return self._arrays[name]


class StubHeap:
    """This stub's heap frozen once its model is set up, and its full garbage collections counted (see the
    module contract)."""

    def __init__(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from engine.core.gc_watch import freeze_heap, gc_watch

        labels = {
            "model": args["model_name"],
            "version": args["model_version"],
            "model_instance": args.get("model_instance_name", args["model_name"]),
        }
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        # The families must outlive their metrics: kept here, dropped last by release().
        self.families = [
            pb_utils.MetricFamily(
                name="glmv_model_gc_collections_total",
                description="Full (generation 2) garbage collections in this model's stub since it froze its heap",
                kind=counter,
            ),
            pb_utils.MetricFamily(
                name="glmv_model_gc_seconds_total",
                description="Seconds this model's stub spent in full garbage collections since it froze its heap",
                kind=counter,
            ),
            pb_utils.MetricFamily(
                name="glmv_model_gc_frozen_objects",
                description="Objects this model's stub froze when it was set up (never walked by its collector)",
                kind=gauge,
            ),
        ]
        self.collections, self.seconds, self.frozen = (f.Metric(labels=labels) for f in self.families)
        self.watch = gc_watch()
        self.num_frozen = freeze_heap()
        self.frozen.set(self.num_frozen)
        self._seen = (self.watch.num_full, self.watch.seconds)  # the freeze's own collection not counted

    def publish(self) -> None:
        """Advance the counters to the collections since the last call (cheap when there were none)."""
        num_full, seconds = self.watch.num_full, self.watch.seconds
        if num_full != self._seen[0]:
            self.collections.increment(num_full - self._seen[0])
            self.seconds.increment(seconds - self._seen[1])
            self._seen = (num_full, seconds)

    def release(self) -> None:
        """Drop the metrics, then the families (from finalize: triton-inference-server/server#8662)."""
        self.collections = self.seconds = self.frozen = None
        self.families.clear()
