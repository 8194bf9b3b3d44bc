"""Fuzzing the packet handler (the pure function both servers call) with hypothesis.

Each example is a seed — a real query, a random header, or raw bytes — plus a hypothesis-driven
random source that derives ``MUTATIONS`` variants from it (bit flips, truncation, splices,
count and length-byte edits).  ``EXAMPLES * MUTATIONS * 2`` (UDP and TCP) ≥ 100,000 packets a run.
Properties: nothing raises; a reply echoes the query's ID and is a response; a reply with
records carries exactly one question, the query's own; every reply is a well-formed message.  The UDP
forwarder's shortcuts agree with the general path on the same packets: ``plain_miss`` only lets through
what ``handle`` would forward, with the same size limit, and ``wire.check_reply`` accepts exactly what
``wire.parse_message`` accepts (but for the OPT rules only a query needs).
"""

from __future__ import annotations

import random
import struct

import dnslib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vm_agent.dns import wire
from vm_agent.dns.handler import Outcome, handle, plain_miss
from vm_agent.dns.index import NameIndex, build_index
from vm_agent.proto import nds_pb2

EXAMPLES = 500
MUTATIONS = 100


def _index(wildcards: bool = True) -> NameIndex:
    t = nds_pb2.NameTable()
    for host, ips in {
        "details.ns1.svc.cluster.local": ["10.0.0.1"],
        "many.example.com": [f"10.0.1.{i}" for i in range(40)],
        "dual.example.com": ["10.0.0.2", "fd00::2"],
        "*.wild.example.com" if wildcards else "wild.example.com": ["10.0.0.3"],
    }.items():
        e = t.table[host]
        e.ips.extend(ips)
        if host.startswith("details"):
            e.registry, e.shortname, e.namespace = "Kubernetes", "details", "ns1"
        else:
            e.registry = "External"
    return build_index(t, ("ns1.svc.cluster.local", "svc.cluster.local"), "ns1", "svc.cluster.local")


INDEX = _index()
INDEX_NO_WILDCARDS = _index(wildcards=False)  # A/AAAA misses take plain_miss's shortcut only without wildcards
NAMES = [
    "details",
    "details.ns1",
    "DETAILS.ns1.svc",
    "many.example.com",
    "dual.example.com",
    "a.b.wild.example.com",
    "many.example.com.ns1.svc.cluster.local",
    "unknown.example.net",
]
QTYPES = ["A", "AAAA", "MX", "TXT", "ANY", "SRV"]


def seed_query(name: str, qtype: str, edns: int | None, qid: int) -> bytes:
    # Built without DNSRecord.question(), which draws its ID from the random module.
    rec = dnslib.DNSRecord(dnslib.DNSHeader(id=qid, rd=1), q=dnslib.DNSQuestion(name, getattr(dnslib.QTYPE, qtype)))
    if edns is not None:
        rec.add_ar(dnslib.EDNS0(udp_len=edns))
    return bytes(rec.pack())


seeds = st.one_of(
    st.builds(
        seed_query,
        st.sampled_from(NAMES),
        st.sampled_from(QTYPES),
        st.one_of(st.none(), st.integers(0, 65535)),
        st.integers(0, 65535),
    ),
    st.binary(min_size=0, max_size=80),
    st.builds(
        lambda head, tail: head + tail,
        st.binary(min_size=12, max_size=12),
        st.lists(st.sampled_from([b"\x00", b"\xc0\x0c", b"\xc0\x10", b"\x01a", b"\x3f", b"\x00\x01\x00\x01"])).map(
            b"".join
        ),
    ),
)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(7)
        if op == 0 and buf:  # flip a bit
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:  # truncate
            del buf[rnd.randrange(len(buf)) :]
        elif op == 2:  # splice random bytes
            i = rnd.randrange(len(buf) + 1)
            buf[i:i] = rnd.randbytes(rnd.randint(1, 6))
        elif op == 3 and len(buf) >= 12:  # header counts
            struct.pack_into(">H", buf, 4 + 2 * rnd.randrange(4), rnd.choice([0, 1, 2, 3, 0xFFFF]))
        elif op == 4 and len(buf) > 12:  # a length byte or pointer
            i = rnd.randrange(12, len(buf))
            buf[i] = rnd.choice([0, 1, 63, 64, 0xC0, 0xFF])
        elif op == 5 and len(buf) >= 4:  # flags
            buf[2], buf[3] = rnd.randrange(256), rnd.randrange(256)
        elif op == 6:  # duplicate a tail (two OPTs, trailing junk)
            buf += buf[rnd.randrange(len(buf) + 1) :]
    return bytes(buf)


def check_shortcuts(data: bytes) -> None:
    for index, outcome in ((INDEX, Outcome.MISS), (INDEX_NO_WILDCARDS, Outcome.MISS), (None, Outcome.UNSYNCED)):
        limit = plain_miss(index, data)
        if limit is not None:
            decision = handle(index, data, False)
            assert decision.outcome is outcome and decision.message is not None
            assert limit == wire.udp_limit(decision.message.edns_size)
    try:
        wire.parse_message(data)
        parsed = ""
    except wire.FormatError as err:
        parsed = str(err)
    try:
        wire.check_reply(data)
        checked = ""
    except wire.FormatError as err:
        checked = str(err)
    assert bool(checked) <= bool(parsed), (checked, parsed)
    assert bool(checked) == bool(parsed) or "OPT" in parsed, (checked, parsed)


def check(data: bytes, tcp: bool, rnd: random.Random) -> None:
    decision = handle(INDEX, data, tcp, lambda: rnd.getrandbits(16))
    reply = decision.reply
    if decision.outcome in (Outcome.MISS, Outcome.UNSYNCED):
        assert reply is None and decision.message is not None
        assert decision.message.qdcount == 1
        return
    if reply is None:
        assert decision.outcome is Outcome.DROP
        return
    assert reply[:2] == data[:2]
    assert reply[2] & 0x80, "a reply must be a response"
    if not tcp:
        assert len(reply) <= max(512, wire.MAX_MSG_SIZE)
    msg = wire.parse_message(reply)
    if msg.ancount:
        assert decision.outcome is Outcome.HIT
        assert msg.qdcount == 1
        query = wire.parse_message(data)
        assert msg.qname == query.qname and msg.qtype == query.qtype
    if decision.outcome is Outcome.HIT and not tcp:
        query = wire.parse_message(data)
        assert len(reply) <= wire.udp_limit(query.edns_size)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=seeds, rnd=st.randoms(use_true_random=False))
def test_handler_never_crashes_and_never_answers_without_question(seed: bytes, rnd: random.Random) -> None:
    for packet in [seed] + [mutate(seed, rnd) for _ in range(MUTATIONS - 1)]:
        check(packet, False, rnd)
        check(packet, True, rnd)
        check_shortcuts(packet)


def test_fuzz_budget_is_at_least_100k_packets() -> None:
    assert EXAMPLES * MUTATIONS * 2 >= 100_000
