"""The sessions this process holds in memory, over the store that keeps them all: read
back when this process has not seen one or its copy is older than the store's, created,
listed, deleted under a tombstone, rolled back after a failed request, parked (committed
and dropped from the pages). Used by the engine's worker thread only."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from infinikv.engine.generator import Generator
from infinikv.engine.leases import FencedStore, Lease, Leases, control_key
from infinikv.engine.session import SESSION_NAMESPACE, Session, record_key, session_id_of
from infinikv.errors import InfinikvError, SessionNotFoundError
from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.store import BlockStore

log = logging.getLogger(__name__)


class SessionTable:
    def __init__(self, store: BlockStore, leases: Leases, generator: Generator, busy: Callable[[str], bool]):
        self.store, self.leases, self.generator = store, leases, generator
        self.busy = busy  # whether a task of the session runs now (its copy is the newest)
        self.loaded: dict[str, Session] = {}

    @property
    def in_pages(self) -> int:
        """Sessions with pages in the pool (read by other threads: approximate)."""
        return sum(1 for s in list(self.loaded.values()) if s.seq is not None)

    @property
    def memory_tokens(self) -> int:
        """Evicted tokens in the memories of the sessions in pages (approximate, as above)."""
        return sum(s.memory_tokens for s in list(self.loaded.values()))

    def create(self, owner: str) -> Session:
        sid = f"sess_{uuid.uuid4().hex}"
        session = Session(id=sid, owner=owner, store=FencedStore(self.leases))
        session.store.lease = self.leases.acquire(sid)
        try:
            session.save()
        finally:
            self.release(session.store.lease)
            session.store.lease = None
        self.loaded[sid] = session
        return session

    def get(self, session_id: str, owner: str, generation: int | None = None) -> Session:
        """The caller's session, read back from the store when this process has not seen it
        or its copy is older than the store's (a restart, another replica); `generation`:
        the store's, when the caller just read it (taking the lease). Another owner's
        session, or a deleted one, is reported as not found."""
        session = self.loaded.get(session_id)
        if session is not None and (generation is not None or not self.busy(session_id)):
            current = self.leases.generation(session_id) if generation is None else generation
            if current != session.generation:
                self.forget(session)
                session = None
        if session is None:
            session = self._read(session_id)
            self.loaded[session_id] = session
        if session.owner != owner:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        return session

    def check_fits(self, session_id: str, owner: str, text: str) -> None:
        """Refuse (CapacityError) text that would not fit the session, before it is queued."""
        session = self.get(session_id, owner)
        self.generator.check_fits(session.tokens, session.completion_prompt(self.generator, text))

    def _read(self, session_id: str) -> Session:
        raw, generation, deleted = self.store.get_many(
            [
                record_key(session_id),
                control_key(session_id, "generation"),
                control_key(session_id, "deleted"),
            ]
        )
        if raw is None or deleted is not None:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        return Session.from_json(raw, FencedStore(self.leases), int(generation or 0))

    def owned_by(self, owner: str) -> list[Session]:
        """The sessions of `owner` in the store and in this process."""
        ids = {session_id_of(key) for key in self.store.keys(SESSION_NAMESPACE)} - {None}
        found = []
        for sid in sorted(ids | set(self.loaded)):
            assert sid is not None
            try:
                found.append(self.get(sid, owner))
            except (SessionNotFoundError, CorruptSnapshotError):
                continue
        return found

    def delete(self, session_id: str, owner: str) -> int:
        """A tombstone first (no server can lease the session again, no stale one write it),
        then every store key of the session; returns the keys deleted. Runs under the lease."""
        session = self.get(session_id, owner)
        assert session.store.lease is not None, "a session task holds the session's lease"
        self.leases.tombstone(session.store.lease)
        self.forget(session)
        return self.store.delete_prefix(session.prefix)

    def discard(self, session: Session) -> None:
        """Roll a session back to its committed records after a request that failed: drop this
        copy (it reloads on its next request) and the payloads the request left unreferenced."""
        self.forget(session)
        try:
            session.collect_garbage()
        except InfinikvError as e:  # store down or lease lost: the next load collects them
            log.warning("session %s: garbage left for the next load (%s)", session.id, e)

    def forget(self, session: Session) -> None:
        session.drop()
        if self.loaded.get(session.id) is session:
            del self.loaded[session.id]

    def park(self, session: Session) -> None:
        """Commit an idle session with its index snapshot and give its pages back; a copy that
        is no longer the latest, or cannot be committed, is only dropped."""
        try:
            lease = self.leases.acquire(session.id)
        except InfinikvError as e:
            log.info("session %s dropped unsaved (%s)", session.id, e)
            self.forget(session)
            return
        session.store.lease = lease
        try:
            if lease.generation == session.generation:
                session.park()
        except InfinikvError as e:
            log.warning("session %s dropped unsaved (%s)", session.id, e)
        finally:
            session.store.lease = None
            self.release(lease)
            self.forget(session)

    def save_all(self) -> None:
        for session in list(self.loaded.values()):
            if session.seq is not None:
                self.park(session)

    def release(self, lease: Lease) -> None:
        try:
            self.leases.release(lease)
        except InfinikvError as e:  # the lease expires on its own
            log.warning("lease of session %s not released (%s)", lease.session_id, e)
