"""The engine: one worker thread owns the model, the page pool and the sessions; requests queue
to it and never touch tensors themselves.

A task is a step function (a generator): each step either runs one forward of its own (a
long prompt's chunk, a speculative step, an ingestion chunk) and ends at a tick, or asks for
a share of the round's forwards by yielding a `Forward` (its decode token) or a `Prompt` (a
short prompt, in pieces; batch.py). Each round of the worker steps every running task:
forwards of their own up to `step_tokens` prompt rows (taking turns across rounds), then the
decode tokens of all with short prompts' pieces in their room, in shared forwards
(continuous batching: a sequence joins or leaves between rounds). A background task (an
ingestion) steps when no interactive task runs or once a `BACKGROUND_EVERY` seconds, so a
book being ingested does not stall a chat reply. Tasks of one session run in arrival order,
under the session's lease (leases.py): a session another server holds waits for it, up to
`lease_wait` seconds.

The pool holds `slots` sequences: the running stateless requests plus the sessions loaded in
pages. When a task needs a slot and none is free, the least recently used idle session is
parked (committed to the block store, pages given back); it comes back on its next request.
A loaded session whose committed generation moved on (another server wrote it) is dropped
and read back. (Over 350 lines: admission, leases, slots and stepping change the same
queues and counters, one state machine.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from collections.abc import Generator as Steps
from typing import Any

from infinikv.engine.batch import Forward, Part, Prompt, run_round
from infinikv.engine.generator import TICK, GenerationEvent, Generator
from infinikv.engine.jobs import JobRegistry
from infinikv.engine.leases import Leases
from infinikv.engine.sessions import SessionTable
from infinikv.engine.tasks import (
    EngineObserver,
    EngineOverloadedError,
    EngineStoppedError,
    Failed,
    Finished,
    StepFn,
    Task,
    TaskHandle,
)
from infinikv.errors import InfinikvError, SessionBusyError
from infinikv.kernels.cpu.threads import release_team
from infinikv.memory.store import BlockStore

log = logging.getLogger(__name__)

# A running background task (ingestion) gets a step at least this often, in seconds.
BACKGROUND_EVERY = 1.0
# Seconds between two tries of a session lease that another server holds.
LEASE_RETRY = 0.05


class Engine:
    def __init__(
        self,
        generator: Generator,
        store: BlockStore,
        max_queue: int = 64,
        observer: EngineObserver | None = None,
        lease_seconds: float = 30.0,
        lease_wait: float = 30.0,
        step_tokens: int = 512,
        max_batch: int = 32,
    ):
        self.generator = generator
        self.step_tokens = step_tokens  # prompt rows per round in forwards without decode tokens
        self.max_batch = max_batch  # sequences per forward (the model's invariant rows bound it too)
        self.store = store
        self.max_queue = max_queue
        self.observer = observer
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.leases = Leases(store, self.holder, int(lease_seconds * 1000))
        self.lease_wait = lease_wait
        self.jobs = JobRegistry(store, self.holder, int(lease_seconds * 1000))
        self.sessions = SessionTable(store, self.leases, generator, lambda sid: sid in self._busy)
        self._inbox: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._queued = 0  # submitted, not yet admitted (read by other threads: approximate)
        self._waiting: deque[Task] = deque()
        self._running: list[Task] = []
        self._busy: dict[str, Task] = {}
        self._stateless = 0  # running tasks holding a sequence of their own
        self._background_at = 0.0  # when the last background step ended
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="infinikv-engine", daemon=True)

    # ---- requester side (any thread) --------------------------------------------------------

    def start(self) -> None:
        release_team()  # the worker thread computes from now on: its team alone spins
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish nothing new: cancel queued work, save every loaded session, end the worker."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def stopping(self) -> bool:
        return self._stopping

    def submit(
        self,
        run: StepFn,
        handle: TaskHandle,
        session_id: str | None = None,
        owner: str = "",
        needs_sequence: bool = False,
        background: bool = False,
    ) -> TaskHandle:
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        if self._queued >= self.max_queue:
            raise EngineOverloadedError(f"too many queued requests ({self._queued}); retry later")
        self._queued += 1
        self._inbox.put(Task(run, handle, session_id, owner, needs_sequence, background))
        return handle

    def call_blocking(
        self,
        fn: Callable[[Engine], Any],
        timeout: float | None = None,
        session_id: str | None = None,
        owner: str = "",
    ) -> Any:
        """Run fn(engine) on the worker between steps and return its result (or raise its error);
        with `session_id` (`owner`'s), after the work queued on that session, under its lease."""
        handle = self.submit(_call(fn), TaskHandle(), session_id, owner)
        out = handle.next_blocking(timeout)
        if isinstance(out, Failed):
            raise out.error
        assert isinstance(out, Finished)
        return out.value

    async def call(self, fn: Callable[[Engine], Any], session_id: str | None = None, owner: str = "") -> Any:
        handle = self.submit(_call(fn), TaskHandle(asyncio.get_running_loop()), session_id, owner)
        out = await handle.next()
        if isinstance(out, Failed):
            raise out.error
        assert isinstance(out, Finished)
        return out.value

    # ---- the worker -------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._drain(block=not self._running and not self._waiting):
            self._beat()
            self._admit()
            if self._running:
                self._round()
            elif self._waiting:  # waiting for a lease or a slot: wait for news, briefly
                if not self._drain(block=True, timeout=LEASE_RETRY):
                    break
        self._shutdown()

    def _round(self) -> None:
        """Every running task one step: forwards of their own (long prompts' chunks, speculative
        steps, ingestion chunks) until they ran `step_tokens` rows, taking turns across rounds, then
        the decode tokens and short prompts' pieces of all in shared forwards (a lone decode
        token that may draft, drafts; prompt pieces alone get at most one forward, within what
        is left of `step_tokens`). A background task steps only when no interactive one runs or
        when its last step ended BACKGROUND_EVERY ago."""
        due = time.monotonic() - self._background_at >= BACKGROUND_EVERY
        due = due or all(t.background for t in self._running)
        spent = 0  # rows run, not chunks: many short prompts share one round's budget
        for task in list(self._running):
            if task.background and not due:
                continue
            if task.own_forward:
                if spent >= self.step_tokens:
                    continue
                self._running.remove(task)  # the next round starts with another one
                self._running.append(task)
            spent += self._advance(task)
            if task.background:  # its share is counted from the end of its step
                self._background_at = time.monotonic()
        waiting = [t for t in self._running if t.forward is not None and not t.handle.cancelled]
        if waiting:
            # At most one forward of prompt pieces alone: a prompt that ends in it decodes from
            # the next round on, in the room of the forward that carries the others' pieces.
            rows = self.generator.model.invariant_rows
            self._forward(waiting, min(max(0, self.step_tokens - spent), rows))

    def _beat(self) -> None:
        try:
            self.jobs.beat()
        except InfinikvError as e:
            log.warning("heartbeat not written (%s)", e)

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
                self._close(task)
            self._finish(task, Failed(EngineStoppedError("the server is shutting down")))
        try:
            self.sessions.save_all()
            self.jobs.stop_beating()
        except Exception:  # noqa: BLE001 - a store outage at exit is logged, not raised
            log.exception("saving sessions at shutdown failed")

    def _slots_used(self) -> int:
        return self._stateless + self.sessions.in_pages

    def _make_room(self) -> bool:
        if self._slots_used() < self.generator.slots:
            return True
        loaded = self.sessions.loaded.values()
        idle = [s for s in loaded if s.seq is not None and s.id not in self._busy]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        log.info("parking session %s to free pages", victim.id)
        self.sessions.park(victim)
        return True

    def _admit(self) -> None:
        for task in list(self._waiting):
            if task.handle.cancelled:
                self._dequeue(task)
                task.handle.emit(Failed(InfinikvError("cancelled")))
                continue
            if task.session_id is not None and task.session_id in self._busy:
                continue
            try:
                if not self._claim(task) or not self._reserve(task):
                    if task.lease is not None:
                        self.sessions.release(task.lease)
                        task.lease = None
                    continue
            except InfinikvError as e:  # unknown session, held elsewhere too long, corrupt snapshot
                if task.lease is not None:
                    self.sessions.release(task.lease)
                    task.lease = None
                self._dequeue(task)
                task.handle.emit(Failed(e))
                continue
            self._dequeue(task)
            if self.observer is not None:
                self.observer.waited(time.monotonic() - task.arrived)
            if task.session_id is not None:
                self._busy[task.session_id] = task
            self._stateless += task.uses_slot
            task.steps = task.run(self, task)
            self._running.append(task)

    def _claim(self, task: Task) -> bool:
        """Take the lease of the task's session (if it names one); its copy here is dropped
        if the store's is newer. False while another server holds it (up to lease_wait)."""
        if task.session_id is None:
            return True
        now = time.monotonic()
        if now < task.retry_at:
            return False
        try:
            lease = self.leases.acquire(task.session_id)
        except SessionBusyError:
            if now - task.arrived >= self.lease_wait:
                raise
            task.retry_at = now + LEASE_RETRY
            return False
        task.lease, task.renew_at = lease, now + self.leases.ttl_ms / 2000
        session = self.sessions.get(task.session_id, task.owner, lease.generation)
        session.store.lease = lease
        return True

    def _reserve(self, task: Task) -> bool:
        """Take a pool slot for the task's sequence: its own, or its session's (loaded now)."""
        if not task.needs_sequence:
            return True
        if task.session_id is None:
            task.uses_slot = self._make_room()
            return task.uses_slot
        session = self.sessions.loaded[task.session_id]
        if session.seq is None:
            if not self._make_room():
                return False
            session.warm(self.generator)
        return True

    def _dequeue(self, task: Task) -> None:
        self._waiting.remove(task)
        self._queued -= 1

    def _finish(self, task: Task, outcome: object) -> None:
        if task.session_id is not None:
            if self._busy.get(task.session_id) is task:
                del self._busy[task.session_id]
            session = self.sessions.loaded.get(task.session_id)
            if session is not None and session.store.lease is task.lease:
                session.store.lease = None
        if task.lease is not None:
            self.sessions.release(task.lease)
            task.lease = None
        self._stateless -= task.uses_slot
        task.uses_slot = False
        task.handle.emit(outcome)

    def _close(self, task: Task) -> None:
        """End a task's steps early (cancelled, shutting down); its own clean-up may fail."""
        assert task.steps is not None
        try:
            task.steps.close()
        except Exception:  # noqa: BLE001 - reported in the log; the task ends either way
            log.exception("task clean-up failed")

    def _advance(self, task: Task) -> int:
        """Run the task to its next Forward or Prompt (left for the round's forwards) or tick,
        passing its events on; the rows its forwards of its own ran."""
        assert task.steps is not None
        if task.handle.cancelled:
            self._close(task)
            self._end(task, Failed(InfinikvError("cancelled")))
            return 0
        self._renew(task)
        reply, task.reply = task.reply, None
        own, t0, rows = task.own_forward, time.perf_counter(), self.generator.model.rows_run
        try:
            while True:
                item = task.steps.throw(reply) if isinstance(reply, Exception) else task.steps.send(reply)
                reply = None
                if isinstance(item, Forward | Prompt):
                    task.forward, task.own_forward = item, False
                    break
                task.handle.emit(item)
                if not isinstance(item, GenerationEvent) or item is TICK:  # a tick: its share ends
                    task.own_forward = True
                    break
        except StopIteration as done:
            self._end(task, Finished(done.value))
        except Exception as e:  # noqa: BLE001 - the error goes to its requester; others go on
            if not isinstance(e, InfinikvError):
                log.exception("task failed")
            self._end(task, Failed(e))
        finally:
            rows = self.generator.model.rows_run - rows
            if own and rows:  # a step that only asked for a share of the round ran no forward
                self._observe([task], time.perf_counter() - t0, rows)
        return rows if own else 0

    def _forward(self, tasks: list[Task], budget: int) -> None:
        """The tasks' decode tokens and prompt pieces in the round's forwards (batch.py); new
        forwards for prompt pieces alone take at most `budget` rows."""
        owner = {id(t.forward): t for t in tasks}

        def observe(parts: list[Part], seconds: float, rows: int) -> None:
            self._observe([owner[id(p.request)] for p in parts], seconds, rows)

        requests = [t.forward for t in tasks if t.forward is not None]
        model, pool = self.generator.model, self.generator.pool
        replies = run_round(model, pool, requests, self.max_batch, budget, observe)
        for task, request, reply in zip(tasks, requests, replies, strict=True):
            # None: a decode token drafts instead (a forward of its own next round), or a
            # prompt has pieces left for the next round
            task.forward, task.reply = None, reply
            task.own_forward = reply is None and isinstance(request, Forward)

    def _end(self, task: Task, outcome: object) -> None:
        self._running.remove(task)
        self._finish(task, outcome)

    def _renew(self, task: Task) -> None:
        """Renew the task's lease once half its time is gone (a lost one fails its next write)."""
        lease, now = task.lease, time.monotonic()
        if lease is None or now < task.renew_at:
            return
        try:
            self.leases.renew(lease)
            task.renew_at = now + self.leases.ttl_ms / 2000
        except InfinikvError as e:
            log.warning("lease of session %s not renewed (%s)", lease.session_id, e)

    def _observe(self, tasks: list[Task], seconds: float, rows: int) -> None:
        if self.observer is None:
            return
        retrieval = 0.0
        for task in tasks:
            state = task.seq.long_state if task.seq is not None else None
            if state is not None and state.memory is not None:
                retrieval += state.memory.search_seconds - task.search_seen
                task.search_seen = state.memory.search_seconds
        self.observer.step(seconds, retrieval, len(tasks), rows)


def _call(fn: Callable[[Engine], Any]) -> StepFn:
    def run(engine: Engine, task: Task) -> Steps[object, None, Any]:
        return fn(engine)
        yield  # a generator that finishes in its first step

    return run
