"""What the benchmarks print beside every table: the CPU's model and its vector features."""

from __future__ import annotations

import datetime
import json
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


def append_record(path: Path, fields: dict) -> dict:
    """`fields` with today's date, the CPU's name and features, appended to the JSON-lines
    file at `path`; the record."""
    record = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "features": cpu_features(),
        **fields,
    }
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record
