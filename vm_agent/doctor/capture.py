"""Checks 7 and 12: the capture rules (what `vm-agent netfilter show` reads) and DNS capture answering.

A DNS answer alone cannot say who gave it, so the DNS check asks the resolver of resolv.conf for a name only
the agent's NameTable knows and expects the table's address back; with an empty table it watches the
agent's own query counter instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from typing import Any

from dnslib import QTYPE, DNSRecord

from vm_agent.agent import capture_settings
from vm_agent.doctor.context import Context
from vm_agent.doctor.result import CheckResult, fail, ok, skip, warn
from vm_agent.doctor.running import AGENT, Unreachable, get_json
from vm_agent.netfilter import NFT_TABLE, CaptureSettingsError, NetfilterError, show, verify

CAPTURE_RULES = "capture-rules"
DNS_CAPTURE = "dns-capture"

_APPLY_HINT = (
    "`sudo vm-agent netfilter apply` installs them from this configuration (the systemd unit runs it before "
    "the agent starts); `systemctl restart vm-agent` does the same"
)


def _capture_off(ctx: Context) -> str | None:
    config = ctx.config
    if config.proxy.interception_mode == "NONE":
        return "traffic capture is off (ProxyConfig interceptionMode NONE)"
    if not config.capture.enabled:
        return "vm-agent does not own the capture rules here (ISTIO_CUSTOM_IP_TABLES=true)"
    return None


async def check_capture_rules(ctx: Context) -> CheckResult:
    off = _capture_off(ctx)
    if off:
        return skip(CAPTURE_RULES, off)
    try:
        settings = capture_settings(ctx.config)
        settings.validate()
    except CaptureSettingsError as exc:
        return fail(CAPTURE_RULES, f"the capture cannot be rendered: {exc}", "fix that setting in cluster.env")
    if os.geteuid() != 0:
        return warn(
            CAPTURE_RULES,
            "not checked: reading netfilter rules needs root",
            "run `sudo vm-agent doctor`",
        )
    if shutil.which("nft") is None and shutil.which("iptables-save") is None:
        return fail(
            CAPTURE_RULES,
            "neither nft nor iptables-save is installed, so no capture can be in place",
            "install nftables or iptables (Debian: apt-get install nftables)",
        )
    installed = {backend: await asyncio.to_thread(show, backend) for backend in ("nft", "iptables")}
    present = [backend for backend, text in installed.items() if text]
    details: dict[str, Any] = {"backends": present, "dns_capture": settings.redirect_dns}
    if not present:
        return fail(
            CAPTURE_RULES,
            f"no vm-agent capture rules are installed (no VMAGENT_* chains, no table {NFT_TABLE})",
            _APPLY_HINT,
            **details,
        )
    if len(present) > 1:
        return fail(
            CAPTURE_RULES,
            "capture rules of both nft and iptables are installed: traffic would be redirected twice",
            "`sudo vm-agent netfilter cleanup`, then `sudo vm-agent netfilter apply`",
            **details,
        )
    backend = present[0]
    try:
        drift = await asyncio.to_thread(verify, settings, backend)
    except NetfilterError as exc:
        return fail(CAPTURE_RULES, f"cannot read the {backend} rules: {exc}", _APPLY_HINT, **details)
    if drift is not None:
        return fail(
            CAPTURE_RULES,
            f"the {backend} rules differ from this configuration: {drift}",
            _APPLY_HINT,
            **details,
        )
    where = f"table {NFT_TABLE}" if backend == "nft" else "VMAGENT_* chains"
    dns = "DNS capture on" if settings.redirect_dns else "DNS capture off"
    return ok(CAPTURE_RULES, f"installed with {backend} ({where}) as this configuration renders them; {dns}", **details)


def _mesh_name(ndsz: dict[str, Any] | None) -> tuple[str, str, list[str]] | None:
    """(name, qtype, addresses) of a NameTable entry with addresses; IPv4 preferred."""
    table = ((ndsz or {}).get("table") or {}).get("table") or {}
    best: tuple[str, str, list[str]] | None = None
    for name, info in sorted(table.items()):
        ips = [str(ip) for ip in (info or {}).get("ips") or []]
        v4 = [ip for ip in ips if ":" not in ip]
        if v4:
            return name, "A", v4
        if ips and best is None:
            best = (name, "AAAA", ips)
    return best


def _ask(server: str, name: str, qtype: str, timeout: float) -> DNSRecord:
    raw = DNSRecord.question(name, qtype).send(server, 53, tcp=False, timeout=timeout, ipv6=":" in server)
    return DNSRecord.parse(raw)


def _queries(status: dict[str, Any] | None) -> int | None:
    counts = ((status or {}).get("dns") or {}).get("queries")
    return sum(int(v) for v in counts.values()) if isinstance(counts, dict) else None


async def check_dns_capture(ctx: Context) -> CheckResult:
    config = ctx.config
    if not (config.dns.capture and config.capture.dns_capture):
        return skip(DNS_CAPTURE, "DNS capture is off (ISTIO_META_DNS_CAPTURE is not true, or REDIRECT_DNS=false)")
    if config.proxy.interception_mode == "NONE":
        return skip(DNS_CAPTURE, "traffic capture is off (ProxyConfig interceptionMode NONE)")
    agent = await ctx.result(AGENT, for_check=DNS_CAPTURE)
    if not agent.details.get("running"):
        return skip(DNS_CAPTURE, f"the agent is not running, so its DNS proxy cannot answer (see {AGENT})")
    rules = await ctx.result(CAPTURE_RULES, for_check=DNS_CAPTURE)
    if rules.failed:
        return skip(DNS_CAPTURE, f"the capture rules are not in place (see {CAPTURE_RULES})")
    cap = config.capture
    if os.geteuid() == cap.proxy_uid or os.getegid() == cap.proxy_gid:
        return skip(
            DNS_CAPTURE,
            f"doctor runs as the proxy user or group ({cap.proxy_uid}/{cap.proxy_gid}), whose queries are never "
            "captured; run it as root to test the capture",
        )
    if not config.dns.upstreams:
        return skip(DNS_CAPTURE, f"{config.paths.resolv_conf} lists no nameserver to send a query to")
    resolver = config.dns.upstreams[0][0]
    try:
        picked = _mesh_name(await get_json(ctx, "/debug/ndsz"))
        # With no mesh name to ask for, the agent's own query counter tells whether a query reached it.
        before = None if picked else _queries(await get_json(ctx, "/debug/status"))
    except Unreachable as exc:
        return skip(DNS_CAPTURE, f"the agent's status server stopped answering ({exc})")
    name, qtype, expected = picked or (f"vm-agent-doctor-{secrets.token_hex(4)}.invalid", "A", [])
    details: dict[str, Any] = {"resolver": f"{resolver}:53", "name": name, "expected": expected, "answer": None}
    timeout = ctx.options.timeout_s
    hint = (
        f"queries to {resolver}:53 must reach the agent's DNS proxy: check `sudo vm-agent netfilter show` "
        "(REDIRECT_DNS, CAPTURE_ALL_DNS) and that the proxy listens where the rules send them (DNS_PROXY_ADDR)"
    )
    try:
        reply = await asyncio.to_thread(_ask, resolver, name, qtype, timeout)
    except (OSError, ValueError) as exc:  # socket.timeout is an OSError
        summary = f"no answer from {resolver}:53 for {name} within {timeout:g}s ({exc})"
        return fail(DNS_CAPTURE, summary, hint, **details)
    answer = [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
    rcode = reply.header.rcode
    details["answer"] = answer
    if picked:
        if set(answer) & set(expected):
            return ok(DNS_CAPTURE, f"{resolver}:53 answered {name} with the NameTable's {', '.join(answer)}", **details)
        got = ", ".join(answer) if answer else f"rcode {rcode}, no address"
        return fail(
            DNS_CAPTURE,
            f"{resolver}:53 answered {name} with {got}, not the NameTable's {', '.join(expected)}: "
            "the query did not reach the agent",
            hint,
            **details,
        )
    try:
        after = _queries(await get_json(ctx, "/debug/status"))
    except Unreachable:
        after = None
    if before is None or after is None:
        return skip(DNS_CAPTURE, "the NameTable is empty and the agent's DNS counters are not readable", **details)
    if after > before:
        return ok(DNS_CAPTURE, f"a query to {resolver}:53 reached the agent's DNS proxy (NameTable empty)", **details)
    return fail(DNS_CAPTURE, f"a query to {resolver}:53 did not reach the agent's DNS proxy", hint, **details)
