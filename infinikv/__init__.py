"""infinikv: memory-augmented long-context LLM generation. The Python API: `LLM`
(infinikv/api.py), imported on first use so that `import infinikv` stays light."""

from typing import Any

from infinikv.errors import InfinikvError

__all__ = ["LLM", "Completion", "InfinikvError", "Session"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("LLM", "Completion", "Session"):
        from infinikv import api

        return getattr(api, name)
    raise AttributeError(f"module 'infinikv' has no attribute {name!r}")
