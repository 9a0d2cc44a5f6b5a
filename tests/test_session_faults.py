"""Sessions survive faults, on the real default model: a store that fails at any point of a
turn or an ingestion (before the writes, during them, at the commit, the commit applied but
its reply lost, after it) leaves the session exactly as before the request, or once the
commit landed exactly as after it. Checked on a fresh engine (a restart, or a crash: the
old engine abandoned without its shutdown) by the history and the next-token logits against
the same requests run without faults, with no store key that no committed record names.
Two engines on one store take turns on one session and see each other's turns."""

from __future__ import annotations

import pytest
import torch

from infinikv.documents import Document
from infinikv.engine.generator import Generator
from infinikv.engine.jobs import IngestJob
from infinikv.engine.requests import Turn, run_ingest, run_turn
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.sequence import Sequence, feed
from infinikv.engine.session import record_key, session_prefix
from infinikv.engine.tasks import Failed, Finished, TaskHandle
from infinikv.errors import SessionNotFoundError
from infinikv.evaluation.haystack import HaystackMissing, haystack_text
from infinikv.memory.store import InProcessBlockStore, StoreUnavailableError
from infinikv.service.settings import Settings

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
PROBE = " Who spoke these words, and to whom?"


@pytest.fixture(scope="module")
def text() -> str:
    try:
        return haystack_text("bible")
    except HaystackMissing as e:
        pytest.skip(str(e))


