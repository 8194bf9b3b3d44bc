"""Inputs of the identity service, filled in by the composition root from ``Config``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vm_agent.upstream import UpstreamSettings


@dataclass(frozen=True)
class IdentitySettings:
    ca: UpstreamSettings
    trust_domain: str
    namespace: str
    service_account: str
    state_dir: Path
    """key.pem (0600), cert-chain.pem and root-cert.pem are kept here across restarts."""
    sds_socket: Path
    """./var/run/secrets/workload-spiffe-uds/socket under the root."""
    sds_socket_group: str | None = None
    """Group Envoy runs as; the socket and its folder are handed to it."""
    key_algorithm: str = "RSA"
    rsa_key_size: int = 2048
    ec_curve: str = "P256"
    pkcs8: bool = False
    requested_ttl_seconds: int = 86400
    """SECRET_TTL, sent as validity_duration."""
    grace_ratio: float = 0.5
    grace_jitter: float = 0.01
    cert_signer: str = ""
    output_certs: Path | None = None
    """Istio's OUTPUT_CERTS: key.pem, cert-chain.pem, root-cert.pem are also written here."""


def validate(settings: IdentitySettings) -> None:
    """Reject settings the identity service cannot work with; ``ValueError`` names the setting."""
    algo = settings.key_algorithm.upper()
    if algo not in ("RSA", "ECDSA", "EC"):
        raise ValueError(f"key algorithm {settings.key_algorithm!r} is not supported: expected RSA or ECDSA")
    if algo == "RSA" and settings.rsa_key_size < 2048:
        raise ValueError(f"WORKLOAD_RSA_KEY_SIZE {settings.rsa_key_size} is too small: expected >= 2048")
    if algo != "RSA" and settings.ec_curve.upper() not in ("P256", "P384"):
        raise ValueError(f"ECC_CURVE {settings.ec_curve!r} is not supported: expected P256 or P384")
    if settings.requested_ttl_seconds <= 0:
        raise ValueError(f"SECRET_TTL must be positive, got {settings.requested_ttl_seconds}s")
    if not 0.0 <= settings.grace_ratio <= 1.0:
        raise ValueError(f"SECRET_GRACE_PERIOD_RATIO must be within [0, 1], got {settings.grace_ratio}")
    if not 0.0 <= settings.grace_jitter <= 1.0:
        raise ValueError(f"SECRET_GRACE_PERIOD_RATIO_JITTER must be within [0, 1], got {settings.grace_jitter}")
    for part, value in (("namespace", settings.namespace), ("service account", settings.service_account)):
        if not value or "/" in value:
            raise ValueError(f"workload {part} {value!r} cannot form a SPIFFE ID (empty or contains '/')")
