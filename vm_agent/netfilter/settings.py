"""What to capture: the inputs of the capture rules, validated before any text is rendered.

Every value ends up inside an iptables-restore or nft script, so validation is also what keeps a
hostile cluster.env from injecting rules: ports are integers, CIDRs and addresses go through
``ipaddress``, interface names are matched against what the kernel accepts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from vm_agent.logs import get_logger

log = get_logger("netfilter")

# Envoy's and the agent's own listeners. Inbound traffic to them must never be redirected to
# 15006: Envoy would loop to itself and operators would lose the admin/status endpoints.
DEFAULT_AGENT_PORTS: tuple[int, ...] = (15000, 15004, 15020, 15021, 15053, 15090)

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


class CaptureSettingsError(ValueError):
    """A capture setting is malformed; the message names the setting, the value and what was expected."""


@dataclass(frozen=True)
class CaptureSettings:
    inbound_ports: str = "*"  # ISTIO_INBOUND_PORTS ("*" or "80,443")
    local_exclude_ports: tuple[int, ...] = ()  # ISTIO_LOCAL_EXCLUDE_PORTS
    service_cidr: str = "*"  # ISTIO_SERVICE_CIDR ("*" or "10.0.0.0/8,fd00::/8")
    service_exclude_cidr: tuple[str, ...] = ()  # ISTIO_SERVICE_EXCLUDE_CIDR
    outbound_ports: tuple[int, ...] = ()  # ISTIO_OUTBOUND_PORTS
    outbound_exclude_ports: tuple[int, ...] = ()  # ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE
    exclude_interfaces: tuple[str, ...] = ()  # ISTIO_EXCLUDE_INTERFACES
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    dns_capture: bool = True
    capture_all_dns: bool = False
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()
    ipv6: bool = False
    outbound_port: int = 15001
    inbound_capture_port: int = 15006
    tunnel_port: int = 15008
    dns_port: int = 15053
    ssh_port: int = 22
    agent_ports: tuple[int, ...] = DEFAULT_AGENT_PORTS

    def validate(self) -> None:
        """Raise CaptureSettingsError for the first value that cannot go into a rule."""
        if self.inbound_ports.strip() != "*":
            parse_ports(self.inbound_ports, "inbound_ports (ISTIO_INBOUND_PORTS)")
        for name in ("local_exclude_ports", "outbound_ports", "outbound_exclude_ports", "agent_ports"):
            for port in getattr(self, name):
                _check_port(port, name)
        for name in ("outbound_port", "inbound_capture_port", "tunnel_port", "dns_port", "ssh_port"):
            _check_port(getattr(self, name), name)
        for name in ("proxy_uid", "proxy_gid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
                raise CaptureSettingsError(f"{name}: {value!r} is not a valid id (expected an integer 0..4294967294)")
        if self.service_cidr.strip() != "*":
            split_cidrs(self.service_cidr, "service_cidr (ISTIO_SERVICE_CIDR)")
        for cidr in self.service_exclude_cidr:
            _parse_cidr(cidr, "service_exclude_cidr (ISTIO_SERVICE_EXCLUDE_CIDR)")
        for ifname in self.exclude_interfaces:
            if not _IFNAME.match(ifname):
                raise CaptureSettingsError(
                    f"exclude_interfaces (ISTIO_EXCLUDE_INTERFACES): {ifname!r} is not an interface name "
                    "(expected 1-15 characters of letters, digits, '_.:@-')"
                )
        for addr in self.dns_servers_v4:
            if not isinstance(_parse_ip(addr, "dns_servers_v4"), ipaddress.IPv4Address):
                raise CaptureSettingsError(f"dns_servers_v4: {addr!r} is not an IPv4 address")
        for addr in self.dns_servers_v6:
            if not isinstance(_parse_ip(addr, "dns_servers_v6"), ipaddress.IPv6Address):
                raise CaptureSettingsError(f"dns_servers_v6: {addr!r} is not an IPv6 address")

    @property
    def redirect_dns(self) -> bool:
        """Like istio-iptables: DNS capture without capture-all and without any resolver is off."""
        return self.dns_capture and (self.capture_all_dns or bool(self.dns_servers_v4 or self.dns_servers_v6))

    def protected_inbound_ports(self) -> tuple[int, ...]:
        """Inbound ports that are never redirected, in rule order, without duplicates.

        SSH and the agent's/Envoy's own ports come first so that an operator's
        ISTIO_INBOUND_PORTS can never take SSH away from them (Istio would capture it).
        """
        ports = [self.ssh_port, *self.agent_ports, self.outbound_port, self.inbound_capture_port]
        ports += list(self.local_exclude_ports)
        seen: dict[int, None] = {}
        for port in ports:
            if port != self.tunnel_port:  # already returned by the first rule of the chain
                seen.setdefault(port, None)
        return tuple(seen)


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise CaptureSettingsError(f"{what}: {port!r} is not a port (expected an integer 1..65535)")


def parse_ports(text: str, what: str) -> tuple[int, ...]:
    """``"80, 443"`` → (80, 443); empty → (). Errors name ``what`` and the bad element."""
    ports: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            raise CaptureSettingsError(f"{what}: {item!r} in {text!r} is not a port (expected 1..65535)")
        port = int(item)
        _check_port(port, what)
        ports.append(port)
    return tuple(ports)


def _parse_ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CaptureSettingsError(f"{what}: {text!r} is not an IP address") from None


def _parse_cidr(text: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise CaptureSettingsError(f"{what}: {text!r} is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/8)") from None


def split_cidrs(text: str, what: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(_parse_cidr(item, what) for item in text.split(",") if item.strip())


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "t", "true", "y", "yes", "on"):
        return True
    if value in ("0", "f", "false", "n", "no", "off"):
        return False
    raise CaptureSettingsError(f"{key}: {raw!r} is not a boolean (expected true or false)")


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise CaptureSettingsError(f"{key}: {raw!r} is not a non-negative integer")
    return int(raw)


def capture_enabled(env: Mapping[str, str]) -> bool:
    """False when the operator manages capture themselves (istio-start.sh's ISTIO_CUSTOM_IP_TABLES)."""
    return not _bool(env, "ISTIO_CUSTOM_IP_TABLES", False)


def settings_from_env(
    env: Mapping[str, str], nameservers: Sequence[str] = (), *, ipv6: bool = False
) -> CaptureSettings:
    """Map cluster.env / process environment keys (istio-iptables names) onto CaptureSettings.

    ``nameservers`` are the resolv.conf servers as read by config (the agent never reads files
    here); they are split by family. Loopback-style stub resolvers are kept: capture of them is
    exactly what makes ``dig`` on a systemd-resolved host reach the proxy.
    """
    mode = env.get("ISTIO_INBOUND_INTERCEPTION_MODE", "").strip().upper()
    if mode not in ("", "REDIRECT"):
        # TPROXY only preserves the client's source address for the app; REDIRECT still captures
        # everything, so the VM stays in the mesh rather than refusing to start.
        log.warning("ISTIO_INBOUND_INTERCEPTION_MODE=%s is not supported; using REDIRECT", mode)
    v4: list[str] = []
    v6: list[str] = []
    for server in nameservers:
        ip = _parse_ip(server.split("%", 1)[0], "resolv.conf nameserver")
        (v4 if ip.version == 4 else v6).append(str(ip))
    # Several uids/gids are an istio-iptables feature nobody sets on a VM; one id each is enough.
    uid = _int(env, "PROXY_UID", 1337)
    gid = _int(env, "PROXY_GID", uid)
    dns_capture = _bool(env, "ISTIO_META_DNS_CAPTURE", False) or _bool(env, "REDIRECT_DNS", False)
    settings = CaptureSettings(
        inbound_ports=env.get("ISTIO_INBOUND_PORTS", "*").strip() or "*",
        local_exclude_ports=parse_ports(env.get("ISTIO_LOCAL_EXCLUDE_PORTS", ""), "ISTIO_LOCAL_EXCLUDE_PORTS"),
        service_cidr=env.get("ISTIO_SERVICE_CIDR", "*").strip() or "*",
        service_exclude_cidr=tuple(
            str(n) for n in split_cidrs(env.get("ISTIO_SERVICE_EXCLUDE_CIDR", ""), "ISTIO_SERVICE_EXCLUDE_CIDR")
        ),
        outbound_ports=parse_ports(env.get("ISTIO_OUTBOUND_PORTS", ""), "ISTIO_OUTBOUND_PORTS"),
        outbound_exclude_ports=parse_ports(
            env.get("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", ""), "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"
        ),
        exclude_interfaces=tuple(i.strip() for i in env.get("ISTIO_EXCLUDE_INTERFACES", "").split(",") if i.strip()),
        proxy_uid=uid,
        proxy_gid=gid,
        dns_capture=dns_capture,
        capture_all_dns=_bool(env, "CAPTURE_ALL_DNS", False),
        dns_servers_v4=tuple(v4),
        dns_servers_v6=tuple(v6),
        ipv6=ipv6,
    )
    if settings.service_cidr != "*":
        cidrs = split_cidrs(settings.service_cidr, "ISTIO_SERVICE_CIDR")
        settings = replace(settings, service_cidr=",".join(str(c) for c in cidrs))
    settings.validate()
    return settings
