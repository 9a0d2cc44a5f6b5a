"""The engine: one worker thread owns the model, the page pool and the sessions; requests queue
to it and never touch tensors themselves.

A task is a step function (a generator): every `next()` is at most one forward, a prefill
chunk or one decode token. The worker advances the running tasks round-robin, one step each,
so a book being ingested does not stall a chat reply. Tasks of one session run in arrival
order. Sequences are not batched into one forward yet: steps of different tasks run one after
another.

The pool holds `slots` sequences: the running stateless requests plus the sessions loaded in
pages. When a task needs a slot and none is free, the least recently used idle session is
parked (saved to the block store, pages given back); it comes back on its next request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from collections.abc import Generator as Steps
from dataclasses import dataclass, field
from typing import Any, Protocol

from infinikv.engine.generator import Generator
from infinikv.engine.sequence import Sequence
from infinikv.engine.session import SESSION_NAMESPACE, Session, session_prefix
from infinikv.errors import InfinikvError
from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.store import BlockStore

log = logging.getLogger(__name__)


class SessionNotFoundError(InfinikvError):
    """No session with this id belongs to the caller."""


class EngineOverloadedError(InfinikvError):
    """The queue of waiting requests is full."""


class EngineStoppedError(InfinikvError):
    """The engine is shutting down and takes no more work."""


@dataclass(frozen=True)
class Finished:
    """The task's step function returned `value`."""

    value: Any


@dataclass(frozen=True)
class Failed:
    error: BaseException


