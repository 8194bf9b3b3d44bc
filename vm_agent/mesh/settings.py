"""Settings of the built-in local mesh (the composition root maps CLI flags onto these)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

# The name istioctl writes into the VM's hosts file and that agents dial; the serving certificate must
# always carry it, whatever else is configured.
ISTIOD_HOST = "istiod.istio-system.svc"


@dataclass(frozen=True)
class MeshSettings:
    state_dir: Path
    manifests_dir: Path | None = None
    listen: str = "127.0.0.1:15012"
    plaintext_listen: str | None = None
    admin_listen: str = "127.0.0.1:15014"
    server_names: tuple[str, ...] = (ISTIOD_HOST,)
    server_ips: tuple[str, ...] = ("127.0.0.1",)
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    default_cert_ttl_s: int = 86400
    max_cert_ttl_s: int = 90 * 86400
    grace_period_s: float = 10.0
    # Audiences a bearer token must carry one of (istiod: TOKEN_AUDIENCES).
    token_audiences: tuple[str, ...] = ("istio-ca",)
    # Name written to istio.io/workloadController; istiod uses its pod name.
    controller_name: str = "vm-agent-mesh"
    # istiod auto-allocates VIPs for address-less ServiceEntries (PILOT_ENABLE_IP_AUTOALLOCATE).
    auto_allocate_vips: bool = True
    # How often the manifests folder is checked for changes.
    manifests_poll_s: float = 0.2
    # Push a default istiod's telemetry filters (istio.metadata_exchange, istio.alpn, istio.stats), which an agent
    # fits to stock Envoy; off for a stock Envoy connected straight to the mesh.
    istio_telemetry: bool = True
    # Close ADS streams after this long (istiod: keepaliveMaxServerConnectionAge, 30 min); None = never.
    max_stream_age_s: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        split_host_port(self.listen, "listen")
        if self.plaintext_listen:
            split_host_port(self.plaintext_listen, "plaintext_listen")
        admin_host, _ = split_host_port(self.admin_listen, "admin_listen")
        try:
            loopback = ipaddress.ip_address(admin_host).is_loopback
        except ValueError:
            loopback = admin_host == "localhost"
        if not loopback:
            # The admin API changes the mesh and has no authentication.
            raise ValueError(f"admin_listen: {self.admin_listen!r} is not a loopback address (127.0.0.0/8 or ::1)")
        for ip in self.server_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError as e:
                raise ValueError(f"server_ips: {ip!r} is not an IP address") from e
        if self.default_cert_ttl_s <= 0:
            raise ValueError(f"default_cert_ttl_s: must be positive, got {self.default_cert_ttl_s}")
        if self.max_cert_ttl_s <= 0:
            # Like istiod, the maximum bounds requested TTLs only; the default may exceed it.
            raise ValueError(f"max_cert_ttl_s: must be positive, got {self.max_cert_ttl_s}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s: must not be negative, got {self.grace_period_s}")
        if self.max_stream_age_s is not None and self.max_stream_age_s <= 0:
            raise ValueError(f"max_stream_age_s: must be positive, got {self.max_stream_age_s}")
        if self.manifests_poll_s <= 0:
            raise ValueError(f"manifests_poll_s: must be positive, got {self.manifests_poll_s}")
        if self.manifests_dir is not None and not self.manifests_dir.is_dir():
            raise ValueError(f"manifests_dir: {self.manifests_dir} is not a folder")


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """``"127.0.0.1:15012"`` / ``"[::1]:15012"`` → (host, port); a clear error otherwise."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{what}: expected HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{what}: port {port} out of range 0..65535")
    return host, port
