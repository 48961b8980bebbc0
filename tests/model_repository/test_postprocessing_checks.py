"""postprocessing's cancellation checks (`CancelChecks`): which streamed responses it asks is_cancelled()
of. The streams share a budget of checks a second, so the checks cost the same at any concurrency; a
stream's first and last response are always asked; streams whose final response never came are forgotten.
(That a cancelled client stops the llm through these checks is tested through the real Triton in
test_ensemble.py.)"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from build_engine.render import TEMPLATE_DIR


@pytest.fixture(scope="module")
def checks_class():
    """postprocessing/1/model.py as its stub loads it: in a package beside common/triton_model.py, with
    Triton's module (only imported here, never called by CancelChecks)."""
    package = types.ModuleType("postprocessing_pkg")
    package.__path__ = [str(TEMPLATE_DIR / "postprocessing" / "1")]
    saved = {name: sys.modules.get(name) for name in ("postprocessing_pkg", "triton_python_backend_utils")}
    sys.modules["postprocessing_pkg"] = package
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    common = importlib.util.spec_from_file_location(
        "postprocessing_pkg.triton_model", TEMPLATE_DIR / "common" / "triton_model.py"
    )
    sys.modules[common.name] = importlib.util.module_from_spec(common)
    common.loader.exec_module(sys.modules[common.name])
    spec = importlib.util.spec_from_file_location(
        "postprocessing_pkg.model", TEMPLATE_DIR / "postprocessing" / "1" / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.CancelChecks
    for name in ("postprocessing_pkg.triton_model", "postprocessing_pkg.model"):
        sys.modules.pop(name, None)
    for name, old in saved.items():
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old


def stream_checks(checks, num_streams: int, interval_s: float, duration_s: float) -> dict[bytes, list[float]]:
    """``num_streams`` streams, each with a response every ``interval_s`` (staggered): when each was asked."""
    asked: dict[bytes, list[float]] = {f"s{i}".encode(): [] for i in range(num_streams)}
    steps = round(duration_s / interval_s)
    for step in range(steps):
        for i, key in enumerate(asked):
            now = step * interval_s + i * interval_s / num_streams
            if checks.should_check(key, False, now):
                asked[key].append(now)
    return asked


def test_one_stream_is_asked_once_per_period(checks_class) -> None:
    checks = checks_class(0.010, 500.0)
    asked = stream_checks(checks, 1, 0.004, 1.0)[b"s0"]
    # every 10 ms at the 4 ms responses after it: 0, 12, 24, ... (the first response always)
    assert asked[:4] == pytest.approx([0.0, 0.012, 0.024, 0.036])
    assert len(asked) == 84
    assert checks.period() == 0.010


@pytest.mark.parametrize("num_streams", [32, 128])
def test_many_streams_share_the_budget(checks_class, num_streams: int) -> None:
    checks = checks_class(0.010, 500.0)
    asked = stream_checks(checks, num_streams, 0.006, 4.0)
    total = sum(len(times) for times in asked.values())
    # each stream's first response, then the budget: no more than 500 a second over the 4 s
    assert num_streams + 0.9 * 500 * 4.0 <= total <= num_streams + 500 * 4.0
    assert checks.period() == pytest.approx(num_streams / 500.0)
    for times in asked.values():  # none is left unasked: every stream within one period + one response
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert max(gaps) <= num_streams / 500.0 + 0.006 + 1e-9


def test_first_and_final_responses_are_always_asked(checks_class) -> None:
    checks = checks_class(0.010, 500.0)
    assert checks.should_check(b"a", False, 0.0)
    assert not checks.should_check(b"a", False, 0.001)
    assert checks.should_check(b"a", True, 0.002)  # its final response
    assert len(checks.last) == 0
    assert checks.should_check(None, False, 0.003)  # a response without a request_key: always


def test_streams_that_ended_unseen_are_forgotten(checks_class) -> None:
    checks = checks_class(0.010, 500.0)
    for i in range(400):  # 400 streams whose final responses never come here
        checks.should_check(f"gone{i}".encode(), False, 0.0)
    assert checks.period() == pytest.approx(0.8)
    assert checks.should_check(b"live", False, 0.5)
    assert not checks.should_check(b"live", False, 1.0)  # the 401 streams' period (0.8 s) is not over
    # the gone ones are dropped once older than 4 periods: then "live" is asked every 10 ms again
    assert checks.should_check(b"live", False, 3.6)
    assert list(checks.last) == [b"live"]
    assert checks.period() == 0.010
    assert not checks.should_check(b"live", False, 3.605)
    assert checks.should_check(b"live", False, 3.611)
    checks.forget(b"live")
    assert len(checks.last) == 0


def test_a_budget_of_zero_is_refused(checks_class) -> None:
    with pytest.raises(ValueError, match="cancellation_checks_per_s must be > 0"):
        checks_class(0.010, 0.0)
