"""GPU kernels (Triton language and flash-attention calls), each with the torch reference it is tested against."""
