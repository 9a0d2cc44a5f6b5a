"""Attention kernels for the CPU, in C: compiled for this machine when first used
(`build.py`), called through ctypes (`ops.py`), tested against the plain-PyTorch partial
attention (`infinikv.attention.partial.reference_partial`)."""
