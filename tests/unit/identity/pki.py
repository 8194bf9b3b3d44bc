"""A throwaway CA for identity tests: real keys and certificates made with ``cryptography``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ISTIOD_NAME = "istiod.istio-system.svc"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class ThrowawayCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "test root") -> ThrowawayCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, public_key: object, not_before: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )

    def issue_server(self, dns_name: str = ISTIOD_NAME) -> tuple[bytes, bytes]:
        """(key PEM, cert PEM) for a TLS server named ``dns_name``."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._builder(key.public_key(), _now() - dt.timedelta(minutes=5), _now() + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)

    def sign_csr(
        self, csr_pem: bytes, uri: str | None, ttl: dt.timedelta, *, backdate: dt.timedelta = dt.timedelta()
    ) -> bytes:
        """Sign ``csr_pem`` as a workload certificate; like istiod, the SAN is ours (``uri``), not the CSR's."""
        csr = x509.load_pem_x509_csr(csr_pem)
        start = _now() - backdate
        builder = self._builder(csr.public_key(), start - dt.timedelta(seconds=1), start + ttl)
        if uri is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue_workload(self, uri: str, ttl: dt.timedelta = dt.timedelta(hours=1)) -> tuple[bytes, bytes]:
        """(key PEM, leaf PEM) for a workload SVID; the caller appends the root for a full chain."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._builder(key.public_key(), _now() - dt.timedelta(minutes=1), _now() + ttl)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def make_jwt(payload: dict[str, object]) -> str:
    """An unsigned JWT-shaped token (the agent never verifies tokens; istiod does)."""
    import base64
    import json

    def seg(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'RS256', 'typ': 'JWT'})}.{seg(payload)}.c2lnbmF0dXJl"
