"""What the path around the llm costs per request: ``python -m benchmarks.path_overhead --out DIR``.

Builds the `small` preset on CPU (its pixel limit resizes a 1288×728 screenshot to 1176×672: 2.4 MB of RGB
from preprocessing to the llm, where the full model keeps 1288×728, 2.8 MB), serves it with the launcher's Triton, and sends requests one at
a time through the ensemble over gRPC streaming, one output token each: text-only questions, and follow-up
questions about a screenshot the server has seen (its resized pixels and its KV blocks cached). Per kind,
over ``--requests`` requests: TTFT at the client, send → arrival at the llm (``pre_llm``), the llm's own TTFT,
each Triton model's queue / compute per execution, the preprocessing model's stages (its
`glmv_preprocess_stage_seconds`) and the llm's (`glmv_llm_request_stage_seconds`: inputs, parse, add); then requests with one and with four never-seen
1288×728 screenshots (``--cold-requests`` each: decode and hash in preprocessing). The model here is tiny, so the llm's share is small
and the rest is what Triton, the Python backend and the preprocessing model cost, which a GPU does not
change (on an H200 host the same path measured ~13.5 ms of a 24.5 ms follow-up TTFT).

Writes ``path_overhead.json`` (meta: device, date, commit, build flags) into ``--out``. ``--build-flags``
adds glmv-build flags (``--no-engine-process``: the llm's engine in the Triton model's process). Run it from each of two
trees, or with and without a flag, in turn (A B A B) to compare them on one machine; ``--compare RUN.json ...`` then draws them side by side
(``path_overhead.png`` in ``--out``, one group of bars per figure, one bar per run).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import sys
from pathlib import Path

from benchmarks.metrics import LLM_STAGES, PREPROCESS_CPU, stage_means_ms, stage_totals
from benchmarks.results import make_meta


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


async def _measure(server, requests: int, cold_requests: int, cold_seed: int) -> dict:
    from benchmarks.clients import RequestParams, make_target
    from benchmarks.corpus import Corpus, Sample
    from benchmarks.gpu_harness import model_stats, stage_breakdown

    target = make_target("triton", server.grpc_url, None, 4)
    one = RequestParams(max_tokens=1, ignore_eos=True, timeout_s=120)
    image = Corpus(sizes=[(1288, 728)], pool_size=1, seed=1000).sample(0)
    text = Sample(
        images=(),
        question="What is the capital of France? Answer briefly.",
        answer="",
        kind=image.kind,
        lang=image.lang,
        size=image.size,
    )
    for sample in (image, image, text, text):  # the screenshot seen (cold, then once warm); warm-up
        await target.send(sample, one)
    # never seen by this server or an earlier run's (the resize cache on /dev/shm outlives the server)
    fresh = Corpus(sizes=[(1288, 728)], pool_size=5 * cold_requests, seed=cold_seed)
    singles = [fresh.sample(i) for i in range(cold_requests)]
    fours = [
        dataclasses.replace(
            singles[0],
            images=tuple(fresh.sample(cold_requests + 4 * i + k).images[0] for k in range(4)),
        )
        for i in range(cold_requests)
    ]
    out = {}
    for name, samples in (
        ("text", [text] * requests),
        ("followup_1288", [image] * requests),
        ("new_1288", singles),
        ("new_4x1288", fours),
    ):
        before = model_stats(server.http_url, server.admin_headers)
        stages_before = stage_totals(server.metrics_url)
        llm_before = stage_totals(server.metrics_url, LLM_STAGES)
        cpu_before = stage_totals(server.metrics_url, PREPROCESS_CPU)
        records = [await target.send(sample, one) for sample in samples]
        after = model_stats(server.http_url, server.admin_headers)
        for _ in range(40):  # Triton counts a decoupled ensemble's execution a moment after its last response
            if after.get("ensemble", {}).get("executions", 0) - before.get("ensemble", {}).get(
                "executions", 0
            ) >= len(samples):
                break
            await asyncio.sleep(0.05)
            after = model_stats(server.http_url, server.admin_headers)
        errors = [r.error for r in records if r.error]
        out[name] = {
            "requests": len(records),
            "errors": len(errors),
            "error_messages": errors[:3],
            "ttft_ms_p50": _p50([r.ttft_s * 1e3 for r in records if r.ttft_s is not None]),
            "pre_llm_ms_p50": _p50([r.pre_llm_s * 1e3 for r in records if r.pre_llm_s is not None]),
            "server_ttft_ms_p50": _p50(
                [r.server_ttft_s * 1e3 for r in records if r.server_ttft_s is not None]
            ),
            "stages": stage_breakdown(before, after),
            "preprocess_stages_ms": stage_means_ms(stages_before, stage_totals(server.metrics_url)),
            "llm_stages_ms": stage_means_ms(llm_before, stage_totals(server.metrics_url, LLM_STAGES)),
            # the preprocessing thread's CPU time per request (beside stages' compute_infer_ms)
            "preprocess_cpu_ms": stage_means_ms(
                cpu_before, stage_totals(server.metrics_url, PREPROCESS_CPU)
            ).get("request"),
        }
    return out


FIGURES = (  # (kind, label, value of a kind's row)
    ("text", "text: TTFT", lambda r: r["ttft_ms_p50"]),
    ("text", "text: send -> llm", lambda r: r["pre_llm_ms_p50"]),
    ("followup_1288", "follow-up: TTFT", lambda r: r["ttft_ms_p50"]),
    ("followup_1288", "follow-up: send -> llm", lambda r: r["pre_llm_ms_p50"]),
    ("followup_1288", "follow-up: llm compute", lambda r: r["stages"]["llm"]["compute_infer_ms"]),
    ("followup_1288", "follow-up: preprocessing", lambda r: r["stages"]["preprocessing"]["compute_infer_ms"]),
    ("new_1288", "new screenshot: send -> llm", lambda r: r["pre_llm_ms_p50"]),
    ("new_4x1288", "4 new: send -> llm", lambda r: r["pre_llm_ms_p50"]),
)


def compare(paths: list[Path], out: Path) -> Path:
    """Bars of each run's figures (P50 ms), runs in the order given, labelled by folder and commit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.loads(p.read_text()) for p in paths]
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / len(docs)
    for i, (path, doc) in enumerate(zip(paths, docs, strict=True)):
        values = [value(doc[kind]) if kind in doc else float("nan") for kind, _, value in FIGURES]
        xs = [j + i * width for j in range(len(FIGURES))]
        ax.bar(xs, values, width, label=f"{path.parent.name} ({doc['meta']['commit']})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(FIGURES))], [label for _, label, _ in FIGURES])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("ms (P50 / mean per execution)")
    meta = docs[-1]["meta"]
    ax.set_title(f"path around the llm, one request at a time · {meta['device']} · {meta['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "path_overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=40, help="text and follow-up requests, one at a time")
    ap.add_argument(
        "--cold-requests",
        type=int,
        default=8,
        help="requests with one, and with four, never-seen screenshots",
    )
    ap.add_argument(
        "--build-flags", default="", help="more glmv-build flags for the server (e.g. --no-engine-process)"
    )
    ap.add_argument(
        "--cpu-dma-latency-us",
        type=int,
        default=None,
        help="glmv-serve's --cpu-dma-latency-us for the server (the PM QoS request held while it runs; root)",
    )
    ap.add_argument("--compare", type=Path, nargs="+", help="path_overhead.json files to draw, no run")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(args.compare, args.out))
        return 0
    from benchmarks.server import local_triton

    args.out.mkdir(parents=True, exist_ok=True)
    cold_seed = random.SystemRandom().randrange(1 << 31)
    build_flags = args.build_flags.split()
    with local_triton(
        "small", "cpu", build_args=build_flags, cpu_dma_latency_us=args.cpu_dma_latency_us
    ) as server:
        kinds = asyncio.run(_measure(server, args.requests, args.cold_requests, cold_seed))
    from build_engine.cpu_latency import idle_driver

    meta = make_meta(
        {
            "requests": args.requests,
            "cold_requests": args.cold_requests,
            "cold_seed": cold_seed,
            "cpu_dma_latency_us": args.cpu_dma_latency_us,
            "cpuidle": idle_driver(),
        },
        " ".join(["glmv-build --preset small --device cpu", *build_flags, "(random weights)"]),
    )
    doc = {"meta": meta, **kinds}
    (args.out / "path_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    for name, row in kinds.items():
        stages = ", ".join(
            f"{model} {s['compute_infer_ms']:.2f}+{s['compute_output_ms']:.2f}"
            for model, s in sorted(row["stages"].items())
        )
        pre = ", ".join(f"{stage} {ms:.3f}" for stage, ms in row["preprocess_stages_ms"].items())
        llm = ", ".join(f"{stage} {ms:.3f}" for stage, ms in row["llm_stages_ms"].items())
        print(
            f"{name}: TTFT P50 {row['ttft_ms_p50']} ms, send -> llm {row['pre_llm_ms_p50']} ms, llm TTFT "
            f"{row['server_ttft_ms_p50']} ms, errors {row['errors']}; compute+output ms per execution: {stages}; "
            f"preprocessing stages ms: {pre} (thread CPU {row['preprocess_cpu_ms']}); llm stages ms: {llm}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
