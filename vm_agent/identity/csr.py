"""Key pair and CSR the way istio's agent makes them (istio-agent.md §4.3); run by the key helper
(``vm_agent.identity.keygen``), never imported by the agent itself.

The CSR subject is a single empty Organization and the only extension is a critical subjectAltName
holding the SPIFFE URI; istiod ignores that SAN and signs the caller's identity, but the shape matches
what a real pilot-agent sends.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from vm_agent.identity.svid import spiffe_id as spiffe_id  # re-exported: callers build a CSR's URI with it

_CURVES: dict[str, type[ec.EllipticCurve]] = {"P256": ec.SECP256R1, "P384": ec.SECP384R1}
MIN_RSA_BITS = 2048


def generate_key_and_csr(
    uri: str,
    *,
    key_algorithm: str = "RSA",
    rsa_key_size: int = 2048,
    ec_curve: str = "P256",
    pkcs8: bool = False,
) -> tuple[bytes, bytes]:
    """A fresh private key and a CSR for ``uri``: (key PEM, CSR PEM).

    ``ValueError`` names the bad setting (RSA smaller than 2048 bits, unknown curve or algorithm).
    """
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    algo = key_algorithm.upper()
    if algo == "RSA":
        if rsa_key_size < MIN_RSA_BITS:
            raise ValueError(
                f"RSA key size {rsa_key_size} is too small: WORKLOAD_RSA_KEY_SIZE must be >= {MIN_RSA_BITS}"
            )
        key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_key_size)
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    elif algo in ("ECDSA", "EC"):
        curve = _CURVES.get(ec_curve.upper())
        if curve is None:
            raise ValueError(f"ECC_CURVE {ec_curve!r} is not supported: expected one of {', '.join(_CURVES)}")
        key = ec.generate_private_key(curve())
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        raise ValueError(f"key algorithm {key_algorithm!r} is not supported: expected RSA or ECDSA")
    if pkcs8:
        fmt = serialization.PrivateFormat.PKCS8
    key_pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
