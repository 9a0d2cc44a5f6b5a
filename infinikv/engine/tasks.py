"""A task on the engine's worker and its requester's end: a step function (every `next()`
at most one forward), its handle (what the worker emits, ending with Finished or Failed),
and the errors of submitting one."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Callable
from collections.abc import Generator as Steps
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from infinikv.engine.batch import Reply, Request
from infinikv.engine.leases import Lease
from infinikv.engine.sequence import Sequence
from infinikv.errors import InfinikvError

if TYPE_CHECKING:
    from infinikv.engine.scheduler import Engine


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
    def step(self, seconds: float, retrieval_seconds: float, sequences: int, tokens: int) -> None:
        """Forwards of `sequences` sequences (one: a prefill chunk or a speculative step) that
        ran `tokens` rows."""

    def waited(self, seconds: float) -> None:
        """A task waited this long in the queue before it started."""


# A task body: every next() is one step; the return value is the result.
StepFn = Callable[["Engine", "Task"], Steps[object, Any, Any]]


@dataclass(eq=False)
class Task:
    run: StepFn
    handle: TaskHandle
    session_id: str | None = None  # tasks naming a session run one at a time, in order
    owner: str = ""  # who asks (the session must be theirs)
    needs_sequence: bool = False  # it runs a sequence: a slot in the pool (its session's, loaded)
    background: bool = False  # steps only between interactive ones (scheduler.BACKGROUND_EVERY)
    seq: Sequence | None = None  # set by the step function; read for retrieval metrics
    steps: Steps[object, None, Any] | None = None
    search_seen: float = 0.0
    forward: Request | None = None  # its decode token or prompt, waiting for the round's forwards
    reply: Reply = None  # what its step function is sent next (logits, an error, or None)
    own_forward: bool = True  # its next step runs a forward of its own (a chunk, a verification)
    uses_slot: bool = field(default=False, init=False)  # a stateless sequence of its own
    lease: Lease | None = field(default=None, init=False)  # its session's, while it runs
    arrived: float = field(default_factory=time.monotonic, init=False)
    retry_at: float = field(default=0.0, init=False)  # next try of a lease held elsewhere
    renew_at: float = field(default=0.0, init=False)  # when its lease is half gone
