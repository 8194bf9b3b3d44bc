"""Checks 9 and 10: the readiness probe's result now, and the address the agent will advertise (INSTANCE_IPS)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import psutil

from vm_agent.agent import health_settings
from vm_agent.config import ExecAction, GrpcAction, HttpGetAction, ProbeAction, TcpSocketAction
from vm_agent.doctor.context import Context
from vm_agent.doctor.result import CheckResult, fail, ok, skip, warn
from vm_agent.health import probe_once

READINESS_PROBE = "readiness-probe"
INSTANCE_IPS = "instance-ips"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_probe(action: ProbeAction, default_host: str) -> str:
    if isinstance(action, HttpGetAction):
        return f"httpGet {action.scheme}://{_join(action.host or default_host, action.port)}{action.path or '/'}"
    if isinstance(action, TcpSocketAction):
        return f"tcpSocket {_join(action.host or default_host, action.port)}"
    if isinstance(action, ExecAction):
        return f"exec {' '.join(action.command)}"
    if isinstance(action, GrpcAction):
        return f"grpc {_join(default_host, action.port)}" + (f" service {action.service}" if action.service else "")
    return repr(action)


async def check_readiness_probe(ctx: Context) -> CheckResult:
    settings = health_settings(ctx.config)
    if settings is None:
        return skip(
            READINESS_PROBE,
            "no readinessProbe configured (the WorkloadGroup has none): istiod is told nothing about health",
        )
    probe = settings.probe
    what = describe_probe(probe.action, settings.default_host)
    timeout = min(float(probe.timeout_seconds), ctx.options.probe_timeout_cap_s)
    details: dict[str, Any] = {"probe": what, "timeout_s": timeout, "source_address": settings.source_address}
    passed, why = await probe_once(
        probe.action, default_host=settings.default_host, timeout=timeout, source_address=settings.source_address
    )
    if passed:
        return ok(READINESS_PROBE, f"{what} passes now", **details)
    details["error"] = why
    return fail(
        READINESS_PROBE,
        f"{what} fails now: {why}",
        "start the application, or fix the WorkloadGroup's probe (port, path, host); until it passes istiod "
        "keeps this workload unhealthy and sends it no traffic",
        **details,
    )


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(entry.address.split("%", 1)[0]))
                except ValueError:
                    continue
    return found


def _source(ctx: Context) -> str:
    env = ctx.config.env
    if env.get("INSTANCE_IP"):
        return "INSTANCE_IP"
    if env.get("ISTIO_SVC_IP"):
        return "ISTIO_SVC_IP"
    return "this host's interfaces"


async def check_instance_ips(ctx: Context) -> CheckResult:
    ips = list(ctx.config.node.instance_ips)
    advertised = ips[0]
    source = _source(ctx)
    try:
        local = local_addresses()
    except (OSError, RuntimeError) as exc:  # psutil needs /proc
        return warn(INSTANCE_IPS, f"advertises {advertised} (from {source}); cannot list this host's addresses: {exc}")
    mine = sorted(str(a) for a in local if not (a.is_loopback or a.is_link_local))
    parsed = [ipaddress.ip_address(ip) for ip in ips]
    foreign = [str(ip) for ip in parsed if ip not in local and not ip.is_loopback]
    details: dict[str, Any] = {"instance_ips": ips, "source": source, "host_addresses": mine, "not_local": foreign}
    hint = f"set ISTIO_SVC_IP in cluster.env to the address the mesh reaches this VM on ({', '.join(mine) or 'none'})"
    if str(parsed[0]) in foreign:
        return fail(
            INSTANCE_IPS,
            f"advertises {advertised} (from {source}), which is not an address of this host: "
            "the mesh would send this workload's traffic elsewhere",
            hint,
            **details,
        )
    if parsed[0].is_loopback:
        return warn(
            INSTANCE_IPS,
            f"advertises {advertised} (from {source}), a loopback address other workloads cannot reach",
            hint,
            **details,
        )
    if foreign:
        return warn(
            INSTANCE_IPS,
            f"advertises {', '.join(ips)}; {', '.join(foreign)} is not an address of this host",
            hint,
            **details,
        )
    return ok(INSTANCE_IPS, f"advertises {', '.join(ips)} (from {source}), all addresses of this host", **details)
