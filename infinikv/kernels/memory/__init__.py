"""Attention to retrieved memory entries merged into the resident attention: the Triton
kernel (`kernel.py`), its launcher (`ops.py`) and the plain-PyTorch reference (`naive.py`)."""
