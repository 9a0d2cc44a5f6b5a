"""Where a sequence's answering positions put their attention: the evidence behind citations.

For each observed query row (the positions whose logits pick a token) and every layer, the
row's attention over the whole history in one softmax, averaged over query heads: resident
keys exactly (at their Self-Extend placement), evicted keys by the 8-bit key sketch's
logits (the scores the memory selects its entries by; the entries it reads hold 0.96-1.00 of
exact attention's mass, docs/recall.md). Summed per absolute token position. A uniform
tally scores every key at the memory distance instead (re-reading's ranking), and
`top_windows` picks the passages that hold the most of either."""

from __future__ import annotations

import torch

from infinikv.attention.memory_reads import LongContextState, memory_queries
from infinikv.attention.pytorch import decode_logits, resident_bounds
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.core.self_extend import at_memory_distance


class AttentionTally:
    def __init__(self, uniform: bool = False, first_layer: int = 0) -> None:
        """uniform: every key scored as if read at the memory distance, by what it holds and
        not where it sits (what a re-read ranks passages by: engine/reread.py). Layers
        before `first_layer` are not observed."""
        self.uniform, self.first_layer = uniform, first_layer
        self.mass = torch.zeros(0, dtype=torch.float64)  # by absolute position
        self.rows = 0  # (row, layer) pairs observed

    def observe(
        self,
        layer: int,
        q: torch.Tensor,
        q_position: int,
        kv: LayerKV,
        pages: PageList,
        resident: int,
        rope: RotaryEmbedding,
        state: LongContextState,
    ) -> None:
        """One query row q (1, Hq, d) before RoPE at q_position, over the sequence's
        `resident` tokens in `pages` and its memory."""
        if layer < self.first_layer:
            return
        _, Hq, d = q.shape
        Hkv = kv.v.shape[-2]
        se = state.self_extend
        at = torch.tensor([q_position], device=q.device)
        positions = pages.positions[:resident]  # where attention reads them (sinks moved)
        tokens = positions.clone()  # which tokens they are
        tokens[: pages.sinks] -= pages.shift
        if self.uniform:
            far = at_memory_distance(q, rope, state.distance)
            scores = [decode_logits(far, pages.gather(kv.k, resident).to(q.dtype)).reshape(Hq, -1)]
            keys = [tokens]
        else:
            far_end = resident_bounds(at, positions, se)[0]
            near = rotate(q, rope.at(at))
            near_keys = pages.gather(kv.k_rope, resident, far_end).to(q.dtype)
            scores = [decode_logits(near, near_keys).reshape(Hq, -1)]
            keys = [tokens[far_end:]]
            if far_end:
                grouped = rotate(q, rope.at(se.grouped_query_positions(at)))
                far_keys = pages.gather(kv.k_group, far_end).to(q.dtype)
                scores.insert(0, decode_logits(grouped, far_keys).reshape(Hq, -1))
                keys.insert(0, tokens[:far_end])
        memory = state.memory
        if memory is not None and memory.tokens:
            assert memory.sketch is not None, "citations need block granularity (engine/generator.py)"
            queries = memory_queries(q, rope, state.distance, Hkv)  # (Hkv, g, d)
            scores.append(memory.sketch.token_logits(layer, queries).float().reshape(Hq, -1))
            first = (memory.first_block or 0) * memory.page_size
            keys.append(torch.arange(first, first + memory.tokens))
        probs = torch.cat(scores, -1).mul_(d**-0.5).softmax(-1).sum(0).double().cpu() / Hq  # (keys,)
        where = torch.cat([k.cpu() for k in keys])
        end = int(where.max()) + 1
        if end > self.mass.shape[0]:
            self.mass = torch.cat([self.mass, torch.zeros(end - self.mass.shape[0], dtype=torch.float64)])
        self.mass.index_add_(0, where, probs)
        self.rows += 1

    def shares(self) -> torch.Tensor:
        """Each position's share of the observed attention (they sum to 1)."""
        return self.mass / max(self.rows, 1)


def top_windows(masses: list[torch.Tensor], width: int, top: int) -> list[tuple[float, int, int]]:
    """The `top` windows of `width` tokens (fewer at a shorter end) holding the most mass
    over the sequences `masses`, chosen greedily without overlaps, best first, as (mass,
    sequence, first token); none with no mass."""
    windows = []  # per sequence: the mass of the window starting at each token
    for mass in masses:
        w = min(width, mass.shape[0])
        sums = torch.cat([torch.zeros(1, dtype=mass.dtype), mass.cumsum(0)])
        windows.append(sums[w:] - sums[:-w] if w else sums[:0])
    picked: list[tuple[float, int, int]] = []
    while len(picked) < top and any(w.numel() for w in windows):
        share, i, first = max(
            ((float(w.max()), i, int(w.argmax())) for i, w in enumerate(windows) if w.numel())
        )
        if share <= 0:
            break
        picked.append((share, i, first))
        windows[i][max(0, first - width + 1) : first + width] = 0  # no window overlapping this one
    return picked
