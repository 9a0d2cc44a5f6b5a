"""One writer per session across processes sharing a store.

A session's lease names its holder and an epoch; taking it raises the epoch, and every write
of the session's keys is a compare-and-set on that epoch, so a writer that lost the lease
(a stale replica, a paused process) is refused instead of applied. A commit writes the
session's records and its generation together; a holder whose cached copy has an older
generation than the store's drops it. Deletion leaves a tombstone that no one can lease.
The control keys share the session's `{id}` hash tag, so one Redis Cluster slot holds them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinikv.errors import LeaseLostError, SessionBusyError, SessionNotFoundError
from infinikv.memory.store import BlockStore

# Bytes of values per fenced write: each is one script call, which Redis takes whole.
FENCED_BATCH_BYTES = 64 * 2**20


def control_key(session_id: str, name: str) -> str:
    return f"ikv:lease:{{{session_id}}}:{name}"


@dataclass
class Lease:
    session_id: str
    epoch: int
    generation: int  # of the session's committed records when the lease was taken


class Leases:
    """Leases of one holder (a server process) on the sessions of one store."""

    def __init__(self, store: BlockStore, holder: str, ttl_ms: int):
        self.store, self.holder, self.ttl_ms = store, holder, ttl_ms

    def acquire(self, session_id: str) -> Lease:
        """The session's lease for this holder; SessionBusyError while another holds it,
        SessionNotFoundError once it is deleted."""
        epoch_key, lease_key = control_key(session_id, "epoch"), control_key(session_id, "lease")
        lease_raw, epoch_raw, deleted = self.store.get_many(
            [lease_key, epoch_key, control_key(session_id, "deleted")]
        )
        if deleted is not None:
            raise SessionNotFoundError(f"session {session_id!r} not found (deleted)")
        now = self.store.time_ms()
        if lease_raw is not None:
            holder, _, expires = lease_raw.decode().split(" ")
            if holder != self.holder and int(expires) > now:
                raise SessionBusyError(
                    f"session {session_id!r} is in use by another server; retry later",
                    retry_after=(int(expires) - now) / 1000,
                )
        epoch = int(epoch_raw or 0) + 1
        expires_ms = now + self.ttl_ms
        taken = {epoch_key: str(epoch).encode(), lease_key: f"{self.holder} {epoch} {expires_ms}".encode()}
        if not self.store.compare_and_set(epoch_key, epoch_raw, taken, []):
            raise SessionBusyError(f"session {session_id!r} was taken by another server", retry_after=0.1)
        # Read after taking it: no commit of an older epoch can land from here on.
        (generation,) = self.store.get_many([control_key(session_id, "generation")])
        return Lease(session_id, epoch, int(generation or 0))

    def renew(self, lease: Lease) -> None:
        expires_ms = self.store.time_ms() + self.ttl_ms
        value = f"{self.holder} {lease.epoch} {expires_ms}".encode()
        self.write(lease, {control_key(lease.session_id, "lease"): value})

    def release(self, lease: Lease) -> None:
        """Give the lease up (a no-op once another holder took it)."""
        self.store.compare_and_set(
            control_key(lease.session_id, "epoch"),
            str(lease.epoch).encode(),
            {},
            [control_key(lease.session_id, "lease")],
        )

    def write(self, lease: Lease, items: dict[str, bytes], deletes: list[str] | None = None) -> None:
        """Write and delete the session's keys under the lease, or raise LeaseLostError."""
        if not self.store.compare_and_set(
            control_key(lease.session_id, "epoch"), str(lease.epoch).encode(), items, deletes or []
        ):
            raise LeaseLostError(
                f"session {lease.session_id!r} was taken over by another server; this write was refused"
            )

    def commit(self, lease: Lease, records: dict[str, bytes], generation: int) -> None:
        """The session's records and its new generation, in one fenced write."""
        self.write(lease, {**records, control_key(lease.session_id, "generation"): str(generation).encode()})

    def generation(self, session_id: str) -> int | None:
        """The committed generation; None for a deleted session."""
        generation, deleted = self.store.get_many(
            [control_key(session_id, "generation"), control_key(session_id, "deleted")]
        )
        return None if deleted is not None else int(generation or 0)

    def tombstone(self, lease: Lease) -> None:
        """Mark the session deleted: no holder can lease it again, no older epoch can write."""
        sid = lease.session_id
        self.write(
            lease,
            {
                control_key(sid, "epoch"): str(lease.epoch + 1).encode(),
                control_key(sid, "deleted"): str(self.store.time_ms()).encode(),
            },
            [control_key(sid, "lease"), control_key(sid, "generation")],
        )


class FencedStore:
    """A session's view of the block store: reads pass through, writes and deletes go under
    its current lease (set by whoever takes it) and raise LeaseLostError once it is lost."""

    def __init__(self, leases: Leases, lease: Lease | None = None):
        self.leases, self.lease = leases, lease
        self.store = leases.store

    def _held(self) -> Lease:
        if self.lease is None:
            raise LeaseLostError("this session's lease is not held; its write was refused")
        return self.lease

    def put_many(self, items: dict[str, bytes]) -> None:
        lease = self._held()
        batch: dict[str, bytes] = {}
        size = 0
        for key, value in items.items():
            if batch and size + len(value) > FENCED_BATCH_BYTES:
                self.leases.write(lease, batch)
                batch, size = {}, 0
            batch[key] = value
            size += len(value)
        if batch:
            self.leases.write(lease, batch)

    def commit(self, records: dict[str, bytes], generation: int) -> None:
        self.leases.commit(self._held(), records, generation)

    def delete(self, keys: list[str]) -> None:
        lease = self._held()
        for i in range(0, len(keys), 1024):
            self.leases.write(lease, {}, keys[i : i + 1024])

    def delete_prefix(self, prefix: str) -> int:
        doomed = self.store.keys(prefix)
        self.delete(doomed)
        return len(doomed)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self.store.get_many(keys)

    def get_slices(self, keys: list[str], start: int, length: int) -> list[bytes | None]:
        return self.store.get_slices(keys, start, length)

    def keys(self, prefix: str) -> list[str]:
        return self.store.keys(prefix)

    def compare_and_set(
        self, guard: str, expected: bytes | None, items: dict[str, bytes], deletes: list[str]
    ) -> bool:
        return self.store.compare_and_set(guard, expected, items, deletes)

    def time_ms(self) -> int:
        return self.store.time_ms()

    def ping(self) -> None:
        self.store.ping()

    def close(self) -> None:
        """The shared store stays open: its owner closes it."""
