"""Triton `vision_encoder`: patches of every request in the dynamic batch → one packed ViT forward.

Each request brings pixel_values [1, N_r, 1176] and image_grid_thw [1, n_r, 3] (n_r may be 0); the
patches of all requests are concatenated, encoded by one `VisionEncoder.encode` call (in chunks of at most
`max_num_vision_patches` patches, whole images per chunk), and split back: request r gets
prompt_embedding_table [1, N_r / merge**2, hidden] (an empty [1, 0, hidden] table without images).
Only the `model.visual.*` weights are loaded.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(config: dict, key: str, default: str = "") -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    return default if value.startswith("${") else value


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        python_path = _param(config, "python_path")
        if python_path and os.path.isdir(python_path) and python_path not in sys.path:
            sys.path.insert(0, python_path)
        import torch

        from engine.config import EngineConfig, ModelConfig

        engine_dir = _param(config, "engine_dir")
        raw = json.loads(open(os.path.join(engine_dir, "engine_config.json")).read())
        engine_config = EngineConfig.from_dict(raw.get("engine", {}))
        self.model_config = ModelConfig.from_pretrained(engine_dir)
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
            torch.cuda.set_device(self.device)
        elif engine_config.device.startswith("cuda") and torch.cuda.is_available():
            self.device = torch.device(engine_config.device)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        self.dtype = engine_config.torch_dtype
        is_dummy = bool(raw.get("dummy", raw.get("build", {}).get("dummy", False)))
        self.encoder = self._load(engine_dir, is_dummy, engine_config.seed)
        self.hidden_size = self.model_config.hidden_size
        self.merge = self.model_config.vision_config.spatial_merge_size
        self.max_patches = int(
            _param(config, "max_num_vision_patches", "") or engine_config.max_num_vision_patches
        )

    def _load(self, engine_dir: str, is_dummy: bool, seed: int):
        import torch
        from torch import nn

        from engine.model.vision import VisionEncoder
        from engine.model.weights import hf_to_param_name, init_dummy_weights, iter_checkpoint

        class VisualOnly(nn.Module):  # same parameter names and order as Glm4vModel's visual part
            def __init__(self) -> None:
                super().__init__()
                self.visual = VisionEncoder(self.model_config_vision)

        VisualOnly.model_config_vision = self.model_config.vision_config
        with torch.device("meta"):
            holder = VisualOnly()
        holder = holder.to(self.dtype).to_empty(device=self.device).eval().requires_grad_(False)
        if is_dummy:
            init_dummy_weights(holder, seed)
            return holder.visual
        params = dict(holder.named_parameters())
        filled: set[tuple[str, int | None]] = set()
        with torch.no_grad():
            for key, tensor in iter_checkpoint(engine_dir):
                name, shard = hf_to_param_name(key)
                if not name.startswith("visual."):
                    continue
                if name not in params:
                    raise ValueError(f"checkpoint key {key} has no vision encoder parameter")
                target = params[name].data
                if shard is not None:  # fused gate_up: gate rows first, then up
                    half = target.shape[0] // 2
                    target = target[shard * half : (shard + 1) * half]
                target.copy_(tensor)
                filled.add((name, shard))
        missing = [n for n in params if not any(f[0] == n for f in filled)]
        if missing:
            raise ValueError(f"vision weights missing from {engine_dir}: {missing[:10]}")
        return holder.visual

    def execute(self, requests):

        pixel_chunks, grids, counts = [], [], []
        responses: list = [None] * len(requests)
        for i, request in enumerate(requests):
            pixels = pb_utils.get_input_tensor_by_name(request, "pixel_values").as_numpy()
            grid = pb_utils.get_input_tensor_by_name(request, "image_grid_thw").as_numpy()
            pixels = pixels.reshape(-1, pixels.shape[-1])
            grid = grid.reshape(-1, 3).astype(np.int64)
            if int((grid.prod(axis=1)).sum()) != pixels.shape[0]:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"pixel_values: {pixels.shape[0]} patches do not match image_grid_thw {grid.tolist()}",
                        pb_utils.TritonError.INVALID_ARG,
                    )
                )
                counts.append(0)
                continue
            pixel_chunks.append(pixels)
            grids.append(grid)
            counts.append(pixels.shape[0] // self.merge**2)
        try:
            embeds = self._encode(pixel_chunks, grids)  # [sum tokens, hidden] float32 numpy
        except Exception as exc:
            error = pb_utils.TritonError(f"vision_encoder failed: {type(exc).__name__}: {exc}")
            return [r or pb_utils.InferenceResponse(error=error) for r in responses]
        offset = 0
        for i in range(len(requests)):
            if responses[i] is not None:
                continue
            table = embeds[offset : offset + counts[i]]
            offset += counts[i]
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("prompt_embedding_table", np.ascontiguousarray(table[None]))]
            )
        return responses

    def _encode(self, pixel_chunks: list[np.ndarray], grids: list[np.ndarray]) -> np.ndarray:
        import torch

        if not pixel_chunks or sum(p.shape[0] for p in pixel_chunks) == 0:
            return np.zeros((0, self.hidden_size), np.float32)
        pixels = np.concatenate(pixel_chunks)  # [N, 1176]
        grid = np.concatenate(grids)  # [n, 3]
        outs = []
        start_image, start_patch = 0, 0
        sizes = grid.prod(axis=1)
        while start_image < len(grid):  # whole images per forward, at most max_patches patches
            end_image, num = start_image, 0
            while end_image < len(grid) and (num == 0 or num + sizes[end_image] <= self.max_patches):
                num += int(sizes[end_image])
                end_image += 1
            chunk = torch.from_numpy(pixels[start_patch : start_patch + num]).to(self.device, self.dtype)
            out = self.encoder.encode(chunk, torch.from_numpy(grid[start_image:end_image]))
            outs.append(out.float().cpu())
            start_image, start_patch = end_image, start_patch + num
        return torch.cat(outs).numpy()
