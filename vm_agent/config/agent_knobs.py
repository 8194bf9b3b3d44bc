"""Rules for the agent's own knobs that are more than a type conversion."""

from __future__ import annotations

MIN_HEALTH_HEARTBEAT_S = 30 * 60
"""Every health report is a WorkloadEntry status write in istiod (istiod-facts-2.md): a periodic one must be rare."""


def heartbeat_problem(seconds: float) -> str | None:
    """Why a VM_AGENT_HEALTH_HEARTBEAT value is refused, or ``None``."""
    if seconds == 0 or seconds >= MIN_HEALTH_HEARTBEAT_S:
        return None
    return (
        f"expected 0 (off, the default) or at least 30m, got {seconds:g}s: every health report is a "
        "WorkloadEntry status write in istiod, and the agent already re-sends after reconnects and lost reports"
    )


def proxy_log_level(agent_flags: str) -> tuple[str, str | None]:
    """Envoy's (level, component levels) from pilot-agent's ``--proxyLogLevel=`` in ISTIO_AGENT_FLAGS."""
    level = "warning"
    component: str | None = None
    for flag in agent_flags.split():
        if flag.startswith("--proxyLogLevel="):
            globals_: list[str] = []
            comps: list[str] = []
            for item in flag.split("=", 1)[1].split(","):
                (comps if ":" in item else globals_).append(item)
            if globals_:
                level = globals_[-1]
            if comps:
                component = ",".join(c for c in comps if c.count(":") == 1)
    return level, component
