"""NameTable → NameIndex: every answer the proxy can give from the table, precomputed as wire bytes.

Built once per NDS update (pure code, no I/O) and then only read, so the DNS threads can use an
index while a new one is being built and the swap is a single reference assignment.

The rules are Istio's (pkg/dns/client): alternate host names per registry, one A/AAAA RRset per
name with TTL 30, a CNAME from ``<name>.<first search domain>`` to the name (unless the name already
ends in that domain), wildcards matched most specific first, and NOERROR with no records for a known
name of the other family.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vm_agent.dns import wire
from vm_agent.proto import nds_pb2

KUBERNETES_REGISTRY = "Kubernetes"

IdSource = Callable[[], int]


def random_id() -> int:
    """A 16-bit value, the role miekg/dns ``Id()`` plays in Istio's shuffle."""
    return random.getrandbits(16)


def shuffle(items: list[Any], next_id: IdSource = random_id) -> None:
    """Istio's round-robin shuffle, in place (§10.5).

    The loop bound is drawn again on every iteration on purpose: that is what Istio does and its
    test vectors depend on it.
    """
    n = len(items)
    if n < 2:
        return
    if n == 2:
        if next_id() % 2 == 0:
            items[0], items[1] = items[1], items[0]
        return
    j = 0
    while j < n * (next_id() % 4 + 1):
        q = next_id() % n
        p = next_id() % n
        if q == p:
            p = (p + 1) % n
        items[q], items[p] = items[p], items[q]
        j += 1


_COUNTS = [b"\x00\x01" + n.to_bytes(2, "big") + b"\x00\x00\x00\x00" for n in range(64)]


def _counts(answers: int) -> bytes:
    # Shared objects for the usual sizes: a 100k-name table has 400k answers.
    if answers < len(_COUNTS):
        return _COUNTS[answers]
    return b"\x00\x01" + answers.to_bytes(2, "big") + b"\x00\x00\x00\x00"


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer the fast path splices per query: NODATA, or records that get shuffled.

    ``head`` is a CNAME RR that always comes first, ``addrs`` the A/AAAA RRs that get shuffled.
    """

    counts: bytes  # the header's last eight bytes
    head: bytes
    addrs: tuple[bytes, ...]

    def records(self, next_id: IdSource) -> bytes:
        if len(self.addrs) < 2:
            return self.head + b"".join(self.addrs)
        addrs = list(self.addrs)
        shuffle(addrs, next_id)
        return self.head + b"".join(addrs)


# A one-record answer (the common case) is stored as its finished tail instead: counts, question
# (lower case), records — so a hit is one dict lookup and one concatenation.
Prebuilt = bytes | Answer

NODATA = Answer(_counts(0), b"", ())


def _answer(question: bytes, head: bytes, addrs: tuple[bytes, ...]) -> Prebuilt:
    if not addrs:
        # The CNAME goes too: Istio answers NODATA, not a dangling CNAME.
        return NODATA
    counts = _counts(len(addrs) + (1 if head else 0))
    if len(addrs) == 1:
        return counts + question + head + addrs[0]
    return Answer(counts, head, addrs)


@dataclass(slots=True)
class _Host:
    """What Istio's LookupTable holds for one lower-cased name (only while building)."""

    v4: tuple[bytes, ...] = ()  # rdata
    v6: tuple[bytes, ...] = ()
    cname: bytes | None = None  # target (wire)


_NO_HOST = _Host()


@dataclass
class NameIndex:
    """Read-only after ``build_index``; shared between threads.

    Only the prebuilt answers are kept (the general path decodes records back out of them), so a
    name costs two dict entries and their bytes, nothing more.
    """

    # lower-cased question (wire name + type + class IN) → answer; the fast path's only lookup
    exact: dict[bytes, Prebuilt]
    entries: int
    skipped: int
    wildcards: bool = field(default=False)

    def __len__(self) -> int:
        return len(self.exact) // 2  # every known name has an A and an AAAA answer

    def lookup(self, qname_lower: bytes, qtype: int) -> list[wire.Record] | None:
        """Records answering (name, type), [] for NODATA, None when the table does not own it.

        The general path (wildcards, CNAME renaming); ``exact`` serves the common case faster.
        """
        if qtype == wire.TYPE_A:
            suffix = _A_IN
        elif qtype == wire.TYPE_AAAA:
            suffix = _AAAA_IN
        else:
            return None
        answer = self.exact.get(qname_lower + suffix)
        wildcard = False
        if answer is None and self.wildcards and qname_lower[0] != 0:
            pos = 0
            # Strip one label at a time; never down to a bare "*." (Istio builds "*.." there).
            while True:
                pos += 1 + qname_lower[pos]
                if qname_lower[pos] == 0:
                    break
                answer = self.exact.get(b"\x01*" + qname_lower[pos:] + suffix)
                if answer is not None:
                    wildcard = True
                    break
        if answer is None:
            return None
        records = _records(answer)
        if wildcard and records:
            if records[0][1] == wire.TYPE_CNAME:
                # The CNAME is renamed to the question; the addresses keep the target's owner.
                records[0] = (qname_lower, wire.TYPE_CNAME, records[0][2])
            else:
                records = [(qname_lower, rtype, rdata) for _, rtype, rdata in records]
        return records


class TableRef:
    """The NameIndex in service, shared by the UDP and TCP threads.

    Replaced by one attribute assignment (atomic under the GIL), so a query sees the old or the new
    index whole; None until the first NameTable.
    """

    __slots__ = ("index",)

    def __init__(self) -> None:
        self.index: NameIndex | None = None


