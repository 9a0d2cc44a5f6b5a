"""The decoder's shape and options, read from a transformers config and validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infinikv.errors import UnsupportedModelError

# model_type values whose decoder is exactly: RMSNorm, SwiGLU MLP, RoPE, GQA, optional qkv bias.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling only (see Llama 3.1's `apply_scaling`).
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per kv-head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Validate a `transformers.PretrainedConfig` and keep what the forward pass needs."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(getattr(hf, "architectures", None) or []) or "unknown"
            raise UnsupportedModelError(
                f"unsupported architecture: model_type={model_type!r} (architectures: {archs}); "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported activation {act!r} in {model_type}")
        if getattr(hf, "mlp_bias", False):
            raise UnsupportedModelError(f"mlp_bias=True is not supported ({model_type})")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        # Qwen2 always has q/k/v biases (no o_proj bias); Llama's `attention_bias` adds a
        # bias to all four projections.
        attention_bias = bool(getattr(hf, "attention_bias", False))
        qkv_bias = model_type == "qwen2" or attention_bias
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            rope=_rope_from_hf(hf, model_type),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and model_type != "qwen2",
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        )


def _rope_from_hf(hf: Any, model_type: str) -> RopeConfig:
    # transformers >= 5 keeps everything in `rope_parameters`; 4.x has `rope_theta` plus an
    # optional `rope_scaling` dict.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    params.update(getattr(hf, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported RoPE scaling {rope_type!r} in {model_type}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.max_position_embeddings)
        ),
    )
