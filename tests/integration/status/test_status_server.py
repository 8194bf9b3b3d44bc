"""The status server over real HTTP on loopback: readiness texts, control endpoints, debug JSON, metrics merge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.net import async_wait_for, free_port
from tests.integration.envoy.ads_stub import AdsStub, envoy_settings_for_test
from vm_agent.envoy import Supervisor
from vm_agent.status import StatusServer, StatusSettings, status_command

pytestmark = pytest.mark.integration


@dataclass
class Knobs:
    envoy_reason: str | None = "config not received from XDS server (is Istiod running?): cds updates: 0 ..."
    cert_reason: str | None = "no workload certificate yet"
    quits: int = 0
    drains: int = 0
    calls: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve(server: StatusServer) -> AsyncIterator[str]:
    task = asyncio.create_task(server.run())
    try:
        await asyncio.wait_for(server.ready.wait(), 10)
        yield f"http://127.0.0.1:{server.port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_server(knobs: Knobs, **kw: Any) -> StatusServer:
    async def envoy_ready() -> str | None:
        knobs.calls.append("envoy")
        return knobs.envoy_reason

    async def cert_ready() -> str | None:
        knobs.calls.append("cert")
        return knobs.cert_reason

    async def on_quit() -> None:
        knobs.quits += 1

    async def on_drain() -> None:
        knobs.drains += 1

    return StatusServer(
        StatusSettings(port=free_port(), envoy_admin_port=free_port()),
        envoy_ready=envoy_ready,
        readiness_checks=[cert_ready],
        snapshots={"envoy": lambda: {"state": "running", "pid": 42, "restarts": 2}},
        on_quit=on_quit,
        on_drain=on_drain,
        **kw,
    )


async def fetch(method: str, url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.request(method, url) as resp:
        return resp.status, await resp.text()


async def test_readiness_is_503_with_the_reason_until_every_check_passes() -> None:
    knobs = Knobs()
    async with serve(make_server(knobs)) as base:
        status, body = await fetch("GET", base + "/healthz/ready")
        assert (status, body.strip()) == (503, knobs.envoy_reason)
        assert knobs.calls == ["envoy"]  # Envoy is asked first and short-circuits
        knobs.envoy_reason = None
        status, body = await fetch("GET", base + "/healthz/ready")
        assert (status, body.strip()) == (503, "no workload certificate yet")
        knobs.cert_reason = None
        assert await fetch("GET", base + "/healthz/ready") == (200, "")
        assert (await fetch("HEAD", base + "/healthz/ready"))[0] == 200


async def test_shutting_down_turns_readiness_into_server_is_terminated() -> None:
    knobs = Knobs(envoy_reason=None, cert_reason=None)
    server = make_server(knobs)
    async with serve(server) as base:
        assert (await fetch("GET", base + "/healthz/ready"))[0] == 200
        assert server.snapshot()["shutting_down"] is False
        server.set_shutting_down()
        status, body = await fetch("GET", base + "/healthz/ready")
        assert (status, body.strip()) == (503, "server is terminated")
        snap = server.snapshot()
        assert snap["shutting_down"] is True and snap["serving"] is True
        assert snap["listening"] == f"127.0.0.1:{server.port}"
        assert snap["last_readiness_reason"] == "server is terminated"


async def test_a_raising_check_is_a_503_not_a_500() -> None:
    async def broken() -> str | None:
        raise RuntimeError("table exploded")

    async def fine() -> str | None:
        return None

    server = StatusServer(StatusSettings(port=free_port()), envoy_ready=fine, readiness_checks=[broken])
    async with serve(server) as base:
        status, body = await fetch("GET", base + "/healthz/ready")
        assert status == 503
        assert "table exploded" in body


async def test_quitquitquit_and_drain_are_post_only_from_localhost() -> None:
    knobs = Knobs()
    async with serve(make_server(knobs)) as base:
        assert (await fetch("GET", base + "/quitquitquit"))[0] == 405
        assert (await fetch("GET", base + "/drain"))[0] == 405
        assert knobs.quits == knobs.drains == 0
        assert await fetch("POST", base + "/drain") == (200, "OK")
        assert knobs.drains == 1
        assert await fetch("POST", base + "/quitquitquit") == (200, "OK")

        async def quit_ran() -> bool:
            return knobs.quits == 1

        await async_wait_for(quit_ran, timeout=5, what="on_quit")


async def test_debug_ndsz_and_status_json() -> None:
    knobs = Knobs(envoy_reason=None, cert_reason=None)
    async with serve(make_server(knobs)) as base:
        status, body = await fetch("GET", base + "/debug/ndsz")
        assert (status, json.loads(body)) == (404, {})
        status, body = await fetch("GET", base + "/debug/status")
        assert status == 200
        doc = json.loads(body)
        assert doc["envoy"] == {"state": "running", "pid": 42, "restarts": 2}
        assert doc["ready"] == {"ready": True, "reason": None}
    table = {"table": {"foo.ns.svc.cluster.local": {"ips": ["10.0.0.9"]}}}
    async with serve(make_server(Knobs(), ndsz=lambda: table)) as base:
        status, body = await fetch("GET", base + "/debug/ndsz")
        assert (status, json.loads(body)) == (200, table)


async def test_status_command_renders_a_running_server(capsys: pytest.CaptureFixture[str]) -> None:
    knobs = Knobs(envoy_reason=None, cert_reason=None)
    async with serve(make_server(knobs)) as base:
        rc = await asyncio.to_thread(status_command, base, True)
        doc = json.loads(capsys.readouterr().out)
        assert rc == 0
        assert doc["envoy"]["restarts"] == 2
        knobs.cert_reason = "no workload certificate yet"
        rc = await asyncio.to_thread(status_command, base, False)
        text = capsys.readouterr().out
        assert rc != 0
        assert "no workload certificate yet" in text
        assert "restarts" in text
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(status_command, unreachable, False) != 0
    assert unreachable in capsys.readouterr().err


async def test_metrics_merge_agent_and_real_envoy_and_readiness_follows_envoy() -> None:
    with tempfile.TemporaryDirectory(prefix="vma-status-") as d:
        tmp = Path(d)
        ads = AdsStub(tmp / "XDS")
        await ads.start()
        settings = envoy_settings_for_test(tmp)
        sup = Supervisor(settings)
        server = StatusServer(
            StatusSettings(port=settings.status_port, envoy_admin_port=settings.admin_port),
            envoy_ready=sup.admin.ready,
            snapshots={"envoy": sup.snapshot},
        )
        envoy_task = asyncio.create_task(sup.run())
        try:
            async with serve(server) as base:
                status, body = await fetch("GET", base + "/healthz/ready")
                assert status == 503 and body.strip()  # Envoy not up yet: a reason, never an empty 503

                async def ready() -> bool:
                    return (await fetch("GET", base + "/healthz/ready"))[0] == 200

                await async_wait_for(ready, timeout=20, interval=0.1, what="readiness 200")
                # Envoy's own 15021 listener routes /healthz/ready to us.
                status, _ = await fetch("GET", f"http://127.0.0.1:{settings.readiness_port}/healthz/ready")
                assert status == 200
                status, text = await fetch("GET", base + "/stats/prometheus")
                assert status == 200
                assert "\nenvoy_server_live" in text or "\nenvoy_cluster_manager_" in text
                assert "vm_agent_envoy_running 1.0" in text
                async with (
                    aiohttp.ClientSession(auto_decompress=False) as session,
                    session.get(base + "/metrics", headers={"Accept-Encoding": "gzip"}) as resp,
                ):
                    assert resp.headers.get("Content-Encoding") == "gzip"

                # Envoy crashes: the status server keeps answering, says why, and shows the restart.
                pid = sup.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)

                async def not_ready() -> bool:
                    return (await fetch("GET", base + "/healthz/ready"))[0] == 503

                await async_wait_for(not_ready, timeout=5, interval=0.02, what="readiness 503 after the crash")
                status, text = await fetch("GET", base + "/stats/prometheus")
                assert status == 200 and "vm_agent_envoy_exits_total" in text
                await async_wait_for(ready, timeout=20, interval=0.1, what="readiness 200 after the restart")
                doc = json.loads((await fetch("GET", base + "/debug/status"))[1])
                assert doc["envoy"]["restarts"] == 1
                assert "SIGKILL" in doc["envoy"]["last_exit_reason"]
                assert doc["envoy"]["pid"] not in (None, pid)
        finally:
            envoy_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await envoy_task
            await ads.stop()
