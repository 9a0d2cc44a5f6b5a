"""What the benchmarks print beside every table: the CPU's model and its vector features."""

from __future__ import annotations

import platform
from pathlib import Path

# The features the CPU kernels and torch's matmuls choose their paths by.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_features() -> list[str]:
    """Those of FEATURES the CPU has (Linux's /proc/cpuinfo flags)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in FEATURES if f in flags]
