"""The whole agent (``vm-agent run``, real Envoy) against the built-in local mesh, on loopback.

Issue 5 and 6 acceptance: configuration through the agent in Delta and SotW mode, mTLS traffic, the
NameTable reaching the agent and never Envoy, Envoy killed repeatedly while SDS and DNS keep answering,
the mesh down for 30 s, health transitions with the right timing, replay after a mesh restart, and
not-ready reported before Envoy stops.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from dnslib import QTYPE, DNSRecord

from tests.helpers.agent import AgentProcess, sample_manifests, write_vm_files
from tests.helpers.mesh import running_mesh
from tests.helpers.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NS, GROUP = "vmns", "vmapp"
HOST = f"{GROUP}.{NS}.svc.cluster.local"


class App:
    """The VM's application: /ready (switchable) and / which echoes who called through Envoy."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.healthy = True
        self.seen_xfcc: list[str] = []
        self.seen_header_names: set[str] = set()
        self._runner: web.AppRunner | None = None

    async def _ready(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="ok" if self.healthy else "down")

    async def _root(self, request: web.Request) -> web.Response:
        self.seen_xfcc.append(request.headers.get("x-forwarded-client-cert", ""))
        self.seen_header_names.update(name.lower() for name in request.headers)
        return web.Response(text="hello from the VM app")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/", self._root)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def instance_ip() -> str:
    return f"127.0.{random.randint(10, 250)}.{random.randint(2, 250)}"


def dns_query(port: int, name: str, tcp: bool = False) -> DNSRecord:
    q = DNSRecord.question(name, "A")
    raw = q.send("127.0.0.1", port, tcp=tcp, timeout=2)
    return DNSRecord.parse(raw)


def sds_answers(path: Path) -> bool:
    """A gRPC connection to the SDS socket becomes ready (the server is accepting)."""
    channel = grpc.insecure_channel(f"unix:{path}")
    try:
        grpc.channel_ready_future(channel).result(timeout=2)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def healthy_condition(mesh: Any, name: str) -> dict[str, Any] | None:
    for entry in mesh.workload_entries():
        if entry["metadata"]["name"] == name:
            for cond in (entry.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "Healthy":
                    return dict(cond)
            return {}
    return None


def dump_has_listener(dump: dict[str, Any], port: int) -> bool:
    text = json.dumps(dump)
    return f'"port_value": {port}' in text


class Setup:
    def __init__(self, tmp: Path, mesh: Any, agent: AgentProcess, app: App, app_port: int, svc_port: int) -> None:
        self.tmp, self.mesh, self.agent, self.app = tmp, mesh, agent, app
        self.app_port, self.svc_port = app_port, svc_port
        self.entry = f"{GROUP}-{agent.instance_ip}"


def start_client(tmp_path: Path, mesh: Any, *, delta: bool = True) -> AgentProcess:
    """A second VM (WorkloadGroup "client") whose Envoy calls the service over mTLS."""
    ip = instance_ip()
    files = write_vm_files(mesh, namespace=NS, group="client", out=tmp_path / "client-files", internal_ip=ip)
    client = AgentProcess(files, instance_ip=ip, delta=delta)
    client.start()
    return client


async def start_setup(
    tmp_path: Path, mesh: Any, *, delta: bool = True, probe: str | None = None, extra: dict[str, str] | None = None
) -> Setup:
    app_port, svc_port = free_port(), free_port()
    mesh.apply_yaml(sample_manifests(app_port=app_port, service_port=svc_port, probe=probe), source="test")
    app = App(app_port)
    await app.start()
    ip = instance_ip()
    files = write_vm_files(mesh, namespace=NS, group=GROUP, out=tmp_path / "vm-files", internal_ip=ip)
    agent = AgentProcess(files, instance_ip=ip, delta=delta, extra=extra)
    agent.start()
    return Setup(tmp_path, mesh, agent, app, app_port, svc_port)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Any]:
    async with running_mesh(tmp_path, grace_period_s=30.0) as m:
        yield m


