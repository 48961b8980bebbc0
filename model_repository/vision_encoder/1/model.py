"""Triton `vision_encoder`: patches of every request in the dynamic batch → one packed ViT forward.

Each request brings pixel_values [1, N_r, 1176] and image_grid_thw [1, n_r, 3] (n_r may be 0); the
patches of all requests are concatenated, encoded by one `VisionEncoder.encode` call (in chunks of at most
`max_num_vision_patches` patches, whole images per chunk), and split back: request r gets
prompt_embedding_table [1, N_r / merge**2, hidden] (an empty [1, 0, hidden] table without images).
Only the `model.visual.*` weights are read (`engine.model.weights.load_weights(..., prefix="visual.")`: the
same checks as the whole model's load); a dummy engine gets the random weights of its seed. An engine built
with `--vision-dtype fp8` has its linear layers quantized as the llm's own ViT has them.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from .triton_model import gpu_instance_device, limit_cpu_threads, setup_model  # common/, copied by glmv-build


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = setup_model(args)
        import torch

        from engine.config import EngineDir
        from engine.model.vision import VisionEncoder
        from engine.model.weights import init_dummy_weights, load_weights

        engine_dir = EngineDir.open(parameters.get("engine_dir"))
        engine_config = engine_dir.engine_config()
        model_config = engine_dir.model_config()
        device_index = gpu_instance_device(args)
        if device_index is not None:
            self.device = torch.device(f"cuda:{device_index}")
        elif engine_config.device.startswith("cuda") and torch.cuda.is_available():
            self.device = torch.device(engine_config.device)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cpu":
            limit_cpu_threads()
        self.dtype = engine_config.torch_dtype
        with torch.device("meta"):
            encoder = VisionEncoder(model_config.vision_config)
        self.encoder = encoder.to(self.dtype).to_empty(device=self.device).eval().requires_grad_(False)
        if engine_dir.weights_dir is None:
            init_dummy_weights(self.encoder, engine_config.seed)
        else:
            load_weights(self.encoder, engine_dir.weights_dir, prefix="visual.")
        if engine_config.vision_quantization == "fp8":  # as the llm's own ViT (engine.runner.prepare_model)
            from engine.model.quant import quantize_vision_fp8_

            quantize_vision_fp8_(self.encoder)
        self.hidden_size = model_config.hidden_size
        self.merge = model_config.vision_config.spatial_merge_size
        self.max_patches = parameters.get_int("max_num_vision_patches", engine_config.max_num_vision_patches)

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
