"""Load HF safetensors checkpoints into our modules; random weights for benchmarks.

Contract:
* `load_weights(model, path)` reads `model.safetensors` or the shards named by
  `model.safetensors.index.json`, one tensor at a time (never a second copy of the model in host memory),
  converts each to the parameter's dtype and device, and copies it in place. Names: the HF key without the
  leading `model.` (`model.visual.*` -> `visual.*`, `model.language_model.*` -> `language_model.*`,
  `lm_head.weight` as is). Fused at load: `self_attn.{q,k,v}_proj` -> `self_attn.qkv_proj` (rows q, k, v),
  ViT/merger `{gate,up}_proj` -> `gate_up_proj` (rows gate, up).
* Every parameter (every row range of a fused one) must be filled exactly once and every checkpoint
  tensor must be used; otherwise ValueError listing the missing and unexpected keys. A tied lm_head may be
  absent from the checkpoint.
* `load_weights(module, path, prefix="visual.")` loads one part of the model on its own (the ViT for the
  vision_encoder model): `module`'s parameters are named without the prefix, only the checkpoint tensors
  under it are read, and the same checks hold within the part.
* `init_dummy_weights(model, seed)` fills every parameter on its own device: norms (1-D weights whose name
  contains "norm") 1, other biases 0, everything else N(0, 0.02). Same seed and device -> same weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# (HF sub-name, fused name, shard index) — shard i's rows follow shards 0..i-1 of the fused parameter.
_FUSED = [
    (re.compile(r"^(.*\.self_attn\.)q_proj\.(weight|bias)$"), r"\1qkv_proj.\2", 0),
    (re.compile(r"^(.*\.self_attn\.)k_proj\.(weight|bias)$"), r"\1qkv_proj.\2", 1),
    (re.compile(r"^(.*\.self_attn\.)v_proj\.(weight|bias)$"), r"\1qkv_proj.\2", 2),
    (re.compile(r"^(visual\..*)gate_proj\.weight$"), r"\1gate_up_proj.weight", 0),
    (re.compile(r"^(visual\..*)up_proj\.weight$"), r"\1gate_up_proj.weight", 1),
]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} names shards that are not in {path}: {missing}")
        return [path / f for f in files]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def iter_checkpoint(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, CPU tensor) for every tensor (every one whose key `keep` accepts), one shard and one tensor
    at a time; the others are not read."""
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for key in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                if keep is None or keep(key):
                    yield key, shard.get_tensor(key)


def hf_to_param_name(hf_key: str) -> tuple[str, int | None]:
    """HF key -> (our parameter name, shard index of a fused parameter or None)."""
    name = hf_key.removeprefix("model.")
    for pattern, fused, shard in _FUSED:
        if pattern.match(name):
            return pattern.sub(fused, name), shard
    return name, None


def _shard_rows(model: nn.Module, param_name: str, shard: int) -> tuple[int, int]:
    """Row range [start, end) of shard `shard` inside fused parameter `param_name`."""
    module = model.get_submodule(param_name.rsplit(".", 2)[0])
    if param_name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
        attn = module
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
    else:
        total = model.get_parameter(param_name).shape[0]
        sizes = [total // 2, total // 2]
    start = sum(sizes[:shard])
    return start, start + sizes[shard]


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Copy the checkpoint at `path` into `model`'s parameters (see the module contract); with `prefix`,
    `model` is the part of the whole model under it (e.g. "visual.": a VisionEncoder)."""
    params = {prefix + name: param for name, param in model.named_parameters(remove_duplicate=False)}
    expected: set[tuple[str, int | None]] = set()
    for name in params:
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            expected.update((name, i) for i in range(3))
        elif name.startswith("visual.") and name.endswith("gate_up_proj.weight"):
            expected.update((name, i) for i in range(2))
        else:
            expected.add((name, None))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied:
        expected.discard(("lm_head.weight", None))

    loaded: set[tuple[str, int | None]] = set()
    unexpected: list[str] = []
    shape_errors: list[str] = []
    for hf_key, tensor in iter_checkpoint(path, lambda key: hf_to_param_name(key)[0].startswith(prefix)):
        name, shard = hf_to_param_name(hf_key)
        if tied and name == "lm_head.weight":
            continue
        if (name, shard) not in expected:
            unexpected.append(hf_key)
            continue
        param = params[name]
        target = param.data
        if shard is not None:
            target = target[slice(*_shard_rows(model, name.removeprefix(prefix), shard))]
        if target.shape != tensor.shape:
            shape_errors.append(f"{hf_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        target.copy_(tensor)  # converts dtype and moves to the parameter's device
        loaded.add((name, shard))

    missing = sorted(f"{n}" + ("" if s is None else f"[shard {s}]") for n, s in expected - loaded)
    if missing or unexpected or shape_errors:
        raise ValueError(
            f"checkpoint {path} does not match the model: "
            f"{len(missing)} missing {_preview(missing)}; "
            f"{len(unexpected)} unexpected {_preview(sorted(unexpected))}; "
            f"{len(shape_errors)} shape mismatches {_preview(shape_errors)}"
        )


def _preview(items: list[str], limit: int = 20) -> str:
    shown = items[:limit]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{shown}{more}"


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill all parameters in place on their device (see the module contract)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        if param.dim() == 1 and "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generators[device])
