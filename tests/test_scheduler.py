"""The engine's worker on its own (no model: task bodies are plain step functions): slots
bound the running sequences, every queued task finishes, tasks take turns one step at a time,
tasks of one session run in order, cancelled tasks stop, a full queue is refused."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from infinikv.engine.scheduler import Engine
from infinikv.engine.tasks import EngineOverloadedError, Failed, Finished, TaskHandle
from infinikv.errors import SessionBusyError
from infinikv.memory.store import InProcessBlockStore


def fake_generator(slots: int) -> SimpleNamespace:
    """What the worker reads of a generator when its tasks run no model."""
    return SimpleNamespace(slots=slots, model=SimpleNamespace(invariant_rows=1, rows_run=0))


def engine(slots: int = 2, max_queue: int = 64) -> Engine:
    made = Engine(fake_generator(slots), InProcessBlockStore(), max_queue=max_queue)  # type: ignore[arg-type]
    made.start()
    return made


def result(handle: TaskHandle) -> object:
    while True:  # bounded by the timeout of each read
        item = handle.next_blocking(timeout=10)
        if isinstance(item, Finished | Failed):
            return item


def test_slots_bound_running_sequences_and_every_task_finishes() -> None:
    e = engine(slots=2)
    log: list[tuple[str, int]] = []
    running: set[str] = set()
    peak = [0]
    lock = threading.Lock()

    def body(name: str):
        def run(_engine, _task):
            with lock:
                running.add(name)
                peak[0] = max(peak[0], len(running))
            for i in range(3):
                log.append((name, i))
                yield i
            running.discard(name)
            return name

        return run

    handles = [e.submit(body(f"t{i}"), TaskHandle(), needs_sequence=True) for i in range(6)]
    assert [result(h) for h in handles] == [Finished(f"t{i}") for i in range(6)]
    assert peak[0] == 2
    assert log[:4] == [("t0", 0), ("t1", 0), ("t0", 1), ("t1", 1)]  # one step each, in turn
    e.stop()


def test_tasks_of_one_session_run_in_order_and_cancelled_tasks_stop() -> None:
    e = engine(slots=4)
    order: list[str] = []
    gate = threading.Event()

    def body(name: str, steps: int):
        def run(_engine, _task):
            for _ in range(steps):
                order.append(name)
                gate.wait(5)
                yield None
            return name

        return run

    sid = e.call_blocking(lambda en: en.sessions.create("").id, timeout=10)
    first = e.submit(body("a", 3), TaskHandle(), session_id=sid)
    second = e.submit(body("b", 2), TaskHandle(), session_id=sid)
    doomed = e.submit(body("c", 1000), TaskHandle())
    doomed.cancel()
    gate.set()
    assert result(first) == Finished("a") and result(second) == Finished("b")
    assert order.index("b") > len(order) - 3 and order.count("a") == 3  # b only after a
    assert isinstance(result(doomed), Failed) and order.count("c") <= 1
    e.stop()


def test_a_full_queue_is_refused_and_errors_reach_their_requester() -> None:
    e = engine(slots=1, max_queue=1)
    gate = threading.Event()

    def slow(_engine, _task):
        gate.wait(5)
        yield None

    def broken(_engine, _task):
        raise ValueError("bad input")
        yield None

    first = e.submit(slow, TaskHandle(), needs_sequence=True)
    for _ in range(1000):  # bounded wait until the worker admitted it (and blocks in its step)
        if e.queued == 0:
            break
        time.sleep(0.005)
    second = e.submit(broken, TaskHandle(), needs_sequence=True)  # queued behind the slot
    with pytest.raises(EngineOverloadedError, match="too many queued requests"):
        e.submit(slow, TaskHandle())
    gate.set()
    assert isinstance(result(first), Finished)
    err = result(second)
    assert isinstance(err, Failed) and str(err.error) == "bad input"
    e.stop()


def test_interactive_steps_come_before_a_background_tasks() -> None:
    """An ingestion (background) steps between interactive tasks' steps only once a
    BACKGROUND_EVERY since its last step: a chat beside it waits for one step at most."""
    e = engine(slots=4)
    order: list[str] = []
    started = threading.Event()

    def body(name: str, steps: int):
        def run(_engine, _task):
            for _ in range(steps):
                order.append(name)
                started.set()
                time.sleep(0.01)
                yield None
            return name

        return run

    ingestion = e.submit(body("doc", 40), TaskHandle(), background=True)
    assert started.wait(10)
    chat = e.submit(body("chat", 20), TaskHandle())
    assert result(chat) == Finished("chat")
    chat_steps = [i for i, name in enumerate(order) if name == "chat"]
    between = order[chat_steps[0] : chat_steps[-1]]
    assert between.count("doc") == 0  # 20 steps of 10 ms fit in one BACKGROUND_EVERY
    assert result(ingestion) == Finished("doc")
    e.stop()


def test_a_session_another_engine_holds_waits_for_it_or_is_refused_as_busy() -> None:
    """Two engines (two servers) on one store: a task on a session the other one is running
    waits for its lease, up to lease_wait, then fails with SessionBusyError."""
    store = InProcessBlockStore()
    a = Engine(fake_generator(2), store, lease_wait=30)  # type: ignore[arg-type]
    b = Engine(fake_generator(2), store, lease_wait=0.2)  # type: ignore[arg-type]
    for made in (a, b):
        made.start()
    sid = a.call_blocking(lambda en: en.sessions.create("").id, timeout=10)
    gate, holding = threading.Event(), threading.Event()

    def hold(_engine, _task):
        holding.set()
        gate.wait(10)
        yield None
        return "a"

    def quick(_engine, _task):
        return "next"
        yield None

    first = a.submit(hold, TaskHandle(), session_id=sid)
    assert holding.wait(10)
    refused = result(b.submit(quick, TaskHandle(), session_id=sid))
    assert isinstance(refused, Failed) and isinstance(refused.error, SessionBusyError)
    b.lease_wait = 30
    waiting = b.submit(quick, TaskHandle(), session_id=sid)
    time.sleep(0.3)  # it tries, and waits
    gate.set()
    assert result(first) == Finished("a")
    assert result(waiting) == Finished("next")
    for made in (a, b):
        made.stop()
