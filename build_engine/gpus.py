"""`--gpus` parsing and Triton instance groups.

`parse_gpus("0,1") -> [0, 1]`, `parse_gpus("all") -> every visible CUDA device`, `parse_gpus("") -> []`.
`instance_groups(gpus, count_per_gpu=1)` is the `instance_group [...]` body of a GPU model: one explicit
group per GPU (`{ count: 1 kind: KIND_GPU gpus: [ i ] }`), so each GPU runs one vision_encoder and one
llm instance; with no GPUs it is one CPU instance (`{ count: 1 kind: KIND_CPU }`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["instance_groups", "parse_gpus", "visible_gpu_count"]


def visible_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def parse_gpus(spec: str | None, num_visible: int | None = None) -> list[int]:
    """GPU ids from `--gpus` ("0,1", "all", "" or None); ValueError naming --gpus on a bad value."""
    if spec is None or spec.strip() == "":
        return []
    num_visible = visible_gpu_count() if num_visible is None else num_visible
    spec = spec.strip().lower()
    if spec == "all":
        if num_visible == 0:
            raise ValueError("--gpus: 'all' but no CUDA device is visible")
        return list(range(num_visible))
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--gpus: {part!r} is not a GPU index (use e.g. 0,1 or all)")
        gpu = int(part)
        if gpu in ids:
            raise ValueError(f"--gpus: GPU {gpu} is listed twice")
        if num_visible and gpu >= num_visible:
            raise ValueError(f"--gpus: GPU {gpu} does not exist ({num_visible} visible)")
        ids.append(gpu)
    return ids


def instance_groups(gpus: Sequence[int], count_per_gpu: int = 1) -> str:
    """The entries of `instance_group [ ... ]` for a model placed one instance per GPU (or on CPU)."""
    if count_per_gpu < 1:
        raise ValueError(f"count_per_gpu: {count_per_gpu} must be >= 1")
    if not gpus:
        return f"{{ count: {count_per_gpu} kind: KIND_CPU }}"
    return ",\n  ".join(f"{{ count: {count_per_gpu} kind: KIND_GPU gpus: [ {g} ] }}" for g in gpus)
