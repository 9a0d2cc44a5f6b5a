"""Session leases on the in-process store and a real redis-server (single node and a 3-node
Cluster): one holder at a time, a stale holder's writes refused and never applied, expiry,
tombstones, and the store's compare-and-set underneath."""

from __future__ import annotations

import time

import pytest

from infinikv.engine.leases import FencedStore, Leases, control_key
from infinikv.engine.session import session_prefix
from infinikv.errors import LeaseLostError, SessionBusyError, SessionNotFoundError
from infinikv.memory.store import RedisBlockStore

from .redis_server import redis_cluster


def test_compare_and_set_writes_and_deletes_only_when_the_guard_matches(store) -> None:
    assert store.compare_and_set("g", None, {"g": b"1", "a": b"x", "b": b"y"}, [])
    assert not store.compare_and_set("g", None, {"a": b"lost"}, [])  # the guard is set now
    assert not store.compare_and_set("g", b"2", {"a": b"lost"}, ["b"])
    assert store.get_many(["a", "b"]) == [b"x", b"y"]
    assert store.compare_and_set("g", b"1", {"a": b"z"}, ["b"])
    assert store.get_many(["a", "b"]) == [b"z", None]


def test_one_holder_at_a_time_and_a_stale_holders_writes_are_refused(store) -> None:
    a, b = Leases(store, "A", 60_000), Leases(store, "B", 60_000)
    lease_a = a.acquire("s1")
    with pytest.raises(SessionBusyError) as busy:
        b.acquire("s1")
    assert 0 < busy.value.retry_after <= 60
    key = f"{session_prefix('s1')}block:0"
    FencedStore(a, lease_a).put_many({key: b"from A"})
    a.release(lease_a)
    lease_b = b.acquire("s1")
    assert lease_b.epoch == lease_a.epoch + 1
    with pytest.raises(LeaseLostError):  # A still thinks it may write: refused
        FencedStore(a, lease_a).put_many({key: b"stale A"})
    with pytest.raises(LeaseLostError):
        a.commit(lease_a, {f"{session_prefix('s1')}session": b"stale"}, 9)
    assert store.get_many([key, control_key("s1", "generation")]) == [b"from A", None]
    b.commit(lease_b, {f"{session_prefix('s1')}session": b"B's"}, 1)
    assert a.generation("s1") == 1


def test_an_expired_lease_can_be_taken_and_its_holder_is_fenced_off(store) -> None:
    a, b = Leases(store, "A", 200), Leases(store, "B", 200)
    lease_a = a.acquire("s2")
    a.renew(lease_a)
    time.sleep(0.3)  # A paused past its lease (a long step, a stopped process)
    lease_b = b.acquire("s2")
    with pytest.raises(LeaseLostError):
        a.renew(lease_a)
    with pytest.raises(LeaseLostError):
        FencedStore(a, lease_a).delete([control_key("s2", "lease")])
    b.release(lease_b)
    assert a.acquire("s2").epoch == lease_b.epoch + 1


def test_a_deleted_session_cannot_be_leased_or_written_again(store) -> None:
    a, b = Leases(store, "A", 60_000), Leases(store, "B", 60_000)
    lease_a = a.acquire("s3")
    a.commit(lease_a, {f"{session_prefix('s3')}session": b"{}"}, 1)
    a.tombstone(lease_a)
    for leases in (a, b):
        with pytest.raises(SessionNotFoundError, match="deleted"):
            leases.acquire("s3")
    with pytest.raises(LeaseLostError):
        a.commit(lease_a, {f"{session_prefix('s3')}session": b"resurrected"}, 2)
    assert a.generation("s3") is None


def test_a_sessions_keys_share_one_cluster_slot_so_fenced_writes_work_on_a_cluster(tmp_path) -> None:
    with redis_cluster(tmp_path) as ports:
        store = RedisBlockStore(f"redis://127.0.0.1:{ports[0]}", cluster=True)
        leases = Leases(store, "A", 60_000)
        lease = leases.acquire("sess_c")
        blocks = {f"{session_prefix('sess_c')}block:{i}": bytes([i]) * 100 for i in range(50)}
        FencedStore(leases, lease).put_many(blocks)
        leases.commit(lease, {f"{session_prefix('sess_c')}session": b"{}"}, 1)
        assert store.get_many(list(blocks)) == list(blocks.values())
        assert Leases(store, "B", 60_000).generation("sess_c") == 1
        store.close()
