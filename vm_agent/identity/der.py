"""What the agent reads out of its certificate and key, straight from their DER encoding (X.509, RFC 5280;
PKCS#1, SEC1, PKCS#8): validity, SPIFFE URIs, and the public key, to check that a key belongs to a leaf.

Reading needs no cryptography: signatures are verified by Envoy and istiod, never here. Keeping this out
of the ``cryptography`` package keeps that library (~7 MiB of the agent's memory) out of the agent process;
making keys and CSRs happens in a short-lived helper instead (``vm_agent.identity.keygen``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime

_SEQUENCE = 0x30
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION = 0xA0  # [0] EXPLICIT in TBSCertificate; ECParameters in SEC1
_EXTENSIONS = 0xA3
_EC_PUBLIC_KEY = 0xA1  # [1] publicKey in SEC1's ECPrivateKey
_URI = 0x86  # GeneralName [6] uniformResourceIdentifier

_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
_EC_PUBLIC_KEY_OID = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1
_SUBJECT_ALT_NAME = bytes.fromhex("551d11")  # 2.5.29.17

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


class DerError(ValueError):
    """The bytes are not the DER structure expected; the message says where."""


@dataclass(frozen=True)
class PublicKey:
    """A public key reduced to what identifies it: ("rsa", modulus, exponent) or ("ec", curve OID, point)."""

    algorithm: str
    values: tuple[int | bytes, ...]


@dataclass(frozen=True)
class CertificateFacts:
    not_before: datetime
    not_after: datetime
    uris: tuple[str, ...]
    """The subjectAltName URIs, in order."""
    public_key: PublicKey


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the element at ``pos``."""
    if pos + 2 > end:
        raise DerError(f"truncated element at byte {pos}")
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte tag at byte {pos - 2}")
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > end:
            raise DerError(f"bad length at byte {pos - 1}")
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise DerError(f"element at byte {pos} runs past its container")
    return tag, pos, pos + length


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, vstart, vend = _tlv(buf, pos, end)
        out.append((tag, vstart, vend))
        pos = vend
    return out


def _expect(element: tuple[int, int, int], tag: int, what: str) -> tuple[int, int]:
    if element[0] != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, found 0x{element[0]:02x}")
    return element[1], element[2]


def _sequence(buf: bytes, start: int, end: int, what: str) -> list[tuple[int, int, int]]:
    tag, vstart, vend = _tlv(buf, start, end)
    if tag != _SEQUENCE:
        raise DerError(f"{what}: expected a SEQUENCE, found tag 0x{tag:02x}")
    return _children(buf, vstart, vend)


def _integer(buf: bytes, element: tuple[int, int, int], what: str) -> int:
    start, end = _expect(element, _INTEGER, what)
    return int.from_bytes(buf[start:end], "big", signed=True)


def _time(buf: bytes, element: tuple[int, int, int]) -> datetime:
    tag, start, end = element
    text = buf[start:end].decode("ascii", "replace")
    if tag == _UTC_TIME:
        match = re.fullmatch(r"(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)?Z", text)
        if match is None:
            raise DerError(f"bad UTCTime {text!r}")
        yy = int(match.group(1))
        year = 2000 + yy if yy < 50 else 1900 + yy
        month, day, hour, minute, second = (int(g or 0) for g in match.groups()[1:])
    elif tag == _GENERALIZED_TIME:
        match = re.fullmatch(r"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(?:\.\d+)?Z", text)
        if match is None:
            raise DerError(f"bad GeneralizedTime {text!r}")
        year, month, day, hour, minute, second = (int(g) for g in match.groups())
    else:
        raise DerError(f"validity: expected a time, found tag 0x{tag:02x}")
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise DerError(f"bad time {text!r}: {exc}") from exc


def _spki(buf: bytes, start: int, end: int) -> PublicKey:
    """SubjectPublicKeyInfo → PublicKey."""
    algorithm, bits = _children(buf, start, end)[:2]
    alg = _children(buf, *_expect(algorithm, _SEQUENCE, "public key algorithm"))
    oid = buf[slice(*_expect(alg[0], _OID, "public key algorithm"))]
    bstart, bend = _expect(bits, _BIT_STRING, "public key")
    key = buf[bstart + 1 : bend]  # after the unused-bits byte
    if oid == _RSA_ENCRYPTION:
        n, e = _sequence(key, 0, len(key), "RSA public key")[:2]
        return PublicKey("rsa", (_integer(key, n, "RSA modulus"), _integer(key, e, "RSA exponent")))
    if oid == _EC_PUBLIC_KEY_OID:
        curve = buf[slice(*_expect(alg[1], _OID, "EC curve"))]
        return PublicKey("ec", (curve, key))
    raise DerError("unsupported key type: expected RSA or ECDSA")


