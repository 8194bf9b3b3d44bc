"""DNS wire format: strict message parsing, reply headers and miekg-style truncation.

Only what the proxy needs: it never builds message objects for table hits (see ``index``), so this
module works on bytes.  Parsing is defensive because every byte comes from an untrusted client or
upstream: lengths are bounds-checked, compression pointers must point strictly backwards (no loops)
and names are capped at 255 octets, so a hostile packet costs O(len(packet)) and never raises
anything but ``FormatError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
CLASS_IN = 1

OPCODE_QUERY = 0
OPCODE_NOTIFY = 4

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

HEADER_LEN = 12
MIN_UDP_SIZE = 512
MAX_MSG_SIZE = 65535
MAX_NAME_LEN = 255
MAX_LABEL_LEN = 63
TTL = 30

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_CD = 0x0010

_HEADER = struct.Struct(">HHHHHH")
_RR_FIXED = struct.Struct(">HHIH")


class FormatError(ValueError):
    """The packet is not a well-formed DNS message."""


@dataclass(frozen=True, slots=True)
class Message:
    """The parts of a parsed message the proxy looks at."""

    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int
    qname: bytes  # first question's name, uncompressed wire form, in the sender's case (b"" if none)
    qtype: int
    qclass: int
    edns_size: int | None  # UDP payload size from the OPT record, None without EDNS0

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    def question_bytes(self) -> bytes:
        return self.qname + struct.pack(">HH", self.qtype, self.qclass)


def _pointer_target(data: bytes, pos: int, floor: int) -> int:
    """Where the compression pointer at ``pos`` leads. A pointer must go strictly backwards from the lowest
    position seen so far (``floor``); that bounds the jumps by the packet length and makes loops impossible."""
    if pos + 1 >= len(data):
        raise FormatError(f"compression pointer at offset {pos} is cut off")
    target = ((data[pos] & 0x3F) << 8) | data[pos + 1]
    if target >= floor:
        raise FormatError(f"compression pointer at offset {pos} points forward or loops (to {target})")
    return target


def read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """Decode the (possibly compressed) name at ``offset``.

    Returns the uncompressed wire form and the offset just past the name in the packet.
    """
    out = bytearray()
    end = -1
    pos = offset
    floor = offset  # see _pointer_target
    size = len(data)
    while True:
        if pos >= size:
            raise FormatError(f"name at offset {offset} runs past the end of the packet ({size} bytes)")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if end < 0:
                end = pos + 2
            floor = pos = _pointer_target(data, pos, floor)
            continue
        if kind != 0:
            raise FormatError(f"label type 0x{kind:02x} at offset {pos} is not supported (expected length or pointer)")
        if length == 0:
            out.append(0)
            if len(out) > MAX_NAME_LEN:
                raise FormatError(f"name at offset {offset} is longer than {MAX_NAME_LEN} octets")
            return bytes(out), (end if end >= 0 else pos + 1)
        if pos + 1 + length > size:
            raise FormatError(f"label at offset {pos} (length {length}) runs past the end of the packet")
        out += data[pos : pos + 1 + length]
        if len(out) >= MAX_NAME_LEN:
            raise FormatError(f"name at offset {offset} is longer than {MAX_NAME_LEN} octets")
        pos += 1 + length


def parse_message(data: bytes) -> Message:
    """Parse the header, the first question and skim every RR (to find EDNS0 and reject garbage)."""
    if len(data) < HEADER_LEN:
        raise FormatError(f"packet of {len(data)} bytes is shorter than the {HEADER_LEN}-byte header")
    msg_id, flags, qd, an, ns, ar = _HEADER.unpack_from(data, 0)
    pos = HEADER_LEN
    qname = b""
    qtype = qclass = 0
    for i in range(qd):
        name, pos = read_name(data, pos)
        if pos + 4 > len(data):
            raise FormatError(f"question {i} is cut off at offset {pos}")
        if i == 0:
            qname = name
            qtype, qclass = struct.unpack_from(">HH", data, pos)
        pos += 4
    edns_size: int | None = None
    for section, count in ((0, an), (1, ns), (2, ar)):
        for _ in range(count):
            name, pos = read_name(data, pos)
            if pos + 10 > len(data):
                raise FormatError(f"resource record is cut off at offset {pos}")
            rtype, rclass, _ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
            pos += 10 + rdlen
            if pos > len(data):
                raise FormatError(f"rdata of type {rtype} runs past the end of the packet")
            if section == 2 and rtype == TYPE_OPT:
                if name != b"\x00":
                    raise FormatError("OPT record owner is not the root name")
                if edns_size is not None:
                    raise FormatError("more than one OPT record")
                edns_size = rclass
    return Message(msg_id, flags, qd, an, ns, ar, qname, qtype, qclass, edns_size)


def _skip_name(data: bytes, pos: int) -> int:
    """The offset just past the name at ``pos``, checked like ``read_name`` but without building it."""
    size = len(data)
    end = -1
    floor = pos
    octets = 0
    while True:
        if pos >= size:
            raise FormatError(f"name at offset {floor} runs past the end of the packet ({size} bytes)")
        length = data[pos]
        if length == 0:
            return end if end >= 0 else pos + 1
        if length < 0x40:
            octets += 1 + length
            if octets >= MAX_NAME_LEN or pos + 1 + length > size:
                raise FormatError(f"label at offset {pos} is too long or runs past the end of the packet")
            pos += 1 + length
        elif length >= 0xC0:
            if end < 0:
                end = pos + 2
            floor = pos = _pointer_target(data, pos, floor)
        else:
            raise FormatError(f"label type 0x{length & 0xC0:02x} at offset {pos} is not supported")


def check_reply(data: bytes) -> None:
    """``FormatError`` unless ``data`` is a whole DNS message: what an upstream must send to count as
    an answer (miekg/dns unpacks it).  The same checks as ``parse_message``, without building names."""
    if len(data) < HEADER_LEN:
        raise FormatError(f"packet of {len(data)} bytes is shorter than the {HEADER_LEN}-byte header")
    _id, _flags, qd, an, ns, ar = _HEADER.unpack_from(data, 0)
    pos = HEADER_LEN
    size = len(data)
    for _ in range(qd):
        pos = _skip_name(data, pos) + 4
        if pos > size:
            raise FormatError(f"question is cut off at offset {pos - 4}")
    for _ in range(an + ns + ar):
        pos = _skip_name(data, pos)
        if pos + 10 > size:
            raise FormatError(f"resource record is cut off at offset {pos}")
        pos += 10 + ((data[pos + 8] << 8) | data[pos + 9])
        if pos > size:
            raise FormatError("rdata runs past the end of the packet")


def udp_limit(edns_size: int | None) -> int:
    """The largest UDP reply the client accepts: its EDNS0 size, never below 512."""
    if edns_size is None or edns_size < MIN_UDP_SIZE:
        return MIN_UDP_SIZE
    return edns_size


def reply_flags(query_flags: int, rcode: int, authoritative: bool) -> int:
    """Header flags of a reply the way miekg/dns ``SetReply`` makes them (opcode kept, RD and CD
    copied only for QUERY), plus AA for names the mesh owns."""
    opcode = (query_flags >> 11) & 0xF
    flags = FLAG_QR | (opcode << 11) | (rcode & 0xF)
    if opcode == OPCODE_QUERY:
        flags |= query_flags & (FLAG_RD | FLAG_CD)
    if authoritative:
        flags |= FLAG_AA
    return flags


def error_reply(data: bytes, rcode: int) -> bytes | None:
    """Header-only reply (FORMERR, NOTIMP) for a packet whose question cannot be trusted.

    Returns None when not even the ID is readable; such packets are dropped.
    """
    if len(data) < 4:
        return None
    query_flags = (data[2] << 8) | data[3]
    opcode = (query_flags >> 11) & 0xF if rcode == RCODE_NOTIMP else OPCODE_QUERY
    flags = FLAG_QR | (opcode << 11) | (query_flags & (FLAG_RD | FLAG_CD)) | rcode
    return data[0:2] + struct.pack(">HHHHH", flags, 0, 0, 0, 0)


def simple_reply(msg: Message, rcode: int) -> bytes:
    """Reply with the question echoed and no records (SERVFAIL when forwarding failed)."""
    header = _HEADER.pack(msg.id, reply_flags(msg.flags, rcode, False), 1 if msg.qdcount else 0, 0, 0, 0)
    return header + (msg.question_bytes() if msg.qdcount else b"")


def rr_bytes(owner: bytes, rtype: int, rdata: bytes) -> bytes:
    return owner + _RR_FIXED.pack(rtype, CLASS_IN, TTL, len(rdata)) + rdata


Record = tuple[bytes, int, bytes]  # (owner wire, type, rdata); class IN, TTL 30


def pack_answer(msg: Message, flags: int, records: list[Record], limit: int) -> bytes:
    """Pack a reply with ``records`` in the answer section, fitted into ``limit`` bytes.

    Mirrors miekg/dns ``Msg.Truncate``: uncompressed if it fits; otherwise compress names, and if it
    still does not fit keep as many whole records as fit and set TC.
    """
    question = msg.question_bytes()
    body = b"".join(rr_bytes(o, t, r) for o, t, r in records)
    if HEADER_LEN + len(question) + len(body) <= limit:
        return _HEADER.pack(msg.id, flags, 1, len(records), 0, 0) + question + body
    out = bytearray(HEADER_LEN)
    table: dict[bytes, int] = {}
    _put_name(out, msg.qname, table)
    out += question[len(msg.qname) :]
    kept = 0
    if len(out) < limit:
        for owner, rtype, rdata in records:
            start = len(out)
            _put_name(out, owner, table)
            if rtype == TYPE_CNAME:
                fixed_at = len(out)
                out += b"\x00" * 10
                _put_name(out, rdata, table)
                _RR_FIXED.pack_into(out, fixed_at, rtype, CLASS_IN, TTL, len(out) - fixed_at - 10)
            else:
                out += _RR_FIXED.pack(rtype, CLASS_IN, TTL, len(rdata)) + rdata
            if len(out) > limit:
                del out[start:]
                # Suffixes registered by the dropped record point past the end now.
                for key in [k for k, v in table.items() if v >= start]:
                    del table[key]
                break
            kept += 1
    if kept < len(records):
        flags |= FLAG_TC
    _HEADER.pack_into(out, 0, msg.id, flags, 1, kept, 0, 0)
    return bytes(out)


def _put_name(out: bytearray, name: bytes, table: dict[bytes, int]) -> None:
    """Append ``name`` compressed against earlier names; matching is byte-exact (case-sensitive),
    like miekg/dns, so a lower-case owner never points at a client's mixed-case question."""
    pos = 0
    while name[pos] != 0:
        suffix = name[pos:]
        where = table.get(suffix)
        if where is not None:
            out += struct.pack(">H", 0xC000 | where)
            return
        if len(out) < 0x4000:
            table[suffix] = len(out)
        length = name[pos]
        out += name[pos : pos + 1 + length]
        pos += 1 + length
    out.append(0)


