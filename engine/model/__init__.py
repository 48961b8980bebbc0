"""GLM-4.6V's network: the ViT, the GLM decoder, M-RoPE, weight loading and FP8 quantization."""
