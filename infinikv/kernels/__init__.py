"""Fused GPU kernels (Triton) for the attention in `infinikv.attention`, each tested
against that package's plain-PyTorch reference. Empty until the GPU issue lands: on CPU
the engine runs the PyTorch path."""
