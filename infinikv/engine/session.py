"""A session: one long conversation or document collection bound to a persistent sequence.

Only new turns arrive; the history lives in the sequence's resident window and memory. A
session is committed to the block store after every request that changed it: new payloads
first, then its records (chat state, token history, layouts) in one fenced write under its
lease (leases.py), so a reader sees the session before the request or after it, never a mix.
It can leave the page pool when idle (`park`) and come back after a restart of the server.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from infinikv.documents import Document
from infinikv.engine.generator import Generator
from infinikv.engine.leases import FencedStore
from infinikv.engine.sequence import Sequence
from infinikv.errors import InfinikvError
from infinikv.memory.index import CorruptSnapshotError

log = logging.getLogger(__name__)

SESSION_NAMESPACE = "ikv:session:"
RECORD = "session"


def session_prefix(session_id: str) -> str:
    """Every key of a session starts so; `{id}` keeps them in one Redis Cluster hash slot."""
    return f"{SESSION_NAMESPACE}{{{session_id}}}:"


def record_key(session_id: str) -> str:
    return f"{session_prefix(session_id)}{RECORD}"


def session_id_of(record: str) -> str | None:
    """The id in a session record's key; None for any other key."""
    head, _, rest = record.partition("{")
    sid, _, tail = rest.partition("}")
    return sid if head == SESSION_NAMESPACE and tail == f":{RECORD}" else None


@dataclass
class SectionSpan:
    """A chapter or page of an ingested document: characters [char_start, char_end) of the
    document's text, tokens [start, end) of the session's history."""

    kind: str
    title: str
    char_start: int
    char_end: int
    start: int
    end: int


@dataclass
class DocumentSpan:
    """Where an ingested document sits in the session's token history."""

    id: str
    name: str
    start: int
    end: int
    sections: list[SectionSpan] = field(default_factory=list)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> DocumentSpan:
        sections = [SectionSpan(**s) for s in data.get("sections", [])]  # absent in older records
        return cls(str(data["id"]), str(data["name"]), int(data["start"]), int(data["end"]), sections)


@dataclass(frozen=True)
class SessionStats:
    """What a session holds, as its owner may read it (None: not loaded in pages)."""

    id: str
    created: int
    tokens: int
    loaded: bool
    resident_tokens: int | None
    evicted_blocks: int | None
    memory_tokens: int
    bytes: int
    documents: list[DocumentSpan]
    turns: int


