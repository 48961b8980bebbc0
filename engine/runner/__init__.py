"""The one door into the model: batch preparation, ViT and decoder forwards, CUDA graphs."""
