"""What each kind of request does on the engine's worker, as step functions (see scheduler.py):
a completion or chat turn (stateless, or appended to a session) and a document ingestion."""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator as Steps
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from infinikv.attention.tally import AttentionTally
from infinikv.documents import Document
from infinikv.engine.citations import Citation, cite
from infinikv.engine.generator import GenerationEvent, Generator, Transcript
from infinikv.engine.jobs import INTERRUPTED, IngestJob
from infinikv.engine.logprobs import TokenLogprob
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.sequence import ProgressFn, Sequence, feed
from infinikv.engine.session import DocumentSpan, Session
from infinikv.engine.tasks import Failed, Finished, StepFn, Task, TaskHandle
from infinikv.errors import InfinikvError


@dataclass(frozen=True)
class Turn:
    """One request: raw `text` or `token_ids` to complete, or chat `messages` (the new ones only
    in a session)."""

    params: SamplingParams
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None  # stateless turns only
    session_id: str | None = None
    progress: ProgressFn | None = field(default=None, compare=False)  # prefill chunks done, total


@dataclass(frozen=True)
class TurnResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int]
    speculation: dict[str, float | int] | None = None  # drafting stats when a drafter ran
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    prompt_ids: list[int] = field(default_factory=list)  # with params.echo
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # with params.echo
    citations: list[Citation] = field(default_factory=list)  # with params.citations
    cached_tokens: int = 0  # of prompt_tokens, taken from the prefix cache

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def run_turn(turn: Turn) -> StepFn:
    """Generator.run's step function (GenerationEvents, TICKs, Forwards); returns a TurnResult. A
    session's turn is committed when it ends (as far as it went, if the client went away);
    one that fails, or whose commit fails, leaves the session as it was before it."""

    def run(engine: Engine, task: Task) -> Steps[object, Any, TurnResult]:
        gen = engine.generator
        session = engine.sessions.get(turn.session_id, task.owner) if turn.session_id is not None else None
        if session is None:
            seq = gen.new_sequence(f"ikv:gen:{uuid.uuid4().hex}:")
            if turn.token_ids is not None:
                prompt = list(turn.token_ids)
            elif turn.text is not None:
                prompt = gen.encode(turn.text)
            else:
                prompt = gen.encode_chat(turn.messages or [])
        else:
            assert session.seq is not None, "the scheduler loads a session before its task runs"
            seq = session.seq
            if turn.text is not None:
                prompt = session.completion_prompt(gen, turn.text)
            else:
                prompt = session.chat_prompt(gen, turn.messages or [])
        task.seq = seq
        before = len(seq)
        out = Transcript()
        cited: list[Citation] = []
        ended = False  # finished, or cancelled by its client: either way the turn counts
        try:
            yield from gen.run(seq, prompt, turn.params, turn.progress, out)
            ended = True
            if out.tally is not None:
                cited = cite_turn(gen, out.tally, session, seq, prompt)
        except GeneratorExit:
            ended = not engine.stopping
            raise
        finally:
            if session is None:
                seq.release()
            elif not ended:
                engine.sessions.discard(session)
            elif len(seq) > before:
                _record(engine, session, turn, out.token_ids, out.text)
        return TurnResult(
            out.text,
            out.finish_reason,
            len(prompt),
            out.token_ids,
            out.speculation,
            out.logprobs,
            prompt if turn.params.echo else [],
            out.prompt_logprobs,
            cited,
            out.cached_tokens,
        )

    return run


def cite_turn(
    gen: Generator, tally: AttentionTally, session: Session | None, seq: Sequence, prompt: list[int]
) -> list[Citation]:
    """A session's answer cites its documents; a stateless one its prompt. The sink tokens
    are never cited: every head gives them a share whatever it looks for."""
    shares = tally.shares()
    shares[: 0 if gen.long_context is None else gen.long_context.sinks] = 0
    if session is not None:
        return cite(shares, seq.tokens, session.documents, gen.tokenizer, gen.line_breaks)
    return cite(shares, prompt, [DocumentSpan("", "prompt", 0, len(prompt))], gen.tokenizer, gen.line_breaks)


def submit_turn(engine: Engine, turn: Turn, handle: TaskHandle, owner: str = "") -> TaskHandle:
    """Queue a turn; it runs a sequence (its session's, or one of its own)."""
    return engine.submit(run_turn(turn), handle, turn.session_id, owner, needs_sequence=True)


