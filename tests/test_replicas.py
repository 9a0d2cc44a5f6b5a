"""Sessions across server processes on one Redis (append-only, fsync always), as an operator
runs them behind a load balancer, with faults injected: real `infinikv serve` processes, a
real redis-server (and a 3-node Redis Cluster), loopback only, every loop bounded.

Two replicas take turns on one session, in turn and at the same time: every turn is stored
exactly once or refused with 409 and Retry-After, and the answers equal a single writer's. A
deletion holds on every replica; a stopping replica with an old copy writes nothing over
newer turns. kill -9 or SIGTERM mid-ingestion, or Redis going away mid-session, leave the
session exactly as before, the job `failed: interrupted`, and no store key unreferenced."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import pytest
import redis
import requests

from infinikv.engine.sequence import Sequence
from infinikv.engine.session import record_key, session_prefix
from infinikv.evaluation.haystack import HaystackMissing, haystack_text

from .redis_server import free_port, redis_cluster, redis_server
from .server_process import infinikv_server

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# A small resident window (documents go through the memory), short answers, short leases.
ARGS = [
    "--resident",
    "256",
    "--window",
    "128",
    "--max-tokens-limit",
    "16",
    "--lease-seconds",
    "3",
    "--lease-wait",
    "60",
]
DURABLE = ["--appendonly", "yes", "--appendfsync", "always"]
QUESTIONS = [
    "My name is Ada and I keep bees.",
    "What do I keep?",
    "And what is my name?",
    "Thank you, that is all.",
]


@pytest.fixture(scope="module")
def text() -> str:
    try:
        return haystack_text("bible")
    except HaystackMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis"), DURABLE) as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, redis_url):
    logs = tmp_path_factory.mktemp("replicas")
    with (
        infinikv_server(logs, *ARGS, "--redis-url", redis_url) as a,
        infinikv_server(logs, *ARGS, "--redis-url", redis_url, "--lease-wait", "0") as b,
    ):
        # b refuses at once a session that a holds (409), a waits for one that b holds.
        yield a, b


def new_session(base: str) -> str:
    r = requests.post(f"{base}/v1/sessions", timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def chat(base: str, session: str, content: str) -> requests.Response:
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        "session_id": session,
    }
    return requests.post(f"{base}/v1/chat/completions", json=body, timeout=300)


def reply(r: requests.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def stats(base: str, session: str) -> dict:
    r = requests.get(f"{base}/v1/sessions/{session}", timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def stored_messages(url: str, session: str) -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return list(json.loads(client.get(record_key(session)))["messages"])
    finally:
        client.close()


def orphans(url: str, session: str) -> set[str]:
    """The session's keys in Redis that no committed record names."""
    client = redis.Redis.from_url(url)
    prefix = session_prefix(session)
    try:
        names = [f"{prefix}sequence", f"{prefix}meta"]
        referenced = Sequence.referenced_keys(prefix, dict(zip(names, client.mget(names), strict=True)))
        found = {k.decode() for k in client.scan_iter(match=prefix.replace("{", "\\{") + "*")}
    finally:
        client.close()
    return found - referenced - {record_key(session)}


def ingest_until(base: str, session: str, text: str, share: float) -> str:
    """Start an ingestion and return its job id once `share` of it is done."""
    r = requests.post(f"{base}/v1/sessions/{session}/documents", json={"text": text}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    for _ in range(1200):  # bounded: 4 minutes
        state = requests.get(f"{base}/v1/jobs/{job}", timeout=30).json()
        if state["total_tokens"] and state["done_tokens"] >= share * state["total_tokens"]:
            assert state["status"] == "running", state
            return str(job)
        time.sleep(0.2)
    raise AssertionError(f"ingestion did not reach {share:.0%}: {state}")


def test_alternating_turns_on_two_replicas_equal_a_single_writer(replicas) -> None:
    a, b = replicas
    shared, single = new_session(a), new_session(a)
    for base, question in zip([a, b, a, b], QUESTIONS, strict=True):
        assert reply(chat(base, shared, question)) == reply(chat(a, single, question))
    on_a, on_b, alone = stats(a, shared), stats(b, shared), stats(a, single)
    assert on_a["turns"] == on_b["turns"] == alone["turns"] == 4
    assert on_a["tokens"] == on_b["tokens"] == alone["tokens"]


def test_concurrent_turns_are_each_stored_once_or_refused_with_retry_after(replicas, redis_url) -> None:
    a, b = replicas
    shared = new_session(a)
    asks = [(a if i % 2 else b, f"Turn {i}: say the number {i}.") for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda ask: chat(ask[0], shared, ask[1]), asks))
    assert {r.status_code for r in answers} <= {200, 409}, [r.text for r in answers]
    assert all("retry-after" in r.headers for r in answers if r.status_code == 409)
    done = [content for (_, content), r in zip(asks, answers, strict=True) if r.status_code == 200]
    stored = [m["content"] for m in stored_messages(redis_url, shared) if m["role"] == "user"]
    assert sorted(stored) == sorted(done) and len(done) >= 3  # a's three waited their turn
    assert stats(a, shared)["turns"] == stats(b, shared)["turns"] == len(done)


