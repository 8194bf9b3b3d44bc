"""The agent's status server (readiness, merged metrics, quit/drain, debug), sd_notify, and `vm-agent status`."""

from typing import Any

from vm_agent.status.notify import notify, watchdog_loop
from vm_agent.status.server import StatusServer, StatusSettings


def __getattr__(name: str) -> Any:
    # `vm-agent status` needs urllib's HTTP client (http.client, email, ...); the running agent never does.
    if name == "status_command":
        from vm_agent.status.client import status_command

        return status_command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["StatusServer", "StatusSettings", "notify", "status_command", "watchdog_loop"]
