"""`vm-agent mesh vm-files --cloud-init --package ...` against a running local mesh: the user-data carries
exactly the five files it writes beside it, and is kept 0600 (it holds the token)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.mesh import running_mesh
from tests.integration.mesh.xds_client import VM_MANIFESTS
from vm_agent.cli import main
from vm_agent.mesh.cli import mesh_vm_files

pytestmark = pytest.mark.integration


async def test_user_data_carries_the_files_it_writes(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        out = tmp_path / "vm-files"
        rc = await mesh_vm_files(
            state=mesh.settings.state_dir,
            group="vm-app",
            namespace="vm-ns",
            out=out,
            autoregister=True,
            cloud_init_package="https://example.com/vm-agent_0.1.0_amd64.deb",
        )
        assert rc == 0
        user_data = out / "user-data"
        assert user_data.stat().st_mode & 0o777 == 0o600
        doc = yaml.safe_load(user_data.read_text())
        written = {entry["path"]: entry["content"].encode() for entry in doc["write_files"]}
        assert written["/var/run/secrets/tokens/istio-token"] == (out / "istio-token").read_bytes()
        assert written["/etc/certs/root-cert.pem"] == mesh.root_cert_pem == (out / "root-cert.pem").read_bytes()
        assert written["/var/lib/istio/envoy/cluster.env"] == (out / "cluster.env").read_bytes()
        assert written["/etc/istio/config/mesh"] == (out / "mesh.yaml").read_bytes()
        assert written["/etc/hosts"] == (out / "hosts").read_bytes()
        assert "https://example.com/vm-agent_0.1.0_amd64.deb" in doc["runcmd"][0]

        # A bad package location: nothing is written, the option is named.
        again = tmp_path / "again"
        rc = await mesh_vm_files(
            state=mesh.settings.state_dir,
            group="vm-app",
            namespace="vm-ns",
            out=again,
            cloud_init_package="vm-agent.deb",
        )
        assert rc == 1 and not again.exists()


def test_cloud_init_and_package_go_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["mesh", "vm-files", "--state", str(tmp_path), "--group", "g", "-n", "ns", "--out", str(tmp_path / "o")]
    assert main([*base, "--cloud-init"]) == 2
    assert "--cloud-init and --package URL_OR_PATH go together" in capsys.readouterr().err
    assert main([*base, "--package", "/var/tmp/vm-agent.deb"]) == 2
    assert not (tmp_path / "o").exists()
