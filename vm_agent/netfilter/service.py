"""The capture as a service of the agent: installed at start, kept installed, removed at stop.

A firewall reload (firewalld, ufw, an operator's ``iptables -F``) silently drops our rules and
the VM leaves the mesh without anyone noticing; the service checks the installed shape every
``verify_interval`` seconds and re-applies, counting each repair.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from vm_agent.logs import get_logger
from vm_agent.netfilter.backend import OPERATIONS, NetfilterError, apply, cleanup, detect_backend, verify
from vm_agent.netfilter.settings import CaptureSettings

log = get_logger("netfilter")

_RETRY_MIN = 1.0
_RETRY_MAX = 30.0


class CaptureService:
    def __init__(
        self,
        settings: CaptureSettings,
        backend: str = "auto",
        *,
        cleanup_on_exit: bool = True,
        verify_interval: float = 30.0,
        netns: str | None = None,
    ) -> None:
        settings.validate()
        if backend not in ("auto", "iptables", "nft"):
            raise ValueError(f"CaptureService backend: {backend!r} is not one of auto, iptables, nft")
        if not verify_interval > 0:
            raise ValueError(f"CaptureService verify_interval: {verify_interval!r} must be > 0 seconds")
        self.settings = settings
        self.requested_backend = backend
        self.cleanup_on_exit = cleanup_on_exit
        self.verify_interval = verify_interval
        self.netns = netns
        self.ready = asyncio.Event()
        self.backend: str | None = None
        self.applies = 0
        self.repairs = 0
        self.last_error = ""
        self.last_applied = 0.0
        # Held while rules are being changed: a stop that arrives mid-apply (the apply runs in a
        # thread that cancellation cannot interrupt) waits for it, then removes what it installed.
        self._lock = threading.Lock()
        self._attempted = False
        self.agent_exempt = _exempt(settings)
        if not self.agent_exempt and netns is None:
            log.warning(
                "the agent runs as uid %d gid %d but the capture exempts uid %d / gid %d: its own DNS "
                "forwarding and istiod connection will be captured; run it as the proxy user or group",
                os.getuid(), os.getgid(), settings.proxy_uid, settings.proxy_gid,
            )  # fmt: skip

    async def run(self) -> None:
        delay = _RETRY_MIN
        try:
            while True:
                try:
                    await asyncio.to_thread(self._ensure)
                except NetfilterError as err:
                    self.ready.clear()
                    self.last_error = str(err)
                    log.warning("capture rules not installed, retrying in %.0fs: %s", delay, err)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
                    continue
                delay = _RETRY_MIN
                self.ready.set()
                await asyncio.sleep(self.verify_interval)
        finally:
            self.ready.clear()
            if self.cleanup_on_exit:
                # Synchronous on purpose: a cancelled task may not get another await, and leaving
                # the VM's traffic pointed at a stopped Envoy is the one thing stop must not do.
                with self._lock:
                    if self._attempted:
                        self._remove()

    def _remove(self) -> None:
        try:
            cleanup("auto", netns=self.netns)
            log.info("capture rules removed at stop")
        except NetfilterError as err:
            log.error("capture rules could not be removed at stop: %s", err)

    def _ensure(self) -> None:
        with self._lock:
            self._attempted = True
            self._ensure_locked()

    def _ensure_locked(self) -> None:
        if self.backend is None:
            backend = detect_backend(netns=self.netns) if self.requested_backend == "auto" else self.requested_backend
            apply(self.settings, backend, netns=self.netns)
            self.backend = backend
            self._applied()
            return
        drift = verify(self.settings, self.backend, netns=self.netns)
        if drift is None:
            return
        log.warning("capture rules changed underneath us, re-applying: %s", drift)
        apply(self.settings, self.backend, netns=self.netns)
        self.repairs += 1
        OPERATIONS.labels("repair", self.backend, "ok").inc()
        self._applied()

    def _applied(self) -> None:
        self.applies += 1
        self.last_applied = time.time()
        self.last_error = ""

    async def check(self) -> str | None:
        """Readiness: None once the capture is installed, else why not."""
        if self.ready.is_set():
            return None
        return f"traffic capture not installed: {self.last_error or 'not applied yet'}"

    def snapshot(self) -> dict[str, Any]:
        s = self.settings
        return {
            "installed": self.ready.is_set(),
            "backend": self.backend or self.requested_backend,
            "dns_capture": s.redirect_dns,
            "capture_all_dns": s.capture_all_dns,
            "dns_servers": [*s.dns_servers_v4, *s.dns_servers_v6],
            "inbound_ports": s.inbound_ports,
            "ipv6": s.ipv6,
            "applies": self.applies,
            "repairs": self.repairs,
            "last_applied": self.last_applied,
            "last_error": self.last_error,
            "agent_exempt": self.agent_exempt,
        }


def _exempt(settings: CaptureSettings) -> bool:
    """Whether sockets this process opens match the owner rules (fsuid / primary fsgid)."""
    return os.geteuid() == settings.proxy_uid or os.getegid() == settings.proxy_gid
