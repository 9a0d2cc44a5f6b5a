"""Compile the C kernels for this machine (-march=native) and load them, once per process.

The build takes half a minute (decoder.c's templates), so the library is kept under
$XDG_CACHE_HOME/infinikv/kernels (default ~/.cache), named by a hash of everything that
decides its code: the sources, the flags, and the compiler's own description of its target
(version and instruction sets, from its predefined macros), so another CPU or compiler
builds its own. The compiler is $CC, else `cc` or `gcc` on the PATH.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from infinikv.errors import KernelBuildError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
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
    "amx_tiles": (),
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
    "amx_tiles": ctypes.c_int,
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
    cached = cache_dir() / f"kernels-{build_key(cc, arch)}.so"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cached.parent / "build.lock", "w")
    except OSError as e:
        log.warning("cannot cache the CPU kernels (%s): building them for this process", e)
        lib = build(cc, arch, None)
    else:
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a process starting beside this one waits, not builds
            lib = load_cached(cached) or build(cc, arch, cached)
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = RESTYPES.get(name)
    return lib


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infinikv" / "kernels"


def build_key(cc: str, arch: str) -> str:
    """A hash of the sources, the flags and what `cc -march=arch` targets (its predefined
    macros name its version and every instruction set it may use)."""
    target = run(cc, [f"-march={arch}", "-dM", "-E", "-x", "c", os.devnull])
    digest = hashlib.sha256("\n".join([cc, arch, repr((COMPILE, EXACT, LINK, SOURCES)), target]).encode())
    for source in sorted(HERE.glob("*.[ch]")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:24]


def load_cached(path: Path) -> ctypes.CDLL | None:
    """The cached library, or None where there is none or it does not load (a damaged file)."""
    if not path.exists():
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("rebuilding the CPU kernels: the cached %s does not load (%s)", path, e)
        return None


def build(cc: str, arch: str, keep: Path | None) -> ctypes.CDLL:
    """Compile every source at once, link, load; copy the library to `keep` (atomically)."""
    log.info("building the CPU kernels for -march=%s (about half a minute, once per machine)", arch)
    with tempfile.TemporaryDirectory(prefix="infinikv-kernels-") as tmp:
        objects = [str(Path(tmp) / f"{Path(src).stem}.o") for src in SOURCES]
        so = Path(tmp) / "kernels.so"
        compiles = [
            spawn(cc, [*COMPILE, f"-march={arch}", *EXACT.get(src, ()), str(HERE / src), "-o", obj])
            for src, obj in zip(SOURCES, objects, strict=True)
        ]
        finish(cc, *compiles)
        finish(cc, spawn(cc, [*LINK, *objects, "-o", str(so), "-lm"]))
        if keep is not None:
            try:
                partial = keep.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(so, partial)
                os.replace(partial, keep)  # another process sees the whole file or none
            except OSError as e:
                log.warning("cannot cache the CPU kernels in %s: %s", keep, e)
        return ctypes.CDLL(str(so))  # mapped now: the file may go


def spawn(cc: str, args: list[str]) -> subprocess.Popen:
    try:
        return subprocess.Popen([cc, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise KernelBuildError(f"could not run the C compiler {cc!r}: {e}") from e


def finish(cc: str, *procs: subprocess.Popen) -> str:
    """Wait for every process (none left writing), then raise the first failure; the first's output."""
    outputs = [proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        if proc.returncode:
            raise KernelBuildError(f"{cc} could not build the CPU kernels: {err.strip()[-800:]}")
    return str(outputs[0][0])


def run(cc: str, args: list[str]) -> str:
    return finish(cc, spawn(cc, args))
