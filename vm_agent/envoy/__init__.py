"""Envoy: bootstrap rendering, the supervised process and its admin API."""

from vm_agent.envoy.admin import EnvoyAdmin
from vm_agent.envoy.bootstrap import EnvoySettings, NodeInfo, envoy_command, render_bootstrap, write_bootstrap
from vm_agent.envoy.supervisor import Backoff, Supervisor

__all__ = [
    "Backoff",
    "EnvoyAdmin",
    "EnvoySettings",
    "NodeInfo",
    "Supervisor",
    "envoy_command",
    "render_bootstrap",
    "write_bootstrap",
]