class FaultyStore(InProcessBlockStore):
    """Every write of a session is a compare-and-set: this store logs each one's keys and
    fails the `fail_at`-th (1-based), before applying it or, with `applied`, after."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.fail_at: int | None = None
        self.applied = False

    def compare_and_set(self, guard, expected, items, deletes) -> bool:
        self.calls.append([*items, *(f"-{k}" for k in deletes)])
        fail = len(self.calls) == self.fail_at
        if fail and not self.applied:
            raise StoreUnavailableError("injected: the store went away before this write")
        done = super().compare_and_set(guard, expected, items, deletes)
        if fail:
            raise StoreUnavailableError("injected: the store went away before its reply")
        return done


def engine(model, store) -> Engine:
    """A small resident window so that the history leaves pages for the memory and the store."""
    cfg = Settings(resident=256, window=128).long_context_config(model.config.max_position_embeddings)
    gen = Generator(model, 8192, 16, 64, long_context=cfg, store=InProcessBlockStore(), slots=2)
    made = Engine(gen, store, lease_seconds=60, lease_wait=5)
    made.start()
    return made


def outcome(e: Engine, run, sid: str, background: bool = False) -> object:
    handle = e.submit(run, TaskHandle(), sid, "", needs_sequence=True, background=background)
    while True:  # bounded by each read's timeout
        item = handle.next_blocking(timeout=300)
        if isinstance(item, Finished | Failed):
            return item


def ask(e: Engine, sid: str, text: str) -> object:
    return outcome(e, run_turn(Turn(GREEDY, text=text, session_id=sid)), sid)


def ingest(e: Engine, sid: str, text: str) -> object:
    return outcome(e, run_ingest(IngestJob(sid, "", "doc"), Document("doc", text)), sid, background=True)


def history(e: Engine, text: str) -> str:
    """H0: a session holding a document (past its resident window) and one turn."""
    sid = e.call_blocking(lambda en: en.sessions.create("").id, timeout=60)
    assert isinstance(ingest(e, sid, text[:1800]), Finished)
    assert isinstance(ask(e, sid, " What was created first?"), Finished)
    return sid


REQUESTS = {
    "turn": lambda e, sid, text: ask(e, sid, " And what was on the face of the deep?"),
    "ingestion": lambda e, sid, text: ingest(e, sid, text[5000:6200]),
}


def read_back(model, store, sid: str) -> tuple[list[int], list[dict], torch.Tensor, set[str]]:
    """On a fresh engine (a restart): the session's tokens and chat turns, the logits after
    a probe, and its store keys that no committed record names (after the load)."""
    e = engine(model, store)

    def probe(en: Engine):
        session = en.sessions.get(sid, "")
        seq = session.warm(en.generator)
        tokens, messages = [*seq.tokens, *session.pending], list(session.messages)
        ids = session.completion_prompt(en.generator, PROBE)
        logits = feed(en.generator.model, en.generator.pool, seq, ids, en.generator.chunk_size)
        en.sessions.discard(session)  # the probe is not part of the session
        return tokens, messages, logits

    try:
        tokens, messages, logits = e.call_blocking(probe, timeout=300, session_id=sid)
    finally:
        e.stop()
    prefix = session_prefix(sid)
    names = [f"{prefix}sequence", f"{prefix}meta"]
    referenced = Sequence.referenced_keys(prefix, dict(zip(names, store.get_many(names), strict=True)))
    referenced.add(record_key(sid))
    assert all(v is not None for v in store.get_many(sorted(referenced - {f"{prefix}favourites"})))
    return tokens, messages, logits, set(store.keys(prefix)) - referenced


@pytest.fixture(scope="module")
def references(default_model, text):
    """Per request kind: (the state before, the state after, the write calls of H0 and of
    the request in a run without faults)."""
    made = {}
    for kind, request in REQUESTS.items():
        store = FaultyStore()
        e = engine(default_model, store)
        sid = history(e, text)
        e.stop()
        before = read_back(default_model, store, sid)
        e = engine(default_model, store)
        start = len(store.calls)
        assert isinstance(request(e, sid, text), Finished)
        e.stop()
        after = read_back(default_model, store, sid)
        made[kind] = (before, after, start, store.calls[start:])
    return made


def points(calls: list[list[str]]) -> dict[str, tuple[int, bool, str]]:
    """Fault points in a request's writes: (1-based offset, applied, the state expected)."""
    commit = next(i for i, keys in enumerate(calls, 1) if any(k.endswith(":session") for k in keys))
    return {
        "lease": (1, False, "before"),
        "first payload": (2, False, "before"),
        "mid payloads": (max(2, commit // 2), False, "before"),
        "commit": (commit, False, "before"),
        "commit, reply lost": (commit, True, "after"),
        "after commit": (commit + 1, False, "after"),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "crash"), [("turn", False), ("ingestion", False), ("ingestion", True)])
def test_a_store_fault_at_any_point_leaves_the_session_before_or_after(
    default_model, text, references, kind, crash
) -> None:
    before, after, _, calls = references[kind]
    assert before[0] != after[0]
    for point, (offset, applied, expected) in points(calls).items():
        store = FaultyStore()
        e = engine(default_model, store)
        sid = history(e, text)
        store.fail_at, store.applied = len(store.calls) + offset, applied
        result = REQUESTS[kind](e, sid, text)
        if not crash:
            e.stop()
        assert isinstance(result, Failed) == (point != "after commit"), point
        tokens, messages, logits, orphans = read_back(default_model, store, sid)
        want = before if expected == "before" else after
        assert tokens == want[0] and messages == want[1], point
        torch.testing.assert_close(logits, want[2], atol=1e-4, rtol=1e-4, msg=point)
        assert not orphans, (point, sorted(orphans)[:5])


@pytest.mark.slow
def test_two_engines_on_one_store_see_each_others_turns_and_deletions(default_model) -> None:
    store = InProcessBlockStore()
    a, b = engine(default_model, store), engine(default_model, store)
    alone = engine(default_model, InProcessBlockStore())
    questions = [" The first turn, on A.", " The second, on B.", " The third, on A again."]
    try:
        shared = a.call_blocking(lambda en: en.sessions.create("").id, timeout=60)
        single = alone.call_blocking(lambda en: en.sessions.create("").id, timeout=60)
        for replica, question in zip([a, b, a], questions, strict=True):
            got, want = ask(replica, shared, question), ask(alone, single, question)
            assert isinstance(got, Finished) and isinstance(want, Finished)
            assert got.value.text == want.value.text  # the same session, whoever served it
        history_a = a.call_blocking(lambda en: en.sessions.get(shared, "").tokens, timeout=60)
        history_b = b.call_blocking(lambda en: en.sessions.get(shared, "").tokens, timeout=60)
        history_alone = alone.call_blocking(lambda en: en.sessions.get(single, "").tokens, timeout=60)
        assert history_a == history_b == history_alone
        a.call_blocking(lambda en: en.sessions.delete(shared, ""), timeout=60, session_id=shared)
        deleted = ask(b, shared, " Still there?")
        assert isinstance(deleted, Failed) and isinstance(deleted.error, SessionNotFoundError)
        assert store.keys(session_prefix(shared)) == []
    finally:
        for e in (a, b, alone):
            e.stop()
