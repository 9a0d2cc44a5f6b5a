"""The packages form layers that only point down: every import of an infinikv module (at the
top of a file or inside a function) goes to its own package or to one listed before it."""

from __future__ import annotations

import ast
from pathlib import Path

import infinikv

# Bottom to top; a package may import its own modules and those of the packages before it.
LAYERS = [
    "errors",
    "documents",  # uploaded files read into text with their chapters and pages
    "core",  # config, rotary maths, partial attention, reference Self-Extend maths
    "cache",  # the paged KV cache
    "kernels",  # C and Triton kernels, each beside its plain-PyTorch reference
    "memory",  # evicted blocks: index, key sketch, RAM tier, block store
    "attention",  # the backends' causal and long-context entry points
    "model",  # the Llama-family decoder and its loading
    "engine",  # sequences, generation, speculative decoding, sessions, the scheduler
    "evaluation",  # recall suites and retrieval probes
    "service",  # settings, runtime, HTTP server
    "api",  # the Python API
    "cli",
    "__init__",
]


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.startswith("infinikv.")]


def test_every_import_points_down_the_layers() -> None:
    root = Path(infinikv.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        source = parts[0] if len(parts) > 1 else path.stem
        assert source in LAYERS, f"{path} is in no layer: add its package to LAYERS"
        for name in imports(path):
            target = name.split(".")[1]
            if LAYERS.index(target) > LAYERS.index(source):
                upward.append(f"{path.relative_to(root)} imports {name}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)
