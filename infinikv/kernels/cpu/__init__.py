"""C kernels for decode on the CPU: paged attention of a few query rows and a few rows
times a float32 or bfloat16 weight matrix, compiled for this machine when first used (`build.py`),
called through ctypes (`ops.py`), tested against the plain-PyTorch partial attention
(`infinikv.attention.partial.reference_partial`) and `x @ W.T`."""
