"""The status server (pilot-agent's :15020): readiness, merged metrics, quit/drain, debug endpoints.

Product decision: it listens on 127.0.0.1 unless configured, and the debug and control endpoints answer
loopback clients only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY

log = get_logger("status")

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


def _is_loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    return is_loopback_address(str(peer[0]))


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
        self._background: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()
        self.port: int | None = None

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
    async def _ready(self, _: web.Request) -> web.Response:
        reason = await self.readiness()
        if reason != self._last_reason:
            log.info("readiness: %s", "ready" if reason is None else f"not ready: {reason}")
            self._last_reason = reason
        if reason is None:
            return web.Response(status=200)
        READINESS_FAILURES.inc()
        return web.Response(status=503, text=reason + "\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.settings.metrics_localhost_only and not _is_loopback(request):
            return web.Response(status=403, text="metrics are served to loopback clients only\n")
        envoy_text = ""
        host = self.settings.envoy_admin_host
        url = f"http://{f'[{host}]' if ':' in host else host}:{self.settings.envoy_admin_port}/stats/prometheus"
        if request.query_string:
            url += "?" + request.query_string
        # Only the classic text format is asked of Envoy (§8.2); the scraper's identity and deadline pass on.
        headers = {"Accept": "text/plain"}
        for name in ("User-Agent", "X-Prometheus-Scrape-Timeout-Seconds"):
            if name in request.headers:
                headers[name] = request.headers[name]
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(url, headers=headers) as resp,
            ):
                if resp.status == 200:
                    envoy_text = await resp.text()
                    if self._envoy_metrics is not None:
                        envoy_text = self._envoy_metrics(envoy_text)
                else:
                    SCRAPE_ERRORS.inc()
        except (aiohttp.ClientError, TimeoutError, OSError):
            SCRAPE_ERRORS.inc()
        agent_text = generate_latest(REGISTRY).decode()
        body = agent_text + ("\n" if agent_text and not agent_text.endswith("\n") else "") + envoy_text
        response = web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression()
        return response

    def _local_post(self, request: web.Request) -> web.Response | None:
        # Like pilot-agent: the loopback check comes before the method check.
        if not _is_loopback(request):
            return web.Response(status=403, text="only loopback clients may do this\n")
        if request.method != "POST":
            return web.Response(status=405, text="POST only\n")
        return None

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def wrapper() -> None:
            await coro

        task = asyncio.ensure_future(wrapper())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quit(self, request: web.Request) -> web.Response:
        denied = self._local_post(request)
        if denied is not None:
            return denied
        if self._on_quit is not None:
            self._spawn(self._on_quit())
        return web.Response(text="OK")

    async def _drain(self, request: web.Request) -> web.Response:
        denied = self._local_post(request)
        if denied is not None:
            return denied
        if self._on_drain is not None:
            await self._on_drain()
        return web.Response(text="OK")

    async def _debug_ndsz(self, request: web.Request) -> web.Response:
        if not _is_loopback(request):
            return web.Response(status=403)
        if self._ndsz is None:
            return web.json_response({}, status=404)
        return web.json_response(self._ndsz(), dumps=lambda d: json.dumps(d, indent=1))

    async def _debug_status(self, request: web.Request) -> web.Response:
        if not _is_loopback(request):
            return web.Response(status=403)
        doc: dict[str, Any] = {}
        for name, snap in self._snapshots.items():
            try:
                doc[name] = snap()
            except Exception as err:
                doc[name] = {"error": f"{type(err).__name__}: {err}"}
        reason = await self.readiness()
        doc["ready"] = {"ready": reason is None, "reason": reason}
        return web.json_response(doc, dumps=lambda d: json.dumps(d, indent=1, default=str))

    async def run(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/healthz/ready", self._ready)
        app.router.add_route("*", "/stats/prometheus", self._metrics)
        app.router.add_route("*", "/metrics", self._metrics)
        app.router.add_route("*", "/quitquitquit", self._quit)
        app.router.add_route("*", "/drain", self._drain)
        app.router.add_route("*", "/debug/ndsz", self._debug_ndsz)
        app.router.add_route("*", "/debug/status", self._debug_status)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.settings.listen_host, self.settings.port, reuse_address=True)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1]) if sockets else self.settings.port
            log.info("status server on %s:%d", self.settings.listen_host, self.port)
            self.ready.set()
            await asyncio.Event().wait()
        finally:
            self.ready.clear()
            for task in list(self._background):
                task.cancel()
            await runner.cleanup()
