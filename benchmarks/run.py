"""Benchmark runner: closed-loop concurrency sweeps and open-loop Poisson arrivals against a live server.

    python -m benchmarks.run --target triton --url localhost:8001 --concurrency 1,4,8,16,32,64,128 \\
        --duration 30 --image-size 1288x728 --max-tokens 128 --out benchmarks/results
    python -m benchmarks.run --target openai --url localhost:8080 --rate 1,2,5 --duration 60
    python -m benchmarks.run --smoke        # tiny model on CPU: build, serve, run, check the JSON

* **Closed loop** (``--concurrency``): N workers, each sending its next request when the previous one
  ends, until ``--duration`` seconds have passed (or ``--num-requests`` were sent); requests in flight at the
  deadline are finished and counted; req/s and tok/s divide by the wall time including that drain.
* **Open loop** (``--rate``): Poisson arrivals (exponential gaps, seeded) at the offered rate for
  ``--duration`` seconds, however long requests take.

Per request it records TTFT, inter-token latencies, e2e latency, output tokens and errors
(see benchmarks.metrics); GPU memory is sampled with nvidia-smi when present. It writes
``<out>/<YYYY-MM-DD>-<device>-<shortcommit>/results.json`` (after every level, so an interrupted sweep
keeps what it measured), then ``summary.md`` and the plots of benchmarks.plots. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.clients import RequestParams, make_target
from benchmarks.corpus import KINDS, LANGS, Corpus, font_note, parse_size
from benchmarks.metrics import RequestRecord, summarize
from benchmarks.results import GpuMemorySampler, make_meta, results_dir, summary_markdown, validate

DEFAULT_URLS = {
    "triton": "localhost:8001",
    "openai": "http://localhost:8080",
    "triton-http": "localhost:8000",
}
SMOKE_DEFAULTS = {
    "concurrency": "1,2",
    "num_requests": 3,
    "duration": 120.0,
    "max_tokens": 4,
    "image_size": "224x224",
    "warmup": 1,
    "timeout": 120.0,
}


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,4,8")
    return values


def _float_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers, e.g. 0.5,1,2")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--target",
        choices=sorted(DEFAULT_URLS),
        default="triton",
        help="triton (gRPC), openai (gateway SSE), triton-http",
    )
    p.add_argument(
        "--url",
        default=None,
        help="server address (default per target: triton localhost:8001, openai http://localhost:8080)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="Triton model name (default ensemble) / OpenAI model (default: first of /v1/models)",
    )
    p.add_argument(
        "--model-label",
        default=None,
        help="what meta.model names (default GLM-4.6V-Flash; 'tiny' with --smoke)",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", default=None, help="closed loop: comma list (default 1,4,8,16,32,64,128)"
    )
    load.add_argument(
        "--rate", default=None, help="open loop: Poisson arrival rates in requests/s, comma list"
    )
    p.add_argument("--duration", type=float, default=None, help="seconds per level (default 30)")
    p.add_argument("--num-requests", type=int, default=None, help="at most this many requests per level")
    p.add_argument("--image-size", default=None, help="WIDTHxHEIGHT, comma list to mix (default 1288x728)")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"image kinds, comma list of {KINDS}")
    p.add_argument("--langs", default=",".join(LANGS), help="question languages, comma list of en,zh")
    p.add_argument("--pool-size", type=int, default=24, help="distinct samples rendered up front")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 128)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let answers end at EOS (default: min_tokens = max_tokens, so every answer has max_tokens tokens)",
    )
    p.add_argument("--enable-thinking", action="store_true")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="requests sent (one at a time) before the first level (default 2)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds before a request counts as failed")
    p.add_argument(
        "--out",
        default=None,
        help="results base directory (default benchmarks/results; a temp dir with --smoke)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--progress-interval", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model on CPU: build + serve it (unless --url), run 1,2, check the JSON",
    )
    return p


class Progress:
    """Counts requests of the current level and prints a line every ``interval`` seconds."""

    def __init__(self, label: str, interval: float, expected_s: float | None) -> None:
        self.label, self.interval, self.expected_s = label, interval, expected_s
        self.started = time.perf_counter()
        self.num_ok = self.num_errors = self.num_inflight = self.num_tokens = 0

    def begin(self) -> None:
        self.num_inflight += 1

    def end(self, record: RequestRecord) -> None:
        self.num_inflight -= 1
        if record.is_ok:
            self.num_ok += 1
            self.num_tokens += record.num_output_tokens
        else:
            self.num_errors += 1

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        of = f"/{self.expected_s:.0f}" if self.expected_s else ""
        return (
            f"[{self.label}] {elapsed:6.1f}{of} s  done {self.num_ok:5d}  errors {self.num_errors:3d}  "
            f"in flight {self.num_inflight:4d}  {self.num_ok / max(elapsed, 1e-9):7.2f} req/s  "
            f"{self.num_tokens / max(elapsed, 1e-9):8.1f} tok/s"
        )

    async def report(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            print(self.line(), file=sys.stderr, flush=True)


async def _timed(
    target, corpus: Corpus, index: int, params: RequestParams | list[RequestParams], progress: Progress
) -> RequestRecord:
    """One request, timed; ``params`` is the same for every request, or a list: request ``index`` takes
    ``params[index % len(params)]``."""
    if isinstance(params, list):
        params = params[index % len(params)]
    progress.begin()
    record = await target.send(corpus.sample(index), params)
    progress.end(record)
    return record


async def closed_loop(
    target, corpus, params, concurrency, duration, num_requests, progress
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    counter = itertools.count()
    deadline = time.perf_counter() + duration if duration else math.inf

    async def worker() -> None:
        while True:
            index = next(counter)
            if (num_requests is not None and index >= num_requests) or time.perf_counter() >= deadline:
                return
            records.append(await _timed(target, corpus, index, params, progress))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def timed_closed_loop(
    target, corpus, params, concurrency: int, num_requests: int, duration_s: float, label: str = ""
) -> tuple[list[RequestRecord], float]:
    """`closed_loop` with its progress reported every 5 s (as ``c=<concurrency> <label>``): (records, wall s)."""
    progress = Progress(f"c={concurrency} {label}".rstrip(), 5.0, duration_s)
    reporter = asyncio.create_task(progress.report())
    started = time.perf_counter()
    try:
        records = await closed_loop(target, corpus, params, concurrency, duration_s, num_requests, progress)
    finally:
        reporter.cancel()
    return records, time.perf_counter() - started


async def open_loop(
    target, corpus, params, rate, duration, num_requests, seed, progress
) -> list[RequestRecord]:
    rng = random.Random(seed)
    start = time.perf_counter()
    arrival, tasks = start, []
    for index in itertools.count():
        if num_requests is not None and index >= num_requests:
            break
        arrival += rng.expovariate(rate)
        if duration and arrival - start >= duration:
            break
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        tasks.append(asyncio.create_task(_timed(target, corpus, index, params, progress)))
    return list(await asyncio.gather(*tasks))


async def run_level(
    target, corpus, params, args, *, concurrency=None, rate=None, index_offset=0
) -> tuple[list, float]:
    label = f"c={concurrency}" if concurrency else f"rate={rate}/s"
    progress = Progress(label, args.progress_interval, args.duration)
    reporter = asyncio.create_task(progress.report())
    started = time.perf_counter()
    try:
        if concurrency:
            records = await closed_loop(
                target, corpus, params, concurrency, args.duration, args.num_requests, progress
            )
        else:
            records = await open_loop(
                target, corpus, params, rate, args.duration, args.num_requests, args.seed, progress
            )
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    wall = time.perf_counter() - started
    print(progress.line() + "  (level done)", file=sys.stderr, flush=True)
    return records, wall


def _resolve_defaults(args: argparse.Namespace) -> None:
    if args.smoke:
        for key, value in SMOKE_DEFAULTS.items():
            if getattr(args, key) is None and not (key == "concurrency" and args.rate):
                setattr(args, key, value)
        args.model_label = args.model_label or "tiny (glmv-build --preset tiny, CPU)"
    args.duration = 30.0 if args.duration is None else args.duration
    args.image_size = args.image_size or "1288x728"
    args.max_tokens = 128 if args.max_tokens is None else args.max_tokens
    args.warmup = 2 if args.warmup is None else args.warmup
    args.timeout = 600.0 if args.timeout is None else args.timeout
    args.model_label = args.model_label or "GLM-4.6V-Flash"
    if not args.rate and not args.concurrency:
        args.concurrency = "1,4,8,16,32,64,128"


async def sweep(args: argparse.Namespace, url: str, out_base: Path) -> tuple[dict, Path]:
    """Runs every level against ``url``; returns (results document, its directory)."""
    sizes = [parse_size(s) for s in args.image_size.split(",")]
    levels = [("concurrency", c) for c in _int_list(args.concurrency)] if args.concurrency else []
    levels += [("rate", r) for r in _float_list(args.rate)] if args.rate else []
    max_inflight = max((v for k, v in levels if k == "concurrency"), default=64)
    print(f"rendering {args.pool_size} samples ({args.image_size}) ...", file=sys.stderr, flush=True)
    corpus = Corpus(
        sizes=sizes,
        kinds=args.kinds.split(","),
        langs=args.langs.split(","),
        num_images=args.images_per_request,
        pool_size=args.pool_size,
        seed=args.seed,
    )
    params = RequestParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        enable_thinking=args.enable_thinking,
        timeout_s=args.timeout,
    )
    target = make_target(args.target, url, args.model, max_inflight)
    run_args = {k: v for k, v in vars(args).items() if k not in ("out",)}
    run_args["url"] = url
    meta = make_meta(
        run_args,
        {"name": args.model_label, "triton_model": args.model or "ensemble"}
        if args.target != "openai"
        else args.model_label,
        corpus={"num_samples": len(corpus), "note": font_note()},
    )
    out_dir = results_dir(out_base, meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "runs": []}
    try:
        if args.warmup:
            print(f"warm-up: {args.warmup} request(s)", file=sys.stderr, flush=True)
            for i in range(args.warmup):
                record = await target.send(corpus.sample(i), params)
                if not record.is_ok:
                    print(f"warm-up request failed: {record.error}", file=sys.stderr, flush=True)
        with GpuMemorySampler() as gpu_mem:
            for key, value in levels:
                gpu_mem.take_peak()
                records, wall = await run_level(target, corpus, params, args, **{key: value})
                run = {key: value, **summarize(records, wall), "gpu_mem_gb": gpu_mem.take_peak()}
                doc["runs"].append(run)
                (out_dir / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    finally:
        await target.close()
    return doc, out_dir


def finish(doc: dict, out_dir: Path, plots: bool) -> None:
    validate(doc)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    summary = summary_markdown(doc)
    (out_dir / "summary.md").write_text(summary)
    if plots:
        from benchmarks.plots import plot_results

        plot_results(doc, out_dir)
    print(summary)
    print(f"results: {out_dir / 'results.json'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve_defaults(args)
    with contextlib.ExitStack() as stack:
        if args.out:
            out_base = Path(args.out)
        elif args.smoke:  # kept for inspection (the path is printed), never inside the repository
            out_base = Path(tempfile.mkdtemp(prefix="glmv-smoke-"))
        else:
            out_base = Path("benchmarks/results")
        url, server_log = args.url, None
        if url is None and args.smoke:
            from benchmarks.server import local_triton

            out_base.mkdir(parents=True, exist_ok=True)
            server_log = out_base / "triton.log"
            server = stack.enter_context(local_triton("tiny", device="cpu", log_file=server_log))
            url = server.grpc_url if args.target == "triton" else server.http_url
        url = url or DEFAULT_URLS[args.target]
        doc, out_dir = asyncio.run(sweep(args, url, out_base))
    finish(doc, out_dir, plots=not args.no_plots)
    if args.smoke:
        problems = [
            f"{k}={r.get(k)}: {r['errors']} errors, {r['requests']} ok"
            for r in doc["runs"]
            for k in ("concurrency", "rate")
            if k in r and (r["errors"] or not r["requests"])
        ]
        if problems:
            print("smoke: FAILED — " + "; ".join(problems), file=sys.stderr)
            if server_log is not None:
                print(f"server log: {server_log}", file=sys.stderr)
            return 1
        print("smoke: OK (schema valid, no errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
