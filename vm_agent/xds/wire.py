"""Just enough of the protobuf wire format to route xDS messages without parsing them.

Envoy's messages pass through the proxy as bytes. To route a response we need its ``type_url`` and
``nonce``; to notice Envoy's first LDS request and its ACK/NACKs we need a few top-level request fields.
Reading those is a walk over the top-level fields that skips every length-delimited value (a 10 MB CDS
response is skipped resource by resource, never copied or decoded).

Field numbers (istio-agent.md §5.8):
* DiscoveryRequest: version_info=1, type_url=4, response_nonce=5, error_detail=6
* DiscoveryResponse: version_info=1, type_url=4, nonce=5
* DeltaDiscoveryRequest: type_url=2, response_nonce=6, error_detail=7
* DeltaDiscoveryResponse: system_version_info=1, type_url=4, nonce=5
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

_VARINT = 0
_I64 = 1
_LEN = 2
_SGROUP = 3
_EGROUP = 4
_I32 = 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


class Flavour(Enum):
    """Which ADS variant a stream speaks; the field numbers differ between the two."""

    SOTW = "sotw"
    DELTA = "delta"


def _varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(f"varint longer than 10 bytes at byte {pos}")


def _fields(
    buf: bytes | memoryview, wanted: frozenset[int], start: int = 0, end: int | None = None, *, first: bool = False
) -> dict[int, tuple[int, int]]:
    """Offsets ``(start, end)`` of the last occurrence of each wanted length-delimited top-level field.

    Unknown fields are skipped (newer Envoys send fields this reader has never heard of). The last
    occurrence wins, as protobuf says for singular fields (the first one, with ``first``: a repeated field's head).
    """
    if end is None:
        end = len(buf)
    found: dict[int, tuple[int, int]] = {}
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire_type == _LEN:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {number} runs past the end of the message ({stop} > {end})")
            if number in wanted and not (first and number in found):
                found[number] = (pos, stop)
            pos = stop
        elif wire_type == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _SGROUP:
            pos = _skip_group(buf, pos, end, number)
        else:
            raise WireError(f"unexpected wire type {wire_type} for field {number} at byte {pos}")
        if pos > end:
            raise WireError(f"field {number} runs past the end of the message")
    return found


def _skip_group(buf: bytes | memoryview, pos: int, end: int, number: int) -> int:
    while pos < end:
        key, pos = _varint(buf, pos, end)
        inner, wire_type = key >> 3, key & 7
        if wire_type == _EGROUP:
            if inner != number:
                raise WireError(f"group {number} closed by field {inner}")
            return pos
        if wire_type == _LEN:
            length, pos = _varint(buf, pos, end)
            pos += length
        elif wire_type == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _SGROUP:
            pos = _skip_group(buf, pos, end, inner)
        else:
            raise WireError(f"unexpected wire type {wire_type} in group {number}")
    raise WireError(f"group {number} is not closed")


def _text(buf: bytes, span: tuple[int, int] | None) -> str:
    if span is None:
        return ""
    try:
        return buf[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"string field at bytes {span[0]}..{span[1]} is not UTF-8") from exc


@dataclass(frozen=True)
class ResponseHead:
    """What the proxy needs from a (Delta)DiscoveryResponse: both flavours share the numbers."""

    type_url: str
    nonce: str
    version: str


_RESPONSE_FIELDS = frozenset({1, 4, 5})


def peek_response(buf: bytes) -> ResponseHead:
    """``type_url``, ``nonce`` and (system_)version_info of a SotW or Delta response."""
    found = _fields(memoryview(buf), _RESPONSE_FIELDS)
    return ResponseHead(
        type_url=_text(buf, found.get(4)), nonce=_text(buf, found.get(5)), version=_text(buf, found.get(1))
    )


@dataclass(frozen=True)
class RequestHead:
    """What the proxy needs from a request Envoy sent: its type, and whether it ACKs or NACKs."""

    type_url: str
    response_nonce: str
    error_message: str | None
    """``error_detail.message`` when the request is a NACK, else ``None``."""


_SOTW_REQUEST = (4, 5, 6)
_DELTA_REQUEST = (2, 6, 7)


def peek_request(buf: bytes, flavour: Flavour) -> RequestHead:
    type_f, nonce_f, error_f = _SOTW_REQUEST if flavour is Flavour.SOTW else _DELTA_REQUEST
    found = _fields(memoryview(buf), frozenset({type_f, nonce_f, error_f}))
    error: str | None = None
    span = found.get(error_f)
    if span is not None:
        # google.rpc.Status: code=1, message=2
        error = _text(buf, _fields(memoryview(buf), frozenset({2}), span[0], span[1]).get(2))
    return RequestHead(
        type_url=_text(buf, found.get(type_f)), response_nonce=_text(buf, found.get(nonce_f)), error_message=error
    )


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode("utf-8")) if value else b""


def string_field(number: int, value: str) -> bytes:
    """The exact bytes of a string field on the wire: what to search a message for without decoding it."""
    return _len_field(number, value.encode("utf-8"))


INTERNAL = 13
"""google.rpc.Code INTERNAL: what Istio's agent puts in a NACK and in an unhealthy report."""


def _status(code: int, message: str) -> bytes:
    # proto3 leaves zero values out; so must we, to match protobuf's bytes.
    head = _encode_varint(1 << 3 | _VARINT) + _encode_varint(code) if code else b""
    return head + _str_field(2, message)


def build_request(
    flavour: Flavour,
    type_url: str,
    *,
    version_info: str = "",
    response_nonce: str = "",
    error: tuple[int, str] | None = None,
) -> bytes:
    """A request the agent itself sends upstream: an NDS subscription, an ACK/NACK, a health report.

    Fields are written in field-number order like protobuf's own serializers. Delta has no version_info
    in requests, so ``version_info`` is ignored there.
    """
    if flavour is Flavour.SOTW:
        parts = [_str_field(1, version_info), _str_field(4, type_url), _str_field(5, response_nonce)]
        if error is not None:
            parts.append(_len_field(6, _status(*error)))
    else:
        parts = [_str_field(2, type_url), _str_field(6, response_nonce)]
        if error is not None:
            parts.append(_len_field(7, _status(*error)))
    return b"".join(parts)


def first_resource(buf: bytes, flavour: Flavour) -> tuple[str, bytes] | None:
    """(type_url, value) of a response's first resource (``resources``, field 2, in both flavours; in Delta the
    Any is a Resource's ``resource``, field 2), or ``None`` when there is none. Nothing is decoded."""
    span = _fields(buf, frozenset({2}), first=True).get(2)
    if span is None:
        return None
    if flavour is Flavour.DELTA:
        span = _fields(buf, frozenset({2}), *span).get(2, (span[0], span[0]))
    any_fields = _fields(buf, frozenset({1, 2}), *span)
    value = any_fields.get(2)
    return _text(buf, any_fields.get(1)), buf[value[0] : value[1]] if value else b""
