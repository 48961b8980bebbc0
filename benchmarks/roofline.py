"""Roofline numbers: what the GPU can do at best, and what decoding must move.

* :func:`measure_copy_bandwidth` — a large device-to-device copy, counting bytes read plus written (TB/s);
* :func:`measure_matmul_tflops` — a bf16 N×N×N matrix product on random data (TFLOP/s);
* :func:`decoder_param_counts` — parameters of the text decoder from the checkpoint config (exact: the
  GLM-4.6V-Flash shape gives 9,400,279,040 with embedding and lm_head);
* :func:`decode_roofline_ms` — one decode step reads every decoder + lm_head weight once (the embedding is
  a gather of one row per token) plus the KV cache of every sequence: bytes ÷ bandwidth is the floor.
  For GLM-4.6V-Flash in bf16 that is 17.56 GB → 5.8 ms/token at batch 1 on a 3.0 TB/s H100.

Timings use CUDA events after warm-up, median of several repeats (see .library METHOD.md).
``python -m benchmarks.roofline`` prints the probes and the floor as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def _get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def text_config_of(config: Any) -> Any:
    """The text sub-config of a Glm4vConfig (object or dict); a text config is returned as is."""
    sub = _get(config, "text_config")
    return sub if sub is not None else config


def _decoder_shapes(config: Any) -> tuple[list[tuple[int, int]], int, int, int, int]:
    """The GLM-4 text decoder's shapes: (each layer's linear layers as (output channels, input features):
    fused q/k/v, o, fused gate/up, down; hidden size; vocabulary; layers)."""
    text = text_config_of(config)
    hidden = int(_get(text, "hidden_size"))
    num_heads = int(_get(text, "num_attention_heads"))
    num_kv_heads = int(_get(text, "num_key_value_heads", num_heads))
    intermediate = int(_get(text, "intermediate_size"))
    head_dim = hidden // num_heads  # transformers ignores any head_dim key for glm4v_text
    linears = [
        ((num_heads + 2 * num_kv_heads) * head_dim, hidden),
        (hidden, num_heads * head_dim),
        (2 * intermediate, hidden),
        (hidden, intermediate),
    ]
    return linears, hidden, int(_get(text, "vocab_size")), int(_get(text, "num_hidden_layers"))


def decoder_param_counts(config: Any) -> dict[str, int]:
    """Parameter counts of the GLM-4 text decoder: {layers, embed, lm_head, norm, total, per_token_read}.

    Per layer: q/k/v projections with bias, o_proj without; fused gate_up and down; four RMSNorms
    (input, post-self-attention, post-attention, post-MLP: GLM-4's sandwich norms).
    ``per_token_read`` = layers + final norm + lm_head: what one decode step reads (no embedding).
    """
    linears, hidden, vocab, num_layers = _decoder_shapes(config)
    qkv_bias = linears[0][0]
    layers = (sum(out * k for out, k in linears) + qkv_bias + 4 * hidden) * num_layers
    embed = lm_head = vocab * hidden
    counts = {"layers": layers, "embed": embed, "lm_head": lm_head, "norm": hidden}
    counts["total"] = layers + embed + lm_head + hidden
    counts["per_token_read"] = layers + lm_head + hidden
    return counts


def kv_bytes_per_token(config: Any, bytes_per_value: int = 2) -> int:
    """K and V of every layer for one token: 40 KiB for GLM-4.6V-Flash in bf16."""
    text = text_config_of(config)
    num_heads = int(_get(text, "num_attention_heads"))
    head_dim = int(_get(text, "hidden_size")) // num_heads
    num_kv_heads = int(_get(text, "num_key_value_heads", num_heads))
    return 2 * int(_get(text, "num_hidden_layers")) * num_kv_heads * head_dim * bytes_per_value


def fp8_read_bytes(config: Any) -> int:
    """What one decode step reads of the weights with ``--dtype fp8`` (engine.model.quant): the linear
    layers' and the lm_head's weights one byte per parameter plus a float32 scale per output channel;
    the q/k/v biases and the norms stay bf16. 8.79 GB for GLM-4.6V-Flash (bf16: 17.56 GB)."""
    linears, hidden, vocab, num_layers = _decoder_shapes(config)
    qkv_bias = linears[0][0]
    per_layer = sum(out * (k + 4) for out, k in linears) + 2 * (qkv_bias + 4 * hidden)
    return per_layer * num_layers + vocab * (hidden + 4) + 2 * hidden


def decode_roofline_ms(
    config: Any,
    bandwidth_bytes_s: float,
    batch: int = 1,
    context_len: int = 0,
    bytes_per_param: int = 2,
    weights: str = "bf16",
) -> float:
    """Floor of one decode step (ms): weights once + every sequence's KV cache (``bytes_per_param`` per
    value), over the bandwidth. ``weights`` "fp8": the weights as ``--dtype fp8`` stores them."""
    if weights == "fp8":
        weight_bytes = fp8_read_bytes(config)
    else:
        weight_bytes = decoder_param_counts(config)["per_token_read"] * bytes_per_param
    kv = batch * context_len * kv_bytes_per_token(config, bytes_per_param)
    return (weight_bytes + kv) / bandwidth_bytes_s * 1e3


def _time_cuda(fn, warmup: int, repeats: int) -> float:
    """Median seconds of fn() timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_copy_bandwidth(num_bytes: int = 2 << 30, repeats: int = 20) -> dict:
    """Device-to-device copy of ``num_bytes`` (well past L2); bandwidth counts read + write."""
    import torch

    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _time_cuda(lambda: dst.copy_(src), warmup=3, repeats=repeats)
    if not torch.equal(src[:4096], dst[:4096]):
        raise RuntimeError("copy probe: destination does not match the source")
    return {"bytes": num_bytes, "median_ms": seconds * 1e3, "tb_s": 2 * num_bytes / seconds / 1e12}


def measure_matmul_tflops(n: int = 8192, repeats: int = 20) -> dict:
    """bf16 n×n×n product on random data (never zeros: they run faster than real data)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = _time_cuda(lambda: torch.matmul(a, b, out=out), warmup=3, repeats=repeats)
    ref = (a[:64].float() @ b.float()[:, :64]).to(torch.bfloat16).float()
    rel = (out[:64, :64].float() - ref).norm() / ref.norm()
    if not torch.isfinite(rel) or rel > 1e-2:
        raise RuntimeError(f"matmul probe: relative error {float(rel):.2e} against a float32 reference")
    return {"n": n, "median_ms": seconds * 1e3, "tflop_s": 2 * n**3 / seconds / 1e12, "rel_err": float(rel)}


def full_size_config():
    """GLM-4.6V-Flash config: build_engine's when importable, else the same numbers written out here."""
    try:
        from build_engine.checkpoint import full_size_config as project_config

        return project_config()
    except Exception:
        return {
            "text_config": {
                "hidden_size": 4096,
                "num_hidden_layers": 40,
                "num_attention_heads": 32,
                "num_key_value_heads": 2,
                "intermediate_size": 13696,
                "vocab_size": 151552,
            }
        }


def main() -> int:
    cfg = full_size_config()
    counts = decoder_param_counts(cfg)
    out: dict = {"params": counts, "weight_bytes_bf16": counts["per_token_read"] * 2}
    try:
        import torch

        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name()
            out["copy"] = measure_copy_bandwidth()
            out["matmul"] = measure_matmul_tflops()
            out["decode_ms_per_token_b1"] = decode_roofline_ms(cfg, out["copy"]["tb_s"] * 1e12)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