def name_to_text(name: bytes) -> str:
    """Presentation form of a wire name (for logs and /debug); not escaped beyond what we need."""
    labels: list[str] = []
    pos = 0
    while pos < len(name) and name[pos] != 0:
        length = name[pos]
        labels.append(name[pos + 1 : pos + 1 + length].decode("ascii", "backslashreplace"))
        pos += 1 + length
    return ".".join(labels) + "."


def text_to_name(text: str, where: str) -> bytes:
    """Wire form of a dotted host name; ``ValueError`` naming ``where`` if it cannot be one."""
    if not text or text == ".":
        raise ValueError(f"{where}: empty host name (expected a DNS name such as 'svc.ns.svc.cluster.local')")
    body = text[:-1] if text.endswith(".") else text
    out = bytearray()
    for label in body.split("."):
        if not label:
            raise ValueError(f"{where}: host name {text!r} has an empty label")
        try:
            raw = label.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: host name {text!r} is not ASCII (expected an IDNA/punycode name)") from None
        if len(raw) > MAX_LABEL_LEN:
            raise ValueError(f"{where}: label {label[:20]!r}... of {text!r} is longer than {MAX_LABEL_LEN} octets")
        if any(c <= 0x20 or c == 0x7F or c == 0x5C for c in raw):
            raise ValueError(f"{where}: host name {text!r} contains whitespace, control characters or '\\'")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME_LEN:
        raise ValueError(f"{where}: host name {text[:40]!r}... is longer than {MAX_NAME_LEN} octets on the wire")
    return bytes(out)
