"""Find a model (directory, GGUF file, hub id, or the default), convert GGUF once to a
cached safetensors directory, and build the decoder plus its tokenizer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinikv.core.config import ModelConfig
from infinikv.errors import ModelNotFoundError, UnsupportedModelError
from infinikv.model.default import default_gguf
from infinikv.model.linear import QUANTIZATIONS, DenseLinear, Int8Linear, quantize_int4
from infinikv.model.llama import LlamaModel
from infinikv.model.weights import TensorGetter, build_model

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: Any  # transformers tokenizer
    config: ModelConfig
    path: Path  # the transformers-format directory the weights were read from
    eos_token_ids: frozenset[int]


def load_model(
    spec: str | None,
    cache_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantize: str = "none",
) -> LoadedModel:
    """Load `spec` (None = the default SmolLM2-135M-Instruct); quantize="bf16" stores the
    weight matrices and the output head as bfloat16, "int4" the decoder layers' weight
    matrices as int4 and the output head as int8, "int4-decode" keeps the float weights
    too, for prefill chunks (CPU only; see `infinikv.model.linear`; the embedding lookup
    keeps its float table)."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantize != "none" and torch.device(device).type != "cpu":
        hint = " (--dtype bfloat16 stores bfloat16 weights on any device)" if quantize == "bf16" else ""
        raise UnsupportedModelError(f"{quantize} weights run on the CPU only, not on {device}{hint}")
    if quantize == "bf16" and dtype != torch.float32:
        raise UnsupportedModelError(
            f"bf16 weights go with float32 activations: a {dtype} model has them already"
        )
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = resolve_model_dir(spec, cache_dir)
    hf_config = AutoConfig.from_pretrained(path)
    cfg = ModelConfig.from_hf(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with open_checkpoint(path) as get:
        matrices = torch.bfloat16 if quantize == "bf16" else None  # converted as read: no float32 copy
        model = build_model(cfg, get, dtype=dtype, device=device, matrix_dtype=matrices)
    if quantize == "bf16":
        if model.lm_head is None:
            model.lm_head = DenseLinear.of(model.embed.detach().bfloat16())
    elif quantize != "none":
        keep_dense = quantize == "int4-decode"
        quantize_int4(model.layers, keep_dense)
        head = model.embed if model.lm_head is None else model.lm_head.weight
        model.lm_head = Int8Linear(head, keep_dense)
    eos: set[int] = set()
    sources: list[Any] = [hf_config.eos_token_id, tokenizer.eos_token_id]
    if (path / "generation_config.json").is_file():
        sources.append(GenerationConfig.from_pretrained(path).eos_token_id)
    for ids in sources:
        eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return LoadedModel(model, tokenizer, cfg, path, frozenset(eos))


def resolve_model_dir(spec: str | None, cache_dir: Path) -> Path:
    """A transformers-format directory for `spec`, converting or fetching as needed."""
    if not spec:
        return convert_gguf(default_gguf(cache_dir), cache_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {spec} has no config.json")
        return path
    if HUB_ID.match(spec) and not path.exists():
        return _hub_snapshot(spec)
    raise ModelNotFoundError(f"model not found: {spec!r} (not a directory, a .gguf file, or a hub id)")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # hub errors come in many classes (offline, 404, auth)
        raise ModelNotFoundError(f"could not get model {repo_id!r} from the hub: {e}") from e


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """De-quantize a GGUF once into cache_dir/<stem>-<hash>/ (safetensors + config + tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    folder, name = str(gguf.parent), gguf.name
    # Refuse an unsupported architecture before the slow de-quantization.
    ModelConfig.from_hf(AutoConfig.from_pretrained(folder, gguf_file=name))
    log.warning("converting %s to safetensors in %s (one time; ~20 s for the default model)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_hf_directory(hf_model, tokenizer, tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_hf_directory(hf_model: Any, tokenizer: Any, dest: Path) -> None:
    from safetensors.torch import save_file

    state = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with the embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"))
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)  # the weights we write are plain float32
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    hf_model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


@contextlib.contextmanager
def open_checkpoint(path: Path) -> Iterator[TensorGetter]:
    """Lazy tensor access to a directory's safetensors shards (or a pytorch_model.bin)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        yield state.__getitem__
        return
    else:
        raise ModelNotFoundError(f"no weights (*.safetensors or pytorch_model.bin) in {path}")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(path / f), framework="pt")) for f in files]
        where = {name: h for h in handles for name in h.keys()}

        def get(name: str) -> torch.Tensor:
            return where[name].get_tensor(name)  # KeyError if absent

        yield get
