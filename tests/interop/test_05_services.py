"""Steps 3-6 through vm-agent's real services (xds.Proxy, dns.DnsServer, health.Checker, CA client) wired the
way docs/architecture.md describes, against real istiod; only Envoy is replaced by an ADS client on the XDS
socket, so this runs even before the composition root does.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.helpers.net import free_tcp_udp_port
from tests.interop.conftest import App, VmGroup
from tests.interop.lab import GRACE_PERIOD_S, WLE, ControlPlane, async_wait_until, healthy_condition, short_tmp
from tests.interop.vmclient import ADS_METHOD, CDS, LDS, issue_svid, load_config, node_of, upstream
from vm_agent.config import Config
from vm_agent.dns import DnsServer, DnsSettings
from vm_agent.health.checker import Checker, HealthSettings
from vm_agent.xds import Proxy, XdsSettings

pytestmark = [pytest.mark.interop]


def dig(port: int, name: str) -> list[str]:
    res = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=2", "+tries=1", name, "A"],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    return res.stdout.split()


async def envoy_stand_in(socket_path: Path, cfg: Config, seen: dict[str, int]) -> None:
    """Asks for CDS and LDS over the agent's XDS socket like Envoy, ACKing everything it gets."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        out: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await out.get()

        call = channel.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )(requests())
        out.put_nowait(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node_of(cfg)))
        out.put_nowait(discovery_pb2.DiscoveryRequest(type_url=LDS))
        async for resp in call:
            seen[resp.type_url] = seen.get(resp.type_url, 0) + len(resp.resources)
            out.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce
                )
            )


@contextlib.asynccontextmanager
async def vm_services(cfg: Config, pair: tuple[bytes, bytes], dns_port: int) -> AsyncIterator[dict[str, Any]]:
    work = short_tmp("vmxs-")
    dns = DnsServer(
        DnsSettings(
            listen=(("127.0.0.1", dns_port),),
            upstreams=(),
            search_domains=cfg.dns.search_domains,
            pod_namespace=cfg.node.namespace,
            proxy_domain=cfg.dns.proxy_domain,
        )
    )
    proxy = Proxy(
        XdsSettings(socket_path=work / "XDS", upstream=upstream(cfg, for_ca=False), dns_enabled=True),
        client_cert=lambda: pair,
        on_name_table=dns.update,
    )
    assert cfg.proxy.readiness_probe is not None, "istioctl copied the group's probe into mesh.yaml"

    async def envoy_ready() -> str | None:
        return None

    checker = Checker(
        HealthSettings(probe=cfg.proxy.readiness_probe, default_host=cfg.node.instance_ips[0]),
        envoy_ready=envoy_ready,
        on_event=proxy.report_health,
    )
    seen: dict[str, int] = {}
    tasks: list[asyncio.Task[None]] = []
    try:
        tasks += [asyncio.create_task(dns.run()), asyncio.create_task(proxy.run())]
        await asyncio.wait_for(proxy.ready.wait(), 10)
        tasks += [
            asyncio.create_task(envoy_stand_in(work / "XDS", cfg, seen)),
            asyncio.create_task(checker.run()),
        ]
        yield {"proxy": proxy, "dns": dns, "seen": seen, "tasks": tasks}
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        shutil.rmtree(work, ignore_errors=True)


async def test_proxy_dns_and_health_against_istiod(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, app: App, tmp_path: Path
) -> None:
    cp = control_plane
    ns = group.namespace
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    cfg = load_config(vm_files, tmp_path / "state", resolv, {})
    key, chain = await issue_svid(cfg)
    pair = (key, "".join(chain).encode())
    dns_port = free_tcp_udp_port()
    name = f"{group.name}-127.0.0.2"
    svc_host = f"{group.name}.{ns}.svc.cluster.local"
    svc = cp.get("service", ns, group.name)
    assert svc is not None
    cluster_ip = svc["spec"]["clusterIP"]

    def se_address() -> str | None:
        se = cp.get("serviceentries.networking.istio.io", ns, "ext-api")
        addrs = (se or {}).get("status", {}).get("addresses") or []
        return str(addrs[0]["value"]) if addrs else None

    def entry() -> dict[str, Any] | None:
        return cp.get(WLE, ns, name)

    def condition(status: str) -> Any:
        return lambda: (c := healthy_condition(entry())) is not None and c["status"] == status and c

    se_ip = await async_wait_until(se_address, 30, "auto-allocated ServiceEntry address")
    assert se_ip.startswith("240.240."), se_ip

    async with vm_services(cfg, pair, dns_port) as svcs:
        # (3) istiod's config flows through the proxy to "Envoy"; its NameTable reaches the DNS server.
        await async_wait_until(lambda: svcs["seen"].get(CDS, 0) > 0 and svcs["seen"].get(LDS, 0) > 0, 30, "CDS+LDS")
        await async_wait_until(lambda: dig(dns_port, svc_host) == [cluster_ip], 30, f"{svc_host} -> {cluster_ip}")
        await async_wait_until(lambda: dig(dns_port, group.external_host) == [se_ip], 30, group.external_host)
        snap = svcs["proxy"].snapshot()
        assert snap, "proxy snapshot is JSON-able state"

        # (4) + (5): the registration and the real prober's verdicts on the app.
        await async_wait_until(entry, 30, f"WorkloadEntry {ns}/{name}")
        await async_wait_until(condition("True"), 30, "Healthy=True (app up)")
        app.healthy = False
        down = await async_wait_until(condition("False"), 30, "Healthy=False (app down)")
        assert "503" in down.get("message", ""), down
        app.healthy = True
        await async_wait_until(condition("True"), 30, "Healthy=True (app up again)")

    # (6) the proxy's upstream stream ended with the services: istiod marks, then deletes the entry.
    await async_wait_until(
        lambda: (e := entry()) is None or "istio.io/disconnectedAt" in e["metadata"]["annotations"],
        30,
        "disconnectedAt",
    )
    await async_wait_until(lambda: entry() is None, GRACE_PERIOD_S * 4, "entry deleted after the grace period")
