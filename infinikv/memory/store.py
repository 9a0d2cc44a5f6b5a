"""The block store (tier 3): binary payloads by key, in-process by default, Redis when a URL
is given (single node, or Redis Cluster with `cluster=True`). Batched calls only: the
attention never reads it per token; it takes evicted blocks and snapshots."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from infinikv.errors import InfinikvError
from infinikv.memory.extents import Extents


class StoreUnavailableError(InfinikvError):
    """The configured block store cannot be reached."""


class BlockStore(Protocol):
    def put_many(self, items: dict[str, bytes]) -> None: ...

    def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    def get_slices(self, keys: list[str], start: int, length: int) -> list[bytes | None]:
        """Bytes [start, start + length) of each value; None for a missing key or a value too
        short for the slice."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with `prefix`; return how many."""
        ...

    def keys(self, prefix: str) -> list[str]: ...

    def compare_and_set(
        self, guard: str, expected: bytes | None, items: dict[str, bytes], deletes: list[str]
    ) -> bool:
        """Atomically: if the value at `guard` is `expected` (None: absent), write `items` and
        delete `deletes`, and return True; else change nothing and return False."""
        ...

    def time_ms(self) -> int:
        """The store's clock (milliseconds), one clock for every process that shares the store."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailableError unless the store answers."""
        ...

    def close(self) -> None: ...


class InProcessBlockStore:
    """Nothing to start, gone with the process: values in an anonymous temporary file (in
    TMPDIR; the OS deletes it when the process ends), their places in a dict behind a lock.
    The bytes live in the OS page cache, which the kernel writes out and reclaims under
    pressure, not in this process's memory: host RAM for evicted blocks stays bounded by the
    RAM tier in front of the store however much a sequence evicts."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="infinikv-store-")
        self._where: dict[str, tuple[int, int]] = {}  # key -> (offset, length) in the file
        self._space = Extents()
        self._lock = threading.Lock()

    def put_many(self, items: dict[str, bytes]) -> None:
        with self._lock, self._file_errors():
            for key, value in items.items():
                self._put(key, value)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        with self._lock, self._file_errors():
            return [self._read(*self._where[k]) if k in self._where else None for k in keys]

    def get_slices(self, keys: list[str], start: int, length: int) -> list[bytes | None]:
        with self._lock, self._file_errors():
            places = [self._where.get(k, (0, -1)) for k in keys]
            return [self._read(at + start, length) if start + length <= n else None for at, n in places]

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return [k for k in self._where if k.startswith(prefix)]

    def delete_prefix(self, prefix: str) -> int:
        with self._lock, self._file_errors():
            doomed = [k for k in self._where if k.startswith(prefix)]
            for k in doomed:
                self._free(k)
            os.ftruncate(self._file.fileno(), self._space.end)  # give the disk back
        return len(doomed)

    def compare_and_set(
        self, guard: str, expected: bytes | None, items: dict[str, bytes], deletes: list[str]
    ) -> bool:
        with self._lock, self._file_errors():
            place = self._where.get(guard)
            found = None if place is None else self._read(*place)
            if found != expected:
                return False
            for key in deletes:
                self._free(key)
            for key, value in items.items():
                self._put(key, value)
            return True

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def ping(self) -> None:
        with self._lock, self._file_errors():
            os.fstat(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _put(self, key: str, value: bytes) -> None:
        start = self._space.take(len(value))
        try:
            self._write(start, value)
        except OSError:  # the old value, if any, stays
            self._space.give(start, len(value))
            raise
        self._free(key)
        self._where[key] = (start, len(value))

    def _write(self, start: int, value: bytes) -> None:
        view = memoryview(value)
        while view:  # a regular file takes all of it unless the disk is full
            written = os.pwrite(self._file.fileno(), view, start)
            view, start = view[written:], start + written

    def _read(self, start: int, length: int) -> bytes:
        data = os.pread(self._file.fileno(), length, start)
        if len(data) != length:
            raise StoreUnavailableError(f"in-process store file {self._file.name}: short read")
        return data

    def _free(self, key: str) -> None:
        place = self._where.pop(key, None)
        if place is not None:
            self._space.give(*place)

    @contextlib.contextmanager
    def _file_errors(self) -> Iterator[None]:
        """The file's failures (disk full, closed store) as StoreUnavailableError."""
        try:
            yield
        except (OSError, ValueError) as e:
            raise StoreUnavailableError(
                f"in-process block store file in {tempfile.gettempdir()} failed: {e}"
            ) from e


