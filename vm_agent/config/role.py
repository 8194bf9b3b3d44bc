"""The agent's role: a sidecar for the VM's own workload (the default), or an Istio gateway.

A gateway is what pilot-agent runs as ``proxy router``: node type ``router``, identity and SDS as for a sidecar,
but no traffic or DNS capture and no readiness probe reported to istiod (a gateway has no WorkloadEntry health;
its readiness is Envoy's). Settings that only make sense for a sidecar are refused, naming the setting, rather
than silently ignored: an operator who asked for capture on a gateway has a mistake somewhere.
"""

from __future__ import annotations

from collections.abc import Callable

from vm_agent.config.envreader import EnvReader
from vm_agent.config.model import ProxyConfig

ROLES = ("sidecar", "gateway")
ROLE_KEY = "VM_AGENT_ROLE"


def read_role(env: EnvReader) -> str:
    role = (env.get(ROLE_KEY) or "sidecar").strip().lower()
    if role not in ROLES:
        env.problem(ROLE_KEY, f"expected sidecar or gateway, got {role!r}")
        return "sidecar"
    return role


def check_gateway(
    env: EnvReader, proxy: ProxyConfig, *, interception_set: bool, report_proxy_config: Callable[[str, str], None]
) -> None:
    """Problems for settings that contradict the gateway role (``interception_set``: the operator wrote
    ``interceptionMode`` in mesh.yaml or PROXY_CONFIG rather than inheriting the sidecar default)."""
    if proxy.readiness_probe is not None:
        report_proxy_config(
            "readinessProbe",
            "the gateway role reports no readiness probe to istiod (a gateway's readiness is Envoy's): remove the "
            "probe from the WorkloadGroup the files came from, or run as a sidecar",
        )
    if interception_set and proxy.interception_mode != "NONE":
        report_proxy_config(
            "interceptionMode",
            f"the gateway role captures no traffic, got {proxy.interception_mode}: set NONE or leave it out, or run "
            "as a sidecar",
        )
    if env.bool("VM_AGENT_MANAGE_CAPTURE", False):
        env.problem("VM_AGENT_MANAGE_CAPTURE", "the gateway role captures no traffic: expected false")
