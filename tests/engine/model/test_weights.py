"""Checkpoint loading: single file, sharded index, dtype conversion, key errors, dummy weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.kernels.attention import AttentionMetadata
from engine.model.decoder import Glm4vModel
from engine.model.weights import hf_to_param_name, init_dummy_weights, load_weights


def copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def expected_params(hf_state: dict[str, torch.Tensor], model: Glm4vModel) -> dict[str, torch.Tensor]:
    """Our parameter values built from HF tensors by hand (qkv and gate/up concatenated)."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, tensor in hf_state.items():
        name, shard = hf_to_param_name(key)
        out.setdefault(name, []).append((shard or 0, tensor))
    return {name: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for name, parts in out.items()}


def assert_model_equals(model: Glm4vModel, hf_state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    expected = expected_params(hf_state, model)
    params = dict(model.named_parameters())
    assert set(params) == set(expected)
    for name, param in params.items():
        assert param.dtype == dtype, name
        assert torch.equal(param, expected[name].to(dtype)), name


def test_load_single_file_matches_checkpoint(tiny_checkpoint):
    model = Glm4vModel.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    hf_state = load_file(tiny_checkpoint / "model.safetensors")
    assert_model_equals(model, hf_state, torch.float32)
    assert model.language_model.layers[0].self_attn.qkv_proj.bias is not None


def test_load_sharded_index(tiny_checkpoint, tmp_path):
    hf_state = load_file(tiny_checkpoint / "model.safetensors")
    keys = sorted(hf_state)
    # Split q/k/v of one layer across the two shards on purpose.
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    out = copy_config(tiny_checkpoint, tmp_path / "sharded")
    weight_map = {}
    for file, names in shards.items():
        save_file({k: hf_state[k] for k in names}, out / file)
        weight_map.update(dict.fromkeys(names, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    model = Glm4vModel.from_pretrained(out, device="cpu", dtype="float32")
    assert_model_equals(model, hf_state, torch.float32)


@pytest.mark.parametrize(
    ("checkpoint_dtype", "model_dtype"), [("bfloat16", "float32"), ("float32", "bfloat16")]
)
def test_dtype_conversion(tiny_checkpoint, tmp_path, checkpoint_dtype, model_dtype):
    hf_state = load_file(tiny_checkpoint / "model.safetensors")
    stored = {k: v.to(getattr(torch, checkpoint_dtype)) for k, v in hf_state.items()}
    out = copy_config(tiny_checkpoint, tmp_path / checkpoint_dtype)
    save_file(stored, out / "model.safetensors")
    model = Glm4vModel.from_pretrained(out, device="cpu", dtype=model_dtype)
    assert_model_equals(model, stored, getattr(torch, model_dtype))


def test_missing_and_unexpected_keys_are_listed(tiny_checkpoint, tmp_path):
    hf_state = load_file(tiny_checkpoint / "model.safetensors")
    del hf_state["model.language_model.layers.1.self_attn.k_proj.bias"]
    del hf_state["model.visual.merger.up_proj.weight"]
    hf_state["model.language_model.layers.9.mlp.down_proj.weight"] = torch.zeros(2, 2)
    out = copy_config(tiny_checkpoint, tmp_path / "broken")
    save_file(hf_state, out / "model.safetensors")
    model = Glm4vModel.empty(ModelConfig.from_pretrained(out), "cpu", "float32")
    with pytest.raises(ValueError) as info:
        load_weights(model, out)
    message = str(info.value)
    assert "2 missing" in message and "1 unexpected" in message
    assert "language_model.layers.1.self_attn.qkv_proj.bias[shard 1]" in message
    assert "visual.merger.gate_up_proj.weight[shard 1]" in message
    assert "model.language_model.layers.9.mlp.down_proj.weight" in message


def test_shape_mismatch_is_reported(tiny_checkpoint, tmp_path):
    hf_state = load_file(tiny_checkpoint / "model.safetensors")
    hf_state["model.language_model.norm.weight"] = torch.ones(3)
    out = copy_config(tiny_checkpoint, tmp_path / "bad_shape")
    save_file(hf_state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.language_model.norm.weight: checkpoint \(3,\)"):
        Glm4vModel.from_pretrained(out, dtype="float32")


def test_no_weights_file(tiny_checkpoint, tmp_path):
    out = copy_config(tiny_checkpoint, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Glm4vModel.from_pretrained(out, dtype="float32")


def test_dummy_weights_are_deterministic_and_run(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint)
    a = Glm4vModel.dummy(config, device="cpu", dtype="float32", seed=3)
    b = Glm4vModel.empty(config, "cpu", "float32")
    init_dummy_weights(b, seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.language_model.norm.weight, torch.ones(config.hidden_size))
    assert torch.equal(
        a.language_model.layers[0].self_attn.qkv_proj.bias,
        torch.zeros_like(a.language_model.layers[0].self_attn.qkv_proj.bias),
    )

    kv_caches = a.allocate_kv_caches(num_blocks=4, block_size=4)
    assert kv_caches[0].shape == (2, 4, 4, config.num_key_value_heads, config.head_dim)
    assert (
        a.kv_bytes_per_token()
        == config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    )
    ids = torch.tensor([5, 6, 7])
    attn = AttentionMetadata.build([3], [3], [[1]], block_size=4)
    logits = a.compute_logits(a(ids, torch.arange(3).expand(3, -1), attn, kv_caches))
    assert logits.shape == (3, config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