class TaskHandle:
    """The requester's end of a task: what the worker emits, in order, ending with Finished
    or Failed. Async requesters read through their event loop, others block on a queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._async: asyncio.Queue[object] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.cancelled = False

    def emit(self, item: object) -> None:
        if self._loop is not None and self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the requester's loop is gone: nobody is listening
                self.cancelled = True
        else:
            self._sync.put(item)

    async def next(self) -> object:
        assert self._async is not None, "an async read needs a handle made with a loop"
        return await self._async.get()

    def next_blocking(self, timeout: float | None = None) -> object:
        return self._sync.get(timeout=timeout)

    def cancel(self) -> None:
        """Stop the task at its next step (the client went away)."""
        self.cancelled = True


class EngineObserver(Protocol):
    def step(self, seconds: float, retrieval_seconds: float) -> None: ...


# A task body: every next() is one step; the return value is the result.
StepFn = Callable[["Engine", "Task"], Steps[object, None, Any]]


@dataclass(eq=False)
class Task:
    run: StepFn
    handle: TaskHandle
    session_id: str | None = None  # tasks naming a session run one at a time, in order
    owner: str = ""  # who asks (the session must be theirs)
    needs_sequence: bool = False  # it runs a sequence: a slot in the pool (its session's, loaded)
    seq: Sequence | None = None  # set by the step function; read for retrieval metrics
    steps: Steps[object, None, Any] | None = None
    search_seen: float = 0.0
    uses_slot: bool = field(default=False, init=False)  # a stateless sequence of its own


class Engine:
    def __init__(
        self,
        generator: Generator,
        store: BlockStore,
        max_queue: int = 64,
        observer: EngineObserver | None = None,
    ):
        self.generator = generator
        self.store = store
        self.max_queue = max_queue
        self.observer = observer
        self.sessions: dict[str, Session] = {}
        self._inbox: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._queued = 0  # submitted, not yet admitted (read by other threads: approximate)
        self._waiting: deque[Task] = deque()
        self._running: deque[Task] = deque()
        self._busy: dict[str, Task] = {}
        self._stateless = 0  # running tasks holding a sequence of their own
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="infinikv-engine", daemon=True)

    # ---- requester side (any thread) --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish nothing new: cancel queued work, save every loaded session, end the worker."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queued

    def submit(
        self,
        run: StepFn,
        handle: TaskHandle,
        session_id: str | None = None,
        owner: str = "",
        needs_sequence: bool = False,
    ) -> TaskHandle:
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        if self._queued >= self.max_queue:
            raise EngineOverloadedError(f"too many queued requests ({self._queued}); retry later")
        self._queued += 1
        self._inbox.put(Task(run, handle, session_id, owner, needs_sequence))
        return handle

    def call_blocking(
        self, fn: Callable[[Engine], Any], timeout: float | None = None, session_id: str | None = None
    ) -> Any:
        """Run fn(engine) on the worker between steps and return its result (or raise its error);
        with `session_id`, after the work queued on that session."""
        handle = self.submit(_call(fn), TaskHandle(), session_id)
        out = handle.next_blocking(timeout)
        if isinstance(out, Failed):
            raise out.error
        assert isinstance(out, Finished)
        return out.value

    async def call(self, fn: Callable[[Engine], Any], session_id: str | None = None) -> Any:
        handle = self.submit(_call(fn), TaskHandle(asyncio.get_running_loop()), session_id)
        out = await handle.next()
        if isinstance(out, Failed):
            raise out.error
        assert isinstance(out, Finished)
        return out.value

    # ---- sessions (worker thread only) ------------------------------------------------------

    def create_session(self, owner: str) -> Session:
        session = Session(id=f"sess_{uuid.uuid4().hex}", owner=owner)
        self.sessions[session.id] = session
        session.save(self.store)
        return session

    def session(self, session_id: str, owner: str) -> Session:
        """The caller's session, read back from the store when this process has not seen it
        (a restart, another replica). Another owner's session is reported as not found."""
        session = self.sessions.get(session_id)
        if session is None:
            (raw,) = self.store.get_many([f"{session_prefix(session_id)}session"])
            if raw is None:
                raise SessionNotFoundError(f"session {session_id!r} not found")
            session = Session.from_json(raw)
            self.sessions[session_id] = session
        if session.owner != owner:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        return session

    def list_sessions(self, owner: str) -> list[Session]:
        ids = {
            key[len(SESSION_NAMESPACE) : -len(":session")]
            for key in self.store.keys(SESSION_NAMESPACE)
            if key.endswith(":session")
        }
        found = []
        for sid in sorted(ids | set(self.sessions)):
            try:
                found.append(self.session(sid, owner))
            except (SessionNotFoundError, CorruptSnapshotError):
                continue
        return found

    def delete_session(self, session_id: str, owner: str) -> int:
        """Pages, memory, index and every store key of the session; returns the keys deleted."""
        session = self.session(session_id, owner)
        if session.seq is not None:
            session.seq.table.release()
            session.seq = None
        del self.sessions[session_id]
        return self.store.delete_prefix(session.prefix)

    def save_all(self) -> None:
        for session in self.sessions.values():
            if session.seq is not None:
                session.save(self.store, index_snapshot=True)

    # ---- the worker -------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._drain(block=not self._running and not self._waiting):
            self._admit()
            if self._running:
                self._step(self._running.popleft())
            elif self._waiting:  # none can start yet (not expected): wait for news, briefly
                if not self._drain(block=True, timeout=0.05):
                    break
        self._shutdown()

    def _drain(self, block: bool, timeout: float | None = None) -> bool:
        """Move submitted tasks to the waiting list (waiting for one if `block`); False once
        the engine is told to stop."""
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    return False
                self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _shutdown(self) -> None:
        for task in [*self._running, *self._waiting]:
            if task.steps is not None:
                task.steps.close()
            task.handle.emit(Failed(EngineStoppedError("the server is shutting down")))
        try:
            self.save_all()
        except Exception:  # noqa: BLE001 - a store outage at exit is logged, not raised
            log.exception("saving sessions at shutdown failed")

    def _slots_used(self) -> int:
        return self._stateless + sum(1 for s in self.sessions.values() if s.seq is not None)

    def _make_room(self) -> bool:
        if self._slots_used() < self.generator.slots:
            return True
        idle = [s for s in self.sessions.values() if s.seq is not None and s.id not in self._busy]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        log.info("parking session %s to free pages", victim.id)
        victim.park(self.store)
        return True

    def _admit(self) -> None:
        for task in list(self._waiting):
            if task.handle.cancelled:
                self._dequeue(task)
                task.handle.emit(Failed(InfinikvError("cancelled")))
                continue
            if task.session_id is not None and task.session_id in self._busy:
                continue
            if task.needs_sequence:
                try:
                    if not self._reserve(task):
                        continue
                except InfinikvError as e:  # unknown session, corrupt snapshot
                    self._dequeue(task)
                    task.handle.emit(Failed(e))
                    continue
            self._dequeue(task)
            if task.session_id is not None:
                self._busy[task.session_id] = task
            self._stateless += task.uses_slot
            task.steps = task.run(self, task)
            self._running.append(task)

    def _reserve(self, task: Task) -> bool:
        """Take a pool slot for the task's sequence: its own, or its session's (loaded now)."""
        if task.session_id is None:
            task.uses_slot = self._make_room()
            return task.uses_slot
        session = self.session(task.session_id, task.owner)
        if session.seq is None:
            if not self._make_room():
                return False
            session.warm(self.generator, self.store)
        return True

    def _dequeue(self, task: Task) -> None:
        self._waiting.remove(task)
        self._queued -= 1

    def _finish(self, task: Task, outcome: object) -> None:
        if task.session_id is not None:
            self._busy.pop(task.session_id, None)
        self._stateless -= task.uses_slot
        task.handle.emit(outcome)

    def _step(self, task: Task) -> None:
        assert task.steps is not None
        if task.handle.cancelled:
            task.steps.close()
            self._finish(task, Failed(InfinikvError("cancelled")))
            return
        t0 = time.perf_counter()
        try:
            item = next(task.steps)
        except StopIteration as done:
            self._finish(task, Finished(done.value))
            return
        except Exception as e:  # noqa: BLE001 - the error goes to its requester; others go on
            if not isinstance(e, InfinikvError):
                log.exception("task failed")
            self._finish(task, Failed(e))
            return
        finally:
            self._observe(task, time.perf_counter() - t0)
        task.handle.emit(item)
        self._running.append(task)

    def _observe(self, task: Task, seconds: float) -> None:
        if self.observer is None:
            return
        retrieval = 0.0
        state = task.seq.long_state if task.seq is not None else None
        if state is not None and state.memory is not None:
            retrieval = state.memory.search_seconds - task.search_seen
            task.search_seen = state.memory.search_seconds
        self.observer.step(seconds, retrieval)


def _call(fn: Callable[[Engine], Any]) -> StepFn:
    def run(engine: Engine, task: Task) -> Steps[object, None, Any]:
        return fn(engine)
        yield  # a generator that finishes in its first step

    return run
