"""Every case of Istio's own agent DNS test table (pkg/dns/client dns_test.go), run against our handler.

Same NameTable, search list and namespace (tests/helpers/istio_dns.py); a case the table answers must
come back with Istio's records in Istio's order (the shuffle driven by a counting ID source, the way
Istio's test overrides miekg/dns ``Id()``); a case the upstream answers must be forwarded.  The same
table runs end to end, with Istio's upstream, in tests/integration/dns/test_istio_cases.py.
"""

from __future__ import annotations

import itertools

import dnslib
import pytest

from tests.helpers import istio_dns
from tests.helpers.istio_dns import CASES, IstioCase
from vm_agent.dns.handler import Outcome, handle
from vm_agent.dns.index import NameIndex, alternate_hosts, build_index

INDEX: NameIndex = build_index(istio_dns.name_table(), istio_dns.SEARCH, istio_dns.NAMESPACE, istio_dns.PROXY_DOMAIN)

PARAMS = [
    pytest.param(case, transport, id=f"{transport}-{case.name}")
    for transport in ("udp", "tcp")
    for case in CASES
    if case.transport in (None, transport)
]


def query(case: IstioCase) -> bytes:
    rec = dnslib.DNSRecord.question(case.host, case.qtype)
    if case.edns is not None:
        rec.add_ar(dnslib.EDNS0(udp_len=case.edns))
    return bytes(rec.pack())


@pytest.mark.parametrize(("case", "transport"), PARAMS)
def test_istio_agent_dns_case(case: IstioCase, transport: str) -> None:
    ids = itertools.count((case.round_robin_id or 0) + 1).__next__
    decision = handle(INDEX, query(case), transport == "tcp", ids)
    if case.source == "upstream":
        assert decision.outcome is Outcome.MISS
        return
    assert decision.outcome is Outcome.HIT
    reply = dnslib.DNSRecord.parse(decision.reply or b"")
    assert (reply.header.rcode, reply.header.aa) == (0, 1)
    got = [(str(rr.rname), dnslib.QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr]
    assert got == list(case.answers)
    assert all(rr.rclass == dnslib.CLASS.IN and rr.ttl == 30 for rr in reply.rr)


def test_the_search_domain_shortcut_skips_names_already_in_that_domain() -> None:
    # Istio's corrected case: no CNAME entry for "<fqdn>.<first search domain>" when the FQDN already
    # ends in it, for Kubernetes and External names alike.
    fqdn = "productpage.ns1.svc.cluster.local.ns1.svc.cluster.local."
    assert handle(INDEX, query(IstioCase("", fqdn)), False).outcome is Outcome.MISS
    assert handle(INDEX, query(IstioCase("", fqdn, qtype="AAAA")), False).outcome is Outcome.MISS
    # Names outside the first search domain keep it.
    short = handle(INDEX, query(IstioCase("", "productpage.ns1.svc.ns1.svc.cluster.local.")), False)
    assert short.outcome is Outcome.HIT


def test_istio_build_alternate_hosts() -> None:
    # TestBuildAlternateHosts: the table's keys plus the alternate names of every entry with addresses.
    table = istio_dns.name_table()
    names = set(table.table)
    for host, info in table.table.items():
        if info.ips:
            names |= set(alternate_hosts(host, info, istio_dns.NAMESPACE, istio_dns.PROXY_DOMAIN))
    for prefix, expected in istio_dns.ALTERNATE_HOSTS.items():
        assert {n for n in names if n.startswith(prefix)} == expected, prefix