def unwrap(item: object) -> GenerationEvent | TurnResult:
    """What a turn's handle emitted, for its requester: an event or the result; its error raised."""
    if isinstance(item, Failed):
        raise item.error
    if isinstance(item, Finished):
        assert isinstance(item.value, TurnResult)
        return item.value
    assert isinstance(item, GenerationEvent)
    return item


def stream_turn(engine: Engine, turn: Turn) -> Iterator[GenerationEvent | TurnResult]:
    """A turn's events, then its result, read by a thread that may block (the CLI)."""
    handle = submit_turn(engine, turn, TaskHandle())
    try:
        while not isinstance(item := unwrap(handle.next_blocking()), TurnResult):
            yield item
        yield item
    finally:
        handle.cancel()  # a no-op once finished; stops the task if the reader went away


def _record(engine: Engine, session: Session, turn: Turn, ids: list[int], reply: str) -> None:
    """Commit the turn; if that fails, the session goes back to its last commit."""
    try:
        if turn.messages is not None:
            session.after_chat(engine.generator, turn.messages, ids, reply)
        else:
            session.after_completion(ids)
        session.save()
    except BaseException:
        engine.sessions.discard(session)
        raise


def submit_ingest(engine: Engine, job: IngestJob, document: Document, handle: TaskHandle) -> TaskHandle:
    """Record the job (before it can run, so its final record is never overwritten by
    queued), then queue it behind interactive work; a refused submission ends it as failed.
    Blocks on the store: call it off an event loop."""
    engine.jobs.add(job, handle.cancel)
    try:
        return engine.submit(
            run_ingest(job, document), handle, job.session_id, job.owner, needs_sequence=True, background=True
        )
    except InfinikvError as e:  # a full queue, a stopping server: the job ends here
        job.status, job.error, job.finished = "failed", str(e), time.time()
        engine.jobs.record(job)
        raise


def ingest_blocking(
    engine: Engine, session_id: str, document: Document, progress: ProgressFn | None = None
) -> int:
    """Ingest `document` into the session of no owner, waiting for the job (a thread that may
    block: the CLI, the Python API); returns its tokens."""
    engine.call_blocking(lambda e: e.sessions.check_fits(session_id, "", document.text))
    job = IngestJob(session_id, "", document.name)
    handle = submit_ingest(engine, job, document, TaskHandle())
    while not isinstance(item := handle.next_blocking(), Finished | Failed):
        if progress is not None and job.total_tokens:
            progress(job.done_tokens, job.total_tokens)
    if isinstance(item, Failed):
        raise item.error
    return job.total_tokens


def run_ingest(job: IngestJob, document: Document) -> StepFn:
    """Prefill `document`'s text into the job's session, one chunk per step, then commit the session
    with the document. Until that commit the document is not part of it: a job that fails,
    is cancelled or is interrupted leaves the session as it was."""

    def run(engine: Engine, task: Task) -> Steps[object, None, None]:
        gen = engine.generator
        session = engine.sessions.get(job.session_id, task.owner)
        assert session.seq is not None, "the scheduler loads a session before its task runs"
        seq = task.seq = session.seq
        try:
            ids, sections = session.document_prompt(gen, document)
            gen.check_fits(len(seq), ids)
            start = session.tokens  # the document's first token (after the pending one)
            job.status, job.total_tokens, job.started = "running", len(ids), time.time()
            engine.jobs.record(job)
            for i in range(0, len(ids), gen.chunk_size):
                feed(gen.model, gen.pool, seq, ids[i : i + gen.chunk_size], gen.chunk_size, "none")
                job.done_tokens = min(len(ids), i + gen.chunk_size)
                yield None
            session.pending = []
            session.documents.append(DocumentSpan(job.document_id, job.name, start, len(seq), sections))
            session.save(index_snapshot=True)
            job.status = "succeeded"
        except GeneratorExit:
            engine.sessions.discard(session)
            job.status, job.error = ("failed", INTERRUPTED) if engine.stopping else ("cancelled", None)
            raise
        except Exception as e:
            engine.sessions.discard(session)
            job.status, job.error = "failed", str(e)
            raise
        finally:
            job.finished = time.time()
            engine.jobs.record(job)

    return run
