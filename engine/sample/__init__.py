"""Token sampling: sampling parameters, the sampler, logprobs and grammar-constrained decoding."""
