"""Onboarding with cloud-init and nothing else: a trixie root with Debian's cloud-init boots under
systemd-nspawn with a NoCloud seed holding the user-data ``vm-agent mesh vm-files --cloud-init``
wrote and the package file. With no other step vm-agent.service becomes active, gets its certificate
from the local mesh over the veth (the VM reaches nothing else), Envoy goes live, and the mesh
auto-registers a Healthy WorkloadEntry for the VM.

The "image" settings a cloud provides are the test's: the seed in /var/lib/cloud/seed/nocloud and
networking left to the lab (the namespace's veth is configured already).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.system.packaging.conftest import CLEAN_ENV, Packages, RootFactory, inside, missing_tool
from tests.system.packaging.vmlab import MESH_IP, VM_IP, Booted, booted, mesh_link, wait_until

pytestmark = [pytest.mark.system, pytest.mark.slow]

SEED = "/var/lib/cloud/seed/nocloud"
PACKAGE = f"{SEED}/vm-agent.deb"
LAB_CONFIG = """\
# The lab's network is the namespace's veth, configured before boot: cloud-init leaves it alone.
network: {config: disabled}
datasource_list: [NoCloud]
"""
# Modules our user-data drives: any error of theirs fails the test.
OUR_MODULES = ("write_files", "write-files", "runcmd", "scripts_user", "scripts-user")


def _chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *CLEAN_ENV, *cmd], capture_output=True, text=True, timeout=120)


def _schema_keys(root: Path) -> tuple[set[str], set[str]]:
    """Top-level keys cloud-init's own schema knows, and the keys of a write_files item."""
    found = list(inside(root, "/usr/lib/python3/dist-packages/cloudinit/config/schemas").glob("schema-cloud-config-*"))
    assert found, "cloud-init's schema file is missing from the root"
    schema = json.loads(found[0].read_text())
    top: set[str] = set(schema.get("properties", {}))
    for definition in schema["$defs"].values():
        top |= set(definition.get("properties", {}))
    item = schema["$defs"]["cc_write_files"]["properties"]["write_files"]["items"]["properties"]
    return top, set(item)


def _agent_live(box: Booted) -> dict[str, Any] | None:
    if box.run("systemctl", "is-active", "vm-agent.service", expect=None).stdout.strip() != "active":
        return None
    doc = box.status()
    ident = (doc or {}).get("identity") or {}
    envoy = (doc or {}).get("envoy") or {}
    if ident.get("spiffe_id") and envoy.get("state") == "running" and ((doc or {}).get("ready") or {}).get("ready"):
        return doc
    return None


def test_cloud_init_alone_onboards_the_vm(make_root: RootFactory, packages: Packages, tmp_path: Path) -> None:
    reason = missing_tool("systemd-nspawn", "nsenter")
    if reason:
        pytest.skip(reason)
    root = make_root("trixie")

    with mesh_link(tmp_path) as link:
        out = link.vm_files(tmp_path / "vm-files", "--cloud-init", "--package", PACKAGE)
        user_data = (out / "user-data").read_text()
        assert (out / "user-data").stat().st_mode & 0o777 == 0o600, "user-data holds the token"

        # cloud-init's own validation, and the keys we rely on are ones its schema defines (schema
        # does not flag unknown top-level keys).
        shutil.copy(out / "user-data", root / "var/tmp/user-data")
        schema = _chroot(root, "cloud-init", "schema", "--config-file", "/var/tmp/user-data")
        assert schema.returncode == 0, schema.stdout + schema.stderr
        doc = yaml.safe_load(user_data)
        top, item_keys = _schema_keys(root)
        assert set(doc) <= top, set(doc) - top
        for entry in doc["write_files"]:
            assert set(entry) <= item_keys, set(entry) - item_keys

        seed = inside(root, SEED)
        seed.mkdir(parents=True)
        shutil.copy(out / "user-data", seed / "user-data")
        (seed / "meta-data").write_text("instance-id: vmpkg-cloud-init-test\nlocal-hostname: vm\n")
        shutil.copy(packages.deb, seed / "vm-agent.deb")
        (root / "etc/cloud/cloud.cfg.d/99-vmpkg-lab.cfg").write_text(LAB_CONFIG)
        # The VM reaches the mesh's address and nothing else: one /30 link, no default route.
        routes = subprocess.run(["ip", "-n", link.vm_ns, "route"], capture_output=True, text=True).stdout
        assert (
            "default" not in routes and routes.strip() == f"192.0.2.0/30 dev host0 proto kernel scope link src {VM_IP}"
        )

        with booted(root, link.vm_netns_path) as box:
            waited = box.run("cloud-init", "status", "--wait", expect=None, timeout=300)
            state = json.loads(box.run("cloud-init", "status", "--format", "json", expect=None).stdout)
            ours = [e for e in state.get("errors", []) if any(m in e for m in OUR_MODULES)]
            recoverable = state.get("recoverable_errors") or {}
            ours += [m for msgs in recoverable.values() for m in msgs if any(x in m for x in OUR_MODULES)]
            assert not ours, f"cloud-init reported errors for our modules: {ours}\n{state}"
            assert state.get("status") == "done", f"cloud-init: {state}\n{waited.stdout}{waited.stderr}"

            doc = wait_until(
                lambda: _agent_live(box), 90, "vm-agent active with a certificate and Envoy live", box.journal
            )
            assert doc["identity"]["spiffe_id"] == "spiffe://cluster.local/ns/vm-ns/sa/vm-sa"
            assert box.run("systemctl", "is-enabled", "vm-agent.service").stdout.strip() == "enabled"
            assert "VMAGENT" in box.rules()

            entry = wait_until(
                link.healthy_entry,
                60,
                "a Healthy auto-registered WorkloadEntry",
                lambda: f"{link.tail()}\nagent health: {(box.status() or {}).get('health')}",
            )
            assert entry["spec"]["address"] == VM_IP

            # The guide's paths, owners and modes; the istiod name appended to /etc/hosts.
            stat = box.run(
                "stat", "-c", "%n %U:%G %a",
                "/etc/certs/root-cert.pem", "/var/run/secrets/tokens/istio-token",
                "/var/lib/istio/envoy/cluster.env", "/etc/istio/config/mesh",
            ).stdout.split("\n")  # fmt: skip
            assert stat[:4] == [
                "/etc/certs/root-cert.pem istio-proxy:istio-proxy 644",
                "/var/run/secrets/tokens/istio-token istio-proxy:istio-proxy 600",
                "/var/lib/istio/envoy/cluster.env istio-proxy:istio-proxy 644",
                "/etc/istio/config/mesh istio-proxy:istio-proxy 644",
            ], stat
            assert f"{MESH_IP} istiod.istio-system.svc" in box.run("cat", "/etc/hosts").stdout
            for name, path in (
                ("cluster.env", "/var/lib/istio/envoy/cluster.env"),
                ("mesh.yaml", "/etc/istio/config/mesh"),
            ):
                assert box.run("cat", path).stdout == (out / name).read_text(), f"{path} differs from istioctl's {name}"
