"""Fixtures: a loopback test resolver as the only upstream, and DnsServers started on free ports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.helpers.net import free_tcp_udp_port
from tests.integration.dns.resolver import TestResolver
from vm_agent.dns import DnsServer, DnsSettings
from vm_agent.proto import nds_pb2

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")

ServerFactory = Callable[..., Awaitable[DnsServer]]
ResolverFactory = Callable[..., Awaitable[TestResolver]]


@pytest.fixture
async def make_resolver() -> AsyncIterator[ResolverFactory]:
    started: list[TestResolver] = []

    async def make(host: str = "127.0.0.3", cls: type[TestResolver] = TestResolver, **kw: Any) -> TestResolver:
        r = cls(host, free_tcp_udp_port(host), **kw)
        await r.start()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.stop()


@pytest.fixture
async def upstream(make_resolver: ResolverFactory) -> TestResolver:
    return await make_resolver()


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    running: list[tuple[DnsServer, asyncio.Task[None]]] = []

    async def make(
        upstreams: tuple[tuple[str, int], ...],
        table: nds_pb2.NameTable | None = None,
        listen_host: str = "127.0.0.1",
        **kw: Any,
    ) -> DnsServer:
        settings = DnsSettings(
            listen=((listen_host, free_tcp_udp_port(listen_host)),),
            upstreams=upstreams,
            search_domains=kw.pop("search_domains", SEARCH),
            pod_namespace=kw.pop("pod_namespace", "ns1"),
            proxy_domain=kw.pop("proxy_domain", "svc.cluster.local"),
            **kw,
        )
        server = DnsServer(settings)
        task = asyncio.create_task(server.run())
        running.append((server, task))
        async with asyncio.timeout(10):
            await server.ready.wait()
        if table is not None:
            await server.update(table)
        return server

    yield make
    for _, task in running:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def entry(
    table: nds_pb2.NameTable,
    host: str,
    ips: list[str],
    registry: str = "External",
    shortname: str = "",
    namespace: str = "",
    alt_hosts: tuple[str, ...] = (),
) -> None:
    e = table.table[host]
    e.ips.extend(ips)
    e.registry = registry
    e.shortname = shortname
    e.namespace = namespace
    e.alt_hosts.extend(alt_hosts)
