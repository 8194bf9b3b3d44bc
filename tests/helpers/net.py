"""Loopback-only networking helpers for tests."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable

# Ports handed to tests come from below the kernel's ephemeral range (32768-60999 by default), one slice per
# pytest-xdist worker, in turn. A port from bind(0) is an ephemeral one: until the test's server binds it, any
# outgoing connection on the machine or another worker's bind(0) can take it, and a static listener of Envoy's
# bootstrap that cannot bind ends Envoy with status 1. Below the range only these helpers hand out ports, and
# the two workers never share a slice.
_RANGE_START, _RANGE_END = 20000, 32000
_SLICES = 4


def _slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (_RANGE_END - _RANGE_START) // _SLICES
    start = _RANGE_START + (index % _SLICES) * size
    return range(start, start + size)


_next = itertools.count(random.randrange(1_000_000))


def _bindable(host: str, port: int, kinds: tuple[int, ...]) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in kinds:
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _take(host: str, kinds: tuple[int, ...]) -> int:
    ports = _slice()
    for _ in range(len(ports)):
        port = ports[next(_next) % len(ports)]
        if _bindable(host, port, kinds):
            return port
    raise RuntimeError(f"no free port on {host} in {ports.start}-{ports.stop - 1}")


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free on ``host`` for ``kind`` that no other test in this run has been handed recently."""
    return _take(host, (kind,))


def free_tcp_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host``."""
    return _take(host, (socket.SOCK_STREAM, socket.SOCK_DGRAM))


def wait_for(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def async_wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
