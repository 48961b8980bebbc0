"""Scaling over the GPUs of one host: one engine per GPU (`glmv-build --gpus`), Triton balancing requests.

    python -m benchmarks.multi_gpu --out DIR [--gpus 2] [--concurrency-per-gpu 32] [--duration 20]

Builds the full-size dummy engine twice — on GPU 0 alone, then with one llm (and one vision_encoder)
instance on each of the first `--gpus` GPUs — serves each with Triton, and runs the same closed loop
(448×448 images, `--max-tokens` out) at `concurrency-per-gpu × number of GPUs`, from
`--client-processes` load-generator processes. Writes multi_gpu.json with
both runs, Triton's per-model queue/compute means of each run (where a shared CPU stage saturates), how many
requests each llm instance finished (how evenly Triton split them), and the throughput ratio, and prints a
short table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.clients import RequestParams, make_target
from benchmarks.corpus import Corpus
from benchmarks.metrics import distribution_ms
from benchmarks.run import Progress, closed_loop
from benchmarks.server import build_engine, find_model_repository


async def _closed_loop(
    url: str, target_kind: str, concurrency: int, duration_s: float, max_tokens: int, seed: int
):
    corpus = Corpus(sizes=[(448, 448)], pool_size=12, seed=seed)
    target = make_target(target_kind, url, None, concurrency)
    params = RequestParams(max_tokens=max_tokens, temperature=0.0, timeout_s=300)
    try:
        for i in range(2):  # warm-up: graphs, allocator, connections
            await target.send(corpus.sample(i), params)
        progress = Progress(f"c={concurrency}", 5.0, duration_s)
        reporter = asyncio.create_task(progress.report())
        started = time.perf_counter()
        records = await closed_loop(target, corpus, params, concurrency, duration_s, None, progress)
        elapsed = time.perf_counter() - started
        reporter.cancel()
    finally:
        await target.close()
    return records, elapsed


def _client_process(args: tuple) -> tuple[list, float]:
    """One load-generator process (its own event loop and gRPC channels)."""
    return asyncio.run(_closed_loop(*args))


def _measure(
    url: str, target_kind: str, concurrency: int, duration_s: float, max_tokens: int, processes: int
) -> dict:
    """Closed loop at `concurrency`, split over `processes` client processes (one Python event loop
    parsing every streamed response can itself become the limit at thousands of responses/s)."""
    if processes <= 1:
        records, elapsed = asyncio.run(_closed_loop(url, target_kind, concurrency, duration_s, max_tokens, 0))
    else:
        import multiprocessing as mp

        shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
        jobs = [(url, target_kind, c, duration_s, max_tokens, i) for i, c in enumerate(shares) if c]
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
    import re

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


def _serve_and_measure(gpus: str, work: Path, args: argparse.Namespace, concurrency: int) -> dict:
    from build_engine.launcher import TritonServer

    extra = ["--max-batch-size", str(max(64, args.concurrency_per_gpu * 2))]
    if args.device == "cuda":
        extra += ["--gpus", gpus]
    out = build_engine(
        args.preset,
        work / f"engine-gpus-{gpus.replace(',', '_')}",
        device=args.device,
        dtype="bfloat16" if args.device == "cuda" else None,
        extra_args=extra,
    )
    target_kind = "triton"
    try:
        import tritonclient.grpc.aio  # noqa: F401
    except ImportError:
        target_kind = "triton-http"
    server = TritonServer(
        find_model_repository(out), http_port=0, grpc_port=0, metrics_port=0, startup_timeout_s=300
    )
    from benchmarks.gpu_harness import model_stats, stage_breakdown

    with server:
        url = server.grpc_url if target_kind == "triton" else server.http_url
        before = model_stats(server.http_url, server.admin_headers)
        counters_before = llm_instance_counters(server.metrics_url)
        result = _measure(
            url, target_kind, concurrency, args.duration, args.max_tokens, args.client_processes
        )
        result["stages"] = stage_breakdown(before, model_stats(server.http_url, server.admin_headers))
        instances = per_instance_summary(counters_before, llm_instance_counters(server.metrics_url))
        result["llm_instances"] = instances
        result["requests_per_llm_instance"] = {k: v["requests"] for k, v in instances.items()}
    result.update({"gpus": gpus, "target": target_kind})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--concurrency-per-gpu", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0)
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
            gpus = ",".join(str(i) for i in range(n))
            try:
                doc["runs"].append(_serve_and_measure(gpus, Path(tmp), args, args.concurrency_per_gpu * n))
            except Exception as exc:  # keep the other run's numbers
                doc["runs"].append({"gpus": gpus, "error": f"{type(exc).__name__}: {exc}"[-3000:]})
            (args.out / "multi_gpu.json").write_text(json.dumps(doc, indent=2))
    runs = doc["runs"]
    if len(runs) == 2 and all("output_tok_s" in r for r in runs):
        doc["scaling_tok_s"] = round(runs[1]["output_tok_s"] / runs[0]["output_tok_s"], 3)
        doc["scaling_rps"] = round(runs[1]["rps"] / runs[0]["rps"], 3)
    (args.out / "multi_gpu.json").write_text(json.dumps(doc, indent=2))
    print(f"{'gpus':>6} {'conc':>5} {'req/s':>8} {'tok/s':>9} {'errors':>6}")
    for r in runs:
        print(
            f"{r['gpus']:>6} {r.get('concurrency', '-'):>5} {r.get('rps', '-'):>8} {r.get('output_tok_s', '-'):>9} {r.get('errors', r.get('error', '')[:60])!s:>6}"
        )
    for r in runs:
        for name, inst in r.get("llm_instances", {}).items():
            print(f"  gpus {r['gpus']}: {name} {inst}")
    print("scaling (tok/s):", doc.get("scaling_tok_s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
