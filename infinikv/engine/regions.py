"""Long-context settings for a sequence: validated, with defaults derived from the model's
trained length (Self-Extend's rules from the LongLM README)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from infinikv.attention.memory_reads import OWN_BLOCK_POSITIONS, LongContextState
from infinikv.core.config import ModelConfig
from infinikv.core.self_extend import SelfExtend
from infinikv.engine.reread import Reread
from infinikv.kernels.cpu.ops import bf16_tiles
from infinikv.memory.budget import RamBudget, memory_capacity
from infinikv.memory.cache import block_bytes
from infinikv.memory.evicted import EvictedMemory, MemorySpec
from infinikv.memory.favourites import FAVOURITES_PER_BLOCK
from infinikv.memory.index import INDEX_KINDS
from infinikv.memory.store import BlockStore

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LongContextConfig:
    resident: int  # R: tokens kept in pages, sinks included; older blocks are evicted
    sinks: int  # S: first tokens, never evicted (a multiple of the page size)
    window: int  # W: neighbor window at exact positions
    group: int  # G: Self-Extend group size for older resident tokens
    top_k: int  # token granularity: memory entries retrieved per query head and layer
    distance: int  # D: the relative position every memory entry is read at
    memory: bool = True  # False: evicted blocks are dropped (sliding window)
    index: str = "flat"
    # "block": one summary per block in the index plus a key sketch, ~2.6x faster prefill
    # at 8k than "token", whose chunks search every evicted key (the README's settings).
    granularity: str = "block"
    # Block granularity: memory blocks a prefill chunk's earlier positions share (and, with
    # token_top_k 0, the answering positions' own), per kv-head and layer: 16 blocks of 16
    # tokens = 256 keys. Not tuned on the recall suite (docs/recall.md).
    max_blocks: int = 16
    # Block granularity with token_top_k 0: query channels the answering positions rank
    # blocks with over the key sketch (SparQ's r; at most head_dim; docs/recall.md).
    sketch_channels: int = 16
    # Block granularity: positions per full ranking over the sketch (memory/favourites.py);
    # 8 decodes 1.17x faster at 32k but recalls less than 1 (docs/notes/long_context.md).
    sketch_every: int = 1
    # Block granularity: host RAM for the evicted memory: blocks' keys and values (the block
    # store holds them all; the least recently used leave RAM first) and the search
    # structures (key sketch, block summaries), which grow with the memory and take RAM from
    # the blocks. Must hold what one retrieval reads at once (`ram_blocks_needed`); sets
    # the longest sequence (`memory_tokens`). 2 GiB: SmolLM2-135M's blocks of 39k tokens
    # with their search structures, or the memory of 170k tokens.
    ram_budget_mb: int = 2048
    # Block granularity: > 0: the answering positions' query heads each attend to their own
    # top tokens by the key sketch (LongContextState.token_top_k); derive() sets 256.
    token_top_k: int = 0
    # Memory keys keep their order within spans of this many tokens (MemorySpec.span); 1:
    # every key at D.
    span: int = 1
    # A sequence keeps every token resident until it is longer than this, then its oldest
    # blocks leave down to R at once. 0: they leave as soon as R is full.
    evict_after: int = 0
    # Past the resident window, with a memory: the answer is generated over the history's
    # sinks, this many passages the prompt's last position attends to most, and its last
    # `reread_tail` tokens (engine/reread.py). 0: over the whole memory-attended history.
    reread: int = 0
    reread_margin: int = 32  # tokens kept on either side of a re-read passage's window
    reread_tail: int = 256
    # "float32" or "bfloat16": what prefill chunks past the window read resident keys in on
    # the CPU backend (LongContextState.chunk_dtype).
    chunk_dtype: str = "float32"

    @classmethod
    def derive(
        cls, trained_len: int, page_size: int, **overrides: int | bool | str | None
    ) -> LongContextConfig:
        """Defaults for a model trained to `trained_len` tokens; None overrides are ignored."""
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        # Chosen on the recall suite's tuning split (docs/recall.md, "Choosing the defaults").
        # The trained length resident: up to it exactly the plain model; beyond it the memory.
        resident = int(given.get("resident", trained_len))
        # 64 sink tokens keep the BOS and a short system prompt exact, rounded to whole pages.
        sinks = int(given.get("sinks", page_size * math.ceil(64 / page_size)))
        # No Self-Extend groups: the resident tokens stay within the trained length at exact
        # positions.
        group = int(given.get("group", 1))
        window = int(given.get("window", resident - sinks - 2 * page_size if group == 1 else resident // 2))
        base = cls(
            resident=resident,
            sinks=sinks,
            window=window,
            group=group,
            # 64 entries per head: a few blocks' worth, enough for a passkey-sized fact.
            top_k=64,
            # Memory read L/16 (512) tokens back: as good as 2048 at 8k, closer to the
            # positions the model was trained on.
            distance=trained_len // 16,
            # Each answering query head its own 256 keys by the sketch's all-channel logits:
            # they capture 0.96-1.00 of exact attention's mass, whole blocks 0.03-0.15.
            token_top_k=256,
            # Past R the answer re-reads 16 passages: a planted fact's window is among the
            # deeper layers' first few on the tuning split; 16 also covers four-fact tasks.
            reread=16,
            # Prefill past the window in bfloat16 tiles (AMX or AVX512-BF16): 1.1-1.5x faster, the
            # recall suite's answers unchanged at 16k (docs/recall.md, "Prefill in bfloat16").
            chunk_dtype="bfloat16" if bf16_tiles() else "float32",
        )
        return replace(base, **given)

    @property
    def rereader(self) -> Reread | None:
        if not self.reread or not self.memory or self.granularity != "block":
            return None
        return Reread(self.reread, self.reread_margin, self.sinks, self.reread_tail)

    @property
    def peak_resident(self) -> int:
        """Most tokens a sequence keeps in pages after a forward (before its first eviction)."""
        return max(self.resident, self.evict_after)

    @property
    def sink_gap(self) -> int:
        """How far before the oldest other resident token the sinks sit once blocks between
        were evicted (PageList.of): W with Self-Extend groups (they read grouped), else
        right before it, so their distance stays that of the resident window."""
        return self.window if self.group > 1 else 1

    def ram_blocks(self, model: ModelConfig, page_size: int) -> int:
        """Evicted blocks the RAM budget holds (before any search structures)."""
        return self.ram_budget_mb * 2**20 // self._block_bytes(model, page_size)

    def ram_budget(self, model: ModelConfig) -> RamBudget:
        return RamBudget(self.ram_budget_mb * 2**20, self.ram_blocks_needed(model))

    def memory_tokens(self, model: ModelConfig, page_size: int) -> int | None:
        """Most evicted tokens a sequence's memory holds within the RAM budget (None: no
        bound, the memory is off or keeps every key in an index in RAM)."""
        if not self.memory or self.granularity != "block":
            return None
        L, H, d = model.num_layers, model.num_kv_heads, model.head_dim
        budget = self.ram_budget(model)
        return memory_capacity(budget, L, H, d, page_size, self.index, self._block_bytes(model, page_size))

    @staticmethod
    def _block_bytes(model: ModelConfig, page_size: int) -> int:
        """Bytes of one evicted block in the RAM tier (float32, as `new_state`'s memory)."""
        shape = (model.num_layers, page_size, model.num_kv_heads, model.head_dim)
        return block_bytes(shape, torch.float32)

    def ram_blocks_needed(self, model: ModelConfig) -> int:
        """Blocks one layer's retrieval may read at once, per kv-head: max_blocks for each of
        the OWN_BLOCK_POSITIONS trailing positions and for the chunk's shared set, or the
        favourites and up to max_blocks blocks evicted since they were ranked; or, with
        token_top_k, one query row's tokens."""
        per_block = max(OWN_BLOCK_POSITIONS + 1, FAVOURITES_PER_BLOCK + 1)
        return model.num_kv_heads * max(per_block * self.max_blocks, self.token_top_k)

    def validate(self, trained_len: int, page_size: int, model: ModelConfig | None = None) -> None:
        """Refuse impossible combinations, naming the rule that failed (with `model`, also
        the RAM budget's)."""
        R, S, W, G, L, B = self.resident, self.sinks, self.window, self.group, trained_len, page_size
        rules = [
            (S >= 0 and S % B == 0, f"sinks S={S} must be a multiple of the page size B={B}"),
            (
                W >= 1 and G >= 1 and self.top_k >= 1,
                f"window={W}, group={G}, top_k={self.top_k} must be >= 1",
            ),
            (
                R >= S + W + 2 * B,
                f"resident R={R} must hold sinks, window and two pages: R >= S + W + 2B = {S + W + 2 * B}",
            ),
            (
                (L - W) * G + W >= self.peak_resident,
                f"Self-Extend cannot cover the resident window: (L - W) * G + W = {(L - W) * G + W} < "
                f"max(R, evict_after) = {self.peak_resident} (L={L} trained length)",
            ),
            (
                0 < self.distance < L,
                f"memory distance D={self.distance} must lie inside the trained range (0, {L})",
            ),
            (
                self.span >= 1 and self.distance + self.span <= L,
                f"memory span {self.span} must be >= 1 and keep D + span = {self.distance + self.span} "
                f"within the trained length {L}",
            ),
            (self.index in INDEX_KINDS, f"index {self.index!r} is not one of {', '.join(INDEX_KINDS)}"),
            (
                self.granularity in ("token", "block"),
                f"granularity {self.granularity!r} is not token or block",
            ),
            (self.max_blocks >= 1, f"max_blocks={self.max_blocks} must be >= 1"),
            (self.sketch_channels >= 1, f"sketch_channels={self.sketch_channels} must be >= 1"),
            (self.sketch_every >= 1, f"sketch_every={self.sketch_every} must be >= 1"),
            (
                self.chunk_dtype in DTYPES,
                f"chunk_dtype {self.chunk_dtype!r} is not one of {', '.join(DTYPES)}",
            ),
            (
                self.reread >= 0 and self.reread_margin >= 0 and self.reread_tail >= 1,
                f"reread={self.reread}, reread_margin={self.reread_margin} must be >= 0 and "
                f"reread_tail={self.reread_tail} >= 1",
            ),
        ]
        if model is not None and self.memory and self.granularity == "block":
            held, needed = self.ram_blocks(model, page_size), self.ram_blocks_needed(model)
            rules.append(
                (
                    held >= needed,
                    f"ram_budget_mb={self.ram_budget_mb} holds {held} blocks, one retrieval reads up to "
                    f"kv-heads x {OWN_BLOCK_POSITIONS + 1} x max_blocks = {needed}",
                )
            )
            rules.append(
                (
                    (self.memory_tokens(model, page_size) or 0) >= page_size,
                    f"ram_budget_mb={self.ram_budget_mb} leaves no room for the search structures "
                    f"of one evicted block beside the {needed} blocks one retrieval reads",
                )
            )
        for ok, message in rules:
            if not ok:
                raise ValueError(f"invalid long-context settings: {message}")
        farthest = W + (self.peak_resident - W) / G
        if G > 1 and farthest >= 2 * L / 3:
            log.warning(
                "Self-Extend uses relative positions up to W + (R - W)/G = %.0f, beyond 2/3 of the "
                "trained length %d, which LongLM found poorly trained",
                farthest,
                L,
            )

    def new_state(
        self,
        model: ModelConfig,
        page_size: int,
        store: BlockStore | None = None,
        prefix: str = "",
        device: torch.device | str = "cpu",
    ) -> LongContextState:
        """A fresh sequence's state; with a store, evicted blocks are written through under
        prefix; the RAM tier's slab lives on `device` (the KV pool's)."""
        memory = None
        if self.memory:
            memory = EvictedMemory(
                MemorySpec(
                    model.num_layers,
                    model.num_kv_heads,
                    model.head_dim,
                    page_size,
                    index_kind=self.index,
                    granularity=self.granularity,
                    sketch_channels=self.sketch_channels,
                    sketch_every=self.sketch_every,
                    ram_budget=self.ram_budget(model),
                    span=self.span,
                    rope=model.rope,
                ),
                store=store,
                prefix=prefix,
                device=device,
            )
        return LongContextState(
            SelfExtend(self.window, self.group),
            self.top_k,
            self.distance,
            memory,
            self.max_blocks,
            self.token_top_k,
            chunk_dtype=DTYPES[self.chunk_dtype],
        )
