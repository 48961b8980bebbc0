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
        # the engine's side of the same streams (the llm's token times) and the way from it to the client
        assert run["engine_itl_ms"]["p50"] is not None and run["engine_itl_ms"]["p50"] > 0
        assert 0 < run["path_ms"]["p50"] <= run["path_ms"]["p99"] < 10_000
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
def gateway_url(tiny_triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from benchmarks.server import local_gateway

    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with local_gateway([tiny_triton.grpc_url], log) as (url, _):
        yield url


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


def test_reuse_workloads_report_cache_hits(tiny_triton) -> None:
    """The harness's cache workloads against the tiny engine: follow-up questions and conversation
    turns report cached prompt tokens (the first question of an image none); questions per image come
    in rounds, image after image."""
    import asyncio

    from benchmarks.clients import RequestParams, make_target
    from benchmarks.corpus import Corpus
    from benchmarks.metrics import cache_hits
    from benchmarks.reuse import QUESTIONS, QuestionsPerImage, conversation, follow_up_pairs

    corpus = Corpus(sizes=[(320, 240)], pool_size=3, seed=7)
    per_image = QuestionsPerImage(corpus, num_images=3, questions_per_image=2)
    assert len(per_image) == 6
    assert [(per_image.sample(i).images, per_image.sample(i).question) for i in (0, 4)] == [
        (corpus.sample(0).images, QUESTIONS[0]),
        (corpus.sample(1).images, QUESTIONS[1]),
    ]
    params = RequestParams(max_tokens=4, timeout_s=120)

    async def go():
        target = make_target("triton", tiny_triton.grpc_url, None, 1)
        try:
            ((first, second),) = follow_up_pairs(Corpus(sizes=[(320, 240)], pool_size=1, seed=8), 1)
            cold, warm = await target.send(first, params), await target.send(second, params)
            turns = [await target.send(s, params) for s in conversation(corpus.sample(2), 3)]
        finally:
            await target.close()
        return cold, warm, turns

    cold, warm, turns = asyncio.run(go())
    for record in (cold, warm, *turns):
        assert record.error is None and record.num_output_tokens == 4
    assert cold.num_cached_tokens == 0 and 0 < warm.num_cached_tokens < warm.num_input_tokens
    assert [t.num_input_tokens for t in turns] == sorted(t.num_input_tokens for t in turns)
    assert turns[0].num_cached_tokens == 0 and all(t.num_cached_tokens > 0 for t in turns[1:])
    assert cache_hits(turns)["cached_tokens"] == sum(t.num_cached_tokens for t in turns)


def test_gateway_overhead_counts_every_chunk(tmp_path: Path) -> None:
    """benchmarks.gateway_overhead against the echo ensemble: every streamed chunk of every answer counted
    (the words, 5 answer and 4 reasoning tokens of the echo model, the role and finish chunks)."""
    from benchmarks.gateway_overhead import main

    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--words",
                "30",
                "--requests",
                "3",
                "--concurrency",
                "2",
                "--repeats",
                "2",
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "gateway_overhead.json").read_text())
    assert [r["chunks"] for r in doc["runs"]] == [3 * (30 + 11)] * 2
    assert all(r["gateway_cpu_us_per_chunk"] > 0 and r["chunks_per_s"] > 0 for r in doc["runs"])
    assert (tmp_path / "gateway_overhead.png").stat().st_size > 0


def test_response_cost_counts_every_response_of_every_stream(tmp_path: Path) -> None:
    """benchmarks.response_cost: each run streams --streams x --responses responses through the two Python
    models, for each tensor count without and with the sink's is_cancelled(), in turns."""
    from benchmarks.response_cost import main

    args = ["--out", str(tmp_path), "--tensors", "16", "4", "--streams", "2", "--responses", "25"]
    assert main([*args, "--repeats", "2", "--cancel-check"]) == 0
    doc = json.loads((tmp_path / "response_cost.json").read_text())
    turn = [(16, False), (16, True), (4, False), (4, True)]
    assert [(r["tensors"], r["cancel_check"], r["repeat"], r["responses"]) for r in doc["runs"]] == [
        (k, checked, repeat, 50) for repeat in (0, 1) for k, checked in turn
    ]
    assert all(r["server_cpu_us_per_response"] > 0 and r["responses_per_s"] > 0 for r in doc["runs"])
    assert list(doc["summary"]) == [
        "16 tensors",
        "16 tensors + is_cancelled()",
        "4 tensors",
        "4 tensors + is_cancelled()",
    ]
    assert doc["meta"]["commit"] and (tmp_path / "response_cost.png").stat().st_size > 0


