"""Shared fixtures: the real default model (converted once into the user cache) and tiny
random Llama-family models built through transformers, so both sides of every oracle
test load the same weights."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors; the
    # variable must be set before the first kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infinikv.core.config import ModelConfig
from infinikv.engine.generator import Generator, Transcript
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.sequence import feed
from infinikv.engine.tasks import Failed, Finished, TaskHandle
from infinikv.kernels.cpu.ops import bf16_dot
from infinikv.memory.evicted import EvictedMemory
from infinikv.memory.store import InProcessBlockStore, RedisBlockStore
from infinikv.model.llama import LlamaModel
from infinikv.model.loader import LoadedModel, load_model
from infinikv.model.weights import build_model
from infinikv.service.runtime import attach_kernels
from infinikv.service.settings import Settings

from .redis_server import redis_server

CACHE_DIR = Settings().cache_dir


def kernel_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows of x as the few-row kernels multiply weights of `dtype` by them: rounded to
    bfloat16 for bfloat16 weights on CPUs with AVX512-BF16."""
    return x.bfloat16().to(x.dtype) if dtype == torch.bfloat16 and bf16_dot() else x


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 (first use converts the GGUF, ~20 s)."""
    return load_model(None, CACHE_DIR)


@pytest.fixture(scope="session")
def bf16_model() -> LoadedModel:
    """The default model with bfloat16 weight matrices (`--quantize bf16`) on the CPU kernels."""
    loaded = load_model(None, CACHE_DIR, quantize="bf16")
    attach_kernels(loaded, "cpu")
    return loaded


@pytest.fixture(scope="session")
def tokenizer(default_model: LoadedModel):
    return default_model.tokenizer


@pytest.fixture
def cpu_kernels(default_model: LoadedModel):
    """The default model with the `cpu` backend's kernels, as infinikv runs it on a CPU
    (the tests without this fixture hold the PyTorch path to their oracles); restored after."""
    attach_kernels(default_model, "cpu")
    yield default_model
    attach_kernels(default_model, "torch")  # the defaults: plain PyTorch


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A random transformers model with weights scaled so activations are O(1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


def ours_from_hf(hf_model, dtype: torch.dtype = torch.float32) -> LlamaModel:
    cfg = ModelConfig.from_hf(hf_model.config)
    return build_model(cfg, hf_model.state_dict().__getitem__, dtype=dtype)


# The tiny model of the engine tests (batching, the prefix cache): 4-token pages, 160 ids.
TINY_PAGE = 4
TINY_VOCAB = 160


@pytest.fixture(scope="module", params=["cpu", "torch"])
def kernel_tiny(request, tokenizer) -> LoadedModel:
    """A random model whose head_dim (64) the CPU kernels take, on the `cpu` and the `torch`
    backend, with the default tokenizer for detokenizing (its first TINY_VOCAB ids are real
    tokens)."""
    hf = tiny_hf_model("llama", seed=7, hidden_size=256, num_attention_heads=4, max_position_embeddings=256)
    model = ours_from_hf(hf)
    loaded = LoadedModel(model, tokenizer, model.cfg, Path("tiny"), frozenset())
    attach_kernels(loaded, request.param)
    return loaded


def tiny_generator(loaded: LoadedModel, long: bool, **kwargs: Any) -> Generator:
    """4 slots of 256 tokens, 16-token chunks, NaN-filled fresh pages (a read of an unwritten
    slot shows up); `long`: a 32-token resident window (8 sinks, W 12, G 2), so prompts past
    it evict into memory."""
    config = None
    if long:
        config = LongContextConfig.derive(256, TINY_PAGE, resident=32, sinks=8, window=12, group=2)
        config.validate(256, TINY_PAGE)
    return Generator(
        loaded,
        256,
        page_size=TINY_PAGE,
        chunk_size=16,
        fill_value=float("nan"),
        long_context=config,
        store=InProcessBlockStore(),
        slots=4,
        **kwargs,
    )


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def nan_pool(
    model: LlamaModel,
    max_tokens: int = 512,
    page_size: int = 5,
    long_context: LongContextConfig | None = None,
    kv_dtype: torch.dtype | None = None,
):
    """A page pool whose fresh pages are NaN: any read of an unwritten slot shows up; for
    sequences with `long_context` (its Self-Extend group), in `kv_dtype` (None: the model's)."""
    group = 1 if long_context is None else long_context.group
    return model.new_page_pool(max_tokens, page_size, fill_value=float("nan"), group=group, dtype=kv_dtype)


def retrieve(mem: EvictedMemory, layer: int, q: torch.Tensor, top_k: int):
    """Token granularity: keys, values (Hkv, nq, K, d) and valid (Hkv, nq, K) of a memory's top-k."""
    rows, valid = mem.select(layer, q, top_k)
    return (*mem.gather(layer, rows), valid)


def retrieve_blocks(
    mem: EvictedMemory,
    layer: int,
    q: torch.Tensor,
    max_blocks: int,
    ranking: str = "bound",
    position: int = 0,
):
    """Block granularity: keys, values (Hkv, P, nb * B, d) of the blocks a memory selects
    for groups q (Hkv, P, m, d), group p at position `position` + p."""
    return mem.gather(layer, mem.select_blocks(layer, q, max_blocks, ranking, position))


# A redis-server of each test module's own (loopback, no persistence); the block stores a
# test runs against: in-process, and Redis emptied first.
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(params=["inprocess", "redis"])
def store(request):
    if request.param == "inprocess":
        yield InProcessBlockStore()
        return
    made = RedisBlockStore(request.getfixturevalue("redis_url"))
    made.delete_prefix("")
    yield made
    made.close()


def generation_task(prompt: list[int], params: SamplingParams, history: list[int] | None = None):
    """A step function for the engine: the tokens of `prompt`'s generation, in a sequence
    of its own, after `history` if given (fed first, as a session's earlier turns)."""

    def run(engine: Engine, task):
        gen = engine.generator
        seq = task.seq = gen.new_sequence(f"ikv:test:{uuid.uuid4().hex}:")
        try:
            if history:
                feed(gen.model, gen.pool, seq, history, gen.chunk_size, "none")
            out = Transcript()
            yield from engine.generator.run(seq, prompt, params, None, out)
            return out.token_ids
        finally:
            seq.release()

    return run


def task_result(handle: TaskHandle) -> Any:
    """A task's result (its error raised), its other items skipped."""
    while True:  # bounded by the timeout of each read
        item = handle.next_blocking(timeout=600)
        if isinstance(item, Failed):
            raise item.error
        if isinstance(item, Finished):
            return item.value
