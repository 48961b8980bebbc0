"""Where an engine step's time goes under screenshot load, inside the engine (no Triton).

    python -m benchmarks.step_probe --out DIR [--concurrency 32] [--duration 12] [--size 1288x728]

Full-size GLM-4.6V-Flash shape with random bf16 weights on the GPU (``--device cpu``: the tiny preset, for
a smoke run). The engine runs its own loop thread, as in the llm model; a driver keeps ``--concurrency``
requests in flight, each a never-seen image of ``--size`` and a 30-token question, ``--max-tokens`` out
(``ignore_eos``); the requests are built before the loop (``--pool``). Reported: requests/s, output tok/s,
TTFT and ITL inside the engine, and the same over the steady state (the requests sent after the opening
burst that ended before the last one was sent); per engine step by
kind (a decode step launched one ahead; a synchronous decode-only, mixed (decodes and prompt chunks) or
prompt-only step) its count and wall time; the host time of the step's parts (vision queue, scheduling,
the runner's execute, which includes waiting for the GPU's tokens, applying the tokens, outputs); each
step's path (a decode graph, the split/mixed graphs or eager), shape, start time and the stepping thread's
CPU time, by path and the slowest steps listed; and, over a window of ``--profile-s`` seconds in the
middle, the GPU's busy time (kernels and copies) against the wall time. The profiler's start and stop
stall the engine's thread for up to ~0.6 s (its events are read only after the run): the steps that
overlap its window are kept out of the by-kind figures and marked in the others, but the run's TTFT and
ITL include them, so ``--profile-s 0`` gives the clean latency figures. Writes step_probe.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import faulthandler
import json
import threading
import time
from pathlib import Path

import torch

from benchmarks.guided_probe import (
    _percentiles,
    closed_loop,
    probe_engine,
    probe_request,
    with_llm_switch_interval,
)


class _StepRecorder:
    """Wraps the engine core's step and its parts with timers (host wall time, ms)."""

    PARTS = ("vision", "schedule", "execute", "launch_decode", "update", "output")

    def __init__(self, ex) -> None:
        # every step's (ms, kind, the runner's path, its shape, whether a ViT graph was captured in it)
        self.records: list[dict] = []
        self.parts: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.started = time.perf_counter()
        self.profiled: tuple[float, float] | None = None  # the profiler's window, s since started
        self.kind = "idle"
        self.path = ""
        self.shape: dict = {}
        core, runner = ex.core, ex.runner
        step = core.step

        def timed_step(new_seqs, aborted):
            self.kind, self.path, self.shape = "idle", "", {}
            captures = vision_graphs_held(ex)
            before = {part: self.parts[part] for part in ("vision", "execute")}
            started, cpu_started = time.perf_counter(), time.thread_time()
            outputs = step(new_seqs, aborted)
            ms = (time.perf_counter() - started) * 1e3
            cpu_ms = (time.thread_time() - cpu_started) * 1e3
            kind = "ahead" if self.kind == "idle" and core.pending is not None else self.kind
            self.records.append(
                {
                    "t_s": round(started - self.started, 3),  # since the loop's start (or the last take)
                    "ms": round(ms, 3),
                    # the stepping thread's CPU time: far below ``ms`` when it waited for the GIL or was
                    # not scheduled (a wait for the GPU spins, so it counts here)
                    "cpu_ms": round(cpu_ms, 3),
                    "new": len(new_seqs),
                    "kind": kind,
                    "path": self.path or ("decode_graph" if kind == "ahead" else ""),
                    **self.shape,
                    **{f"{part}_ms": round(self.parts[part] - ms0, 3) for part, ms0 in before.items()},
                    "vit_capture": bool(vision_graphs_held(ex) - captures),
                }
            )
            return outputs

        core.step = timed_step

        def timer(obj, name: str, part: str, classify=None) -> None:
            inner = getattr(obj, name)

            def timed(*args, **kwargs):
                if classify is not None:
                    classify(*args)
                started = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.parts[part] += (time.perf_counter() - started) * 1e3

            setattr(obj, name, timed)

        def classify(out) -> None:
            counts = out.num_scheduled_tokens
            if all(n == 1 for n in counts):
                self.kind = "sync_decode"
            elif any(n == 1 for n in counts):
                self.kind = "mixed"
            else:
                self.kind = "prompt_only"
            chunks = [(seq, n) for seq, n in zip(out.seqs, counts, strict=True) if n > 1]
            self.path = "eager"  # unless a graph below runs it
            self.shape = {
                "decodes": len(counts) - len(chunks),
                "chunks": len(chunks),
                "chunk_tokens": sum(n for _, n in chunks),
                "max_context": max((seq.num_computed_tokens + n for seq, n in chunks), default=0),
            }

        def labelled(obj, name: str, path: str) -> None:  # sets the path when it ran the step
            inner = getattr(obj, name)

            def run(*args, **kwargs):
                result = inner(*args, **kwargs)
                if result is not None and self.path == "eager":
                    self.path = path
                return result

            setattr(obj, name, run)

        if runner.graphs is not None:
            labelled(runner.graphs, "run", "decode_graph")
        if runner.prefill_graphs is not None:
            labelled(runner, "_execute_split", "split_graph")

        timer(core.vision, "step", "vision")
        timer(core.scheduler, "schedule", "schedule")
        timer(runner, "execute", "execute", classify)
        timer(runner, "launch_decode", "launch_decode")
        timer(core.scheduler, "update", "update")
        timer(core, "_output", "output")
        # inside the vision queue's part: the ViT launches (a whole batch, a split one's start, its blocks)
        timer(runner, "encode_images", "vision: encode_images")
        timer(runner, "start_images", "vision: start_images")
        timer(runner, "advance_images", "vision: advance_images")

    def restart(self, started: float) -> None:
        """Count ``t_s`` from ``started`` (perf_counter): the loop's start, after the engine started."""
        self.started = started

    def set_profiled(self, began: float, ended: float) -> None:
        """The profiler ran from ``began`` to ``ended`` (perf_counter): the steps that overlap it are
        marked (its start and stop take the GIL and the GPU's counters) and kept apart by `take`."""
        self.profiled = (began - self.started, ended - self.started)

    def take(self) -> dict:
        records, self.records = self.records, []
        profiled, self.profiled = self.profiled, None
        self.started = time.perf_counter()
        parts, self.parts = dict(self.parts), collections.defaultdict(float)
        by_path: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        for r in records:
            r["profiled"] = profiled is not None and (
                r["t_s"] < profiled[1] and r["t_s"] + r["ms"] / 1e3 > profiled[0]
            )
            key = f"{r['kind']}/{r['path']}" + ("+vit_capture" if r["vit_capture"] else "")
            by_path[key + ("+profiled" if r["profiled"] else "")].append(r["ms"])
        # by kind, the steps that overlapped the profile's window left out
        kept = [(r["kind"], r["ms"]) for r in records if not r["profiled"]]
        kinds = sorted({k for k, _ in kept})
        total = sum(r["ms"] for r in records)
        return {
            "steps": len(records),
            "steps_profiled": len(records) - len(kept),
            "step_ms_by_kind": {
                k: {
                    "count": sum(1 for kind, _ in kept if kind == k),
                    **_percentiles([ms for kind, ms in kept if kind == k]),
                }
                for k in kinds
            },
            # by the runner's path: decode_graph, split_graph (prefill, context and mixed-step graphs) or
            # eager; "+vit_capture": a ViT graph was captured in the step; "+profiled": the step overlapped
            # the GPU profile's window
            "step_ms_by_path": {
                k: {"count": len(v), **_percentiles(v), "max": max(v)} for k, v in sorted(by_path.items())
            },
            "slowest_steps": sorted(records, key=lambda r: r["ms"], reverse=True)[:12],
            "step_wall_ms_total": round(total, 1),
            "host_ms_by_part": {k: round(v, 1) for k, v in sorted(parts.items())},
        }


ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def allocator_counts(device: str) -> dict:
    """The CUDA caching allocator's counters of the calls that can stall the host: a retry after freeing the
    cache (it synchronizes the device), cudaMalloc / cudaFree, whole-device synchronizations."""
    if device != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def vision_graphs_held(ex) -> set:
    """The keys of the ViT CUDA graphs (whole-tower and block-range) the engine holds now (empty without)."""
    visual = ex.runner.model.visual
    return {
        (i, key)
        for i, g in enumerate((visual.graphs, visual.segment_graphs))
        if g is not None
        for key in g.entries
    }


