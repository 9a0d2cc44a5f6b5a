"""Run `infinikv serve` as a real process on a free loopback port for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from .redis_server import free_port


@contextmanager
def http_server(
    command: list[str], port: int, log_path: Path, stop_signal: int = signal.SIGTERM
) -> Iterator[str]:
    """Run `command` (a server listening on loopback `port`), logging to `log_path`; yield its
    base URL once /health answers; stop it with `stop_signal` after, killing it if it lingers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # bounded by the deadline
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(stop_signal)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def infinikv_server(log_dir: Path, *args: str, stop_signal: int = signal.SIGTERM) -> Iterator[str]:
    """Yield the server's base URL once /health answers; stop it with `stop_signal` after."""
    port = free_port()
    command = [sys.executable, "-m", "infinikv.cli", "serve", "--port", str(port), *args]
    with http_server(command, port, log_dir / f"server-{port}.log", stop_signal) as base:
        yield base
