"""The DNS proxy over real UDP and TCP sockets on loopback, forwarding only to test resolvers."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import time

import dnslib
import pytest

from tests.helpers.net import free_tcp_udp_port
from tests.integration.dns.conftest import ResolverFactory, ServerFactory, entry
from tests.integration.dns.resolver import TestResolver, exchange, question, tcp_exchange, udp_exchange
from vm_agent.dns import DnsServer, DnsSettings
from vm_agent.dns.udp import UdpEngine
from vm_agent.metrics import REGISTRY
from vm_agent.proto import nds_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TRANSPORTS = ["udp", "tcp"]


def mesh_table() -> nds_pb2.NameTable:
    t = nds_pb2.NameTable()
    entry(t, "details.ns1.svc.cluster.local", ["10.0.0.1"], "Kubernetes", "details", "ns1", ("details.alias.io",))
    entry(t, "ratings.ns2.svc.cluster.local", ["10.0.0.2", "fd00::2"], "Kubernetes", "ratings", "ns2")
    entry(t, "remote.ns1.svc.cluster.remote", ["10.0.0.3"], "Kubernetes", "remote", "ns1")
    entry(t, "www.example.com", ["10.1.0.1"])
    entry(t, "v6only.example.com", ["fd00::9"])
    entry(t, "*.example.org", ["10.2.0.1"])
    entry(t, "*.b.example.org", ["10.2.0.2"])
    entry(t, "many.example.com", [f"10.3.0.{i}" for i in range(1, 5)])
    entry(t, "huge.example.com", [f"10.4.0.{i}" for i in range(1, 61)])
    return t


def addr(server: DnsServer) -> tuple[str, int]:
    return server.bound[0]


async def ask(transport: str, server: DnsServer, name: str, qtype: str = "A", **kw: int) -> dnslib.DNSRecord:
    raw = await exchange(transport, addr(server), question(name, qtype, **kw))
    return dnslib.DNSRecord.parse(raw)


def ips(reply: dnslib.DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA)]


@pytest.fixture
async def server(make_server: ServerFactory, upstream: TestResolver) -> DnsServer:
    return await make_server(((upstream.host, upstream.port),), mesh_table())


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_mesh_names_answered_from_the_table(transport: str, server: DnsServer, upstream: TestResolver) -> None:
    # The names a client's resolver produces from the search list all hit the table.
    for name in (
        "details.ns1.svc.cluster.local",
        "details.ns1.svc",
        "details.ns1",
        "details",
        "details.alias.io",
        "ratings.ns2",
        "ratings.ns2.svc",
        "www.example.com",
    ):
        reply = await ask(transport, server, name)
        assert reply.header.rcode == dnslib.RCODE.NOERROR, name
        assert reply.header.aa == 1, name
        assert reply.header.qr == 1
        assert [rr.ttl for rr in reply.rr] == [30] * len(reply.rr), name
        assert ips(reply) and ips(reply)[0].startswith("10."), name
        assert str(reply.rr[0].rname) == name + "."
    assert upstream.queries == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_short_names_only_for_own_namespace_and_domain(
    transport: str, server: DnsServer, upstream: TestResolver
) -> None:
    # "ratings" lives in ns2, "remote" in another cluster domain: neither gets a short form.
    for name in ("ratings", "remote.ns1", "remote"):
        reply = await ask(transport, server, name)
        assert ips(reply) == ["192.0.2.1"], name
        assert reply.header.aa == 0
    assert [q[1] for q in upstream.queries] == ["ratings.", "remote.ns1.", "remote."]
    assert {q[0] for q in upstream.queries} == {transport}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_case_insensitive_question_echoed(transport: str, server: DnsServer) -> None:
    raw = await exchange(transport, addr(server), question("DeTaiLs.NS1.Svc.Cluster.LOCAL", qid=4242))
    reply = dnslib.DNSRecord.parse(raw)
    assert reply.header.id == 4242
    assert str(reply.q.qname) == "DeTaiLs.NS1.Svc.Cluster.LOCAL."
    assert b"\x07DeTaiLs\x03NS1" in raw
    assert ips(reply) == ["10.0.0.1"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_known_name_other_family_is_nodata_never_nxdomain(transport: str, server: DnsServer) -> None:
    for name, qtype in (("details.ns1", "AAAA"), ("v6only.example.com", "A")):
        reply = await ask(transport, server, name, qtype)
        assert reply.header.rcode == dnslib.RCODE.NOERROR
        assert reply.header.aa == 1
        assert reply.rr == []
    reply = await ask(transport, server, "ratings.ns2", "AAAA")
    assert ips(reply) == ["fd00::2"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_other_qtypes_of_known_names_go_upstream(
    transport: str, server: DnsServer, upstream: TestResolver
) -> None:
    reply = await ask(transport, server, "details.ns1", "MX")
    assert reply.header.aa == 0
    assert upstream.queries == [(transport, "details.ns1.", dnslib.QTYPE.MX)]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_search_domain_cname_shortcut(transport: str, server: DnsServer, upstream: TestResolver) -> None:
    # The first search domain appended to a mesh name: one CNAME to the real name, plus its records.
    reply = await ask(transport, server, "www.example.com.ns1.svc.cluster.local")
    assert reply.header.aa == 1
    assert [(dnslib.QTYPE[rr.rtype], str(rr.rname)) for rr in reply.rr] == [
        ("CNAME", "www.example.com.ns1.svc.cluster.local."),
        ("A", "www.example.com."),
    ]
    assert str(reply.rr[0].rdata) == "www.example.com."
    # Only the first search domain gets the shortcut.
    reply = await ask(transport, server, "www.example.com.svc.cluster.local")
    assert ips(reply) == ["192.0.2.1"]
    assert len(upstream.queries) == 1
    # A CNAME to a name without records of the asked family is NODATA, CNAME dropped.
    reply = await ask(transport, server, "www.example.com.ns1.svc.cluster.local", "AAAA")
    assert (reply.header.rcode, reply.rr) == (dnslib.RCODE.NOERROR, [])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wildcards_most_specific_wins(transport: str, server: DnsServer, upstream: TestResolver) -> None:
    reply = await ask(transport, server, "x.b.example.org")
    assert ips(reply) == ["10.2.0.2"]
    assert str(reply.rr[0].rname) == "x.b.example.org."
    reply = await ask(transport, server, "deep.x.c.example.org")
    assert ips(reply) == ["10.2.0.1"]
    assert str(reply.rr[0].rname) == "deep.x.c.example.org."
    assert (await ask(transport, server, "example.org")).header.aa == 0
    assert [q[1] for q in upstream.queries] == ["example.org."]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_multi_address_answers_are_shuffled(transport: str, server: DnsServer) -> None:
    orders = set()
    for _ in range(25):
        reply = await ask(transport, server, "many.example.com")
        got = ips(reply)
        assert sorted(got) == [f"10.3.0.{i}" for i in range(1, 5)]
        orders.add(tuple(got))
    assert len(orders) > 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unknown_names_forwarded_verbatim_rcode_kept(
    transport: str, server: DnsServer, upstream: TestResolver
) -> None:
    reply = await ask(transport, server, "nx.example.net")
    assert reply.header.rcode == dnslib.RCODE.NXDOMAIN
    reply = await ask(transport, server, "host.example.net", qid=777)
    assert (reply.header.id, ips(reply)) == (777, ["192.0.2.1"])
    assert [q[:2] for q in upstream.queries] == [(transport, "nx.example.net."), (transport, "host.example.net.")]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_forwards_before_first_name_table(
    transport: str, make_server: ServerFactory, upstream: TestResolver
) -> None:
    server = await make_server(((upstream.host, upstream.port),))
    assert not server.table_loaded()
    assert await server.readiness() == "DNS proxy has not received a NameTable yet"
    reply = await ask(transport, server, "details.ns1.svc.cluster.local")
    assert ips(reply) == ["192.0.2.1"]
    await server.update(mesh_table())
    assert server.table_loaded() and await server.readiness() is None
    assert ips(await ask(transport, server, "details.ns1.svc.cluster.local")) == ["10.0.0.1"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_failover_across_all_resolvers(
    transport: str, make_server: ServerFactory, make_resolver: ResolverFactory
) -> None:
    dead = ("127.0.0.4", free_tcp_udp_port("127.0.0.4"))  # nothing listens: refused
    silent = await make_resolver("127.0.0.5", mode="silent")
    good = await make_resolver("127.0.0.6", address="192.0.2.66")
    server = await make_server((dead, (silent.host, silent.port), (good.host, good.port)), forward_timeout=0.5)
    for _ in range(4):
        reply = await ask(transport, server, "host.example.net")
        assert ips(reply) == ["192.0.2.66"]
    assert len(good.queries) == 4
    assert server.snapshot()["forwarded"]["ok"] == 4
    # The shuffled order put the dead server first some of the time; its failures are counted.
    failures = {u["address"]: u["failures"] for u in server.snapshot()["upstreams"]}
    assert failures[f"{good.host}:{good.port}"] == 0
    dead_failures = REGISTRY.get_sample_value(
        "vm_agent_dns_upstream_failures_total", {"upstream": f"{dead[0]}:{dead[1]}"}
    )
    assert dead_failures == failures[f"{dead[0]}:{dead[1]}"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_servfail_within_timeout_when_every_upstream_fails(
    transport: str, make_server: ServerFactory, make_resolver: ResolverFactory
) -> None:
    silent = await make_resolver("127.0.0.5", mode="silent")
    dead = ("127.0.0.4", free_tcp_udp_port("127.0.0.4"))
    server = await make_server(((silent.host, silent.port), dead), forward_timeout=0.4)
    start = time.monotonic()
    reply = await ask(transport, server, "host.example.net")
    elapsed = time.monotonic() - start
    assert reply.header.rcode == dnslib.RCODE.SERVFAIL
    assert str(reply.q.qname) == "host.example.net."
    assert elapsed < 0.4 * 2 + 0.5
    assert server.snapshot()["forwarded"]["failed"] == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_parallel_forwarding_takes_first_answer(
    transport: str, make_server: ServerFactory, make_resolver: ResolverFactory
) -> None:
    silent = await make_resolver("127.0.0.5", mode="silent")
    good = await make_resolver("127.0.0.6", address="192.0.2.77")
    server = await make_server(
        ((silent.host, silent.port), (good.host, good.port)), forward_timeout=5.0, forward_parallel=True
    )
    start = time.monotonic()
    for _ in range(3):
        assert ips(await ask(transport, server, "host.example.net")) == ["192.0.2.77"]
    assert time.monotonic() - start < 3.0
    assert len(silent.queries) == 3


async def test_udp_truncation_follows_edns_size(server: DnsServer) -> None:
    everything = sorted(f"10.4.0.{i}" for i in range(1, 61))
    # No EDNS: 512 bytes at most, compressed, whole records only, TC set.
    raw = await udp_exchange(addr(server), question("huge.example.com"))
    reply = dnslib.DNSRecord.parse(raw)
    assert len(raw) <= 512
    assert reply.header.tc == 1
    assert 20 < len(reply.rr) < 60
    # EDNS 4096: everything fits; known-name answers carry no OPT record.
    raw = await udp_exchange(addr(server), question("huge.example.com", edns=4096))
    reply = dnslib.DNSRecord.parse(raw)
    assert (reply.header.tc, sorted(ips(reply))) == (0, everything)
    assert reply.ar == []
    # TCP: no truncation.
    reply = dnslib.DNSRecord.parse(await tcp_exchange(addr(server), question("huge.example.com")))
    assert (reply.header.tc, sorted(ips(reply))) == (0, everything)


async def test_oversized_upstream_udp_reply_fails_that_server(
    make_server: ServerFactory, make_resolver: ResolverFactory
) -> None:
    big = await make_resolver("127.0.0.7", mode="big")
    server = await make_server(((big.host, big.port),), forward_timeout=1.0)
    reply = dnslib.DNSRecord.parse(await udp_exchange(addr(server), question("t.example.net", "TXT")))
    assert reply.header.rcode == dnslib.RCODE.SERVFAIL
    reply = dnslib.DNSRecord.parse(await udp_exchange(addr(server), question("t.example.net", "TXT", edns=8192)))
    assert (reply.header.rcode, len(reply.rr)) == (dnslib.RCODE.NOERROR, 60)
    reply = dnslib.DNSRecord.parse(await tcp_exchange(addr(server), question("t.example.net", "TXT")))
    assert len(reply.rr) == 60


async def test_updates_are_atomic_under_load(make_server: ServerFactory, upstream: TestResolver) -> None:
    def table(version: int) -> nds_pb2.NameTable:
        t = nds_pb2.NameTable()
        for i in range(300):
            entry(t, f"svc{i}.example.com", [f"10.{version}.{i // 250}.{i % 250}"])
        return t

    server = await make_server(((upstream.host, upstream.port),), table(1))
    target = addr(server)
    stop = False
    seen: set[int] = set()

    async def hammer() -> None:
        i = 0
        while not stop:
            name = f"svc{i % 300}.example.com"
            reply = dnslib.DNSRecord.parse(await udp_exchange(target, question(name)))
            got = ips(reply)
            assert reply.header.rcode == 0 and len(got) == 1, (name, reply)
            version = int(got[0].split(".")[1])
            assert got[0] == f"10.{version}.{(i % 300) // 250}.{(i % 300) % 250}"
            seen.add(version)
            i += 1

    workers = [asyncio.create_task(hammer()) for _ in range(4)]
    for v in (2, 3, 4, 5, 6):
        await server.update(table(v))
        await asyncio.sleep(0.05)
    stop = True
    await asyncio.gather(*workers)
    assert len(seen) >= 3
    assert upstream.queries == []


async def test_malformed_table_rejected_last_good_kept(server: DnsServer) -> None:
    bad = nds_pb2.NameTable()
    entry(bad, "ok.example.com", ["10.9.9.9"])
    entry(bad, "bad..example.com", ["10.9.9.8"])
    with pytest.raises(ValueError, match=r"bad\.\.example\.com"):
        await server.update(bad)
    assert ips(await ask("udp", server, "www.example.com")) == ["10.1.0.1"]
    assert server.snapshot()["table_rejected"] == 1
    assert "bad..example.com" in server.snapshot()["last_error"]


async def test_bad_udp_packets_formerr_or_dropped(server: DnsServer) -> None:
    target = addr(server)
    good = question("details.ns1", qid=0x1234)
    # qdcount 2 → FORMERR (header only, ID kept)
    two = good[:4] + b"\x00\x02" + good[6:] + good[12:]
    raw = await udp_exchange(target, two)
    assert raw[:2] == b"\x12\x34" and raw[3] & 0xF == 1
    # compression loop in the question → FORMERR
    loop_pkt = good[:12] + b"\xc0\x0c\x00\x01\x00\x01"
    raw = await udp_exchange(target, loop_pkt)
    assert raw[3] & 0xF == 1
    # label running past the end → FORMERR
    raw = await udp_exchange(target, good[:12] + b"\x3f" + b"a" * 10)
    assert raw[3] & 0xF == 1
    # short header and responses → silence, server keeps serving
    for junk in (b"\x01", b"\x12\x34\x81\x80" + good[4:]):
        with pytest.raises(TimeoutError):
            await udp_exchange(target, junk, timeout=0.3)
    assert ips(await ask("udp", server, "details.ns1")) == ["10.0.0.1"]


async def test_bad_tcp_clients_cut_off(server: DnsServer) -> None:
    server.tcp_idle_timeout = 0.5
    host, port = addr(server)
    # Oversized length prefix with too few bytes behind it: closed after the idle timeout.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\xff\xff" + b"\x00" * 20)
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    # A client that sends nothing is cut too.
    reader, writer = await asyncio.open_connection(host, port)
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    # Pipelined queries on one connection are all answered; a FORMERR does not end the connection.
    reader, writer = await asyncio.open_connection(host, port)
    bad = question("details.ns1", qid=9)[:4] + b"\x00\x00" + b"\x00" * 6
    for pkt in (question("details.ns1", qid=1), bad, question("www.example.com", qid=2)):
        writer.write(struct.pack(">H", len(pkt)) + pkt)
    await writer.drain()
    got = []
    for _ in range(3):
        (n,) = struct.unpack(">H", await reader.readexactly(2))
        got.append(await reader.readexactly(n))
    writer.close()
    assert [g[:2] for g in got] == [b"\x00\x01", b"\x00\x09", b"\x00\x02"]
    assert got[1][3] & 0xF == 1
    assert ips(await ask("tcp", server, "details.ns1")) == ["10.0.0.1"]


async def test_metrics_count_results_and_rcodes(server: DnsServer) -> None:
    def sample(name: str, labels: dict[str, str]) -> float:
        # The collector sums every live server's counts: servers of earlier tests must not vanish in between.
        gc.collect()
        return REGISTRY.get_sample_value(name, labels) or 0.0

    hits = sample("vm_agent_dns_queries_total", {"result": "hit"})
    misses = sample("vm_agent_dns_queries_total", {"result": "miss"})
    noerror = sample("vm_agent_dns_responses_total", {"rcode": "NOERROR"})
    nx = sample("vm_agent_dns_responses_total", {"rcode": "NXDOMAIN"})
    await ask("udp", server, "details.ns1")
    await ask("tcp", server, "details.ns1")
    await ask("udp", server, "nx.example.net")
    assert sample("vm_agent_dns_queries_total", {"result": "hit"}) == hits + 2
    assert sample("vm_agent_dns_queries_total", {"result": "miss"}) == misses + 1
    assert sample("vm_agent_dns_responses_total", {"rcode": "NOERROR"}) == noerror + 2
    assert sample("vm_agent_dns_responses_total", {"rcode": "NXDOMAIN"}) == nx + 1
    assert sample("vm_agent_dns_forwards_total", {"result": "ok"}) >= 1
    snap = server.snapshot()
    assert snap["queries"]["hit"] == 2 and snap["table_names"] > 10
    ndsz = server.ndsz()
    assert "details.ns1." in ndsz["alt_hosts"]["details.ns1.svc.cluster.local"]
    assert ndsz["table"]["table"]["www.example.com"]["ips"] == ["10.1.0.1"]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ipv6_listener_and_upstream(
    transport: str, make_server: ServerFactory, make_resolver: ResolverFactory
) -> None:
    up = await make_resolver("::1", address="192.0.2.6")
    server = await make_server(((up.host, up.port),), mesh_table(), listen_host="::1")
    assert addr(server)[0] == "::1"
    assert ips(await ask(transport, server, "ratings.ns2", "AAAA")) == ["fd00::2"]
    assert ips(await ask(transport, server, "elsewhere.example.net")) == ["192.0.2.6"]


async def test_run_cancels_cleanly_and_frees_ports(upstream: TestResolver) -> None:
    port = free_tcp_udp_port("127.0.0.1")
    settings = DnsSettings(
        listen=(("127.0.0.1", port),),
        upstreams=((upstream.host, upstream.port),),
        search_domains=(),
        pod_namespace="ns1",
        proxy_domain="svc.cluster.local",
    )
    first = DnsServer(settings)
    task = asyncio.create_task(first.run())
    async with asyncio.timeout(10):
        await first.ready.wait()
    # A second server on the same port fails loudly, naming the address.
    with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
        await DnsServer(settings).run()
    assert ips(await ask("tcp", first, "host.example.net")) == ["192.0.2.1"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not first.ready.is_set()
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", port))


async def test_concurrent_forwards_with_equal_ids_are_not_confused(server: DnsServer, upstream: TestResolver) -> None:
    names = [f"host{i}.example.net" for i in range(40)]
    replies = await asyncio.gather(*(udp_exchange(addr(server), question(n, qid=1)) for n in names))
    for name, raw in zip(names, replies, strict=True):
        reply = dnslib.DNSRecord.parse(raw)
        assert reply.header.id == 1
        assert str(reply.q.qname) == name + "."
        assert str(reply.rr[0].rname) == name + "."
    assert len(upstream.queries) == 40


async def test_cancel_during_startup_is_clean(upstream: TestResolver) -> None:
    for delay in (0.0, 0.001, 0.01):
        port = free_tcp_udp_port("127.0.0.1")
        settings = DnsSettings(
            listen=(("127.0.0.1", port),),
            upstreams=((upstream.host, upstream.port),),
            search_domains=(),
            pod_namespace="ns1",
            proxy_domain="",
        )
        server = DnsServer(settings)
        task = asyncio.create_task(server.run())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.ready.is_set()
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))


async def test_a_failing_udp_thread_stops_the_proxy_loudly(
    monkeypatch: pytest.MonkeyPatch, upstream: TestResolver
) -> None:
    def broken(self: UdpEngine) -> None:
        raise OSError("epoll went away")

    monkeypatch.setattr(UdpEngine, "run", broken)
    settings = DnsSettings(
        listen=(("127.0.0.1", free_tcp_udp_port("127.0.0.1")),),
        upstreams=((upstream.host, upstream.port),),
        search_domains=(),
        pod_namespace="ns1",
        proxy_domain="",
    )
    with pytest.raises(RuntimeError, match="DNS UDP thread failed"):
        async with asyncio.timeout(10):
            await DnsServer(settings).run()
