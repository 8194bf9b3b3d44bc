"""Istio's own DNS proxy test table (istio/istio pkg/dns/client/dns_test.go: ``testDNS`` and ``fillTable``),
as data for our tests.

Every case of that table is here, with Istio's name, in Istio's order.  ``source`` says who answers:
``"table"`` (the NameTable; the handler must answer it) or ``"upstream"`` (the handler must forward it
and the upstream decides).  The upstream is Istio's ``makeUpstream``: NXDOMAIN for every name except
``www.bing.com.`` (1.1.1.1), ``giant.`` (64 A records) and ``giant-tc.`` (the same, truncated to 512
bytes by the upstream itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from vm_agent.proto import nds_pb2

# NewLocalDNSServer("ns1", "ns1.svc.cluster.local", ...): the namespace label is dropped from the domain.
NAMESPACE = "ns1"
PROXY_DOMAIN = "svc.cluster.local"
SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")

NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3

Record = tuple[str, str, str]  # (owner, type, rdata); class IN, TTL 30


def name_table() -> nds_pb2.NameTable:
    """``fillTable``'s NameTable."""
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
    add("*.svc.mesh.company.net", ["10.1.2.3"])
    add("example.localhost.", ["3.3.3.3"])
    return t


def a(owner: str, *ips: str) -> tuple[Record, ...]:
    return tuple((owner, "A", ip) for ip in ips)


GIANT: tuple[Record, ...] = a("aaaaaaaaaaaa.aaaaaa.", *(f"240.0.0.{i}" for i in range(64)))


@dataclass(frozen=True)
class IstioCase:
    name: str  # Istio's test name
    host: str
    answers: tuple[Record, ...] = ()  # expected answer section, in order (unless round_robin_id)
    qtype: str = "A"
    source: str = "table"  # "table" or "upstream"
    rcode: int | None = None  # Istio's expectResolutionFailure, where it checks one (we check it always)
    transport: str | None = None  # Istio's "udp: ..." / "tcp: ..." cases run on that transport only
    edns: int | None = None  # modifyReq: SetEdns0(size)
    round_robin_id: int | None = None  # Istio pins dns.Id to this; the order below is for that ID


