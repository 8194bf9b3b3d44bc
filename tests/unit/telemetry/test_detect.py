"""Which Envoy gets istiod's Istio filters untouched: detection with ``envoy --mode validate`` and the switch."""

from __future__ import annotations

import stat
from pathlib import Path

from envoy.service.discovery.v3 import discovery_pb2

from vm_agent.envoy_binary import find_envoy_binary
from vm_agent.telemetry import NodeExchange, StockEnvoyAdapter
from vm_agent.telemetry.detect import has_istio_filters
from vm_agent.telemetry.markers import LISTENER_TYPE_URL

DATA = Path(__file__).parents[1] / "interop_regressions" / "data"
NODE = NodeExchange("sidecar~127.0.0.2~vm.ns~ns.svc.cluster.local", "Cg0KBE5BTUUSBRoDdm0x")


def _fake_envoy(tmp: Path, rc: int, output: str) -> Path:
    path = tmp / "envoy"
    path.write_text(f"#!/bin/sh\necho '{output}'\nexit {rc}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_the_shipped_envoy_is_stock_without_a_probe() -> None:
    assert await has_istio_filters(find_envoy_binary()) is False


async def test_a_binary_that_validates_the_probe_has_istios_filters(tmp_path: Path) -> None:
    assert await has_istio_filters(_fake_envoy(tmp_path, 0, "configuration OK")) is True


async def test_a_binary_that_rejects_the_probe_is_stock(tmp_path: Path) -> None:
    msg = "Did not find a registered implementation for istio.metadata_exchange"
    assert await has_istio_filters(_fake_envoy(tmp_path, 1, msg)) is False
    assert await has_istio_filters(tmp_path / "missing") is False


async def test_an_istio_proxy_binary_gets_istiods_bytes_untouched() -> None:
    raw = (DATA / "default-istiod-lds.pb").read_bytes()

    async def detected_istio_proxy() -> bool:
        return False

    passthrough = StockEnvoyAdapter(NODE, detected_istio_proxy)
    assert await passthrough(raw, LISTENER_TYPE_URL, False) is raw
    rewritten = await StockEnvoyAdapter(NODE, True)(raw, LISTENER_TYPE_URL, False)
    assert b"stats.PluginConfig" not in rewritten
    assert len(discovery_pb2.DiscoveryResponse.FromString(rewritten).resources) == 5
