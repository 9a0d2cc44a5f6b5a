"""The forwards of an engine round: decode steps of several sequences and pieces of short
prompts in shared forwards. A step function asks for its decode token's forward by yielding
a `Forward`, for a short prompt's by yielding a `Prompt`; the worker packs the round's
requests into forwards (the weights are read once for all rows of one) and sends each its
logits back.

A sequence's logits in a batch equal its logits alone, bit for bit, where the forward goes
through the CPU backend's few-row kernels (their per-row arithmetic does not depend on the
row count), so a forward holds at most `LlamaModel.invariant_rows` rows; on other backends a
batched row may differ from its lone self by float rounding, and prompts never run in pieces
(`Generator.in_pieces`). A prompt's pieces have a fixed size, so each piece attends alone or
in company over the same keys in the same order."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from collections.abc import Generator as Steps
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from infinikv.cache.pages import PagePool
from infinikv.engine.sequence import Sequence
from infinikv.model.llama import ForwardBatch, LlamaModel

# Rows of a prompt piece. 8 query rows of a model with 3 or 4 query heads per kv-head stay
# within the CPU folding attention kernel's rows (FOLD_ROWS), and 8 fill the room a round's
# decode tokens leave in a forward (64 rows in float32) with at most 7 rows unused.
PIECE = 8

# What a request's step function is sent back (None: draft instead, or pieces remain).
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


@dataclass(frozen=True, eq=False)
class Prompt:
    """The rest of a short prompt for `seq`, run in pieces of PIECE rows that share forwards
    with other sequences' rows. Its step function is sent the logits (1, V) of the last token
    once every piece ran, None while pieces remain (it yields the rest again next round), or
    has an error thrown into it."""

    seq: Sequence
    tokens: tuple[int, ...]


Request = Forward | Prompt


@dataclass(eq=False)
class Part:
    """A request's rows in one forward: its decode token, or some of its prompt's pieces."""

    request: Request
    pieces: list[list[int]] = field(default_factory=list)
    ends: bool = False  # its request's last token is among them: its logits are read

    @property
    def rows(self) -> int:
        return sum(len(p) for p in self.pieces)


# Called after each forward with its parts, seconds and rows (the engine's metrics).
Observe = Callable[[list[Part], float, int], None]


def pack(requests: list[Request], rows: int, sequences: int, budget: int) -> list[list[Part]]:
    """The round's forwards, each of at most `rows` rows and `sequences` sequences: every
    decode token, then prompt pieces in the room the decode tokens leave; a prompt that found
    no room, or every prompt when nothing decodes, gets forwards without decode tokens, up to
    `budget` rows in those. A prompt's pieces run in order, a forward after another."""
    decodes = [r for r in requests if isinstance(r, Forward)]
    per = max(1, min(rows, sequences))
    groups = [[Part(r, [[r.token]], True) for r in decodes[i : i + per]] for i in range(0, len(decodes), per)]
    decoding = len(groups)  # forwards [0, decoding) carry decode tokens: their room is free
    for r in requests:
        if not isinstance(r, Prompt):
            continue
        at, placed = 0, False  # its next piece goes to forward `at` or a later one
        for start in range(0, len(r.tokens), PIECE):
            piece = list(r.tokens[start : start + PIECE])
            fits = (j for j in range(at, len(groups)) if _fits(groups[j], r, piece, rows, sequences))
            g = next((j for j in fits if j < decoding or len(piece) <= budget), None)
            if g is None:
                if (placed and decoding) or len(piece) > budget:
                    break
                groups.append([])
                g = len(groups) - 1
            if g >= decoding:
                budget -= len(piece)
            part = next((p for p in groups[g] if p.request is r), None)
            if part is None:
                part = Part(r)
                groups[g].append(part)
            part.pieces.append(piece)
            part.ends = start + len(piece) == len(r.tokens)
            at, placed = g, True
    return groups


def _fits(group: list[Part], r: Prompt, piece: list[int], rows: int, sequences: int) -> bool:
    joins = any(p.request is r for p in group) or len(group) < sequences
    return joins and sum(p.rows for p in group) + len(piece) <= rows


