"""Real model: a passkey far outside the resident window is recalled through the memory and
lost by the same window without it (sliding window)."""

from __future__ import annotations

import pytest

from infinikv.engine.generator import Generator
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sampling import SamplingParams
from infinikv.evaluation.passkey import found, passkey_case

pytestmark = pytest.mark.slow

PROMPT_TOKENS = 2000
# Key positions ~100..1300 tokens: all evicted from a 512-token resident window.
DEPTHS = [0.05, 0.17, 0.29, 0.41, 0.53, 0.65]


def accuracy(default_model, memory: bool, granularity: str = "token") -> float:
    cfg = LongContextConfig.derive(
        8192, 16, resident=512, window=128, group=4, memory=memory, granularity=granularity
    )
    gen = Generator(default_model, max_seq_len=PROMPT_TOKENS + 64, long_context=cfg)
    hits = 0
    for seed, depth in enumerate(DEPTHS):
        case = passkey_case(default_model.tokenizer, PROMPT_TOKENS, depth, seed)
        answer = gen.generate(case.prompt, SamplingParams(max_tokens=8)).text
        hits += found(case.key, answer)
    return hits / len(DEPTHS)


def test_memory_recalls_what_the_sliding_window_forgets(default_model) -> None:
    """Token granularity on the PyTorch path (block granularity, the default, runs below on
    the kernels a CPU uses)."""
    with_memory = accuracy(default_model, memory=True)
    sliding = accuracy(default_model, memory=False)
    print(f"passkey at {PROMPT_TOKENS} tokens, 512 resident: memory {with_memory:.2f}, sliding {sliding:.2f}")
    assert with_memory >= 0.65
    assert with_memory - sliding >= 0.5


def test_memory_recalls_through_the_cpu_kernels(cpu_kernels) -> None:
    """The same recall with block granularity and the kernels infinikv runs on a CPU: decode
    steps' resident runs through the C attention, merged with the memory by LSE, and the C
    projections."""
    blocks = accuracy(cpu_kernels, memory=True, granularity="block")
    print(f"passkey at {PROMPT_TOKENS} tokens, 512 resident, cpu kernels: memory {blocks:.2f}")
    assert blocks >= 0.65
