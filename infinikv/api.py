"""The Python API: a model behind the same engine that the CLI and the HTTP server drive.

    from infinikv import LLM

    with LLM(quantize="bf16") as llm:             # any setting of `infinikv serve`
        print(llm.generate("The capital of France is", max_tokens=8).text)
        for piece in llm.stream("Once upon a time", max_tokens=32):
            print(piece, end="", flush=True)
        print(llm.chat([{"role": "user", "content": "Hello!"}]).text)
        session = llm.session()                 # a long-lived sequence with its own memory
        session.add_file("book.epub")           # .txt .md .html .epub .pdf
        print(session.complete("Question: who wrote the letter? Answer:").text)
        session.delete()

Calls from several threads are safe: each is a request to the engine's worker, and
concurrent generations decode in one batch. Errors are InfinikvError (ValueError for a bad
sampling parameter)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from infinikv.documents import Document, read_path
from infinikv.engine.citations import Citation
from infinikv.engine.grammar import json_grammar
from infinikv.engine.requests import Turn, TurnResult, ingest_blocking, stream_turn
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import ProgressFn
from infinikv.engine.session import SessionStats
from infinikv.service.runtime import build_engine
from infinikv.service.settings import Settings

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    citations: list[Citation] = field(default_factory=list)  # with citations=True


class LLM:
    """One model and its engine. Settings are those of `infinikv serve` (README, Settings):
    `LLM(model="path/or/hub-id", quantize="bf16", redis_url="redis://...")`."""

    def __init__(self, **settings: Any) -> None:
        self.settings = Settings(**settings)
        self._engine = build_engine(self.settings)
        self._engine.start()

    def generate(self, prompt: str, **sampling: Any) -> Completion:
        """Complete `prompt` (raw text). Sampling: max_tokens, temperature, top_p, top_k,
        seed, stop, stop_token_ids, ignore_eos, logit_bias ({token id: bias}),
        presence_penalty, frequency_penalty, logprobs, json_schema (a schema dict, or True for
        any JSON object: the output always parses)."""
        return self._run(Turn(self._params(sampling), text=prompt))

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """`generate`, as text pieces while they are decoded."""
        return self._pieces(Turn(self._params(sampling), text=prompt))

    def chat(self, messages: Messages, **sampling: Any) -> Completion:
        """The assistant's reply to `messages` through the model's chat template."""
        return self._run(Turn(self._params(sampling), messages=messages))

    def stream_chat(self, messages: Messages, **sampling: Any) -> Iterator[str]:
        return self._pieces(Turn(self._params(sampling), messages=messages))

    def session(self, session_id: str | None = None) -> Session:
        """A new session, or the stored one named `session_id` (on a Redis store, written by
        any process)."""
        if session_id is None:
            session_id = self._engine.call_blocking(lambda e: e.sessions.create("").id)
        else:
            self._engine.call_blocking(lambda e: e.sessions.get(session_id, ""), session_id=session_id)
        return Session(self, session_id)

    def close(self) -> None:
        """Stop the engine; sessions are committed to the store first."""
        self._engine.stop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _params(self, sampling: dict[str, Any]) -> SamplingParams:
        sampling.setdefault("max_tokens", self.settings.default_max_tokens)
        if "json_schema" in sampling:  # True: any JSON object
            schema = sampling.pop("json_schema")
            sampling["grammar"] = json_grammar(None if schema is True else schema)
        if isinstance(sampling.get("logit_bias"), dict):
            sampling["logit_bias"] = tuple(sampling["logit_bias"].items())
        if "stop_token_ids" in sampling:
            sampling["stop_token_ids"] = tuple(sampling["stop_token_ids"])
        if "stop" in sampling:
            stop = sampling["stop"]
            sampling["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return SamplingParams(**sampling)

    def _run(self, turn: Turn) -> Completion:
        for item in stream_turn(self._engine, turn):
            if isinstance(item, TurnResult):
                return _completion(item)
        raise AssertionError("a turn always ends with its result")

    def _pieces(self, turn: Turn) -> Iterator[str]:
        for item in stream_turn(self._engine, turn):
            if isinstance(item, TurnResult):
                return
            if item.text:
                yield item.text


class Session:
    """A conversation or a set of documents bound to its own cache and memory, committed
    to the store after every call (whole or not at all)."""

    def __init__(self, llm: LLM, session_id: str):
        self._llm, self.id = llm, session_id

    def chat(self, content: str, **sampling: Any) -> Completion:
        """Append a user message and return the assistant's reply (kept in the session)."""
        message = {"role": "user", "content": content}
        return self._llm._run(Turn(self._llm._params(sampling), messages=[message], session_id=self.id))

    def complete(self, text: str, **sampling: Any) -> Completion:
        """Append `text` and continue it (a question after a document, say)."""
        return self._llm._run(Turn(self._llm._params(sampling), text=text, session_id=self.id))

    def add_document(self, text: str, name: str = "document.txt", progress: ProgressFn | None = None) -> int:
        """Prefill `text` into the session and commit it; returns its tokens. `progress`
        (tokens done, tokens total) is called as the job advances."""
        return ingest_blocking(self._llm._engine, self.id, Document(name, text), progress)

    def add_file(self, path: str | Path, progress: ProgressFn | None = None) -> int:
        """Read a .txt, .md, .html, .epub or .pdf file (chapters and pages kept, as the
        session's stats show) and ingest it as `add_document` does."""
        return ingest_blocking(self._llm._engine, self.id, read_path(path), progress)

    def stats(self) -> SessionStats:
        return self._llm._engine.call_blocking(
            lambda e: e.sessions.get(self.id, "").stats(), session_id=self.id
        )

    def delete(self) -> None:
        """Delete the session and everything it stored."""
        self._llm._engine.call_blocking(lambda e: e.sessions.delete(self.id, ""), session_id=self.id)


def _completion(result: TurnResult) -> Completion:
    return Completion(
        result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens, result.citations
    )
