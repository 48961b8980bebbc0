"""GPU benchmark harness: everything measured in one call on the GPU machine, under a global time budget.

    python -m benchmarks.gpu_harness --out $OUT [--budget-s 530] [--commit abc1234]

Phases (each in its own try/except; ``harness.json`` is rewritten after every phase, so a failure or a
timeout keeps what was measured before it):

1. ``env``       — GPU name, driver, torch / transformers versions.
2. ``roofline``  — device-to-device copy bandwidth and bf16 8192³ matmul rate; decoder + lm_head bytes ÷
   bandwidth = the decode floor in ms/token (benchmarks.roofline).
3. ``build``     — ``glmv-build --preset dummy-full --device cuda --dtype bfloat16 --max-batch-size 128``.
4. ``serve``     — Triton (system binary, or the one bundled in nvidia-pytriton) on that repository, then
   through the ensemble over gRPC streaming: TTFT of single 448×448 and 1288×728 requests, decode ms/token
   at batch 1, throughput at 32 concurrent (448×448 like the baseline, and 1288×728), guided decoding's cost
   (``grammar_compile``: TTFT with a new, a cached and no JSON schema; ``structured_c32``: 32 concurrent
   448×448 requests with a JSON schema on every one against the same without, benchmarks.structured), then
   64 and 128 concurrent 1288×728 requests (128 tokens out) that must finish with no errors.
   ``--baseline-budget-s`` stays reserved for the next phase.
5. ``baseline``  — transformers ``generate()`` on the same shapes with random weights, after Triton has
   stopped, in a subprocess so its GPU memory is released (benchmarks.baseline_hf). When it cannot run,
   the ratios use the earlier measurement of ARCHITECTURE.md §4 for the same GPU kind, labelled as such.

Outputs under ``--out`` (at most 8 files): ``harness.json`` (everything), ``results.json`` (the concurrency
runs in the benchmarks.run schema), ``summary.md``, ``overview.png``, ``comparison.png``, ``harness.log``,
``triton.log`` (server log tail). The last thing printed is a short table with the ratios
ours / transformers and ours / roofline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.clients import RequestParams, make_target
from benchmarks.corpus import Corpus
from benchmarks.metrics import (
    LLM_STAGES,
    PREPROCESS_CPU,
    PREPROCESS_STAGES,
    cache_hits,
    distribution_ms,
    engine_delta,
    metric_totals,
    stage_means_ms,
    stage_totals,
    steady_state,
    summarize,
)
from benchmarks.results import (
    REPO_ROOT,
    GpuMemorySampler,
    device_name,
    git_commit,
    summary_markdown,
    today,
    validate,
)
from engine.core.gc_watch import freeze_heap, gc_watch


class Harness:
    def __init__(self, out: Path, budget_s: float, commit: str | None) -> None:
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.perf_counter() + budget_s
        self.started = time.perf_counter()
        self.reserve_s = 0.0
        self.doc: dict = {
            "meta": {"date": today(), "commit": commit or git_commit(), "budget_s": budget_s},
            "phases": {},
        }
        self.log_file = open(out / "harness.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the run

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:6.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        self.log_file.write(line + "\n")

    def left(self) -> float:
        """Seconds left for the phase running now (the budget less what is reserved for later phases)."""
        return self.deadline - time.perf_counter() - self.reserve_s

    def save(self) -> None:
        (self.out / "harness.json").write_text(json.dumps(self.doc, indent=2, ensure_ascii=False) + "\n")

    @contextlib.contextmanager
    def phase(self, name: str, needs_s: float):
        """Runs the block unless less than ``needs_s`` seconds are left; records time, errors, results."""
        record: dict = {}
        self.doc["phases"][name] = record
        if self.left() < needs_s:
            record["skipped"] = f"time budget: {self.left():.0f} s left, phase needs ~{needs_s:.0f} s"
            self.log(f"{name}: skipped ({record['skipped']})")
            self.save()
            yield None
            return
        self.log(f"{name}: start ({self.left():.0f} s left)")
        started = time.perf_counter()
        try:
            yield record
            record["ok"] = True
        except Exception as exc:
            record["ok"] = False
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-3000:]
            self.log(f"{name}: FAILED {record['error']}")
        finally:
            record["seconds"] = round(time.perf_counter() - started, 2)
            self.log(f"{name}: done in {record['seconds']} s")
            self.save()


def phase_env(record: dict) -> None:
    import torch

    record["torch"] = torch.__version__
    record["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record["gpu"] = props.name
        record["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
        record["sm_count"] = props.multi_processor_count
    try:
        import transformers

        record["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import tritonclient

        record["tritonclient"] = getattr(tritonclient, "__version__", "present")
    except Exception as exc:
        record["tritonclient"] = f"unusable: {exc}"
    for name in ("grpc", "google.protobuf", "xgrammar", "pydantic"):
        try:
            module = __import__(name, fromlist=["__version__"])
            record[name] = getattr(module, "__version__", "present")
        except Exception as exc:
            record[name] = f"unusable: {exc}"
    from build_engine.cpu_latency import idle_driver

    record["cpuidle"] = idle_driver()  # what glmv-serve --cpu-dma-latency-us acts through ("none": nothing)
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, check=False
        )
        record["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()


def phase_roofline(record: dict) -> None:
    from benchmarks import roofline

    cfg = roofline.full_size_config()
    counts = roofline.decoder_param_counts(cfg)
    record["params"] = counts
    record["weight_bytes_bf16"] = counts["per_token_read"] * 2
    record["kv_bytes_per_token"] = roofline.kv_bytes_per_token(cfg)
    import torch

    record["copy"] = roofline.measure_copy_bandwidth()
    torch.cuda.empty_cache()
    record["matmul"] = roofline.measure_matmul_tflops()
    torch.cuda.empty_cache()
    bandwidth = record["copy"]["tb_s"] * 1e12
    record["decode_ms_per_token_b1"] = roofline.decode_roofline_ms(
        cfg, bandwidth, batch=1, context_len=1224 + 64
    )
    record["fp8_read_gb"] = roofline.fp8_read_bytes(cfg) / 1e9
    record["decode_ms_per_token_b1_fp8"] = roofline.decode_roofline_ms(
        cfg, bandwidth, batch=1, context_len=1224 + 64, weights="fp8"
    )
    # Batch 32 of 448x448 prompts (~285 tokens) with 128 out: mean context ~350 tokens per sequence.
    step_ms = roofline.decode_roofline_ms(cfg, bandwidth, batch=32, context_len=350)
    record["decode_tok_s_b32_448"] = 32 / step_ms * 1e3
    step_ms = roofline.decode_roofline_ms(cfg, bandwidth, batch=32, context_len=1224 + 64)
    record["decode_tok_s_b32_1288"] = 32 / step_ms * 1e3


def phase_baseline(record: dict, harness: Harness, budget_s: float) -> None:
    out = harness.out / "baseline_hf.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.baseline_hf",
        "--out",
        str(out),
        "--budget-s",
        str(budget_s - 30),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=budget_s, check=False
        )
        record["exit_code"] = proc.returncode
        if proc.returncode != 0:
            record["stderr_tail"] = proc.stderr[-3000:]
    except subprocess.TimeoutExpired:
        record["error"] = f"baseline_hf did not finish within {budget_s:.0f} s"
    if out.exists():
        record.update(json.loads(out.read_text()))
        out.unlink()  # folded into harness.json; keeps $OUT under its file limit
    if "ttft_ms" not in record and "decode_ms_per_token" not in record:
        raise RuntimeError(record.get("error") or record.get("stderr_tail", "no result")[-500:])


# new images per TTFT phase (ttft_448, ttft_1288), one at a time: enough for a P95 that is not the maximum
TTFT_REQUESTS = 20
CHOICE_IMAGES = 6  # choices_1288: new screenshots per mode


async def _sequential(target, corpus, params, count: int) -> list:
    return [await target.send(corpus.sample(i), params) for i in range(count)]


async def _closed(target, corpus, params, concurrency: int, num_requests: int, duration_s: float) -> tuple:
    from benchmarks.run import timed_closed_loop

    return await timed_closed_loop(target, corpus, params, concurrency, num_requests, duration_s)


def _ttft_summary(records) -> dict:
    ok = [r for r in records if r.is_ok]
    return {
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "ttft_ms": distribution_ms(r.ttft_s for r in ok if r.ttft_s is not None),
        "server_ttft_ms": distribution_ms(r.server_ttft_s for r in ok if r.server_ttft_s is not None),
        "pre_llm_ms": distribution_ms(r.pre_llm_s for r in ok if r.pre_llm_s is not None),
        "prompt_tokens": next((r.num_input_tokens for r in ok if r.num_input_tokens), None),
        "error_messages": sorted({r.error for r in records if r.error})[:3],
    }


# the stage histograms the harness reads around its requests: record key -> metric family
STAGE_FAMILIES = {
    "preprocess_stages_ms": PREPROCESS_STAGES,
    "preprocess_cpu_ms": PREPROCESS_CPU,
    "llm_stages_ms": LLM_STAGES,
}


def model_stats(http_url: str, headers: dict[str, str] | None = None) -> dict:
    """Triton's cumulative per-model statistics: {model: {execution_count, <stat>: (count, ns)}}.
    ``headers``: the server's admin key (``TritonServer.admin_headers``; statistics is a restricted API)."""
    import urllib.request

    base = http_url if http_url.startswith("http") else f"http://{http_url}"
    request = urllib.request.Request(f"{base}/v2/models/stats", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        doc = json.loads(resp.read())
    out = {}
    for m in doc.get("model_stats", []):
        row = {"executions": int(m.get("execution_count", 0))}
        for key, value in m.get("inference_stats", {}).items():
            row[key] = (int(value.get("count", 0)), int(value.get("ns", 0)))
        out[m["name"]] = row
    return out


def add_stats(total: dict, before: dict, after: dict) -> dict:
    """``total`` (statistics shaped like `model_stats`) plus what each model did from ``before`` to
    ``after``: to take the stages of some of a sub-phase's requests apart (`stage_breakdown({}, total)`)."""
    for name, row in after.items():
        prev, acc = before.get(name, {}), total.setdefault(name, {"executions": 0})
        acc["executions"] += row["executions"] - prev.get("executions", 0)
        for key, value in row.items():
            if key == "executions":
                continue
            count, ns = value
            c0, n0 = prev.get(key, (0, 0))
            c, n = acc.get(key, (0, 0))
            acc[key] = (c + count - c0, n + ns - n0)
    return total


def stage_breakdown(before: dict, after: dict) -> dict:
    """Per model over one sub-phase: executions and mean ms per execution of queue / compute stages."""
    out = {}
    for name, row in after.items():
        prev = before.get(name, {})
        executions = row["executions"] - prev.get("executions", 0)
        if executions <= 0:
            continue
        stages = {"executions": executions}
        for key in ("queue", "compute_input", "compute_infer", "compute_output"):
            count = row.get(key, (0, 0))[0] - prev.get(key, (0, 0))[0]
            ns = row.get(key, (0, 0))[1] - prev.get(key, (0, 0))[1]
            if count > 0:
                stages[f"{key}_ms"] = round(ns / count / 1e6, 3)
        out[name] = stages
    return out


async def serve_phases(
    harness: Harness,
    url: str,
    target_kind: str,
    record: dict,
    http_url: str | None = None,
    only: set[str] | None = None,
    admin_headers: dict[str, str] | None = None,
    metrics_url: str | None = None,
    warmup_s: float = 0.0,
    full_streams: bool = False,
) -> None:
    """Every measurement through Triton; each sub-phase guarded so one failure keeps the others.
    ``only``: run just these sub-phases (and the warm-up). ``metrics_url``: Triton's metrics, for the
    preprocessing model's and the llm's stages (per sub-phase, and per follow-up request). ``warmup_s``:
    after the sequential warm-up, that many seconds of 32 streams of new 448x448 images (their own seed),
    so the first sub-phase does not meet a colder host than the later ones. ``full_streams``: every
    streamed response carries every output (the client leaves ``lean_stream`` unset, as a plain tritonclient
    user does), where the benchmark clients otherwise ask for lean streams as glmv_client does."""
    from benchmarks.reuse import QuestionsPerImage, conversation, follow_up_pairs

    def params_of(**fields) -> RequestParams:
        return RequestParams(lean_stream=not full_streams, **fields)

    record["lean_stream"] = not full_streams

    sizes = {"448": (448, 448), "1288": (1288, 728), "1920": (1920, 1080)}
    # Every request of the TTFT and throughput runs brings an image no earlier request brought (the caches
    # must not flatter them): the warm-up, the TTFT runs and each throughput run draw from their own seeds,
    # rendered up front in worker processes.
    workers = max(1, min(16, os.cpu_count() or 1))
    corpora = {k: Corpus(sizes=[sizes[k]], pool_size=TTFT_REQUESTS) for k in ("448", "1288")}
    warm_corpora = {k: Corpus(sizes=[sizes[k]], pool_size=3, seed=900) for k in ("448", "1288")}
    unique = {
        ("448", 32): Corpus(sizes=[sizes["448"]], pool_size=128, seed=10_000, workers=workers),
        ("1288", 32): Corpus(sizes=[sizes["1288"]], pool_size=128, seed=20_000, workers=workers),
        ("1288", 64): Corpus(sizes=[sizes["1288"]], pool_size=128, seed=30_000, workers=workers),
        ("1288", 128): Corpus(sizes=[sizes["1288"]], pool_size=128, seed=40_000, workers=workers),
    }
    warm_load = (
        Corpus(sizes=[sizes["448"]], pool_size=128, seed=50_000, workers=workers) if warmup_s > 0 else None
    )
    # large screenshots that need a resize: rendered only when their sub-phase runs
    if not only or "c16_1920" in only:
        unique[("1920", 16)] = Corpus(sizes=[sizes["1920"]], pool_size=64, seed=45_000, workers=workers)
    harness.log(f"serve: rendered {sum(len(c) for c in unique.values())} unique images")
    # This process reads every stream: a full garbage collection here stalls them all and would count as
    # the server's inter-token gap. What it holds now is frozen, and each sub-phase counts its collections.
    client_gc = gc_watch()
    freeze_heap()
    target = make_target(target_kind, url, None, 128)
    runs: list[dict] = []
    record["runs"] = runs
    sampler = GpuMemorySampler(0.5)
    sampler.__enter__()

    async def sub(name: str, needs_s: float, coro_fn) -> None:
        if only and name != "warmup" and name not in only:
            return
        if harness.left() < needs_s:
            record[name] = {"skipped": f"time budget: {harness.left():.0f} s left"}
            harness.log(f"serve/{name}: skipped")
            return
        harness.log(f"serve/{name}: start ({harness.left():.0f} s left)")
        before = None
        if http_url:
            with contextlib.suppress(Exception):
                before = model_stats(http_url, admin_headers)
        stages_before = stage_reading()
        engine_before = None
        if metrics_url:  # the previous sub-phase's last reading waited for the llm's stats thread
            with contextlib.suppress(Exception):
                engine_before = metric_totals(metrics_url)
        client_before = (client_gc.num_full, client_gc.seconds)
        try:
            record[name] = await asyncio.wait_for(coro_fn(), timeout=max(10.0, harness.left() - 15))
        except Exception as exc:
            record[name] = {"error": f"{type(exc).__name__}: {exc}"}
            harness.log(f"serve/{name}: FAILED {record[name]['error']}")
        if isinstance(record[name], dict):  # the harness's own full collections in the sub-phase
            record[name]["client_gc"] = {
                "full_collections": client_gc.num_full - client_before[0],
                "ms": round((client_gc.seconds - client_before[1]) * 1e3, 3),
            }
        engine_after = await engine_reading()
        if engine_before and engine_after and isinstance(record[name], dict):
            # the engine over the whole sub-phase (steps, steps ahead, full garbage collections)
            record[name]["engine"] = engine_delta(engine_before, engine_after)
        if before is not None:
            with contextlib.suppress(Exception):
                record[name]["stages"] = stage_breakdown(before, model_stats(http_url, admin_headers))
        for key, means in stage_means(stages_before, stage_reading()).items():
            if means and isinstance(record[name], dict):
                record[name].setdefault(key, means)  # the mean over the sub-phase's requests
        harness.log(f"serve/{name}: {json.dumps(record[name])[:400]}")
        harness.save()

    one = params_of(max_tokens=1, ignore_eos=True, timeout_s=120)

    async def warmup():
        recs = await _sequential(target, warm_corpora["448"], params_of(max_tokens=4, timeout_s=300), 2)
        recs += await _sequential(target, warm_corpora["1288"], params_of(max_tokens=4, timeout_s=300), 2)
        out = {
            "errors": [r.error for r in recs if r.error],
            "e2e_ms": [round((r.e2e_s or 0) * 1e3, 1) for r in recs],
        }
        if warm_load is not None:
            params = params_of(max_tokens=128, ignore_eos=True, timeout_s=300)
            load, wall = await _closed(target, warm_load, params, 32, 100_000, warmup_s)
            out["load"] = {
                "seconds": round(wall, 1),
                "requests": len(load),
                "errors": sum(1 for r in load if r.error),
            }
        return out

    async def ttft(size: str):
        return _ttft_summary(await _sequential(target, corpora[size], one, TTFT_REQUESTS))

    async def engine_reading() -> dict[str, float] | None:
        """The engine's step counters and the llm's inter-token histogram totals, once the llm's stats
        thread (every 100 ms) has caught up."""
        if not metrics_url:
            return None
        await asyncio.sleep(0.3)
        with contextlib.suppress(Exception):
            return metric_totals(metrics_url)
        return None

    async def decode_b1():
        """ms per token of one stream at the client (`sub` adds ``engine``: the same stretch inside the
        server, the llm's mean inter-token time, the engine's steps and the share launched ahead)."""
        params = params_of(max_tokens=128, ignore_eos=True, timeout_s=300)
        recs = [r for r in await _sequential(target, corpora["1288"], params, 2)]
        ok = [r for r in recs if r.is_ok and r.num_output_tokens > 1]
        per_req = [(r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) * 1e3 for r in ok]
        return {
            "requests": len(ok),
            "errors": [r.error for r in recs if r.error][:3],
            "ms_per_token": round(sorted(per_req)[len(per_req) // 2], 3) if per_req else None,
            "itl_ms": distribution_ms(v for r in ok for v in r.itl_s),
            "output_tokens": [r.num_output_tokens for r in ok],
        }

    def throughput(size: str, concurrency: int, num_requests: int, duration_s: float):
        async def go():
            params = params_of(max_tokens=128, ignore_eos=True, timeout_s=300)
            sampler.take_peak()
            records, wall = await _closed(
                target, unique[(size, concurrency)], params, concurrency, num_requests, duration_s
            )
            run = {"concurrency": concurrency, **summarize(records, wall), "gpu_mem_gb": sampler.take_peak()}
            # after the opening burst of `concurrency` simultaneous requests (None if too few followed)
            run["steady"] = steady_state(records, concurrency)
            run["image_size"] = f"{sizes[size][0]}x{sizes[size][1]}"
            if size == "1288":
                runs.append(run)
            return run

        return go

    def stage_reading() -> dict[str, dict] | None:
        """The stage histograms' totals so far: the preprocessing model's stages and thread CPU time, the
        llm's stages."""
        if not metrics_url:
            return None
        with contextlib.suppress(Exception):
            return {key: stage_totals(metrics_url, family) for key, family in STAGE_FAMILIES.items()}
        return None

    def stage_means(before: dict | None, after: dict | None) -> dict[str, dict[str, float]]:
        if before is None or after is None:
            return {}
        return {key: stage_means_ms(before[key], after[key]) for key in STAGE_FAMILIES}

    async def follow_up():
        """TTFT of a second question about a 1288x728 screenshot seen once (cold: the first question), and
        each kind's own per-model stages (the statistics read around every request), preprocessing stages
        and llm stages (`glmv_preprocess_stage_seconds`, `glmv_llm_request_stage_seconds`: P50 over the
        requests of ms per request)."""
        corpus = Corpus(sizes=[sizes["1288"]], pool_size=5, seed=1000)
        cold, warm, totals = [], [], {"cold": {}, "warm": {}}
        per_request: dict[str, dict[str, dict[str, list[float]]]] = {"cold": {}, "warm": {}}

        def stats() -> dict | None:
            if not http_url:
                return None
            with contextlib.suppress(Exception):
                return model_stats(http_url, admin_headers)
            return None

        for first, second in follow_up_pairs(corpus, 5):
            for kind, sample, records in (("cold", first, cold), ("warm", second, warm)):
                before, stages_before = stats(), stage_reading()
                records.append(await target.send(sample, one))
                after, stages_after = stats(), stage_reading()
                if before is not None and after is not None:
                    add_stats(totals[kind], before, after)
                for key, means in stage_means(stages_before, stages_after).items():
                    for stage, ms in means.items():
                        per_request[kind].setdefault(key, {}).setdefault(stage, []).append(ms)
        out = {"cold": _ttft_summary(cold), "warm": _ttft_summary(warm), "warm_cache": cache_hits(warm)}
        for kind in ("cold", "warm"):
            if totals[kind]:
                out[kind]["stages"] = stage_breakdown({}, totals[kind])
            for key, by_stage in per_request[kind].items():
                out[kind][key] = {stage: round(statistics.median(v), 3) for stage, v in by_stage.items()}
        return out

    async def choices():
        """n = 4 answers of 64 tokens about a new 1288x728 screenshot: one request with
        num_return_sequences = 4 (preprocessed once; the engine gets the four together and computes the
        screenshot once) against the same four as separate requests sent together (each preprocessed; the
        engine shares what it can of the screenshot among those that reach it together), the modes
        alternating over CHOICE_IMAGES new screenshots each. Per mode, P50 over the screenshots of: the
        first choice's first token, the last choice's first token, all four done (client ms); prompt tokens
        computed (each choice's prompt less its cached tokens, summed)."""
        from glmv_client import AsyncClient, Finish

        if target_kind != "triton":
            return {"skipped": f"needs the gRPC target, not {target_kind}"}
        count = 4
        corpus = Corpus(sizes=[sizes["1288"]], pool_size=2 * CHOICE_IMAGES, seed=3000, workers=workers)
        asked = {"max_tokens": 64, "min_tokens": 64, "temperature": 1.0, "enable_thinking": False}
        runs: dict[str, list[dict]] = {"one_request": [], "separate": []}
        errors: list[str] = []

        async def finishes(client, sample, seed: int, n: int) -> list[Finish]:
            items = client.stream(
                list(sample.images), sample.question, seed=seed, num_return_sequences=n, **asked
            )
            return [item async for item in items if isinstance(item, Finish)]

        async with AsyncClient(url, timeout=300) as client:
            for i in range(CHOICE_IMAGES):
                for mode in ("one_request", "separate") if i % 2 == 0 else ("separate", "one_request"):
                    sample = corpus.sample(2 * i + (mode == "separate"))
                    try:
                        if mode == "one_request":
                            done = await finishes(client, sample, 11, count)
                        else:
                            done = [
                                f
                                for fs in await asyncio.gather(
                                    *(finishes(client, sample, 11 + k, 1) for k in range(count))
                                )
                                for f in fs
                            ]
                    except Exception as exc:  # the error is the measurement
                        errors.append(f"{mode}: {type(exc).__name__}: {exc}")
                        continue
                    ttfts = [f.timings.ttft or 0.0 for f in done]
                    runs[mode].append(
                        {
                            "first_ttft_ms": min(ttfts) * 1e3,
                            "last_ttft_ms": max(ttfts) * 1e3,
                            "all_done_ms": max(f.timings.total for f in done) * 1e3,
                            "prompt_tokens_computed": sum(
                                f.usage.prompt_tokens - f.usage.cached_tokens for f in done
                            ),
                            "prompt_tokens": done[0].usage.prompt_tokens if done else 0,
                            "finish_reasons": sorted({f.finish_reason for f in done}),
                        }
                    )
        out: dict = {"choices": count, "max_tokens": 64, "errors": errors}
        for mode, rows in runs.items():
            out[mode] = {
                "requests": len(rows),
                **{
                    key: round(statistics.median(r[key] for r in rows), 1) if rows else None
                    for key in ("first_ttft_ms", "last_ttft_ms", "all_done_ms", "prompt_tokens_computed")
                },
                "prompt_tokens": rows[0]["prompt_tokens"] if rows else None,
                "finish_reasons": sorted({reason for r in rows for reason in r["finish_reasons"]}),
                "runs": rows,
            }
        return out

    def questions_per_image(concurrency: int, num_images: int, per_image: int):
        async def go():
            images = Corpus(sizes=[sizes["1288"]], pool_size=num_images, seed=2000, workers=workers)
            corpus = QuestionsPerImage(images, num_images, per_image)
            params = params_of(max_tokens=128, ignore_eos=True, timeout_s=300)
            records, wall = await _closed(target, corpus, params, concurrency, len(corpus), 60.0)
            run = {"concurrency": concurrency, "images": num_images, "questions_per_image": per_image}
            run.update(summarize(records, wall))
            run["steady"] = steady_state(records, concurrency)
            return run

        return go

    def poisson(rate: float, duration_s: float):
        """Open loop: Poisson arrivals of unique 1288x728 screenshots at ``rate`` req/s, 128 out."""

        async def go():
            from benchmarks.run import Progress, open_loop

            corpus = Corpus(sizes=[sizes["1288"]], pool_size=int(rate * duration_s) + 8, seed=int(50_000 + rate * 1000),
                            workers=workers)  # fmt: skip
            params = params_of(max_tokens=128, ignore_eos=True, timeout_s=120)
            progress = Progress(f"rate={rate}", 5.0, duration_s)
            started = time.perf_counter()
            records = await open_loop(target, corpus, params, rate, duration_s, None, 0, progress)
            run = {"rate": rate, **summarize(records, time.perf_counter() - started)}
            return run

        return go

    async def large_images():
        """TTFT of one request at a time, five each: 1920x1080, 2560x1440, 3840x2160, and four 1288x728
        screenshots in one request."""
        out = {}
        for name, size, count in (
            ("1920x1080", (1920, 1080), 1),
            ("2560x1440", (2560, 1440), 1),
            ("3840x2160", (3840, 2160), 1),
            ("4x1288x728", (1288, 728), 4),
        ):
            corpus = Corpus(sizes=[size], pool_size=5, seed=60_000 + size[0], num_images=count)
            out[name] = _ttft_summary(await _sequential(target, corpus, one, 5))
        return out

    async def chat(turns: int = 4, count: int = 3):
        """``count`` conversations of ``turns`` turns about one screenshot each, one turn at a time."""
        corpus = Corpus(sizes=[sizes["1288"]], pool_size=count, seed=3000)
        params = params_of(max_tokens=32, ignore_eos=True, timeout_s=120)
        by_turn: list[list] = [[] for _ in range(turns)]
        for i in range(count):
            for t, sample in enumerate(conversation(corpus.sample(i), turns)):
                by_turn[t].append(await target.send(sample, params))
        return {
            f"turn_{t + 1}": {**_ttft_summary(recs), **cache_hits(recs)} for t, recs in enumerate(by_turn)
        }

    async def grammar_compile():
        from benchmarks import structured

        problem = structured.guided_decoding_problem()
        if problem:
            return {"skipped": problem}
        return await structured.compile_ttft(target, sizes["448"], repetitions=4, seed=70_000)

    async def structured_c32():
        from benchmarks import structured

        problem = structured.guided_decoding_problem()
        if problem:
            return {"skipped": problem}
        return await structured.throughput(target, sizes["448"], 32, 64, 15.0, seed=71_000, workers=workers)

    try:
        await sub("warmup", 60 + warmup_s, warmup)
        await sub("ttft_448", 20, lambda: ttft("448"))
        await sub("ttft_1288", 20, lambda: ttft("1288"))
        await sub("decode_b1", 30, decode_b1)
        await sub("c32_448", 40, throughput("448", 32, 128, 20.0))
        await sub("c32_1288", 40, throughput("1288", 32, 128, 25.0))
        await sub("grammar_compile", 20, grammar_compile)
        await sub("structured_c32", 50, structured_c32)
        await sub("followup_1288", 20, follow_up)
        await sub("choices_1288", 20, choices)
        await sub("reuse_c32_1288", 40, questions_per_image(32, 64, 4))
        await sub("conversation_1288", 20, chat)
        await sub("poisson_5", 40, poisson(5.0, 20.0))
        await sub("poisson_9", 40, poisson(9.0, 20.0))
        await sub("large_images", 40, large_images)
        await sub("c16_1920", 40, throughput("1920", 16, 64, 20.0))
        # 64 and 128 at once: every request of one wave in flight together, none may fail
        await sub("c64_1288", 40, throughput("1288", 64, 128, 15.0))
        await sub("c128_1288", 40, throughput("1288", 128, 128, 10.0))
    finally:
        sampler.__exit__(None, None, None)
        await target.close()


def clear_shared_resize_dirs(engine_out: Path) -> list[Path]:
    """Remove the host's shared resize directories of the engines under ``engine_out`` (the preprocessing
    model's, in /dev/shm or the temp directory), so that a server started after another one on the same
    host (a second tree or variant in one call) meets its "new" images as new. Returns what it removed."""
    from engine.processing.preprocess import shared_resize_dir_name

    removed = []
    for config in sorted(engine_out.glob("**/preprocessor_config.json")):
        for root in {Path("/dev/shm"), Path(tempfile.gettempdir())}:
            directory = root / shared_resize_dir_name(config.parent)
            if directory.is_dir():
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
    return removed


def phase_serve(
    record: dict,
    harness: Harness,
    engine_out: Path,
    only: set[str] | None = None,
    warmup_s: float = 0.0,
    cpu_dma_latency_us: int | None = None,
    full_streams: bool = False,
) -> None:
    from benchmarks.server import find_model_repository
    from build_engine.launcher import TritonServer

    repo = find_model_repository(engine_out)
    clear_shared_resize_dirs(engine_out)
    log_file = Path(tempfile.gettempdir()) / "glmv-harness-triton.log"
    # the server appends to its log: this run's triton.log holds this server's lines only
    log_file.unlink(missing_ok=True)
    server = TritonServer(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=log_file,
        # 120 s kept for the sub-phases when there is room; never less than a start takes on the GPU
        # hosts (35-55 s with the CUDA graphs' capture), or a short budget measures nothing at all
        startup_timeout_s=max(90.0, harness.left() - 120),
        cpu_dma_latency_us=cpu_dma_latency_us,
    )
    record["cpu_dma_latency_us"] = cpu_dma_latency_us
    try:
        target_kind = "triton"
        try:  # tritonclient's generated code raises RuntimeError when grpcio / protobuf are too old
            import tritonclient.grpc.aio  # noqa: F401
        except Exception as exc:
            target_kind = "triton-http"
            record["client_note"] = f"tritonclient unavailable ({exc}); using HTTP generate_stream"
        started = time.perf_counter()
        server.start()
        record["startup_s"] = round(time.perf_counter() - started, 2)
        record["triton_source"] = server.install.source if server.install else None
        harness.log(f"serve: triton ready in {record['startup_s']} s")
        url = server.grpc_url if target_kind == "triton" else server.http_url
        record["target"] = target_kind
        asyncio.run(
            serve_phases(
                harness,
                url,
                target_kind,
                record,
                server.http_url,
                only,
                server.admin_headers,
                server.metrics_url,
                warmup_s,
                full_streams,
            )
        )
    finally:
        with contextlib.suppress(Exception):
            server.stop(timeout_s=20)
        with contextlib.suppress(OSError):
            lines = log_file.read_text(errors="replace").splitlines()
            (harness.out / "triton.log").write_text("\n".join(lines[-3000:]) + "\n")


# transformers generate() on the full shape, bf16 random weights (docs: ARCHITECTURE.md §4).
REFERENCE_TRANSFORMERS = {
    "H100": {"ttft_1288_ms": 130.0, "decode_ms_per_token_b1": 125.0, "tok_s_c32_448": 289.0},
    "H200": {"ttft_1288_ms": 108.0, "decode_ms_per_token_b1": 88.0, "tok_s_c32_448": 284.0},
}


def _ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def structured_figures(serve: dict) -> dict:
    """Issue 18's figures from the ``structured_c32`` and ``grammar_compile`` sub-phases (None where one did
    not run): output tok/s with a JSON schema on every request over without (target >= 0.9), the fraction of
    guided answers that validate, and the TTFT that compiling a new schema and using a cached one add."""
    run, compiled = serve.get("structured_c32") or {}, serve.get("grammar_compile") or {}
    with_schema, without = run.get("with_schema") or {}, run.get("without_schema") or {}
    return {
        "tok_s_with_schema": with_schema.get("output_tok_s"),
        "tok_s_without_schema": without.get("output_tok_s"),
        "with_over_without": (run.get("ratio") or {}).get("output_tok_s"),
        "target": run.get("target_ratio"),
        "meets_target": run.get("meets_target"),
        "valid_fraction": (with_schema.get("answers") or {}).get("valid_fraction"),
        "compile_ttft_ms": compiled.get("compile_ms"),
        "cached_schema_ttft_ms": compiled.get("cached_schema_ms"),
    }


def comparisons(doc: dict) -> dict:
    """ours / transformers and ours / roofline for TTFT, ms/token and batch-32 tok/s."""
    phases = doc["phases"]
    serve, base, roof = phases.get("serve", {}), phases.get("baseline", {}), phases.get("roofline", {})
    ours = {
        "ttft_1288_ms": (serve.get("ttft_1288") or {}).get("ttft_ms", {}).get("p50"),
        "ttft_448_ms": (serve.get("ttft_448") or {}).get("ttft_ms", {}).get("p50"),
        "decode_ms_per_token_b1": (serve.get("decode_b1") or {}).get("ms_per_token"),
        "tok_s_c32_448": (serve.get("c32_448") or {}).get("output_tok_s"),
        "tok_s_c32_1288": (serve.get("c32_1288") or {}).get("output_tok_s"),
    }
    hf = {
        "ttft_1288_ms": base.get("ttft_ms"),
        "decode_ms_per_token_b1": base.get("decode_ms_per_token"),
        "tok_s_c32_448": base.get("batch_tok_s"),
    }
    # Where the baseline did not run here, use the earlier measurement on the same GPU kind (labelled).
    device = str(doc["meta"].get("device", "")).upper()
    kind = next((k for k in REFERENCE_TRANSFORMERS if k in device), None)
    hf_source = {k: "measured" if v is not None else None for k, v in hf.items()}
    if kind:
        for key, value in REFERENCE_TRANSFORMERS[kind].items():
            if hf.get(key) is None:
                hf[key] = value
                hf_source[key] = f"reference: ARCHITECTURE.md §4 ({kind}, measured earlier)"
    fp8 = doc["meta"].get("weights") == "fp8"  # the served engine's weights: their own floor
    floor = {
        "decode_ms_per_token_b1": roof.get("decode_ms_per_token_b1_fp8" if fp8 else "decode_ms_per_token_b1"),
        "tok_s_c32_448": roof.get("decode_tok_s_b32_448"),
        "tok_s_c32_1288": roof.get("decode_tok_s_b32_1288"),
    }
    return {
        "ours": ours,
        "transformers": hf,
        "transformers_source": hf_source,
        "roofline": floor,
        # < 1 is better for times, > 1 is better for tok/s
        "ours_over_transformers": {k: _ratio(ours.get(k), v) for k, v in hf.items()},
        "ours_over_roofline": {k: _ratio(ours.get(k), v) for k, v in floor.items()},
        "structured": structured_figures(serve),
    }


def plot_comparison(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmp = doc["comparison"]
    panels = [
        ("TTFT 1288×728 (ms)", "ttft_1288_ms"),
        ("decode ms/token, batch 1", "decode_ms_per_token_b1"),
        ("output tok/s, 32 × 448×448", "tok_s_c32_448"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, key) in zip(axes, panels, strict=True):
        names, values = [], []
        for who in ("ours", "transformers", "roofline"):
            v = cmp[who].get(key)
            if isinstance(v, (int, float)):
                names.append(who if who != "roofline" else "roofline (floor/ceiling)")
                values.append(v)
        bars = ax.bar(names, values, color=["tab:blue", "tab:gray", "tab:green"][: len(values)])
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(
                f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
            )
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    meta = doc["meta"]
    fig.suptitle(
        f"glmv-serve vs transformers generate() vs roofline · {meta.get('device')} · {meta['date']} · {meta['commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(doc: dict) -> str:
    cmp = doc["comparison"]
    rows = [
        ("TTFT 1288x728 (ms)", "ttft_1288_ms"),
        ("TTFT 448x448 (ms)", "ttft_448_ms"),
        ("decode ms/token b1", "decode_ms_per_token_b1"),
        ("tok/s c=32 448x448", "tok_s_c32_448"),
        ("tok/s c=32 1288x728", "tok_s_c32_1288"),
    ]

    def f(v):
        return f"{v:10.2f}" if isinstance(v, (int, float)) else f"{'–':>10}"

    lines = [f"{'metric':24}{'ours':>10}{'hf':>10}{'roofline':>10}{'ours/hf':>10}{'ours/roof':>10}"]
    for label, key in rows:
        lines.append(
            f"{label:24}{f(cmp['ours'].get(key))}{f(cmp['transformers'].get(key))}{f(cmp['roofline'].get(key))}"
            f"{f(cmp['ours_over_transformers'].get(key))}{f(cmp['ours_over_roofline'].get(key))}"
        )
    serve = doc["phases"].get("serve", {})
    b1 = serve.get("decode_b1") or {}
    if b1.get("engine"):
        eng = b1["engine"]
        lines.append(
            f"decode_b1: {b1.get('ms_per_token') or 0:.2f} ms/token at the client, {eng['llm_itl_ms_mean'] or 0:.2f} "
            f"as the llm sent them; {eng['steps_ahead']} of {eng['steps']} engine steps launched ahead"
        )
    for name in ("c32_448", "c32_1288"):
        steady = (serve.get(name) or {}).get("steady")
        if steady:
            lines.append(
                f"{name} after its opening burst: {steady['rps']:.2f} req/s, {steady['output_tok_s']:.1f} tok/s, "
                f"TTFT P95 {steady['ttft_ms']['p95']:.0f} ms ({steady['requests']} requests)"
            )
    for name in ("c32_448", "c32_1288", "reuse_c32_1288", "poisson_5", "poisson_9", "c16_1920"):
        run = serve.get(name) or {}
        if "requests" in run:
            itl, gap = run.get("itl_ms") or {}, run.get("response_gap_ms") or {}
            lines.append(
                f"{name}: {run['rps']:.2f} req/s, {run['requests']} ok, {run['errors']} errors, TTFT P50/P99 "
                f"{(run.get('ttft_ms') or {}).get('p50') or 0:.0f}/{(run.get('ttft_ms') or {}).get('p99') or 0:.0f} ms, ITL P50/P99 "
                f"{itl.get('p50') or 0:.1f}/{itl.get('p99') or 0:.1f} ms, response gap P50/P99 "
                f"{gap.get('p50') or 0:.1f}/{gap.get('p99') or 0:.1f} ms"
                + _engine_side_text(run)
                + f", cache hit rate {run.get('cache_hit_rate')}"
                # the preprocessing model's compute per request does not depend on the engine: when it moves
                # between two runs, the host's speed moved (compare throughput within one call only)
                + f", preprocessing {((run.get('stages') or {}).get('preprocessing') or {}).get('compute_infer_ms', 0):.1f} ms/request"
                + _thread_cpu_text(run)
                + "".join(f", llm {stage} {ms:.2f}" for stage, ms in (run.get("llm_stages_ms") or {}).items())
                + _gc_text(run.get("engine"), run.get("client_gc"))
            )
    lines += _structured_lines(serve)
    follow = serve.get("followup_1288") or {}
    if "warm" in follow:
        lines.append(
            f"followup_1288: TTFT P50 cold {follow['cold']['ttft_ms'].get('p50') or 0:.1f} ms, warm "
            f"{follow['warm']['ttft_ms'].get('p50') or 0:.1f} ms (server {follow['warm']['server_ttft_ms'].get('p50') or 0:.1f}), "
            f"warm cache {follow.get('warm_cache')}"
        )
        for kind in ("cold", "warm"):
            stages = follow[kind].get("stages") or {}
            if stages:
                parts = ", ".join(
                    f"{model} " + "/".join(f"{row.get(k, 0):.2f}" for k in ("queue_ms", "compute_infer_ms"))
                    for model, row in sorted(stages.items())
                )
                lines.append(f"followup_1288 {kind}: per model queue/compute ms: {parts}")
            for key, what in (
                ("preprocess_stages_ms", "preprocessing stages"),
                ("preprocess_cpu_ms", "preprocessing thread CPU"),
                ("llm_stages_ms", "llm stages"),
            ):
                by_stage = follow[kind].get(key) or {}
                if by_stage:
                    parts = ", ".join(f"{stage} {ms:.2f}" for stage, ms in by_stage.items())
                    lines.append(f"followup_1288 {kind}: {what} ms (P50): {parts}")
    picks = serve.get("choices_1288") or {}
    for mode in ("one_request", "separate"):
        run = picks.get(mode) or {}
        if run.get("requests"):
            lines.append(
                f"choices_1288 {mode}: 4 x 64 tokens, P50 first TTFT {run['first_ttft_ms']:.1f} ms, last TTFT "
                f"{run['last_ttft_ms']:.1f} ms, all done {run['all_done_ms']:.0f} ms, prompt tokens computed "
                f"{run['prompt_tokens_computed']:.0f} of 4 x {run['prompt_tokens']}"
            )
    chat = serve.get("conversation_1288") or {}
    for turn, run in chat.items():
        if isinstance(run, dict) and "ttft_ms" in run:
            lines.append(
                f"conversation {turn}: TTFT P50 {run['ttft_ms'].get('p50') or 0:.1f} ms, prompt {run.get('prompt_tokens')}, "
                f"cached {run.get('cached_tokens')}"
            )
    for size, run in (serve.get("large_images") or {}).items():
        if isinstance(run, dict) and "ttft_ms" in run:
            lines.append(
                f"large_images {size}: TTFT P50 {run['ttft_ms'].get('p50') or 0:.0f} ms (server "
                f"{(run.get('server_ttft_ms') or {}).get('p50') or 0:.0f}, send -> llm "
                f"{(run.get('pre_llm_ms') or {}).get('p50') or 0:.0f}), {run['requests']} ok, {run['errors']} errors"
            )
    for name in ("c64_1288", "c128_1288"):
        run = serve.get(name) or {}
        if "requests" in run:
            lines.append(
                f"{name}: {run['requests']} ok, {run['errors']} errors, {run['output_tok_s']:.1f} tok/s"
            )
        else:
            lines.append(f"{name}: {run.get('error') or run.get('skipped') or 'not run'}")
    return "\n".join(lines)


def _engine_side_text(run: dict) -> str:
    """ ", engine ITL P50/P99 A/B ms, path P50/P99 C/D ms": the same tokens' gaps as the engine made them
    (the llm's last_token_time_ns of each response) and each response's way from the engine to the client;
    empty when the responses carried no engine times."""
    engine_itl, path = run.get("engine_itl_ms") or {}, run.get("path_ms") or {}
    if engine_itl.get("p99") is None or path.get("p99") is None:
        return ""
    return (
        f", engine ITL P50/P99 {engine_itl['p50']:.1f}/{engine_itl['p99']:.1f} ms, "
        f"path P50/P99 {path['p50']:.1f}/{path['p99']:.1f} ms"
    )


def _thread_cpu_text(run: dict) -> str:
    """The preprocessing thread's CPU time per request, where read: well below the model's compute per
    request, the thread waited (for the GIL or a core); close to it, the host's cores are that slow."""
    cpu = (run.get("preprocess_cpu_ms") or {}).get("request")
    return "" if cpu is None else f" (thread CPU {cpu:.1f})"


def _gc_text(engine: dict | None, client_gc: dict | None = None) -> str:
    """ ", engine GC N (X ms), stub GC N (X ms), client GC N (X ms)": the full garbage collections of the
    engine's process, of the Python models' stubs and of the harness itself in a sub-phase."""
    client = ""
    if client_gc:
        client = f", client GC {client_gc['full_collections']} ({client_gc['ms']:.0f} ms)"
    if not engine or engine.get("gc_full_collections") is None:
        return client
    stubs = ""
    if engine.get("stub_gc_full_collections") is not None:
        stubs = f", stub GC {engine['stub_gc_full_collections']} ({engine['stub_gc_full_ms']:.0f} ms)"
    return f", engine GC {engine['gc_full_collections']} ({engine['gc_full_ms']:.0f} ms){stubs}{client}"


def _structured_lines(serve: dict) -> list[str]:
    def p(dist: dict) -> str:
        return "/".join(
            f"{dist.get(k):.1f}" if dist.get(k) is not None else "–" for k in ("p50", "p95", "p99")
        )

    lines = []
    run = serve.get("structured_c32")
    if run and "with_schema" in run:
        with_schema, without = run["with_schema"], run["without_schema"]
        answers = with_schema["answers"]
        verdict = "met" if run["meets_target"] else "not met"
        lines.append(
            f"structured_c32 {run['image_size']}: with a schema {with_schema['rps']:.2f} req/s, "
            f"{with_schema['output_tok_s']:.1f} tok/s; without (the same answers' lengths, mean {run['plain_tokens_per_answer']} tokens) "
            f"{without['rps']:.2f} req/s, {without['output_tok_s']:.1f} tok/s; with/without tok/s "
            f"{run['ratio']['output_tok_s']} (target >= {run['target_ratio']}: {verdict}); "
            f"{answers['valid']}/{answers['requests']} answers valid ({answers['validator']})"
        )
        lines.append(
            f"structured_c32 with/without: TTFT P50/P95/P99 {p(with_schema['ttft_ms'])} / {p(without['ttft_ms'])} ms, "
            f"ITL P50/P95/P99 {p(with_schema['itl_ms'])} / {p(without['itl_ms'])} ms, "
            f"errors {with_schema['errors']} / {without['errors']}"
        )
    elif run:
        lines.append(f"structured_c32: {run.get('error') or run.get('skipped')}")
    compiled = serve.get("grammar_compile")
    if compiled and "new_schema" in compiled:
        lines.append(
            f"grammar_compile {compiled['image_size']}: TTFT P50/P95/P99 new schema "
            f"{p(compiled['new_schema']['ttft_ms'])}, same schema {p(compiled['same_schema']['ttft_ms'])}, "
            f"no schema {p(compiled['no_schema']['ttft_ms'])} ms; compiling adds {compiled['compile_ms']} ms, a "
            f"cached schema {compiled['cached_schema_ms']} ms; the first guided request "
            f"{compiled['first_guided_ttft_ms']} ms"
        )
    elif compiled:
        lines.append(f"grammar_compile: {compiled.get('error') or compiled.get('skipped')}")
    return lines


def finalize(harness: Harness) -> None:
    doc = harness.doc
    doc["meta"]["device"] = doc["phases"].get("env", {}).get("gpu") or device_name()
    doc["comparison"] = comparisons(doc)
    harness.save()
    runs = doc["phases"].get("serve", {}).get("runs") or []
    if runs:
        sweep = {
            "meta": {
                "device": doc["meta"]["device"],
                "date": doc["meta"]["date"],
                "commit": doc["meta"]["commit"],
                "args": {
                    "target": "triton",
                    "image_size": "1288x728",
                    "max_tokens": 128,
                    "source": "gpu_harness",
                },
                "model": f"glmv-build --preset {doc['meta'].get('preset', 'dummy-full')} "
                f"(random weights, {doc['meta'].get('engine_device', 'cuda')})",
            },
            "runs": runs,
        }
        try:
            validate(sweep)
            (harness.out / "results.json").write_text(json.dumps(sweep, indent=2) + "\n")
            (harness.out / "summary.md").write_text(summary_markdown(sweep))
            from benchmarks.plots import plot_results

            plot_results(sweep, harness.out, overview_only=True)
        except Exception as exc:
            harness.log(f"finalize: sweep output failed: {exc}")
    try:
        plot_comparison(doc, harness.out / "comparison.png")
    except Exception as exc:
        harness.log(f"finalize: comparison plot failed: {exc}")
    print(table(doc), flush=True)


def install_llm_wheels(wheel_dir: Path) -> str:
    """Make xgrammar (guided decoding) and pyspng (preprocessing's PNG decoder) importable where the llm and
    preprocessing run: they import them inside Triton's Python backend stubs, which see this interpreter's
    own site-packages but not PYTHONPATH. When one is not there and ``wheel_dir`` (.whl/llm from
    benchmarks/fetch_wheels.sh) is, pip installs both from there, with what they need that is missing or too
    old. Returns what was found or done."""
    import importlib
    import site
    from importlib.metadata import version

    packages = ("xgrammar", "pyspng")

    def in_site_packages() -> bool:
        return all(
            any((Path(p) / name / "__init__.py").is_file() for p in site.getsitepackages())
            for name in packages
        )

    if in_site_packages():
        return f"xgrammar {version('xgrammar')}, pyspng {version('pyspng')} already in site-packages"
    if not wheel_dir.is_dir():
        return (
            f"xgrammar or pyspng not in site-packages and no {wheel_dir}: guided decoding cannot be measured"
        )
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheel_dir),
           "--no-compile", "--no-cache-dir", *packages]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # into the environment, not the --target
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    importlib.invalidate_caches()
    if proc.returncode != 0 or not in_site_packages():
        return f"pip install from {wheel_dir} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return f"xgrammar {version('xgrammar')}, pyspng {version('pyspng')} installed from {wheel_dir}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_harness", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_harness_out")))
    p.add_argument(
        "--budget-s", type=float, default=530.0, help="global time budget (the device call allows 600)"
    )
    p.add_argument("--commit", default=None, help="commit to record (default: git, else $GLMV_COMMIT)")
    p.add_argument("--baseline-budget-s", type=float, default=150.0)
    p.add_argument(
        "--engine-args",
        default="--max-batch-size 128",
        help="extra glmv-build flags for the dummy-full engine (default: room for 128 running sequences)",
    )
    p.add_argument("--skip", default="", help="comma list of phases to skip: roofline,baseline,build,serve")
    p.add_argument(
        "--preset",
        default="dummy-full",
        help="glmv-build preset; with --device cpu, `small` (its pixel limit resizes 1288x728 to 1176x672) "
        "measures the path around the llm (preprocessing, the ensemble, streaming) on a machine without a GPU",
    )
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument(
        "--serve-phases",
        default="",
        help="comma list of serve sub-phases to run (default: all): ttft_448, ttft_1288, decode_b1, c32_448, "
        "c32_1288, grammar_compile, structured_c32, followup_1288, choices_1288, reuse_c32_1288, conversation_1288, poisson_5, "
        "poisson_9, large_images, c16_1920, c64_1288, c128_1288",
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        default=0.0,
        help="after the sequential warm-up, this many seconds of 32 streams of new 448x448 images before the "
        "first measured sub-phase (for A/B calls whose first variant would otherwise meet a colder host)",
    )
    p.add_argument(
        "--full-streams",
        action="store_true",
        help="every streamed response carries every output, as a tritonclient user who leaves lean_stream unset "
        "gets (default: the client asks for lean streams, as glmv_client and the gateway do)",
    )
    p.add_argument(
        "--cpu-dma-latency-us",
        type=int,
        default=None,
        help="glmv-serve's --cpu-dma-latency-us for the server (the PM QoS request held while it runs; root)",
    )
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    harness = Harness(args.out, args.budget_s, args.commit)
    extra_args = shlex.split(args.engine_args)
    is_fp8 = any(a == "--dtype" and b == "fp8" for a, b in zip(extra_args, extra_args[1:], strict=False))
    harness.doc["meta"].update(
        preset=args.preset, engine_device=args.device, weights="fp8" if is_fp8 else "bf16"
    )
    # The launcher's numpy<2 stub env (numpy 2 breaks the Triton 2.51 stub) installs from this wheel,
    # carried in a subfolder so that `pip install .whl/*.whl` leaves the main environment's numpy alone.
    stub_numpy = sorted((REPO_ROOT / ".whl" / "stub").glob("numpy-1*.whl"))
    if stub_numpy and not os.environ.get("GLMV_STUB_NUMPY_WHEEL"):
        os.environ["GLMV_STUB_NUMPY_WHEEL"] = str(stub_numpy[-1])
        harness.log(f"GLMV_STUB_NUMPY_WHEEL={stub_numpy[-1]}")
    harness.doc["meta"]["llm_wheels"] = install_llm_wheels(REPO_ROOT / ".whl" / "llm")
    harness.log(f"llm wheels: {harness.doc['meta']['llm_wheels']}")
    work = Path(tempfile.mkdtemp(prefix="glmv-harness-"))
    try:
        with harness.phase("env", 0) as rec:
            if rec is not None:
                phase_env(rec)
        if "roofline" not in skip:
            with harness.phase("roofline", 30) as rec:
                if rec is not None:
                    phase_roofline(rec)
        engine_out = work / "engine"
        if "build" not in skip:
            with harness.phase("build", 60) as rec:
                if rec is not None:
                    from benchmarks.server import build_engine

                    dtype = "bfloat16" if args.device == "cuda" else "float32"
                    rec["command"] = (
                        f"glmv-build --preset {args.preset} --device {args.device} --dtype {dtype} "
                        + args.engine_args
                    )
                    build_engine(
                        args.preset,
                        engine_out,
                        device=args.device,
                        dtype=dtype,
                        timeout_s=max(90.0, harness.left() - 150),
                        extra_args=extra_args,
                    )
                    rec["output"] = str(engine_out)
        if "serve" not in skip and engine_out.exists():
            # Serving comes first; the baseline keeps what is reserved for it (it has reference values).
            harness.reserve_s = 0.0 if "baseline" in skip else args.baseline_budget_s
            with harness.phase("serve", 90) as rec:
                if rec is not None:
                    phase_serve(
                        rec,
                        harness,
                        engine_out,
                        set(filter(None, args.serve_phases.split(","))),
                        args.warmup_s,
                        args.cpu_dma_latency_us,
                        args.full_streams,
                    )
            harness.reserve_s = 0.0
        if "baseline" not in skip:
            budget = min(args.baseline_budget_s, harness.left() - 10)
            with harness.phase("baseline", 90) as rec:
                if rec is not None:
                    phase_baseline(rec, harness, budget)
    finally:
        finalize(harness)
        harness.log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
