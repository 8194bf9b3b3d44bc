"""identity.der against certificates and keys the cryptography library makes (an independent encoder), and the
key helper process the agent asks for new keys."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from vm_agent.identity.der import (
    DerError,
    PublicKey,
    certificate_facts,
    pem_blocks,
    private_key_public_part,
    spki_public_key,
)
from vm_agent.identity.keygen import KeygenError, KeyMaker, KeySpec, make_key_and_csr
from vm_agent.identity.svid import ChainError, Svid

URI = "spiffe://cluster.local/ns/ns1/sa/sa1"
UTC = dt.UTC


def certificate(key: object, *, not_before: dt.datetime, not_after: dt.datetime, uris: list[str]) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("a.example"), *(x509.UniformResourceIdentifier(u) for u in uris)]
            ),
            critical=True,
        )
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())  # type: ignore[arg-type]


def spki(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
@pytest.mark.parametrize("fmt", ["traditional", "pkcs8"])
def test_facts_and_key_match_what_cryptography_encoded(kind: str, fmt: str) -> None:
    key = new_key(kind)
    # 2049 is past UTCTime's range: notAfter is then a GeneralizedTime.
    before, after = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC), dt.datetime(2049, 12, 31, tzinfo=UTC)
    for not_after in (after, dt.datetime(2051, 6, 7, 8, 9, 10, tzinfo=UTC)):
        cert = certificate(key, not_before=before, not_after=not_after, uris=[URI, "https://x.example/"])
        facts = certificate_facts(cert.public_bytes(serialization.Encoding.DER))
        assert (facts.not_before, facts.not_after) == (before, not_after)
        assert facts.uris == (URI, "https://x.example/")
        assert facts.public_key == spki_public_key(spki(key))
    private = serialization.PrivateFormat.PKCS8 if fmt == "pkcs8" else serialization.PrivateFormat.TraditionalOpenSSL
    pem = key.private_bytes(serialization.Encoding.PEM, private, serialization.NoEncryption())
    assert private_key_public_part(pem) == facts.public_key
    other = new_key(kind).private_bytes(serialization.Encoding.PEM, private, serialization.NoEncryption())
    assert private_key_public_part(other) != facts.public_key


def test_no_san_means_no_uris_and_rsa_key_is_modulus_and_exponent() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    cert = certificate(key, not_before=now, not_after=now + dt.timedelta(hours=1), uris=[])
    facts = certificate_facts(cert.public_bytes(serialization.Encoding.DER))
    assert facts.uris == ()
    assert facts.public_key == PublicKey("rsa", (key.public_key().public_numbers().n, 65537))


def test_what_is_not_a_usable_certificate_or_key_is_refused_by_name() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    der = certificate(key, not_before=now, not_after=now + dt.timedelta(hours=1), uris=[URI]).public_bytes(
        serialization.Encoding.DER
    )
    for broken in (der[:-10], der[:40], b"\x30\x03\x02\x01\x01", b"", b"\x04\x00"):
        with pytest.raises(DerError):
            certificate_facts(broken)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(DerError, match="not an unencrypted private key"):
        private_key_public_part(encrypted)
    with pytest.raises(DerError, match="no PEM private key"):
        private_key_public_part(b"not a key")
    edkey = ed25519.Ed25519PrivateKey.generate()
    ed_pem = edkey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(DerError, match="unsupported key type"):
        private_key_public_part(ed_pem)
    ed_cert = certificate(edkey, not_before=now, not_after=now + dt.timedelta(hours=1), uris=[URI])
    chain = ed_cert.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ChainError, match="unsupported key type"):
        Svid.from_pems(ed_pem, chain)
    assert pem_blocks(chain)[0][0] == "CERTIFICATE"


async def test_key_helper_makes_a_key_and_csr_for_the_spec() -> None:
    for spec in (KeySpec(URI), KeySpec(URI, key_algorithm="ECDSA", ec_curve="P384", pkcs8=True)):
        key_pem, csr_pem = await make_key_and_csr(spec)
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [URI]
        assert private_key_public_part(key_pem) == spki_public_key(
            csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        assert (b"BEGIN PRIVATE KEY" in key_pem) is spec.pkcs8


async def test_key_helper_names_a_bad_setting() -> None:
    with pytest.raises(ValueError, match="WORKLOAD_RSA_KEY_SIZE"):
        await make_key_and_csr(KeySpec(URI, rsa_key_size=1024))
    with pytest.raises(ValueError, match="ECC_CURVE"):
        await make_key_and_csr(KeySpec(URI, key_algorithm="ECDSA", ec_curve="P521"))


async def test_prefetched_key_is_used_once() -> None:
    maker = KeyMaker(KeySpec(URI, key_algorithm="ECDSA"))
    await maker.prefetch()
    await maker.prefetch()  # still one helper, one key
    first = await maker.make()
    second = await maker.make()
    assert first[0] != second[0]


def test_the_helper_never_writes_the_key_to_stderr_or_files(tmp_path: object) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vm_agent.identity.keygen", json.dumps({"uri": URI, "key_algorithm": "ECDSA"})],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(tmp_path),
    )
    assert out.stderr == ""
    assert "PRIVATE KEY" in json.loads(out.stdout)["key"]
    assert list(tmp_path.iterdir()) == []  # type: ignore[attr-defined]


async def test_a_missing_interpreter_is_a_keygen_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(KeygenError, match="cannot start the key helper"):
        await make_key_and_csr(KeySpec(URI))
