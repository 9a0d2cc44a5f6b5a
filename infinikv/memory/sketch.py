"""A channel-major copy of every evicted key, for ranking memory blocks by approximate
attention logits (SparQ, Ribar et al. 2024): a query's r largest-magnitude channels carry
most of its inner products, so reading those r rows of the keys (r/d of them) ranks blocks
almost as the exact logits do.

Block summaries (summary.py) bound a block's best logit, and for a few heads the bound is
far from the truth (a passkey's block ranked 400th by bound, 1st by logit, on SmolLM2 at 16k
tokens); the few positions whose logits are read (decode, the end of a prompt) rank with
this sketch instead. On the model's device, so a GPU decode step ranks blocks without a
copy to the host.

Kept in 8 bits per key channel: each (kv-head, channel) row of a chunk of tokens is stored
as uint8 steps above the row's minimum, with the row's float32 step and minimum after it
(per channel, as KIVI quantizes keys: a key channel's range is set by the channel, not by
the token). That is the row layout of fbgemm's 8-bit embedding tables, so on the CPU one
quantized embedding bag reads a query's r rows, de-quantizes and sums them in one pass; other
devices gather, de-quantize and multiply (`gathered_logits`). An eighth of the keys' float32
bytes; the chunk being filled is also kept exact (float32) and its keys so far re-quantized
at each append, so every chunk's rows are quantized from exact keys whatever the appends
were.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from infinikv.errors import KernelBuildError

log = logging.getLogger(__name__)

# Tokens per quantized row (rounded up to whole pages): each row's range is its own.
CHUNK_TOKENS = 1024
# The sketch grows one segment at a time, never by copying what it holds: the first holds
# FIRST_SEGMENT_CHUNKS chunks, each next one as many as all before it, so a decode step
# loops over a few segments (one call each). A chunk is contiguous in its segment and
# chunks are written in order, so on the CPU a segment's chunks not yet written are address
# space only (the kernel gives pages on first touch) and the first segment is large: one
# segment up to 32k tokens. Other devices allocate what they reserve.
FIRST_SEGMENT_CHUNKS = 4
FIRST_SEGMENT_CHUNKS_CPU = 32
LEVELS = 255  # uint8 steps above a row's minimum


def quantize_into(rows: torch.Tensor, x: torch.Tensor) -> None:
    """Rows (..., C + 8) uint8 get x (..., n) float32, n <= C: its first n bytes each value as
    steps of (max - min) / 255 above the row's minimum, the last 8 the step and the minimum
    as float32 bytes. Bytes n..C keep what they held (a partly filled chunk's tail: scored,
    then cut off)."""
    C = rows.shape[-1] - 8
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = (high - low) / LEVELS
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant row: all at its minimum
    rows[..., : x.shape[-1]] = ((x - low) / step).round_().clamp_(0, LEVELS)
    rows[..., C:] = torch.cat([step, low], -1).view(torch.uint8)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows (..., C + 8) uint8 from quantize_rows -> (..., C) float32."""
    C = rows.shape[-1] - 8
    step, low = rows[..., C:].contiguous().view(torch.float32).unbind(-1)
    return rows[..., :C].float() * step[..., None] + low[..., None]


def fused_logits(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, chunks: int) -> torch.Tensor:
    """Approximate logits over the first `chunks` chunks of one layer's segment, through
    fbgemm's quantized embedding bag (CPU). table (chunks held, head * d + channel, C + 8)
    uint8; rows (G, r): each group's picked rows of a chunk; weights (G, m, r): the group's
    queries' values on those channels. Returns (G, m, chunks * C)."""
    G, m, r = weights.shape
    per_chunk, width = table.shape[1], table.shape[2]
    at = torch.arange(chunks, device=rows.device).view(1, 1, chunks, 1) * per_chunk
    bags = (rows.view(G, 1, 1, r) + at).expand(G, m, chunks, r)  # one bag per (query, chunk)
    logits = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        table.view(-1, width),
        bags.flatten(),
        torch.arange(0, bags.numel(), r, device=rows.device),
        False,
        0,  # sum
        False,
        weights.view(G, m, 1, r).expand(G, m, chunks, r).flatten(),
        None,
        False,
    )
    return logits.view(G, m, -1)


