"""What every check can read: the configuration, the options, facts several checks share, earlier results.

Checks run concurrently (doctor must answer in seconds when everything is down, and most checks wait on
a timeout then); a check that depends on another awaits that one's result, which is always an earlier
check in the fixed order, so there is no cycle.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property

from vm_agent.config import Config
from vm_agent.doctor.identity_facts import CertificateFacts, TokenFacts, certificate_facts, token_facts
from vm_agent.doctor.result import CheckResult

DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("doctor_check_deadline", default=None)
"""The running check's deadline; waiting for an earlier check does not use it up."""


@dataclass(frozen=True)
class DoctorOptions:
    timeout_s: float = 2.0
    """Network waits: name resolution, TCP, TLS, DNS, the status server."""
    process_timeout_s: float = 5.0
    """Local commands: ``envoy --version``, iptables-save, nft."""
    probe_timeout_cap_s: float = 5.0
    """The readiness probe runs with its own timeoutSeconds, but never longer than this."""
    check_deadline_s: float = 15.0
    """A check that has not answered by then is reported as failed (a bug, or a wedged command)."""
    status_url: str | None = None
    """The running agent's status server; None: derived from the configuration (statusPort, host)."""


class Context:
    def __init__(self, config: Config, options: DoctorOptions, order: tuple[str, ...]) -> None:
        self.config = config
        self.options = options
        self._order = order
        self._tasks: dict[str, asyncio.Task[CheckResult]] = {}

    def register(self, check_id: str, task: asyncio.Task[CheckResult]) -> None:
        self._tasks[check_id] = task

    async def result(self, check_id: str, *, for_check: str) -> CheckResult:
        """The result of an earlier check (awaited if it is still running)."""
        if self._order.index(check_id) >= self._order.index(for_check):
            raise RuntimeError(f"doctor check {for_check!r} may only depend on earlier checks, not {check_id!r}")
        scope = DEADLINE.get()
        when = scope.when() if scope is not None else None
        if scope is None or when is None:
            return await asyncio.shield(self._tasks[check_id])
        # The earlier check has a deadline of its own; the time spent waiting for it is given back.
        loop = asyncio.get_running_loop()
        started = loop.time()
        scope.reschedule(None)
        try:
            return await asyncio.shield(self._tasks[check_id])
        finally:
            scope.reschedule(when + (loop.time() - started))

    @cached_property
    def token(self) -> TokenFacts:
        return token_facts(self.config)

    @cached_property
    def certificate(self) -> CertificateFacts:
        return certificate_facts(self.config)

    @property
    def status_url(self) -> str:
        if self.options.status_url:
            return self.options.status_url.rstrip("/")
        host = self.config.agent.status_host
        # A wildcard listener is reachable on loopback; /debug answers loopback clients only.
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.config.proxy.status_port}"
