"""The generation loop: chunked prefill, then one token per step until a stop condition."""

from __future__ import annotations

import functools
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from collections.abc import Generator as Steps
from dataclasses import dataclass, field
from typing import Any

import torch

from infinikv.attention.tally import AttentionTally
from infinikv.cache.prefix import PrefixCache
from infinikv.engine.batch import PIECE, Forward, Prompt, run_alone
from infinikv.engine.detokenize import TextStream
from infinikv.engine.grammar import TokenGrammar
from infinikv.engine.lines import line_breaks
from infinikv.engine.logprobs import TokenLogprob, token_logprobs
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.reread import SEPARATOR, Reread
from infinikv.engine.sampling import Sampler, SamplingParams, steer_
from infinikv.engine.sequence import ProgressFn, Sequence, feed
from infinikv.engine.speculative.decoder import SpeculativeDecoder
from infinikv.engine.speculative.drafter import Drafter
from infinikv.errors import CapacityError, InfinikvError
from infinikv.memory.store import BlockStore
from infinikv.model.loader import LoadedModel

# With long-context memory a sequence has no length limit.
UNBOUNDED = sys.maxsize

# How a prompt's keys and values were computed, as the prefix cache tells them apart: in
# pieces of PIECE rows (the few-row kernels) or in chunks of the generator's chunk size.
PIECES, CHUNKS = ("pieces", PIECE), "chunks"


@dataclass(frozen=True)
class GenerationEvent:
    text: str  # text that became final at this step (may be empty)
    token_id: int | None  # the token sampled at this step; None for the closing event
    finish_reason: str | None = None  # "stop" | "length" on the closing event
    speculation: dict[str, float | int] | None = None  # drafting stats, on the closing event
    logprob: TokenLogprob | None = None  # the token's, when the request asks for logprobs


# Yielded by Generator.run before each prefill chunk but the first: no text, no token, not
# finished; the worker moves to other tasks there.
TICK = GenerationEvent("", None, None)


@dataclass
class Transcript:
    """What a run's events add up to: its text, its tokens and how it ended."""

    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    speculation: dict[str, float | int] | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens', when asked for
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # echo: None first
    tally: AttentionTally | None = None  # where the answer attended, when citations are asked for
    cached_tokens: int = 0  # prompt tokens whose pages came from the prefix cache

    def add(self, event: GenerationEvent) -> GenerationEvent:
        self.pieces.append(event.text)
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.finish_reason:
            self.finish_reason, self.speculation = event.finish_reason, event.speculation
        return event

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    speculation: dict[str, float | int] | None = None


