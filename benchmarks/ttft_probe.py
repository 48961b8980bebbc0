"""Where one request's first token goes, inside the engine (no Triton): ViT, prefill, host time.

    python -m benchmarks.ttft_probe --out DIR [--sizes 448x448,1288x728] [--context 1236]

Full-size GLM-4.6V-Flash shape, random bf16 weights, on the GPU. For each image size: a request with the
resized RGB image (as the llm receives it) and a 30-token question goes through `LLMEngine.step()` alone;
reported: the first step's wall time (ViT + prefill + sampling) as the engine runs it and with the prefill
eager, the ViT alone (eager, and replayed from a CUDA graph with its difference from eager), and a torch
profiler table
of one first step (top ops by self CPU time and by CUDA time) — host-bound steps show CPU time well above
their CUDA time. Also decode ms/token at batch 1 with a long context (`--context` prompt tokens), the
case the end-to-end harness measures (stepped here; with the sampling the harness sends through Triton, a
seed and min_tokens; and through the engine's own loop thread, as the llm runs it), and ms per step with 32
sequences decoding. Writes ttft_probe.json and ttft_profile_<size>.txt under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _text_high(mc) -> int:
    """The probe's text ids are drawn below this: 150000, or below the model's first special id."""
    return min(150000, mc.image_token_id, mc.image_start_token_id, mc.image_end_token_id, *mc.eos_token_ids)


def _request(ex, mc, size, rid: str, gen: torch.Generator, images: int = 1):
    """A 30-token question about ``images`` random images of ``size`` (width, height; rounded to the
    ViT's 28-pixel unit, not resized by the processor's pixel limits: `full_size_image_size` does that)."""
    from engine.llm_engine import GenerationRequest
    from engine.model.rope import get_mrope_positions
    from engine.sample.sampler import SamplingParams

    vision = mc.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    width, height = (max(unit, round(s / unit) * unit) for s in size)
    gh, gw = height // vision.patch_size, width // vision.patch_size
    grid = torch.tensor([[1, gh, gw]] * images)
    num_image_tokens = gh * gw // vision.spatial_merge_size**2
    text = torch.randint(0, _text_high(mc), (30,), generator=gen).tolist()
    image = [mc.image_start_token_id] + [mc.image_token_id] * num_image_tokens + [mc.image_end_token_id]
    ids = text[:4] + image * images + text[4:]
    positions, delta = get_mrope_positions(ids, grid, mc)
    rgb = torch.randint(0, 256, (images * height * width * 3,), generator=gen, dtype=torch.uint8)
    return GenerationRequest(
        rid,
        ids,
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        image_pixels=rgb,
        image_grid_thw=grid,
        mrope_positions=positions,
        mrope_delta=delta,
    )


def large_image_ratios(sizes: dict, harness: dict) -> dict:
    """Each large image's TTFT through the server (the harness's ``large_images`` sub-phase, P50) over its
    first step alone here (``sizes``: this probe's ``sizes``): issue 14 asks each within 1.2 x. ``server``
    counts from the request's arrival at the llm; ``client`` also holds the image's decode and resize."""
    served = harness.get("phases", {}).get("serve", {}).get("large_images") or {}
    out = {}
    for size, run in served.items():
        alone = (sizes.get(size) or {}).get("first_step_ms")
        if not isinstance(run, dict) or "server_ttft_ms" not in run or not alone:
            continue
        server, client = run["server_ttft_ms"]["p50"], run["ttft_ms"]["p50"]
        out[size] = {
            "alone_ms": round(alone, 1),
            "server_ttft_ms": server,
            "client_ttft_ms": client,
            "server_ratio": round(server / alone, 3),
            "client_ratio": round(client / alone, 3),
        }
    return out


def _copy_behind_busy_gpu_ms() -> dict[str, float]:
    """Host ms of `torch.tensor(list).to("cuda", non_blocking=True)` (pageable, and from pinned memory)
    issued behind ~50 ms of queued matmuls, and of the matmuls' launch alone: a copy that waits for the
    queue takes about as long as the queue."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    values = list(range(64))
    out = {}
    for name in ("none", "pageable", "pinned"):
        torch.cuda.synchronize()
        for _ in range(250):  # ~0.2 ms each on an H200
            a @ a
        t = time.perf_counter()
        if name == "pageable":
            torch.tensor(values).to("cuda", non_blocking=True)
        elif name == "pinned":
            torch.tensor(values, pin_memory=True).to("cuda", non_blocking=True)
        out[name] = round((time.perf_counter() - t) * 1e3, 3)
        t = time.perf_counter()
        torch.cuda.synchronize()
        out[f"{name}_then_queue_drained"] = round((time.perf_counter() - t) * 1e3, 3)
    return out


def _decode_b1_ms(ex, req, loop: bool) -> float:
    """ms per token after the first of one request alone: stepped here, or by the engine's loop thread
    (``loop``; the time between its first and last outputs as its callback saw them)."""
    import threading

    if not loop:
        ex.add_request(req)
        ex.step()  # prefill + first token
        _sync()
        t = time.perf_counter()
        n = 0
        while ex.has_unfinished():
            n += sum(len(o.new_token_ids) for o in ex.step())
        _sync()
        return (time.perf_counter() - t) / max(n, 1) * 1e3
    seen: list[tuple[float, int]] = []
    done = threading.Event()

    def callback(outputs) -> None:
        for o in outputs:
            if o.request_id == req.request_id:
                seen.append((time.perf_counter(), len(o.new_token_ids)))
                if o.is_finished:
                    done.set()

    ex.start(callback)
    try:
        ex.add_request(req)
        done.wait(120)
    finally:
        ex.stop(timeout=30)
    tokens = sum(n for _, n in seen[1:])
    return (seen[-1][0] - seen[0][0]) / max(tokens, 1) * 1e3


def _follow_up(req, rid: str, gen: torch.Generator, high: int = 150000):
    """Another question about the same image: the prompt up to the image's end, then 26 new tokens (ids
    below ``high``)."""
    import dataclasses

    end = max(i for i, t in enumerate(req.prompt_token_ids) if t == req.prompt_token_ids[5]) + 2
    tail = torch.randint(0, high, (len(req.prompt_token_ids) - end,), generator=gen).tolist()
    return dataclasses.replace(req, request_id=rid, prompt_token_ids=req.prompt_token_ids[:end] + tail)


def _with_hash(req):
    """``req`` with its image's content hash given, as preprocessing gives it to the llm."""
    import dataclasses
    import hashlib

    digest = hashlib.sha256(req.image_pixels.numpy().tobytes()).hexdigest().encode()
    return dataclasses.replace(req, image_hashes=[digest])


def _served_follow_up(ex, req, rid: str, gen: torch.Generator):
    """`_follow_up` as the llm hands it to its engine when preprocessing sends the image by reference and
    the engine holds its embeddings: no pixels, the held embeddings with the grid and hash. ``req`` must
    have ``image_hashes`` (`_with_hash`) and have run."""
    import dataclasses

    follow = _follow_up(req, rid, gen, _text_high(ex.model_config))
    held = ex.held_image_embeds(req.image_hashes)
    if held is None:
        return follow
    return dataclasses.replace(follow, image_pixels=None, image_embeds=held)


def _idle(ex) -> None:
    """What the engine loop does between requests (`ModelRunner.idle_work`: the ViT's cuDNN plans for
    the image sizes met, with vision_attention "auto"), here on the thread that steps, as the loop does."""
    while ex.runner.has_idle_work:
        ex.runner.idle_work()


def _first_step_ms(ex, req) -> float:
    _sync()
    t = time.perf_counter()
    ex.add_request(req)
    while ex.has_unfinished():
        ex.step()
    _sync()
    return (time.perf_counter() - t) * 1e3


def _step_times_ms(ex, req) -> list[float]:
    """Each engine step of ``req`` until it ends, timed alone (the GPU synchronized after each): where a
    prompt's time goes when it is prefilled in chunks."""
    _sync()
    ex.add_request(req)
    times = []
    while ex.has_unfinished():
        t = time.perf_counter()
        ex.step()
        _sync()
        times.append(round((time.perf_counter() - t) * 1e3, 3))
    return times


def _profiled_step(ex, req, path: Path) -> tuple[float, float]:
    """``req`` run to its end under torch's profiler (`_first_step_ms`); its tables (by host time, then by
    GPU time) written to ``path``. Returns (host ms, GPU ms) of the profiled events."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        _first_step_ms(ex, req)
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    path.write_text(table + "\n" + events.table(sort_by="self_cuda_time_total", row_limit=25))
    cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    return cpu_ms, sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3


def _host_profiled_step(ex, req, path: Path) -> float:
    """``req`` run to its end under cProfile (`_first_step_ms`): the engine's Python functions by cumulative
    time, written to ``path`` (the one that waits for the GPU's tokens holds the GPU's time). Returns its
    wall ms."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    ms = _first_step_ms(ex, req)
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(45)
    path.write_text(f"wall {ms:.3f} ms under cProfile\n" + out.getvalue())
    return ms


def follow_up_only(ex, mc, sizes: list[str], out: Path, gen: torch.Generator) -> dict:
    """The follow-up question as the server runs it (image hash given, the held embeddings, no pixels),
    for each size: its first step's wall time (5 runs), each step of it timed alone, its tables under
    torch's profiler (host and GPU time) and under cProfile (the engine's Python by cumulative time); with
    the first question's step and batch-1 decode to set it beside."""
    res: dict = {}
    for size_text in sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        for i in range(2):
            _first_step_ms(ex, _with_hash(_request(ex, mc, size, f"ow{i}", gen)))
        _idle(ex)
        row: dict = {}
        firsts, served, steps = [], [], []
        for i in range(5):
            first = _with_hash(_request(ex, mc, size, f"o{i}", gen))
            firsts.append(_first_step_ms(ex, first))
            served.append(_first_step_ms(ex, _served_follow_up(ex, first, f"o{i}b", gen)))
        first = _with_hash(_request(ex, mc, size, "ostep", gen))
        _first_step_ms(ex, first)
        steps = _step_times_ms(ex, _served_follow_up(ex, first, "ostep-b", gen))
        first = _with_hash(_request(ex, mc, size, "oprof", gen))
        _first_step_ms(ex, first)
        follow = _served_follow_up(ex, first, "oprof-b", gen)
        row["prompt_tokens"] = len(follow.prompt_token_ids)
        row["held_embeddings"] = follow.image_pixels is None
        row["profiled_cpu_ms"], row["profiled_cuda_ms"] = _profiled_step(
            ex, follow, out / f"ttft_profile_followup_served_{size_text}.txt"
        )
        first = _with_hash(_request(ex, mc, size, "ohost", gen))
        _first_step_ms(ex, first)
        row["cprofile_wall_ms"] = _host_profiled_step(
            ex,
            _served_follow_up(ex, first, "ohost-b", gen),
            out / f"ttft_host_followup_served_{size_text}.txt",
        )
        row["first_question_first_step_ms"] = sorted(firsts)[2]
        row["follow_up_served_first_step_ms"] = sorted(served)[2]
        row["follow_up_served_runs_ms"] = [round(v, 3) for v in served]
        row["follow_up_served_step_ms"] = steps
        res[size_text] = row
        print(size_text, json.dumps(row))
    return res


def _vit_graphs(ex, pixels: torch.Tensor, grid: torch.Tensor) -> dict:
    """The ViT call eager and replayed from a CUDA graph (VisionEncoder.enable_cuda_graphs): both times
    and the graph's largest difference from eager. The engine's own setting is restored afterwards."""
    visual = ex.model.visual
    saved = visual.graphs
    try:
        with torch.inference_mode():
            visual.graphs = None
            eager = ex.model.encode_images(pixels, grid)
            eager_ms = _time_ms(lambda: ex.model.encode_images(pixels, grid))
            visual.enable_cuda_graphs()
            first = ex.model.encode_images(pixels, grid)  # captures
            graph_ms = _time_ms(lambda: ex.model.encode_images(pixels, grid))
            out = ex.model.encode_images(pixels, grid)
        return {
            "vit_ms": eager_ms,
            "vit_graph_ms": graph_ms,
            "vit_graph_max_abs_diff": float((out.float() - eager.float()).abs().max()),
            "vit_graph_repeat_equal": bool(torch.equal(first, out)),
            "vit_graph_captured": bool(visual.graphs.entries),
        }
    except Exception as exc:  # the other numbers still count
        return {"vit_graph_error": f"{type(exc).__name__}: {exc}"}
    finally:
        visual.graphs = saved


def _time_ms(fn, repeat: int = 5) -> float:
    _sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - t) / repeat * 1e3


