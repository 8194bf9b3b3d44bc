"""The status server (pilot-agent's :15020): readiness, merged metrics, quit/drain, debug endpoints.

Product decision: it listens on 127.0.0.1 unless configured, and the debug and control endpoints answer
loopback clients only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vm_agent.http11 import HttpError, Request, Response, fetch, start_server
from vm_agent.logs import get_logger
from vm_agent.metrics import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest

log = get_logger("status")

_COUNTDOWN = re.compile(r"\d+(?:\.\d+)?s\b")

SCRAPE_ERRORS = Counter(
    "vm_agent_status_scrape_errors", "Failed scrapes of Envoy's stats for /stats/prometheus", registry=REGISTRY
)
READINESS_FAILURES = Counter("vm_agent_status_readiness_failures", "Readiness requests answered 503", registry=REGISTRY)

ReadyCheck = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class StatusSettings:
    listen_host: str = "127.0.0.1"
    port: int = 15020
    envoy_admin_port: int = 15000
    envoy_prometheus_port: int = 15090
    # Envoy's stats are read from its admin listener, which binds ::1 instead on IPv6-only hosts.
    envoy_admin_host: str = "127.0.0.1"
    # METRICS_LOCALHOST_ACCESS_ONLY: the merged metrics are then served to loopback clients only.
    metrics_localhost_only: bool = False

    def __post_init__(self) -> None:
        for name in ("port", "envoy_admin_port", "envoy_prometheus_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 65536:
                raise ValueError(f"StatusSettings.{name}: expected a TCP port 0..65535, got {value!r}")


def is_loopback_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _is_loopback(request: Request) -> bool:
    return request.peer is not None and is_loopback_address(request.peer)


class StatusServer:
    def __init__(
        self,
        settings: StatusSettings,
        *,
        envoy_ready: ReadyCheck,
        readiness_checks: Sequence[ReadyCheck] = (),
        snapshots: Mapping[str, Callable[[], dict[str, Any]]] | None = None,
        ndsz: Callable[[], dict[str, Any]] | None = None,
        on_quit: Callable[[], Awaitable[None]] | None = None,
        on_drain: Callable[[], Awaitable[None]] | None = None,
        envoy_metrics: Callable[[str], str] | None = None,
    ) -> None:
        self.settings = settings
        # Envoy's Prometheus text → what the merged endpoint serves (Istio's metric names, vm_agent.telemetry).
        self._envoy_metrics = envoy_metrics
        self._envoy_ready = envoy_ready
        self._checks = list(readiness_checks)
        self._snapshots = dict(snapshots or {})
        self._ndsz = ndsz
        self._on_quit = on_quit
        self._on_drain = on_drain
        self._shutting_down = False
        self._last_reason: str | None = "not checked yet"
        self._logged_reason: str | None = "not checked yet"
        self._background: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()
        self.port: int | None = None
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/healthz/ready": self._ready,
            "/stats/prometheus": self._metrics,
            "/metrics": self._metrics,
            "/quitquitquit": self._quit,
            "/drain": self._drain,
            "/debug/ndsz": self._debug_ndsz,
            "/debug/status": self._debug_status,
        }

    def set_shutting_down(self) -> None:
        """Readiness answers 503 "server is terminated" from now on, as pilot-agent does once its context ends."""
        self._shutting_down = True

    def snapshot(self) -> dict[str, Any]:
        return {
            "listening": f"{self.settings.listen_host}:{self.port}" if self.port is not None else None,
            "serving": self.ready.is_set(),
            "shutting_down": self._shutting_down,
            "last_readiness_reason": self._last_reason,
        }

    async def readiness(self) -> str | None:
        """None when ready, else the first reason (Envoy first, then the agent's own checks)."""
        if self._shutting_down:
            return "server is terminated"
        for check in (self._envoy_ready, *self._checks):
            try:
                reason = await check()
            except Exception as err:  # a broken check must not turn readiness into a 500
                log.warning("readiness check %r raised: %s", check, err)
                reason = f"readiness check failed: {type(err).__name__}: {err}"
            if reason is not None:
                return reason
        return None

    # --- handlers ---
    async def _handle(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return Response.text("404: Not Found", 404)
        return await route(request)

    async def _ready(self, _: Request) -> Response:
        reason = await self.readiness()
        # A probe every second must not log every second: a reason logs when it changes, not when only its
        # countdown ("restarting in 7.1s") does.
        key = None if reason is None else _COUNTDOWN.sub("", reason)
        if key != self._logged_reason:
            log.info("readiness: %s", "ready" if reason is None else f"not ready: {reason}")
            self._logged_reason = key
        self._last_reason = reason
        if reason is None:
            return Response()
        READINESS_FAILURES.inc()
        return Response.text(reason + "\n", 503)

    async def _envoy_stats(self, request: Request) -> str:
        """Envoy's Prometheus text (through the telemetry rewrite), or "" when Envoy does not answer."""
        target = "/stats/prometheus" + (f"?{request.query}" if request.query else "")
        # Only the classic text format is asked of Envoy (§8.2); the scraper's identity and deadline pass on.
        headers = [("Accept", "text/plain")]
        for name in ("User-Agent", "X-Prometheus-Scrape-Timeout-Seconds"):
            value = request.headers.get(name)
            if value is not None:
                headers.append((name, value))
        try:
            async with asyncio.timeout(5):
                reply = await fetch(
                    "GET", self.settings.envoy_admin_host, self.settings.envoy_admin_port, target, headers=headers
                )
        except (HttpError, asyncio.IncompleteReadError, TimeoutError, OSError):
            SCRAPE_ERRORS.inc()
            return ""
        if reply.status != 200:
            SCRAPE_ERRORS.inc()
            return ""
        text = reply.text()
        return self._envoy_metrics(text) if self._envoy_metrics is not None else text

    async def _metrics(self, request: Request) -> Response:
        if self.settings.metrics_localhost_only and not _is_loopback(request):
            return Response.text("metrics are served to loopback clients only\n", 403)
        envoy_text = await self._envoy_stats(request)
        agent_text = generate_latest(REGISTRY).decode()
        body = agent_text + ("\n" if agent_text and not agent_text.endswith("\n") else "") + envoy_text
        response = Response(body=body.encode(), content_type=CONTENT_TYPE_LATEST)
        if "gzip" in (request.headers.get("Accept-Encoding") or ""):
            response = response.gzipped()
        return response

    def _local_post(self, request: Request) -> Response | None:
        # Like pilot-agent: the loopback check comes before the method check.
        if not _is_loopback(request):
            return Response.text("only loopback clients may do this\n", 403)
        if request.method != "POST":
            return Response.text("POST only\n", 405)
        return None

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def wrapper() -> None:
            await coro

        task = asyncio.ensure_future(wrapper())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quit(self, request: Request) -> Response:
        denied = self._local_post(request)
        if denied is not None:
            return denied
        if self._on_quit is not None:
            self._spawn(self._on_quit())
        return Response.text("OK")

    async def _drain(self, request: Request) -> Response:
        denied = self._local_post(request)
        if denied is not None:
            return denied
        if self._on_drain is not None:
            await self._on_drain()
        return Response.text("OK")

    async def _debug_ndsz(self, request: Request) -> Response:
        if not _is_loopback(request):
            return Response(status=403)
        if self._ndsz is None:
            return Response.json({}, 404)
        return Response.json(self._ndsz(), indent=1)

    async def _debug_status(self, request: Request) -> Response:
        if not _is_loopback(request):
            return Response(status=403)
        doc: dict[str, Any] = {}
        for name, snap in self._snapshots.items():
            try:
                doc[name] = snap()
            except Exception as err:
                doc[name] = {"error": f"{type(err).__name__}: {err}"}
        reason = await self.readiness()
        doc["ready"] = {"ready": reason is None, "reason": reason}
        return Response.json(doc, indent=1, default=str)

    async def run(self) -> None:
        server = await start_server(self._handle, self.settings.listen_host, self.settings.port)
        try:
            sockets = server.sockets
            self.port = int(sockets[0].getsockname()[1]) if sockets else self.settings.port
            log.info("status server on %s:%d", self.settings.listen_host, self.port)
            self.ready.set()
            await asyncio.Event().wait()
        finally:
            self.ready.clear()
            for task in list(self._background):
                task.cancel()
            await asyncio.shield(server.close())
