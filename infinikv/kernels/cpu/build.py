"""Compile the C kernels for this machine (-march=native) and load them, once per process.

The build takes under a second, so it runs in a temporary directory at first use instead
of keeping a cache that another CPU or compiler could make stale. The compiler is $CC, else
`cc` or `gcc` on the PATH.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from infinikv.errors import KernelBuildError

SOURCES = ("paged_attention.c", "chunk_attention.c", "linear.c", "decoder.c", "stack.c", "sketch.c")
# -ffast-math lets the compiler vectorize the reductions and exp; the source uses no
# infinities. It is given to the compile step only: linked with it, gcc adds crtfastmath.o,
# whose constructor sets flush-to-zero for the whole process (torch and numpy included).
# -fopenmp links libgomp.so.1, the soname of the copy torch ships and has loaded: the
# kernels' parallel loops run on torch's own (already spinning) worker threads.
# INFINIKV_CPU_ARCH names another -march target (a test builds the paths of older CPUs).
COMPILE = ("-c", "-O3", "-ffast-math", "-fopenmp", "-fPIC")
# stack.c rotates q and k as torch does, each product rounded: no fused multiply-adds, which
# GCC's vectorizer makes of a complex product even so (vfmaddsub); its loops are not hot.
EXACT = {"stack.c": ("-ffp-contract=off", "-fno-tree-vectorize", "-fno-tree-slp-vectorize")}
LINK = ("-shared", "-fopenmp")

_ptr, _i64, _int, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "paged_attention": (
        *(_ptr, _ptr, _ptr, _int, _i64, _ptr),  # q, k, v, kv_size, P, pages
        *(_i64, _i64, _i64),  # start, stop, limit
        *(_int, _int, _int, _int, _int, _float),  # n, Hq, Hkv, d, B, scale
        *(_ptr, _ptr, _int),  # out, lse, threads
    ),
    "chunk_attention": (
        *(_ptr, _ptr, _ptr, _int, _i64, _ptr),  # q, k, v, kv_size, P, pages
        *(_i64, _i64, _i64),  # start, stop, limit
        *(_int, _int, _int, _int, _int, _float, _int),  # n, Hq, Hkv, d, B, scale, in_bf16
        *(_ptr, _ptr, _int),  # out, lse, threads
    ),
    "linear_rows": (_ptr, _ptr, _int, _ptr, _int, _int, _int, _int),  # x, W, size, y, M, N, K, threads
    "norm_project": (
        *(_ptr, _ptr, _float, _ptr, _int, _ptr),  # x, norm, eps, W, size, bias
        *(_ptr, _ptr, _int, _int, _int, _int),  # h, y, M, N, K, threads
    ),
    "mlp_residual": (
        *(_ptr, _ptr, _ptr, _ptr, _int),  # x, a, Wo, bo, A
        *(_ptr, _float, _ptr, _ptr, _int),  # norm, eps, Wgu, Wd, size
        *(_ptr, _int, _int, _int, _int),  # scratch, M, D, F, threads
    ),
    "decoder_stack": (
        *(_ptr, _int, _int, _ptr, _int, _float),  # x, M, L, layers, size, eps
        *(_int, _int, _int, _int, _int),  # D, F, Hq, Hkv, d
        *(_ptr, _ptr, _ptr, _ptr, _ptr, _ptr),  # phases, group, k, k_rope, v, k_group
        *(_int, _i64, _int, _ptr),  # kv_size, P, B, slots
        *(_int, _ptr, _ptr, _ptr, _ptr, _float, _int),  # S, starts, lens, tables, kv_lens, scale, threads
    ),
    "sketch_logits": (
        *(_ptr, _int, _int, _int, _int, _int),  # table, chunks, H, d, C, tokens
        *(_ptr, _int, _ptr, _int),  # q, m, out, threads
    ),
    "int8_activations": (),
    "bf16_dot": (),
    "wide_vectors": (),
    "q4_to_bf16": (_ptr, _ptr, _int, _int, _int),  # W, out, N, K, threads
}
# the others return nothing
RESTYPES = {
    "paged_attention": ctypes.c_int,
    "chunk_attention": ctypes.c_int,
    "decoder_stack": ctypes.c_int,
    "int8_activations": ctypes.c_int,
    "bf16_dot": ctypes.c_int,
    "wide_vectors": ctypes.c_int,
}


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelBuildError("no C compiler to build the CPU kernels: set CC or install gcc")
    return cc


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernels (a build failure raises KernelBuildError and is retried next call)."""
    cc = compiler()
    arch = os.environ.get("INFINIKV_CPU_ARCH", "native")
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory(prefix="infinikv-kernels-") as tmp:
        objects = [str(Path(tmp) / f"{Path(src).stem}.o") for src in SOURCES]
        so = Path(tmp) / "kernels.so"
        steps = [
            [*COMPILE, f"-march={arch}", *EXACT.get(src, ()), str(here / src), "-o", obj]
            for src, obj in zip(SOURCES, objects, strict=True)
        ]
        for step in [*steps, [*LINK, *objects, "-o", str(so), "-lm"]]:
            try:
                proc = subprocess.run([cc, *step], capture_output=True, text=True)
            except OSError as e:
                raise KernelBuildError(f"could not run the C compiler {cc!r}: {e}") from e
            if proc.returncode:
                raise KernelBuildError(f"{cc} could not build the CPU kernels: {proc.stderr.strip()[-800:]}")
        lib = ctypes.CDLL(str(so))  # mapped now: the file may go
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = RESTYPES.get(name)
    return lib
