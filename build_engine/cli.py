"""`glmv-build`: HF checkpoint → engine directory + rendered Triton model repository.

    glmv-build --checkpoint /models/GLM-4.6V-Flash --output /engines/flash --device cuda --dtype bfloat16
    glmv-build --preset tiny --output /tmp/tiny            # random tiny checkpoint, CPU

The engine directory (docs/DESIGN.md): config.json, engine_config.json ({"engine": EngineConfig fields,
"preprocess": request limits, "build": build info}), weights in the HF layout (re-saved shard by shard
when --dtype changes them), tokenizer files, preprocessor_config.json, generation_config.json, and
`model_repository/` rendered from the templates. `--preset dummy-full` writes the full-size config with
no weights (`"dummy": true`: the runtime creates random weights on the device).

The output is built in a temporary sibling folder and swapped in at the end, so rebuilding into the same
folder is safe and a failed build leaves the previous one intact. Bad values fail with a message naming
the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BuildError", "build", "build_parser", "main"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
# EngineConfig / PreprocessLimits field → the flag that sets it (for error messages).
DEFAULT_MAX_SEQ_LEN = 32768  # a 3840x2160 image is ~10.6k tokens

FIELD_FLAGS = {
    "max_num_seqs": "--max-batch-size",
    "max_num_batched_tokens": "--max-num-tokens",
    "max_model_len": "--max-seq-len",
    "max_seq_len": "--max-seq-len",
    "max_images_per_request": "--max-images-per-request",
    "max_image_pixels": "--max-image-pixels",
    "min_image_pixels": "--min-image-pixels",
    "max_image_bytes": "--max-image-bytes",
    "max_output_tokens": "--max-output-tokens",
    "gpu_memory_utilization": "--kv-cache-free-gpu-mem-fraction",
    "kv_cache_memory_bytes": "--kv-cache-bytes",
    "device": "--device",
    "dtype": "--dtype",
    "quantization": "--dtype",
    "image_cache_mb": "--image-cache-mb",
    "max_num_prefill_tokens_with_decodes": "--max-prefill-tokens-with-decodes",
    "vision_patches_per_step": "--vision-patches-per-step",
    "vision_attention": "--vision-attention",
    "vision_quantization": "--vision-dtype",
    "fp8_tensorwise_rows": "--fp8-tensorwise-rows",
    "fp8_gemm_autotune": "--fp8-gemm-autotune",
}


# --dtype fp8: bfloat16 activations + EngineConfig.quantization "fp8" (weights stay 16-bit on disk and are
# quantized when the engine loads them, see engine.model.quant).
FP8_DTYPE_FLAG = "fp8"


class BuildError(ValueError):
    """A bad flag value or input; the message starts with the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmv-build", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="HF GLM-4.xV checkpoint directory")
    src.add_argument("--preset", choices=["tiny", "small", "dummy-full"], help="generated checkpoint")
    p.add_argument("--output", required=True, help="engine directory to write (replaced if it exists)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto | float32 | bfloat16 | float16 | fp8 (bfloat16 activations and KV cache, decoder linears "
        "and lm_head quantized to float8_e4m3fn when the engine loads)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--gpus", default=None, help="GPU ids for vision_encoder/llm instances: 0,1 or all")
    p.add_argument("--max-batch-size", type=int, default=64, help="most sequences per engine step")
    p.add_argument("--max-num-tokens", type=int, default=2048, help="most tokens per engine step")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="prompt + output tokens of one request (default 32768, enough for a 3840x2160 image and a long "
        "answer, or the model's max_position_embeddings if smaller)",
    )
    p.add_argument(
        "--max-prefill-tokens-with-decodes",
        type=int,
        default=320,
        help="prompt tokens in an engine step that also decodes (stall-free steps: a long prompt is spread "
        "over several steps instead of stalling every stream); 0: no cap",
    )
    p.add_argument(
        "--max-output-tokens", type=int, default=None, help="largest max_tokens (default max-seq-len - 1)"
    )
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--max-images-per-request", type=int, default=8)
    p.add_argument(
        "--max-image-pixels", type=int, default=8192 * 8192, help="width x height of an input image"
    )
    p.add_argument("--min-image-pixels", type=int, default=1, help="width x height of an input image")
    p.add_argument("--max-image-bytes", type=int, default=10 * 1024 * 1024, help="encoded size of one image")
    p.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=0.9)
    p.add_argument(
        "--kv-cache-bytes", type=int, default=None, help="KV cache budget (overrides the fraction)"
    )
    p.add_argument("--disable-thinking", action="store_true", help="default enable_thinking to false")
    p.add_argument(
        "--preprocessing-instances",
        type=int,
        default=None,
        help="default: one per two usable CPU cores of this machine, 2 to 16 (usable_cpu_cores)",
    )
    p.add_argument(
        "--postprocessing-instances",
        type=int,
        default=1,
        help="more than one may reorder a stream's responses (kept for a TensorRT-LLM-style setup)",
    )
    p.add_argument(
        "--vision-patches-per-step",
        type=int,
        default=1536,
        help="ViT work per engine step while sequences decode, in patches through the whole tower (a "
        "448x448 image is 1024); a bigger ViT batch runs a few blocks per step; 0: each batch in one step",
    )
    p.add_argument(
        "--vision-attention",
        choices=["flash", "cudnn", "auto"],
        default="auto",
        help="the ViT attention's kernel on CUDA: FlashAttention-2, cuDNN's fused attention, or auto: cuDNN "
        "for the image sizes whose cuDNN plan the engine built while idle, flash for the others",
    )
    p.add_argument(
        "--vision-dtype",
        choices=["auto", FP8_DTYPE_FLAG],
        default="auto",
        help="auto: the ViT in the activations' dtype; fp8: its linear layers quantized to float8_e4m3fn when "
        "the engine loads (per-channel weights, per-token activations, as --dtype fp8 does the decoder's); "
        "needs 16-bit activations",
    )
    p.add_argument("--vision-max-batch-size", type=int, default=8)
    p.add_argument("--vision-max-queue-delay-us", type=int, default=2000)
    p.add_argument(
        "--stream-responses-per-s",
        type=int,
        default=1000,
        help="streamed responses per second, all streams together (split across GPUs); past it, each "
        "response carries the tokens of several steps",
    )
    p.add_argument(
        "--max-num-return-sequences",
        type=int,
        default=8,
        help="the most sequences one request may ask for with the ensemble's num_return_sequences input",
    )
    p.add_argument(
        "--vision-cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay the llm's ViT from CUDA graphs, one per image layout (host-bound small images); "
        "--no-vision-cuda-graphs runs it eagerly",
    )
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each llm instance's engine in a child process of its own, so its loop never waits for the "
        "GIL of the Triton model's threads (requests in, responses out, cancellation checks); "
        "--no-engine-process runs it in the Triton model's process",
    )
    p.add_argument(
        "--async-vision",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run the llm's ViT on a CUDA stream of its own beside the engine's steps (which then run on a "
        "high-priority stream) instead of a few blocks per step inside them",
    )
    p.add_argument(
        "--prefill-cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay steps of new prompts from CUDA graphs, one per token-count bucket up to 2048 "
        "(bf16/fp16); --no-prefill-cuda-graphs runs them eagerly",
    )
    p.add_argument(
        "--mixed-step-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a step with decodes and prompt chunks replays one graph (one pass over the weights; the "
        "graphs are captured at start-up); --no-mixed-step-graphs: a decode graph, then a prefill graph",
    )
    p.add_argument(
        "--decode-gemv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="steps of up to 64 tokens run the decoder's matmuls through one Triton kernel per layer "
        "(weights read once, no split-K reduce, gate/up and silu_mul fused; CUDA only); "
        "--no-decode-gemv: cuBLAS (and the FP8 layers' per-tensor GEMM)",
    )
    p.add_argument(
        "--fp8-tensorwise-rows",
        type=int,
        default=None,
        help="with --dtype fp8: CUDA graphs of steps up to this many token rows run the per-tensor FP8 GEMM "
        "(float32 out, then the scales), larger ones the row-wise GEMM; default 320: the decode graphs and a "
        "448x448's prefill graph (the mixed steps beside a 320-token chunk, 384 rows, stay row-wise: faster there)",
    )
    p.add_argument(
        "--fp8-gemm-autotune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --dtype fp8: above --fp8-tensorwise-rows, time each kind of decoder layer with both FP8 "
        "GEMMs at each prefill graph's token bucket when the engine starts, and let the graphs run the faster "
        "(default on; --no-fp8-gemm-autotune: row-wise above the bound)",
    )
    p.add_argument(
        "--decode-pdl",
        nargs="?",
        const="on",
        default="off",
        choices=("on", "off", "auto"),
        help="launch the decoder's Triton kernels with programmatic dependent launch (each kernel's "
        "programs scheduled while the one before it finishes; CUDA, compute capability 9+): on (the flag "
        "alone), off (default), or auto: time the batch-1 and batch-32 decode graphs both ways when the "
        "engine starts and keep the faster",
    )
    p.add_argument(
        "--no-decode-pdl", dest="decode_pdl", action="store_const", const="off", help="--decode-pdl off"
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of equal prompt prefixes (images by content hash); --no-prefix-caching "
        "computes every prompt in full",
    )
    p.add_argument(
        "--image-cache-mb",
        type=int,
        default=1024,
        help="MiB of ViT embeddings kept on the engine's device by image hash (an image met again outside "
        "a cached prefix skips the ViT); 0 turns it off",
    )
    p.add_argument(
        "--pixels-by-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an image goes from preprocessing to the llm as its file's path in the host's shared resize "
        "directory (a new image's file written first; the llm takes the embeddings it holds, or reads the "
        "file); --no-pixels-by-reference sends its pixels through Triton every time",
    )
    p.add_argument(
        "--resize-on-device",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a new image that needs a resize goes to the llm at its decoded size (its shared file too) and "
        "the engine resizes it on its device as PIL's bicubic resize does, bit for bit, instead of "
        "preprocessing resizing it on one CPU core; with --pixels-by-reference only (default: on for "
        "--device cuda with --pixels-by-reference, off otherwise)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of generated checkpoints and dummy weights")
    return p


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise BuildError(f"{flag}: {message}")


def _flag_error(exc: ValueError) -> BuildError:
    """Re-word 'field: ...' errors of the config dataclasses to name the flag."""
    text = str(exc)
    field, sep, rest = text.partition(":")
    if sep and field in FIELD_FLAGS:
        return BuildError(f"{FIELD_FLAGS[field]}:{rest} ({field})")
    return BuildError(text)


def _resolve_dtype(requested: str, device: str, checkpoint_dtype: str) -> str:
    from engine.config import DTYPES

    if requested != "auto":
        _check(
            requested in DTYPES,
            "--dtype",
            f"{requested!r} must be auto or one of {sorted([*DTYPES, FP8_DTYPE_FLAG])}",
        )
        if device == "cpu":
            _check(requested != "float16", "--dtype", "float16 is not supported on --device cpu")
        return requested
    if device == "cpu":
        return "float32"
    return checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16") else "bfloat16"


def _copy_weights(checkpoint: Path, out: Path, dtype: str) -> None:
    """Copy the safetensors files; convert floating tensors shard by shard when the dtype differs."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    from engine.config import DTYPES
    from engine.model.weights import INDEX_FILE, checkpoint_files

    files = checkpoint_files(checkpoint)
    target = DTYPES[dtype]
    total_size = 0
    for file in tqdm(files, desc=f"weights -> {dtype}", unit="shard"):
        tensors = {}
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            metadata = shard.metadata() or {}
            for key in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = shard.get_tensor(key)
                if tensor.is_floating_point() and tensor.dtype != target:
                    tensor = tensor.to(target)
                tensors[key] = tensor.contiguous()
                total_size += tensor.numel() * tensor.element_size()
        save_file(tensors, str(out / file.name), metadata={**metadata, "format": "pt"})
        del tensors
    index = checkpoint / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total_size
        (out / INDEX_FILE).write_text(json.dumps(data, indent=2) + "\n")


def _weights_dtype(checkpoint: Path) -> str | None:
    """dtype of the first floating tensor of the checkpoint (None when there are no weights)."""
    from safetensors import safe_open

    from engine.model.weights import checkpoint_files

    try:
        files = checkpoint_files(checkpoint)
    except FileNotFoundError:
        return None
    with safe_open(str(files[0]), framework="pt", device="cpu") as shard:
        for key in shard.keys():  # noqa: SIM118
            tensor = shard.get_slice(key)
            name = str(tensor.get_dtype()).lower()
            mapping = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
            if name in mapping:
                return mapping[name]
    return None


def usable_cpu_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    --cpus), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def default_preprocessing_instances(cores: int) -> int:
    """Preprocessing instances for ``cores`` usable cores: one per two (the rest is for Triton, the llm's
    threads and the gateway), at least 2 (a decode never holds every request), at most 16. Each instance
    serves one request at a time (a new 1288×728 PNG took ~15 ms on an H200 host), so a burst of new
    screenshots queues for (requests / instances) × that."""
    return max(2, min(16, cores // 2))


def build(args: argparse.Namespace) -> Path:
    """Run the build described by parsed flags; returns the engine directory."""
    from build_engine.gpus import instance_groups, parse_gpus
    from build_engine.render import TEMPLATE_DIR, render_repository
    from engine.config import EngineConfig, ModelConfig
    from engine.processing.limits import PreprocessLimits

    device = args.device
    _check(device in ("cpu", "cuda"), "--device", f"{device!r} must be cpu or cuda")
    gpus = parse_gpus(args.gpus)
    _check(not gpus or device == "cuda", "--gpus", "GPU instances need --device cuda")
    _check(
        args.fp8_tensorwise_rows is None or args.dtype == FP8_DTYPE_FLAG,
        "--fp8-tensorwise-rows",
        "needs --dtype fp8",
    )
    _check(
        args.fp8_gemm_autotune is None or args.dtype == FP8_DTYPE_FLAG,
        "--fp8-gemm-autotune",
        "needs --dtype fp8",
    )
    _check(
        args.pixels_by_reference or not args.resize_on_device,
        "--resize-on-device",
        "needs --pixels-by-reference (the images it resizes go as files of the shared directory)",
    )
    if args.resize_on_device is None:
        args.resize_on_device = device == "cuda" and args.pixels_by_reference
    if device == "cuda" and not gpus:
        gpus = [0]
    if args.preprocessing_instances is None:
        args.preprocessing_instances = default_preprocessing_instances(usable_cpu_cores())
    for flag, value, low in (
        ("--preprocessing-instances", args.preprocessing_instances, 1),
        ("--postprocessing-instances", args.postprocessing_instances, 1),
        ("--vision-max-batch-size", args.vision_max_batch_size, 1),
        ("--vision-max-queue-delay-us", args.vision_max_queue_delay_us, 0),
        ("--default-max-tokens", args.default_max_tokens, 1),
        ("--stream-responses-per-s", args.stream_responses_per_s, 1),
        ("--max-num-return-sequences", args.max_num_return_sequences, 1),
    ):
        _check(value >= low, flag, f"{value} must be >= {low}")
    _check(
        0.0 < args.kv_cache_free_gpu_mem_fraction <= 1.0,
        "--kv-cache-free-gpu-mem-fraction",
        f"{args.kv_cache_free_gpu_mem_fraction} must be in (0, 1]",
    )

    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and not (output / "engine_config.json").is_file() and any(output.iterdir()):
        raise BuildError(f"--output: {output} exists and is not an engine directory; refusing to replace it")
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    try:
        is_dummy = args.preset == "dummy-full"
        if args.preset is not None:
            from build_engine.checkpoint import make_dummy_checkpoint, make_tiny_checkpoint

            generated = work / "_checkpoint"
            if is_dummy:
                checkpoint = make_dummy_checkpoint(generated)
            else:
                checkpoint = make_tiny_checkpoint(generated, preset=args.preset, seed=args.seed)
        else:
            checkpoint = Path(args.checkpoint)
            _check(checkpoint.is_dir(), "--checkpoint", f"{checkpoint} is not a directory")
            _check((checkpoint / "config.json").is_file(), "--checkpoint", f"no config.json in {checkpoint}")
        try:
            model_config = ModelConfig.from_pretrained(checkpoint)
        except ValueError as exc:
            raise BuildError(f"--checkpoint: {exc}") from None
        checkpoint_dtype = _weights_dtype(checkpoint) or model_config.torch_dtype
        quantization = "fp8" if args.dtype == FP8_DTYPE_FLAG else "none"
        if quantization == "fp8" and device == "cpu":
            print(
                "glmv-build: note: --dtype fp8 on --device cpu runs the dequantized path (fp8 weights, "
                "bfloat16 matmuls): it saves weight memory but is not faster",
                file=sys.stderr,
            )
        dtype = _resolve_dtype("bfloat16" if quantization == "fp8" else args.dtype, device, checkpoint_dtype)
        if args.max_seq_len is None:
            args.max_seq_len = min(DEFAULT_MAX_SEQ_LEN, model_config.max_position_embeddings)
        _check(
            args.max_seq_len <= model_config.max_position_embeddings,
            "--max-seq-len",
            f"{args.max_seq_len} is over the model's max_position_embeddings {model_config.max_position_embeddings}",
        )
        try:
            engine_config = EngineConfig(
                max_num_seqs=args.max_batch_size,
                max_num_batched_tokens=args.max_num_tokens,
                max_model_len=args.max_seq_len,
                max_num_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes or None,
                kv_cache_memory_bytes=args.kv_cache_bytes,
                gpu_memory_utilization=args.kv_cache_free_gpu_mem_fraction,
                device=device,
                dtype=dtype,
                quantization=quantization,
                max_images_per_request=args.max_images_per_request,
                enable_thinking=not args.disable_thinking,
                vision_cuda_graphs=args.vision_cuda_graphs,
                async_vision=args.async_vision,
                prefill_cuda_graphs=args.prefill_cuda_graphs,
                mixed_step_graphs=args.mixed_step_graphs,
                decode_gemv=args.decode_gemv,
                decode_pdl={"on": True, "off": False}.get(args.decode_pdl, args.decode_pdl),
                fp8_tensorwise_rows=(
                    EngineConfig.fp8_tensorwise_rows
                    if args.fp8_tensorwise_rows is None
                    else args.fp8_tensorwise_rows
                ),
                fp8_gemm_autotune=(
                    EngineConfig.fp8_gemm_autotune
                    if args.fp8_gemm_autotune is None
                    else args.fp8_gemm_autotune
                ),
                vision_patches_per_step=args.vision_patches_per_step,
                vision_attention=args.vision_attention,
                vision_quantization="fp8" if args.vision_dtype == FP8_DTYPE_FLAG else "none",
                enable_prefix_caching=args.prefix_caching,
                image_cache_mb=args.image_cache_mb,
                seed=args.seed,
            )
            limits = PreprocessLimits(
                max_seq_len=args.max_seq_len,
                max_output_tokens=args.max_output_tokens or max(1, args.max_seq_len - 1),
                max_images_per_request=args.max_images_per_request,
                max_image_tokens_per_request=engine_config.max_image_tokens_per_request,
                max_image_bytes=args.max_image_bytes,
                max_image_pixels=args.max_image_pixels,
                min_image_pixels=args.min_image_pixels,
                enable_thinking=not args.disable_thinking,
            )
        except ValueError as exc:
            raise _flag_error(exc) from None

        engine_dir = work / "engine"
        engine_dir.mkdir()
        shutil.copy2(checkpoint / "config.json", engine_dir / "config.json")
        for name in TOKENIZER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, engine_dir / name)
        _check(
            (engine_dir / "tokenizer.json").is_file(), "--checkpoint", "no tokenizer.json in the checkpoint"
        )
        if not is_dummy:
            _copy_weights(checkpoint, engine_dir, dtype)
        preprocess = {
            k: getattr(limits, k)
            for k in (
                "max_output_tokens",
                "max_image_bytes",
                "max_image_pixels",
                "min_image_pixels",
                "max_stop_words",
            )
        }
        engine_json = {
            "engine": engine_config.to_dict(),
            "preprocess": preprocess,
            "dummy": is_dummy,
            "build": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "version": _version(),
                "checkpoint": "preset:" + args.preset
                if args.preset
                else str(Path(args.checkpoint).resolve()),
                "checkpoint_dtype": checkpoint_dtype,
                "dtype": dtype,
                "quantization": quantization,
                "device": device,
                "gpus": gpus,
                "dummy": is_dummy,
                "preprocessing_instances": args.preprocessing_instances,
            },
        }
        (engine_dir / "engine_config.json").write_text(json.dumps(engine_json, indent=2) + "\n")
        values = {
            "engine_dir": str(output),
            "python_path": str(PROJECT_ROOT),
            "patch_dim": model_config.vision_config.patch_dim,
            "hidden_size": model_config.hidden_size,
            "preprocessing_instance_count": args.preprocessing_instances,
            "postprocessing_instance_count": args.postprocessing_instances,
            # lean streamed responses need every response of a stream to meet the same postprocessing instance
            "lean_stream": "true" if args.postprocessing_instances == 1 else "false",
            "vision_encoder_instance_group": instance_groups(gpus),
            "llm_instance_group": instance_groups(gpus),
            "vision_max_batch_size": args.vision_max_batch_size,
            "vision_max_queue_delay_us": args.vision_max_queue_delay_us,
            "max_num_vision_patches": engine_config.max_num_vision_patches,
            "default_max_tokens": args.default_max_tokens,
            "pixels_by_reference": "true" if args.pixels_by_reference else "false",
            "resize_on_device": "true" if args.resize_on_device else "false",
            "engine_process": "true" if args.engine_process else "false",
            "cancellation_check_period_ms": 10,
            "stats_check_period_ms": 100,
            # the postprocessing instance is shared by every GPU's llm: split its response budget
            "stream_responses_per_s": max(1, args.stream_responses_per_s // max(1, len(gpus or [0]))),
            "max_num_return_sequences": args.max_num_return_sequences,
        }
        render_repository(TEMPLATE_DIR, engine_dir / "model_repository", values)
        _swap_in(engine_dir, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _swap_in(new: Path, output: Path) -> None:
    """Replace `output` by `new` with two renames (the old folder is removed afterwards)."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(output, old)
    try:
        os.rename(new, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("glmv-serve")
    except Exception:
        return "0.1.0"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = build(args)
    except (BuildError, FileNotFoundError) as exc:
        print(f"glmv-build: {exc}", file=sys.stderr)
        return 2
    print(
        f"glmv-build: engine directory {output}\n  serve with: glmv-serve --model-repository {output}/model_repository"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
