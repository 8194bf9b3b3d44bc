"""TCP and exec readiness probes against real sockets and real processes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.helpers.net import free_port
from vm_agent.config.probe import ExecAction, TcpSocketAction
from vm_agent.health import probe_once

pytestmark = pytest.mark.integration


class Listener:
    """A TCP server that records the peer address of every connection."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.peers: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername")[0])
            writer.close()

        self.server = await asyncio.start_server(accepted, self.host, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    server = Listener()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def wait_peers(server: Listener, n: int) -> None:
    for _ in range(200):
        if len(server.peers) >= n:
            return
        await asyncio.sleep(0.01)


async def tcp(
    port: int, host: str = "", default_host: str = "127.0.0.1", source: str | None = None
) -> tuple[bool, str]:
    return await probe_once(
        TcpSocketAction(port=port, host=host), default_host=default_host, timeout=1, source_address=source
    )


async def test_tcp_listening_is_healthy(listener: Listener) -> None:
    assert await tcp(listener.port) == (True, "")
    await wait_peers(listener, 1)
    assert listener.peers == ["127.0.0.1"]


async def test_tcp_closed_then_listening_later() -> None:
    later = Listener()
    assert await tcp(later.port) == (
        False,
        f"dial tcp 127.0.0.1:{later.port}: connect: connection refused",
    )
    await later.start()
    try:
        assert await tcp(later.port) == (True, "")
    finally:
        await later.stop()
    ok, _ = await tcp(later.port)
    assert not ok


async def test_tcp_probe_leaves_from_source_address(listener: Listener) -> None:
    assert await tcp(listener.port, source="127.0.0.6") == (True, "")
    await wait_peers(listener, 1)
    assert listener.peers == ["127.0.0.6"]


async def test_tcp_source_address_not_bound_for_other_family() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = Listener("::1")
    try:
        await server.start()
    except OSError:
        pytest.skip("::1 not configured")
    try:
        # Binding 127.0.0.6 for an IPv6 target cannot work; the probe still reaches the app.
        assert await tcp(server.port, default_host="::1", source="127.0.0.6") == (True, "")
        await wait_peers(server, 1)
        assert server.peers == ["::1"]
    finally:
        await server.stop()


async def test_tcp_host_field_overrides_default(listener: Listener) -> None:
    assert await tcp(listener.port, host="127.0.0.1", default_host="127.0.0.9") == (True, "")


async def run_exec(*command: str, timeout: float = 2.0) -> tuple[bool, str]:
    return await probe_once(ExecAction(command=command), default_host="127.0.0.1", timeout=timeout, source_address=None)


async def test_exec_true_false_and_exit_codes() -> None:
    assert await run_exec("true") == (True, "")
    assert await run_exec("false") == (False, "exit status 1")
    assert await run_exec("sh", "-c", "exit 3") == (False, "exit status 3")
    assert await run_exec("sh", "-c", "kill -TERM $$") == (False, "signal: terminated")


async def test_exec_runs_without_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    # Were this run through a shell, ';' would start a second command that creates the marker.
    assert await run_exec("echo", "x;", "touch", str(marker)) == (True, "")
    assert not marker.exists()


async def test_exec_missing_binary() -> None:
    assert await run_exec("vm-agent-no-such-probe") == (
        False,
        'exec: "vm-agent-no-such-probe": executable file not found in $PATH',
    )
    assert await run_exec("/nonexistent/probe") == (False, "fork/exec /nonexistent/probe: no such file or directory")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def read_pids(path: Path) -> list[int]:
    for _ in range(300):
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= 2:
            return [int(x) for x in text.split()]
        await asyncio.sleep(0.01)
    raise AssertionError(f"the probe command never wrote its pids to {path}")


async def test_exec_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; echo $$ >> {pids}; wait"
    started = time.monotonic()
    result = await run_exec("sh", "-c", script, timeout=0.7)
    assert time.monotonic() - started < 5
    assert result == (False, "command timeout exceeded: signal: killed")
    child, shell = await read_pids(pids)
    for _ in range(100):
        if gone(child) and gone(shell):
            break
        await asyncio.sleep(0.02)
    assert gone(shell), "the probe command survived its timeout"
    assert gone(child), "a process the probe command started survived the timeout"


async def test_exec_cancelled_probe_kills_its_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; echo $$ >> {pids}; wait"
    task = asyncio.create_task(run_exec("sh", "-c", script, timeout=30))
    child, shell = await read_pids(pids)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for _ in range(100):
        if gone(child) and gone(shell):
            break
        await asyncio.sleep(0.02)
    assert gone(shell)
    assert gone(child)


async def test_unconfigured_ipv6_source_is_not_bound(listener: Listener) -> None:
    # ::6 is only present where capture set-up added it; without it the probe must still work.
    assert await tcp(listener.port, source="::6") == (True, "")
    await wait_peers(listener, 1)
    assert listener.peers == ["127.0.0.1"]
