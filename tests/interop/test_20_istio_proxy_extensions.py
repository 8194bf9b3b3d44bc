"""istiod as a helm install has it (defaults plus the prometheus metrics provider) pushes istio-proxy-only
extensions; vm-agent's stock Envoy must still accept everything else (the xDS proxy drops those filters).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.agentproc import AgentProc, agent_unavailable
from tests.interop.conftest import VmGroup
from tests.interop.lab import ControlPlane, wait_until

pytestmark = [pytest.mark.interop]

# helm's istio-discovery chart sets this (values telemetry.v2.prometheus.enabled=true).
HELM_DEFAULT_MESH = "defaultProviders:\n  metrics:\n  - prometheus\n"


@pytest.fixture
def default_istiod(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    cp = control_plane
    cp.mesh_extra = HELM_DEFAULT_MESH
    cp.istiod_env = {}
    cp.apply(_mesh_configmap(cp))
    cp.start_istiod()
    try:
        yield cp
    finally:
        cp.mesh_extra = ""
        cp.istiod_env = {}
        cp.apply(_mesh_configmap(cp))
        cp.start_istiod()


def _mesh_configmap(cp: ControlPlane) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": cp.mesh_config_yaml(), "meshNetworks": "networks: {}"},
    }


def envoy_counters(agent: AgentProc) -> dict[str, int]:
    code, body = agent.get(agent.admin_port, "/stats?filter=update_(success|rejected)")
    if code != 200:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(\S+): (\d+)$", body.decode(), re.M)}


def test_stock_envoy_accepts_a_default_istiod(default_istiod: ControlPlane, group: VmGroup, vm_files: Path) -> None:
    why = agent_unavailable()
    if why is not None:
        pytest.skip(why)
    agent = AgentProc(vm_files)
    try:
        agent.start()

        def settled() -> dict[str, int] | None:
            agent.must_be_alive()
            c = envoy_counters(agent)
            cds = c.get("cluster_manager.cds.update_success", 0) + c.get("cluster_manager.cds.update_rejected", 0)
            lds = c.get("listener_manager.lds.update_success", 0) + c.get("listener_manager.lds.update_rejected", 0)
            return c if cds and lds else None

        counters = wait_until(settled, 90, "Envoy's first CDS and LDS verdicts")
        rejected = {k: v for k, v in counters.items() if k.endswith("update_rejected") and v}
        log = agent.log_text()
        missing = sorted(set(re.findall(r"registered implementation for '([^']+)' with type URL: '([^']+)'", log)))
        assert not rejected, f"Envoy NACKed istiod's config {rejected}: unknown extensions {missing}"
    finally:
        agent.cleanup()
