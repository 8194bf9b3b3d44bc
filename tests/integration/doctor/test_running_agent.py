"""The agent line: a real ``vm-agent run`` (real Envoy, certificate from the local mesh's CA), a real status
server that is not ready, and a status port owned by something that is not vm-agent."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from tests.helpers.agent import AgentProcess
from tests.helpers.net import free_port
from tests.integration.doctor.conftest import SPIFFE, Vm, baseline, explain, statuses
from vm_agent.config import Options, load
from vm_agent.doctor import DoctorOptions, run_checks
from vm_agent.status import StatusServer, StatusSettings

pytestmark = [pytest.mark.integration]


@pytest.mark.slow
async def test_running_agent_is_ok_and_its_certificate_is_checked(vm: Vm) -> None:
    ip = f"127.0.{random.randint(10, 250)}.{random.randint(2, 250)}"
    agent = AgentProcess(vm.files, instance_ip=ip)
    agent.start()
    try:
        await agent.wait(agent.ready, 60, "agent ready")
        config = load(
            Options(
                config_dir=vm.files,
                state_dir=agent.state_dir,
                resolv_conf=agent.resolv_conf,
                environ={},
                extra_env=agent.settings,
            )
        )
        results = {r.id: r for r in await run_checks(config, DoctorOptions())}
        want = baseline(vm) | {"agent": "ok", "instance-ips": "warn"}  # the test agent advertises a loopback IP
        assert statuses(results) == want, explain(results)
        assert results["agent"].summary.startswith(f"running and ready at {agent.status_url}: {SPIFFE} until")
        assert "Envoy running, istiod connected" in results["agent"].summary
        # The certificate the agent got from the CA and persisted, verified against root-cert.pem.
        assert results["certificate"].details["spiffe_id"] == SPIFFE
        assert results["certificate"].details["root_checked"] is True
    finally:
        agent.cleanup()


@asynccontextmanager
async def serving(server: StatusServer) -> AsyncIterator[None]:
    task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.ready.wait(), 10)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_agent_running_but_not_ready(vm: Vm) -> None:
    port = free_port()
    vm.settings["PROXY_CONFIG"] = f"interceptionMode: NONE\nstatusPort: {port}\n"

    async def envoy_not_live() -> str | None:
        return "Envoy proxy is NOT ready: state: PRE_INITIALIZING"

    def identity() -> dict[str, Any]:
        return {"spiffe_id": None}

    server = StatusServer(
        StatusSettings(port=port), envoy_ready=envoy_not_live, snapshots={"identity": identity, "envoy": dict}
    )
    async with serving(server):
        results = await vm.doctor()
    assert statuses(results) == baseline(vm) | {"agent": "fail"}, explain(results)
    agent = results["agent"]
    assert agent.summary.startswith("running but not ready: Envoy proxy is NOT ready: state: PRE_INITIALIZING")
    assert agent.hint and "vm-agent status" in agent.hint
    assert agent.details["running"] is True and agent.details["ready"] is False


async def test_status_port_owned_by_something_else(vm: Vm) -> None:
    port = free_port()
    vm.settings["PROXY_CONFIG"] = f"interceptionMode: NONE\nstatusPort: {port}\n"

    async def ready(_: web.Request) -> web.Response:
        return web.Response(text="")  # pilot-agent answers /healthz/ready too, but has no /debug/status

    app = web.Application()
    app.router.add_get("/healthz/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        results = await vm.doctor()
    finally:
        await runner.cleanup()
    assert statuses(results) == baseline(vm) | {"agent": "fail"}, explain(results)
    assert "but it is not vm-agent" in results["agent"].summary
    assert results["agent"].hint and "pilot-agent" in results["agent"].hint
