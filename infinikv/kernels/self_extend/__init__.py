"""Self-Extend attention over the paged, pre-RoPE cache: the Triton kernel (`kernel.py`),
its launcher (`ops.py`) and the plain-PyTorch reference they are tested against (`naive.py`)."""