def _serve_phase(
    tiny_triton, tmp_path: Path, phase: str, warmup_s: float = 0.0, full_streams: bool = False
) -> dict:
    """The harness's serve record after running one sub-phase against the tiny engine."""
    import asyncio

    from benchmarks.gpu_harness import Harness, serve_phases

    harness = Harness(tmp_path, budget_s=600, commit="abc1234")
    record: dict = {}
    try:
        asyncio.run(
            serve_phases(
                harness,
                tiny_triton.grpc_url,
                "triton",
                record,
                tiny_triton.http_url,
                {phase},
                tiny_triton.admin_headers,
                tiny_triton.metrics_url,
                warmup_s,
                full_streams,
            )
        )
    finally:
        harness.log_file.close()
    return record


def test_harness_choices_compute_the_screenshot_once(tiny_triton, tmp_path: Path) -> None:
    """`choices_1288`: four answers about a new screenshot as one request (num_return_sequences = 4)
    compute its prompt once, the three later choices all of it but the last block; the same four as
    separate requests (another screenshot) all answer too (what they compute depends on their timing)."""
    from benchmarks.gpu_harness import CHOICE_IMAGES
    from engine.config import EngineConfig

    run = _serve_phase(tiny_triton, tmp_path, "choices_1288")["choices_1288"]
    assert run["errors"] == []
    one, apart = run["one_request"], run["separate"]
    assert one["requests"] == apart["requests"] == CHOICE_IMAGES
    block = EngineConfig().block_size
    for row in one["runs"]:  # each screenshot: its prompt once, then three times its last block's tokens
        prompt = row["prompt_tokens"]
        assert prompt > block
        assert row["prompt_tokens_computed"] == prompt + 3 * (prompt - (prompt - 1) // block * block)
    for row in apart["runs"]:
        assert row["prompt_tokens"] <= row["prompt_tokens_computed"] <= 4 * row["prompt_tokens"]
    assert one["finish_reasons"] == apart["finish_reasons"] == ["length"]
    assert one["first_ttft_ms"] <= one["last_ttft_ms"] <= one["all_done_ms"]


def test_harness_warmup_load_runs_before_the_first_sub_phase(tiny_triton, tmp_path: Path) -> None:
    """`--warmup-s`: after the sequential warm-up, 32 streams of new images for that long, all answered,
    then the measured sub-phase as usual."""
    record = _serve_phase(tiny_triton, tmp_path, "ttft_448", warmup_s=2.0)
    load = record["warmup"]["load"]
    assert load["requests"] >= 32 and load["errors"] == 0 and load["seconds"] >= 2.0
    assert record["warmup"]["errors"] == [] and len(record["warmup"]["e2e_ms"]) == 4
    assert record["ttft_448"]["errors"] == 0 and record["ttft_448"]["requests"] > 0


def test_harness_follow_up_reports_each_models_preprocessing_and_llm_stages(
    tiny_triton, tmp_path: Path
) -> None:
    """The harness's `followup_1288` sub-phase against the tiny engine: every question answered, the warm
    ones from the cache, and each kind's Triton model stages, preprocessing stages and llm stages (read
    from Triton's statistics and metrics around every request) in the record and the table."""
    from benchmarks.gpu_harness import clear_shared_resize_dirs, comparisons, table

    record = _serve_phase(tiny_triton, tmp_path, "followup_1288")
    follow = record["followup_1288"]
    stages = ("inputs", "images", "template", "tokens", "positions", "outputs")
    for kind in ("cold", "warm"):
        assert (follow[kind]["requests"], follow[kind]["errors"]) == (5, 0), follow[kind]["error_messages"]
        assert set(follow[kind]["stages"]) == {"ensemble", "preprocessing", "llm", "postprocessing"}
        assert follow[kind]["stages"]["preprocessing"]["executions"] == 5
        assert set(follow[kind]["preprocess_stages_ms"]) == set(stages)
        assert all(ms >= 0 for ms in follow[kind]["preprocess_stages_ms"].values())
        assert list(follow[kind]["llm_stages_ms"]) == ["inputs", "parse", "add"]
        assert all(ms > 0 for ms in follow[kind]["llm_stages_ms"].values())
        assert follow[kind]["preprocess_cpu_ms"]["request"] > 0  # the preprocessing thread's CPU time
    assert follow["warm_cache"]["cached_tokens"] > 0
    doc = {"meta": {"date": "2026-12-05", "commit": "abc1234", "device": "cpu"}, "phases": {"serve": record}}
    doc["comparison"] = comparisons(doc)
    text = table(doc)
    for kind in ("cold", "warm"):
        assert f"followup_1288 {kind}: preprocessing stages ms (P50): inputs " in text
        assert f"followup_1288 {kind}: llm stages ms (P50): inputs " in text
        assert f"followup_1288 {kind}: preprocessing thread CPU ms (P50): request " in text
    # the sub-phase's own means, over its 10 requests
    assert set(follow["preprocess_stages_ms"]) == set(stages)
    assert list(follow["llm_stages_ms"]) == ["inputs", "parse", "add"]
    # and what the engine did over the whole sub-phase: a step or more per request, its full collections
    assert follow["engine"]["steps"] >= 10 and follow["engine"]["steps_ahead"] == 0
    assert isinstance(follow["engine"]["gc_full_collections"], int) and follow["engine"]["gc_full_ms"] >= 0
    assert follow["engine"]["stub_gc_full_collections"] >= 0 and follow["engine"]["stub_gc_full_ms"] >= 0
    # and the harness's own, its heap frozen before the sub-phases (it reads every stream)
    assert (
        set(follow["client_gc"]) == {"full_collections", "ms"}
        and follow["client_gc"]["full_collections"] >= 0
    )
    # the screenshots went through the host's shared resize directory; a later server starts without them
    build_output = tiny_triton.model_repository.parent
    (removed,) = clear_shared_resize_dirs(build_output)
    assert removed.name.startswith("glmv-resize-") and not removed.exists()
    assert clear_shared_resize_dirs(build_output) == []


def test_harness_full_streams_measure_what_a_plain_tritonclient_user_gets(
    tiny_triton, tmp_path: Path
) -> None:
    """`--full-streams`: the harness's client leaves `lean_stream` unset, so every response carries every
    output (postprocessing puts the stream's fixed outputs back); the answers and the server's token counts
    and times it reads from them are those of the lean default."""
    record = _serve_phase(tiny_triton, tmp_path, "decode_b1", full_streams=True)
    assert record["lean_stream"] is False
    b1 = record["decode_b1"]
    assert b1["requests"] == 2 and b1["output_tokens"] == [128, 128], b1["errors"]
    assert b1["engine"]["steps"] >= 2 * 128 and b1["engine"]["llm_itl_ms_mean"] > 0


def test_harness_decode_b1_reports_the_engines_side(tiny_triton, tmp_path: Path) -> None:
    """The harness's `decode_b1` sub-phase against the tiny engine: two 128-token answers, and beside the
    client's ms per token what the server did meanwhile (read from the llm's metrics): at least one engine
    step per token, none launched ahead (no CUDA graphs on a CPU), the llm's mean inter-token time."""
    from benchmarks.gpu_harness import comparisons, table

    record = _serve_phase(tiny_triton, tmp_path, "decode_b1")
    b1 = record["decode_b1"]
    assert b1["requests"] == 2 and b1["output_tokens"] == [128, 128], b1["errors"]
    assert record["lean_stream"] is True
    engine = b1["engine"]
    assert engine["steps"] >= 2 * 128 and engine["steps_ahead"] == 0 and engine["ahead_fraction"] == 0
    assert engine["llm_itl_ms_mean"] > 0
    doc = {"meta": {"date": "2026-12-05", "commit": "abc1234", "device": "cpu"}, "phases": {"serve": record}}
    doc["comparison"] = comparisons(doc)
    assert f"0 of {engine['steps']} engine steps launched ahead" in table(doc)
