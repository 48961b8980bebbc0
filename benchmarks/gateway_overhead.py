"""What the gateway itself costs per streamed token: ``python -m benchmarks.gateway_overhead --out DIR``.

Serves the echo ensemble of the client tests (`tests/client/fixture_repo`: every word of the question comes
back as one streamed response, no model) with the launcher's Triton, starts ``python -m gateway`` in front
of it, and streams `--requests` chat completions of `--words` words each at `--concurrency` through the
OpenAI API (httpx, SSE). Reports the gateway process's CPU time (user + system) per streamed chunk and the
chunks per second, for `--repeats` runs after one warm-up run. With no model in the way, the gateway (and
glmv_client inside it) is what these figures measure; the chunks/s also depends on the client and Triton
sharing the machine's cores, the CPU time per chunk much less.

Writes ``gateway_overhead.json`` (meta: device, date, commit) and ``gateway_overhead.png`` into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from benchmarks.results import REPO_ROOT, cpu_seconds, make_meta
from benchmarks.server import local_gateway

ECHO_REPO = REPO_ROOT / "tests" / "client" / "fixture_repo"
SERVED_MODEL = "glm-4.6v-flash"


async def _stream_all(url: str, words: int, requests: int, concurrency: int) -> tuple[int, float]:
    """(chunks received, seconds) for ``requests`` streamed answers, ``concurrency`` at a time."""
    body = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(words))}],
        "max_tokens": words + 16,
        "stream": True,
        "temperature": 0,
    }
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient) -> int:
        chunks = 0
        async with gate, client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
        return chunks

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(client) for _ in range(requests)))
        return sum(counts), time.perf_counter() - started


def measure(args: argparse.Namespace) -> dict:
    from build_engine.launcher import TritonServer

    runs = []
    with (
        TritonServer(ECHO_REPO, http_port=0, grpc_port=0, metrics_port=0) as triton,
        local_gateway([triton.grpc_url], args.out / "gateway.log", ["--cache-size", "0"]) as (url, gateway),
    ):
        asyncio.run(_stream_all(url, args.words, args.concurrency, args.concurrency))  # warm-up
        for _ in range(args.repeats):
            before = cpu_seconds(gateway.pid)
            chunks, seconds = asyncio.run(_stream_all(url, args.words, args.requests, args.concurrency))
            cpu = cpu_seconds(gateway.pid) - before
            runs.append(
                {
                    "chunks": chunks,
                    "seconds": round(seconds, 3),
                    "chunks_per_s": round(chunks / seconds, 1),
                    "gateway_cpu_s": round(cpu, 3),
                    "gateway_cpu_us_per_chunk": round(1e6 * cpu / chunks, 1),
                }
            )
            print(
                f"{chunks} chunks in {seconds:.2f} s: {chunks / seconds:.0f}/s, "
                f"gateway CPU {1e6 * cpu / chunks:.0f} us per chunk"
            )
    per_chunk = [r["gateway_cpu_us_per_chunk"] for r in runs]
    return {
        "meta": make_meta(vars(args) | {"out": str(args.out)}, "echo ensemble (tests/client/fixture_repo)"),
        "runs": runs,
        "gateway_cpu_us_per_chunk_median": statistics.median(per_chunk),
        "chunks_per_s_median": statistics.median(r["chunks_per_s"] for r in runs),
    }


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    values = [r["gateway_cpu_us_per_chunk"] for r in doc["runs"]]
    ax.bar(range(1, len(values) + 1), values, color="#4477aa")
    ax.set_xlabel("run")
    ax.set_ylabel("gateway CPU per chunk (us)")
    meta = doc["meta"]
    ax.set_title(f"gateway overhead, {meta['device']}, {meta['commit']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--words", type=int, default=400, help="streamed responses per answer")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    for name in ("words", "requests", "concurrency", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = measure(args)
    (args.out / "gateway_overhead.json").write_text(json.dumps(doc, indent=2))
    plot(doc, args.out / "gateway_overhead.png")
    print(
        f"median: {doc['gateway_cpu_us_per_chunk_median']} us of gateway CPU per chunk, "
        f"{doc['chunks_per_s_median']} chunks/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
