"""The real default model (SmolLM2-135M-Instruct) against transformers on the same weights."""

from __future__ import annotations

import time

import pytest
import torch

from infinikv.engine.generator import Generator
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import Sequence, feed

pytestmark = pytest.mark.slow

PASSAGE = (
    "The lighthouse keeper rose before dawn, as he had every day for thirty years. "
    "He climbed the spiral stairs, counted the one hundred and twelve steps, and wiped "
    "the salt from the great lens. Out on the water, the fishing boats were already "
    "leaving the harbour, their lamps bobbing like fireflies. "
)


@pytest.fixture(scope="module")
def hf_model(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(default_model) -> list[int]:
    ids = default_model.tokenizer(PASSAGE * 5)["input_ids"]
    assert 250 <= len(ids) <= 400
    return ids


@pytest.fixture(scope="module")
def hf_reference(hf_model, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = hf_model(ids).logits[0].float()
        out = hf_model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    return logits, out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("chunk,page", [(512, 16), (100, 7), (37, 13), (64, 64)])
def test_prompt_logits_match_transformers(default_model, prompt, hf_reference, chunk, page) -> None:
    model = default_model.model
    pool = model.new_page_pool(1024, page, fill_value=float("nan"))
    got = feed(model, pool, Sequence(pool), prompt, chunk, logits="all")
    want = hf_reference[0]
    diff = (got - want).abs().max().item()
    print(f"chunk={chunk} page={page} max |logit diff| = {diff:.2e}")
    assert diff < 1e-3  # observed ~7e-5 with logits of magnitude ~30


@pytest.mark.parametrize("chunk,page", [(512, 16), (100, 7), (37, 13)])
def test_64_greedy_tokens_identical(default_model, prompt, hf_reference, chunk, page) -> None:
    gen = Generator(
        default_model, max_seq_len=1024, page_size=page, chunk_size=chunk, fill_value=float("nan")
    )
    result = gen.generate(prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    assert result.token_ids == hf_reference[1]
    assert result.finish_reason == "length"
    assert result.text == default_model.tokenizer.decode(hf_reference[1], skip_special_tokens=True)


@pytest.mark.parametrize("chunk,page", [(512, 16), (16, 7)])  # 16-token chunks: every row through the kernels
def test_cpu_kernels_match_transformers(cpu_kernels, prompt, hf_reference, chunk, page) -> None:
    model = cpu_kernels.model
    pool = model.new_page_pool(1024, page, fill_value=float("nan"))
    got = feed(model, pool, Sequence(pool), prompt, chunk, logits="all")
    diff = (got - hf_reference[0]).abs().max().item()
    print(f"cpu kernels chunk={chunk} page={page} max |logit diff| = {diff:.2e}")
    assert diff < 1e-3
    gen = Generator(cpu_kernels, max_seq_len=1024, page_size=page, chunk_size=chunk, fill_value=float("nan"))
    result = gen.generate(prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    assert result.token_ids == hf_reference[1]


def test_chat_answer_and_eos(default_model) -> None:
    gen = Generator(default_model, max_seq_len=1024)
    prompt = gen.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = gen.generate(prompt, SamplingParams(max_tokens=40))
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # ended on <|im_end|>, not the token budget


def test_decode_time_ends_at_the_last_token_not_after_the_release(default_model, monkeypatch) -> None:
    """A sequence's release (freeing its memory and store keys, ~0.3 s after a 32k prompt)
    comes after the answer; it is not decoding time."""
    released = []
    release = Sequence.release

    def slow_release(self):
        released.append(time.perf_counter())
        time.sleep(0.2)
        release(self)

    monkeypatch.setattr(Sequence, "release", slow_release)
    gen = Generator(default_model, max_seq_len=1024)
    start = time.perf_counter()
    prompt = default_model.tokenizer("Once upon a time")["input_ids"]
    result = gen.generate(prompt, SamplingParams(max_tokens=4))
    assert len(released) == 1
    assert start + result.prefill_seconds + result.decode_seconds <= released[0]
