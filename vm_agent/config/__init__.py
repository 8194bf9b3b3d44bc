"""Reading and validating every input of the agent (istioctl's VM files, environment, resolv.conf)."""

from vm_agent.config.probe import (
    ExecAction,
    GrpcAction,
    HttpGetAction,
    ProbeAction,
    ReadinessProbe,
    TcpSocketAction,
)
from vm_agent.config.problems import ConfigError, Problem

__all__ = [
    "ConfigError",
    "ExecAction",
    "GrpcAction",
    "HttpGetAction",
    "ProbeAction",
    "Problem",
    "ReadinessProbe",
    "TcpSocketAction",
]
