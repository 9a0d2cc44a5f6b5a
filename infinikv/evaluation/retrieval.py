"""Retrieval measured against exact attention, whether or not the model answers: at a decode
step, the share of the attention mass that exact attention over the evicted tokens puts on
its top K keys that a ranking's selected blocks capture, K being the keys the selection
reads (max_blocks x page size).

    captured(ranking) = sum of p_j over the K heaviest keys that lie in the selection
                        / sum of p_j over the K heaviest keys

p = softmax of the query's logits over every evicted key at the memory distance, per query
head; the blocks are chosen per kv-head (the query heads of a group share them, as a decode
step does). A block ranking reaches 1.0 only when the K heaviest keys fill whole blocks.

A prefill chunk whose logits no one reads (an ingestion's, a prompt's before its last)
shares one set of blocks among all its query rows: CHUNK_RANKINGS choose that set, measured
the same way for every row of the chunk (its K heaviest keys' mass the shared set holds).

`RetrievalProbe` wraps a model's long-context attention and measures every ranking in
RANKINGS at each decode step of a sequence with an evicted memory (block granularity), and
with `chunks` every ranking in CHUNK_RANKINGS at each such prefill chunk.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from infinikv.attention.interface import LongContextAttentionBackend
from infinikv.attention.memory_reads import LongContextState, memory_queries, shared_chunk_queries
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.rope import RotaryEmbedding
from infinikv.memory.evicted import EvictedMemory


@dataclass(frozen=True)
class StepView:
    """What a ranking sees at one decode step of one layer."""

    memory: EvictedMemory
    layer: int
    queries: torch.Tensor  # (Hkv, g, d) float32, rotated by the memory distance
    probs: torch.Tensor  # (Hkv, g, tokens): exact attention over the evicted keys
    logits: torch.Tensor  # (Hkv, g, tokens): their logits (scaled)
    blocks: int  # blocks selected per kv-head


Ranking = Callable[[StepView], torch.Tensor]  # -> (Hkv, g, K) token indices selected


@dataclass(frozen=True)
class ChunkView:
    """What a shared ranking sees at one prefill chunk of one layer."""

    memory: EvictedMemory
    layer: int
    queries: torch.Tensor  # (Hkv, n * g, d) float32, rows (position, head in group)
    probs: torch.Tensor  # (Hkv, n * g, tokens): exact attention over the evicted keys
    blocks: int  # blocks selected per kv-head
    g: int  # query heads per kv-head


ChunkRanking = Callable[[ChunkView], torch.Tensor]  # -> (Hkv, nb) relative block numbers


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices


def _blocks(view: StepView | ChunkView, blocks: torch.Tensor) -> torch.Tensor:
    """blocks (Hkv, nb) relative numbers -> their token indices (Hkv, rows, nb * B), the
    same for every query row of a kv-head."""
    B = view.memory.page_size
    tokens = (blocks[..., None] * B + torch.arange(B)).flatten(1)  # (Hkv, nb * B)
    return tokens[:, None].expand(-1, view.queries.shape[1], -1)


def _by_bound(view: StepView) -> torch.Tensor:
    return _blocks(
        view, view.memory.rank_blocks(view.layer, view.queries[:, None], view.blocks, "bound")[:, 0]
    )


def _by_sketch(channels: int) -> Ranking:
    def rank(view: StepView) -> torch.Tensor:
        assert view.memory.sketch is not None
        scores = view.memory.sketch.block_scores(view.layer, view.queries[:, None], channels)
        return _blocks(view, _top(scores[:, 0], view.blocks))

    return rank


def _tokens_by_sketch(view: StepView) -> torch.Tensor:
    """Each query head its own top tokens by approximate logit over the key sketch (all
    channels), as many as a block selection reads."""
    assert view.memory.sketch is not None
    scores = view.memory.sketch.token_logits(view.layer, view.queries)  # (Hkv, g, tokens)
    return _top(scores, view.blocks * view.memory.page_size)


def _block_view(view: StepView, x: torch.Tensor) -> torch.Tensor:
    """(Hkv, g, tokens) -> (Hkv, g, blocks, B)."""
    B = view.memory.page_size
    return x.view(*x.shape[:2], -1, B)


def _by_exact_logit(view: StepView) -> torch.Tensor:
    """Each block's best exact logit over its tokens and the group's queries: what the sketch
    approximates with all channels and no quantization."""
    return _blocks(view, _top(_block_view(view, view.logits).amax(-1).amax(1), view.blocks))


def _by_mass(view: StepView) -> torch.Tensor:
    """The blocks holding the most exact attention mass of the group's queries: the ceiling
    of any block ranking at this budget."""
    return _blocks(view, _top(_block_view(view, view.probs).sum(-1).sum(1), view.blocks))


RANKINGS: dict[str, Ranking] = {
    "bound": _by_bound,
    "sketch8": _by_sketch(8),
    "sketch16": _by_sketch(16),
    "sketch32": _by_sketch(32),
    "sketch64": _by_sketch(64),
    "exact-logit": _by_exact_logit,
    "oracle-mass": _by_mass,
    "tokens-sketch": _tokens_by_sketch,
}


def _bound_every(positions: int) -> ChunkRanking:
    """The summary-bound selection over the rows of every `positions`-th position, each
    row's favourites first (as a decode step's query heads merge theirs)."""

    def rank(view: ChunkView) -> torch.Tensor:
        H, rows, d = view.queries.shape
        sampled = view.queries.view(H, rows // view.g, view.g, d)[:, ::positions].reshape(H, 1, -1, d)
        return view.memory.rank_blocks(view.layer, sampled, view.blocks, "bound")[:, 0]

    return rank


def _bound_of_mean(view: ChunkView) -> torch.Tensor:
    """The summary bound of each query head's mean query over the chunk (InfLLM's chunk
    lookup, by bound instead of representative keys): what the forward reads."""
    shared = shared_chunk_queries(view.queries, view.g)
    return view.memory.rank_blocks(view.layer, shared, view.blocks, "bound")[:, 0]


def _chunk_mass(view: ChunkView) -> torch.Tensor:
    """The blocks holding the most exact attention mass summed over the chunk's rows: the
    ceiling of a shared selection at this budget (by total mass, not by the metric)."""
    B = view.memory.page_size
    return _top(view.probs.view(*view.probs.shape[:2], -1, B).sum(-1).sum(1), view.blocks)


CHUNK_RANKINGS: dict[str, ChunkRanking] = {
    "bound-mean": _bound_of_mean,  # what the forward reads (attention/memory_reads.py)
    "bound-rows": _bound_every(1),
    "bound-rows-every4": _bound_every(4),
    "bound-rows-every16": _bound_every(16),
    "oracle-mass": _chunk_mass,
}


def captured_share(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """probs (Hkv, g, tokens), selected (Hkv, g, K) token indices -> (Hkv, g): the mass of
    the K heaviest keys that the selection holds, over the mass of those keys."""
    top, heaviest = probs.topk(selected.shape[-1], dim=-1)  # (Hkv, g, K)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, selected.to(probs.device), True)
    return (top * chosen.gather(-1, heaviest)).sum(-1) / top.sum(-1)


def _exact_logits(
    memory: EvictedMemory, layer: int, q: torch.Tensor, rope: RotaryEmbedding, state: LongContextState
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (n, Hq, d) before RoPE -> its memory queries (Hkv, n * g, d) float32 and their
    scaled logits over every evicted key of `layer` (Hkv, n * g, tokens)."""
    Hkv, d = memory.shape[2], memory.shape[3]
    queries = memory_queries(q, rope, state.distance, Hkv).float()
    return queries, torch.bmm(queries, memory.keys(layer).transpose(1, 2)) * d**-0.5


