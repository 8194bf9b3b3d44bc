from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers.fixtures import ISTIOCTL_FIXTURES

FIXTURES = ISTIOCTL_FIXTURES

FAKE_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"


def self_signed_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def fixture_copy(tmp_path: Path) -> FixtureFactory:
    return FixtureFactory(tmp_path)


class FixtureFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def __call__(self, name: str = "ipv4", *, valid: bool = True) -> Path:
        dest = self.tmp_path / name
        shutil.copytree(FIXTURES / name, dest)
        for f in dest.iterdir():
            f.chmod(0o644)
        if valid:
            (dest / "root-cert.pem").write_bytes(self_signed_pem())
            (dest / "istio-token").write_text(FAKE_JWT)
        (self.tmp_path / "resolv.conf").write_text("nameserver 127.0.0.53\nsearch corp.example\n")
        return dest

    @property
    def resolv_conf(self) -> Path:
        return self.tmp_path / "resolv.conf"
