"""Scaling over the GPUs of one host, and where each request goes.

    python -m benchmarks.multi_gpu --out DIR [--gpus 2] [--concurrency-per-gpu 32] [--duration 20]
        [--workload unique|reuse] [--placement triton|gateway]

For 1 and then `--gpus` GPUs, serves the full-size dummy engine and runs one closed loop at
`concurrency-per-gpu × number of GPUs` from `--client-processes` load-generator processes:

- `--workload unique`: `--image-size` images (default 1288x728) from a pool of `--pool-size`, for
  `--duration` seconds; `reuse`: `--questions-per-image` questions (default 4) about each of `--images`
  images (default 64 per GPU), every request once (the prefix cache's workload: the hit rate is reported).
- `--placement triton`: one Triton with one llm (and vision_encoder) instance per GPU (`glmv-build --gpus`),
  driven over gRPC; Triton gives each request to whichever instance is free, whatever it has cached.
  `gateway`: one Triton per GPU (`CUDA_VISIBLE_DEVICES`), one gateway in front of all of them
  (`--triton-url a,b`: an image's requests go to one server, gateway/backends.py), driven through the
  OpenAI API; the 1-GPU run goes through the gateway too, so the ratio compares like with like.

Writes multi_gpu.json with both runs (req/s, tokens/s, TTFT, prefix-cache hit rate), how many requests each
llm finished and its mean engine TTFT and inter-token latency, Triton's per-model queue/compute means (with
`triton` placement), and the throughput ratio; prints a short table. `--preset tiny --device cpu
--placement gateway` runs the same on CPU servers (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.clients import RequestParams, make_target
from benchmarks.corpus import Corpus
from benchmarks.metrics import cache_hits, distribution_ms
from benchmarks.reuse import QuestionsPerImage
from benchmarks.run import Progress, closed_loop
from benchmarks.server import build_engine, find_model_repository, local_gateway

SERVED_MODEL = "glm-4.6v-flash"


def _corpus(workload: dict, index: int, processes: int):
    """The requests of client process ``index`` of ``processes`` (each its own images)."""
    width, height = (int(v) for v in workload["image_size"].lower().split("x"))
    workers = 4 if processes == 1 else 1  # a pool's client processes cannot start render processes
    if workload["kind"] == "unique":
        pool = max(1, workload["pool_size"] // processes)
        return Corpus(sizes=[(width, height)], pool_size=pool, seed=100 * index, workers=workers)
    images = max(1, workload["images"] // processes)
    corpus = Corpus(sizes=[(width, height)], pool_size=images, seed=2000 + 100 * index, workers=workers)
    return QuestionsPerImage(corpus, images, workload["questions_per_image"])


async def _closed_loop(
    url: str, target_kind: str, concurrency: int, workload: dict, max_tokens: int, index: int, processes: int
):
    corpus = _corpus(workload, index, processes)
    target = make_target(target_kind, url, SERVED_MODEL if target_kind == "openai" else None, concurrency)
    params = RequestParams(max_tokens=max_tokens, temperature=0.0, timeout_s=300)
    reuse = workload["kind"] == "reuse"
    try:
        if not reuse:
            for i in range(2):  # warm-up: graphs, allocator, connections
                await target.send(corpus.sample(i), params)
        duration = None if reuse else workload["duration_s"]
        progress = Progress(f"c={concurrency}", 5.0, duration or 60.0)
        reporter = asyncio.create_task(progress.report())
        started = time.perf_counter()
        records = await closed_loop(
            target, corpus, params, concurrency, duration, len(corpus) if reuse else None, progress
        )
        elapsed = time.perf_counter() - started
        reporter.cancel()
    finally:
        await target.close()
    return records, elapsed


def _client_process(args: tuple) -> tuple[list, float]:
    """One load-generator process (its own event loop and connections)."""
    return asyncio.run(_closed_loop(*args))


def _measure(
    url: str, target_kind: str, concurrency: int, workload: dict, max_tokens: int, processes: int
) -> dict:
    """Closed loop at `concurrency`, split over `processes` client processes (one Python event loop
    parsing every streamed response can itself become the limit at thousands of responses/s)."""
    if processes <= 1:
        records, elapsed = asyncio.run(
            _closed_loop(url, target_kind, concurrency, workload, max_tokens, 0, 1)
        )
    else:
        import multiprocessing as mp

        shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
        jobs = [(url, target_kind, c, workload, max_tokens, i, processes) for i, c in enumerate(shares) if c]
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            parts = pool.map(_client_process, jobs)
        records = [r for part, _ in parts for r in part]
        elapsed = max(e for _, e in parts)
    ok = [r for r in records if r.error is None]
    tokens = sum(r.num_output_tokens or 0 for r in ok)
    return {
        "concurrency": concurrency,
        "client_processes": processes,
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "seconds": round(elapsed, 2),
        "rps": round(len(ok) / elapsed, 3),
        "output_tok_s": round(tokens / elapsed, 1),
        "ttft_ms": distribution_ms(r.ttft_s for r in ok if r.ttft_s is not None),
        **cache_hits(ok),
        "error_messages": sorted({r.error for r in records if r.error})[:3],
    }


def llm_instance_counters(metrics_url: str) -> dict[str, dict[str, float]]:
    """The llm instances' counters now (see `instance_counters`), scraped from Triton's metrics port."""
    import urllib.request

    base = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}"
    if not base.rstrip("/").endswith("/metrics"):
        base = base.rstrip("/") + "/metrics"
    with urllib.request.urlopen(base, timeout=10) as resp:
        return instance_counters(resp.read().decode())


_COUNTERS = {
    "glmv_requests_finished_total": "finished",
    "glmv_inter_token_latency_seconds_sum": "itl_s",
    "glmv_inter_token_latency_seconds_count": "itl_n",
    "glmv_time_to_first_token_seconds_sum": "ttft_s",
    "glmv_time_to_first_token_seconds_count": "ttft_n",
}


def instance_counters(body: str) -> dict[str, dict[str, float]]:
    """Per model_instance, from a Prometheus text body: requests finished (all reasons), and the sums and
    counts of the engine's inter-token-latency and time-to-first-token histograms."""

    out: dict[str, dict[str, float]] = {}
    pattern = r"^(glmv_\w+)\{([^}]*)\} (\S+)$"
    for name, labels, value in re.findall(pattern, body, re.MULTILINE):
        key = _COUNTERS.get(name)
        found = re.search(r'model_instance="([^"]+)"', labels)
        if key and found:
            counters = out.setdefault(found.group(1), dict.fromkeys(_COUNTERS.values(), 0.0))
            counters[key] += float(value)
    return out


