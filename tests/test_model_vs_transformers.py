"""Our decoder against transformers on the same random weights, across architectures."""

from __future__ import annotations

import pytest
import torch

from infinikv.engine.sequence import Sequence, feed
from infinikv.model.linear import few_row_kernels

from .conftest import nan_pool, ours_from_hf, tiny_hf_model

CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa-bias": ("llama", {"num_key_value_heads": 1, "attention_bias": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "linear-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
    ),
    "mistral": ("mistral", {"sliding_window": None, "head_dim": 24}),
    "qwen2": ("qwen2", {"use_sliding_window": False}),
}


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()  # (T, V)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk,page", [(512, 16), (7, 5), (1, 3)])
@pytest.mark.parametrize("projections", ["torch", "cpu"])
def test_logits_match_transformers(name: str, chunk: int, page: int, projections: str) -> None:
    """projections "cpu": inputs of few rows (chunks of 7 and 1) through the C kernel."""
    model_type, overrides = CONFIGS[name]
    hf = tiny_hf_model(model_type, **overrides)
    ours = ours_from_hf(hf)
    ours.use_few_rows(few_row_kernels(projections))
    ids = torch.randint(0, hf.config.vocab_size, (45,), generator=torch.Generator().manual_seed(1))
    pool = nan_pool(ours, page_size=page)
    got = feed(ours, pool, Sequence(pool), ids.tolist(), chunk, logits="all")  # (T, V)
    want = hf_logits(hf, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_bfloat16_close_to_float32() -> None:
    hf = tiny_hf_model("llama")
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours = ours_from_hf(hf, dtype)
        pool = nan_pool(ours)
        logits[dtype] = feed(ours, pool, Sequence(pool), ids, 16, logits="all")
    err = (logits[torch.bfloat16] - logits[torch.float32]).abs().max()
    scale = logits[torch.float32].abs().max()
    assert err < 0.05 * scale, f"bf16 error {err} vs logit scale {scale}"
    assert (logits[torch.bfloat16].argmax(-1) == logits[torch.float32].argmax(-1)).float().mean() > 0.9
