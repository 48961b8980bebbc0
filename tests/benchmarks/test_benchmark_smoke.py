"""The benchmark tools end to end on CPU: a tiny engine built by glmv-build, served by the launcher's Triton.

* ``python -m benchmarks.run --smoke`` (concurrency 1 and 2, max_tokens 4) writes a results.json that
  matches the schema, with no errors;
* a headless Locust run of the gRPC user writes CSV rows for ttft and e2e with zero failures;
* the OpenAI target through the gateway (``python -m gateway``) completes its requests.

No timing is asserted (STYLE.md rule 9): only that every request was measured and succeeded.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.results import REPO_ROOT, validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from benchmarks.server import local_triton

    workdir = tmp_path_factory.mktemp("bench_engine")
    with local_triton("tiny", device="cpu", workdir=workdir, log_file=workdir / "triton.log") as server:
        yield server


def _load_results(out: Path) -> dict:
    found = sorted(out.glob("*/results.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_smoke_run_writes_valid_results(tiny_triton, tmp_path: Path) -> None:
    from benchmarks.run import main

    assert (
        main(["--smoke", "--url", tiny_triton.grpc_url, "--out", str(tmp_path), "--progress-interval", "5"])
        == 0
    )
    doc = _load_results(tmp_path)
    validate(doc)
    assert [run["concurrency"] for run in doc["runs"]] == [1, 2]
    for run in doc["runs"]:
        assert run["errors"] == 0, run["error_messages"]
        assert run["requests"] == 3
        assert run["mean_output_tokens"] == 4  # min_tokens = max_tokens: every answer is 4 tokens
        assert run["ttft_ms"]["p50"] is not None and run["e2e_ms"]["p50"] is not None
    assert doc["meta"]["args"]["target"] == "triton"
    result_dir = next(tmp_path.glob("*/"))
    assert (result_dir / "summary.md").read_text().startswith("# Benchmark")
    assert (result_dir / "overview.png").is_file()


def test_locust_headless_grpc_user(tiny_triton, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "benchmarks" / "locustfile.py"), "TritonGrpcUser",
        "--host", tiny_triton.grpc_url, "--headless", "-u", "2", "-r", "2", "-t", "6s",
        "--csv", str(prefix), "--html", str(tmp_path / "report.html"), "--only-summary",
        "--image-sizes", "224x224", "--max-tokens", "4",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Type"]: row for row in csv.DictReader(f) if row["Type"]}
    assert not rows.get("itl") or int(rows["itl"]["Failure Count"]) == 0  # itl needs 2+ responses with tokens
    for kind in ("ttft", "e2e"):
        assert kind in rows, rows.keys()
        assert int(rows[kind]["Request Count"]) > 0
        assert int(rows[kind]["Failure Count"]) == 0
    assert float(rows["e2e"]["Average Content Size"]) == 4.0  # output tokens per answer
    assert (tmp_path / "report.html").stat().st_size > 0


@pytest.fixture(scope="module")
def gateway_url(tiny_triton) -> Iterator[str]:
    from build_engine.launcher import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "--triton-url", tiny_triton.grpc_url, "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"the gateway did not start:\n{out[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_openai_target_through_the_gateway(gateway_url: str, tmp_path: Path) -> None:
    from benchmarks.run import main

    argv = [
        "--target", "openai", "--url", gateway_url, "--concurrency", "1,2", "--num-requests", "2",
        "--max-tokens", "4", "--image-size", "224x224", "--warmup", "0", "--out", str(tmp_path),
        "--no-plots", "--model-label", "tiny",
    ]  # fmt: skip
    assert main(argv) == 0
    doc = _load_results(tmp_path)
    validate(doc)
    for run in doc["runs"]:
        assert run["errors"] == 0, run["error_messages"]
        assert run["requests"] == 2
        assert run["e2e_ms"]["p50"] is not None
