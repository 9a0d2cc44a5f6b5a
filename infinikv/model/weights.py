"""Map a transformers Llama-family state dict onto `LlamaModel`'s fused layout."""

from __future__ import annotations

from collections.abc import Callable

import torch

from infinikv.core.config import ModelConfig
from infinikv.core.rope import interleave_rotary_pairs
from infinikv.errors import UnsupportedModelError
from infinikv.model.llama import LlamaModel

# name -> tensor, reading lazily (a safetensors handle) or from a dict.
TensorGetter = Callable[[str], torch.Tensor]


def convert_hf_weights(
    cfg: ModelConfig, get: TensorGetter, dtype: torch.dtype, matrix_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Return LlamaModel's state dict built from transformers' parameter names; the
    projections' and the head's weight matrices in `matrix_dtype` (default: dtype), each
    converted as it is read."""

    def take(name: str, to: torch.dtype = dtype) -> torch.Tensor:
        # With matrices converted (so not shared with the file), the rest is copied too: one
        # tensor left on the checkpoint's mapping keeps all of it resident (+400 MB for bf16).
        try:
            return get(name).to(to, copy=matrix_dtype is not None)
        except KeyError:
            raise UnsupportedModelError(f"checkpoint has no tensor {name!r}") from None

    def matrix(name: str) -> torch.Tensor:
        return take(name, matrix_dtype or dtype)

    def q_and_k(prefix: str, kind: str) -> list[torch.Tensor]:
        read = matrix if kind == "weight" else take
        return [
            interleave_rotary_pairs(read(f"{prefix}.q_proj.{kind}"), cfg.num_heads, cfg.head_dim),
            interleave_rotary_pairs(read(f"{prefix}.k_proj.{kind}"), cfg.num_kv_heads, cfg.head_dim),
            read(f"{prefix}.v_proj.{kind}"),
        ]

    out = {"embed": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = matrix("lm_head.weight")
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}", f"layers.{i}"
        out[f"{o}.input_norm"] = take(f"{p}.input_layernorm.weight")
        out[f"{o}.post_norm"] = take(f"{p}.post_attention_layernorm.weight")
        out[f"{o}.qkv.weight"] = torch.cat(q_and_k(f"{p}.self_attn", "weight"))
        if cfg.qkv_bias:
            out[f"{o}.qkv.bias"] = torch.cat(q_and_k(f"{p}.self_attn", "bias"))
        out[f"{o}.o.weight"] = matrix(f"{p}.self_attn.o_proj.weight")
        if cfg.o_bias:
            out[f"{o}.o.bias"] = take(f"{p}.self_attn.o_proj.bias")
        out[f"{o}.gate_up.weight"] = torch.cat(
            [matrix(f"{p}.mlp.gate_proj.weight"), matrix(f"{p}.mlp.up_proj.weight")]
        )
        out[f"{o}.down.weight"] = matrix(f"{p}.mlp.down_proj.weight")
    return out


def build_model(
    cfg: ModelConfig,
    get: TensorGetter,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    matrix_dtype: torch.dtype | None = None,
) -> LlamaModel:
    """Create the module on the meta device and assign converted weights (no double copy);
    `matrix_dtype`: the weight matrices' (bf16 weights), default dtype."""
    with torch.device("meta"):
        model = LlamaModel(cfg, device=device)
    state = {k: v.to(device) for k, v in convert_hf_weights(cfg, get, dtype, matrix_dtype).items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()
