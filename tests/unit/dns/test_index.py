"""NameTable → NameIndex: Istio's alternate names, CNAME shortcut, wildcards, shuffle, validation."""

from __future__ import annotations

import itertools
import time

import pytest

from vm_agent.dns import wire
from vm_agent.dns.index import alternate_hosts, build_index, shuffle
from vm_agent.proto import nds_pb2

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


def info(
    ips: list[str], registry: str = "External", shortname: str = "", namespace: str = "", alts: tuple[str, ...] = ()
) -> nds_pb2.NameTable.NameInfo:
    i = nds_pb2.NameTable.NameInfo(ips=ips, registry=registry, shortname=shortname, namespace=namespace)
    i.alt_hosts.extend(alts)
    return i


def table(**entries: nds_pb2.NameTable.NameInfo) -> nds_pb2.NameTable:
    t = nds_pb2.NameTable()
    for host, i in entries.items():
        t.table[host.replace("_", ".").replace("STAR", "*")].CopyFrom(i)
    return t


def name(text: str) -> bytes:
    return wire.text_to_name(text, "test")


def counter(start: int) -> itertools.count[int]:
    return itertools.count(start)


def test_shuffle_matches_istio_vectors() -> None:
    # §10.5: with Id() returning 3,4,5,... [11,12,13,14] → [13,14,12,11]; with 2,3,4,... → [13,14,11,12].
    items = [11, 12, 13, 14]
    shuffle(items, counter(3).__next__)
    assert items == [13, 14, 12, 11]
    items = [11, 12, 13, 14]
    shuffle(items, counter(2).__next__)
    assert items == [13, 14, 11, 12]
    pair = [1, 2]
    shuffle(pair, counter(4).__next__)
    assert pair == [2, 1]
    shuffle(pair, counter(5).__next__)
    assert pair == [2, 1]
    one = [1]
    shuffle(one, counter(0).__next__)
    assert one == [1]


def test_alternate_hosts_kubernetes_rules() -> None:
    k8s = info(["10.0.0.1"], "Kubernetes", "details", "ns1", ("details.alias",))
    assert alternate_hosts("details.ns1.svc.cluster.local", k8s, "ns1", "svc.cluster.local") == [
        "details.ns1.svc.cluster.local.",
        "details.ns1.",
        "details.",
        "details.ns1.svc.",
        "details.alias.",
    ]
    # Another namespace: no bare short name.
    assert "details." not in alternate_hosts("details.ns1.svc.cluster.local", k8s, "ns2", "svc.cluster.local")
    # Another cluster domain, or no proxy domain: only the host itself.
    assert alternate_hosts("details.ns1.svc.cluster.remote", k8s, "ns1", "svc.cluster.local") == [
        "details.ns1.svc.cluster.remote."
    ]
    assert alternate_hosts("details.ns1.svc.cluster.local", k8s, "ns1", "") == ["details.ns1.svc.cluster.local."]
    # A Kubernetes host that already ends with a dot gets no names at all.
    assert alternate_hosts("details.ns1.svc.cluster.local.", k8s, "ns1", "svc.cluster.local") == []
    assert alternate_hosts("www.example.com", info(["1.1.1.1"]), "ns1", "svc.cluster.local") == ["www.example.com."]
    assert alternate_hosts("www.example.com.", info(["1.1.1.1"]), "ns1", "svc.cluster.local") == ["www.example.com."]


def test_records_ttl_families_and_invalid_ips() -> None:
    idx = build_index(
        table(
            a_example_com=info(["10.0.0.1", "not-an-ip", "::ffff:1.2.3.4", "fd00::1"]),
            dead_example_com=info(["garbage"]),
        ),
        (),
        "ns1",
        "svc.cluster.local",
    )
    a = idx.lookup(name("a.example.com"), wire.TYPE_A)
    assert a == [(name("a.example.com"), wire.TYPE_A, bytes([10, 0, 0, 1]))]
    aaaa = idx.lookup(name("a.example.com"), wire.TYPE_AAAA)
    assert aaaa is not None and len(aaaa) == 2  # the IPv4-mapped literal stays IPv6
    # Known name, non-address type: not ours (forwarded); unknown and all-invalid entries likewise.
    assert idx.lookup(name("a.example.com"), 15) is None
    assert idx.lookup(name("dead.example.com"), wire.TYPE_A) is None
    assert idx.skipped == 1
    tail = idx.exact[name("a.example.com") + b"\x00\x01\x00\x01"]
    assert isinstance(tail, bytes)
    assert tail.endswith(wire.rr_bytes(name("a.example.com"), wire.TYPE_A, bytes([10, 0, 0, 1])))
    assert b"\x00\x00\x00\x1e" in tail  # TTL 30