def per_instance_summary(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """What each llm instance did between two scrapes: requests finished, mean inter-token latency and mean
    engine TTFT (arrival at the engine to first token), in ms. Slower steps on every instance with more
    GPUs point at something the engines share (host CPU, the server process), not at the balancing."""
    summary = {}
    for name, end in sorted(after.items()):
        start = before.get(name, {})
        delta = {k: v - start.get(k, 0.0) for k, v in end.items()}
        summary[name] = {
            "requests": delta["finished"],
            "mean_itl_ms": round(1000 * delta["itl_s"] / delta["itl_n"], 3) if delta["itl_n"] else None,
            "mean_engine_ttft_ms": round(1000 * delta["ttft_s"] / delta["ttft_n"], 3)
            if delta["ttft_n"]
            else None,
        }
    return summary


def _engine(args: argparse.Namespace, work: Path, gpus: str) -> Path:
    extra = ["--max-batch-size", str(max(64, args.concurrency_per_gpu * 2))]
    if args.device == "cuda":
        extra += ["--gpus", gpus]
    out = work / f"engine-gpus-{gpus.replace(',', '_')}"
    if out.is_dir():  # built for an earlier run of this call
        return find_model_repository(out)
    out = build_engine(
        args.preset,
        out,
        device=args.device,
        dtype="bfloat16" if args.device == "cuda" else None,
        extra_args=extra,
    )
    return find_model_repository(out)


def _serve_and_measure(
    gpus: str, work: Path, args: argparse.Namespace, concurrency: int, workloads: list[dict]
) -> list[dict]:
    """``triton`` placement: one server, one llm instance per GPU of ``gpus``; one run per workload."""
    from build_engine.launcher import TritonServer

    repo = _engine(args, work, gpus)
    target_kind = "triton"
    try:
        import tritonclient.grpc.aio  # noqa: F401
    except ImportError:
        target_kind = "triton-http"
    server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, startup_timeout_s=300)
    from benchmarks.gpu_harness import model_stats, stage_breakdown

    results = []
    with server:
        url = server.grpc_url if target_kind == "triton" else server.http_url
        for workload in workloads:
            before = model_stats(server.http_url, server.admin_headers)
            counters_before = llm_instance_counters(server.metrics_url)
            result = _measure(url, target_kind, concurrency, workload, args.max_tokens, args.client_processes)
            result["stages"] = stage_breakdown(before, model_stats(server.http_url, server.admin_headers))
            instances = per_instance_summary(counters_before, llm_instance_counters(server.metrics_url))
            result["llm_instances"] = instances
            result["requests_per_llm_instance"] = {k: v["requests"] for k, v in instances.items()}
            result.update({"gpus": gpus, "target": target_kind, "placement": "triton", "workload": workload})
            results.append(result)
    return results


