"""The mesh CA: a self-signed root kept in the state folder, the control plane's serving certificate,
and workload leaves whose identity comes from the authenticated caller (never from the CSR)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vm_agent.files import atomic_write
from vm_agent.logs import get_logger

log = get_logger("mesh.ca")

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
ROOT_TTL = dt.timedelta(days=3650)


class CAError(Exception):
    """A request the CA refuses; ``kind`` is ``"csr"`` or ``"ttl"`` (both InvalidArgument at the gRPC layer)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId | None:
        """``spiffe://td/ns/<ns>/sa/<sa>`` → SpiffeId; anything else → None (like istiod, ignored)."""
        if not uri.startswith("spiffe://"):
            return None
        parts = uri[len("spiffe://") :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not parts[2] or not parts[4]:
            return None
        return cls(parts[0], parts[2], parts[4])

    def __str__(self) -> str:
        return self.uri


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write_private(path: Path, data: bytes) -> None:
    atomic_write(path, data, 0o600)


class MeshCA:
    """Root of trust for one local mesh. Restarts keep trust because the root lives in ``ca_dir``."""

    def __init__(self, ca_dir: Path, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._dir = ca_dir
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = ca_dir / ROOT_CERT_FILE, ca_dir / ROOT_KEY_FILE
        if cert_path.exists() and key_path.exists():
            try:
                self._root_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except ValueError as e:
                raise ValueError(
                    f"{ca_dir}: mesh CA files cannot be read ({e}); remove them to start a new mesh"
                ) from e
            if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: expected an RSA or EC private key")
            self._root_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = key
            log.info("loaded mesh root %s", self._root_cert.subject.rfc4514_string())
        else:
            self._root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._root_cert = self._make_root()
            _write_private(key_path, self._root_key_pem())
            cert_path.write_bytes(self._root_cert.public_bytes(serialization.Encoding.PEM))
            log.info("created mesh root in %s", ca_dir)
        self.root_cert_pem: bytes = self._root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def root_cert(self) -> x509.Certificate:
        return self._root_cert

    def _root_key_pem(self) -> bytes:
        return self._root_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def _make_root(self) -> x509.Certificate:
        # istiod's self-signed root: O=<trust domain>, CA, signs certs only.
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain or "cluster.local")])
        now = _now()
        public = self._root_key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + ROOT_TTL)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._root_key, hashes.SHA256())
        )

    def _leaf(
        self,
        public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        ttl: dt.timedelta,
        subject: x509.Name,
    ) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._root_cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._root_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            # With an empty subject, RFC 5280 requires the SAN extension to be critical (istiod does the same).
            .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        )
        return builder.sign(self._root_key, hashes.SHA256())

    def sign_csr(self, csr_pem: str, identity: SpiffeId, ttl_s: int) -> list[str]:
        """Sign ``csr_pem`` for ``identity``; returns the chain as istiod does: leaf first, root last,
        one PEM per element."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as e:
            raise CAError("csr", f"csr: not a PEM certificate request ({e})") from e
        if not csr.is_signature_valid:
            raise CAError("csr", "csr: signature does not verify")
        public = csr.public_key()
        if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise CAError("csr", f"csr: unsupported key type {type(public).__name__}; expected RSA or ECDSA")
        cert = self._leaf(
            public, [x509.UniformResourceIdentifier(identity.uri)], dt.timedelta(seconds=ttl_s), x509.Name([])
        )
        return [cert.public_bytes(serialization.Encoding.PEM).decode(), self.root_cert_pem.decode()]

    def issue_key_and_chain(
        self,
        *,
        uris: tuple[str, ...] = (),
        dns_names: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        ttl_s: int = 86400,
    ) -> tuple[bytes, bytes]:
        """A fresh EC key and its chain (leaf + root PEM) for the serving certificate or for tests."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if not sans:
            raise ValueError("a certificate needs at least one URI, DNS name or IP")
        cert = self._leaf(key.public_key(), sans, dt.timedelta(seconds=ttl_s), x509.Name([]))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM) + self.root_cert_pem

    def write_serving_files(self, dns_names: tuple[str, ...], ips: tuple[str, ...]) -> tuple[Path, Path]:
        """Serving key/chain files for the TLS port (ssl needs files); renewed on every start."""
        key_pem, chain_pem = self.issue_key_and_chain(dns_names=dns_names, ips=ips, ttl_s=365 * 86400)
        key_path, chain_path = self._dir / "serving-key.pem", self._dir / "serving-cert.pem"
        _write_private(key_path, key_pem)
        chain_path.write_bytes(chain_pem)
        return key_path, chain_path


def resolve_ttl(requested_s: int, default_s: int, max_s: int) -> int:
    """istiod's rule: ≤ 0 → the default; above the maximum → refused."""
    if requested_s <= 0:
        return default_s
    if requested_s > max_s:
        raise CAError(
            "ttl", f"validity_duration: requested TTL {requested_s}s is greater than the max allowed {max_s}s"
        )
    return requested_s