def test_search_domain_cname_shortcut() -> None:
    k8s = info(["10.0.0.1"], "Kubernetes", "details", "ns1")
    idx = build_index(
        table(details_ns1_svc_cluster_local=k8s, www_example_com=info(["10.1.1.1"])), SEARCH, "ns1", "svc.cluster.local"
    )
    got = idx.lookup(name("www.example.com.ns1.svc.cluster.local"), wire.TYPE_A)
    assert got == [
        (name("www.example.com.ns1.svc.cluster.local"), wire.TYPE_CNAME, name("www.example.com")),
        (name("www.example.com"), wire.TYPE_A, bytes([10, 1, 1, 1])),
    ]
    # "details." + first search domain is details' own FQDN: a real entry, not a CNAME.
    own = idx.lookup(name("details.ns1.svc.cluster.local"), wire.TYPE_A)
    assert own is not None and [r[1] for r in own] == [wire.TYPE_A]
    # Only the first search domain.
    assert idx.lookup(name("www.example.com.svc.cluster.local"), wire.TYPE_A) is None
    # CNAME to a name without AAAA: NODATA, CNAME dropped.
    assert idx.lookup(name("www.example.com.ns1.svc.cluster.local"), wire.TYPE_AAAA) == []
    # Names are stored lower-case; the caller lower-cases the question.
    upper = build_index(table(WWW_Example_COM=info(["10.1.1.2"])), SEARCH, "ns1", "")
    assert upper.lookup(name("www.example.com"), wire.TYPE_A) is not None


def test_wildcards_most_specific_first_and_cname_owner() -> None:
    idx = build_index(
        table(STAR_example_org=info(["10.2.0.1"]), STAR_b_example_org=info(["10.2.0.2"])),
        SEARCH,
        "ns1",
        "svc.cluster.local",
    )
    assert idx.lookup(name("x.b.example.org"), wire.TYPE_A) == [
        (name("x.b.example.org"), wire.TYPE_A, b"\n\x02\x00\x02")
    ]
    assert idx.lookup(name("y.x.c.example.org"), wire.TYPE_A) == [
        (name("y.x.c.example.org"), wire.TYPE_A, b"\n\x02\x00\x01")
    ]
    assert idx.lookup(name("example.org"), wire.TYPE_A) is None
    # A host named "*" is not a catch-all (Istio's suffix walk never produces "*.").
    star = build_index(table(STAR=info(["10.9.0.1"])), (), "ns1", "")
    assert star.lookup(name("anything.example"), wire.TYPE_A) is None
    assert star.lookup(b"\x00", wire.TYPE_A) is None
    assert star.lookup(name("*"), wire.TYPE_A) is not None
    # A wildcard hit through the CNAME shortcut keeps the wildcard owner on the address record.
    got = idx.lookup(name("q.example.org.ns1.svc.cluster.local"), wire.TYPE_A)
    assert got == [
        (name("q.example.org.ns1.svc.cluster.local"), wire.TYPE_CNAME, name("*.example.org")),
        (name("*.example.org"), wire.TYPE_A, b"\n\x02\x00\x01"),
    ]


def test_entries_sharing_a_name_replace_not_merge() -> None:
    # Like Istio's map assignment: one entry's records win (map order decides which), never a mix.
    t = nds_pb2.NameTable()
    t.table["details.ns1.svc.cluster.local"].CopyFrom(info(["10.0.0.1"], "Kubernetes", "details", "ns1"))
    t.table["details.ns1"].CopyFrom(info(["10.9.9.9"]))
    idx = build_index(t, (), "ns1", "svc.cluster.local")
    got = idx.lookup(name("details.ns1"), wire.TYPE_A)
    assert got in ([(name("details.ns1"), wire.TYPE_A, b"\n\t\t\t")], [(name("details.ns1"), wire.TYPE_A, b"\n\0\0\1")])


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("bad..example.com", "empty label"),
        ("x" * 64 + ".example.com", "longer than 63"),
        (".".join(["abcdefghi"] * 30), "longer than 255"),
        ("sp ace.example.com", "whitespace"),
        ("ünï.example.com", "not ASCII"),
    ],
)
def test_malformed_names_raise_value_error_naming_the_entry(host: str, message: str) -> None:
    t = nds_pb2.NameTable()
    t.table["fine.example.com"].CopyFrom(info(["10.0.0.1"]))
    t.table[host].CopyFrom(info(["10.0.0.2"]))
    with pytest.raises(ValueError, match=message) as err:
        build_index(t, SEARCH, "ns1", "svc.cluster.local")
    assert repr(host)[:20] in str(err.value)


def test_not_a_name_table() -> None:
    with pytest.raises(ValueError, match="NameTable expected"):
        build_index(nds_pb2.NameTable.NameInfo(), (), "", "")  # type: ignore[arg-type]


def test_hundred_thousand_entries() -> None:
    t = nds_pb2.NameTable()
    for i in range(100_000):
        e = t.table[f"svc{i}.ns{i % 50}.svc.cluster.local"]
        e.ips.append(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        e.registry = "Kubernetes"
        e.shortname = f"svc{i}"
        e.namespace = f"ns{i % 50}"
    start = time.monotonic()
    idx = build_index(t, SEARCH, "ns1", "svc.cluster.local")
    elapsed = time.monotonic() - start
    assert idx.entries == 100_000
    # FQDN, name.ns, name.ns.svc for all, the bare name for ns1; a CNAME per name except the bare
    # ones (bare + first search domain is their own FQDN) and the FQDNs in ns1 (they already end in
    # the first search domain).
    in_ns1 = 100_000 // 50
    assert len(idx) == 3 * 100_000 + in_ns1 + 3 * 100_000 - in_ns1
    got = idx.lookup(name("svc99999.ns49.svc"), wire.TYPE_A)
    assert got == [(name("svc99999.ns49.svc"), wire.TYPE_A, bytes([10, 1, 134, 159]))]
    assert idx.lookup(name("svc51"), wire.TYPE_A) is not None
    assert idx.lookup(name("svc52"), wire.TYPE_A) is None
    print(f"100k-entry NameTable indexed in {elapsed:.2f}s")
