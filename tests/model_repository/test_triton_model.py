"""model_repository/common/triton_model.py: one meaning of a parameter in every model, python_path on
sys.path, and glmv-build placing the module beside every Python model's model.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from build_engine.render import MODEL_NAMES, TEMPLATE_DIR, placeholders, render_repository

COMMON = TEMPLATE_DIR / "common" / "triton_model.py"
PYTHON_MODELS = [name for name in MODEL_NAMES if (TEMPLATE_DIR / name / "1" / "model.py").is_file()]


def _load_module():
    """The module as the stubs load it: from its file (it is in no package here)."""
    spec = importlib.util.spec_from_file_location("triton_model", COMMON)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


triton_model = _load_module()


def config(**parameters: str) -> dict:
    """A model config as Triton hands it to initialize (args["model_config"], parsed)."""
    return {"name": "m", "parameters": {key: {"string_value": value} for key, value in parameters.items()}}


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, "fallback"),  # missing
        ({"key": ""}, "fallback"),  # empty
        ({"key": "${key}"}, "fallback"),  # a placeholder glmv-build did not fill
        ({"key": "value"}, "value"),
        ({"key": "0"}, "0"),
    ],
)
def test_missing_empty_or_unrendered_means_the_default(parameters: dict, expected: str) -> None:
    assert triton_model.ModelParameters(config(**parameters)).get("key", "fallback") == expected


def test_a_config_without_parameters_gives_every_default() -> None:
    parameters = triton_model.ModelParameters.from_model_config(json.dumps({"name": "m"}))
    assert parameters.get("engine_dir") == ""
    assert parameters.get_int("max_requests_in_flight", 512) == 512
    assert parameters.get_float("cancellation_check_period_ms", 10.0) == 10.0


def test_numbers_parse_and_empty_means_the_default() -> None:
    parameters = triton_model.ModelParameters(config(n="12", x="0.25", empty="", unrendered="${n}"))
    assert parameters.get_int("n", 1) == 12
    assert parameters.get_float("x", 1.0) == 0.25
    assert parameters.get_int("empty", 7) == 7
    assert parameters.get_float("unrendered", 2.5) == 2.5


def test_switches_parse_and_a_bad_one_names_the_parameter() -> None:
    parameters = triton_model.ModelParameters(config(on="true", off="False", one="1", empty="", odd="maybe"))
    assert [parameters.get_bool(k, d) for k, d in [("on", False), ("off", True), ("one", False)]] == [
        True,
        False,
        True,
    ]
    assert parameters.get_bool("empty", True) is True and parameters.get_bool("missing", False) is False
    with pytest.raises(ValueError, match=r"^odd: parameter 'maybe' is not true or false$"):
        parameters.get_bool("odd", True)


def test_a_bad_number_names_the_parameter() -> None:
    parameters = triton_model.ModelParameters(config(default_max_tokens="many", period="soon"))
    with pytest.raises(ValueError, match=r"^default_max_tokens: parameter 'many' is not an integer$"):
        parameters.get_int("default_max_tokens", 256)
    with pytest.raises(ValueError, match=r"^period: parameter 'soon' is not a number$"):
        parameters.get_float("period", 10.0)


def test_setup_model_puts_python_path_first_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", ["/somewhere"])
    args = {"model_config": json.dumps(config(python_path=str(tmp_path), engine_dir="/e"))}
    parameters = triton_model.setup_model(args)
    assert parameters.get("engine_dir") == "/e"
    triton_model.setup_model(args)
    assert sys.path == [str(tmp_path), "/somewhere"]


@pytest.mark.parametrize("python_path", ["", "${python_path}", "/no/such/directory"])
def test_setup_model_leaves_sys_path_without_a_python_path_directory(
    python_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", ["/somewhere"])
    triton_model.setup_model({"model_config": json.dumps(config(python_path=python_path))})
    assert sys.path == ["/somewhere"]


def test_a_cpu_instance_has_no_gpu_device() -> None:
    assert (
        triton_model.gpu_instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"})
        is None
    )


def test_every_python_model_starts_with_setup_model() -> None:
    assert sorted(PYTHON_MODELS) == [
        "ensemble_sync",
        "llm",
        "postprocessing",
        "preprocessing",
        "vision_encoder",
    ]
    for name in PYTHON_MODELS:
        text = (TEMPLATE_DIR / name / "1" / "model.py").read_text()
        assert "from .triton_model import" in text and "setup_model(args)" in text, name
        assert "def _param" not in text, name


def test_the_rendered_repository_has_the_module_beside_every_model_py(tmp_path: Path) -> None:
    names = set()
    for name in MODEL_NAMES:
        names |= placeholders((TEMPLATE_DIR / name / "config.pbtxt").read_text())
    out = render_repository(TEMPLATE_DIR, tmp_path / "repo", {name: "1" for name in names})
    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_NAMES)  # no `common` model
    for name in PYTHON_MODELS:
        assert (out / name / "1" / "triton_model.py").read_bytes() == COMMON.read_bytes(), name
    assert list((out / "ensemble" / "1").iterdir()) == []


def test_setup_model_sends_the_engine_logs_to_stderr_once(capsys) -> None:
    import logging

    logger = logging.getLogger("glm-engine")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers[:] = []  # an earlier setup_model's handler writes to an earlier test's stderr
    try:
        for _ in range(2):
            triton_model.setup_model({"model_config": {"parameters": {}}})
        logging.getLogger("glm-engine").info("[glm-engine] KV cache: 7 blocks")
        logging.getLogger("glm-engine").debug("[glm-engine] not shown")
        assert capsys.readouterr().err == "[glm-engine] KV cache: 7 blocks\n"  # once: one handler
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_input_tensors_look_each_input_up_and_convert_it_once() -> None:
    """`InputTensors` lists the request's tensors once and calls as_numpy once per input read; a missing
    input is None; ``request`` is the request."""
    import numpy as np

    class Tensor:
        def __init__(self, name: str, value) -> None:
            self._name, self.value, self.conversions = name, value, 0

        def name(self) -> str:
            return self._name

        def as_numpy(self):
            self.conversions += 1
            return np.asarray(self.value)

    class Request:
        def __init__(self, tensors) -> None:
            self.tensors, self.listings = tensors, 0

        def inputs(self):
            self.listings += 1
            return list(self.tensors)

    tensors = [Tensor("input_ids", [1, 2, 3]), Tensor("temperature", [0.5]), Tensor("unread", [7])]
    request = Request(tensors)
    inputs = triton_model.InputTensors(request)
    for _ in range(3):
        assert inputs.array("input_ids").tolist() == [1, 2, 3]
        assert inputs.array("temperature").tolist() == [0.5]
        assert inputs.array("seed") is None
    assert "input_ids" in inputs and "seed" not in inputs and inputs.request is request
    assert request.listings == 1 and [t.conversions for t in tensors] == [1, 1, 0]


def test_stub_heap_freezes_and_counts_full_collections(monkeypatch) -> None:
    """`StubHeap`: the heap frozen when it is made (the freeze's own collection not counted), each full
    collection after it counted and timed by `publish`, nothing sent when there was none. Triton's metrics
    API is stood in by a recorder here (the real export is checked through Triton in test_ensemble)."""
    import gc
    import types

    calls: list[tuple] = []

    class Metric:
        def __init__(self, name: str, labels: dict) -> None:
            self.name, self.labels = name, labels

        def increment(self, value: float) -> None:
            calls.append((self.name, "increment", value))

        def set(self, value: float) -> None:
            calls.append((self.name, "set", value))

    class MetricFamily:
        COUNTER, GAUGE = "counter", "gauge"

        def __init__(self, name: str, description: str, kind: str) -> None:
            self.name = name

        def Metric(self, labels: dict) -> Metric:  # noqa: N802 (Triton's name)
            return Metric(self.name, labels)

    monkeypatch.setitem(
        sys.modules, "triton_python_backend_utils", types.SimpleNamespace(MetricFamily=MetricFamily)
    )
    args = {"model_name": "postprocessing", "model_version": "1", "model_instance_name": "postprocessing_0_0"}
    try:
        heap = triton_model.StubHeap(args)
        assert heap.num_frozen > 1000 and abs(heap.num_frozen - gc.get_freeze_count()) < 100
        assert calls == [("glmv_model_gc_frozen_objects", "set", heap.num_frozen)]
        assert heap.collections.labels == {
            "model": "postprocessing",
            "version": "1",
            "model_instance": "postprocessing_0_0",
        }
        heap.publish()
        assert len(calls) == 1  # no full collection since the freeze: nothing sent
        gc.collect()
        gc.collect()
        heap.publish()
        (count, seconds) = calls[1:]
        assert count == ("glmv_model_gc_collections_total", "increment", 2)
        assert seconds[:2] == ("glmv_model_gc_seconds_total", "increment") and seconds[2] > 0
        heap.publish()
        assert len(calls) == 3
        heap.release()
        assert heap.families == [] and heap.collections is None
    finally:
        gc.unfreeze()
