"""One sequence's cache state and the forward batches that extend it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import torch

from infinikv.attention.memory_reads import LongContextState
from infinikv.attention.tally import AttentionTally
from infinikv.cache.pages import BlockTable, PagePool
from infinikv.core.config import ModelConfig
from infinikv.engine.regions import LongContextConfig
from infinikv.memory import snapshot
from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.payload import (
    LAYOUT,
    block_key,
    blocks_from_bytes,
    blocks_to_bytes,
    check_layout,
    from_bytes,
    to_bytes,
)
from infinikv.memory.store import BlockStore
from infinikv.model.llama import ForwardBatch, LlamaModel, SequenceSlice

ProgressFn = Callable[[int, int], None]  # (tokens done, tokens total)
LOGITS = ("all", "last", "none")  # which rows of a forward have their logits read


class Sequence:
    """Token history of one sequence and its block table in a shared page pool.

    With a long-context config, the oldest blocks past `resident` tokens leave the pages
    after every forward once the sequence is longer than `evict_after` (`evict_overflow`),
    into the sequence's memory if it has one.
    """

    def __init__(
        self,
        pool: PagePool,
        long_context: LongContextConfig | None = None,
        model: ModelConfig | None = None,
        store: BlockStore | None = None,
        prefix: str = "",
    ):
        self.pool = pool
        # A long-context sequence's sinks sit a window W before its oldest other resident
        # token once blocks between them were evicted (PageList.of).
        self.table = BlockTable(pool, 0 if long_context is None else long_context.sink_gap)
        self.tokens: list[int] = []
        self.long_config = long_context
        self.long_state: LongContextState | None = None
        if long_context is not None:
            if model is None:
                raise ValueError("a long-context sequence needs the model config")
            self.long_state = long_context.new_state(model, pool.page_size, store, prefix, pool.k.device)

        self.saved_blocks = 0  # blocks [0, saved_blocks) are full and written to the store
        # Set while a request that asks for citations reads logits: forwards record where
        # their last row attends.
        self.tally: AttentionTally | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def attach(self, tokens: list[int], pages: list[int]) -> None:
        """Start this empty sequence with `tokens`, whose keys and values fill `pages`: full
        pages that another holder keeps too (a prefix cache's); the table copies one before
        it would change it."""
        if self.tokens:
            raise ValueError("attach needs an empty sequence")
        self.table.attach(pages)
        self.tokens = list(tokens)

    def extend_batch(self, tokens: list[int], logits: str = "last") -> ForwardBatch:
        """Reserve cache slots for `tokens` and describe them as a one-sequence batch whose
        logits ("all", "last" or "none") are read."""
        if logits not in LOGITS:
            raise ValueError(f"logits={logits!r} is not one of {', '.join(LOGITS)}")
        start, n = len(self.tokens), len(tokens)
        slots = self.table.reserve(n)
        self.tokens.extend(tokens)
        device = slots.device
        state = self.long_state
        if state is not None and logits == "none":  # no position answers: all share the chunk's blocks
            state = replace(state, own_positions=0)
        rows = None if logits == "all" else [n - 1] if logits == "last" else []
        return ForwardBatch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            positions=torch.arange(start, start + n, device=device),
            slots=slots,
            seqs=(SequenceSlice(0, n, self.table.page_list(), self.table.resident, state, self.tally),),
            logits_rows=None if rows is None else torch.tensor(rows, dtype=torch.long, device=device),
        )

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on, in the history and the cache."""
        self.table.truncate(length)
        del self.tokens[length:]

    def release(self) -> None:
        """Free the pages and forget the memory, in the block store too. The memory's RAM
        (cache slab, key sketch, index) goes now, not when a reference cycle holding this
        sequence is collected: a finished 32k-token generation's 1.5 GB outlived it."""
        self.table.release()
        self.tokens.clear()
        if self.long_state is not None and self.long_state.memory is not None:
            self.long_state.memory.delete()
            self.long_state.memory = None

    def tokens_before_eviction(self) -> int | None:
        """How many more tokens can be fed before `evict_overflow` would evict (the eviction
        falls after the last of them); None when this sequence never evicts."""
        cfg = self.long_config
        if cfg is None:
            return None
        return max(cfg.resident + self.pool.page_size - self.table.resident, cfg.evict_after + 1 - len(self))

    def evict_overflow(self) -> None:
        """Move whole blocks beyond the resident budget (oldest first, never sinks) to memory.

        Every token in the cache is committed when this runs (after a forward, before any
        speculative tokens are written), so any full block may go.
        """
        cfg, state = self.long_config, self.long_state
        if cfg is None or state is None or len(self) <= cfg.evict_after:
            return
        B = self.pool.page_size
        over = self.table.resident - cfg.resident
        if over < B:
            return
        victims = self.table.evict_oldest(over // B, protected=cfg.sinks // B)
        pages = [page for _, page in victims]
        if state.memory is not None:
            idx = torch.tensor(pages, device=self.pool.k.device)
            state.memory.add_blocks([block for block, _ in victims], self.pool.k[:, idx], self.pool.v[:, idx])
        self.pool.free(pages)

    def save(
        self, store: BlockStore, prefix: str, index_snapshot: bool, version: int = 0
    ) -> dict[str, bytes]:
        """Write this sequence's new payloads to `store` under `prefix` and return its records
        (token history, table layout, the memory's records) for the caller to commit.
        Incremental: a full block is written once, the partial last block under a key of
        `version`, so no payload a committed record names is ever overwritten; evicted
        blocks are already in the store (written through at eviction, under the same keys)."""
        L, _, B, H, d = self.pool.k.shape
        table = self.table
        partial = table.length % B != 0
        last = table.length // B  # the partial block's number, when there is one
        fresh = [(b, p) for b, p in zip(table.blocks, table.pages, strict=True) if b >= self.saved_blocks]
        if fresh:
            idx = torch.tensor([p for _, p in fresh], device=self.pool.k.device)
            kv = torch.stack([self.pool.k[:, idx], self.pool.v[:, idx]]).float().cpu()  # (2, L, n, B, H, d)
            keys = [_resident_key(prefix, b, version if partial and b == last else None) for b, _ in fresh]
            store.put_many(dict(zip(keys, blocks_to_bytes(kv), strict=True)))
        self.saved_blocks = last
        meta = {
            "length": table.length,
            "blocks": table.blocks,
            "evicted_blocks": table.evicted_blocks,
            "evicted_until": table.evicted_until,
            "shape": [L, H, d],
            "layout": LAYOUT,
            "partial_version": version if partial else None,
        }
        records = {
            f"{prefix}sequence": json.dumps(meta).encode(),
            f"{prefix}tokens": to_bytes(torch.tensor(self.tokens, dtype=torch.int32)),
        }
        memory = self.long_state.memory if self.long_state is not None else None
        if memory is not None and memory.store is not None:
            records.update(snapshot.records(memory, index=index_snapshot))
        return records

    @staticmethod
    def referenced_keys(prefix: str, records: dict[str, bytes | None]) -> set[str]:
        """Every store key a saved sequence needs: its records (`records` holds them by key,
        as read back) and the payloads they name."""
        meta_raw = records.get(f"{prefix}sequence")
        if meta_raw is None:
            return set()
        meta = json.loads(meta_raw)
        keys = {f"{prefix}sequence", f"{prefix}tokens"}
        keys |= set(_resident_keys(prefix, [int(b) for b in meta["blocks"]], meta.get("partial_version")))
        memory_meta = records.get(f"{prefix}meta")
        if memory_meta is not None:
            keys |= {f"{prefix}meta", f"{prefix}favourites"}
            keys |= snapshot.referenced_keys(prefix, memory_meta)
        return keys

    @classmethod
    def restore(
        cls,
        model: LlamaModel,
        pool: PagePool,
        long_context: LongContextConfig | None,
        store: BlockStore,
        prefix: str,
    ) -> Sequence:
        """A sequence saved under `prefix`, its resident blocks back in pages (keys rotated again
        at their own positions), its memory reloaded. CorruptSnapshotError when a part is
        missing or damaged; no pages stay taken then."""
        seq = cls(pool, long_context, model.cfg, store, prefix)
        try:
            seq._load(model, store, prefix)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            seq.table.release()
            raise CorruptSnapshotError(f"sequence snapshot under {prefix!r} is corrupt: {e}") from e
        except CorruptSnapshotError:
            seq.table.release()
            raise
        return seq

    def _load(self, model: LlamaModel, store: BlockStore, prefix: str) -> None:
        meta_raw, tokens_raw = store.get_many([f"{prefix}sequence", f"{prefix}tokens"])
        if meta_raw is None or tokens_raw is None:
            raise CorruptSnapshotError(f"no sequence snapshot under {prefix!r}")
        meta = json.loads(meta_raw)
        check_layout(meta)
        L, _, B, H, d = self.pool.k.shape
        if meta["shape"] != [L, H, d]:
            raise ValueError(f"saved for a model with KV shape {meta['shape']}, this one has {[L, H, d]}")
        tokens = from_bytes(tokens_raw, torch.int32, (-1,)).tolist()
        blocks = [int(b) for b in meta["blocks"]]
        length, evicted = int(meta["length"]), int(meta["evicted_blocks"])
        if len(tokens) != length or len(blocks) + evicted != -(-length // B):
            raise ValueError(f"{len(tokens)} tokens, {len(blocks)} resident + {evicted} evicted blocks")
        payloads = store.get_many(_resident_keys(prefix, blocks, meta.get("partial_version")))
        if any(p is None for p in payloads):
            raise ValueError("a resident block payload is missing")
        state = self.long_state
        if evicted and state is not None and state.memory is not None:
            assert self.long_config is not None
            config = self.long_config
            state.memory = snapshot.load(
                store,
                prefix,
                sketch_channels=config.sketch_channels,
                device=self.pool.k.device,
                sketch_every=config.sketch_every,
                ram_budget=config.ram_budget(model.cfg),
                rope=model.cfg.rope,
            )
            if state.memory.tokens != evicted * B:
                raise ValueError(f"memory holds {state.memory.tokens} tokens, {evicted * B} were evicted")
        pages = self.table.adopt(blocks, length, evicted, int(meta["evicted_until"]))
        if pages:
            kv = blocks_from_bytes([p for p in payloads if p], torch.float32, (L, B, H, d))
            device = self.pool.k.device
            k, v = kv.to(device, self.pool.k.dtype).flatten(2, 3)  # (L, n * B, H, d) each
            slots = (torch.tensor(pages)[:, None] * B + torch.arange(B)).flatten().to(device)
            positions = (torch.tensor(blocks)[:, None] * B + torch.arange(B)).flatten().to(device)
            phases = self.pool.key_phases(positions)
            for layer in range(L):
                self.pool.write_keys(layer, slots, k[layer], v[layer], phases)
        self.tokens = tokens
        self.saved_blocks = length // B


def _resident_key(prefix: str, block: int, version: int | None) -> str:
    """A resident block's payload key: a full block's is its own, a partial one's versioned."""
    return block_key(prefix, block) if version is None else f"{block_key(prefix, block)}@{version}"


def _resident_keys(prefix: str, blocks: list[int], partial_version: int | None) -> list[str]:
    """Payload keys of a saved table's resident blocks, the last one partial with a version."""
    return [
        _resident_key(prefix, b, partial_version if i == len(blocks) - 1 else None)
        for i, b in enumerate(blocks)
    ]


def feed(
    model: LlamaModel,
    pool: PagePool,
    seq: Sequence,
    tokens: list[int],
    chunk_size: int,
    logits: str = "last",
    progress: ProgressFn | None = None,
    evict: bool = True,
) -> torch.Tensor:
    """Run `tokens` through the model in chunks of at most `chunk_size` (bounded activation
    memory for any length). Returns float32 logits (`Sequence.extend_batch`): (len(tokens), V)
    for "all", (1, V) of the last token for "last", (0, V) for "none". `evict=False` for
    uncommitted (drafted) tokens: the caller truncates the rejected ones, then calls
    `evict_overflow`."""
    if not tokens:
        raise ValueError("no tokens to feed")
    outs = []
    for start in range(0, len(tokens), chunk_size):
        chunk = tokens[start : start + chunk_size]
        read = logits if logits == "all" or start + len(chunk) == len(tokens) else "none"
        outs.append(model(seq.extend_batch(chunk, read), pool))
        if evict:
            seq.evict_overflow()
        if progress is not None:
            progress(start + len(chunk), len(tokens))
    return torch.cat(outs) if logits == "all" else outs[-1]
