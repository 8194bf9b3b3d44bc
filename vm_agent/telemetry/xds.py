"""The xDS proxy's hook: fit each LDS/CDS response to the Envoy binary that will read it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError

from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY, Counter
from vm_agent.telemetry.alpn import CLUSTER_TYPE_URL, ROUTE_TYPE_URL, AlpnExceptions
from vm_agent.telemetry.clusters import SERVICES_MARKER, ClusterServices, decode_clusters
from vm_agent.telemetry.markers import mentions_istio_proxy
from vm_agent.telemetry.native import NativeStats
from vm_agent.telemetry.peer import NodeExchange

log = get_logger("telemetry")

_REWRITTEN = Counter(
    "vm_agent_telemetry_istio_proxy_filters_rewritten",
    "istio-proxy-only filters replaced by stock ones (and exchange ALPN entries removed) in LDS/CDS, by type",
    ["config_type"],
    registry=REGISTRY,
)


class StockEnvoyAdapter:
    """Rewrites istiod's istio-proxy filters for stock Envoy, unless the binary turns out to have them.

    ``stock`` says whether the binary is stock Envoy: a bool, or a coroutine function that finds out (run once,
    started by :meth:`start` so the answer is usually ready before istiod's first listeners arrive). ``native``:
    the native stats filter, for the Envoy it was built for (``vm_agent.telemetry.native``).
    """

    def __init__(
        self, node: NodeExchange, stock: bool | Callable[[], Awaitable[bool]], native: NativeStats | None = None
    ) -> None:
        self._node = node
        self._stock = stock
        self.native = native
        self._task: asyncio.Task[bool] | None = None
        self._seen: set[str] = set()
        self._no_alpn = AlpnExceptions()
        self.cluster_services = ClusterServices()
        """Each cluster's services, for ``IstioMetrics`` (the raw stat tag names the cluster only)."""

    def start(self) -> None:
        if self._task is None and not isinstance(self._stock, bool):
            self._task = asyncio.ensure_future(self._stock())

    async def is_stock(self) -> bool:
        if isinstance(self._stock, bool):
            return self._stock
        self.start()
        assert self._task is not None
        return await asyncio.shield(self._task)

    def _stock_known(self) -> bool | None:
        """The binary's answer once known (None while the probe runs)."""
        if isinstance(self._stock, bool):
            return self._stock
        task = self._task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    async def __call__(self, message: bytes, type_url: str, delta: bool) -> bytes:
        # An Envoy with Istio's own filters needs neither the ALPN exceptions nor the services of our metrics.
        if type_url in (CLUSTER_TYPE_URL, ROUTE_TYPE_URL) and self._stock_known() is not False:
            message = self._alpn_exceptions(message, type_url, delta)
        if not mentions_istio_proxy(message, type_url) or not await self.is_stock():
            return message
        from vm_agent.telemetry.rewrite import for_stock_envoy  # Envoy's protos load on the first such response

        try:
            out, counts = for_stock_envoy(message, type_url, delta=delta, node=self._node, native=self.native)
        except DecodeError as exc:
            log.warning("cannot inspect %s response, forwarding it as is: %s", type_url, exc)
            return message
        for kind, count in counts.items():
            _REWRITTEN.labels(kind).inc(count)
        if counts and not counts.keys() <= self._seen:
            self._seen.update(counts)
            log.info(
                "replacing istio-proxy-only filters with stock Envoy ones: %s; HTTP metrics by %s",
                ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())),
                f"the native stats filter ({self.native.module})" if self.native else "stats access logs",
            )
        return out

    def _alpn_exceptions(self, message: bytes, type_url: str, delta: bool) -> bytes:
        """Learn from CDS which clusters get no ALPN hint, and every cluster's services (for the metrics' labels);
        turn the hint off on the routes to those clusters in RDS. One decode of a CDS response serves both."""
        try:
            if type_url == CLUSTER_TYPE_URL:
                if self._no_alpn.wants(message) or SERVICES_MARKER in message:
                    sotw, removed, clusters = decode_clusters(message, delta=delta)
                    self._no_alpn.learn_clusters(sotw, removed, clusters)
                    self.cluster_services.learn(clusters)
                return message
            return self._no_alpn.apply(message, delta=delta)
        except DecodeError as exc:
            log.warning("cannot inspect %s response for the ALPN hint, forwarding it as is: %s", type_url, exc)
            return message

    def snapshot(self) -> dict[str, Any]:
        return {
            "stock_envoy": self._stock_known(),
            "native_stats": self.native is not None,
            "rewritten_types": sorted(self._seen),
            "clusters_with_services": len(self.cluster_services),
        }
