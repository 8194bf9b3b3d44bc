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