async def http_get(port: int, path: str = "/") -> tuple[int, str]:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s,
            s.get(f"http://127.0.0.1:{port}{path}") as r,
        ):
            return r.status, await r.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return 0, ""


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sotw"])
async def test_config_mtls_nametable_and_health_through_the_agent(tmp_path: Path, mesh: Any, delta: bool) -> None:
    s = await start_setup(tmp_path, mesh, delta=delta)
    client = start_client(tmp_path, mesh, delta=delta)
    try:
        await s.agent.wait(s.agent.ready, 60, "/healthz/ready 200")
        dump = s.agent.config_dump()
        text = json.dumps(dump)
        # Envoy got the mesh's listeners and clusters through the agent, in the requested xDS flavour.
        assert f"outbound|{s.svc_port}||{HOST}" in text
        assert f"{s.agent.instance_ip}_{s.app_port}" in text  # the VM's own inbound (mTLS) listener
        assert "DELTA_GRPC" in text if delta else '"api_type": "GRPC"' in text
        # The NameTable reached the agent (DNS answers it) and never Envoy.
        assert "NameTable" not in text
        assert "nds.v1" not in text
        for tcp in (False, True):
            reply = dns_query(s.agent.ports.dns, HOST, tcp=tcp)
            assert reply.header.rcode == 0
            assert any(rr.rtype == QTYPE.A for rr in reply.rr)
        # mTLS traffic: the client VM's outbound listener → the server VM's inbound listener (mTLS) → the app.
        await client.wait(client.ready, 60, "client /healthz/ready 200")
        assert dump_has_listener(client.config_dump(), s.svc_port)
        status, body = 0, ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and status != 200:
            status, body = await http_get(s.svc_port)
            await asyncio.sleep(0.3)
        assert (status, body) == (200, "hello from the VM app")
        assert any(f"spiffe://cluster.local/ns/{NS}/sa/clientsa" in x for x in s.app.seen_xfcc), s.app.seen_xfcc
        # Health reached istiod's stand-in: the auto-registered entry is Healthy.
        await s.agent.wait(lambda: (healthy_condition(mesh, s.entry) or {}).get("status") == "True", 20, "Healthy=True")
        st = s.agent.status()
        assert st["identity"]["spiffe_id"] == f"spiffe://cluster.local/ns/{NS}/sa/vmsa"
    finally:
        client.cleanup()
        s.agent.cleanup()
        await s.app.stop()


async def test_envoy_killed_ten_times_sds_and_dns_keep_answering(tmp_path: Path, mesh: Any) -> None:
    # A 4 s cap keeps the test short; the doubling from 0.5 s and the cap are what is exercised.
    s = await start_setup(tmp_path, mesh, extra={"VM_AGENT_ENVOY_RESTART_BACKOFF_MAX": "4s"})
    try:
        await s.agent.wait(s.agent.ready, 60, "/healthz/ready 200")
        import psutil

        for i in range(10):
            pid = int(s.agent.status()["envoy"]["pid"])
            psutil.Process(pid).send_signal(signal.SIGKILL)
            # While Envoy is down: SDS and DNS answer.
            assert await asyncio.to_thread(sds_answers, s.agent.sds_socket), f"SDS down after kill {i}"
            reply = await asyncio.to_thread(dns_query, s.agent.ports.dns, HOST)
            assert reply.header.rcode == 0
            # The backoff doubles from 0.5 s up to the 4 s cap: live again within the backoff plus start-up.
            await s.agent.wait(
                lambda p=pid: s.agent.envoy_live() and (s.agent.status()["envoy"].get("pid") or p) != p,
                4 + 10,
                f"Envoy live again after kill {i}",
            )
        assert int(s.agent.status()["envoy"]["restarts"]) >= 10
    finally:
        s.agent.cleanup()
        await s.app.stop()