def spki_public_key(der: bytes) -> PublicKey:
    """The public key of a DER SubjectPublicKeyInfo (what a CSR or certificate carries)."""
    tag, start, end = _tlv(der, 0, len(der))
    _expect((tag, start, end), _SEQUENCE, "subjectPublicKeyInfo")
    return _spki(der, start, end)


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """(label, DER) of every PEM block in ``data``."""
    out = []
    for match in _PEM.finditer(data):
        try:
            out.append((match.group(1).decode(), base64.b64decode(match.group(2), validate=False)))
        except (binascii.Error, ValueError) as exc:
            raise DerError(f"PEM block {match.group(1).decode()!r} is not base64") from exc
    return out


def certificate_facts(der: bytes) -> CertificateFacts:
    """Validity, SAN URIs and public key of one DER certificate; ``DerError`` if it is not one."""
    cert = _sequence(der, 0, len(der), "certificate")
    if len(cert) != 3:
        raise DerError(f"certificate: expected 3 elements, found {len(cert)}")
    tbs = _children(der, *_expect(cert[0], _SEQUENCE, "tbsCertificate"))
    if tbs and tbs[0][0] == _VERSION:
        tbs = tbs[1:]
    if len(tbs) < 6:
        raise DerError("tbsCertificate: too few elements")
    _integer(der, tbs[0], "serial number")
    validity = _children(der, *_expect(tbs[3], _SEQUENCE, "validity"))
    if len(validity) != 2:
        raise DerError("validity: expected notBefore and notAfter")
    public_key = _spki(der, *_expect(tbs[5], _SEQUENCE, "subjectPublicKeyInfo"))
    uris: list[str] = []
    for tag, start, end in tbs[6:]:
        if tag != _EXTENSIONS:
            continue
        for extension in _sequence(der, start, end, "extensions"):
            fields = _children(der, *_expect(extension, _SEQUENCE, "extension"))
            if der[slice(*_expect(fields[0], _OID, "extension id"))] != _SUBJECT_ALT_NAME:
                continue
            vstart, vend = _expect(fields[-1], _OCTET_STRING, "subjectAltName")
            for gtag, gstart, gend in _sequence(der, vstart, vend, "subjectAltName"):
                if gtag == _URI:
                    uris.append(der[gstart:gend].decode("ascii", "replace"))
    return CertificateFacts(_time(der, validity[0]), _time(der, validity[1]), tuple(uris), public_key)


def _rsa_private(der: bytes) -> PublicKey:
    fields = _sequence(der, 0, len(der), "RSA private key")
    if len(fields) < 3:
        raise DerError("RSA private key: too few elements")
    return PublicKey("rsa", (_integer(der, fields[1], "RSA modulus"), _integer(der, fields[2], "RSA exponent")))


def _ec_private(der: bytes, curve: bytes | None) -> PublicKey:
    fields = _sequence(der, 0, len(der), "EC private key")
    point = None
    for tag, start, end in fields[2:]:
        if tag == _VERSION:
            curve = der[slice(*_expect(_tlv(der, start, end), _OID, "EC curve"))]
        elif tag == _EC_PUBLIC_KEY:
            bstart, bend = _expect(_tlv(der, start, end), _BIT_STRING, "EC public key")
            point = der[bstart + 1 : bend]
    if curve is None or point is None:
        raise DerError("EC private key does not name its curve and public key")
    return PublicKey("ec", (curve, point))


def private_key_public_part(pem: bytes) -> PublicKey:
    """The public half of an unencrypted PEM private key (PKCS#1 RSA, SEC1 EC, or PKCS#8 of either)."""
    blocks = [(label, der) for label, der in pem_blocks(pem) if label.endswith("PRIVATE KEY")]
    if not blocks:
        raise DerError("no PEM private key")
    label, der = blocks[0]
    if label == "RSA PRIVATE KEY":
        return _rsa_private(der)
    if label == "EC PRIVATE KEY":
        return _ec_private(der, None)
    if label != "PRIVATE KEY":
        raise DerError(f"{label} is not an unencrypted private key")
    fields = _sequence(der, 0, len(der), "PKCS#8 private key")
    if len(fields) < 3:
        raise DerError("PKCS#8 private key: too few elements")
    alg = _children(der, *_expect(fields[1], _SEQUENCE, "private key algorithm"))
    oid = der[slice(*_expect(alg[0], _OID, "private key algorithm"))]
    inner = der[slice(*_expect(fields[2], _OCTET_STRING, "private key"))]
    if oid == _RSA_ENCRYPTION:
        return _rsa_private(inner)
    if oid == _EC_PUBLIC_KEY_OID:
        return _ec_private(inner, der[slice(*_expect(alg[1], _OID, "EC curve"))])
    raise DerError("unsupported key type: expected RSA or ECDSA")
