"""Key/CSR shape, chain parsing, trust bundle merging, rotation timing and atomic persistence."""

from __future__ import annotations

import datetime as dt
import os
import random
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from tests.unit.identity.pki import ThrowawayCA
from vm_agent.identity.csr import generate_key_and_csr, spiffe_id
from vm_agent.identity.store import atomic_write, read_svid_files, write_svid_files
from vm_agent.identity.svid import ChainError, Svid, merge_bundles, rotation_delay, rotation_ratio, split_pem_certs

URI = spiffe_id("cluster.local", "ns1", "sa1")


def test_spiffe_id() -> None:
    assert URI == "spiffe://cluster.local/ns/ns1/sa/sa1"


def test_default_rsa_csr_matches_istio() -> None:
    key_pem, csr_pem = generate_key_and_csr(URI)
    assert key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    key = csr.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == ""
    assert len(csr.subject) == 1
    assert len(csr.extensions) == 1
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [URI]
    assert san.value.get_values_for_type(x509.DNSName) == []


@pytest.mark.parametrize(
    ("curve", "header", "pkcs8"), [("P256", b"EC PRIVATE KEY", False), ("P384", b"PRIVATE KEY", True)]
)
def test_ecdsa_and_pkcs8(curve: str, header: bytes, pkcs8: bool) -> None:
    key_pem, csr_pem = generate_key_and_csr(URI, key_algorithm="ECDSA", ec_curve=curve, pkcs8=pkcs8)
    assert key_pem.startswith(b"-----BEGIN " + header + b"-----")
    pub = x509.load_pem_x509_csr(csr_pem).public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.curve.name == {"P256": "secp256r1", "P384": "secp384r1"}[curve]


def test_fresh_key_every_time() -> None:
    a, _ = generate_key_and_csr(URI, key_algorithm="ECDSA")
    b, _ = generate_key_and_csr(URI, key_algorithm="ECDSA")
    assert a != b


def test_bad_key_settings_are_named() -> None:
    with pytest.raises(ValueError, match="WORKLOAD_RSA_KEY_SIZE"):
        generate_key_and_csr(URI, rsa_key_size=1024)
    with pytest.raises(ValueError, match="ECC_CURVE"):
        generate_key_and_csr(URI, key_algorithm="ECDSA", ec_curve="P521")
    with pytest.raises(ValueError, match="DSA"):
        generate_key_and_csr(URI, key_algorithm="DSA")


def _issue(ca: ThrowawayCA, ttl: dt.timedelta = dt.timedelta(hours=1)) -> tuple[bytes, list[str]]:
    key_pem, csr_pem = generate_key_and_csr(URI, key_algorithm="ECDSA")
    leaf = ca.sign_csr(csr_pem, URI, ttl)
    return key_pem, [leaf.decode().rstrip("\n") + "\n", ca.pem.decode()]


def test_svid_from_ca_response() -> None:
    ca = ThrowawayCA.create()
    key_pem, chain = _issue(ca)
    svid = Svid.from_ca_response(key_pem, chain)
    assert svid.spiffe_id == URI
    assert svid.root_pem == ca.pem
    assert split_pem_certs(svid.chain_pem)[-1] == ca.pem  # the served chain includes the root, like istio's
    assert svid.valid_at(dt.datetime.now(dt.UTC))
    assert not svid.valid_at(svid.not_after)
    with pytest.raises(ChainError, match="empty certificate chain"):
        Svid.from_ca_response(key_pem, chain[:1])
    other_key, _ = generate_key_and_csr(URI, key_algorithm="ECDSA")
    with pytest.raises(ChainError, match="does not match"):
        Svid.from_ca_response(other_key, chain)
    with pytest.raises(ChainError, match="private key does not parse") as err:
        Svid.from_pems(b"garbage", "".join(chain).encode())
    assert "garbage" not in str(err.value)


def test_merge_bundles_dedups_and_sorts() -> None:
    a, b = ThrowawayCA.create("a").pem, ThrowawayCA.create("b").pem
    merged = merge_bundles(b + a, a.replace(b"\n", b"\r\n"), b"junk")
    assert split_pem_certs(merged) == sorted([a, b])
    assert merge_bundles(a, a) == a


@pytest.mark.parametrize(
    ("ratio", "expected_minutes"),
    [(0.5, 30), (0.25, 45), (0.75, 15), (1.0, 0), (0.0, 60)],
)
def test_rotation_delay_matches_istio_examples(ratio: float, expected_minutes: int) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    delay = rotation_delay(now, now + dt.timedelta(hours=1), now, ratio)
    assert delay == dt.timedelta(minutes=expected_minutes)


def test_rotation_delay_never_negative() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert rotation_delay(now - dt.timedelta(hours=2), now - dt.timedelta(hours=1), now, 0.5) == dt.timedelta(0)


def test_rotation_ratio_jitter_bounds() -> None:
    rng = random.Random(7)
    ratios = [rotation_ratio(0.5, 0.01, rng) for _ in range(2000)]
    assert all(0.49 <= r <= 0.51 for r in ratios)
    assert min(ratios) < 0.5 < max(ratios)
    assert rotation_ratio(0.995, 0.5, random.Random(1)) <= 1.0
    assert rotation_ratio(0.5, 0.0) == 0.5


def test_atomic_write_modes_and_noop(tmp_path: Path) -> None:
    target = tmp_path / "state" / "key.pem"
    assert atomic_write(target, b"k1", 0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    inode = target.stat().st_ino
    assert not atomic_write(target, b"k1", 0o600)
    assert target.stat().st_ino == inode
    assert atomic_write(target, b"k2", 0o600)
    assert target.read_bytes() == b"k2"
    assert [p.name for p in target.parent.iterdir()] == ["key.pem"]  # no temp files left behind


def test_svid_files_round_trip(tmp_path: Path) -> None:
    assert read_svid_files(tmp_path) is None
    write_svid_files(tmp_path, b"KEY", b"CHAIN", b"ROOT")
    assert read_svid_files(tmp_path) == (b"KEY", b"CHAIN", b"ROOT")
    assert stat.S_IMODE(os.stat(tmp_path / "key.pem").st_mode) == 0o600
    (tmp_path / "cert-chain.pem").write_bytes(b"")
    assert read_svid_files(tmp_path) is None