def _records(answer: Prebuilt) -> list[wire.Record]:
    """Decode the answer section back out of a prebuilt answer (names in it are uncompressed)."""
    if isinstance(answer, bytes):
        count = int.from_bytes(answer[2:4], "big")
        _, pos = wire.read_name(answer, 8)
        return _decode_rrs(answer, pos + 4, count)
    out = _decode_rrs(answer.head, 0, 1) if answer.head else []
    for rr in answer.addrs:
        out += _decode_rrs(rr, 0, 1)
    return out


def _decode_rrs(buf: bytes, pos: int, count: int) -> list[wire.Record]:
    out: list[wire.Record] = []
    for _ in range(count):
        owner, pos = wire.read_name(buf, pos)
        rtype = int.from_bytes(buf[pos : pos + 2], "big")
        rdlen = int.from_bytes(buf[pos + 8 : pos + 10], "big")
        out.append((owner, rtype, buf[pos + 10 : pos + 10 + rdlen]))
        pos += 10 + rdlen
    return out


def _split_ips(ips: Iterable[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    v4: list[bytes] = []
    v6: list[bytes] = []
    for text in ips:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            # Istio skips what does not parse; istiod only sends literals anyway.
            continue
        (v4 if addr.version == 4 else v6).append(addr.packed)
    return tuple(v4), tuple(v6)


def alternate_hosts(
    hostname: str, info: nds_pb2.NameTable.NameInfo, pod_namespace: str, proxy_domain: str
) -> list[str]:
    """The names Istio answers for one NameTable entry (with trailing dots, not lower-cased)."""
    if info.registry == KUBERNETES_REGISTRY:
        if hostname.endswith("."):
            return []
        out = [hostname + "."]
        if not proxy_domain or not hostname.endswith(proxy_domain):
            return out
        first_label = proxy_domain.split(".")[0]
        out.append(f"{info.shortname}.{info.namespace}.")
        if info.namespace == pod_namespace:
            out.append(f"{info.shortname}.")
        out.append(f"{info.shortname}.{info.namespace}.{first_label}.")
        out.extend(alt + "." for alt in info.alt_hosts)
        return list(dict.fromkeys(out))
    return [hostname if hostname.endswith(".") else hostname + "."]


def build_index(
    table: nds_pb2.NameTable,
    search_domains: Sequence[str],
    pod_namespace: str,
    proxy_domain: str,
) -> NameIndex:
    """Precompute every answer for ``table``.

    Raises ``ValueError`` naming the entry when a host name cannot be a DNS name, so the xDS proxy
    NACKs the table and the previous index stays in service.
    """
    if not isinstance(table, nds_pb2.NameTable):
        raise ValueError(f"NameTable expected, got {type(table).__name__}")
    search = search_domains[0].lower().rstrip(".") if search_domains else ""
    search_wire = wire.text_to_name(search, "first search domain") if search else b""
    # Istio skips the shortcut for a name that already ends in the first search domain, as text (so
    # "productpage.ns1.svc.cluster.local.ns1.svc.cluster.local." is forwarded: the upstream answers it).
    search_suffix = search + "." if search else ""
    hosts: dict[bytes, _Host] = {}
    skipped = 0
    for hostname, info in table.table.items():
        where = f"NameTable entry {hostname!r}"
        names = alternate_hosts(hostname, info, pod_namespace, proxy_domain)
        wires = [wire.text_to_name(name, where) for name in names]
        v4, v6 = _split_ips(info.ips)
        if not v4 and not v6:
            skipped += 1
            continue
        own = {w.lower() for w in wires}
        for name, name_wire in zip(names, wires, strict=True):
            key = name_wire.lower()
            host = hosts.get(key)
            if host is None:
                host = hosts[key] = _Host()
            if v4:
                host.v4 = v4
            if v6:
                host.v6 = v6
            if search_wire and not name.lower().endswith(search_suffix):
                expanded = key[:-1] + search_wire
                # Too long to ever be asked for; Istio stores it anyway, we need not.
                if len(expanded) <= wire.MAX_NAME_LEN and expanded not in own:
                    target = hosts.get(expanded)
                    if target is None:
                        target = hosts[expanded] = _Host()
                    target.cname = key
    exact: dict[bytes, Prebuilt] = {}
    wildcards = False
    for key, host in hosts.items():
        for qtype, suffix in ((wire.TYPE_A, _A_IN), (wire.TYPE_AAAA, _AAAA_IN)):
            exact[key + suffix] = _resolve(hosts, key, host, qtype, key + suffix)
        if key.startswith(b"\x01*"):
            wildcards = True
    return NameIndex(exact, len(table.table), skipped, wildcards)


_A_IN = b"\x00\x01\x00\x01"
_AAAA_IN = b"\x00\x1c\x00\x01"


def _resolve(hosts: dict[bytes, _Host], key: bytes, host: _Host, qtype: int, question: bytes) -> Prebuilt:
    head = b""
    owner = key
    if host.cname is not None:
        head = wire.rr_bytes(key, wire.TYPE_CNAME, host.cname)
        owner = host.cname
        host = hosts.get(owner) or _NO_HOST
    rdatas = host.v4 if qtype == wire.TYPE_A else host.v6
    return _answer(question, head, tuple(wire.rr_bytes(owner, qtype, rdata) for rdata in rdatas))