def gathered_logits(
    table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, chunks: int
) -> torch.Tensor:
    """fused_logits on any device: gather the picked rows, de-quantize, one batched matmul."""
    G, m, r = weights.shape
    keys = dequantize_rows(table[:chunks, rows.flatten()])  # (chunks, G * r, C)
    return torch.bmm(weights, keys.transpose(0, 1).reshape(G, r, -1))


def dequantized_logits(table: torch.Tensor, chunks: int, tokens: int, queries: torch.Tensor) -> torch.Tensor:
    """Logits of queries (H, m, d) with every channel of the first `tokens` keys of one layer's
    segment, table (chunks held, H * d, C + 8): de-quantize, one batched matmul (any device;
    the reference of the CPU kernel `kernels.cpu.sketch.sketch_logits`). Returns (H, m, tokens)."""
    H, m, d = queries.shape
    keys = dequantize_rows(table[:chunks].view(chunks, H, d, -1))  # (chunks, H, d, C)
    keys = keys.permute(1, 2, 0, 3).reshape(H, d, -1)[..., :tokens]
    return torch.bmm(queries, keys)


@functools.cache
def cpu_token_scorer() -> Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]:
    """The C kernel for `token_logits` on the CPU when it builds and the sketch's rows suit it,
    else `dequantized_logits` (the reason logged once)."""
    try:
        from infinikv.kernels.cpu.build import library
        from infinikv.kernels.cpu.sketch import sketch_logits

        library()
    except KernelBuildError as e:
        log.info("key sketch logits through PyTorch: the CPU kernel could not be built: %s", e)
        return dequantized_logits
    return sketch_logits


