"""Fused kernels for `infinikv.attention` and the model, each tested against its
plain-PyTorch reference: Triton for the GPU, one folder per op (kernel, launcher,
reference), which the engine runs on CUDA; and `cpu`, C kernels for decode on the CPU
(`infinikv.attention.backends` chooses)."""

import math

# The kernels take exponentials base 2 (exp2): scores are scaled by log2(e) up front.
LOG2_E = math.log2(math.e)
