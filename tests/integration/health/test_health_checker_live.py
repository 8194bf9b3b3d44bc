"""The checker on the real clock with the real TCP prober: transitions within periodSeconds x failureThreshold + 1 s."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.helpers.net import free_port
from vm_agent.config.probe import ReadinessProbe, TcpSocketAction
from vm_agent.health import Checker, HealthEvent, HealthSettings

pytestmark = pytest.mark.integration


async def test_live_transitions_and_shutdown() -> None:
    port = free_port()
    peers: list[str] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        writer.close()

    events: list[tuple[float, HealthEvent]] = []
    changed = asyncio.Event()

    def on_event(event: HealthEvent) -> None:
        events.append((time.monotonic(), event))
        changed.set()

    async def next_event(within: float) -> HealthEvent:
        await asyncio.wait_for(changed.wait(), within)
        changed.clear()
        return events[-1][1]

    async def envoy_ready() -> str | None:
        return None

    probe = ReadinessProbe(action=TcpSocketAction(port=port), period_seconds=1, failure_threshold=1)
    checker = Checker(
        HealthSettings(probe, default_host="127.0.0.1", source_address="127.0.0.6"),
        envoy_ready=envoy_ready,
        on_event=on_event,
    )
    server = await asyncio.start_server(accepted, "127.0.0.1", port)
    task = asyncio.create_task(checker.run())
    try:
        assert await next_event(2) == HealthEvent(healthy=True)
        assert peers[0] == "127.0.0.6"

        server.close()
        await server.wait_closed()
        stopped = time.monotonic()
        event = await next_event(probe.period_seconds * probe.failure_threshold + 1)
        assert not event.healthy
        assert event.message == f"dial tcp 127.0.0.1:{port}: connect: connection refused"
        assert events[-1][0] - stopped <= 2

        server = await asyncio.start_server(accepted, "127.0.0.1", port)
        assert await next_event(2) == HealthEvent(healthy=True)
        snap = checker.snapshot()
        assert snap["transitions"] == 3
        assert snap["state"] == "healthy"

        checker.report_not_ready("vm-agent is shutting down")
        assert events[-1][1] == HealthEvent(healthy=False, message="vm-agent is shutting down")
        seen = len(peers)
        await asyncio.sleep(1.5)
        assert len(peers) == seen, "probing went on after report_not_ready"
        assert len(events) == 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        await server.wait_closed()
    assert task.cancelled()
