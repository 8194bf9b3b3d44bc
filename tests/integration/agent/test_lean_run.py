"""A real `vm-agent run` (real Envoy, local mesh) under ``python -X importtime``: every module it imported up to
ready and a telemetry-rewritten push is in its log, so imports made lazily at run time are pinned too
(tests/unit/agent/test_lean_start.py pins the order at start)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess, sample_manifests, write_vm_files
from tests.helpers.mesh import running_mesh
from tests.helpers.net import free_port

pytestmark = pytest.mark.integration

NEVER = (
    "grpc",  # grpcio: the agent speaks gRPC with grpclib only
    "grpc_tools",
    "aiohttp",
    "yarl",
    "prometheus_client",
    "psutil",
    "cryptography",  # only the key helper process loads it
    "vm_agent.mesh",
    "vm_agent.demo",
    "vm_agent.doctor",
    "vm_agent.status.client",
    "vm_agent.identity.csr",
    "urllib.request",
    "http.server",
)


def imported(log: str) -> set[str]:
    names = set()
    for line in log.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


async def test_run_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    async with running_mesh(tmp_path) as mesh:
        mesh.apply_yaml(sample_manifests(app_port=free_port(), service_port=free_port()), source="test")
        files = write_vm_files(mesh, namespace="vmns", group="vmapp", out=tmp_path / "files", internal_ip="127.0.9.5")
        agent = AgentProcess(files, instance_ip="127.0.9.5")
        agent.command = lambda: [sys.executable, "-X", "importtime", *AgentProcess.command(agent)[1:]]  # type: ignore[method-assign]
        agent.start()
        try:
            await agent.wait(agent.ready, 60, "ready")
            await agent.wait(lambda: bool(agent.status().get("telemetry", {}).get("rewritten_types")), 30, "rewrite")
            agent.stop()
            names = imported(agent.log())
        finally:
            agent.cleanup()
    # What a run needs did load (and so the log really lists imports)...
    for needed in ("vm_agent.xds.proxy", "grpclib.client", "vm_agent.telemetry.rewrite", "vm_agent.dns.server"):
        assert needed in names
    # ... and nothing else.
    unexpected = sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in NEVER))
    assert unexpected == []
