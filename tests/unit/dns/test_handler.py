"""Packet → decision: fast path equals the general path, header rules, sizes, malformed input."""

from __future__ import annotations

import itertools

import dnslib
import pytest

from vm_agent.dns import wire
from vm_agent.dns.handler import Outcome, fast_reply, handle, plain_miss
from vm_agent.dns.index import NameIndex, build_index
from vm_agent.proto import nds_pb2


def make_index() -> NameIndex:
    t = nds_pb2.NameTable()
    for host, ips in {
        "one.example.com": ["10.0.0.1"],
        "four.example.com": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
        "dual.example.com": ["10.0.0.5", "fd00::5"],
        "*.wild.example.com": ["10.0.0.6"],
        "big.example.com": [f"10.1.0.{i}" for i in range(60)],
    }.items():
        t.table[host].ips.extend(ips)
        t.table[host].registry = "External"
    return build_index(t, ("ns1.svc.cluster.local",), "ns1", "svc.cluster.local")


INDEX = make_index()


def q(name: str, qtype: str = "A", edns: int | None = None, qid: int = 0x4242, rd: bool = True) -> bytes:
    rec = dnslib.DNSRecord.question(name, qtype)
    rec.header.id = qid
    rec.header.rd = int(rd)
    if edns is not None:
        rec.add_ar(dnslib.EDNS0(udp_len=edns))
    return bytes(rec.pack())


def ids(start: int = 7) -> itertools.count[int]:
    return itertools.count(start)


@pytest.mark.parametrize(
    ("name", "qtype", "edns"),
    [
        ("one.example.com", "A", None),
        ("ONE.Example.COM", "A", None),
        ("one.example.com", "AAAA", None),
        ("four.example.com", "A", None),
        ("Four.example.com", "A", 1232),
        ("dual.example.com", "AAAA", 4096),
        ("one.example.com.ns1.svc.cluster.local", "A", None),
    ],
)
def test_fast_path_equals_general_path(name: str, qtype: str, edns: int | None) -> None:
    data = q(name, qtype, edns)
    fast = fast_reply(INDEX.exact, data, False, ids().__next__)
    assert fast is not None
    slow = handle(INDEX, data, False, ids().__next__, try_fast=False)
    assert slow.outcome is Outcome.HIT
    assert fast == slow.reply


def test_reply_header_question_and_records() -> None:
    data = q("One.Example.Com", qid=0xBEEF)
    reply = handle(INDEX, data, False).reply
    assert reply is not None
    assert reply[:2] == b"\xbe\xef"
    parsed = dnslib.DNSRecord.parse(reply)
    h = parsed.header
    assert (h.qr, h.aa, h.rd, h.ra, h.tc, h.rcode) == (1, 1, 1, 0, 0, 0)
    assert reply[12 : 12 + len(data) - 12] == data[12:]  # question echoed byte for byte
    assert [(str(r.rname), r.ttl, str(r.rdata)) for r in parsed.rr] == [("one.example.com.", 30, "10.0.0.1")]
    no_rd = dnslib.DNSRecord.parse(handle(INDEX, q("one.example.com", rd=False), False).reply or b"")
    assert no_rd.header.rd == 0


def test_shuffle_uses_id_source() -> None:
    # Id() 3,4,5,... on four records gives Istio's [13,14,12,11] order (1-based: 3,4,2,1).
    reply = handle(INDEX, q("four.example.com"), False, itertools.count(3).__next__).reply
    order = [str(r.rdata) for r in dnslib.DNSRecord.parse(reply or b"").rr]
    assert order == ["10.0.0.3", "10.0.0.4", "10.0.0.2", "10.0.0.1"]


def test_wildcard_and_non_in_class_take_general_path() -> None:
    data = q("x.Wild.example.com")
    assert fast_reply(INDEX.exact, data, False, ids().__next__) is None
    d = handle(INDEX, data, False)
    parsed = dnslib.DNSRecord.parse(d.reply or b"")
    assert (str(parsed.rr[0].rname), str(parsed.rr[0].rdata)) == ("x.wild.example.com.", "10.0.0.6")
    chaos = bytearray(q("one.example.com"))
    chaos[-1] = 3  # class CH: Istio ignores the class
    assert handle(INDEX, bytes(chaos), False).outcome is Outcome.HIT


def test_sizes_udp_512_edns_and_tcp() -> None:
    plain = handle(INDEX, q("big.example.com"), False).reply or b""
    assert len(plain) <= 512 and dnslib.DNSRecord.parse(plain).header.tc == 1
    edns = handle(INDEX, q("big.example.com", edns=2048), False).reply or b""
    assert len(dnslib.DNSRecord.parse(edns).rr) == 60
    # EDNS size below 512 counts as 512.
    tiny = handle(INDEX, q("big.example.com", edns=100), False).reply or b""
    assert 400 < len(tiny) <= 512
    tcp = handle(INDEX, q("big.example.com"), True).reply or b""
    assert len(dnslib.DNSRecord.parse(tcp).rr) == 60 and len(tcp) > 512


