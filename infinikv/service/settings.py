"""All settings, validated, from `INFINIKV_*` environment variables and CLI flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from infinikv.engine.regions import DTYPES, LongContextConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFINIKV_", frozen=True)

    model: str | None = Field(None, description="directory, .gguf file or hub id; None = default")
    dtype: Literal["float32", "bfloat16"] = "float32"
    # bf16: weight matrices and head as bfloat16, computed in float32 (half the bytes per
    # decode step); int4: decoder weight matrices as 4-bit groups of 32 (exact for GGUF Q4_1
    # weights), the head as 8-bit ones (exact for Q8_0); int4-decode: float32 weights kept
    # for prefill too.
    quantize: Literal["none", "bf16", "int4", "int4-decode"] = "none"
    device: str = "cpu"
    # "auto": the Triton kernels on CUDA (when triton is installed), the C kernels on the CPU
    # (float32 models, head_dim 64/128, a C compiler at hand), plain PyTorch otherwise.
    attention_backend: Literal["auto", "torch", "cpu", "triton"] = "auto"
    cache_dir: Path = Path.home() / ".cache" / "infinikv"
    # 16-token pages: small enough that the unused tail of a sequence's last page is cheap,
    # large enough that a block table of an 8k sequence is 512 entries.
    page_size: int = Field(16, ge=1, le=4096)
    # 512-query prefill chunks bound activation memory (~N x intermediate_size floats).
    chunk_size: int = Field(512, ge=1, le=65536)
    # The model's trained length for the default SmolLM2 (8192); the KV pool holds this many.
    max_seq_len: int = Field(8192, ge=16)
    threads: int | None = Field(None, ge=1)
    # Full KV pages of prompts kept for prompts that start with the same tokens (a chat
    # template's system turn, a document asked again), while the pool has room for them.
    prefix_cache: bool = True
    # What the KV pages keep keys and values in; None: the model's dtype. bfloat16 halves the
    # bytes a decode step reads from its context (docs/performance.md has the price in recall).
    kv_dtype: Literal["float32", "bfloat16"] | None = None
    # Long context: Self-Extend over a bounded resident window, older blocks evicted into a
    # kNN memory. Unset knobs are derived from the model's trained length
    # (engine/regions.py); impossible combinations are refused at start.
    long_context: bool = True
    resident: int | None = Field(None, ge=1, description="tokens kept in pages, sinks included")
    sinks: int | None = Field(None, ge=0)
    window: int | None = Field(None, ge=1, description="Self-Extend neighbor window")
    group: int | None = Field(None, ge=1, description="Self-Extend group size")
    memory: bool = True
    memory_top_k: int | None = Field(None, ge=1)
    memory_blocks: int | None = Field(None, ge=1)
    sketch_channels: int | None = Field(None, ge=1, description="query channels ranking blocks")
    sketch_every: int | None = Field(None, ge=1, description="positions per full read of the key sketch")
    ram_budget_mb: int | None = Field(
        None, ge=1, description="host RAM for evicted blocks and their search structures"
    )
    memory_distance: int | None = Field(None, ge=1)
    memory_span: int | None = Field(
        None, ge=1, description="memory keys keep their order within spans of this many"
    )
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    granularity: Literal["token", "block"] = "block"
    memory_token_top_k: int | None = Field(None, ge=0, description="memory tokens per answering query head")
    evict_after: int | None = Field(None, ge=0, description="tokens resident before the first eviction")
    reread: int | None = Field(None, ge=0, description="passages an answer re-reads past the resident window")
    reread_margin: int | None = Field(None, ge=0, description="tokens kept around each re-read passage")
    reread_tail: int | None = Field(None, ge=1, description="last tokens of the history a re-read keeps")
    chunk_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="what prefill chunks past the window attend in; None: bfloat16 with AMX or AVX512-BF16",
    )
    # Block store for evicted blocks and snapshots: in-process when unset.
    redis_url: str | None = None
    redis_cluster: bool = False

    # Speculative decoding: "lookup" (n-grams of the context), "self:N" (the target's first N
    # layers), "model" (a separate draft model, `draft_model`); unset: off.
    draft: str | None = Field(None, pattern=r"^(lookup|model|self:\d+)$")
    draft_model: str | None = Field(None, description="draft model: directory, .gguf or hub id")
    # The draft model at a lower cost setting than the target (its own weights' precision).
    draft_quantize: Literal["none", "bf16", "int4", "int4-decode"] = "int4"
    num_draft: int = Field(8, ge=1, le=16, description="most tokens drafted per step (adapted down)")

    # The HTTP server (infinikv serve).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    served_model_name: str | None = Field(None, description="model id in the API; default: from --model")
    api_keys: str | None = Field(None, description="comma-separated Bearer keys; unset: no auth")
    public_metrics: bool = Field(False, description="with api_keys, /metrics without a key")
    # Sessions across servers on one store: a server holds a session's lease while it runs a
    # request of it (renewed at half time); a request for a session held elsewhere waits.
    lease_seconds: float = Field(30.0, gt=0, description="a session lease's time to live")
    lease_wait: float = Field(30.0, ge=0, description="longest wait for a session held elsewhere")
    # Sequences the KV pool holds at once: running stateless requests plus loaded sessions
    # (idle sessions beyond that are parked). Pages are touched as used: a slot costs RAM only
    # as its sequence grows (SmolLM2, float32: ~69 KB per token, ~0.6 GB at 8k resident).
    slots: int = Field(16, ge=1, le=256)
    # Each worker round: longer prompts' chunks (forwards of their own) until they ran this many
    # rows, then every running sequence's decode token with short prompts' pieces in shared forwards.
    step_tokens: int = Field(
        512, ge=1, description="prompt rows per engine round in forwards without decode tokens"
    )
    max_batch: int = Field(32, ge=1, description="most sequences in one forward (1: no batching)")
    max_queue: int = Field(64, ge=1, description="requests waiting for the engine before 429")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest request body (documents)")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1)

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in (self.api_keys or "").split(",") if k.strip()]

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).stem if self.model else "SmolLM2-135M-Instruct"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_kv_dtype(self) -> torch.dtype | None:
        return None if self.kv_dtype is None else DTYPES[self.kv_dtype]

    def long_context_config(self, trained_len: int) -> LongContextConfig | None:
        if not self.long_context:
            return None
        return LongContextConfig.derive(
            trained_len,
            self.page_size,
            resident=self.resident,
            sinks=self.sinks,
            window=self.window,
            group=self.group,
            memory=self.memory,
            top_k=self.memory_top_k,
            max_blocks=self.memory_blocks,
            sketch_channels=self.sketch_channels,
            sketch_every=self.sketch_every,
            ram_budget_mb=self.ram_budget_mb,
            distance=self.memory_distance,
            span=self.memory_span,
            index=self.index,
            granularity=self.granularity,
            token_top_k=self.memory_token_top_k,
            evict_after=self.evict_after,
            reread=self.reread,
            reread_margin=self.reread_margin,
            reread_tail=self.reread_tail,
            chunk_dtype=self.chunk_dtype,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
