"""Config validation and rotary embedding against transformers' own RoPE code."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from infinikv.core.config import ModelConfig
from infinikv.core.rope import RotaryEmbedding, interleave_rotary_pairs, inverse_frequencies, rotate
from infinikv.errors import UnsupportedModelError


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*GPT2LMHeadModel"):
        ModelConfig.from_hf(AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"]))


def test_unsupported_rope_scaling_is_named() -> None:
    hf = LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize(
    "params",
    [
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ],
)
def test_inverse_frequencies_match_transformers(params) -> None:
    hf = LlamaConfig(
        hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072, rope_parameters=params
    )
    want, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    got = inverse_frequencies(ModelConfig.from_hf(hf).rope, 128)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=0)


def test_rotation_matches_rotate_half_convention() -> None:
    """Interleaved complex rotation == transformers' rotate_half on un-permuted dims."""
    d, H, T = 16, 3, 11
    rope = RotaryEmbedding(ModelConfig.from_hf(LlamaConfig(hidden_size=48, num_attention_heads=3)).rope, d)
    x = torch.randn(T, H, d)  # half-split layout, as transformers stores q/k
    pos = torch.arange(100, 100 + T)
    ang = torch.outer(pos.double(), rope.inv_freq).float()  # (T, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rotate_half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    want = x * cos + rotate_half * sin
    inter = interleave_rotary_pairs(x.reshape(T, H * d).T, H, d).T.reshape(T, H, d)
    got = rotate(inter, rope.at(pos))
    torch.testing.assert_close(
        got, interleave_rotary_pairs(want.reshape(T, H * d).T, H, d).T.reshape(T, H, d)
    )


def test_rotation_preserves_relative_scores() -> None:
    """q.k depends only on the position difference: what lets keys be re-positioned."""
    d = 32
    rope = RotaryEmbedding(ModelConfig.from_hf(LlamaConfig(hidden_size=64, num_attention_heads=2)).rope, d)
    q, k = torch.randn(1, 1, d), torch.randn(1, 1, d)
    at = lambda x, p: rotate(x, rope.at(torch.tensor([p])))  # noqa: E731
    s1 = (at(q, 500) * at(k, 480)).sum()
    s2 = (at(q, 20) * at(k, 0)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)


def test_rotary_table_follows_the_model_to_a_device() -> None:
    """The table is no buffer: `.to(device)` must still move it (a CUDA model read CPU phases)."""
    from infinikv.model.llama import LlamaModel

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1)
    model = LlamaModel(ModelConfig.from_hf(cfg))
    model.to("meta")
    assert model.rope.inv_freq.device.type == "meta"
    assert model.rope.phases(3).device.type == "meta"
    model.to(torch.float16)  # same device: the table stays
    assert model.rope.inv_freq.device.type == "meta"