def test_not_ours_is_forwarded_and_unsynced_before_table() -> None:
    for name, qtype in (("other.example.net", "A"), ("one.example.com", "MX"), ("one.example.com", "TXT")):
        d = handle(INDEX, q(name, qtype), False)
        assert d.outcome is Outcome.MISS and d.message is not None and d.reply is None
    d = handle(None, q("one.example.com"), False)
    assert d.outcome is Outcome.UNSYNCED


@pytest.mark.parametrize(
    ("mutate", "outcome", "rcode"),
    [
        (lambda d: d[:11], Outcome.DROP, None),
        (lambda d: d[:2] + bytes([d[2] | 0x80]) + d[3:], Outcome.DROP, None),  # a response
        (lambda d: d[:2] + bytes([2 << 3]) + d[3:], Outcome.NOTIMP, 4),  # opcode STATUS
        (lambda d: d[:4] + b"\x00\x00" + d[6:], Outcome.FORMERR, 1),  # no question
        (lambda d: d[:4] + b"\x00\x02" + d[6:] + d[12:], Outcome.FORMERR, 1),  # two questions
        (lambda d: d[:10] + b"\x00\x03" + d[12:], Outcome.FORMERR, 1),  # arcount 3
        (lambda d: d[:12] + b"\xc0\x0c\x00\x01\x00\x01", Outcome.FORMERR, 1),  # pointer loop
        (lambda d: d[:12] + b"\x3fabc", Outcome.FORMERR, 1),  # label past the end
        (lambda d: d[:-2], Outcome.FORMERR, 1),  # question cut
        (lambda d: d[:10] + b"\x00\x01" + d[12:], Outcome.FORMERR, 1),  # announced OPT missing
    ],
)
def test_malformed_packets(mutate: object, outcome: Outcome, rcode: int | None) -> None:
    data = mutate(q("one.example.com"))  # type: ignore[operator]
    d = handle(INDEX, data, False)
    assert d.outcome is outcome
    if rcode is None:
        assert d.reply is None
    else:
        assert d.reply is not None and d.reply[:2] == data[:2] and d.reply[3] & 0xF == rcode
        assert d.reply[4:12] == b"\x00" * 8  # no question, no records


def test_notify_opcode_answered_without_rd() -> None:
    data = bytearray(q("one.example.com"))
    data[2] = (4 << 3) | 1
    d = handle(INDEX, bytes(data), False)
    assert d.outcome is Outcome.HIT
    reply = d.reply or b""
    assert (reply[2] >> 3) & 0xF == 4 and reply[2] & 1 == 0


def test_truncated_fast_path_defers_to_general_path() -> None:
    # An answer larger than the client's size is never sent from the fast path.
    assert fast_reply(INDEX.exact, q("big.example.com"), False, ids().__next__) is None
    assert fast_reply(INDEX.exact, q("big.example.com"), True, ids().__next__) is not None
    assert wire.parse_message(handle(INDEX, q("big.example.com"), False).reply or b"").qdcount == 1


def test_plain_miss_is_the_forwarders_shortcut_for_names_not_ours() -> None:
    plain = make_plain_index()
    # Not in the table: forward, with the client's UDP size (never below 512).
    assert plain_miss(plain, q("other.example.net")) == 512
    assert plain_miss(plain, q("other.example.net", edns=1232)) == 1232
    assert plain_miss(plain, q("other.example.net", edns=100)) == 512
    assert plain_miss(plain, q("one.example.com", "MX")) == 512  # only A/AAAA are answered from the table
    assert plain_miss(None, q("one.example.com")) == 512  # no table yet
    # Ours, or for the general path to decide.
    for data in (q("one.example.com"), q("ONE.example.com"), q("one.example.com", "AAAA"), q("x", edns=4096)[:-1]):
        assert plain_miss(plain, data) is None
    chaos = bytearray(q("other.example.net"))
    chaos[-1] = 3  # class CH: Istio ignores the class, so handle() looks the name up
    assert plain_miss(plain, bytes(chaos)) is None
    compressed = q("x")[:12] + b"\x01x\xc0\x0c\x00\x01\x00\x01"
    assert plain_miss(plain, compressed) is None
    assert plain_miss(INDEX, q("other.example.net")) is None  # a table with wildcards: handle() decides


def make_plain_index() -> NameIndex:
    t = nds_pb2.NameTable()
    t.table["one.example.com"].ips.append("10.0.0.1")
    t.table["one.example.com"].registry = "External"
    return build_index(t, (), "ns1", "svc.cluster.local")