def run_round(
    model: LlamaModel,
    pool: PagePool,
    requests: list[Request],
    sequences: int,
    budget: int,
    observe: Observe | None = None,
) -> list[Reply]:
    """Each request's reply after the round's forwards (`pack`). A failed forward is undone
    and its parts run one by one, so one sequence's error fails only its own request (its
    sequence back where that forward found it); a prompt that failed runs no further piece.
    A lone request that may draft is answered None."""
    if len(requests) == 1 and isinstance(requests[0], Forward) and requests[0].may_draft:
        return [None]
    replies: dict[int, Reply] = {}
    for group in pack(requests, model.invariant_rows, sequences, budget):
        group = [p for p in group if not isinstance(replies.get(id(p.request)), Exception)]
        if not group:  # its prompts failed in an earlier forward
            continue
        t0, before = time.perf_counter(), model.rows_run
        for part, reply in zip(group, _run(model, pool, group), strict=True):
            replies[id(part.request)] = reply
        if observe is not None:
            observe(group, time.perf_counter() - t0, model.rows_run - before)
    return [replies.get(id(r)) for r in requests]


def _run(model: LlamaModel, pool: PagePool, parts: list[Part]) -> list[Reply]:
    """One forward of the parts; if it fails, each part alone, so that the error goes to the
    part whose sequence raised it."""
    before = [len(p.request.seq) for p in parts]
    try:
        logits = model(_merged([b for p in parts for b in _batches(p)]), pool)
    except Exception as e:  # noqa: BLE001 - found again below, for the part that raised it
        for p, n in zip(parts, before, strict=True):
            p.request.seq.truncate(n)
        return [e] if len(parts) == 1 else [_run(model, pool, [p])[0] for p in parts]
    out: list[Reply] = []
    row = 0
    for p in parts:
        try:
            p.request.seq.evict_overflow()
            out.append(logits[row : row + 1] if p.ends else None)
        except Exception as e:  # noqa: BLE001 - the error goes to its own sequence
            out.append(e)
        row += p.ends
    return out


def _batches(part: Part) -> Iterator[ForwardBatch]:
    """The part's pieces as one-sequence batches; the last piece's last row read if it ends
    its request."""
    for i, piece in enumerate(part.pieces):
        read = part.ends and i == len(part.pieces) - 1
        yield part.request.seq.extend_batch(piece, "last" if read else "none")


def _merged(batches: list[ForwardBatch]) -> ForwardBatch:
    """One-sequence batches side by side as one batch; logits for the rows each one reads."""
    rows, seqs, offset = [], [], 0
    for b in batches:
        assert b.logits_rows is not None, "a forward of the round reads at most its last row's logits"
        seqs.extend(replace(s, start=s.start + offset) for s in b.seqs)
        rows.append(b.logits_rows + offset)
        offset += b.tokens.shape[0]
    return ForwardBatch(
        tokens=torch.cat([b.tokens for b in batches]),
        positions=torch.cat([b.positions for b in batches]),
        slots=torch.cat([b.slots for b in batches]),
        seqs=tuple(seqs),
        logits_rows=torch.cat(rows),
    )


def forward_alone(model: LlamaModel, pool: PagePool, request: Request) -> torch.Tensor:
    """The request's logits, its forwards run alone (a prompt's pieces in as few as the
    model's invariant rows allow); a failed one leaves its sequence as it was."""
    seq, before = request.seq, len(request.seq)
    if isinstance(request, Forward):
        request, budget = replace(request, may_draft=False), 0
    else:
        budget = len(request.tokens)
    (reply,) = run_round(model, pool, [request], sequences=1, budget=budget)
    if isinstance(reply, Exception):
        seq.truncate(before)
        raise reply
    assert reply is not None
    return reply


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
            if isinstance(item, Forward) and item.may_draft:
                reply = None
            elif isinstance(item, Forward | Prompt):
                reply = forward_alone(model, pool, item)
            else:
                reply = None
                yield item
    finally:
        steps.close()
