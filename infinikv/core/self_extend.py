"""Self-Extend and memory attention for one sequence, in plain PyTorch (the reference).

A query at absolute position i sees four regions (docs/architecture.md):

* neighbor: resident keys j with 0 <= i - j < W, at their exact positions (plain RoPE);
* grouped:  resident keys j with i - j >= W, Self-Extend positions: the query at
  i // G + W - W // G, the key at j // G (LongLM's formula);
* memory:   evicted keys retrieved by kNN, all at one relative distance D;
  score = (R(i) q).(R(i - D) k) = (R(D) q).k, so the memory is searched with R(D) q
  against un-rotated keys and the top-k by inner product are the top-k by true logit.

Each region is a partial attention (output, log-sum-exp), merged by the LSE rule.
Shapes: q (n, Hq, d) before RoPE with positions q_pos (n,); resident k, v (T, Hkv, d),
keys before RoPE, at absolute positions k_pos (T,) long.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinikv.core.partial import Partial, merge_partials, reference_partial
from infinikv.core.rope import RotaryEmbedding, grouped_key_positions, rotate


@dataclass(frozen=True)
class SelfExtend:
    window: int  # W: neighbor window, exact positions
    group: int  # G: group size for older resident keys

    def __post_init__(self) -> None:
        if self.window < 1 or self.group < 1:
            raise ValueError(f"Self-Extend needs window >= 1 and group >= 1, got {self}")

    def grouped_query_positions(self, q_pos: torch.Tensor) -> torch.Tensor:
        return q_pos // self.group + self.window - self.window // self.group

    def grouped_key_positions(self, k_pos: torch.Tensor) -> torch.Tensor:
        return grouped_key_positions(k_pos, self.group)


def resident_partials(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    k_rope: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    rope: RotaryEmbedding,
    se: SelfExtend,
) -> list[Partial]:
    """The neighbor and grouped partial attentions over the resident keys; k_rope (T, Hkv, d)
    are the same keys rotated at their own positions k_pos (the pool keeps them)."""
    rel = q_pos[:, None] - k_pos[None, :]  # (n, T)
    near = (rel >= 0) & (rel < se.window)
    far = rel >= se.window
    parts = [reference_partial(rotate(q, rope.at(q_pos)), k_rope, v, near)]
    if bool(far.any()):
        qg = rotate(q, rope.at(se.grouped_query_positions(q_pos)))  # (n, Hq, d)
        kg = rotate(k, rope.at(se.grouped_key_positions(k_pos)))  # (T, Hkv, d)
        parts.append(reference_partial(qg, kg, v, far))
    return parts


def at_memory_distance(q: torch.Tensor, rope: RotaryEmbedding, distance: int) -> torch.Tensor:
    """R(D) q: (n, Hq, d) before RoPE -> the vector to search un-rotated memory keys with."""
    return rotate(q, rope.phases(distance + 1)[distance])  # one phase row, broadcast


def memory_partial(
    qd: torch.Tensor, k_mem: torch.Tensor, v_mem: torch.Tensor, valid: torch.Tensor | None = None
) -> Partial:
    """Attention of each query (head) to its own retrieved memory entries.

    qd: (..., d), queries rotated by the memory distance (`at_memory_distance`);
    k_mem, v_mem: (..., K, d), keys before RoPE, the K entries the kNN search returned for
    that query; valid: (..., K) bool, False for empty result slots. Any leading layout,
    e.g. (n, Hq) or the search's (Hkv, n * g). Returns out (..., d), lse (...).
    """
    d = qd.shape[-1]
    scores = torch.einsum("...d,...kd->...k", qd.float(), k_mem.float()) * d**-0.5  # (..., K)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (n, Hq)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("...k,...kd->...d", probs, v_mem.float())
    return out.to(qd.dtype), lse


def long_context_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    rope: RotaryEmbedding,
    se: SelfExtend,
    memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    distance: int = 0,
) -> Partial:
    """All regions merged: resident (neighbor + grouped) and, if given, retrieved memory.
    The reference for the paged path: keys are rotated here, at read time."""
    parts = resident_partials(q, q_pos, k, rotate(k, rope.at(k_pos)), v, k_pos, rope, se)
    if memory is not None and memory[0].shape[2] > 0:
        parts.append(memory_partial(at_memory_distance(q, rope, distance), memory[0], memory[1]))
    return merge_partials(parts)
