"""What an idle gap before a request costs the preprocessing model's work: ``python -m benchmarks.preprocess_idle --out DIR``.

CPU only, in this process: the `small` preset's engine directory and the follow-up request of
`benchmarks.path_overhead` (a 1288×728 screenshot seen before, by reference, a new question). The same
request is timed back to back, then after each idle gap of ``--gaps-ms`` (the thread sleeps, as a Triton
stub waits for its next request; with ``--spin`` it busy-waits instead, so the core never idles), then after
the thread touched ``--touch-mb`` MB (its caches filled with other data, as other processes on the core would
fill them). ``--cpu-dma-latency-us N`` holds the kernel's PM QoS request (/dev/cpu_dma_latency, root) at N µs
for the run: 0 keeps every core out of idle states deeper than polling, as hosts tuned for latency do. For
each: the median wall and thread CPU time per request and of each preprocessing stage. Writes
``preprocess_idle.json`` (meta: device, date, commit) into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.results import make_meta


def _timed(ask, rounds: int, before) -> dict:
    walls, cpus, stages = [], [], {}
    for _ in range(rounds):
        before()
        wall, cpu = time.perf_counter(), time.thread_time()
        out = ask()
        walls.append((time.perf_counter() - wall) * 1e3)
        cpus.append((time.thread_time() - cpu) * 1e3)
        for stage, seconds in out.stage_seconds.items():
            stages.setdefault(stage, []).append(seconds * 1e3)
    return {
        "wall_ms": round(statistics.median(walls), 3),
        "thread_cpu_ms": round(statistics.median(cpus), 3),
        "stages_ms": {stage: round(statistics.median(v), 3) for stage, v in stages.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gaps-ms", default="1,5,20", help="idle gaps before a request, ms, comma-separated")
    ap.add_argument("--touch-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--spin", action="store_true", help="busy-wait the gaps instead of sleeping")
    ap.add_argument(
        "--cpu-dma-latency-us",
        type=int,
        help="hold /dev/cpu_dma_latency at this many µs during the run (0: no idle state deeper than polling)",
    )
    args = ap.parse_args(argv)
    qos = None
    if args.cpu_dma_latency_us is not None:  # the request holds while the file stays open
        from build_engine.cpu_latency import CpuLatencyError, CpuLatencyRequest

        try:
            qos = CpuLatencyRequest(args.cpu_dma_latency_us).hold()
        except (CpuLatencyError, ValueError) as exc:
            ap.error(str(exc))

    def wait(seconds: float) -> None:
        if not args.spin:
            time.sleep(seconds)
            return
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    import numpy as np

    from benchmarks.corpus import Corpus
    from benchmarks.server import build_engine
    from engine.processing.limits import PreprocessLimits
    from engine.processing.preprocess import Preprocessor

    with tempfile.TemporaryDirectory(prefix="glmv-preprocess-idle-") as tmp:
        engine = build_engine("small", Path(tmp) / "engine", device="cpu", dtype=None, extra_args=())
        image = Corpus(sizes=[(1288, 728)], pool_size=1, seed=1000).sample(0)
        pre = Preprocessor(
            engine,
            PreprocessLimits.from_engine_dir(engine),
            shared_resize_cache_dir=Path(tmp) / "shared",
            shared_resize_cache_bytes=1 << 30,
        )
        pre.warm_up()

        def ask():
            return pre(image.question, list(image.images), pixels_by_reference=True)

        ask()  # the screenshot seen once: every later request is a follow-up
        junk = np.ones(args.touch_mb << 20, np.uint8)

        def touch() -> None:
            np.add(junk, 1, out=junk)

        rows = {"back_to_back": _timed(ask, args.rounds, lambda: None)}
        for gap in [float(g) for g in args.gaps_ms.split(",") if g]:
            rows[f"after_{gap:g}_ms_{'spin' if args.spin else 'idle'}"] = _timed(
                ask, args.rounds, lambda gap=gap: wait(gap / 1e3)
            )
        rows[f"after_touching_{args.touch_mb}_mb"] = _timed(ask, args.rounds, touch)
    for name, row in rows.items():
        stages = ", ".join(f"{stage} {ms:.3f}" for stage, ms in row["stages_ms"].items())
        print(
            f"{name}: wall {row['wall_ms']:.3f} ms, thread CPU {row['thread_cpu_ms']:.3f} ms; stages ms: {stages}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = make_meta(
        vars(args) | {"out": str(args.out)}, "glmv-build --preset small --device cpu (random weights)"
    )
    (args.out / "preprocess_idle.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if qos is not None:
        qos.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
