"""What each kind of request does on the engine's worker, as step functions (see scheduler.py):
a completion or chat turn (stateless, or appended to a session) and a document ingestion."""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator as Steps
from dataclasses import dataclass, field
from typing import Any

from infinikv.engine.generator import GenerationEvent
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine, StepFn, Task
from infinikv.engine.sequence import feed
from infinikv.engine.session import DocumentSpan, Session


@dataclass(frozen=True)
class Turn:
    """One request: raw `text` to complete, or chat `messages` (the new ones only in a session)."""

    params: SamplingParams
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class TurnResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    speculation: dict[str, float | int] | None = None  # drafting stats when a drafter ran


def run_turn(turn: Turn) -> StepFn:
    """Yields GenerationEvents (PREFILL_TICK between prefill chunks); returns a TurnResult."""

    def run(engine: Engine, task: Task) -> Steps[object, None, TurnResult]:
        gen = engine.generator
        session = engine.session(turn.session_id, task.owner) if turn.session_id is not None else None
        if session is None:
            seq = gen.new_sequence(f"ikv:gen:{uuid.uuid4().hex}:")
            prompt = gen.encode(turn.text) if turn.text is not None else gen.encode_chat(turn.messages or [])
        else:
            assert session.seq is not None, "the scheduler loads a session before its task runs"
            seq = session.seq
            if turn.text is not None:
                prompt = session.completion_prompt(gen, turn.text)
            else:
                prompt = session.chat_prompt(gen, turn.messages or [])
        task.seq = seq
        before = len(seq)
        ids: list[int] = []
        pieces: list[str] = []
        reason = "length"
        speculation = None
        try:
            event: GenerationEvent
            for event in gen.run(seq, prompt, turn.params):
                if event.token_id is not None:
                    ids.append(event.token_id)
                pieces.append(event.text)
                reason = event.finish_reason or reason
                speculation = event.speculation or speculation
                yield event
        finally:
            if session is None:
                seq.release()
            elif len(seq) > before:  # record the turn as far as it went (even if cancelled)
                _record(engine, session, turn, ids, "".join(pieces))
        return TurnResult("".join(pieces), reason, len(prompt), len(ids), speculation)

    return run


def _record(engine: Engine, session: Session, turn: Turn, ids: list[int], reply: str) -> None:
    if turn.messages is not None:
        session.after_chat(engine.generator, turn.messages, ids, reply)
    else:
        session.after_completion(ids)
    session.save(engine.store)


@dataclass
class IngestJob:
    """A document being prefilled into a session; read by other threads for progress."""

    session_id: str
    owner: str
    name: str
    id: str = field(default_factory=lambda: f"job_{uuid.uuid4().hex}")
    document_id: str = field(default_factory=lambda: f"doc_{uuid.uuid4().hex[:16]}")
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    total_tokens: int = 0
    done_tokens: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "ingestion_job",
            "session_id": self.session_id,
            "document_id": self.document_id,
            "name": self.name,
            "status": self.status,
            "total_tokens": self.total_tokens,
            "done_tokens": self.done_tokens,
            "progress": self.done_tokens / self.total_tokens if self.total_tokens else 0.0,
            "error": self.error,
            "created": int(self.created),
            "finished": int(self.finished) if self.finished else None,
        }


def run_ingest(job: IngestJob, text: str) -> StepFn:
    """Prefill `text` into the job's session, one chunk per step, then snapshot the session."""

    def run(engine: Engine, task: Task) -> Steps[object, None, None]:
        gen = engine.generator
        session = engine.session(job.session_id, task.owner)
        assert session.seq is not None, "the scheduler loads a session before its task runs"
        seq = task.seq = session.seq
        ids = session.completion_prompt(gen, text)
        gen.check_fits(len(seq), ids)
        job.status, job.total_tokens = "running", len(ids)
        start = len(seq)
        try:
            for i in range(0, len(ids), gen.chunk_size):
                feed(gen.model, gen.pool, seq, ids[i : i + gen.chunk_size], gen.chunk_size)
                session.pending = []
                job.done_tokens = min(len(ids), i + gen.chunk_size)
                yield None
            job.status = "succeeded"
        except GeneratorExit:
            job.status = "cancelled"
            raise
        except Exception as e:
            job.status, job.error = "failed", str(e)
            raise
        finally:
            job.finished = time.time()
            if len(seq) > start:
                session.documents.append(DocumentSpan(job.document_id, job.name, start, len(seq)))
            session.save(engine.store, index_snapshot=True)

    return run
