"""build_engine.gpus: --gpus parsing and explicit instance groups."""

from __future__ import annotations

import pytest

from build_engine.gpus import instance_groups, parse_gpus


def test_parse_gpus() -> None:
    assert parse_gpus(None) == []
    assert parse_gpus("") == []
    assert parse_gpus("0,1", num_visible=2) == [0, 1]
    assert parse_gpus(" 1 ", num_visible=0) == [1]  # not checked when nothing is visible (build machine)
    assert parse_gpus("all", num_visible=4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("spec", "visible", "message"),
    [
        ("all", 0, "--gpus: 'all' but no CUDA device is visible"),
        ("0,x", 2, "--gpus: 'x' is not a GPU index"),
        ("0,0", 2, "--gpus: GPU 0 is listed twice"),
        ("3", 2, "--gpus: GPU 3 does not exist (2 visible)"),
        ("-1", 2, "--gpus: '-1' is not a GPU index"),
    ],
)
def test_parse_gpus_errors(spec: str, visible: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_gpus(spec, num_visible=visible)
    assert str(info.value).startswith(message)


def test_instance_groups() -> None:
    assert instance_groups([]) == "{ count: 1 kind: KIND_CPU }"
    assert instance_groups([0, 1]) == (
        "{ count: 1 kind: KIND_GPU gpus: [ 0 ] },\n  { count: 1 kind: KIND_GPU gpus: [ 1 ] }"
    )