def test_a_session_busy_on_another_replica_is_a_409_with_retry_after(replicas, text) -> None:
    a, b = replicas
    session = new_session(a)
    job = ingest_until(a, session, text[:12_000], 0.1)  # a holds the lease for seconds
    busy = chat(b, session, QUESTIONS[0])
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
    assert 1 <= int(busy.headers["retry-after"]) <= 3
    for _ in range(1200):  # bounded: 4 minutes
        if requests.get(f"{a}/v1/jobs/{job}", timeout=30).json()["status"] != "running":
            break
        time.sleep(0.2)
    reply(chat(b, session, QUESTIONS[0]))
    assert stats(a, session)["turns"] == 1 and len(stats(b, session)["documents"]) == 1


def test_a_session_deleted_on_one_replica_is_gone_on_the_other(replicas, redis_url) -> None:
    a, b = replicas
    session = new_session(a)
    reply(chat(b, session, QUESTIONS[0]))  # b has a copy in its pages now
    assert requests.delete(f"{a}/v1/sessions/{session}", timeout=60).status_code == 200
    assert chat(b, session, QUESTIONS[1]).status_code == 404
    assert requests.get(f"{b}/v1/sessions/{session}", timeout=30).status_code == 404
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.keys(session_prefix(session).replace("{", "\\{") + "*") == []
    finally:
        client.close()


