"""What to do with one query packet: pure code, shared by the UDP and TCP servers and the fuzzer.

``handle`` decides between a reply from the NameIndex, an error reply, a drop, or forwarding the
packet upstream.  The common case — an exact table hit — never parses the message: the lower-cased
question name is a dict key and the reply is the client's ID and question spliced around bytes
precomputed by ``index``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vm_agent.dns import wire
from vm_agent.dns.index import IdSource, NameIndex, Prebuilt, random_id, shuffle


def _accepted_headers() -> dict[bytes, tuple[bytes, bool]]:
    """Header bytes 2..11 the fast path takes → (reply flags, has an OPT record).

    A standard QUERY (QR=0, opcode 0, RCODE 0) with one question, nothing in answer and authority,
    and at most the OPT record.  Enumerating them turns five checks into one dict lookup.
    """
    out: dict[bytes, tuple[bytes, bool]] = {}
    for hi in (0x00, 0x01):  # RD off/on (AA, TC set in a query: not ours to accept here)
        for lo in range(0, 0x100, 0x10):  # RA, Z, AD, CD combinations with RCODE 0
            # Like miekg/dns SetReply: QR, AA, RD and CD copied, nothing else.
            flags = bytes((0x84 | hi, lo & 0x10))
            for ar, opt in ((b"\x00\x00", False), (b"\x00\x01", True)):
                out[bytes((hi, lo)) + b"\x00\x01\x00\x00\x00\x00" + ar] = (flags, opt)
    return out


_ACCEPTED = _accepted_headers()
_OPT_HEAD = b"\x00\x00\x29"  # root owner + type OPT


class Outcome(enum.Enum):
    HIT = "hit"  # answered from the NameTable (records or NODATA)
    MISS = "miss"  # not ours: forward upstream
    UNSYNCED = "unsynced"  # no NameTable yet: forward upstream
    FORMERR = "formerr"
    NOTIMP = "notimp"
    DROP = "dropped"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reply: bytes | None = None  # HIT, FORMERR, NOTIMP
    message: wire.Message | None = None  # MISS, UNSYNCED: the parsed query, for SERVFAIL and sizing


def fast_reply(exact: dict[bytes, Prebuilt], data: bytes, tcp: bool, next_id: IdSource) -> bytes | None:
    """The reply for a plain A/AAAA/IN query of an exactly known name, or None for the slow path.

    Safe on any input: the question is only trusted after it matched a key byte for byte, and keys
    are valid questions, so a match proves the question is well formed.
    """
    accepted = _ACCEPTED.get(data[2:12])
    if accepted is None:
        return None
    end = data.find(0, 12)
    if end < 0:
        return None
    qend = end + 5
    question = data[12:qend]
    key = question.lower()
    answer = exact.get(key)
    if answer is None:
        return None
    flags, opt = accepted
    if opt:
        if data[qend : qend + 3] != _OPT_HEAD or len(data) < qend + 11:
            return None
        if len(data) != qend + 11 + ((data[qend + 9] << 8) | data[qend + 10]):
            return None
        limit = max((data[qend + 3] << 8) | data[qend + 4], wire.MIN_UDP_SIZE)
    elif len(data) != qend:
        return None
    else:
        limit = wire.MIN_UDP_SIZE
    if isinstance(answer, bytes):
        if question == key:
            reply = data[0:2] + flags + answer
        else:
            # Mixed case: the client's spelling of the question between counts and records.
            reply = b"".join((data[0:2], flags, answer[:8], question, answer[8 + len(key) :]))
    else:
        reply = b"".join((data[0:2], flags, answer.counts, question, answer.records(next_id)))
    if len(reply) > limit and not tcp:
        return None  # needs compression or TC: the general path does that
    return reply


def plain_miss(index: NameIndex | None, data: bytes) -> int | None:
    """The UDP reply size limit for a plain query the table does not answer (forward it as it is), or
    None when ``handle`` must decide.

    The cheap test the forwarder runs instead of parsing: the header ``fast_reply`` accepts, one
    uncompressed question that is whole, at most an OPT record, and a name the table does not own
    (an A/AAAA query against a table with wildcards, or of another class, goes to ``handle``).
    """
    accepted = _ACCEPTED.get(data[2:12])
    if accepted is None:
        return None
    size = len(data)
    pos = 12
    while True:
        if pos >= size:
            return None
        length = data[pos]
        if length == 0:
            break
        if length > wire.MAX_LABEL_LEN:
            return None  # a pointer (legal, rare in a question) or garbage: the parser decides
        pos += 1 + length
    qend = pos + 5
    if pos - 12 >= wire.MAX_NAME_LEN or qend > size:
        return None
    if (
        index is not None
        and data[pos + 1] == 0
        and data[pos + 2] in (wire.TYPE_A, wire.TYPE_AAAA)
        and (index.wildcards or data[pos + 3 : qend] != b"\x00\x01" or data[12:qend].lower() in index.exact)
    ):
        return None
    if not accepted[1]:
        return wire.MIN_UDP_SIZE if size == qend else None
    if data[qend : qend + 3] != _OPT_HEAD or size < qend + 11:
        return None
    if size != qend + 11 + ((data[qend + 9] << 8) | data[qend + 10]):
        return None
    return max((data[qend + 3] << 8) | data[qend + 4], wire.MIN_UDP_SIZE)


_HEADER_COUNTS = struct.Struct(">HHHH")


def handle(
    index: NameIndex | None, data: bytes, tcp: bool, next_id: IdSource = random_id, try_fast: bool = True
) -> Decision:
    """Decide what to do with one query (``data`` without the TCP length prefix).

    ``try_fast=False`` when the caller already tried ``fast_reply``.
    """
    if index is not None and try_fast:
        reply = fast_reply(index.exact, data, tcp, next_id)
        if reply is not None:
            return Decision(Outcome.HIT, reply)
    if len(data) < wire.HEADER_LEN or data[2] & 0x80:
        # No ID to answer to, or a response sent to us (possibly spoofed): stay silent.
        return Decision(Outcome.DROP)
    opcode = (data[2] >> 3) & 0xF
    if opcode not in (wire.OPCODE_QUERY, wire.OPCODE_NOTIFY):
        return Decision(Outcome.NOTIMP, wire.error_reply(data, wire.RCODE_NOTIMP))
    qd, an, ns, ar = _HEADER_COUNTS.unpack_from(data, 4)
    # The same acceptance rules as miekg/dns's default server (one question, at most one answer and
    # authority record, two additional).
    if qd != 1 or an > 1 or ns > 1 or ar > 2:
        return Decision(Outcome.FORMERR, wire.error_reply(data, wire.RCODE_FORMERR))
    try:
        msg = wire.parse_message(data)
    except wire.FormatError:
        return Decision(Outcome.FORMERR, wire.error_reply(data, wire.RCODE_FORMERR))
    if index is None:
        return Decision(Outcome.UNSYNCED, message=msg)
    records = index.lookup(msg.qname.lower(), msg.qtype)
    if records is None:
        return Decision(Outcome.MISS, message=msg)
    if len(records) > 1:
        cnames = [r for r in records if r[1] == wire.TYPE_CNAME]
        addrs = [r for r in records if r[1] != wire.TYPE_CNAME]
        shuffle(addrs, next_id)
        records = cnames + addrs
    limit = wire.MAX_MSG_SIZE if tcp else wire.udp_limit(msg.edns_size)
    flags = wire.reply_flags(msg.flags, wire.RCODE_NOERROR, True)
    return Decision(Outcome.HIT, wire.pack_answer(msg, flags, records, limit))


def servfail(msg: wire.Message) -> bytes:
    return wire.simple_reply(msg, wire.RCODE_SERVFAIL)