class Generator:
    """Owns a page pool for one model and runs one generation at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_seq_len: int,
        page_size: int = 16,
        chunk_size: int = 512,
        fill_value: float | None = None,
        long_context: LongContextConfig | None = None,
        store: BlockStore | None = None,
        slots: int = 1,
        drafter_factory: Callable[[], Drafter] | None = None,
        max_draft: int = 8,
        prefix_cache: bool = True,
        kv_dtype: torch.dtype | None = None,
    ):
        """max_seq_len bounds a sequence's length; with `long_context` the RAM budget of its
        memory does (with a store; without one, nothing leaves RAM and nothing bounds it) and
        a sequence holds at most its resident window plus one prefill chunk in pages. The pool
        holds `slots` such sequences at once; with `prefix_cache`, the full pages of prompts
        too, while no sequence needs them (`attach_prefix`); its keys and values in `kv_dtype`
        (None: the model's)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.long_context = long_context
        self.store = store
        pool_tokens = max_seq_len
        if long_context is not None:
            long_context.validate(loaded.config.max_position_embeddings, page_size, loaded.config)
            # Self-Extend's banded attention takes chunks of at most W queries.
            chunk_size = min(chunk_size, long_context.window)
            pool_tokens = long_context.peak_resident + chunk_size + 2 * page_size
            if long_context.rereader is not None:  # an answer's re-read sequence beside its own
                pool_tokens *= 2
        self.chunk_size = chunk_size
        self.max_seq_len = max_seq_len
        self.slots = slots
        # Speculative decoding: a fresh drafter per generation (it keeps per-sequence state).
        self.drafter_factory, self.max_draft = drafter_factory, max_draft
        group = 1 if long_context is None else long_context.group
        self.pool = self.model.new_page_pool(slots * pool_tokens, page_size, fill_value, group, kv_dtype)
        self.prefix_cache = PrefixCache(self.pool) if prefix_cache else None
        self._lock = threading.Lock()

    @functools.cached_property
    def grammars(self) -> TokenGrammar:
        """The vocabulary as the grammar engine sees it (built on the first structured request)."""
        return TokenGrammar(self.tokenizer, self.loaded.config.vocab_size)

    @property
    def capacity(self) -> int:
        """Longest sequence (prompt + generated tokens) this generator can hold: with long
        context, the resident window and the most its memory's RAM budget holds."""
        if self.long_context is None:
            return self.max_seq_len
        held = self.long_context.memory_tokens(self.loaded.config, self.pool.page_size)
        if held is None or self.store is None:
            return UNBOUNDED
        return self.long_context.resident + held

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's chat template over `messages`, ending with the assistant's turn opening."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InfinikvError("this model's tokenizer has no chat template")
        return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer(self.chat_text(messages), add_special_tokens=False)["input_ids"])

    @functools.cached_property
    def separator(self) -> list[int]:
        return self.encode(SEPARATOR, add_special_tokens=False)

    @functools.cached_property
    def line_breaks(self) -> frozenset[int]:
        return line_breaks(self.tokenizer)

    def new_sequence(self, prefix: str, store: BlockStore | None = None) -> Sequence:
        """An empty sequence in this generator's pool; its evicted blocks go under prefix to
        `store` (a session's), else to this generator's scratch store."""
        return Sequence(self.pool, self.long_context, self.loaded.config, store or self.store, prefix)

    def check_fits(self, seq_len: int, prompt: list[int]) -> None:
        if not prompt:
            raise InfinikvError("empty prompt")
        if seq_len + len(prompt) >= self.capacity:
            setting = "max_seq_len" if self.long_context is None else "ram_budget_mb"
            raise CapacityError(
                f"{seq_len} + {len(prompt)} prompt tokens do not fit the context capacity of "
                f"{self.capacity} tokens (raise {setting})"
            )

    def stream(
        self, prompt: list[int], params: SamplingParams, progress: ProgressFn | None = None
    ) -> Iterator[GenerationEvent]:
        """Yield one event per generated token, then a closing event with the finish reason."""
        self.check_fits(0, prompt)
        with self._lock:
            # Evicted blocks of this generation live under their own prefix in the store.
            seq = self.new_sequence(f"ikv:gen:{uuid.uuid4().hex}:")
            try:
                steps = self.run(seq, prompt, params, progress)
                yield from (e for e in run_alone(self.model, self.pool, steps) if e is not TICK)
            finally:
                seq.release()

    def run(
        self,
        seq: Sequence,
        prompt: list[int],
        params: SamplingParams,
        progress: ProgressFn | None = None,
        transcript: Transcript | None = None,
    ) -> Steps[object, Any, None]:
        """Extend `seq` by `prompt`, then generate: a step function (batch.py). A short prompt
        is a `Prompt` for the worker's forwards (`in_pieces`), a longer one's chunks forwards of
        their own, each but the first after a TICK; a decode token is a `Forward` for the
        worker's batch (with a drafter, a speculative step when it decodes alone).
        Yields one event per generated token, then a closing event. Every token is fed to
        `seq` except the last one sampled (EOS included), which the caller feeds first if the
        sequence continues. Each event is added to `transcript` as it is yielded; with
        `params.echo`, so are the prompt's log-probabilities (None for its first token).
        Past the resident window another sequence decodes, over the re-read prompt
        (engine/reread.py); the answer's tokens are fed to `seq` when it ends."""
        self.check_fits(len(seq), prompt)
        out = transcript if transcript is not None else Transcript()
        sampler = Sampler(params)
        text = TextStream(self.tokenizer, params.stop)
        eos = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.loaded.eos_token_ids
        )
        top = params.logprobs
        echo = params.echo and top is not None
        if echo:
            out.prompt_logprobs.append(None)
        if params.citations:
            check_citable(seq)
        lc = self.long_context
        rereader = None if lc is None else lc.rereader
        # Past the resident window the answer re-reads what the prompt's last position attends to.
        rereads = lc is not None and rereader is not None and len(seq) + len(prompt) > lc.peak_resident
        pieces = not (echo or params.citations or rereads) and self.in_pieces(seq, prompt)
        kind = PIECES if pieces else (CHUNKS, self.chunk_size)
        # A prompt from position 0 shares the prefix cache's full pages (echo reads every position).
        fresh = not echo and len(seq) == 0
        cached = self.attach_prefix(seq, prompt, kind) if fresh else 0
        out.cached_tokens = cached
        if pieces:
            logits = yield from self._pieces(seq, prompt[cached:])
            if fresh:
                self.keep_prefix(seq, kind)
            if progress is not None:
                progress(len(prompt), len(prompt))
        else:
            shifted = None if progress is None else lambda done, _: progress(cached + done, len(prompt))
            logits = yield from self._chunks(seq, prompt[cached:], params, rereads, out, shifted, fresh)
        reader, reread = seq, []  # the sequence that answers, and the prompt it re-read
        if rereads:
            assert rereader is not None and seq.tally is not None
            reread = rereader.prompt(seq.tally.shares(), seq.tokens, self.separator, self.line_breaks)
            seq.tally = None  # citations, if asked for, are the prompt's: what was re-read
            reader = self.new_sequence(f"ikv:reread:{uuid.uuid4().hex}:")
        elif not params.citations:
            seq.tally = None
        budget = min(params.max_tokens, self.capacity - len(seq))
        constraint = None if params.grammar is None else self.grammars.constraint(params.grammar)

        generated: Counter[int] = Counter()

        def pick(logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
            """The next token (steered, inside the grammar) and its raw log-probability."""
            raw = logits
            if constraint is not None or params.steers:
                logits = logits.clone()  # the forward's logits are inference tensors, and `raw`
                if params.steers:
                    steer_(logits, params, generated)
                if constraint is not None:
                    constraint.mask_(logits)
            token = int(sampler(logits)[0])
            if constraint is not None:
                constraint.accept(token)
            if params.steers:
                generated[token] += 1
            return token, None if top is None else token_logprobs(raw, [token], top)[0]

        decoder = None
        # Logprobs, grammars, steering and citations need every position's logits, one at a time.
        one_at_a_time = top is not None or constraint is not None or params.steers or params.citations
        if self.drafter_factory is not None and not one_at_a_time:
            decoder = SpeculativeDecoder(self.model, self.drafter_factory(), sampler, params, self.max_draft)
        emitted = 0
        try:
            if reader is not seq:
                logits = yield from self._read(reader, reread)
            # Sampled, not yet emitted: all but the last are already fed (accepted drafts).
            token, logprob = pick(logits)
            pending = [token]
            while True:
                for i, token in enumerate(pending):
                    unneeded = len(pending) - 1 - i  # fed tokens after this one, if it ends the run
                    finish = None
                    if token in eos:
                        reader.truncate(len(reader) - unneeded)
                        yield out.add(GenerationEvent(text.flush(), None, "stop", _stats(decoder)))
                        return
                    delta = text.push(token)
                    emitted += 1
                    yield out.add(GenerationEvent(delta, token, None, logprob=logprob))
                    if text.stopped:
                        finish, delta = "stop", ""
                    elif emitted == budget:
                        finish, delta = "length", text.flush()
                    if finish is not None:
                        reader.truncate(len(reader) - unneeded)
                        yield out.add(GenerationEvent(delta, None, finish, _stats(decoder)))
                        return
                logits = yield Forward(reader, pending[-1], may_draft=decoder is not None)
                if logits is None:  # decoding alone: a speculative step of its own
                    assert decoder is not None
                    pending = decoder.step(reader, pending[-1])
                else:
                    token, logprob = pick(logits)
                    pending = [token]
        finally:
            seq.tally = None
            if decoder is not None:
                decoder.release()
            if reader is not seq:  # the answer joins the history (a session goes on from it)
                try:
                    answered = reader.tokens[len(reread) :]
                    if answered:
                        feed(self.model, self.pool, seq, answered, self.chunk_size, "none")
                finally:
                    reader.release()

    def _chunks(
        self,
        seq: Sequence,
        prompt: list[int],
        params: SamplingParams,
        rereads: bool,
        out: Transcript,
        progress: ProgressFn | None,
        keep: bool = False,
    ) -> Steps[object, Any, torch.Tensor]:
        """Feed `prompt` to `seq` in chunks, each a forward of its own after a TICK but the
        first; the last token's logits. The last chunk's last row is tallied for citations
        or a re-read; with `params.echo`, the prompt's log-probabilities go to `out`; with
        `keep`, the prefix cache is offered each full chunk's pages."""
        top = params.logprobs
        echo = params.echo and top is not None
        logits = torch.empty(0)
        for start in range(0, len(prompt), self.chunk_size):
            if start:
                yield TICK
            chunk = prompt[start : start + self.chunk_size]
            last = start + len(chunk) == len(prompt)
            if last and (params.citations or rereads):  # its last row picks the first token
                seq.tally = Reread.tally(self.loaded.config.num_layers) if rereads else AttentionTally()
                if params.citations:
                    out.tally = seq.tally
            read = "all" if echo else "last" if last else "none"
            logits = feed(self.model, self.pool, seq, chunk, self.chunk_size, read)
            if keep:
                self.keep_prefix(seq, (CHUNKS, self.chunk_size))
            if echo:  # row i predicts prompt token start + i + 1
                targets = prompt[start + 1 : start + len(chunk) + 1]
                out.prompt_logprobs.extend(token_logprobs(logits[: len(targets)], targets, top or 0))
                logits = logits[-1:]
            if progress is not None:
                progress(start + len(chunk), len(prompt))
        return logits

    def attach_prefix(self, seq: Sequence, prompt: list[int], kind: tuple[str, int]) -> int:
        """Start an empty `seq` with the prefix cache's pages of `prompt`'s longest cached
        prefix computed as `kind` (whole pieces or chunks, never the last token: its logits
        are computed; never past the resident tokens, where a sequence evicts); how many
        tokens it attached."""
        if self.prefix_cache is None:
            return 0
        most = self._whole_pages(len(prompt) - 1, kind)
        pages = self.prefix_cache.match(prompt, kind, most, self._unit(kind))
        seq.attach(prompt[: len(pages) * self.pool.page_size], pages)
        return len(seq)

    def keep_prefix(self, seq: Sequence, kind: tuple[str, int]) -> None:
        """Offer the prefix cache the full pages `seq` (started empty) computed as `kind`, in
        whole pieces or chunks, while no block has left its pages."""
        if self.prefix_cache is None or seq.table.evicted_blocks:
            return
        pages = seq.table.pages[: self._whole_pages(len(seq), kind)]
        self.prefix_cache.insert(seq.tokens, pages, kind)

    def _unit(self, kind: tuple[str, int]) -> int:
        """Pages in the fewest whole pieces or chunks of `kind` that fill whole pages."""
        return math.lcm(kind[1], self.pool.page_size) // self.pool.page_size

    def _whole_pages(self, tokens: int, kind: tuple[str, int]) -> int:
        """Pages of the first `tokens` that hold whole units of `kind`, within the resident
        tokens (beyond them a sequence's blocks leave its pages)."""
        if self.long_context is not None:
            tokens = min(tokens, self.long_context.resident)
        unit = self._unit(kind)
        return tokens // self.pool.page_size // unit * unit

    def in_pieces(self, seq: Sequence, prompt: list[int]) -> bool:
        """Whether `prompt` runs in pieces that share forwards with other sequences' rows
        (batch.py): a short one, where the model's few-row kernels take every row, and below
        the Self-Extend window (where the kernels' attention is the sequence's), so that its
        output is the same alone and in company. Alone it is one forward through the kernels
        (at 64 float32 rows ~12% slower than torch's matmul, docs/performance.md)."""
        rows, config = self.model.invariant_rows, seq.long_config
        if rows < PIECE or len(prompt) > rows:
            return False
        return config is None or len(seq) + len(prompt) <= config.window

    def _pieces(self, seq: Sequence, prompt: list[int]) -> Steps[object, Any, torch.Tensor]:
        """Feed `prompt` to `seq` through the round's forwards; the last token's logits."""
        start = len(seq)
        while True:
            logits = yield Prompt(seq, tuple(prompt[len(seq) - start :]))
            if logits is not None:
                return logits

    def _read(self, seq: Sequence, tokens: list[int]) -> Steps[GenerationEvent, Any, torch.Tensor]:
        """Feed `tokens` to `seq`, a TICK before each chunk; the last token's logits."""
        logits = torch.empty(0)
        for start in range(0, len(tokens), self.chunk_size):
            yield TICK
            chunk = tokens[start : start + self.chunk_size]
            read = "last" if start + len(chunk) == len(tokens) else "none"
            logits = feed(self.model, self.pool, seq, chunk, self.chunk_size, read)
        return logits

    def generate(
        self, prompt: list[int], params: SamplingParams, progress: ProgressFn | None = None
    ) -> Generation:
        """Run `stream` to the end and collect the result, with prefill/decode timings."""
        t0 = time.perf_counter()
        first: float | None = None
        end = t0
        out = Transcript()
        for event in self.stream(prompt, params, progress):
            # Decoding ends at the last event, before the sequence's release (which frees
            # its memory and store keys after the answer is complete).
            end = time.perf_counter()
            if first is None:
                first = end
            out.add(event)
        first = first or end
        return Generation(
            text=out.text,
            token_ids=out.token_ids,
            finish_reason=out.finish_reason,
            prompt_tokens=len(prompt),
            prefill_seconds=first - t0,
            decode_seconds=end - first,
            speculation=out.speculation,
        )


def check_citable(seq: Sequence) -> None:
    """Citations read a long-context sequence's attention; evicted keys through the key sketch."""
    if seq.long_state is None:
        raise InfinikvError("citations need long-context attention (they are off with --no-long-context)")
    memory = seq.long_state.memory
    if memory is not None and memory.sketch is None:
        raise InfinikvError("citations need granularity block (its key sketch scores every evicted key)")


def _stats(decoder: SpeculativeDecoder | None) -> dict[str, float | int] | None:
    return None if decoder is None else decoder.stats.view()
