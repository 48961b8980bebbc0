"""engine.kernels.fused.paged_decode_attention (Triton, split-K over the paged context) equals its torch reference,
and paged_attention's decode steps through it equal the reference path.

On CPU the kernel runs through Triton's interpreter: TRITON_INTERPRET=1 must be set before triton is
imported, so each check runs in a fresh Python (`TRITON_INTERPRET=1 python
tests/engine/kernels/test_paged_decode_kernel.py CHECK`). The GPU-marked tests run the same checks in-process on
CUDA (compiled kernels), plus CUDA-graph capture/replay checks.

Tolerances against the float32 reference: float32 rtol = atol = 1e-5 (IEEE float32 dots, no TF32).
bfloat16 rtol = 1.6e-2, atol = 1e-2 (about one bf16 rounding step at |x| ~ 1): the output is rounded to
bf16 once, and the softmax weights are rounded to bf16 before p @ V like flash / memory-efficient SDPA
do; the old gather + SDPA path is off by the same order from the reference.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import main, run_interpreted  # noqa: E402

SEQ_LENS = [1, 15, 16, 17, 100, 300]
DTYPES = [torch.float32, torch.bfloat16]
# (num_heads, num_kv_heads, head_dim): GQA ratios 1, 4 and 16 (the full-size 32/2/128), plus the tiny
# test checkpoint's 4/2/16.
HEAD_CONFIGS = [(2, 2, 64), (8, 2, 128), (32, 2, 128), (4, 2, 16)]


# ---------------------------------------------------------------------------------------------------------
# helpers of the checks


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (
        f"{what}: {got.shape} {got.dtype} vs {ref.shape}"
    )
    bf16 = ref.dtype == torch.bfloat16
    got, ref = got.cpu().float(), ref.cpu().float()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    if bf16:
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def dtype_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


@contextlib.contextmanager
def no_fallback() -> Iterator[None]:
    """Make the torch fallback of paged_decode_attention raise, so a passing check really ran the kernel."""
    from engine.kernels import fused as kernels

    saved = kernels.paged_decode_attention_reference

    def boom(*args, **kwargs):
        raise AssertionError("paged_decode_attention fell back to torch")

    kernels.paged_decode_attention_reference = boom
    try:
        yield
    finally:
        kernels.paged_decode_attention_reference = saved


@contextlib.contextmanager
def triton_disabled() -> Iterator[None]:
    os.environ["GLMV_DISABLE_TRITON_KERNELS"] = "1"
    try:
        yield
    finally:
        del os.environ["GLMV_DISABLE_TRITON_KERNELS"]


def random_paged_batch(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    *,
    block_size: int = 16,
    extra_width: int = 5,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """q [B, H, D], k/v caches [N, block_size, Hkv, D], block_tables [B, W] (shuffled, non-contiguous
    blocks; W larger than the longest sequence needs, padded with 0), seq_lens [B] int32."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    width = max(need) + extra_width
    num_blocks = 2 * sum(need) + 8
    blocks = list(range(1, num_blocks))
    random.Random(seed).shuffle(blocks)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([blocks.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen) * 2
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    return (
        q.to(device, dtype),
        k_cache.to(device, dtype),
        v_cache.to(device, dtype),
        tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


# ---------------------------------------------------------------------------------------------------------
# checks (run in a subprocess under the interpreter, or in-process on CUDA)


def check_decode_kernel(device: str) -> None:
    """Random paged caches, lengths 1..300, GQA 1/4/16, fp32/bf16, forced and heuristic split counts."""
    from engine.kernels import fused as kernels

    for dtype in DTYPES:
        for num_heads, num_kv_heads, head_dim in HEAD_CONFIGS:
            q, k_cache, v_cache, tables, seq_lens = random_paged_batch(
                SEQ_LENS, num_heads, num_kv_heads, head_dim, dtype, device, seed=num_heads + head_dim
            )
            scale = head_dim**-0.5
            assert kernels.paged_decode_supported(q, k_cache, v_cache)
            ref = kernels.paged_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, scale)
            # None: the launch heuristic; 1: single pass (no reduce); 3, 40: split-K with a partial tile
            # and with more splits than most sequences have live tokens for
            for num_splits in (None, 1, 3, 40):
                with no_fallback():
                    got = kernels.paged_decode_attention(
                        q, k_cache, v_cache, tables, seq_lens, scale, num_splits=num_splits
                    )
                what = (
                    f"{dtype_name(dtype)} H={num_heads} Hkv={num_kv_heads} D={head_dim} splits={num_splits}"
                )
                assert_close(got, ref, what)
    # block_size 4 (the tiny engine tests), tiles of 32 tokens, a strided q (a view into a qkv output)
    for dtype in DTYPES:
        q, k_cache, v_cache, tables, seq_lens = random_paged_batch(
            SEQ_LENS, 8, 2, 64, dtype, device, block_size=4, seed=7
        )
        qkv = torch.randn(len(SEQ_LENS), 12 * 64, generator=torch.Generator().manual_seed(8))
        qkv = qkv.to(device, dtype)
        q = qkv[:, : 8 * 64].view(len(SEQ_LENS), 8, 64)
        ref = kernels.paged_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, 0.125)
        for num_splits, block_n in ((None, None), (5, 32), (40, 16), (1, 16)):
            with no_fallback():
                got = kernels.paged_decode_attention(
                    q, k_cache, v_cache, tables, seq_lens, 0.125, num_splits=num_splits, block_n=block_n
                )
            assert_close(got, ref, f"{dtype_name(dtype)} block_size=4 splits={num_splits} block_n={block_n}")
    # the reference itself agrees with engine.kernels.attention's per-sequence spec
    from engine.kernels.attention import _causal_gqa_attention, gather_context

    q, k_cache, v_cache, tables, seq_lens = random_paged_batch(SEQ_LENS, 8, 2, 64, torch.float32, device)
    ref = kernels.paged_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, 0.125)
    kv_cache = torch.stack([k_cache, v_cache])
    for b, n in enumerate(SEQ_LENS):
        k, v = gather_context(kv_cache, tables[b], n)
        assert_close(ref[b : b + 1], _causal_gqa_attention(q[b : b + 1], k, v, 0.125), f"fp32 spec b={b}")
    # an output buffer (the padded-batch path of engine.kernels.attention)
    out = torch.full((len(SEQ_LENS) + 2, 8, 64), float("nan"), device=device)
    with no_fallback():
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, out=out[: len(SEQ_LENS)])
    assert_close(out[: len(SEQ_LENS)], ref, "fp32 out=")
    assert out[len(SEQ_LENS) :].isnan().all()


