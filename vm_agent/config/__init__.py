"""Reading and validating every input of the agent (istioctl's VM files, environment, resolv.conf)."""

from vm_agent.config.loader import Options, load
from vm_agent.config.model import (
    AgentConfig,
    CaptureConfig,
    Config,
    DnsConfig,
    IdentityConfig,
    Node,
    Paths,
    ProxyConfig,
    Upstream,
)
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
    "AgentConfig",
    "CaptureConfig",
    "Config",
    "ConfigError",
    "DnsConfig",
    "ExecAction",
    "GrpcAction",
    "HttpGetAction",
    "IdentityConfig",
    "Node",
    "Options",
    "Paths",
    "ProbeAction",
    "Problem",
    "ProxyConfig",
    "ReadinessProbe",
    "TcpSocketAction",
    "Upstream",
    "load",
]
