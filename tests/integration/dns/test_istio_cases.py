"""Istio's agent DNS test table end to end: a real DnsServer over UDP and TCP, forwarding to Istio's upstream.

``TestDNS`` runs the table with one upstream; ``TestDNSForwardParallel`` with parallel forwarding, here
with a second, silent upstream so that taking the first answer is actually exercised.
``TestDNSTimeoutBehavior``: an upstream that never answers gives SERVFAIL after the forward timeout.
"""

from __future__ import annotations

import time

import dnslib
import pytest

from tests.helpers import istio_dns
from tests.helpers.istio_dns import CASES, GIANT, IstioCase
from tests.integration.dns.conftest import ResolverFactory, ServerFactory
from tests.integration.dns.resolver import TestResolver, exchange, question
from vm_agent.dns import DnsServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class IstioUpstream(TestResolver):
    """Istio's ``makeUpstream``: NXDOMAIN for everything but www.bing.com., giant. and giant-tc."""

    def reply_to(self, data: bytes, transport: str) -> bytes | None:
        req = dnslib.DNSRecord.parse(data)
        name = str(req.q.qname).lower()
        self.queries.append((transport, name, int(req.q.qtype)))
        reply = req.reply()
        reply.header.aa = 0
        if name == "www.bing.com.":
            records = [(name, "1.1.1.1")]
        elif name in ("giant.", "giant-tc."):
            records = [(owner, ip) for owner, _, ip in GIANT]
        else:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            records = []
        for owner, ip in records:
            reply.add_answer(dnslib.RR(owner, dnslib.QTYPE.A, rdata=dnslib.A(ip), ttl=30))
        packed = bytes(reply.pack())
        if name == "giant-tc.":
            # miekg/dns Truncate to the 512 bytes of a query without EDNS: compressed, whole records, TC.
            while len(packed) > 512:
                reply.rr.pop()
                reply.header.tc = 1
                packed = bytes(reply.pack())
        return packed


@pytest.fixture(params=["sequential", "parallel"])
async def istio(
    request: pytest.FixtureRequest, make_server: ServerFactory, make_resolver: ResolverFactory
) -> tuple[DnsServer, TestResolver]:
    upstream = await make_resolver(cls=IstioUpstream)
    upstreams: tuple[tuple[str, int], ...] = ((upstream.host, upstream.port),)
    if request.param == "parallel":
        silent = await make_resolver("127.0.0.5", mode="silent")
        upstreams = ((silent.host, silent.port), *upstreams)
    server = await make_server(
        upstreams,
        istio_dns.name_table(),
        search_domains=istio_dns.SEARCH,
        pod_namespace=istio_dns.NAMESPACE,
        proxy_domain=istio_dns.PROXY_DOMAIN,
        forward_parallel=request.param == "parallel",
        forward_timeout=1.0,
    )
    return server, upstream


PARAMS = [
    pytest.param(case, transport, id=f"{transport}-{case.name}")
    for transport in ("udp", "tcp")
    for case in CASES
    if case.transport in (None, transport)
]


@pytest.mark.parametrize(("case", "transport"), PARAMS)
async def test_istio_agent_dns_case(case: IstioCase, transport: str, istio: tuple[DnsServer, TestResolver]) -> None:
    server, upstream = istio
    # Istio's UDP client reads up to 65535 bytes; a reply's size is bounded by what the query announces.
    raw = await exchange(transport, server.bound[0], question(case.host, case.qtype, edns=case.edns))
    reply = dnslib.DNSRecord.parse(raw)
    assert all(rr.rclass == dnslib.CLASS.IN for rr in reply.rr)
    if case.rcode is not None:
        assert reply.header.rcode == case.rcode
    got = [(str(rr.rname), dnslib.QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr]
    if case.round_robin_id is not None:
        assert sorted(got) == sorted(case.answers)  # the order is random here; the unit test pins it
    else:
        assert got == list(case.answers)
    assert all(rr.ttl == 30 for rr in reply.rr)
    asked = [q for q in upstream.queries if q[1] == case.host.lower()]
    if case.source == "table":
        assert (reply.header.aa, asked) == (1, [])
    else:
        assert reply.header.aa == 0
        assert asked == [(transport, case.host.lower(), int(getattr(dnslib.QTYPE, case.qtype)))]
        assert reply.header.tc == int(case.host == "giant-tc.")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("timeout", [0.1, 0.2])
async def test_istio_timeout_behavior(
    transport: str, timeout: float, make_server: ServerFactory, make_resolver: ResolverFactory
) -> None:
    silent = await make_resolver("127.0.0.5", mode="silent")
    server = await make_server(((silent.host, silent.port),), istio_dns.name_table(), forward_timeout=timeout)
    start = time.monotonic()
    reply = dnslib.DNSRecord.parse(await exchange(transport, server.bound[0], question("test.example.com")))
    elapsed = time.monotonic() - start
    assert (reply.header.rcode, reply.rr) == (dnslib.RCODE.SERVFAIL, [])
    # Istio's bounds: at least 90 % of the timeout, at most twice it.
    assert timeout * 0.9 <= elapsed <= timeout * 2
