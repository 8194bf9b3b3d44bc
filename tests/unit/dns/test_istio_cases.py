"""The scenarios Istio's own agent DNS tests check (pkg/dns/client), run against our handler.

Same NameTable shape, same search list and namespace, same expected records and orders; the
shuffle is driven by a counting ID source the way Istio's test overrides miekg/dns ``Id()``.
"""

from __future__ import annotations

import itertools

import dnslib
import pytest

from vm_agent.dns.handler import Outcome, handle
from vm_agent.dns.index import NameIndex, build_index
from vm_agent.proto import nds_pb2


def _table() -> nds_pb2.NameTable:
    t = nds_pb2.NameTable()

    def add(host: str, ips: list[str], registry: str = "External", ns: str = "", short: str = "") -> None:
        t.table[host].ips.extend(ips)
        t.table[host].registry = registry
        t.table[host].namespace = ns
        t.table[host].shortname = short

    add("www.google.com", ["1.1.1.1"])
    add("productpage.ns1.svc.cluster.local", ["9.9.9.9"], "Kubernetes", "ns1", "productpage")
    add("example.ns2.svc.cluster.local", ["10.10.10.10"], "Kubernetes", "ns2", "example")
    add(
        "details.ns2.svc.cluster.remote",
        ["11.11.11.11", "12.12.12.12", "13.13.13.13", "14.14.14.14"],
        "Kubernetes",
        "ns2",
        "details",
    )
    add("svc-with-alt.ns1.svc.cluster.local", ["15.15.15.15"], "Kubernetes", "ns1", "svc-with-alt")
    t.table["svc-with-alt.ns1.svc.cluster.local"].alt_hosts.append("svc-with-alt.ns1.svc.clusterset.local")
    add("ipv6.localhost", ["2001:db8:0:0:0:ff00:42:8329"])
    add("dual.localhost", ["2.2.2.2", "2001:db8:0:0:0:ff00:42:8329"])
    add("ipv4.localhost", ["2.2.2.2"])
    add("*.b.wildcard", ["11.11.11.11"])
    add("*.wildcard", ["10.10.10.10"])
    return t


INDEX: NameIndex = build_index(
    _table(), ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local"), "ns1", "svc.cluster.local"
)

FORWARD = None  # not in the table: goes upstream


@pytest.mark.parametrize(
    ("host", "qtype", "expected"),
    [
        ("www.google.com.", "A", [("www.google.com.", "A", "1.1.1.1")]),
        (
            "www.google.com.ns1.svc.cluster.local.",
            "A",
            [
                ("www.google.com.ns1.svc.cluster.local.", "CNAME", "www.google.com."),
                ("www.google.com.", "A", "1.1.1.1"),
            ],
        ),
        ("www.bing.com.", "A", FORWARD),
        ("productpage.ns1.svc.cluster.local.", "A", [("productpage.ns1.svc.cluster.local.", "A", "9.9.9.9")]),
        ("productpage.ns1.", "A", [("productpage.ns1.", "A", "9.9.9.9")]),
        ("productpage.", "A", [("productpage.", "A", "9.9.9.9")]),
        (
            "productpage.ns1.ns1.svc.cluster.local.",
            "A",
            [
                ("productpage.ns1.ns1.svc.cluster.local.", "CNAME", "productpage.ns1."),
                ("productpage.ns1.", "A", "9.9.9.9"),
            ],
        ),
        ("productpage.ns1.ns1.svc.cluster.local.", "AAAA", []),
        ("example.ns2.", "A", [("example.ns2.", "A", "10.10.10.10")]),
        ("example.ns2.svc.cluster.local.", "A", [("example.ns2.svc.cluster.local.", "A", "10.10.10.10")]),
        ("example.ns2.svc.", "A", [("example.ns2.svc.", "A", "10.10.10.10")]),
        ("example.", "A", FORWARD),
        ("svc-with-alt.", "A", [("svc-with-alt.", "A", "15.15.15.15")]),
        ("svc-with-alt.ns1.", "A", [("svc-with-alt.ns1.", "A", "15.15.15.15")]),
        ("svc-with-alt.ns1.svc.", "A", [("svc-with-alt.ns1.svc.", "A", "15.15.15.15")]),
        ("svc-with-alt.ns1.svc.cluster.local.", "A", [("svc-with-alt.ns1.svc.cluster.local.", "A", "15.15.15.15")]),
        (
            "svc-with-alt.ns1.svc.clusterset.local.",
            "A",
            [("svc-with-alt.ns1.svc.clusterset.local.", "A", "15.15.15.15")],
        ),
        ("details.ns2.", "A", FORWARD),
        ("dual.localhost.", "A", [("dual.localhost.", "A", "2.2.2.2")]),
        ("dual.localhost.", "AAAA", [("dual.localhost.", "AAAA", "2001:db8::ff00:42:8329")]),
        ("foo.wildcard.", "A", [("foo.wildcard.", "A", "10.10.10.10")]),
        ("a.b.wildcard.", "A", [("a.b.wildcard.", "A", "11.11.11.11")]),
        ("ipv6.localhost.", "A", []),
        ("ipv4.localhost.", "AAAA", []),
    ],
)
@pytest.mark.parametrize("tcp", [False, True])
def test_istio_agent_dns_cases(host: str, qtype: str, expected: list[tuple[str, str, str]] | None, tcp: bool) -> None:
    query = bytes(dnslib.DNSRecord.question(host, qtype).pack())
    decision = handle(INDEX, query, tcp)
    if expected is None:
        assert decision.outcome is Outcome.MISS
        return
    assert decision.outcome is Outcome.HIT
    reply = dnslib.DNSRecord.parse(decision.reply or b"")
    assert (reply.header.rcode, reply.header.aa) == (0, 1)
    got = [(str(rr.rname), dnslib.QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr]
    assert got == expected
    assert all(rr.rclass == dnslib.CLASS.IN and rr.ttl == 30 for rr in reply.rr)


@pytest.mark.parametrize(
    ("first_id", "order"),
    [
        (3, ["13.13.13.13", "14.14.14.14", "12.12.12.12", "11.11.11.11"]),  # Istio's case "id: 2"
        (2, ["13.13.13.13", "14.14.14.14", "11.11.11.11", "12.12.12.12"]),  # Istio's case "id: 1"
    ],
)
@pytest.mark.parametrize("tcp", [False, True])
def test_istio_round_robin_orders(first_id: int, order: list[str], tcp: bool) -> None:
    query = bytes(dnslib.DNSRecord.question("details.ns2.svc.cluster.remote.", "A").pack())
    decision = handle(INDEX, query, tcp, itertools.count(first_id).__next__)
    reply = dnslib.DNSRecord.parse(decision.reply or b"")
    assert [str(rr.rdata) for rr in reply.rr] == order
    assert {str(rr.rname) for rr in reply.rr} == {"details.ns2.svc.cluster.remote."}
