"""The engine's worker on its own (no model: task bodies are plain step functions): slots
bound the running sequences, every queued task finishes, tasks take turns one step at a time,
tasks of one session run in order, cancelled tasks stop, a full queue is refused."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from infinikv.engine.scheduler import Engine, EngineOverloadedError, Failed, Finished, TaskHandle
from infinikv.memory.store import InProcessBlockStore


def engine(slots: int = 2, max_queue: int = 64) -> Engine:
    made = Engine(SimpleNamespace(slots=slots), InProcessBlockStore(), max_queue=max_queue)  # type: ignore[arg-type]
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

    sid = e.call_blocking(lambda en: en.create_session("").id, timeout=10)
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