def check_decode_splits(device: str) -> None:
    """The split count depends on shapes only, covers the block table, and whole tiles per split."""
    from engine.kernels import fused as kernels

    dev = torch.device(device)
    for batch in (1, 8, 32):
        for width in (1, 16, 64, 256, 1024):
            max_tokens = width * 16
            per_split, splits = kernels.paged_decode_splits(batch, 2, max_tokens, dev)
            assert per_split % kernels.DECODE_BLOCK_N == 0 and per_split * splits >= max_tokens
            assert per_split * (splits - 1) < max_tokens and 1 <= splits <= kernels.DECODE_MAX_SPLITS
    assert kernels.paged_decode_splits(1, 2, 16, dev) == (kernels.DECODE_BLOCK_N, 1)
    assert kernels.paged_decode_splits(1, 2, 4096, dev, num_splits=1) == (4096, 1)


def decode_step(kv_cache: torch.Tensor, seq_lens: list[int], tables: list[list[int]], seed: int):
    """q, k, v [B, ., D] of one decode token per sequence and its AttentionMetadata (block_size 16)."""
    from engine.kernels.attention import AttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    device = kv_cache.device
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    batch = len(seq_lens)
    attn = AttentionMetadata.build([1] * batch, seq_lens, tables, block_size, device)
    q = (torch.randn(batch, 32, head_dim, generator=gen) * 2).to(device, kv_cache.dtype)
    k = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(device, kv_cache.dtype)
    v = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(device, kv_cache.dtype)
    return q, k, v, attn


