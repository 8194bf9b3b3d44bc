"""The agent's status server (readiness, merged metrics, quit/drain, debug), sd_notify, and `vm-agent status`."""

from vm_agent.status.client import status_command
from vm_agent.status.notify import notify, watchdog_loop
from vm_agent.status.server import StatusServer, StatusSettings

__all__ = ["StatusServer", "StatusSettings", "notify", "status_command", "watchdog_loop"]
