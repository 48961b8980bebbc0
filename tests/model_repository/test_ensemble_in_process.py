"""Every test of test_ensemble again on a server whose llm runs its engine in the Triton model's own process
(glmv-build --no-engine-process): the answers are the same as with the engine in a child process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_repository.conftest import ENGINE_FLAGS
from tests.model_repository.test_ensemble import *  # noqa: F403 (the same tests, on this module's server)

# the one test of a child process, which this server does not have
del test_zz_a_dead_engine_process_ends_its_requests_and_a_new_one_takes_over  # noqa: F821

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from build_engine.cli import main

    out = tmp_path_factory.mktemp("tiny_engine_in_process") / "engine"
    assert (
        main(
            ["--checkpoint", str(tiny_checkpoint), "--output", str(out), *ENGINE_FLAGS, "--no-engine-process"]
        )
        == 0
    )
    return out


def test_the_engine_runs_in_the_triton_models_process(server, tiny_engine: Path) -> None:
    assert engine_children(tiny_engine) == []  # noqa: F405
    assert grpc_generate(server, [])[2] in ("stop", "length")  # noqa: F405
