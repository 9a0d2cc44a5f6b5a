"""Decode steps of several sequences in one forward. A step function asks for its decode
forward by yielding a `Forward`; the worker gathers the running sequences' requests into
one batch (the weights are read once for all of them) and sends each its logits back.

A sequence's logits in a batch equal its logits alone, bit for bit, where the forward goes
through the CPU backend's few-row kernels (their per-row arithmetic does not depend on the
row count), so a batch holds at most `LlamaModel.invariant_rows` rows; on other backends a
batched row may differ from its lone self by float rounding."""

from __future__ import annotations

import dataclasses
from collections.abc import Generator as Steps
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from infinikv.cache.pages import PagePool
from infinikv.engine.sequence import Sequence, feed
from infinikv.model.llama import ForwardBatch, LlamaModel

# What a Forward's step function is sent back (None: draft instead, see Forward).
Reply = torch.Tensor | Exception | None


@dataclass(frozen=True, eq=False)
class Forward:
    """One decode token for `seq`: the step function that yields it is sent the logits
    (1, V) of its forward, or has the forward's error thrown into it. `may_draft`: it can
    speculate instead; a sequence decoding alone is sent None (no forward ran) and drafts,
    as a verification of its own costs less than plain steps only when no batch carries it."""

    seq: Sequence
    token: int
    may_draft: bool = False


def forward_alone(model: LlamaModel, pool: PagePool, request: Forward) -> torch.Tensor:
    """The request's forward; a failed one leaves its sequence as it was."""
    seq, before = request.seq, len(request.seq)
    try:
        return feed(model, pool, seq, [request.token], 1)
    except Exception:
        seq.truncate(before)
        raise


def forward_batch(model: LlamaModel, pool: PagePool, requests: list[Forward]) -> list[Reply]:
    """Each request's logits, or the error that its sequence alone raised. A failed batch is
    undone and its requests run one by one, so one sequence's error fails only its own. A
    lone request that may draft is answered None."""
    if len(requests) == 1:
        return [None] if requests[0].may_draft else _each(model, pool, requests)
    before = [len(r.seq) for r in requests]
    try:
        logits = model(_merged([r.seq.extend_batch([r.token]) for r in requests]), pool)
    except Exception:  # noqa: BLE001 - found again below, for the sequence that raised it
        for r, n in zip(requests, before, strict=True):
            r.seq.truncate(n)
        return _each(model, pool, requests)
    out: list[Reply] = []
    for i, r in enumerate(requests):
        try:
            r.seq.evict_overflow()
            out.append(logits[i : i + 1])
        except Exception as e:  # noqa: BLE001 - the error goes to its own sequence
            out.append(e)
    return out


def _each(model: LlamaModel, pool: PagePool, requests: list[Forward]) -> list[Reply]:
    out: list[Reply] = []
    for r in requests:
        try:
            out.append(forward_alone(model, pool, r))
        except Exception as e:  # noqa: BLE001 - the error goes to its own sequence
            out.append(e)
    return out


def _merged(batches: list[ForwardBatch]) -> ForwardBatch:
    """One-sequence batches side by side as one batch; logits for each one's last row."""
    rows, seqs, offset = [], [], 0
    for b in batches:
        assert b.logits_rows is not None, "a decode forward reads its last row's logits"
        seqs.extend(dataclasses.replace(s, start=s.start + offset) for s in b.seqs)
        rows.append(b.logits_rows + offset)
        offset += b.tokens.shape[0]
    return ForwardBatch(
        tokens=torch.cat([b.tokens for b in batches]),
        positions=torch.cat([b.positions for b in batches]),
        slots=torch.cat([b.slots for b in batches]),
        seqs=tuple(seqs),
        logits_rows=torch.cat(rows),
    )


def run_alone(model: LlamaModel, pool: PagePool, steps: Steps[object, Any, Any]) -> Iterator[object]:
    """Drive a step function without a batch: its forwards one at a time, its other items
    passed on."""
    reply: Any = None
    try:
        while True:
            try:
                item = steps.send(reply)
            except StopIteration:
                return
            if isinstance(item, Forward):
                reply = None if item.may_draft else forward_alone(model, pool, item)
            else:
                reply = None
                yield item
    finally:
        steps.close()
