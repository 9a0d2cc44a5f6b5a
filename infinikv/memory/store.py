"""The block store (tier 3): binary payloads by key, in-process by default, Redis when a URL
is given (single node, or Redis Cluster with `cluster=True`). Batched calls only: the
attention never reads it per token; it takes evicted blocks and snapshots."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

from infinikv.errors import InfinikvError


class StoreUnavailableError(InfinikvError):
    """The configured block store cannot be reached."""


class BlockStore(Protocol):
    def put_many(self, items: dict[str, bytes]) -> None: ...

    def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with `prefix`; return how many."""
        ...

    def keys(self, prefix: str) -> list[str]: ...

    def close(self) -> None: ...


class InProcessBlockStore:
    """A dict behind a lock: nothing to start, gone with the process."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put_many(self, items: dict[str, bytes]) -> None:
        with self._lock:
            self._data.update(items)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        with self._lock:
            return [self._data.get(k) for k in keys]

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return [k for k in self._data if k.startswith(prefix)]

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for k in doomed:
                del self._data[k]
        return len(doomed)

    def close(self) -> None:
        pass


# Keys per pipeline / SCAN page: large enough to amortize round trips, small enough to keep
# one reply well under Redis's default 512 MB bulk limit for KV blocks of small models.
REDIS_BATCH = 256


class RedisBlockStore:
    """redis-py with one connection pool, retries configured (not hand-written), binary values."""

    def __init__(self, url: str, cluster: bool = False):
        import redis
        import redis.cluster
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        # Three retries with exponential backoff ride out a failover or a dropped connection.
        retry = Retry(ExponentialBackoff(), 3)
        self.url = url
        self._client: redis.Redis | redis.cluster.RedisCluster
        try:
            if cluster:
                from redis.cluster import RedisCluster

                self._client = RedisCluster.from_url(url, retry=retry)
            else:
                self._client = redis.Redis.from_url(url, retry=retry, socket_connect_timeout=5)
            self._client.ping()
        except (redis.RedisError, OSError, ValueError) as e:
            raise StoreUnavailableError(f"cannot reach Redis at {url}: {e}") from e
        self._cluster = cluster

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Redis failures (after the retries) as StoreUnavailableError naming the URL."""
        import redis

        try:
            yield
        except (redis.RedisError, OSError) as e:
            raise StoreUnavailableError(f"Redis at {self.url} failed: {e}") from e

    def put_many(self, items: dict[str, bytes]) -> None:
        with self._reachable():
            self._put_many(items)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        with self._reachable():
            return self._get_many(keys)

    def keys(self, prefix: str) -> list[str]:
        with self._reachable():
            return self._keys(prefix)

    def delete_prefix(self, prefix: str) -> int:
        with self._reachable():
            return self._delete_prefix(prefix)

    def _put_many(self, items: dict[str, bytes]) -> None:
        names = list(items)
        for i in range(0, len(names), REDIS_BATCH):
            pipe = self._client.pipeline(transaction=False)
            for name in names[i : i + REDIS_BATCH]:
                pipe.set(name, items[name])
            pipe.execute()

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i in range(0, len(keys), REDIS_BATCH):
            pipe = self._client.pipeline(transaction=False)
            for name in keys[i : i + REDIS_BATCH]:
                pipe.get(name)
            out.extend(pipe.execute())
        return out

    def _keys(self, prefix: str) -> list[str]:
        found = self._client.scan_iter(match=_glob_escape(prefix) + "*", count=REDIS_BATCH)
        return [k.decode() if isinstance(k, bytes) else k for k in found]

    def _delete_prefix(self, prefix: str) -> int:
        names = self._keys(prefix)
        for i in range(0, len(names), REDIS_BATCH):
            pipe = self._client.pipeline(transaction=False)
            for name in names[i : i + REDIS_BATCH]:
                pipe.unlink(name)
            pipe.execute()
        return len(names)

    def close(self) -> None:
        self._client.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def open_store(url: str | None, cluster: bool = False) -> BlockStore:
    """The in-process store when url is None, else Redis at url (refused with a clear
    error naming the URL when it cannot be reached)."""
    return InProcessBlockStore() if url is None else RedisBlockStore(url, cluster)
