"""Fused GPU kernels (Triton) for the attention in `infinikv.attention`, one folder per op
(kernel, launcher, plain-PyTorch reference), each tested against that reference. The
engine runs them on CUDA (`infinikv.attention.backends`) and the PyTorch path elsewhere."""

import math

# The kernels take exponentials base 2 (exp2): scores are scaled by log2(e) up front.
LOG2_E = math.log2(math.e)
