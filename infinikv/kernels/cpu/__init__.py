"""C kernels for decode on the CPU: paged attention of a few query rows, a few rows times a
float32 or bfloat16 weight matrix, and a decoder layer's norms, projections and MLP around
attention in two calls; compiled for this machine when first used and cached (`build.py`), called
through ctypes (`ops.py`), tested against the plain-PyTorch partial attention
(`infinikv.core.partial.reference_partial`), `x @ W.T` and the layer in PyTorch."""