CASES: tuple[IstioCase, ...] = (
    IstioCase("success: non k8s host in local cache", "www.google.com.", a("www.google.com.", "1.1.1.1")),
    IstioCase(
        "success: non k8s host with search namespace yields cname+A record",
        "www.google.com.ns1.svc.cluster.local.",
        (("www.google.com.ns1.svc.cluster.local.", "CNAME", "www.google.com."), *a("www.google.com.", "1.1.1.1")),
    ),
    IstioCase(
        "success: non k8s host not in local cache",
        "www.bing.com.",
        a("www.bing.com.", "1.1.1.1"),
        source="upstream",
        rcode=NOERROR,
    ),
    IstioCase(
        "success: k8s host - fqdn",
        "productpage.ns1.svc.cluster.local.",
        a("productpage.ns1.svc.cluster.local.", "9.9.9.9"),
    ),
    # The case vm-agent used to get wrong (it answered CNAME + A): a name that already ends in the first
    # search domain gets no search-domain shortcut, so the upstream decides.
    IstioCase(
        "not found: k8s host, fqdn with search namespace[0]",
        "productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.",
        source="upstream",
        rcode=NXDOMAIN,
    ),
    IstioCase("success: k8s host - name.namespace", "productpage.ns1.", a("productpage.ns1.", "9.9.9.9")),
    IstioCase("success: k8s host - shortname", "productpage.", a("productpage.", "9.9.9.9")),
    IstioCase(
        "success: k8s host (name.namespace) with search namespace yields cname+A record",
        "productpage.ns1.ns1.svc.cluster.local.",
        (("productpage.ns1.ns1.svc.cluster.local.", "CNAME", "productpage.ns1."), *a("productpage.ns1.", "9.9.9.9")),
    ),
    IstioCase(
        "success: AAAA query for IPv4 k8s host (name.namespace) with search namespace",
        "productpage.ns1.ns1.svc.cluster.local.",
        qtype="AAAA",
        rcode=NOERROR,
    ),
    IstioCase(
        "success: k8s host - non local namespace - name.namespace", "example.ns2.", a("example.ns2.", "10.10.10.10")
    ),
    IstioCase(
        "success: k8s host - non local namespace - fqdn",
        "example.ns2.svc.cluster.local.",
        a("example.ns2.svc.cluster.local.", "10.10.10.10"),
    ),
    IstioCase(
        "success: k8s host - non local namespace - name.namespace.svc",
        "example.ns2.svc.",
        a("example.ns2.svc.", "10.10.10.10"),
    ),
    IstioCase("failure: k8s host - non local namespace - shortname", "example.", source="upstream", rcode=NXDOMAIN),
    IstioCase("success: alt host - name", "svc-with-alt.", a("svc-with-alt.", "15.15.15.15")),
    IstioCase("success: alt host - name.namespace", "svc-with-alt.ns1.", a("svc-with-alt.ns1.", "15.15.15.15")),
    IstioCase(
        "success: alt host - name.namespace.svc", "svc-with-alt.ns1.svc.", a("svc-with-alt.ns1.svc.", "15.15.15.15")
    ),
    IstioCase(
        "success: alt host - name.namespace.svc.cluster.local",
        "svc-with-alt.ns1.svc.cluster.local.",
        a("svc-with-alt.ns1.svc.cluster.local.", "15.15.15.15"),
    ),
    IstioCase(
        "success: alt host - name.namespace.svc.clusterset.local",
        "svc-with-alt.ns1.svc.clusterset.local.",
        a("svc-with-alt.ns1.svc.clusterset.local.", "15.15.15.15"),
    ),
    IstioCase(
        "success: remote cluster k8s svc - same ns and different domain - fqdn",
        "details.ns2.svc.cluster.remote.",
        a("details.ns2.svc.cluster.remote.", "13.13.13.13", "14.14.14.14", "12.12.12.12", "11.11.11.11"),
        round_robin_id=2,
    ),
    IstioCase(
        "success: remote cluster k8s svc round robin",
        "details.ns2.svc.cluster.remote.",
        a("details.ns2.svc.cluster.remote.", "13.13.13.13", "14.14.14.14", "11.11.11.11", "12.12.12.12"),
        round_robin_id=1,
    ),
    IstioCase(
        "failure: remote cluster k8s svc - same ns and different domain - name.namespace",
        "details.ns2.",
        source="upstream",
        rcode=NXDOMAIN,
    ),
    IstioCase("success: TypeA query returns A records only", "dual.localhost.", a("dual.localhost.", "2.2.2.2")),
    IstioCase("success: wild card returns A record correctly", "foo.wildcard.", a("foo.wildcard.", "10.10.10.10")),
    IstioCase(
        "success: specific wild card returns A record correctly", "a.b.wildcard.", a("a.b.wildcard.", "11.11.11.11")
    ),
    IstioCase(
        "success: wild card with with search namespace chained pointer correctly",
        "foo.wildcard.ns1.svc.cluster.local.",
        (("foo.wildcard.ns1.svc.cluster.local.", "CNAME", "*.wildcard."), *a("*.wildcard.", "10.10.10.10")),
    ),
    IstioCase(
        "success: wild card with domain returns A record correctly",
        "foo.svc.mesh.company.net.",
        a("foo.svc.mesh.company.net.", "10.1.2.3"),
    ),
    IstioCase(
        "success: wild card with namespace with domain returns A record correctly",
        "foo.foons.svc.mesh.company.net.",
        a("foo.foons.svc.mesh.company.net.", "10.1.2.3"),
    ),
    IstioCase(
        "success: wild card with search domain returns A record correctly",
        "foo.svc.mesh.company.net.ns1.svc.cluster.local.",
        (
            ("foo.svc.mesh.company.net.ns1.svc.cluster.local.", "CNAME", "*.svc.mesh.company.net."),
            *a("*.svc.mesh.company.net.", "10.1.2.3"),
        ),
    ),
    IstioCase(
        "success: TypeAAAA query returns AAAA records only",
        "dual.localhost.",
        (("dual.localhost.", "AAAA", "2001:db8::ff00:42:8329"),),
        qtype="AAAA",
    ),
    # Not NXDOMAIN: a known name with no records of the asked family is an empty NOERROR.
    IstioCase("success: Error response if only AAAA records exist for typeA", "ipv6.localhost.", rcode=NOERROR),
    IstioCase(
        "success: Error response if only A records exist for typeAAAA", "ipv4.localhost.", qtype="AAAA", rcode=NOERROR
    ),
    # The upstream's UDP reply is bigger than the client's 512 bytes: that server failed, SERVFAIL.
    IstioCase("udp: large request", "giant.", source="upstream", rcode=SERVFAIL, transport="udp"),
    IstioCase("tcp: large request", "giant.", GIANT, source="upstream", rcode=NOERROR, transport="tcp"),
    IstioCase("large request edns", "giant.", GIANT, source="upstream", rcode=NOERROR, edns=65535),
    # The upstream truncates to 512 bytes itself (compressed, 29 records, TC) and that is passed on.
    IstioCase("large request truncated", "giant-tc.", GIANT[:29], source="upstream", rcode=NOERROR),
    IstioCase("success: hostname with a period", "example.localhost.", a("example.localhost.", "3.3.3.3")),
)


# TestBuildAlternateHosts: name prefix → every NameTable key and alternate host starting with it.
ALTERNATE_HOSTS: dict[str, set[str]] = {
    "www.google.com": {"www.google.com", "www.google.com."},
    "example": {
        "example.ns2.",
        "example.ns2.svc.",
        "example.localhost.",
        "example.ns2.svc.cluster.local.",
        "example.ns2.svc.cluster.local",
    },
    "details": {"details.ns2.svc.cluster.remote", "details.ns2.svc.cluster.remote."},
    "productpage": {
        "productpage.ns1.svc.cluster.local.",
        "productpage.",
        "productpage.ns1.svc.cluster.local",
        "productpage.ns1.",
        "productpage.ns1.svc.",
    },
    "svc-with-alt": {
        "svc-with-alt.",
        "svc-with-alt.ns1.",
        "svc-with-alt.ns1.svc.",
        "svc-with-alt.ns1.svc.clusterset.local.",
        "svc-with-alt.ns1.svc.cluster.local.",
        "svc-with-alt.ns1.svc.cluster.local",
    },
    "*.wildcard": {"*.wildcard", "*.wildcard."},
    "example.localhost.": {"example.localhost."},
}
