"""Plots of a results.json (matplotlib, Agg backend; no display needed).

``plot_results(doc, out_dir)`` writes, for the closed-loop runs (x = concurrency) and the open-loop runs
(x = offered rate, files prefixed ``rate_``):

* ``ttft.png`` — TTFT P50/P95/P99;   * ``itl.png`` — inter-token latency P50/P95/P99;
* ``throughput.png`` — requests/s and output tokens/s;   * ``gpu_mem.png`` — peak GPU memory (if sampled);
* ``overview.png`` — all of the above in one figure, titled with device, date and commit.

``python -m benchmarks.plots results.json`` redraws them next to the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_PCTS = (("p50", "-o"), ("p95", "--s"), ("p99", ":^"))


def _series(runs: list[dict], key: str) -> list[dict]:
    return sorted((r for r in runs if key in r), key=lambda r: r[key])


def _title(doc: dict) -> str:
    meta = doc["meta"]
    args = meta.get("args", {})
    return (
        f"{args.get('target', '')} · {args.get('image_size', '')} · max_tokens {args.get('max_tokens', '')}\n"
        f"{meta['device']} · {meta['date']} · {meta['commit']}"
    )


def _latency(ax, runs, xkey, metric, label):
    x = [r[xkey] for r in runs]
    drawn = False
    for p, style in _PCTS:
        y = [r[metric].get(p) for r in runs]
        if any(v is not None for v in y):
            ax.plot(x, [float("nan") if v is None else v for v in y], style, label=p.upper())
            drawn = True
    ax.set_ylabel(f"{label} (ms)")
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)


def _throughput(ax, runs, xkey):
    x = [r[xkey] for r in runs]
    ax.plot(x, [r["rps"] for r in runs], "-o", color="tab:blue", label="requests/s")
    ax.set_ylabel("requests/s", color="tab:blue")
    twin = ax.twinx()
    twin.plot(x, [r["output_tok_s"] for r in runs], "--s", color="tab:orange", label="output tok/s")
    twin.set_ylabel("output tokens/s", color="tab:orange")
    ax.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)


def _gpu_mem(ax, runs, xkey):
    pts = [(r[xkey], r["gpu_mem_gb"]) for r in runs if r.get("gpu_mem_gb") is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), "-o", color="tab:green")
    else:
        ax.text(0.5, 0.5, "no GPU (nvidia-smi absent)", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("peak GPU memory (GiB)")


def _panels(xkey: str):
    return [
        ("ttft", lambda ax, runs: _latency(ax, runs, xkey, "ttft_ms", "TTFT")),
        ("itl", lambda ax, runs: _latency(ax, runs, xkey, "itl_ms", "inter-token latency")),
        ("throughput", lambda ax, runs: _throughput(ax, runs, xkey)),
        ("gpu_mem", lambda ax, runs: _gpu_mem(ax, runs, xkey)),
    ]


def _style_x(ax, xkey: str, runs: list[dict]) -> None:
    if (
        xkey == "concurrency"
        and len(runs) > 1
        and max(r[xkey] for r in runs) / min(r[xkey] for r in runs) >= 8
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks([r[xkey] for r in runs], [str(r[xkey]) for r in runs])
    ax.set_xlabel("concurrent requests" if xkey == "concurrency" else "offered rate (requests/s, Poisson)")
    ax.grid(True, alpha=0.3)


def plot_results(doc: dict, out_dir: str | Path, overview_only: bool = False) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for xkey, prefix in (("concurrency", ""), ("rate", "rate_")):
        runs = _series(doc["runs"], xkey)
        if not runs:
            continue
        panels = _panels(xkey)
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        for ax, (_, draw) in zip(axes.flat, panels, strict=True):
            draw(ax, runs)
            _style_x(ax, xkey, runs)
        fig.suptitle(_title(doc), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{prefix}overview.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        for name, draw in [] if overview_only else panels:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            draw(ax, runs)
            _style_x(ax, xkey, runs)
            ax.set_title(_title(doc), fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{prefix}{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.plots path/to/results.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    for p in plot_results(json.loads(path.read_text()), path.parent):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