def _serve_behind_gateway(
    num_gpus: int, work: Path, args: argparse.Namespace, concurrency: int, workloads: list[dict]
) -> list[dict]:
    """``gateway`` placement: one server per GPU (the same engine, ``CUDA_VISIBLE_DEVICES``), one gateway
    with all of them, driven through the OpenAI API; one run per workload."""
    from build_engine.launcher import TritonServer

    repo = _engine(args, work, "0")
    with ExitStack() as stack:
        servers = []
        for i in range(num_gpus):
            env = {"CUDA_VISIBLE_DEVICES": str(i)} if args.device == "cuda" else {}
            server = TritonServer(
                repo, http_port=0, grpc_port=0, metrics_port=0, startup_timeout_s=300, env=env,
                log_file=work / f"triton-{num_gpus}-{i}.log",
            )  # fmt: skip
            servers.append(stack.enter_context(server))
        url, _ = stack.enter_context(
            local_gateway(
                [s.grpc_url for s in servers],
                work / f"gateway-{num_gpus}.log",
                ["--cache-size", "0", "--max-body-bytes", str(64 << 20), "--max-image-bytes", str(32 << 20)],
                ready_path="/readyz",
            )
        )
        results = []
        gpus = ",".join(str(i) for i in range(num_gpus))
        for workload in workloads:
            counters_before = [llm_instance_counters(s.metrics_url) for s in servers]
            result = _measure(url, "openai", concurrency, workload, args.max_tokens, args.client_processes)
            instances = {}
            for i, (server, before) in enumerate(zip(servers, counters_before, strict=True)):
                for name, inst in per_instance_summary(
                    before, llm_instance_counters(server.metrics_url)
                ).items():
                    instances[f"server{i}/{name}"] = inst
            result["llm_instances"] = instances
            result["requests_per_llm_instance"] = {k: v["requests"] for k, v in instances.items()}
            result.update({"gpus": gpus, "target": "openai", "placement": "gateway", "workload": workload})
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--concurrency-per-gpu", type=int, default=32)
    ap.add_argument(
        "--workload", default="unique", help="unique, reuse, or unique,reuse (both on the same servers)"
    )
    ap.add_argument("--placement", choices=("triton", "gateway"), default="triton")
    ap.add_argument("--image-size", default="1288x728")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of each unique-image run")
    ap.add_argument(
        "--pool-size", type=int, default=256, help="distinct images per GPU of a unique-image run"
    )
    ap.add_argument("--images", type=int, default=64, help="reuse: images per GPU")
    ap.add_argument("--questions-per-image", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load-generator processes sharing the concurrency (one event loop may be the limit)",
    )
    ap.add_argument(
        "--preset", default="dummy-full", help="glmv-build preset (tiny: a CPU check of the script)"
    )
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a check of the script")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.workload.split(",") if k.strip()]
    if not kinds or any(k not in ("unique", "reuse") for k in kinds):
        ap.error(f"--workload: {args.workload!r} must be unique, reuse or unique,reuse")
    if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", args.image_size):
        ap.error(f"--image-size: {args.image_size!r} must be WIDTHxHEIGHT, e.g. 1288x728")
    if args.device != "cuda" and args.placement == "triton" and args.gpus > 1:
        ap.error("--placement triton spreads llm instances over GPUs: it needs --device cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    doc: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "num_visible_gpus": torch.cuda.device_count(),
        "args": vars(args) | {"out": str(args.out)},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="glmv-multi-gpu-") as tmp:
        for n in (1, args.gpus):
            workloads = [
                {
                    "kind": kind,
                    "image_size": args.image_size,
                    "duration_s": args.duration,
                    "pool_size": args.pool_size * n,
                    "images": args.images * n,
                    "questions_per_image": args.questions_per_image,
                }
                for kind in kinds
            ]
            concurrency = args.concurrency_per_gpu * n
            gpus = ",".join(str(i) for i in range(n))
            try:
                if args.placement == "gateway":
                    doc["runs"] += _serve_behind_gateway(n, Path(tmp), args, concurrency, workloads)
                else:
                    doc["runs"] += _serve_and_measure(gpus, Path(tmp), args, concurrency, workloads)
            except Exception as exc:  # keep the other runs' numbers
                doc["runs"].append({"gpus": gpus, "error": f"{type(exc).__name__}: {exc}"[-3000:]})
            (args.out / "multi_gpu.json").write_text(json.dumps(doc, indent=2))
    doc["scaling"] = {}
    for kind in kinds:
        pair = [r for r in doc["runs"] if r.get("workload", {}).get("kind") == kind and "output_tok_s" in r]
        if len(pair) == 2:
            doc["scaling"][kind] = {
                "tok_s": round(pair[1]["output_tok_s"] / pair[0]["output_tok_s"], 3),
                "rps": round(pair[1]["rps"] / pair[0]["rps"], 3),
            }
    (args.out / "multi_gpu.json").write_text(json.dumps(doc, indent=2))
    runs = doc["runs"]
    print(
        f"{'gpus':>6} {'workload':>8} {'conc':>5} {'req/s':>8} {'tok/s':>9} {'hit':>6} {'errors':>6}  ({args.placement})"
    )
    for r in runs:
        print(
            f"{r['gpus']:>6} {r.get('workload', {}).get('kind', '-'):>8} {r.get('concurrency', '-'):>5} "
            f"{r.get('rps', '-'):>8} {r.get('output_tok_s', '-'):>9} {r.get('cache_hit_rate', '-')!s:>6} "
            f"{r.get('errors', r.get('error', '')[:60])!s:>6}"
        )
    for r in runs:
        for name, inst in r.get("llm_instances", {}).items():
            print(f"  gpus {r['gpus']} {r.get('workload', {}).get('kind', '')}: {name} {inst}")
    print("scaling:", doc["scaling"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
