"""Throwaway certificates for the xDS tests: a root, istiod's serving certificate and a workload SVID."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ISTIOD_NAME = "istiod.istio-system.svc"
SPIFFE_ID = "spiffe://cluster.local/ns/vm-ns/sa/vm-sa"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, san: x509.GeneralName, ca: bool = False
) -> tuple[bytes, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xds-test")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return _key_pem(key), builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class XdsPki:
    root_pem: bytes
    server_key_pem: bytes
    server_cert_pem: bytes
    client_key_pem: bytes
    client_cert_pem: bytes
    root_path: Path

    @classmethod
    def create(cls, folder: Path) -> XdsPki:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xds-test root")])
        now = dt.datetime.now(dt.UTC)
        root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        server_key, server_cert = _issue(ca_key, name, x509.DNSName(ISTIOD_NAME))
        client_key, client_cert = _issue(ca_key, name, x509.UniformResourceIdentifier(SPIFFE_ID))
        root_pem = root.public_bytes(serialization.Encoding.PEM)
        folder.mkdir(parents=True, exist_ok=True)
        root_path = folder / "root-cert.pem"
        root_path.write_bytes(root_pem)
        return cls(
            root_pem=root_pem,
            server_key_pem=server_key,
            server_cert_pem=server_cert.public_bytes(serialization.Encoding.PEM),
            client_key_pem=client_key,
            client_cert_pem=client_cert.public_bytes(serialization.Encoding.PEM),
            root_path=root_path,
        )
