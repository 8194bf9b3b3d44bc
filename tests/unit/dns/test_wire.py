"""Wire parsing and packing: compression pointers, bounds, EDNS0, truncation."""

from __future__ import annotations

import dnslib
import pytest

from vm_agent.dns import wire


def query(name: str = "a.example.com", qtype: str = "A", edns: int | None = None) -> bytes:
    q = dnslib.DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(dnslib.EDNS0(udp_len=edns))
    return bytes(q.pack())


def test_parse_query_and_edns() -> None:
    msg = wire.parse_message(query("Mixed.Example.com", "AAAA", edns=1232))
    assert msg.qname == b"\x05Mixed\x07Example\x03com\x00"
    assert (msg.qtype, msg.qclass, msg.edns_size, msg.qdcount) == (28, 1, 1232, 1)
    assert wire.parse_message(query()).edns_size is None


def test_read_name_follows_backward_pointers() -> None:
    data = b"\x00" * 12 + b"\x03www\x07example\x03com\x00" + b"\x03api\xc0\x10"
    name, end = wire.read_name(data, 12 + 17)
    assert name == b"\x03api\x07example\x03com\x00"
    assert end == len(data)


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b"\xc0\x0c", "forward or loops"),  # points at itself
        (b"\x01a\xc0\x0e", "forward or loops"),  # points past its start
        (b"\x05ab", "past the end"),
        (b"\x40abc", "label type"),
        (b"\xc0", "cut off"),
        (b"", "past the end"),
    ],
)
def test_bad_names_raise_format_error(tail: bytes, message: str) -> None:
    data = b"\x00" * 12 + tail
    with pytest.raises(wire.FormatError, match=message):
        wire.read_name(data, 12)


def test_name_longer_than_255_rejected() -> None:
    data = b"\x00" * 12 + (b"\x3f" + b"a" * 63) * 4 + b"\x00"
    with pytest.raises(wire.FormatError, match="longer than 255"):
        wire.read_name(data, 12)


def test_parse_rejects_cut_rr_and_double_opt() -> None:
    q = query(edns=1232)
    with pytest.raises(wire.FormatError):
        wire.parse_message(q[:-3])
    doubled = q[:10] + b"\x00\x02" + q[12:] + q[-11:]
    with pytest.raises(wire.FormatError, match="more than one OPT"):
        wire.parse_message(doubled)


def test_pack_answer_uncompressed_when_it_fits_else_compressed_then_truncated() -> None:
    msg = wire.parse_message(query("huge.example.com"))
    owner = wire.text_to_name("huge.example.com", "t")
    flags = wire.reply_flags(msg.flags, 0, True)
    records = [(owner, wire.TYPE_A, bytes([10, 0, 0, i])) for i in range(10)]
    small = wire.pack_answer(msg, flags, records, 512)
    assert small.count(owner) == 11  # question + 10 owners, no pointers
    records = [(owner, wire.TYPE_A, bytes([10, 0, 1, i])) for i in range(60)]
    packed = wire.pack_answer(msg, flags, records, 512)
    parsed = dnslib.DNSRecord.parse(packed)
    assert len(packed) <= 512
    assert parsed.header.tc == 1 and parsed.header.aa == 1
    # Owners compressed to 2-byte pointers: 16 bytes per A record after 12 + 22 bytes.
    assert len(parsed.rr) == (512 - 12 - 22) // 16
    assert [str(r.rdata) for r in parsed.rr] == [f"10.0.1.{i}" for i in range(len(parsed.rr))]
    big = wire.pack_answer(msg, flags, records, 4096)
    assert len(dnslib.DNSRecord.parse(big).rr) == 60


def test_compression_is_case_sensitive_like_miekg() -> None:
    msg = wire.parse_message(query("HUGE.example.com"))
    owner = wire.text_to_name("huge.example.com", "t")
    records = [(owner, wire.TYPE_A, bytes([10, 0, 1, i])) for i in range(60)]
    parsed = dnslib.DNSRecord.parse(wire.pack_answer(msg, wire.reply_flags(msg.flags, 0, True), records, 512))
    assert str(parsed.q.qname) == "HUGE.example.com."
    assert {str(r.rname) for r in parsed.rr} == {"huge.example.com."}


def test_cname_target_compressed() -> None:
    msg = wire.parse_message(query("www.example.com.ns1.svc.cluster.local"))
    target = wire.text_to_name("www.example.com", "t")
    records = [(msg.qname, wire.TYPE_CNAME, target)] + [(target, wire.TYPE_A, bytes([10, 0, 2, i])) for i in range(40)]
    parsed = dnslib.DNSRecord.parse(wire.pack_answer(msg, 0x8400, records, 512))
    assert parsed.rr[0].rtype == dnslib.QTYPE.CNAME and str(parsed.rr[0].rdata) == "www.example.com."
    assert {str(r.rname) for r in parsed.rr[1:]} == {"www.example.com."}


def test_reply_flags_copy_rd_cd_for_query_only() -> None:
    assert wire.reply_flags(0x0110, 0, True) == 0x8000 | 0x0400 | 0x0100 | 0x0010
    notify = 4 << 11
    assert wire.reply_flags(notify | 0x0100, 2, False) == 0x8000 | notify | 2


def test_error_and_servfail_replies() -> None:
    q = query("x.example.com")
    formerr = wire.error_reply(q, wire.RCODE_FORMERR)
    assert formerr is not None and formerr[:2] == q[:2] and len(formerr) == 12 and formerr[3] & 0xF == 1
    assert wire.error_reply(b"\x01\x02", wire.RCODE_FORMERR) is None
    sf = dnslib.DNSRecord.parse(wire.simple_reply(wire.parse_message(q), wire.RCODE_SERVFAIL))
    assert sf.header.rcode == 2 and str(sf.q.qname) == "x.example.com." and sf.header.aa == 0


def test_text_to_name() -> None:
    assert wire.text_to_name("a.b.", "w") == b"\x01a\x01b\x00"
    assert wire.name_to_text(b"\x01a\x01b\x00") == "a.b."
    with pytest.raises(ValueError, match="where: empty host name"):
        wire.text_to_name("", "where")


def test_check_reply_accepts_messages_and_rejects_what_parse_rejects() -> None:
    rec = dnslib.DNSRecord.question("host.example.net")
    reply = rec.reply()
    reply.add_answer(dnslib.RR("host.example.net", rdata=dnslib.A("192.0.2.1")))
    good = bytes(reply.pack())
    assert b"\xc0\x0c" in good  # the answer's owner is a pointer to the question
    wire.check_reply(good)
    for bad in (
        good[:11],  # no whole header
        good[:-1],  # rdata cut
        good[:12] + b"\xc0\x0c" + good[14:],  # the question points at itself
        good[:12] + b"\x40" + good[13:],  # reserved label type
    ):
        with pytest.raises(wire.FormatError):
            wire.check_reply(bad)