def vision_graph_counts(ex) -> dict:
    """The ViT's CUDA graphs at the end of the run: whole-tower and block-range ones held, keys that
    failed to capture, keys still counted towards their capture, and captures not made because every graph
    was held by a key used more (empty without graphs)."""
    visual = ex.runner.model.visual
    out = {}
    for name, graphs in (("whole", visual.graphs), ("block_ranges", visual.segment_graphs)):
        if graphs is not None:
            out[name] = {
                "held": len(graphs.entries),
                "failed": len(graphs.failed),
                "counted": len(graphs.seen),
                "refused": graphs.num_refused,
            }
    return out


def profile_window(duration_s: float, host_ops: bool = False):
    """Profile the GPU (and with ``host_ops`` the host calls) over ``duration_s`` of wall time; returns
    (the profile, the wall seconds, when it began and when it ended: perf_counter). Its events are read
    by `gpu_busy` later: reading them takes the GIL for seconds, which would stall the engine's loop
    thread in the middle of the run it measures."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host_ops else [])
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        time.sleep(duration_s)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return prof, wall, began, time.perf_counter()


def gpu_busy(prof, wall: float, host_ops: bool = False) -> dict:
    """The GPU's busy time (kernels and copies, all streams) over a `profile_window` of ``wall`` seconds,
    and the kernels that took most of it; with ``host_ops`` also the host calls (torch ops, CUDA runtime
    calls) that took most host time (the profile then slows the host itself, so the busy share is not
    comparable with a run without)."""
    averages = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in averages)
    top = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    res = {
        "wall_ms": round(wall * 1e3, 1),
        "gpu_busy_ms": round(busy_us / 1e3, 1),
        "gpu_busy_share": round(busy_us / 1e6 / wall, 3),
        "top_kernels_ms": {e.key[:90]: round(e.self_device_time_total / 1e3, 1) for e in top},
    }
    if host_ops:
        host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
        res["top_host_ops_ms"] = {
            e.key[:90]: [round(e.self_cpu_time_total / 1e3, 1), e.count] for e in host
        }  # [self host ms, calls]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of arrivals")
    ap.add_argument("--size", default="1288x728")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--profile-s", type=float, default=2.0)
    ap.add_argument("--pool", type=int, default=160, help="requests built before the loop")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engine-args", default="", help="EngineConfig fields, as name=value,name=value")
    ap.add_argument("--host-ops", action="store_true", help="profile the host calls too (see gpu_busy)")
    ap.add_argument(
        "--watchdog-s",
        type=float,
        default=0.0,
        help="if the loaded run has not ended after this many seconds, print every thread's stack and exit",
    )
    return with_llm_switch_interval(_run, ap.parse_args(argv))


def _engine_overrides(text: str) -> dict:
    """EngineConfig fields from "name=value,name=value" (a value that is not JSON is a string)."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _run(args: argparse.Namespace) -> int:
    from engine.sample.sampler import SamplingParams

    args.out.mkdir(parents=True, exist_ok=True)
    ex = probe_engine(args.device, args.out, **_engine_overrides(args.engine_args))
    size = (112, 112) if args.device == "cpu" else tuple(int(v) for v in args.size.split("x"))
    gen = torch.Generator().manual_seed(0)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def build(rid: str):
        return probe_request(ex, size, rid, gen, sampling=sampling)

    # the requests (each image random, never seen) are built before the loop: the driver thread then
    # only hands them over
    pool = collections.deque(build(f"pool{i}") for i in range(args.pool))

    def request(rid: str):
        return dataclasses.replace(pool.popleft(), request_id=rid) if pool else build(rid)

    recorder = _StepRecorder(ex)
    closed_loop(ex, build, 2, 0.1)  # warm: the shapes of a few first steps
    recorder.take()
    profiled: dict = {}
    window_taken: list = []  # (profile, wall s, began, ended), read after the run
    if args.device == "cuda" and args.profile_s > 0:

        def window() -> None:
            time.sleep(args.duration / 2)
            window_taken.append(profile_window(args.profile_s, args.host_ops))

        profiler = threading.Thread(target=window, daemon=True)
        profiler.start()
    if args.watchdog_s > 0:  # a stalled engine shows where each thread waits
        faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    allocator = allocator_counts(args.device)
    res = closed_loop(ex, request, args.concurrency, args.duration, on_start=recorder.restart)
    faulthandler.cancel_dump_traceback_later()
    if window_taken:
        prof, wall, began, ended = window_taken[0]
        recorder.set_profiled(began, ended)
        profiled.update(gpu_busy(prof, wall, args.host_ops))
    res["engine"] = recorder.take()
    res["allocator"] = {k: v - allocator[k] for k, v in allocator_counts(args.device).items()}
    res["vision_graphs"] = vision_graph_counts(ex)
    res["gpu_window"] = profiled
    res["size"] = f"{size[0]}x{size[1]}"
    res["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    (args.out / "step_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    e = res["engine"]
    print(
        f"{res['size']} c={args.concurrency}: {res['rps']} req/s, {res['output_tok_s']} tok/s, "
        f"TTFT P50 {res['ttft_ms'].get('p50')} ms, ITL P50/P99 {res['itl_ms'].get('p50')}/{res['itl_ms'].get('p99')} ms; "
        f"steady {res['steady']['rps']} req/s ({res['steady']['requests']} requests), "
        f"TTFT P50 {res['steady']['ttft_ms'].get('p50')} ms"
    )
    for kind, d in e["step_ms_by_kind"].items():
        print(f"  steps {kind}: {d['count']}, P50 {d.get('p50')} ms, mean {d.get('mean')} ms")
    if e["steps_profiled"]:
        print(f"  ({e['steps_profiled']} steps overlapped the GPU profile's window: by path only)")
    for path, d in e["step_ms_by_path"].items():
        print(
            f"  steps by path {path}: {d['count']}, P50/P99 {d.get('p50')}/{d.get('p99')} ms, max {d.get('max')}"
        )
    for r in e["slowest_steps"][:6]:
        print(f"  slow step: {r}")
    print(f"  host ms by part (of {e['step_wall_ms_total']} ms of steps): {e['host_ms_by_part']}")
    if profiled:
        print(
            f"  GPU busy {profiled['gpu_busy_ms']} of {profiled['wall_ms']} ms ({profiled['gpu_busy_share']}); "
            f"top: {list(profiled['top_kernels_ms'].items())[:6]}"
        )
    if res["allocator"]:
        print(f"  allocator over the run: {res['allocator']}; ViT graphs: {res['vision_graphs']}")
    if "top_host_ops_ms" in profiled:
        print(f"  host calls [self ms, calls]: {list(profiled['top_host_ops_ms'].items())[:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
