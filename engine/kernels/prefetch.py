"""Weights pulled into the GPU's L2 cache while the kernels before their matmul leave the memory idle.

A decode step reads every weight of the decoder once, so its time is the weights' bytes over the memory
bandwidth, plus every stretch in which the memory is idle: the norms, the rotary + KV write and the decode
attention (latency-bound, a few MB at most), and each matmul kernel's ramp before its first bytes arrive.
`L2Prefetch` fills those stretches: on a side stream, when a matmul finishes, a small kernel issues
`prefetch.global.L2` for (the head of) the next weight, so that the next skinny kernel
(`engine.kernels.gemv`) finds those lines in L2 instead of waiting for them. It changes no number: it reads
the weight and writes nothing.

* `parse_spec("o,qkv=16")` -> ({"o": None, "qkv": 16.0}, "normal"): which weights of a decoder layer are
  prefetched and how many MB of each (None: the whole weight), and the lines' L2 eviction priority
  ("evict_last" in the spec: kept over other lines). The weight is prefetched when the matmul before it
  in the layer finishes: ``o`` (o_proj) when qkv_proj does (the rotary, KV write and attention between);
  ``gate_up`` when o_proj does, ``down`` when gate_up does, ``qkv`` (the next layer's) when down does.
* `L2Prefetch(spec, device)`: `issue(kind, weight)` on the current stream's position, `join()` at the end of
  the forward (a CUDA graph's capture must end with its side streams joined). CUDA and Triton only; CPU
  tensors are left alone (nothing to prefetch into).
"""

from __future__ import annotations

import torch

from engine.kernels.fused import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl

PREFETCH_KINDS = ("qkv", "o", "gate_up", "down")
LINE_BYTES = 128  # an L2 line: one prefetch per line
LINES_PER_PROGRAM = 1024  # 128 KiB a program: 33.5 MB (an o_proj) is 256 programs
EVICTION = ("normal", "last")  # the prefetched lines' L2 eviction priority


def parse_spec(spec: str) -> tuple[dict[str, float | None], str]:
    """The spec "o,qkv=16" -> ({"o": None, "qkv": 16.0}, "normal"); "o,evict_last" -> ({"o": None}, "last");
    "" -> ({}, "normal"). Raises ValueError naming the bad part."""
    out: dict[str, float | None] = {}
    eviction = "normal"
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "evict_last":
            eviction = "last"
            continue
        kind, _, mb = part.partition("=")
        kind = kind.strip()
        if kind not in PREFETCH_KINDS:
            raise ValueError(f"{kind!r} is not a weight of the layer; one of {', '.join(PREFETCH_KINDS)}")
        if kind in out:
            raise ValueError(f"{kind!r} is given twice")
        if not mb:
            out[kind] = None
            continue
        try:
            size = float(mb)
        except ValueError:
            raise ValueError(f"{part!r}: the MB after '=' must be a number") from None
        if not size > 0:
            raise ValueError(f"{part!r}: the MB after '=' must be > 0")
        out[kind] = size
    if eviction == "last" and not out:
        raise ValueError("evict_last: no weight to prefetch is named")
    return out, eviction


if HAS_TRITON:

    @triton.jit
    def _l2_prefetch_kernel(base, n_lines, LINES: tl.constexpr, EVICT_LAST: tl.constexpr):
        lines = tl.minimum(tl.program_id(0) * LINES + tl.arange(0, LINES), n_lines - 1)
        addr = base + lines.to(tl.int64) * 128
        if EVICT_LAST:
            tl.inline_asm_elementwise(
                "prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;",
                "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
        else:
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
                "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip


def can_prefetch(t: torch.Tensor) -> bool:
    return HAS_TRITON and not INTERPRET and t.is_cuda


def l2_prefetch(t: torch.Tensor, mb: float | None = None, eviction: str = "normal") -> int:
    """Issue L2 prefetches for the first ``mb`` MB of t's storage (all of it: None) on the current stream;
    returns the bytes asked (0 where it cannot run: `can_prefetch`)."""
    if eviction not in EVICTION:
        raise ValueError(f"eviction: {eviction!r} must be one of {', '.join(EVICTION)}")
    if not can_prefetch(t):
        return 0
    nbytes = t.numel() * t.element_size()
    if mb is not None:
        nbytes = min(nbytes, int(mb * 1e6))
    n_lines = triton.cdiv(nbytes, LINE_BYTES)
    if n_lines == 0:
        return 0
    with torch.cuda.device(t.device):
        _l2_prefetch_kernel[(triton.cdiv(n_lines, LINES_PER_PROGRAM),)](
            t.data_ptr(), n_lines, LINES=LINES_PER_PROGRAM, EVICT_LAST=eviction == "last", num_warps=4
        )
    return nbytes


class L2Prefetch:
    """The decoder's prefetches for one forward (see the module docstring): a side stream per device."""

    def __init__(self, spec: str, device: torch.device) -> None:
        self.kinds, self.eviction = parse_spec(spec)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._forked = False

    def issue(self, kind: str, weight: torch.Tensor) -> None:
        """Prefetch ``weight`` (a layer's ``kind``, if the spec names it) once the work the current stream
        holds so far has finished."""
        if kind not in self.kinds or self.stream is None or not can_prefetch(weight):
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            l2_prefetch(weight, self.kinds[kind], self.eviction)
        self._forked = True

    def join(self) -> None:
        """The current stream waits for the prefetches (needed before a CUDA graph's capture ends)."""
        if self._forked:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._forked = False
