"""Pure rendering: CaptureSettings → iptables-restore input or an nft script. No I/O here.

The rules follow istio-iptables' REDIRECT mode (istio-agent.md §11.2) rule for rule, with three
deliberate differences, all for operators of a VM rather than a pod:

* Chains are ``VMAGENT_*`` (nft: ``table inet vm_agent``), not ``ISTIO_*``. A VM may still carry
  rules from an ``istio-sidecar`` install or from an operator's own script; with our own prefix
  ``cleanup`` can remove everything we installed and provably nothing else, and ``show`` and
  ``doctor`` can tell the two apart. The suffixes keep Istio's names so the rules read the same.
* ISTIO_EXCLUDE_INTERFACES become RETURN rules at the top of our own chains instead of rules in
  the built-in PREROUTING/OUTPUT chains (same effect, because our jumps are the only way in), so
  the built-in chains hold nothing of ours but the jumps.
* SSH and the agent's/Envoy's own ports are always returned before any inbound redirect, even
  when ISTIO_INBOUND_PORTS lists them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from vm_agent.netfilter.settings import CaptureSettings, parse_ports, split_cidrs

CHAIN_PREFIX = "VMAGENT_"
INBOUND = CHAIN_PREFIX + "INBOUND"
REDIRECT = CHAIN_PREFIX + "REDIRECT"
IN_REDIRECT = CHAIN_PREFIX + "IN_REDIRECT"
OUTPUT = CHAIN_PREFIX + "OUTPUT"
OUTPUT_DNS = CHAIN_PREFIX + "OUTPUT_DNS"

NFT_RAW_OUTPUT_DNS = CHAIN_PREFIX + "RAW_OUTPUT_DNS"
NFT_RAW_INBOUND = CHAIN_PREFIX + "RAW_INBOUND"

NFT_FAMILY = "inet"
NFT_TABLE = "vm_agent"

BACKENDS = ("iptables", "nft")


@dataclass
class RuleTable:
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)

    def add(self, chain: str, *args: str) -> None:
        if chain.startswith(CHAIN_PREFIX) and chain not in self.chains:
            self.chains.append(chain)
        self.rules.append(" ".join(("-A", chain, *args)))


@dataclass(frozen=True)
class _Family:
    version: int  # 4 or 6
    loopback: str  # istio's HostIPv4LoopbackCidr / ::1/128
    probe_source: str  # the address inbound passthrough (and our probes) bind: 127.0.0.6 / ::6
    host_bits: int
    dns_servers: tuple[str, ...]


def _families(s: CaptureSettings) -> list[_Family]:
    families = [_Family(4, "127.0.0.1/32", "127.0.0.6/32", 32, s.dns_servers_v4)]
    if s.ipv6:
        families.append(_Family(6, "::1/128", "::6/128", 128, s.dns_servers_v6))
    return families


def _include_cidrs(s: CaptureSettings) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if s.service_cidr.strip() == "*":
        return ()
    return split_cidrs(s.service_cidr, "service_cidr (ISTIO_SERVICE_CIDR)")


def _inbound_include(s: CaptureSettings) -> tuple[int, ...] | None:
    """None = capture every inbound port; () = capture none."""
    if s.inbound_ports.strip() == "*":
        return None
    return parse_ports(s.inbound_ports, "inbound_ports (ISTIO_INBOUND_PORTS)")


def _joined(ports: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(p) for p in ports)


# --------------------------------------------------------------------------------------------- iptables


def iptables_tables(s: CaptureSettings, version: int) -> dict[str, RuleTable]:
    """The rules for one address family, by table (``nat``, ``raw``), in iptables-save order."""
    fam = next((f for f in _families(s) if f.version == version), None)
    if fam is None:
        return {}
    nat = RuleTable()
    redirect_dns = s.redirect_dns
    family_dns = redirect_dns and (s.capture_all_dns or bool(fam.dns_servers))
    include_cidrs = _include_cidrs(s)
    loopback_included = any(c.network_address.is_loopback for c in include_cidrs)
    uid, gid = str(s.proxy_uid), str(s.proxy_gid)

    # Declared first so that every chain exists before a rule jumps to it.
    for chain in (INBOUND, REDIRECT, IN_REDIRECT, OUTPUT):
        nat.chains.append(chain)
    if family_dns:
        nat.chains.append(OUTPUT_DNS)

    for ifname in s.exclude_interfaces:
        nat.add(INBOUND, "-i", ifname, "-j", "RETURN")
    nat.add(INBOUND, "-p", "tcp", "--dport", str(s.tunnel_port), "-j", "RETURN")
    nat.add(REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(s.outbound_port))
    nat.add(IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(s.inbound_capture_port))

    inbound = _inbound_include(s)
    if inbound is None or inbound:
        nat.add("PREROUTING", "-p", "tcp", "-j", INBOUND)
        for port in s.protected_inbound_ports():
            nat.add(INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        if inbound is None:
            nat.add(INBOUND, "-p", "tcp", "-j", IN_REDIRECT)
        else:
            for port in inbound:
                nat.add(INBOUND, "-p", "tcp", "--dport", str(port), "-j", IN_REDIRECT)

    nat.add("OUTPUT", "-j", OUTPUT)
    for ifname in s.exclude_interfaces:
        nat.add(OUTPUT, "-o", ifname, "-j", "RETURN")
    for port in s.outbound_exclude_ports:
        nat.add(OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        nat.add(OUTPUT, "-p", "udp", "--dport", str(port), "-j", "RETURN")
    nat.add(OUTPUT, "-o", "lo", "-s", fam.probe_source, "-j", "RETURN")
    for flag, ident in (("--uid-owner", uid), ("--gid-owner", gid)):
        # Envoy dialing the instance IP over lo is an app calling itself through a VIP: send it
        # to the inbound listener. Port 53 stays out so the agent's TCP DNS forwarding is not
        # bounced into Envoy (istio-iptables does the same, but only for the uid rule).
        if redirect_dns and flag == "--uid-owner":
            port_match = ["-m", "multiport", "!", "--dports", f"53,{s.tunnel_port}"]
        else:
            port_match = ["!", "--dport", str(s.tunnel_port)]
        nat.add(OUTPUT, "-o", "lo", "!", "-d", fam.loopback, "-p", "tcp", *port_match, "-m", "owner", flag, ident,
                "-j", IN_REDIRECT)  # fmt: skip
        if not loopback_included:
            if redirect_dns:
                nat.add(OUTPUT, "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", flag, ident,
                        "-j", "RETURN")  # fmt: skip
            else:
                nat.add(OUTPUT, "-o", "lo", "-m", "owner", "!", flag, ident, "-j", "RETURN")
        nat.add(OUTPUT, "-m", "owner", flag, ident, "-j", "RETURN")
    if family_dns:
        nat.add(OUTPUT, "-j", OUTPUT_DNS)
        dns_to = ["-j", "REDIRECT", "--to-ports", str(s.dns_port)]
        for proto in ("tcp", "udp"):
            if s.capture_all_dns:
                nat.add(OUTPUT_DNS, "-p", proto, "--dport", "53", *dns_to)
            else:
                for server in fam.dns_servers:
                    nat.add(OUTPUT_DNS, "-p", proto, "--dport", "53", "-d", f"{server}/{fam.host_bits}", *dns_to)
    nat.add(OUTPUT, "-d", fam.loopback, "-j", "RETURN")
    for text in s.service_exclude_cidr:
        cidr = ipaddress.ip_network(text, strict=False)
        if cidr.version == version:
            nat.add(OUTPUT, "-d", str(cidr), "-j", "RETURN")
    for port in s.outbound_ports:
        nat.add(OUTPUT, "-p", "tcp", "--dport", str(port), "-j", REDIRECT)
    if not include_cidrs:
        nat.add(OUTPUT, "-j", REDIRECT)
    else:
        for cidr in include_cidrs:
            if cidr.version == version:
                nat.add(OUTPUT, "-d", str(cidr), "-j", REDIRECT)

    tables = {"nat": nat}
    if redirect_dns:
        tables["raw"] = _iptables_raw(s, fam)
    return tables


def _iptables_raw(s: CaptureSettings, fam: _Family) -> RuleTable:
    """Conntrack zones for UDP DNS: the agent↔resolver leg in zone 1, the app↔agent leg in zone 2.

    Without them a reply from the resolver can be matched to the app's NATed flow (same 5-tuple
    after un-NAT) and delivered to the app instead of the agent. nft uses the same conntrack, so
    the nft rendering keeps the zones too.
    """
    raw = RuleTable()
    raw.chains.append(OUTPUT_DNS)
    raw.add("OUTPUT", "-j", OUTPUT_DNS)
    for flag, ident in (("--uid-owner", str(s.proxy_uid)), ("--gid-owner", str(s.proxy_gid))):
        raw.add(OUTPUT_DNS, "-p", "udp", "--dport", "53", "-m", "owner", flag, ident, "-j", "CT", "--zone", "1")
        raw.add(OUTPUT_DNS, "-p", "udp", "--sport", str(s.dns_port), "-m", "owner", flag, ident, "-j", "CT",
                "--zone", "2")  # fmt: skip
    if s.capture_all_dns:
        raw.add("PREROUTING", "-j", INBOUND)
        raw.add(OUTPUT_DNS, "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
        raw.add(INBOUND, "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
    elif fam.dns_servers:
        raw.add("PREROUTING", "-j", INBOUND)
        for server in fam.dns_servers:
            host = f"{server}/{fam.host_bits}"
            raw.add(OUTPUT_DNS, "-p", "udp", "--dport", "53", "-d", host, "-j", "CT", "--zone", "2")
            raw.add(INBOUND, "-p", "udp", "--sport", "53", "-s", host, "-j", "CT", "--zone", "1")
    return raw


def iptables_restore_text(tables: dict[str, RuleTable]) -> str:
    """iptables-restore input (for ``--noflush``): declaring a chain that exists flushes it."""
    out: list[str] = []
    for name, table in tables.items():
        out.append(f"*{name}")
        out.extend(f":{chain} - [0:0]" for chain in table.chains)
        out.extend(table.rules)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def render_iptables(s: CaptureSettings) -> tuple[str, str | None]:
    """(IPv4 ruleset, IPv6 ruleset or None when IPv6 capture is off)."""
    s.validate()
    v4 = iptables_restore_text(iptables_tables(s, 4))
    v6 = iptables_restore_text(iptables_tables(s, 6)) if s.ipv6 else None
    return v4, v6


# --------------------------------------------------------------------------------------------- nft


def _set(ports: tuple[int, ...] | list[int]) -> str:
    # Sorted like nft prints sets, so `show` reads the same as what was rendered.
    ordered = sorted(set(ports))
    return str(ordered[0]) if len(ordered) == 1 else "{ " + ", ".join(str(p) for p in ordered) + " }"


def render_nft(s: CaptureSettings) -> str:
    """One ``table inet vm_agent``: loaded with ``nft -f`` it replaces any previous copy atomically."""
    s.validate()
    fams = _families(s)
    only_v4 = "" if s.ipv6 else "meta nfproto ipv4 "
    include_cidrs = _include_cidrs(s)
    loopback_included = any(c.network_address.is_loopback for c in include_cidrs)
    redirect_dns = s.redirect_dns
    chains: dict[str, list[str]] = {}

    def add(chain: str, rule: str) -> None:
        chains.setdefault(chain, []).append(rule)

    def ipk(fam: _Family) -> str:
        return "ip" if fam.version == 4 else "ip6"

    def host(fam: _Family, cidr: str) -> str:
        return cidr.removesuffix(f"/{fam.host_bits}")

    add("nat_prerouting", "type nat hook prerouting priority dstnat; policy accept;")
    add("nat_output", "type nat hook output priority -100; policy accept;")
    for ifname in s.exclude_interfaces:
        add(INBOUND, f'iifname "{ifname}" return')
    add(INBOUND, f"tcp dport {s.tunnel_port} return")
    add(REDIRECT, f"meta l4proto tcp redirect to :{s.outbound_port}")
    add(IN_REDIRECT, f"meta l4proto tcp redirect to :{s.inbound_capture_port}")
    inbound = _inbound_include(s)
    if inbound is None or inbound:
        add("nat_prerouting", f"{only_v4}meta l4proto tcp jump VMAGENT_INBOUND")
        add(INBOUND, f"tcp dport {_set(list(s.protected_inbound_ports()))} return")
        if inbound is None:
            add(INBOUND, "meta l4proto tcp jump VMAGENT_IN_REDIRECT")
        else:
            add(INBOUND, f"tcp dport {_set(inbound)} jump VMAGENT_IN_REDIRECT")

    add("nat_output", f"{only_v4}jump VMAGENT_OUTPUT")
    out = OUTPUT
    for ifname in s.exclude_interfaces:
        add(out, f'oifname "{ifname}" return')
    if s.outbound_exclude_ports:
        add(out, f"tcp dport {_set(s.outbound_exclude_ports)} return")
        add(out, f"udp dport {_set(s.outbound_exclude_ports)} return")
    for fam in fams:
        add(out, f'oifname "lo" {ipk(fam)} saddr {host(fam, fam.probe_source)} return')
    for key, ident in (("skuid", s.proxy_uid), ("skgid", s.proxy_gid)):
        ports = f"{{ 53, {s.tunnel_port} }}" if redirect_dns and key == "skuid" else str(s.tunnel_port)
        for fam in fams:
            add(out, f'oifname "lo" {ipk(fam)} daddr != {host(fam, fam.loopback)} tcp dport != {ports} '
                     f"meta {key} {ident} jump VMAGENT_IN_REDIRECT")  # fmt: skip
        if not loopback_included:
            if redirect_dns:
                add(out, f'oifname "lo" tcp dport != 53 meta {key} != {ident} return')
            else:
                add(out, f'oifname "lo" meta {key} != {ident} return')
        add(out, f"meta {key} {ident} return")
    if redirect_dns:
        add(out, "jump VMAGENT_OUTPUT_DNS")
        for proto in ("tcp", "udp"):
            if s.capture_all_dns:
                add(OUTPUT_DNS, f"{proto} dport 53 redirect to :{s.dns_port}")
            else:
                for fam in fams:
                    for server in fam.dns_servers:
                        add(OUTPUT_DNS, f"{ipk(fam)} daddr {server} {proto} dport 53 redirect to :{s.dns_port}")
    for fam in fams:
        add(out, f"{ipk(fam)} daddr {host(fam, fam.loopback)} return")
    for text in s.service_exclude_cidr:
        cidr = ipaddress.ip_network(text, strict=False)
        if cidr.version == 4 or s.ipv6:
            add(out, f"{'ip' if cidr.version == 4 else 'ip6'} daddr {cidr} return")
    if s.outbound_ports:
        add(out, f"tcp dport {_set(s.outbound_ports)} jump VMAGENT_REDIRECT")
    if not include_cidrs:
        add(out, "jump VMAGENT_REDIRECT")
    else:
        for cidr in include_cidrs:
            if cidr.version == 4 or s.ipv6:
                add(out, f"{'ip' if cidr.version == 4 else 'ip6'} daddr {cidr} jump VMAGENT_REDIRECT")

    if redirect_dns:
        _nft_raw(s, fams, only_v4, add)

    lines = [f"table {NFT_FAMILY} {NFT_TABLE} {{"]
    # Regular chains first: a base chain's jump must name a chain nft already knows.
    ordered = sorted(chains.items(), key=lambda item: item[1][0].startswith("type "))
    for name, rules in ordered:
        lines.append(f"\tchain {name} {{")
        lines.extend(f"\t\t{rule}" for rule in rules)
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nft_raw(s: CaptureSettings, fams: list[_Family], only_v4: str, add: Callable[[str, str], None]) -> None:
    # ``return`` after each zone: xt_CT keeps the first zone a packet gets, nft would let a later
    # rule overwrite it; returning keeps istio-iptables' first-match semantics.
    add("raw_output", "type filter hook output priority raw; policy accept;")
    add("raw_output", f"{only_v4}jump VMAGENT_RAW_OUTPUT_DNS")
    for key, ident in (("skuid", s.proxy_uid), ("skgid", s.proxy_gid)):
        add(NFT_RAW_OUTPUT_DNS, f"udp dport 53 meta {key} {ident} ct zone set 1 return")
        add(NFT_RAW_OUTPUT_DNS, f"udp sport {s.dns_port} meta {key} {ident} ct zone set 2 return")
    if s.capture_all_dns:
        add("raw_prerouting", "type filter hook prerouting priority raw; policy accept;")
        add("raw_prerouting", f"{only_v4}jump VMAGENT_RAW_INBOUND")
        add(NFT_RAW_OUTPUT_DNS, "udp dport 53 ct zone set 2 return")
        add(NFT_RAW_INBOUND, "udp sport 53 ct zone set 1 return")
        return
    servers = [(("ip" if f.version == 4 else "ip6"), srv) for f in fams for srv in f.dns_servers]
    if servers:
        add("raw_prerouting", "type filter hook prerouting priority raw; policy accept;")
        add("raw_prerouting", f"{only_v4}jump VMAGENT_RAW_INBOUND")
        for key, srv in servers:
            add(NFT_RAW_OUTPUT_DNS, f"{key} daddr {srv} udp dport 53 ct zone set 2 return")
            add(NFT_RAW_INBOUND, f"{key} saddr {srv} udp sport 53 ct zone set 1 return")


def render(settings: CaptureSettings, backend: str) -> str:
    """The complete ruleset for ``backend`` ("iptables" or "nft") as text.

    For iptables the IPv4 and (when enabled) IPv6 inputs are separated by ``#`` comment headers,
    which iptables-restore ignores; ``apply`` feeds each to its own command.
    """
    if backend == "iptables":
        v4, v6 = render_iptables(settings)
        text = "# iptables-restore --noflush (IPv4)\n" + v4
        if v6 is not None:
            text += "# ip6tables-restore --noflush (IPv6)\n" + v6
        return text
    if backend == "nft":
        return render_nft(settings)
    raise ValueError(f"netfilter backend: {backend!r} is not one of {', '.join(BACKENDS)}")