def _budget(memory: EvictedMemory, state: LongContextState) -> int:
    """Blocks a selection reads per kv-head."""
    return min(state.max_blocks, memory.tokens // memory.page_size)


class RetrievalProbe:
    """A long-context attention backend that runs `inner` and, at each decode step of a
    block-granular memory, records every ranking's captured share per layer and query head
    (with `chunks`, also every chunk ranking's at each shared prefill chunk, per row)."""

    def __init__(
        self,
        inner: LongContextAttentionBackend,
        rankings: dict[str, Ranking] | None = None,
        chunks: bool = False,
    ):
        self.inner = inner
        self.rankings = RANKINGS if rankings is None else rankings
        self.chunk_rankings = CHUNK_RANKINGS if chunks else {}
        # (ranking, layer) -> captured shares of each step's query heads (of each chunk's rows)
        self.shares: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.chunk_shares: dict[tuple[str, int], list[float]] = defaultdict(list)

    def __call__(
        self,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        kv: LayerKV,
        pages: PageList,
        resident: int,
        layer: int,
        rope: RotaryEmbedding,
        state: LongContextState,
    ) -> torch.Tensor:
        memory = state.memory
        if memory is not None and memory.tokens and memory.granularity == "block":
            if q.shape[0] == 1:
                self.measure(memory, layer, q, rope, state)
            elif self.chunk_rankings and not state.own_positions:
                self.measure_chunk(memory, layer, q, rope, state)
        return self.inner(q, q_positions, kv, pages, resident, layer, rope, state)

    def measure(
        self,
        memory: EvictedMemory,
        layer: int,
        q: torch.Tensor,
        rope: RotaryEmbedding,
        state: LongContextState,
    ) -> None:
        """q (1, Hq, d) before RoPE: one decode step's query of `layer`."""
        queries, logits = _exact_logits(memory, layer, q, rope, state)  # (Hkv, g, ...)
        view = StepView(memory, layer, queries, logits.softmax(-1), logits, _budget(memory, state))
        for name, rank in self.rankings.items():
            share = captured_share(view.probs, rank(view))
            self.shares[name, layer] += share.flatten().tolist()

    def measure_chunk(
        self,
        memory: EvictedMemory,
        layer: int,
        q: torch.Tensor,
        rope: RotaryEmbedding,
        state: LongContextState,
    ) -> None:
        """q (n, Hq, d) before RoPE: a prefill chunk's queries of `layer`, whose rows share
        their blocks."""
        queries, logits = _exact_logits(memory, layer, q, rope, state)  # (Hkv, n * g, ...)
        g = q.shape[1] // memory.shape[2]
        view = ChunkView(memory, layer, queries, logits.softmax(-1), _budget(memory, state), g)
        for name, rank in self.chunk_rankings.items():
            share = captured_share(view.probs, _blocks(view, rank(view)))
            self.chunk_shares[name, layer] += share.flatten().tolist()

    def layer_medians(self, chunks: bool = False) -> dict[str, list[float]]:
        """Per ranking, the median captured share of each layer (over decode steps and query
        heads; with `chunks`, over prefill chunks and their rows)."""
        shares = self.chunk_shares if chunks else self.shares
        layers = sorted({layer for _, layer in shares})
        names = self.chunk_rankings if chunks else self.rankings
        return {name: [statistics.median(shares[name, layer]) for layer in layers] for name in names}