def check_paged_attention(device: str) -> None:
    """paged_attention's decode-only steps (kernel) equal the reference path end to end; mixed steps on
    the CUDA path send their decode rows through the kernel; GLMV_DISABLE_TRITON_KERNELS=1 is the old path."""
    from engine.kernels import attention
    from engine.kernels.attention import AttentionMetadata, paged_attention

    for dtype in DTYPES:
        what = dtype_name(dtype)
        gen = torch.Generator().manual_seed(11)
        num_blocks, block_size = 64, 16
        kv_cache = (torch.randn(2, num_blocks, block_size, 2, 128, generator=gen)).to(device, dtype)
        blocks = list(range(1, num_blocks))
        random.Random(3).shuffle(blocks)
        seq_lens = [1, 17, 100, 300]
        tables = [[blocks.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
        q, k, v, attn = decode_step(kv_cache, seq_lens, tables, seed=12)
        cache_ref = kv_cache.clone()
        ref = attention._paged_attention_reference(q, _written(cache_ref, k, v, attn), attn, 128**-0.5)
        with no_fallback():
            got = paged_attention(q, k, v, kv_cache, attn, 128**-0.5)
        assert torch.equal(kv_cache, cache_ref), f"{what}: the KV write changed"
        assert_close(got, ref, f"{what} paged_attention decode step")
        # a padded decode-only step: slot -1 rows after the sequences (not written, output garbage)
        padded = AttentionMetadata(
            slot_mapping=torch.cat([attn.slot_mapping, torch.full((2,), -1, device=device)]),
            query_lens=attn.query_lens,
            seq_lens=attn.seq_lens,
            cu_query_lens=attn.cu_query_lens,
            block_tables=attn.block_tables,
        )
        assert padded.max_query_len == 1 and padded.has_padding
        qp = torch.cat([q, torch.randn(2, 32, 128).to(device, dtype)])
        kp = torch.cat([k, torch.full((2, 2, 128), 7.0).to(device, dtype)])
        vp = torch.cat([v, torch.full((2, 2, 128), 7.0).to(device, dtype)])
        with no_fallback():
            got = paged_attention(qp, kp, vp, kv_cache, padded, 128**-0.5)
        assert got.shape == qp.shape
        assert_close(got[: len(seq_lens)], ref, f"{what} padded decode step")
        assert not (kv_cache == 7.0).any()
        # with the switch off, paged_attention is exactly the old path (reference on CPU, SDPA on CUDA)
        with triton_disabled():
            off = paged_attention(q, k, v, kv_cache, attn, 128**-0.5)
            if kv_cache.is_cuda:
                old = attention._paged_attention_fast(q, k, v, kv_cache, attn, 128**-0.5)
            else:
                old = attention._paged_attention_reference(q, kv_cache, attn, 128**-0.5)
        assert torch.equal(off, old), f"{what}: GLMV_DISABLE_TRITON_KERNELS=1 changed the result"
        # a mixed step on the fast path (prefill chunks by SDPA, decode rows by the kernel)
        mixed_lens = [5, 18, 40, 201]  # prefill of 5 from scratch, decode, chunk of 8, decode
        q_lens = [5, 1, 8, 1]
        mixed_tables = [[blocks.pop() for _ in range(-(-n // block_size))] for n in mixed_lens]
        mixed = AttentionMetadata.build(q_lens, mixed_lens, mixed_tables, block_size, device)
        gen = torch.Generator().manual_seed(13)
        t = sum(q_lens)
        qm = torch.randn(t, 32, 128, generator=gen).to(device, dtype)
        km = torch.randn(t, 2, 128, generator=gen).to(device, dtype)
        vm = torch.randn(t, 2, 128, generator=gen).to(device, dtype)
        attention.write_kv_cache(kv_cache, km, vm, mixed.slot_mapping)
        ref = attention._paged_attention_reference(qm, kv_cache, mixed, 128**-0.5)
        with no_fallback():
            got = attention._paged_attention_fast(qm, km, vm, kv_cache, mixed, 128**-0.5)
        assert mixed._plan.decode_seq_lens is not None
        assert_close(got, ref, f"{what} mixed step, fast path")


def _written(kv_cache, k, v, attn):
    from engine.kernels.attention import write_kv_cache

    write_kv_cache(kv_cache, k, v, attn.slot_mapping)
    return kv_cache


def check_cuda_graph(device: str) -> None:
    """paged_attention's decode step captured on static metadata (fixed block_tables width) replays like
    eager for new seq_lens / block tables, padding rows pointing at a scratch block (as DecodeGraphs does)."""
    from engine.kernels.attention import AttentionMetadata, paged_attention

    dtype, batch, width, block_size, num_blocks = torch.bfloat16, 4, 32, 16, 200
    scratch = num_blocks - 1
    gen = torch.Generator().manual_seed(21)
    kv_cache = torch.randn(2, num_blocks, block_size, 2, 128, generator=gen).to(device, dtype)
    static = {
        "q": torch.zeros(batch, 32, 128, device=device, dtype=dtype),
        "k": torch.zeros(batch, 2, 128, device=device, dtype=dtype),
        "v": torch.zeros(batch, 2, 128, device=device, dtype=dtype),
        "slots": torch.full((batch,), scratch * block_size, dtype=torch.long, device=device),
        "seq_lens": torch.ones(batch, dtype=torch.int32, device=device),
        "tables": torch.full((batch, width), scratch, dtype=torch.int32, device=device),
    }
    attn = AttentionMetadata(
        slot_mapping=static["slots"],
        query_lens=torch.ones(batch, dtype=torch.int32, device=device),
        seq_lens=static["seq_lens"],
        cu_query_lens=torch.arange(batch + 1, dtype=torch.int32, device=device),
        block_tables=static["tables"],
        max_query_len=1,
        max_seq_len=width * block_size,
        query_lens_cpu=(1,) * batch,
        seq_lens_cpu=(1,) * batch,
        has_padding=False,
    )

    def step():
        return paged_attention(static["q"], static["k"], static["v"], kv_cache, attn, 128**-0.5)

    with no_fallback():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()

    # each case: seq_lens of the live sequences (the rest are padding rows at the scratch block)
    cases = [[1, 17, 300, 512], [100, 16], [511, 2, 15], [64]]
    for i, lens in enumerate(cases):
        blocks = list(range(num_blocks - 1))
        random.Random(i).shuffle(blocks)
        tables = torch.full((batch, width), 0, dtype=torch.int32)
        tables[len(lens) :, 0] = scratch
        slots, seq_lens = [scratch * block_size] * batch, [1] * batch
        for b, n in enumerate(lens):
            row = [blocks.pop() for _ in range(-(-n // block_size))]
            tables[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
            slots[b] = row[(n - 1) // block_size] * block_size + (n - 1) % block_size
            seq_lens[b] = n
        fresh = torch.Generator().manual_seed(100 + i)
        static["q"].copy_(torch.randn(batch, 32, 128, generator=fresh) * 2)
        static["k"].copy_(torch.randn(batch, 2, 128, generator=fresh))
        static["v"].copy_(torch.randn(batch, 2, 128, generator=fresh))
        static["slots"].copy_(torch.tensor(slots))
        static["seq_lens"].copy_(torch.tensor(seq_lens, dtype=torch.int32))
        static["tables"].copy_(tables)
        graph.replay()
        replayed = out.clone()
        with no_fallback():
            eager = step()  # rewrites the same K/V: harmless
        torch.cuda.synchronize()
        # live rows only: padding rows all write the one scratch slot (which write lands is not fixed)
        # and read it back, so their outputs are garbage by contract
        live = len(lens)
        assert torch.equal(replayed[:live], eager[:live]), f"case {i}: graph replay differs from eager"
        eager_attn = AttentionMetadata.build(
            [1] * len(lens), lens, [r for r in tables[: len(lens)].tolist()], block_size, device
        )
        from engine.kernels.attention import _paged_attention_reference

        ref = _paged_attention_reference(static["q"][: len(lens)], kv_cache, eager_attn, 128**-0.5)
        assert_close(replayed[: len(lens)], ref, f"bf16 graph case {i}")


CHECKS: dict[str, Callable[..., None]] = {
    "decode_kernel": check_decode_kernel,
    "decode_splits": check_decode_splits,
    "paged_attention": check_paged_attention,
}


# ---------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("check", list(CHECKS))
def test_paged_decode_in_interpreter(check):
    run_interpreted(__file__, check)


def test_torch_path_without_interpreter_on_cpu(monkeypatch):
    """Without the interpreter (or with the switch off) CPU runs the reference, and paged_attention the
    old reference path, bit for bit."""
    from engine.kernels import attention
    from engine.kernels import fused as kernels

    q, k_cache, v_cache, tables, seq_lens = random_paged_batch(SEQ_LENS, 8, 2, 64, torch.float32, "cpu")
    monkeypatch.setenv("GLMV_DISABLE_TRITON_KERNELS", "1")
    assert not kernels.paged_decode_supported(q, k_cache, v_cache)
    got = kernels.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125)
    ref = kernels.paged_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, 0.125)
    assert torch.equal(got, ref)
    kv_cache = torch.stack([k_cache, v_cache])
    qd, kd, vd, attn = decode_step(kv_cache, SEQ_LENS, tables.tolist(), seed=1)
    cache2 = kv_cache.clone()
    out = attention.paged_attention(qd, kd, vd, kv_cache, attn, 0.125)
    expected = attention._paged_attention_reference(qd, _written(cache2, kd, vd, attn), attn, 0.125)
    assert torch.equal(out, expected) and torch.equal(kv_cache, cache2)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.gpu
def test_cuda_paged_decode_equals_reference(check):
    CHECKS[check]("cuda")


@pytest.mark.gpu
def test_cuda_graph_replay_of_paged_decode_equals_eager():
    check_cuda_graph("cuda")


if __name__ == "__main__":
    main(CHECKS)