def main(argv: list[str] | None = None) -> int:
    from benchmarks.engine_probe import _full_engine
    from build_engine.checkpoint import full_size_image_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="448x448,1288x728")
    ap.add_argument("--context", type=int, default=1236)
    ap.add_argument(
        "--quick-sizes",
        default="1920x1080,2560x1440,3840x2160,4x1288x728",
        help="sizes measured for their first step only (ViT + prefill alone), each resized as the "
        "processor does; NxWxH: N images of WxH in one request",
    )
    ap.add_argument("--quick-only", action="store_true", help="only the --quick-sizes, for a short call")
    ap.add_argument(
        "--follow-up-only",
        action="store_true",
        help="only the follow-up question as the server runs it, for each of --sizes (its steps, profiles and "
        "Python by cumulative time), and batch-1 decode at --context, for a short call",
    )
    ap.add_argument(
        "--harness-json",
        type=Path,
        help="a gpu_harness run's harness.json on this machine: its large images' TTFT set beside their "
        "first step alone here",
    )
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "fp8"),
        default="bfloat16",
        help="the decoder's weights: bf16, or FP8 as `glmv-build --dtype fp8` gives them (the ViT stays bf16)",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda"
    ex, mc, _, res = _full_engine(device, quantization="fp8" if args.dtype == "fp8" else "none")
    res["dtype"] = args.dtype
    gen = torch.Generator().manual_seed(0)
    res["sizes"] = {}
    if args.follow_up_only:
        res["follow_up"] = follow_up_only(ex, mc, args.sizes.split(","), args.out, gen)
        from engine.llm_engine import GenerationRequest
        from engine.sample.sampler import SamplingParams

        ids = torch.randint(0, 150000, (args.context,), generator=gen).tolist()
        params = SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True)
        res[f"decode_ms_per_token_b1_context_{args.context}"] = ms = _decode_b1_ms(
            ex, GenerationRequest("d", ids, params), loop=False
        )
        print(f"decode b1, context {args.context}: {ms:.3f} ms/token")
        (args.out / "ttft_probe.json").write_text(json.dumps(res, indent=2))
        return 0
    for size_text in [] if args.quick_only else args.sizes.split(","):
        size = tuple(int(v) for v in size_text.split("x"))
        for i in range(2):  # warm: shapes seen once
            _first_step_ms(ex, _request(ex, mc, size, f"warm{i}", gen))
        _idle(ex)  # the graphs of a newly planned length are captured again: once more before timing
        _first_step_ms(ex, _request(ex, mc, size, "warm-planned", gen))
        times = [_first_step_ms(ex, _request(ex, mc, size, f"r{i}", gen)) for i in range(5)]
        prefill_graphs, ex.runner.prefill_graphs = ex.runner.prefill_graphs, None  # the eager prefill
        eager = [_first_step_ms(ex, _request(ex, mc, size, f"e{i}", gen)) for i in range(5)]
        ex.runner.prefill_graphs = prefill_graphs
        req = _request(ex, mc, size, "vit", gen)
        pixels = ex.runner.patch_normalizer(req.image_pixels, req.image_grid_thw)
        graphs = _vit_graphs(ex, pixels, req.image_grid_thw)
        cpu_ms, cuda_ms = _profiled_step(
            ex, _request(ex, mc, size, "prof", gen), args.out / f"ttft_profile_{size_text}.txt"
        )
        res["sizes"][size_text] = {
            "first_step_ms": sorted(times)[len(times) // 2],
            "first_step_eager_prefill_ms": sorted(eager)[len(eager) // 2],
            "prefill_graphs": prefill_graphs is not None,
            **graphs,
            "profiled_cpu_ms": cpu_ms,
            "profiled_cuda_ms": cuda_ms,
            "prompt_tokens": len(req.prompt_token_ids),
        }
        # a follow-up question about an image seen once: its prefix (the image included) is cached
        cold, warm = [], []
        for i in range(3):
            first = _request(ex, mc, size, f"f{i}", gen)
            cold.append(_first_step_ms(ex, first))
            warm.append(_first_step_ms(ex, _follow_up(first, f"f{i}b", gen)))
        first = _request(ex, mc, size, "fprof", gen)
        _first_step_ms(ex, first)
        _profiled_step(
            ex, _follow_up(first, "fprof-b", gen), args.out / f"ttft_profile_followup_{size_text}.txt"
        )
        res["sizes"][size_text]["follow_up_first_step_ms"] = sorted(warm)[1]
        # the same, as the server runs it: the image's hash given, the follow-up without pixels
        served = []
        for i in range(3):
            first = _with_hash(_request(ex, mc, size, f"s{i}", gen))
            _first_step_ms(ex, first)
            served.append(_first_step_ms(ex, _served_follow_up(ex, first, f"s{i}b", gen)))
        res["sizes"][size_text]["follow_up_served_first_step_ms"] = sorted(served)[1]
        res["sizes"][size_text]["follow_up_cold_first_step_ms"] = sorted(cold)[1]
        print(size_text, json.dumps(res["sizes"][size_text]))

    # large images and several in one request: the first step alone (ViT + prefill), each image at the size
    # the processor gives it (as the server sees it), to set beside the harness's large_images sub-phase
    for size_text in filter(None, args.quick_sizes.split(",")):
        *count, width, height = (int(v) for v in size_text.split("x"))
        count = count[0] if count else 1
        size = full_size_image_size(width, height)
        _first_step_ms(ex, _request(ex, mc, size, f"qw{size_text}", gen, images=count))
        _idle(ex)
        _first_step_ms(ex, _request(ex, mc, size, f"qv{size_text}", gen, images=count))
        reqs = [_request(ex, mc, size, f"q{size_text}-{i}", gen, images=count) for i in range(3)]
        times = [_first_step_ms(ex, req) for req in reqs]
        res["sizes"][size_text] = {
            "first_step_ms": sorted(times)[1],
            "resized": f"{size[0]}x{size[1]}",
            "prompt_tokens": len(reqs[0].prompt_token_ids),
        }
        print(size_text, json.dumps(res["sizes"][size_text]))
    if args.harness_json is not None and not args.harness_json.is_file():
        print(f"large images: no harness run at {args.harness_json} to set them beside")
    elif args.harness_json is not None:
        res["large_images"] = large_image_ratios(res["sizes"], json.loads(args.harness_json.read_text()))
        for size, r in res["large_images"].items():
            print(
                f"large {size}: server TTFT {r['server_ttft_ms']:.1f} ms / alone {r['alone_ms']:.1f} ms = "
                f"{r['server_ratio']:.2f} x (client {r['client_ttft_ms']:.1f} ms = {r['client_ratio']:.2f} x)"
            )
    if args.quick_only:
        (args.out / "ttft_probe.json").write_text(json.dumps(res, indent=2))
        return 0

    # a 1288x728 prompt prefilled in chunks of 512 tokens against one step of 2048
    chunked = {}
    for budget in (2048, 512):
        ex.scheduler.max_num_batched_tokens = budget
        _first_step_ms(ex, _request(ex, mc, (1288, 728), f"cw{budget}", gen))
        times = [_first_step_ms(ex, _request(ex, mc, (1288, 728), f"c{budget}-{i}", gen)) for i in range(3)]
        chunked[f"budget_{budget}_ms"] = sorted(times)[1]
        # where the chunks' time goes: each step timed alone (synchronized after it), and a profile
        chunked[f"budget_{budget}_step_ms"] = _step_times_ms(
            ex, _request(ex, mc, (1288, 728), f"cs{budget}", gen)
        )
        _, chunked[f"budget_{budget}_profiled_cuda_ms"] = _profiled_step(
            ex,
            _request(ex, mc, (1288, 728), f"cp{budget}", gen),
            args.out / f"ttft_profile_chunked_{budget}.txt",
        )
    ex.scheduler.max_num_batched_tokens = ex.engine_config.max_num_batched_tokens
    chunked["ratio"] = chunked["budget_512_ms"] / chunked["budget_2048_ms"]
    res["chunked_prefill_1288"] = chunked
    print("chunked prefill 1288x728:", json.dumps(chunked))

    # decode at batch 1 with a long context (the harness's case), and with a short one
    from engine.llm_engine import GenerationRequest
    from engine.sample.sampler import SamplingParams

    for context in (32, args.context):
        ids = torch.randint(0, 150000, (context,), generator=gen).tolist()
        params = SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True)
        ms = _decode_b1_ms(ex, GenerationRequest(f"d{context}", ids, params), loop=False)
        res[f"decode_ms_per_token_b1_context_{context}"] = ms
        print(
            f"decode b1, context {context}: {res[f'decode_ms_per_token_b1_context_{context}']:.3f} ms/token"
        )

    # the same request with the sampling the harness sends through Triton (a seed, min_tokens = max_tokens,
    # the model's end ids banned until then), and both through the engine's own loop thread (as the llm runs
    # it): which of the two makes the client's batch-1 rate slower than the step loop above
    ids = torch.randint(0, 150000, (args.context,), generator=gen).tolist()
    as_sent = SamplingParams(
        max_tokens=129, temperature=0.0, seed=0, min_tokens=129, stop_token_ids=tuple(mc.eos_token_ids)
    )
    plain = SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True)
    for name, params, loop in (
        ("harness_sampling", as_sent, False),
        ("loop_thread", plain, True),
        ("loop_thread_harness_sampling", as_sent, True),
    ):
        ms = _decode_b1_ms(ex, GenerationRequest(f"d-{name}", ids, params), loop)
        res[f"decode_ms_per_token_b1_{name}"] = ms
        print(f"decode b1, context {args.context}, {name.replace('_', ' ')}: {ms:.3f} ms/token")

    # does a small host list copied to the GPU with non_blocking wait for the work queued before it? (the
    # engine's step inputs and sampling indices are copied so, from pageable memory, while a step runs)
    if torch.cuda.is_available():
        res["small_copy_behind_busy_gpu_ms"] = _copy_behind_busy_gpu_ms()
        print(f"small copies behind a busy GPU: {json.dumps(res['small_copy_behind_busy_gpu_ms'])}")

    # decode at batch 32 (context ~300, the 448x448 load): ms per engine step once all are decoding
    for i in range(32):
        ids = torch.randint(0, 150000, (300,), generator=gen).tolist()
        params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
        ex.add_request(GenerationRequest(f"b{i}", ids, params))
    while any(s.num_output_tokens == 0 for s in ex.scheduler.running) or ex.scheduler.waiting:
        ex.step()
    for _ in range(5):
        ex.step()
    _sync()
    t = time.perf_counter()
    for _ in range(40):
        ex.step()
    _sync()
    res["decode_ms_per_step_b32"] = (time.perf_counter() - t) / 40 * 1e3
    while ex.has_unfinished():
        ex.step()
    print(f"decode b32, context ~300: {res['decode_ms_per_step_b32']:.3f} ms/step")
    (args.out / "ttft_probe.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
