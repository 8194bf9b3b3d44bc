"""A small client for Envoy's admin API on loopback, with pilot-agent's readiness semantics (§8.2)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import quote

from vm_agent.http11 import HttpError, authority, fetch
from vm_agent.logs import get_logger

log = get_logger("envoy")

_STATE_NAMES = {0: "LIVE", 1: "DRAINING", 2: "PRE_INITIALIZING", 3: "INITIALIZING"}

CONFIG_STATS_FILTER = r"^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$"
LIVENESS_STATS_FILTER = r"^(server\.state|listener_manager\.workers_started)"

_NETWORK_ERRORS = (HttpError, asyncio.IncompleteReadError, TimeoutError, OSError)


def parse_stats(text: str) -> dict[str, str]:
    """``name: value`` lines from /stats; the first line for a name wins, as in Istio's parser."""
    stats: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        name = name.strip()
        if sep and name and name not in stats:
            stats[name] = value.strip()
    return stats


def _int(stats: dict[str, str], name: str) -> int:
    try:
        return int(stats.get(name, "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class UpdateStats:
    cds_success: int
    cds_rejected: int
    lds_success: int
    lds_rejected: int

    def __str__(self) -> str:
        return (
            f"cds updates: {self.cds_success} successful, {self.cds_rejected} rejected; "
            f"lds updates: {self.lds_success} successful, {self.lds_rejected} rejected"
        )


def config_error(s: UpdateStats) -> str | None:
    """Istio's config check: None once CDS and LDS were both applied, else its exact reason text."""
    if s.cds_success > 0 and s.lds_success > 0:
        return None
    if s.cds_rejected > 0 or s.lds_rejected > 0:
        return f"config received from XDS server, but was rejected: {s}"
    if s.cds_success == 0 and s.lds_success == 0:
        return f"config not received from XDS server (is Istiod running?): {s}"
    return f"config not fully received from XDS server: {s}"


def liveness_error(stats: dict[str, str]) -> str | None:
    """Istio's Envoy liveness check on ``server.state`` and ``listener_manager.workers_started``."""
    missing = [n for n in ("server.state", "listener_manager.workers_started") if n not in stats]
    if missing:
        return f"failed to get readiness stats: {', '.join(missing)} not reported"
    state = _int(stats, "server.state")
    if state != 0:
        return f"server is not live, current state is: {_STATE_NAMES.get(state, 'UNKNOWN')}"
    if _int(stats, "listener_manager.workers_started") != 1:
        return "workers have not yet started"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class EnvoyAdmin:
    """Client for ``http://<host>:<port>``, Envoy's admin listener (which only ever binds loopback)."""

    def __init__(self, port: int = 15000, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.base = f"http://{authority(host, port)}"
        # pilot-agent caches both checks after the first success; Envoy can be restarted under us, so the
        # supervisor calls reset() for every new process.
        self._config_ok = False
        self._live_ok = False

    def reset(self) -> None:
        """Forget cached readiness: a restarted Envoy has to prove itself again."""
        self._config_ok = False
        self._live_ok = False

    async def request(self, method: str, path_and_query: str, deadline_s: float = 3.0) -> tuple[int, str]:
        """One request; ``path_and_query`` is sent as given (Envoy wants bare flags like ``?usedonly``)."""
        async with asyncio.timeout(deadline_s):
            reply = await fetch(method, self.host, self.port, path_and_query)
        return reply.status, reply.text()

    async def stats(self, regex: str, deadline_s: float = 3.0) -> dict[str, str]:
        status, text = await self.request("GET", f"/stats?usedonly&filter={quote(regex, safe='')}", deadline_s)
        if status != 200:
            raise RuntimeError(f"Envoy admin answered HTTP {status} for /stats")
        return parse_stats(text)

    async def update_stats(self) -> UpdateStats:
        s = await self.stats(CONFIG_STATS_FILTER, deadline_s=1.0)
        return UpdateStats(
            cds_success=_int(s, "cluster_manager.cds.update_success"),
            cds_rejected=_int(s, "cluster_manager.cds.update_rejected"),
            lds_success=_int(s, "listener_manager.lds.update_success"),
            lds_rejected=_int(s, "listener_manager.lds.update_rejected"),
        )

    async def ready(self) -> str | None:
        """None when Envoy is LIVE with workers started and CDS+LDS applied; else the reason (Istio's texts)."""
        if not self._config_ok:
            try:
                update = await self.update_stats()
            except (*_NETWORK_ERRORS, RuntimeError) as exc:
                return f"failed to get update status stats from Envoy admin {self.base}: {_describe(exc)}"
            error = config_error(update)
            if error is not None:
                return error
            self._config_ok = True
        if not self._live_ok:
            try:
                stats = await self.stats(LIVENESS_STATS_FILTER, deadline_s=3.0)
            except (*_NETWORK_ERRORS, RuntimeError) as exc:
                return f"failed to get readiness stats from Envoy admin {self.base}: {_describe(exc)}"
            error = liveness_error(stats)
            if error is not None:
                return error
            self._live_ok = True
        return None

    async def server_state(self) -> str | None:
        """Envoy's own /ready answer (LIVE, PRE_INITIALIZING, ...), or None when the admin does not answer."""
        try:
            _, text = await self.request("GET", "/ready", deadline_s=1.0)
        except _NETWORK_ERRORS:
            return None
        return text.strip()

    async def live(self) -> bool:
        return await self.server_state() == "LIVE"

    async def drain_listeners(self, inbound_only: bool = True, graceful: bool = True, skip_exit: bool = False) -> None:
        """Ask Envoy to drain; failures are logged, not raised (shutdown goes on either way)."""
        wanted = (("inboundonly", inbound_only), ("graceful", graceful), ("skip_exit", skip_exit))
        query = "&".join(name for name, on in wanted if on)
        path = "/drain_listeners" + (f"?{query}" if query else "")
        try:
            status, text = await self.request("POST", path, deadline_s=2.0)
        except _NETWORK_ERRORS as exc:
            log.warning("could not ask Envoy to drain (%s): %s", path, _describe(exc))
            return
        if status != 200:
            log.warning("Envoy answered HTTP %d to %s: %s", status, path, text.strip()[:200])

    async def prometheus(self, query: str = "", deadline_s: float = 5.0) -> str:
        status, text = await self.request("GET", "/stats/prometheus" + (f"?{query}" if query else ""), deadline_s)
        if status != 200:
            raise RuntimeError(f"Envoy admin answered HTTP {status} for /stats/prometheus")
        return text
