"""The OpenMP thread teams the kernels (and torch) run on, one per thread that starts
parallel regions."""

from __future__ import annotations

import ctypes

OMP_PAUSE_SOFT = 1


def release_team() -> None:
    """Free the calling thread's OpenMP team, before another thread takes over the compute
    (the engine's worker). With both teams alive libgomp manages more threads than there are
    CPUs and throttles its spin-waits, so each of a decode step's ~90 parallel regions waited
    for a futex wake-up: one sequence through the engine decoded at 18 tok/s, 30 with this
    (benchmarks/bench_batching.py, 2 cores). A later region on this thread makes a new team.
    libgomp before GCC 9 has no pause: then nothing is done."""
    try:
        pause = ctypes.CDLL("libgomp.so.1").omp_pause_resource_all
    except (OSError, AttributeError):
        return
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    pause(OMP_PAUSE_SOFT)