def test_a_stopping_replica_writes_nothing_over_newer_turns(tmp_path, replicas, redis_url) -> None:
    a, _ = replicas
    with infinikv_server(tmp_path, *ARGS, "--redis-url", redis_url) as old:
        session = new_session(old)
        reply(chat(old, session, QUESTIONS[0]))  # `old` keeps the session loaded
        reply(chat(a, session, QUESTIONS[1]))
        newer = stats(a, session)
    # SIGTERM: `old` commits its loaded sessions on the way out, unless a newer one is stored.
    assert stats(a, session) == newer and newer["turns"] == 2


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_replica_stopped_mid_ingestion_leaves_the_session_as_before(
    tmp_path, redis_url, text, stop
) -> None:
    with infinikv_server(tmp_path, *ARGS, "--redis-url", redis_url, stop_signal=stop) as base:
        session = new_session(base)
        reply(chat(base, session, QUESTIONS[0]))
        before = stats(base, session)
        job = ingest_until(base, session, text[:24_000], 0.4)
    with infinikv_server(tmp_path, *ARGS, "--redis-url", redis_url) as base:
        for _ in range(100):  # bounded: the dead server's heartbeat ages out (3 s leases)
            state = requests.get(f"{base}/v1/jobs/{job}", timeout=30).json()
            if state["status"] != "running":
                break
            time.sleep(0.1)
        assert state["status"] == "failed" and "interrupted" in state["error"], state
        assert same_history(stats(base, session), before)
        reply(chat(base, session, QUESTIONS[1]))  # loads it: the interrupted job's keys go
        assert orphans(redis_url, session) == set()
        assert stats(base, session)["turns"] == 2


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_replica_stopped_mid_turn_keeps_the_turn_only_if_it_answered(
    tmp_path, redis_url, text, stop
) -> None:
    """A long prompt (seconds of prefill) stopped part way: the session holds the turn
    exactly when the client got its answer (SIGTERM lets in-flight requests finish)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with infinikv_server(tmp_path, *ARGS, "--redis-url", redis_url, stop_signal=stop) as base:
            session = new_session(base)
            reply(chat(base, session, QUESTIONS[0]))
            before = stats(base, session)
            pending = pool.submit(chat, base, session, text[:12_000])
            time.sleep(2)  # leaving the block stops the server while the turn is in its prefill
        try:
            answered = pending.result().status_code == 200
        except requests.RequestException:
            answered = False
    finally:
        pool.shutdown()
    with infinikv_server(tmp_path, *ARGS, "--redis-url", redis_url) as base:
        after = stats(base, session)
        assert after["turns"] == before["turns"] + answered
        if not answered:
            assert same_history(after, before)
        reply(chat(base, session, QUESTIONS[1]))
        assert orphans(redis_url, session) == set()


def test_a_cancelled_ingestion_leaves_the_session_as_before(replicas, redis_url, text) -> None:
    a, _ = replicas
    session = new_session(a)
    reply(chat(a, session, QUESTIONS[0]))
    before = stats(a, session)
    job = ingest_until(a, session, text[:12_000], 0.2)
    cancelled = requests.delete(f"{a}/v1/jobs/{job}", timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    for _ in range(300):  # bounded: 60 s
        state = requests.get(f"{a}/v1/jobs/{job}", timeout=30).json()
        if state["status"] != "running":
            break
        time.sleep(0.2)
    assert state["status"] == "cancelled"
    assert requests.delete(f"{a}/v1/jobs/{job}", timeout=30).status_code == 409
    assert same_history(stats(a, session), before) and orphans(redis_url, session) == set()


def same_history(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("tokens", "turns", "documents"))


def test_a_redis_outage_refuses_session_requests_and_loses_nothing(tmp_path, text) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    first = redis_server(tmp_path / "redis", DURABLE, port)
    first.__enter__()
    try:
        with infinikv_server(tmp_path, *ARGS, "--redis-url", url) as base:
            session = new_session(base)
            reply(chat(base, session, QUESTIONS[0]))
            before = stats(base, session)
            first.__exit__(None, None, None)  # Redis goes away
            health = requests.get(f"{base}/health", timeout=60).json()
            assert health["status"] == "degraded" and "unreachable" in health["store"]
            assert "infinikv_store_up 0.0" in requests.get(f"{base}/metrics", timeout=60).text
            refused = [
                chat(base, session, QUESTIONS[1]),
                requests.post(
                    f"{base}/v1/sessions/{session}/documents", json={"text": text[:2000]}, timeout=60
                ),
                requests.post(f"{base}/v1/sessions", timeout=60),
            ]
            assert [r.status_code for r in refused] == [503, 503, 503], [r.text for r in refused]
            assert chat_stateless(base).status_code == 200  # what needs no store still works
            second = redis_server(tmp_path / "redis", DURABLE, port)  # back, from its append-only file
            second.__enter__()
            try:
                assert requests.get(f"{base}/health", timeout=60).json()["status"] == "ok"
                assert same_history(stats(base, session), before)
                reply(chat(base, session, QUESTIONS[1]))
                assert stats(base, session)["turns"] == 2
                assert orphans(url, session) == set()
                before = stats(base, session)
                job = ingest_until(base, session, text[:12_000], 0.3)
            finally:
                second.__exit__(None, None, None)  # gone again, mid-ingestion
            for _ in range(600):  # bounded: 2 minutes
                state = requests.get(f"{base}/v1/jobs/{job}", timeout=60).json()
                if state["status"] != "running":
                    break
                time.sleep(0.2)
            assert state["status"] == "failed" and "Redis" in state["error"], state
            with redis_server(tmp_path / "redis", DURABLE, port):
                assert same_history(stats(base, session), before)
                reply(chat(base, session, QUESTIONS[2]))
                assert orphans(url, session) == set()
    finally:
        first.__exit__(None, None, None)


def chat_stateless(base: str) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def test_two_replicas_on_a_redis_cluster_take_turns_on_one_session(tmp_path) -> None:
    with redis_cluster(tmp_path / "cluster") as ports:
        args = [*ARGS, "--redis-url", f"redis://127.0.0.1:{ports[0]}", "--redis-cluster"]
        with infinikv_server(tmp_path, *args) as a, infinikv_server(tmp_path, *args) as b:
            shared, single = new_session(a), new_session(b)
            for base, question in zip([a, b, a], QUESTIONS[:3], strict=True):
                assert reply(chat(base, shared, question)) == reply(chat(b, single, question))
            assert stats(b, shared)["turns"] == stats(a, shared)["turns"] == 3
            asks = [(a if i % 2 else b, f"Turn {i}: say the number {i}.") for i in range(4)]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda ask: chat(ask[0], shared, ask[1]), asks))
            assert [r.status_code for r in answers] == [200] * 4  # each waited for the lease
            assert stats(a, shared)["turns"] == stats(b, shared)["turns"] == 7