def chunk_size(page_size: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Tokens per quantized row: chunk_tokens rounded up to whole pages."""
    return page_size * max(1, -(-chunk_tokens // page_size))


def sketch_bytes(tokens: int, num_layers: int, rows: int, chunk: int) -> int:
    """Host bytes a CPU sketch of `tokens` keys holds (rows: kv-heads x head_dim): the chunks
    written, 8-bit with each row's step and minimum, and the float32 chunk being filled."""
    if tokens == 0:
        return 0
    return num_layers * rows * (-(-tokens // chunk) * (chunk + 8) + chunk * 4)


class KeySketch:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        channels: int,
        device: torch.device | str = "cpu",
        chunk_tokens: int = CHUNK_TOKENS,
        first_segment: int | None = None,
    ):
        if channels < 1:
            raise ValueError(f"sketch channels={channels} must be >= 1")
        self.channels = min(channels, head_dim)
        self.page_size = page_size
        self.chunk = chunk_size(page_size, chunk_tokens)
        self.device = torch.device(device)
        self.logits = fused_logits if self.device.type == "cpu" else gathered_logits
        # All channels (token_logits): the C kernel on the CPU when its rows suit it.
        fits_kernel = self.device.type == "cpu" and self.chunk % 64 == 0 and head_dim <= 128
        self.token_scorer = cpu_token_scorer() if fits_kernel else dequantized_logits
        if first_segment is None:
            first_segment = FIRST_SEGMENT_CHUNKS_CPU if self.device.type == "cpu" else FIRST_SEGMENT_CHUNKS
        self.first_segment = first_segment
        # (L, chunks it holds, Hkv * d, chunk + 8) uint8 each
        self.segments: list[torch.Tensor] = []
        # The exact keys of the chunk being filled, re-quantized at each append (made at the
        # first: a sequence that never evicts holds nothing).
        self.filling: torch.Tensor | None = None
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the segments (on the CPU only their chunks written: the others take no
        memory) and of the chunk being filled."""
        if self.filling is None:
            return 0
        L, rows, _ = self.filling.shape
        if self.device.type == "cpu":
            return sketch_bytes(self.tokens, L, rows, self.chunk)
        return sum(s.numel() for s in self.segments) + self.filling.numel() * self.filling.element_size()

    def append(self, k: torch.Tensor) -> None:
        """k (L, nb, B, Hkv, d): keys of the next evicted blocks."""
        L, nb, B, H, d = k.shape
        if self.filling is None:
            self.filling = torch.empty(L, H * d, self.chunk, device=self.device)
        keys = k.permute(0, 3, 4, 1, 2).reshape(L, H * d, nb * B).to(self.filling)
        done = 0
        while done < keys.shape[-1]:
            chunk, filled = divmod(self.tokens, self.chunk)
            n = min(self.chunk - filled, keys.shape[-1] - done)
            self.filling[..., filled : filled + n] = keys[..., done : done + n]
            segment, at = self._place(chunk)
            quantize_into(segment[:, at], self.filling[..., : filled + n])
            done += n
            self.tokens += n

    def _place(self, chunk: int) -> tuple[torch.Tensor, int]:
        """The segment holding `chunk` and its place there; a new segment when all are full."""
        for segment in self.segments:
            if chunk < segment.shape[1]:
                return segment, chunk
            chunk -= segment.shape[1]
        assert self.filling is not None
        L, rows, _ = self.filling.shape
        size = max(sum(s.shape[1] for s in self.segments), self.first_segment)
        self.segments.append(
            torch.empty(L, size, rows, self.chunk + 8, dtype=torch.uint8, device=self.device)
        )
        return self.segments[-1], 0

    def block_scores(self, layer: int, queries: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """queries (Hkv, P, m, d), rotated by the memory distance; each group of m queries
        scores with the r channels where its |q| is largest (r: `channels`, else the
        sketch's own). Returns (Hkv, P, blocks): each
        block's best approximate logit over its tokens and the group's queries, rounded to
        bfloat16 (float noise in the queries, as a forward batching other positions makes,
        must not reorder blocks of equal keys)."""
        H, P, m, d = queries.shape
        r, B = min(channels or self.channels, d), self.page_size
        picked = queries.abs().sum(2).topk(r, dim=-1).indices  # (Hkv, P, r)
        weights = queries.gather(3, picked[:, :, None].expand(H, P, m, r)).float().view(H * P, m, r)
        heads = torch.arange(H, device=self.device).view(H, 1, 1)
        rows = (heads * d + picked).view(H * P, r)  # the picked of a chunk's Hkv * d rows
        logits = []
        left = -(-self.tokens // self.chunk)  # chunks holding keys
        for segment in self.segments:
            chunks = min(left, segment.shape[1])
            if chunks == 0:
                break
            logits.append(self.logits(segment[layer], rows, weights, chunks))  # (Hkv * P, m, tokens)
            left -= chunks
        tokens = logits[0] if len(logits) == 1 else torch.cat(logits, -1)
        best = F.max_pool1d(tokens.amax(1), B)  # over the group's queries, then each block's tokens
        return best[:, : self.tokens // B].bfloat16().float().view(H, P, -1)

    def token_logits(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """queries (Hkv, n, d), rotated by the memory distance -> (Hkv, n, tokens): each
        query's approximate logit (all channels of the 8-bit keys) with every evicted key."""
        logits = []
        left = self.tokens
        for segment in self.segments:
            tokens = min(left, segment.shape[1] * self.chunk)
            if tokens == 0:
                break
            chunks = -(-tokens // self.chunk)
            logits.append(self.token_scorer(segment[layer], chunks, tokens, queries.float()))
            left -= tokens
        return logits[0] if len(logits) == 1 else torch.cat(logits, -1)
