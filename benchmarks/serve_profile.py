"""Where the llm process spends its host time while serving: py-spy samples of the llm's Python-backend stub.

    python -m benchmarks.serve_profile --out DIR [--concurrency 32] [--duration 20] [--preset dummy-full]

Builds the engine (`glmv-build --preset`, on the GPU unless `--device cpu`), serves it with Triton, runs the
closed loop of `benchmarks.multi_gpu` (448×448 images, `--max-tokens` out) and, in the middle of it, records
`py-spy` (`--py-spy`, default the one on PATH) on the llm's stub process twice: every thread, and only the
thread holding the GIL. Writes the collapsed stacks (`llm_all.txt`, `llm_gil.txt`) and serve_profile.json:
the load's numbers and, per recording, the share of samples per thread and the functions with the most
samples (self and inclusive). Prints the top of each.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def summarize(collapsed: str, top: int = 25) -> dict:
    """Collapsed stacks ("frame;frame;... count" per line, threads as the first frame) -> shares per
    thread and the top functions by self and by inclusive samples."""
    threads: collections.Counter[str] = collections.Counter()
    self_samples: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        self_samples[frames[-1]] += n
        for frame in dict.fromkeys(frames[1:]):  # once per stack, outermost first (stable ties)
            inclusive[frame] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / total, 4)) for name, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "threads": share(threads),
        "self": share(self_samples),
        "inclusive": share(inclusive),
    }


def _llm_stub_pid() -> int:
    out = subprocess.run(["pgrep", "-f", "llm/1/model.py"], capture_output=True, text=True).stdout.split()
    if not out:
        raise RuntimeError("no python-backend stub of the llm model found (pgrep -f llm/1/model.py)")
    return int(out[0])


def _record(py_spy: str, pid: int, seconds: float, path: Path, gil: bool) -> str:
    argv = [py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "--threads"]
    argv += ["--nonblocking", "--format", "raw", "-o", str(path)] + (["--gil"] if gil else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr[-500:]}")
    return path.read_text()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.multi_gpu import _measure
    from benchmarks.server import build_engine, find_model_repository
    from build_engine.launcher import TritonServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="dummy-full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--record-s", type=float, default=6.0, help="length of each py-spy recording")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"args": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory(prefix="glmv-serve-profile-") as tmp:
        dtype = "bfloat16" if args.device == "cuda" else None
        extra = ["--max-batch-size", str(max(64, args.concurrency))]
        out = build_engine(
            args.preset, Path(tmp) / "engine", device=args.device, dtype=dtype, extra_args=extra
        )
        server = TritonServer(
            find_model_repository(out), http_port=0, grpc_port=0, metrics_port=0, startup_timeout_s=300
        )
        with server:
            recordings: dict[str, str] = {}

            def record() -> None:
                time.sleep(min(5.0, args.duration / 4))  # past the opening burst
                pid = _llm_stub_pid()
                for name, gil in (("all", False), ("gil", True)):
                    try:
                        recordings[name] = _record(
                            args.py_spy, pid, args.record_s, args.out / f"llm_{name}.txt", gil
                        )
                    except Exception as exc:  # the load's numbers still count
                        recordings[name] = ""
                        doc[f"error_{name}"] = f"{type(exc).__name__}: {exc}"

            recorder = threading.Thread(target=record)
            recorder.start()
            doc["load"] = _measure(
                server.grpc_url, "triton", args.concurrency, args.duration, args.max_tokens, 2
            )
            recorder.join()
    for name, text in recordings.items():
        doc[name] = summarize(text)
    (args.out / "serve_profile.json").write_text(json.dumps(doc, indent=2))
    load = doc["load"]
    print(f"c={args.concurrency}: {load['rps']} req/s, {load['output_tok_s']} tok/s, {load['errors']} errors")
    for name in ("all", "gil"):
        summary = doc.get(name) or {}
        print(f"-- {name}: {summary.get('samples', 0)} samples; threads {summary.get('threads', [])[:6]}")
        for fn, frac in summary.get("self", [])[:15]:
            print(f"   self {frac:6.3f}  {fn[:150]}")
        for fn, frac in summary.get("inclusive", [])[:15]:
            print(f"   incl {frac:6.3f}  {fn[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