# Keys per pipeline / SCAN page: large enough to amortize round trips, small enough to keep
# one reply well under Redis's default 512 MB bulk limit for KV blocks of small models.
REDIS_BATCH = 256
# KEYS[1] the guard, KEYS[2..n+1] the keys to write (ARGV[3..n+2] their values), the rest
# to delete; ARGV[1] the expected guard value, ARGV[2] "1" when the guard must be absent.
_COMPARE_AND_SET = """
local found = redis.call('GET', KEYS[1])
if ARGV[2] == '1' then
  if found then return 0 end
elseif found ~= ARGV[1] then
  return 0
end
local n = #ARGV - 2
for i = 1, n do redis.call('SET', KEYS[i + 1], ARGV[i + 2]) end
for i = n + 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
return 1
"""


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
        self._cas = self._client.register_script(_COMPARE_AND_SET)

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

    def get_slices(self, keys: list[str], start: int, length: int) -> list[bytes | None]:
        with self._reachable():
            return self._get_slices(keys, start, length)

    def keys(self, prefix: str) -> list[str]:
        with self._reachable():
            return self._keys(prefix)

    def delete_prefix(self, prefix: str) -> int:
        with self._reachable():
            return self._delete_prefix(prefix)

    def compare_and_set(
        self, guard: str, expected: bytes | None, items: dict[str, bytes], deletes: list[str]
    ) -> bool:
        keys = [guard, *items, *deletes]
        args = [expected or b"", b"1" if expected is None else b"0", *items.values()]
        with self._reachable():
            return bool(self._cas(keys=keys, args=args))

    def time_ms(self) -> int:
        with self._reachable():
            seconds, micros = self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def ping(self) -> None:
        with self._reachable():
            self._client.ping()

    def _pipelined(self, names: list[str], queue: Callable[[Any, str], object]) -> list[Any]:
        """`queue(pipeline, name)` for every name, REDIS_BATCH commands per round trip; the replies."""
        out: list[Any] = []
        for i in range(0, len(names), REDIS_BATCH):
            pipe = self._client.pipeline(transaction=False)
            for name in names[i : i + REDIS_BATCH]:
                queue(pipe, name)
            out.extend(pipe.execute())
        return out

    def _put_many(self, items: dict[str, bytes]) -> None:
        self._pipelined(list(items), lambda pipe, name: pipe.set(name, items[name]))

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        return self._pipelined(keys, lambda pipe, name: pipe.get(name))

    def _get_slices(self, keys: list[str], start: int, length: int) -> list[bytes | None]:
        end = start + length - 1  # inclusive; a missing key's reply is b""
        slices = self._pipelined(keys, lambda pipe, name: pipe.getrange(name, start, end))
        return [s if len(s) == length else None for s in slices]

    def _keys(self, prefix: str) -> list[str]:
        found = self._client.scan_iter(match=_glob_escape(prefix) + "*", count=REDIS_BATCH)
        return [k.decode() if isinstance(k, bytes) else k for k in found]

    def _delete_prefix(self, prefix: str) -> int:
        names = self._keys(prefix)
        self._pipelined(names, lambda pipe, name: pipe.unlink(name))
        return len(names)

    def close(self) -> None:
        self._client.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def open_store(url: str | None, cluster: bool = False) -> BlockStore:
    """The in-process store when url is None, else Redis at url (refused with a clear
    error naming the URL when it cannot be reached)."""
    return InProcessBlockStore() if url is None else RedisBlockStore(url, cluster)