@dataclass
class Session:
    id: str
    owner: str  # a hash of the API key that created it ("" without auth)
    store: FencedStore = field(repr=False)  # writes go under the session's lease
    created: float = field(default_factory=time.time)
    seq: Sequence | None = None  # None while parked (only in the store)
    # Tokens sampled but not fed yet: the last token of the previous generation.
    pending: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)  # chat turns, for the template
    chat_text: str = ""  # the chat-template text the sequence holds so far
    documents: list[DocumentSpan] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    saved_tokens: int = 0  # tokens of the sequence in the store (what a parked session holds)
    generation: int = 0  # of the records this copy was loaded from or last committed
    referenced: set[str] = field(default_factory=set)  # store keys the committed records need

    @property
    def prefix(self) -> str:
        return session_prefix(self.id)

    @property
    def tokens(self) -> int:
        """Tokens in the session's history, the pending one included."""
        return (len(self.seq) if self.seq is not None else self.saved_tokens) + len(self.pending)

    # ---- prompts for a new turn -------------------------------------------------------------

    def chat_prompt(self, generator: Generator, new_messages: list[dict[str, str]]) -> list[int]:
        """Tokens for new chat messages: the chat template rendered over the whole conversation,
        minus the text the sequence already holds (so the template's turn markers and system
        prompt appear once, where a full rendering would put them)."""
        full = generator.chat_text([*self.messages, *new_messages])
        common = _common_prefix_len(full, self.chat_text)
        ids = generator.tokenizer(full[common:], add_special_tokens=False)["input_ids"]
        return [*self.pending, *ids]

    def completion_prompt(self, generator: Generator, text: str) -> list[int]:
        """Tokens for raw text appended to the history (special tokens only on an empty one)."""
        ids = generator.tokenizer(text, add_special_tokens=self.tokens == 0)["input_ids"]
        return [*self.pending, *ids]

    def document_prompt(
        self, generator: Generator, document: Document
    ) -> tuple[list[int], list[SectionSpan]]:
        """`completion_prompt` of a document's text, and where its sections' tokens will sit
        in the history (a token belongs to the section its first character is in)."""
        encoded = generator.tokenizer(
            document.text, add_special_tokens=self.tokens == 0, return_offsets_mapping=True
        )
        base = self.tokens  # where the document's first token will sit, after the pending one
        firsts = [start for start, end in encoded["offset_mapping"]]
        spans = [
            SectionSpan(
                s.kind,
                s.title,
                s.start,
                s.end,
                base + bisect.bisect_left(firsts, s.start),
                base + bisect.bisect_left(firsts, s.end),
            )
            for s in document.sections
        ]
        return [*self.pending, *encoded["input_ids"]], spans

    def after_chat(
        self, generator: Generator, new_messages: list[dict[str, str]], ids: list[int], reply: str
    ) -> None:
        full = generator.chat_text([*self.messages, *new_messages])
        self.chat_text = full + generator.tokenizer.decode(ids)
        self.messages += [*new_messages, {"role": "assistant", "content": reply}]
        self.pending = ids[-1:]

    def after_completion(self, ids: list[int]) -> None:
        self.pending = ids[-1:]

    # ---- persistence ------------------------------------------------------------------------

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "owner": self.owner,
                "created": self.created,
                "pending": self.pending,
                "messages": self.messages,
                "chat_text": self.chat_text,
                "documents": [asdict(d) for d in self.documents],
                "tokens": self.tokens,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, store: FencedStore, generation: int) -> Session:
        try:
            data: dict[str, Any] = json.loads(raw)
            made = cls(
                id=str(data["id"]),
                owner=str(data["owner"]),
                store=store,
                created=float(data["created"]),
                pending=[int(t) for t in data["pending"]],
                messages=[{"role": str(m["role"]), "content": str(m["content"])} for m in data["messages"]],
                chat_text=str(data["chat_text"]),
                documents=[DocumentSpan.from_record(d) for d in data["documents"]],
                generation=generation,
            )
            made.saved_tokens = int(data["tokens"]) - len(made.pending)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptSnapshotError(f"session record is corrupt: {e}") from e
        return made

    def save(self, index_snapshot: bool = False) -> None:
        """Commit what changed since the last commit (the lease must be held): new payloads,
        then every record with the next generation in one fenced write, then the payloads
        only the previous commit named are deleted. Without `index_snapshot` the memory
        index is not re-serialized: a load indexes the blocks evicted since then again."""
        generation = self.generation + 1
        records: dict[str, bytes] = {}
        if self.seq is not None:
            records = self.seq.save(self.store, self.prefix, index_snapshot, generation)
        records[f"{self.prefix}{RECORD}"] = self.to_json()
        self.store.commit(records, generation)
        self.generation = generation
        if self.seq is None:
            return
        self.saved_tokens = len(self.seq)
        referenced = Sequence.referenced_keys(self.prefix, dict(records)) | {f"{self.prefix}{RECORD}"}
        superseded = sorted(self.referenced - referenced)
        self.referenced = referenced
        try:
            self.store.delete(superseded)
        except InfinikvError:  # committed; the next load collects them
            log.warning("session %s: %d superseded keys left for the next load", self.id, len(superseded))

    def collect_garbage(self) -> int:
        """Delete the session's keys that its committed records do not name (payloads of
        a request that failed or of a process that died before its commit); returns how many."""
        names = [f"{self.prefix}sequence", f"{self.prefix}meta"]
        records = dict(zip(names, self.store.get_many(names), strict=True))
        referenced = Sequence.referenced_keys(self.prefix, records) | {f"{self.prefix}{RECORD}"}
        doomed = [k for k in self.store.keys(self.prefix) if k not in referenced]
        self.store.delete(doomed)
        self.referenced = referenced
        return len(doomed)

    def park(self) -> None:
        """Commit everything and give the pages back; the session reloads on its next request."""
        if self.seq is None:
            return
        self.save(index_snapshot=True)
        self.drop()

    def drop(self) -> None:
        """Give the pages back without writing: the store's committed records stay the truth."""
        if self.seq is not None:
            self.seq.table.release()
            self.seq = None

    def warm(self, generator: Generator) -> Sequence:
        """The session's sequence in pages, restored from the store if it was parked; keys
        that no committed record names are collected first."""
        if self.seq is None:
            self.collect_garbage()
            if self.saved_tokens == 0:
                self.seq = generator.new_sequence(self.prefix, self.store)
            else:
                self.seq = Sequence.restore(
                    generator.model, generator.pool, generator.long_context, self.store, self.prefix
                )
        self.last_used = time.monotonic()
        return self.seq

    @property
    def memory_tokens(self) -> int:
        """Evicted tokens in the memory of the loaded sequence (0 when parked)."""
        seq = self.seq
        memory = seq.long_state.memory if seq is not None and seq.long_state is not None else None
        return memory.tokens if memory is not None else 0

    def stats(self) -> SessionStats:
        seq = self.seq
        resident = seq.table.resident if seq is not None else None
        evicted = seq.table.evicted_blocks if seq is not None else None
        memory = seq.long_state.memory if seq is not None and seq.long_state is not None else None
        nbytes = 0
        if seq is not None:
            pool = seq.pool
            per_page = 3 * pool.k[:, 0].numel() * pool.k.element_size()
            nbytes = len(seq.table.pages) * per_page
        if memory is not None:
            nbytes += memory.nbytes
        return SessionStats(
            id=self.id,
            created=int(self.created),
            tokens=self.tokens,
            loaded=seq is not None,
            resident_tokens=resident,
            evicted_blocks=evicted,
            memory_tokens=memory.tokens if memory is not None else 0,
            bytes=nbytes,
            documents=list(self.documents),
            turns=sum(1 for m in self.messages if m["role"] == "user"),
        )


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
