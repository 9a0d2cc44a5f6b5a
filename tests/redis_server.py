"""Start and stop real redis-server processes on free loopback ports for tests."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port p <= 55535 whose cluster bus port p + 10000 is free too (Redis's rule)."""
    rng = random.Random()
    for _ in range(200):  # bounded search
        port = rng.randint(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a redis cluster node")


def _wait_ready(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start")


@contextmanager
def redis_server(workdir: Path, extra: list[str] | None = None, port: int | None = None) -> Iterator[int]:
    """A redis-server on 127.0.0.1 with no persistence; yields its port, kills it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *(extra or []),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def redis_cluster(workdir: Path, nodes: int = 3) -> Iterator[list[int]]:
    """`nodes` cluster-mode redis-servers with all hash slots assigned; yields their ports."""
    cli = shutil.which("redis-cli")
    if cli is None or shutil.which("redis-server") is None:
        pytest.skip("redis-server / redis-cli are not installed (.ci/run installs them)")
    ports = [free_cluster_port() for _ in range(nodes)]
    with contextlib.ExitStack() as stack:
        for port in ports:
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            stack.enter_context(redis_server(workdir / str(port), extra, port))
        addrs = [f"127.0.0.1:{p}" for p in ports]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        # Every node must see the whole cluster: a node whose gossip has not converged yet
        # answers "The cluster is down" (seen when only the first node was checked).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            infos = [
                subprocess.run([cli, "-p", str(p), "cluster", "info"], capture_output=True, text=True)
                for p in ports
            ]
            if all("cluster_state:ok" in info.stdout for info in infos):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("redis cluster did not reach cluster_state:ok")
        yield ports