async def test_mesh_down_30s_envoy_keeps_config_and_reconnects(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    kwargs: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "grace_period_s": 60.0,
    }
    async with running_mesh(tmp_path, **kwargs) as mesh:
        s = await start_setup(tmp_path, mesh)
        client = start_client(tmp_path, mesh)
        manifests = sample_manifests(app_port=s.app_port, service_port=s.svc_port)
        try:
            await s.agent.wait(s.agent.ready, 60, "/healthz/ready 200")
            await client.wait(client.ready, 60, "client /healthz/ready 200")
            # Traffic flows once the server's entry is Healthy and the client got its endpoint.
            await client.wait(
                lambda: asyncio.run(http_get(s.svc_port))[0] == 200, 60, "traffic from the client VM to the service"
            )
        except BaseException:
            client.cleanup()
            s.agent.cleanup()
            await s.app.stop()
            raise
    try:
        # The mesh is down for 30 s: both Envoys keep serving what they last got, traffic keeps flowing.
        await asyncio.sleep(30)
        assert dump_has_listener(client.config_dump(), s.svc_port), "Envoy lost its configuration"
        status, _ = await http_get(s.svc_port)
        assert status == 200, "traffic stopped while the mesh was down"
        assert s.agent.envoy_live()
        assert client.envoy_live()
        # Same state folder and port: the agent reconnects by itself, and a later change reaches Envoy.
        async with running_mesh(tmp_path, manifests, **kwargs) as mesh:
            new_port = free_port()
            mesh.apply_yaml(
                f"""apiVersion: v1
kind: Service
metadata: {{name: later, namespace: {NS}}}
spec:
  selector: {{app: {GROUP}}}
  ports:
  - {{name: http, port: {new_port}, targetPort: {s.app_port}}}
""",
                source="test",
            )
            await client.wait(
                lambda: f"outbound|{new_port}||later.{NS}.svc.cluster.local" in json.dumps(client.config_dump()),
                60,
                "a change made after the restart reaching Envoy",
            )
            status, _ = await http_get(new_port)
            deadline = time.monotonic() + 20
            while status != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                status, _ = await http_get(new_port)
            assert status == 200
    finally:
        client.cleanup()
        s.agent.cleanup()
        await s.app.stop()


async def test_health_timing_replay_and_not_ready_before_envoy_stops(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    kwargs: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "grace_period_s": 60.0,
    }
    period, threshold = 1, 2
    probe = None
    async with running_mesh(tmp_path, **kwargs) as mesh:
        app_port = free_port()
        probe = (
            f"    periodSeconds: {period}\n    failureThreshold: {threshold}\n"
            f"    httpGet:\n      host: 127.0.0.1\n      port: {app_port}\n      path: /ready\n"
        )
        svc_port = free_port()
        manifests = sample_manifests(app_port=app_port, service_port=svc_port, probe=probe)
        mesh.apply_yaml(manifests, source="test")
        app = App(app_port)
        await app.start()
        ip = instance_ip()
        files = write_vm_files(mesh, namespace=NS, group=GROUP, out=tmp_path / "vm-files", internal_ip=ip)
    agent = AgentProcess(files, instance_ip=ip)
    entry = f"{GROUP}-{ip}"
    try:
        async with running_mesh(tmp_path, manifests, **kwargs) as mesh:
            agent.start()
            await agent.wait(lambda: (healthy_condition(mesh, entry) or {}).get("status") == "True", 60, "Healthy")
            app.healthy = False
            t0 = time.monotonic()
            while (healthy_condition(mesh, entry) or {}).get("status") != "False" and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.02)  # the mesh runs in this loop: poll it directly, finely
            elapsed = time.monotonic() - t0
            assert elapsed <= period * threshold + 1, f"unhealthy reported after {elapsed:.1f}s"
            cond = healthy_condition(mesh, entry) or {}
            assert "503" in cond.get("message", ""), cond
            app.healthy = True
            await agent.wait(lambda: (healthy_condition(mesh, entry) or {}).get("status") == "True", 30, "True")
        # A fresh mesh (same state, empty memory) learns the condition from the agent's replay.
        async with running_mesh(tmp_path, manifests, **kwargs) as mesh:
            await agent.wait(
                lambda: (healthy_condition(mesh, entry) or {}).get("status") == "True", 60, "Healthy after replay"
            )
            agent.signal(signal.SIGTERM)
            seen_false_while_envoy_up = False
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                cond = healthy_condition(mesh, entry) or {}
                # Envoy still answers its admin API (LIVE or DRAINING) = it has not stopped yet.
                envoy_up = await asyncio.to_thread(lambda: agent.get(agent.admin_url + "/ready", 0.5)[0] != 0)
                if cond.get("status") == "False":
                    seen_false_while_envoy_up = envoy_up
                    break
                await asyncio.sleep(0.05)
            assert seen_false_while_envoy_up, (
                f"Healthy=False must reach istiod before Envoy stops: {healthy_condition(mesh, entry)}\n"
                + agent.log()[-6000:]
            )
            assert agent.proc is not None
            assert await asyncio.to_thread(agent.proc.wait, 30) == 0
    finally:
        agent.cleanup()
        await app.stop()
    with socket.socket() as probe_sock:
        assert probe_sock.connect_ex(("127.0.0.1", agent.ports.admin)) != 0, "Envoy outlived the agent"
