from __future__ import annotations

from pathlib import Path

import pytest

from vm_agent.mesh.model import MeshSnapshot, key, parse_documents
from vm_agent.mesh.xdsgen import ProxyView

MESH_YAML = Path(__file__).with_name("mesh.yaml")


@pytest.fixture
def snapshot() -> MeshSnapshot:
    objs = parse_documents(MESH_YAML.read_text(), str(MESH_YAML))
    return MeshSnapshot(1, {key(o): o for o in objs})


@pytest.fixture
def vm_proxy() -> ProxyView:
    return ProxyView(
        node_id="sidecar~127.0.0.2~vm-app.vm-ns~vm-ns.svc.cluster.local",
        ips=("127.0.0.2",),
        namespace="vm-ns",
        service_account="vm-sa",
        labels={"app": "vm-app"},
        dns_capture=True,
        interception_mode="REDIRECT",
        cluster_id="Kubernetes",
        metadata={},
    )
