"""Real Envoy 1.40 accepts what xdsgen generates, in both interception modes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.integration.mesh_xdsgen.support import bootstrap, envoy_validate, free_port
from vm_agent.mesh.model import MeshSnapshot, key, parse_documents
from vm_agent.mesh.xdsgen import LISTENER_TYPE_URL, ProxyView, allocate_vips, generate

MESH_YAML = Path(__file__).parents[2] / "unit" / "mesh_model" / "mesh.yaml"

pytestmark = pytest.mark.integration


def _snapshot() -> MeshSnapshot:
    objs = parse_documents(MESH_YAML.read_text(), str(MESH_YAML))
    return MeshSnapshot(1, {key(o): o for o in objs})


PROXY = ProxyView(
    node_id="sidecar~127.0.0.2~vm-app.vm-ns~vm-ns.svc.cluster.local",
    ips=("127.0.0.2",),
    namespace="vm-ns",
    service_account="vm-sa",
    labels={"app": "vm-app"},
    dns_capture=True,
)


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY", "NONE"])
@pytest.mark.parametrize("inline", [False, True], ids=["ads", "inlined"])
def test_envoy_validates_generated_config(tmp_path: Path, mode: str, inline: bool) -> None:
    snap = _snapshot()
    proxy = dataclasses.replace(PROXY, interception_mode=mode)
    res = generate(snap, proxy, trust_domain="example.org", vips=allocate_vips(snap, {}))
    assert len(res[LISTENER_TYPE_URL]) >= 5
    boot = bootstrap(
        res, node_id=proxy.node_id, sds_socket=tmp_path / "sds.sock", admin_port=free_port(), inline=inline
    )
    done = envoy_validate(boot, tmp_path / "envoy.json")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "configuration" in done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def test_envoy_rejects_a_broken_resource(tmp_path: Path) -> None:
    """The validation above can fail: a duplicate listener address is refused."""
    snap = _snapshot()
    res = generate(snap, dataclasses.replace(PROXY, interception_mode="NONE"), trust_domain="example.org", vips={})
    boot = bootstrap(res, node_id="n", sds_socket=tmp_path / "sds.sock", admin_port=free_port(), inline=True)
    first = boot["static_resources"]["listeners"][0]
    boot["static_resources"]["listeners"].append({**first, "name": "copy"})
    done = envoy_validate(boot, tmp_path / "envoy.json")
    assert done.returncode != 0
    assert "duplicate address" in done.stdout + done.stderr
