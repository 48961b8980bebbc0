"""Guided decoding's cost inside the engine (no Triton): the same closed loop with and without a JSON schema.

    python -m benchmarks.guided_probe --out DIR [--concurrency 32] [--duration 15] [--device cuda]

Full-size GLM-4.6V-Flash shape with random bf16 weights on the GPU (``--device cpu``: the tiny preset, for a
smoke run). The engine runs its own loop thread (``LLMEngine.start``), as in the llm model; a driver keeps
``--concurrency`` requests in flight, each a 448x448 image (resized RGB, as the llm receives it) and a
30-token question. First every request holds :data:`benchmarks.structured.INVOICE_SCHEMA`, then none
(``ignore_eos``, ``max_tokens`` = the guided answers' mean length), so both runs decode as many tokens.

Reported per run: output tok/s, requests/s, TTFT and ITL inside the engine (arrival -> first token, gaps
between a request's token batches per token), and per engine step: its wall time by kind (a decode step
launched one ahead, a step run synchronously), the share of steps launched ahead, and the host time of
the grammar masks (each fill, feeding the matchers included). ``--grammar-threads 4,8`` runs the schema loop
again with xgrammar's batch fill on that many threads (the engine's is 1). Writes guided_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.metrics import distribution_ms


def _percentiles(values_ms: list[float]) -> dict:
    return distribution_ms(v / 1e3 for v in values_ms)


class _Recorder:
    """Wraps the engine core's step, the runner's decode launch and the grammar masks with timers."""

    def __init__(self, ex) -> None:
        self.steps: list[tuple[str, float]] = []
        self.fill_ms: list[float] = []  # host time of each mask fill
        self.prepare_ms: list[float] = []  # host time of each step's prepared masks (matchers fed + fill)
        self.launch_with_masks = 0
        core, runner = ex.core, ex.runner
        step, launch = core.step, runner.launch_decode
        masks = runner.sampler.masks
        fill, prepare = masks._fill, masks.prepare

        def timed_step(new_seqs, aborted):
            started = time.perf_counter()
            outputs = step(new_seqs, aborted)
            kind = "ahead" if core.pending is not None else "sync"
            self.steps.append((kind, (time.perf_counter() - started) * 1e3))
            return outputs

        def timed_launch(seqs, previous=None, before_sample=None):
            self.launch_with_masks += before_sample is not None
            return launch(seqs, previous, before_sample)

        def timed_fill(*args):
            started = time.perf_counter()
            out = fill(*args)
            self.fill_ms.append((time.perf_counter() - started) * 1e3)
            return out

        def timed_prepare(*args):
            started = time.perf_counter()
            out = prepare(*args)
            self.prepare_ms.append((time.perf_counter() - started) * 1e3)
            return out

        core.step, runner.launch_decode = timed_step, timed_launch
        masks._fill, masks.prepare = timed_fill, timed_prepare

    def take(self) -> dict:
        steps, self.steps = self.steps, []
        fills, self.fill_ms = self.fill_ms, []
        prepares, self.prepare_ms = self.prepare_ms, []
        waited, self.launch_with_masks = self.launch_with_masks, 0
        by_kind = {k: [ms for kind, ms in steps if kind == k] for k in ("ahead", "sync")}
        return {
            "steps": len(steps),
            "ahead_share": round(len(by_kind["ahead"]) / max(1, len(steps)), 3),
            "launched_with_masks": waited,
            "step_ms": {k: _percentiles(v) for k, v in by_kind.items()},
            "mask_fill_ms": _percentiles(fills),
            "mask_prepare_ms": _percentiles(prepares),
        }


def closed_loop(ex, make_request, concurrency: int, duration_s: float, on_start=None) -> dict:
    """Keep ``concurrency`` requests in flight for ``duration_s``; TTFT / ITL / throughput in the engine.
    ``on_start(t)``, if given, is called with the loop's start (perf_counter, after the engine started):
    ``wall_s`` counts from there."""
    lock = threading.Condition()
    times: dict[str, list[float]] = {}  # request id -> [arrival, token times...] (one per token)
    done: list[str] = []
    in_flight = 0

    def on_outputs(outputs) -> None:
        nonlocal in_flight
        now = time.perf_counter()
        with lock:
            for o in outputs:
                t = times.get(o.request_id)
                if t is None:
                    continue
                t.extend([now] * len(o.new_token_ids))
                if o.is_finished:
                    done.append(o.request_id)
                    in_flight -= 1
                    lock.notify()

    ex.start(on_outputs)
    started = time.perf_counter()
    if on_start is not None:
        on_start(started)
    n = 0
    try:
        while time.perf_counter() - started < duration_s:
            with lock:
                while in_flight >= concurrency:
                    lock.wait(0.05)
                in_flight += 1
                rid = f"r{n}"
                times[rid] = [time.perf_counter()]
            ex.add_request(make_request(rid))
            n += 1
        with lock:
            while in_flight:
                lock.wait(0.05)
    finally:
        ex.stop()
    wall = time.perf_counter() - started
    last_arrival = max(t[0] for t in times.values())
    # steady state: the requests sent after the opening burst (index >= concurrency) that ended before
    # the last one was sent, over that window (no burst, no drain)
    first = times.get(f"r{concurrency}")
    steady = [
        rid
        for rid in done
        if int(rid[1:]) >= concurrency and len(times[rid]) > 1 and times[rid][-1] <= last_arrival
    ]
    window = last_arrival - first[0] if first is not None else 0.0
    ttft, itl, tokens = [], [], 0
    for rid in done:
        arrival, *tok = times[rid]
        if not tok:
            continue
        tokens += len(tok)
        ttft.append((tok[0] - arrival) * 1e3)
        # tokens that came together share the gap before them (as the client harness counts them)
        i = 1
        while i < len(tok):
            j = i
            while j < len(tok) and tok[j] == tok[i]:
                j += 1
            gap = (tok[i] - tok[i - 1]) * 1e3 / (j - i)
            itl.extend([gap] * (j - i))
            i = j
    return {
        "requests": len(done),
        "wall_s": round(wall, 3),
        "rps": round(len(done) / wall, 3),
        "output_tok_s": round(tokens / wall, 1),
        "mean_output_tokens": round(tokens / max(1, len(done)), 1),
        "ttft_ms": _percentiles(ttft),
        "itl_ms": _percentiles(itl),
        "steady": {
            "requests": len(steady),
            "window_s": round(window, 3),
            "rps": round(len(steady) / window, 3) if window > 0 else None,
            "ttft_ms": _percentiles([(times[rid][1] - times[rid][0]) * 1e3 for rid in steady]),
        },
    }


def probe_engine(device: str, out: Path, **engine):
    """The engine a probe drives: the tiny preset on CPU (a smoke run), else the full-size shape with random
    bf16 weights, warmed up (its CUDA graphs captured); ``engine``: EngineConfig fields."""
    from build_engine.checkpoint import make_dummy_checkpoint, make_tiny_checkpoint
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    workdir = out / "checkpoint"
    if device == "cpu":
        ckpt = make_tiny_checkpoint(workdir, preset="tiny", seed=0)
        return LLMEngine.from_engine_dir(_tiny_engine_dir(ckpt, out / "engine"), device="cpu", **engine)
    from transformers import AutoTokenizer

    from benchmarks.engine_probe import _full_model_config

    ckpt = make_dummy_checkpoint(workdir)
    config = EngineConfig(device=device, dtype="bfloat16", max_num_seqs=128, **engine)
    ex = LLMEngine(_full_model_config(), config, None, tokenizer=AutoTokenizer.from_pretrained(ckpt))
    ex.warmup()
    return ex


def probe_request(ex, size: tuple[int, int], rid: str, gen: torch.Generator, **changes):
    """`benchmarks.ttft_probe`'s request (a random image of ``size``, a 30-token question) with its text ids
    below every special id (the tiny tokenizer appends its specials after its vocabulary), ``changes``
    applied (GenerationRequest fields)."""
    import dataclasses

    from benchmarks.ttft_probe import _request

    mc = ex.model_config
    specials = (mc.image_token_id, mc.image_start_token_id, mc.image_end_token_id)
    text_vocab = min(150000, *specials, *mc.eos_token_ids)
    base = _request(ex, mc, size, rid, gen)
    ids = [t if t in specials else t % text_vocab for t in base.prompt_token_ids]
    return dataclasses.replace(base, prompt_token_ids=ids, **changes)


def with_llm_switch_interval(run, args: argparse.Namespace) -> int:
    """``run(args)`` under the llm model's GIL switch interval (model_repository/llm/1/model.py): its engine
    loop shares the GIL with other threads, as the engine loop and a probe's driver do."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        return run(args)
    finally:
        sys.setswitchinterval(switch_interval)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument(
        "--grammar-threads",
        default="",
        help="comma list: run the schema loop again with xgrammar's batch fill on each many threads "
        "(the engine's own setting first)",
    )
    return with_llm_switch_interval(_run, ap.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    from benchmarks.structured import INVOICE_SCHEMA
    from engine.llm_engine import GenerationRequest
    from engine.sample.sampler import SamplingParams
    from engine.sample.structured import Guide

    args.out.mkdir(parents=True, exist_ok=True)
    ex = probe_engine(args.device, args.out)
    size = (112, 112) if args.device == "cpu" else (448, 448)
    gen = torch.Generator().manual_seed(0)
    recorder = _Recorder(ex)
    schema = json.dumps(INVOICE_SCHEMA)

    def request(rid: str, sampling: SamplingParams, guide: Guide | None) -> GenerationRequest:
        return probe_request(ex, size, rid, gen, sampling=sampling, guide=guide)

    guided = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    # warm: compile the schema, capture the shapes
    warm = closed_loop(ex, lambda rid: request(rid, guided, Guide("json_schema", schema)), 2, 0.1)
    recorder.take()
    res: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "warm": warm}
    res["with_schema"] = closed_loop(
        ex, lambda rid: request(rid, guided, Guide("json_schema", schema)), args.concurrency, args.duration
    )
    res["with_schema"]["engine"] = recorder.take()
    length = max(1, round(res["with_schema"]["mean_output_tokens"]))
    plain = SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True)
    res["without_schema"] = closed_loop(
        ex, lambda rid: request(rid, plain, None), args.concurrency, args.duration
    )
    res["without_schema"]["engine"] = recorder.take()
    w, wo = res["with_schema"]["output_tok_s"], res["without_schema"]["output_tok_s"]
    res["with_over_without"] = round(w / wo, 3) if wo else None
    import xgrammar as xgr

    for threads in filter(None, args.grammar_threads.split(",")):
        ex.runner.sampler.masks.matcher = xgr.BatchGrammarMatcher(max_threads=int(threads))
        name = f"with_schema_threads_{int(threads)}"
        res[name] = closed_loop(
            ex,
            lambda rid: request(rid, guided, Guide("json_schema", schema)),
            args.concurrency,
            args.duration,
        )
        res[name]["engine"] = recorder.take()
        res[name]["over_without"] = round(res[name]["output_tok_s"] / wo, 3) if wo else None
    (args.out / "guided_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    for name in [k for k in res if k.startswith(("with_schema", "without_schema"))]:
        r = res[name]
        e = r["engine"]
        print(
            f"{name}: {r['output_tok_s']} tok/s, {r['rps']} req/s, {r['mean_output_tokens']} tokens, "
            f"TTFT P50/P95 {r['ttft_ms'].get('p50')}/{r['ttft_ms'].get('p95')} ms, "
            f"ITL P50/P95/mean {r['itl_ms'].get('p50')}/{r['itl_ms'].get('p95')}/{r['itl_ms'].get('mean')} ms; "
            f"{e['steps']} steps, {e['ahead_share']} ahead, {e['launched_with_masks']} with masks, "
            f"step ahead/sync P50 {e['step_ms']['ahead'].get('p50')}/{e['step_ms']['sync'].get('p50')} ms "
            f"(mean {e['step_ms']['ahead'].get('mean')}/{e['step_ms']['sync'].get('mean')}), "
            f"mask fill P50/P95 {e['mask_fill_ms'].get('p50')}/{e['mask_fill_ms'].get('p95')} ms, "
            f"prepared (fed + fill) P50/P95 {e['mask_prepare_ms'].get('p50')}/{e['mask_prepare_ms'].get('p95')} ms"
        )
    print(f"with/without tok/s {res['with_over_without']}")
    return 0


def _tiny_engine_dir(checkpoint: Path, out: Path) -> Path:
    from build_engine.cli import main as build

    if build(["--checkpoint", str(checkpoint), "--output", str(out)]) != 0:
        raise RuntimeError("glmv-build failed")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
