"""Weights prefetched into L2 ahead of the skinny kernel (`engine.kernels.prefetch`,
`EngineConfig.decode_l2_prefetch`): the spec and its errors, where the decoder issues each prefetch and
that it changes no token; on a GPU (GPU-marked) the kernel runs and the engine's greedy tokens are those
without it, from CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.kernels import gemv
from engine.kernels.prefetch import L2Prefetch, l2_prefetch, parse_spec


def test_spec() -> None:
    assert parse_spec("") == ({}, "normal")
    assert parse_spec("o") == ({"o": None}, "normal")
    assert parse_spec(" o , qkv=16,gate_up=2.5, evict_last") == (
        {"o": None, "qkv": 16.0, "gate_up": 2.5},
        "last",
    )
    for spec, message in (
        ("q", r"^'q' is not a weight of the layer; one of qkv, o, gate_up, down$"),
        ("o,o=3", r"^'o' is given twice$"),
        ("down=x", r"^'down=x': the MB after '=' must be a number$"),
        ("down=0", r"^'down=0': the MB after '=' must be > 0$"),
        ("evict_last", r"^evict_last: no weight to prefetch is named$"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_spec(spec)


def test_engine_config_names_the_setting() -> None:
    assert EngineConfig().decode_l2_prefetch == ""
    assert EngineConfig(decode_l2_prefetch="o,qkv=8").decode_l2_prefetch == "o,qkv=8"
    with pytest.raises(ValueError, match=r"^decode_l2_prefetch: 'v' is not a weight of the layer; one of"):
        EngineConfig(decode_l2_prefetch="v")
    with pytest.raises(ValueError, match=r"^decode_l2_prefetch: 1 must be a string$"):
        EngineConfig(decode_l2_prefetch=1)


def test_nothing_to_prefetch_off_cuda(tiny_checkpoint) -> None:
    from engine.config import ModelConfig
    from engine.model.decoder import Glm4vModel

    assert l2_prefetch(torch.zeros(4096, dtype=torch.bfloat16)) == 0
    with pytest.raises(ValueError, match=r"^eviction: 'first' must be one of normal, last$"):
        l2_prefetch(torch.zeros(4), eviction="first")
    model = Glm4vModel.from_pretrained(
        tiny_checkpoint, "cpu", "float32", ModelConfig.from_pretrained(tiny_checkpoint)
    )
    assert model.set_l2_prefetch("o") is False and model.language_model.l2_prefetch is None
    with pytest.raises(ValueError, match=r"^'x' is not a weight"):
        model.set_l2_prefetch("x")
    assert model.set_l2_prefetch("") is False


class _Recorder(L2Prefetch):
    """An L2Prefetch that records what it is asked (on CPU nothing runs)."""

    def __init__(self, spec: str) -> None:
        super().__init__(spec, torch.device("cpu"))
        self.calls: list[tuple[str, int]] = []
        self.joins = 0

    def issue(self, kind: str, weight: torch.Tensor) -> None:
        self.calls.append((kind, weight.data_ptr()))
        super().issue(kind, weight)

    def join(self) -> None:
        self.joins += 1
        super().join()


def test_the_decoder_issues_each_weight_after_the_matmul_before_it(tiny_checkpoint) -> None:
    """Steps of up to gemv.MAX_ROWS rows (decode_gemv set): o_proj's weight after qkv, gate/up after o,
    down after gate/up, the next layer's qkv after down (none after the last layer), one join a step;
    larger steps issue nothing; the tokens are those without it."""
    from engine.config import ModelConfig
    from engine.llm_engine import GenerationRequest, LLMEngine
    from engine.model.decoder import Glm4vModel
    from engine.sample.sampler import SamplingParams

    config = ModelConfig.from_pretrained(tiny_checkpoint)
    prompts = {"short": list(range(5, 17)), "long": [(7 * i) % 700 + 3 for i in range(gemv.MAX_ROWS + 9)]}
    results, recorders = {}, {}
    for on in (False, True):
        model = Glm4vModel.from_pretrained(tiny_checkpoint, "cpu", "float32", config)
        layers = model.language_model.layers
        for layer in layers:  # the decoder's test of where the kernel runs; on CPU the layers' own forward
            layer.self_attn.qkv_proj.decode_gemv = True
        if on:
            recorders[on] = model.language_model.l2_prefetch = _Recorder("o,qkv,gate_up=4,down")
        ex = LLMEngine(config, EngineConfig(device="cpu", dtype="float32", max_model_len=256), model=model)
        out: dict[str, list[int]] = {}
        for name, ids in prompts.items():
            ex.add_request(
                GenerationRequest(name, ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            )
            while ex.has_unfinished():
                for o in ex.step():
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
        results[on] = out
    assert results[True] == results[False]
    rec = recorders[True]
    per_step = []
    for i, layer in enumerate(layers):
        per_step += [
            ("o", layer.self_attn.o_proj.weight.data_ptr()),
            ("gate_up", layer.mlp.gate_up_proj.weight.data_ptr()),
            ("down", layer.mlp.down_proj.weight.data_ptr()),
        ]
        if i + 1 < len(layers):
            per_step.append(("qkv", layers[i + 1].self_attn.qkv_proj.weight.data_ptr()))
    # the short prompt's prefill (12 rows) and 3 decode steps, the long one's decode steps; not its prefill
    steps = len(rec.calls) // len(per_step)
    assert rec.calls == per_step * steps and rec.joins == steps
    assert steps == 1 + 3 + 3, steps


def _gpu() -> bool:
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs CUDA")
def test_cuda_prefetch_kernel_runs_and_the_engine_gives_the_tokens_without_it(tiny_checkpoint) -> None:
    from engine.config import ModelConfig
    from engine.llm_engine import GenerationRequest, LLMEngine
    from engine.model.decoder import Glm4vModel
    from engine.sample.sampler import SamplingParams

    w = torch.randn(1000, 100, device="cuda", dtype=torch.bfloat16)
    before = w.clone()
    assert l2_prefetch(w) == 200_000 and l2_prefetch(w, mb=0.01, eviction="last") == 10_000
    torch.cuda.synchronize()
    assert torch.equal(w, before)

    config = ModelConfig.from_pretrained(tiny_checkpoint)
    prompts = [
        torch.randint(0, 800, (6 + i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)
    ]
    results = {}
    for spec in ("", "o,qkv,gate_up=1,down=1,evict_last"):
        model = Glm4vModel.from_pretrained(tiny_checkpoint, "cuda", "bfloat16", config)
        engine = EngineConfig(
            device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=64, decode_l2_prefetch=spec
        )
        ex = LLMEngine(config, engine, model=model)
        assert (model.language_model.l2_prefetch is not None) is bool(spec)
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
        results[spec] = out
    assert results[""] == results["o,qkv,gate_up=1,down=1,evict_last"]
