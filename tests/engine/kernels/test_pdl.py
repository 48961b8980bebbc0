"""Programmatic dependent launch of the decoder's Triton kernels (`engine.kernels.fused.set_pdl`,
`EngineConfig.decode_pdl`): off wherever it cannot run; on a Hopper GPU (GPU-marked) the same bits as
without it, eagerly and from CUDA graphs, and the engine's greedy tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.kernels import fused
from engine.runner.cuda_graphs import capture_forward


def test_pdl_is_off_where_it_cannot_run() -> None:
    assert EngineConfig().decode_pdl is False
    with pytest.raises(ValueError, match=r"^decode_pdl: 'yes' must be true, false or \"auto\"$"):
        EngineConfig(decode_pdl="yes")
    try:
        if not torch.cuda.is_available():
            assert fused.set_pdl(True) is False
        assert fused.set_pdl(False) is False
        assert fused.pdl_args() == {"PDL": False} and not fused.pdl_enabled()
        with pytest.raises(ValueError, match=r"^trigger: 'late' must be one of start, exit$"):
            fused.set_pdl(True, trigger="late")
        assert fused.set_pdl(False, trigger="exit") is False and fused.pdl_args() == {"PDL": False}
    finally:
        fused.set_pdl(False)


def test_auto_without_cuda_graphs_is_off(tiny_checkpoint) -> None:
    """decode_pdl "auto" times the decode graphs both ways; without graphs (CPU) nothing is timed, PDL stays
    off and the engine serves as usual."""
    from engine.config import ModelConfig
    from engine.llm_engine import GenerationRequest, LLMEngine
    from engine.sample.sampler import SamplingParams

    config = ModelConfig.from_pretrained(tiny_checkpoint)
    try:
        ex = LLMEngine(config, EngineConfig(max_model_len=64, num_kv_blocks=16, decode_pdl="auto"))
        assert ex.runner.decode_pdl_trial is None and not fused.pdl_enabled()
        ex.add_request(GenerationRequest("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True)))
        n = 0
        while ex.has_unfinished():
            n += sum(len(o.new_token_ids) for o in ex.step())
        assert n == 3
    finally:
        fused.set_pdl(False)


def test_auto_serves_without_pdl_when_its_trial_fails(tiny_checkpoint, monkeypatch, caplog) -> None:
    """A decode graph that cannot be captured with PDL leaves it off with a warning naming the error; the
    engine starts all the same."""
    import contextlib
    import logging

    from engine.config import ModelConfig
    from engine.llm_engine import LLMEngine

    class Graphs:
        batch_buckets, width_buckets = [1, 2], [16]

        def trial_graph(self, batch, width):
            raise RuntimeError("operation not permitted when stream is capturing")

    ex = LLMEngine(
        ModelConfig.from_pretrained(tiny_checkpoint), EngineConfig(max_model_len=64, num_kv_blocks=16)
    )
    runner = ex.runner
    monkeypatch.setattr(runner, "graphs", Graphs())
    monkeypatch.setattr(fused, "pdl_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with caplog.at_level(logging.WARNING, logger="glm-engine"):
        runner._choose_decode_pdl()
    assert runner.decode_pdl_trial is None and fused._PDL is False
    assert (
        "decode_pdl auto: off (RuntimeError: operation not permitted when stream is capturing)" in caplog.text
    )


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _decoder_ops(x, w_qkv, b_qkv, w_o, w_norm, qkv_heads, cache, slots, tables, seq_lens):
    """One decode layer's Triton kernels in a chain: norm, qkv, rotary + KV write, decode attention, o,
    the sandwich norm pair."""
    from engine.kernels.gemv import skinny_linear

    normed = fused.rms_norm(x, w_norm, 1e-5)
    qkv = skinny_linear(normed, w_qkv, b_qkv)
    heads = qkv.view(x.shape[0], qkv_heads[0] + 2 * qkv_heads[1], -1)
    half = heads.shape[-1] // 4
    cos = torch.ones(x.shape[0], half, device=x.device, dtype=x.dtype)
    sin = torch.zeros_like(cos)
    assert fused.rotary_write_kv_(heads, *qkv_heads, cos, sin, cache, slots)
    q = heads[:, : qkv_heads[0]]
    att = fused.paged_decode_attention(q, cache[0], cache[1], tables, seq_lens, 0.125, num_splits=4)
    o = skinny_linear(att.reshape(x.shape[0], -1), w_o)
    return fused.add_rms_norm_pair(x, o, w_norm, w_norm, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9+")
def test_pdl_gives_the_same_bits_eagerly_and_in_a_graph() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    batch, hidden, heads, kv_heads, head_dim, block = 2, 512, 4, 2, 128, 16

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dt) * scale

    x = randn(batch, hidden)
    w_qkv, b_qkv = (
        randn((heads + 2 * kv_heads) * head_dim, hidden, scale=0.05),
        randn((heads + 2 * kv_heads) * head_dim),
    )
    w_o, w_norm = randn(hidden, heads * head_dim, scale=0.05), randn(hidden)
    cache = randn(2, 8, block, kv_heads, head_dim)
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32, device=dev)
    seq_lens = torch.tensor([40, 61], dtype=torch.int32, device=dev)
    slots = torch.tensor([39, 4 * block + 60], dtype=torch.long, device=dev)
    args = (x, w_qkv, b_qkv, w_o, w_norm, (heads, kv_heads), cache, slots, tables, seq_lens)
    from engine.kernels import gemv

    try:
        fused.set_pdl(False)
        want = [t.clone() for t in _decoder_ops(*args)]
        # each trigger, and the skinny programs prefetching their band (part, all) before the wait
        for trigger, prefetch in [(t, 0) for t in fused.PDL_TRIGGERS] + [("start", 4096), ("start", 1 << 22)]:
            gemv.set_pdl_prefetch(prefetch)
            assert fused.set_pdl(True, trigger)
            assert fused.pdl_args()["PDL"] == fused.PDL_TRIGGERS[trigger]
            for _ in range(3):
                got = _decoder_ops(*args)
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), trigger
            graph, static, _ = capture_forward(_decoder_ops, args, None)  # as the engine captures
            for _ in range(5):
                graph.replay()
                torch.cuda.synchronize()
                assert all(torch.equal(a, b) for a, b in zip(static, want, strict=True)), trigger
    finally:
        fused.set_pdl(False)
        gemv.set_pdl_prefetch(0)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9+")
def test_engine_with_decode_pdl_gives_the_tokens_without_it(tiny_checkpoint) -> None:
    from engine.config import ModelConfig
    from engine.llm_engine import GenerationRequest, LLMEngine
    from engine.model.decoder import Glm4vModel
    from engine.sample.sampler import SamplingParams

    config = ModelConfig.from_pretrained(tiny_checkpoint)
    prompts = [
        torch.randint(0, 800, (6 + i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)
    ]
    results = {}
    try:
        for pdl in (False, True, "auto"):
            model = Glm4vModel.from_pretrained(tiny_checkpoint, "cuda", "bfloat16", config)
            engine = EngineConfig(
                device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=64, decode_pdl=pdl
            )
            ex = LLMEngine(config, engine, model=model)
            if pdl == "auto":  # both settings timed at batch 1 and 32; on only where faster at both
                trial = ex.runner.decode_pdl_trial
                assert set(trial["off"]) == set(trial["on"]) == {1, 32}
                assert trial["pdl"] == all(trial["on"][b] < trial["off"][b] for b in (1, 32))
                assert fused.pdl_enabled() is trial["pdl"]
            else:
                assert fused.pdl_enabled() is pdl
            for i, ids in enumerate(prompts):
                ex.add_request(
                    GenerationRequest(
                        f"r{i}", ids, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
                    )
                )
            out: dict[str, list[int]] = {}
            while ex.has_unfinished():
                for o in ex.step():
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
            results[pdl] = out
    finally:
        fused.set_pdl(False)
    assert results[True] == results[False] == results["auto"]
