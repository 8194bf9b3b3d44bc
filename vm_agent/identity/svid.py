"""The workload certificate (SVID) we hold, the trust bundle, and when to rotate (istio-agent.md §4.4, §4.5)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from vm_agent.identity.der import CertificateFacts, DerError, certificate_facts, pem_blocks, private_key_public_part

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.S)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


class ChainError(ValueError):
    """The CA's answer or a persisted file is not a usable certificate chain (message says which and why)."""


def split_pem_certs(data: bytes) -> list[bytes]:
    """Every PEM certificate block in ``data``, normalised to end with one newline."""
    return [m.group(0).replace(b"\r\n", b"\n") + b"\n" for m in _PEM_CERT.finditer(data)]


def merge_bundles(*bundles: bytes) -> bytes:
    """Union of the certificates in ``bundles``, de-duplicated and sorted as PEM text (what istio serves as ROOTCA)."""
    certs: set[bytes] = set()
    for bundle in bundles:
        certs.update(split_pem_certs(bundle))
    return b"".join(sorted(certs))


def spiffe_uris(leaf: CertificateFacts) -> list[str]:
    return [u for u in leaf.uris if u.startswith("spiffe://")]


@dataclass(frozen=True)
class Svid:
    """Our workload key and certificate chain (leaf first; root included, as istiod returns it)."""

    key_pem: bytes
    chain_pem: bytes
    leaf: CertificateFacts
    root_pem: bytes
    """The last element of the CA's answer (istiod's root bundle)."""
    created_at: datetime
    """When we obtained it; rotation is planned from here (istio's CreatedTime)."""

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_before

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_after

    @property
    def spiffe_id(self) -> str | None:
        uris = spiffe_uris(self.leaf)
        return uris[0] if uris else None

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after

    @classmethod
    def from_pems(cls, key_pem: bytes, chain_pem: bytes, *, created_at: datetime | None = None) -> Svid:
        """Parse and cross-check a key and chain; ``ChainError`` says what is wrong."""
        certs = split_pem_certs(chain_pem)
        if not certs:
            raise ChainError("certificate chain holds no PEM certificate")
        try:
            leaf = certificate_facts(pem_blocks(certs[0])[0][1])
        except (DerError, IndexError) as exc:
            raise ChainError(f"leaf certificate does not parse: {exc}") from exc
        try:
            key = private_key_public_part(key_pem)
        except DerError as exc:
            # Never echo the key material; the kind of failure is enough.
            if "unsupported key type" in str(exc):
                raise ChainError(str(exc)) from exc
            raise ChainError("private key does not parse as an unencrypted PEM key") from exc
        if key != leaf.public_key:
            raise ChainError("private key does not match the leaf certificate")
        return cls(
            key_pem=key_pem,
            chain_pem=chain_pem,
            leaf=leaf,
            root_pem=certs[-1] if len(certs) > 1 else b"",
            created_at=created_at or leaf.not_before,
        )

    @classmethod
    def from_ca_response(cls, key_pem: bytes, cert_chain: Iterable[str], *, now: datetime | None = None) -> Svid:
        """Build from ``IstioCertificateResponse.cert_chain`` (leaf ... root, each its own element)."""
        elements = list(cert_chain)
        if len(elements) < 2:
            raise ChainError(
                f"CA returned an empty certificate chain ({len(elements)} element(s); expected leaf and root)"
            )
        # Each element starts on its own line, as istio's agent concatenates them.
        chain = b"".join(e.encode() if e.endswith("\n") else e.encode() + b"\n" for e in elements)
        svid = cls.from_pems(key_pem, chain, created_at=now or datetime.now(UTC))
        root = elements[-1].encode()
        if not split_pem_certs(root):
            raise ChainError("CA returned a chain whose last element (the root) holds no PEM certificate")
        return Svid(svid.key_pem, svid.chain_pem, svid.leaf, root, svid.created_at)


def rotation_ratio(grace_ratio: float, jitter: float, rng: random.Random | None = None) -> float:
    """istio's grace ratio plus a uniform jitter in [0, jitter) with a random sign, clamped to [0, 1]."""
    r = rng or random
    jit = r.uniform(0, jitter) if jitter > 0 else 0.0
    if r.random() < 0.5:
        jit = -jit
    return min(1.0, max(0.0, grace_ratio + jit))


def rotation_delay(created_at: datetime, expires_at: datetime, now: datetime, ratio: float) -> timedelta:
    """How long until a certificate is renewed: ``ratio`` of its lifetime before expiry, never negative.

    ratio 0.5 of a 1 h certificate → 30 min after issue; 1 → at once; 0 → at expiry.
    """
    lifetime = expires_at - created_at
    due = expires_at - lifetime * ratio
    return max(timedelta(0), due - now)
