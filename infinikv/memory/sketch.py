"""A channel-major copy of every evicted key, for ranking memory blocks by approximate
attention logits (SparQ, Ribar et al. 2024): a query's r largest-magnitude channels carry
most of its inner products, so reading those r rows of the keys (r/d of them) ranks blocks
almost as the exact logits do.

Block summaries (summary.py) bound a block's best logit, and for a few heads the bound is
far from the truth (a passkey's block ranked 400th by bound, 1st by logit, on SmolLM2 at 16k
tokens); the few positions whose logits are read (decode, the end of a prompt) rank with
this sketch instead. Kept in bfloat16: a quarter of the keys' and values' float32 bytes;
on the model's device, so a GPU decode step ranks blocks without a copy to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The sketch grows one segment at a time, never by copying what it holds: the first holds
# FIRST_SEGMENT_BLOCKS blocks, each next one as many as all before it, so a decode step
# loops over a few segments (4 at 32k tokens of 16-token pages).
FIRST_SEGMENT_BLOCKS = 256


class KeySketch:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        channels: int,
        device: torch.device | str = "cpu",
    ):
        if channels < 1:
            raise ValueError(f"sketch channels={channels} must be >= 1")
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.channels = min(channels, head_dim)
        self.page_size = page_size
        self.device = torch.device(device)
        self.segments: list[torch.Tensor] = []  # (L, Hkv, d, tokens it holds) bfloat16 each
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.segments)

    def append(self, k: torch.Tensor) -> None:
        """k (L, nb, B, Hkv, d): keys of the next evicted blocks."""
        L, nb, B, H, d = k.shape
        keys = k.permute(0, 3, 4, 1, 2).reshape(L, H, d, nb * B).to(torch.bfloat16)
        done = 0
        while done < keys.shape[-1]:
            held = sum(s.shape[-1] for s in self.segments)
            if self.tokens == held:
                size = max(held, FIRST_SEGMENT_BLOCKS * self.page_size)
                self.segments.append(torch.empty(L, H, d, size, dtype=torch.bfloat16, device=self.device))
                held += size
            used = self.tokens - (held - self.segments[-1].shape[-1])
            n = min(self.segments[-1].shape[-1] - used, keys.shape[-1] - done)
            self.segments[-1][..., used : used + n] = keys[..., done : done + n]
            done += n
            self.tokens += n

    def block_scores(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """queries (Hkv, P, m, d), rotated by the memory distance; each group of m queries
        scores with the r channels where its |q| is largest. Returns (Hkv, P, blocks): each
        block's best approximate logit over its tokens and the group's queries.

        One embedding_bag per segment reads each query's r key rows and sums them weighted
        by its channels in one pass, in bfloat16 with float32 accumulation (1.2-1.3x a
        gather, a float32 copy and a bmm into kept buffers at 32k tokens, 1.0-1.1x at 4k-16k:
        `benchmarks/bench_attention.py --parts sketch`); a segment's unfilled tail is scored
        too (its rows stay contiguous, no copy) and its blocks are cut off after."""
        H, P, m, d = queries.shape
        r, B = self.channels, self.page_size
        picked = queries.abs().sum(2).topk(r, dim=-1).indices[:, :, None].expand(H, P, m, r)
        weights = queries.gather(3, picked).to(torch.bfloat16).view(-1, r)  # (Hkv * P * m, r)
        heads = torch.arange(H, device=self.device).view(H, 1, 1, 1)
        rows = (heads * d + picked).reshape(-1, r)  # the bags' rows in (Hkv * d, tokens)
        scores = []
        for segment in self.segments:
            logits = F.embedding_bag(
                rows, segment[layer].view(H * d, -1), mode="sum", per_sample_weights=weights
            )
            best = logits.view(H * P, m, -1).amax(1)  # over the group's queries
            scores.append(best.view(H * P, -1, B).amax(-1))  # over each block's tokens
        return torch.cat(scores, -1)[:, : self.tokens // B].float().view(H, P, -1)
