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

SOURCE = Path(__file__).with_name("paged_attention.c")
# -ffast-math lets the compiler vectorize the reductions and exp; the source uses no
# infinities. It is given to the compile step only: linked with it, gcc adds crtfastmath.o,
# whose constructor sets flush-to-zero for the whole process (torch and numpy included).
# -fopenmp links libgomp.so.1, the soname of the copy torch ships and has loaded: the
# kernels' parallel loops run on torch's own (already spinning) worker threads.
COMPILE = ("-c", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
LINK = ("-shared", "-fopenmp")

_ptr, _i64, _int, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURE = (
    *(_ptr, _ptr, _ptr, _i64, _ptr),  # q, k, v, P, pages
    *(_i64, _i64, _i64),  # start, stop, limit
    *(_int, _int, _int, _int, _int, _float),  # n, Hq, Hkv, d, B, scale
    *(_ptr, _ptr, _int),  # out, lse, threads
)


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelBuildError("no C compiler to build the CPU attention kernels: set CC or install gcc")
    return cc


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernels (a build failure raises KernelBuildError and is retried next call)."""
    cc = compiler()
    with tempfile.TemporaryDirectory(prefix="infinikv-kernels-") as tmp:
        obj, so = Path(tmp) / "paged_attention.o", Path(tmp) / "paged_attention.so"
        for step in ([*COMPILE, str(SOURCE), "-o", str(obj)], [*LINK, str(obj), "-o", str(so), "-lm"]):
            try:
                proc = subprocess.run([cc, *step], capture_output=True, text=True)
            except OSError as e:
                raise KernelBuildError(f"could not run the C compiler {cc!r}: {e}") from e
            if proc.returncode:
                raise KernelBuildError(f"{cc} could not build {SOURCE.name}: {proc.stderr.strip()[-800:]}")
        lib = ctypes.CDLL(str(so))  # mapped now: the file may go
    lib.paged_attention.argtypes = SIGNATURE
    lib.paged_attention.restype = ctypes.c_int
    return lib
