"""Step 1: real istioctl writes the VM files for an auto-registering WorkloadGroup; vm-agent check takes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.conftest import VmGroup
from tests.interop.lab import CLUSTER_ID, TRUST_DOMAIN, ControlPlane

pytestmark = [pytest.mark.interop]

ISTIOCTL_FILES = ["cluster.env", "hosts", "istio-token", "mesh.yaml", "root-cert.pem"]


def vm_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vm_agent", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_istioctl_files_are_accepted_unchanged(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, tmp_path: Path
) -> None:
    assert sorted(p.name for p in vm_files.iterdir()) == ISTIOCTL_FILES
    before = {p.name: p.read_bytes() for p in vm_files.iterdir()}
    # What istioctl wrote is the real thing: hosts points istiod's name at the ingress IP, mesh.yaml
    # carries the group's probe and the auto-register group.
    assert before["hosts"].split() == [b"127.0.0.1", b"istiod.istio-system.svc"]
    assert b"ISTIO_META_AUTO_REGISTER_GROUP: " + group.name.encode() in before["mesh.yaml"]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")

    res = vm_agent(
        "check",
        f"--config-dir={vm_files}",
        f"--state-dir={tmp_path / 'state'}",
        f"--resolv-conf={resolv}",
        "--set=VM_AGENT_SCAN_INTERFACES=false",
        "--json",
    )
    assert res.returncode == 0, f"vm-agent check refused istioctl's files:\n{res.stdout}\n{res.stderr}"
    report = json.loads(res.stdout)
    assert report["namespace"] == group.namespace
    assert report["service_account"] == group.service_account
    assert report["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/ns/{group.namespace}/sa/{group.service_account}"
    assert report["cluster_id"] == CLUSTER_ID
    assert report["auto_register_group"] == group.name
    assert report["dns_capture"] is True
    assert report["instance_ips"] == ["127.0.0.2"]
    assert report["discovery_address"] == f"istiod.istio-system.svc:{control_plane.istiod_secure_port}"
    assert report["discovery_dial_target"] == f"127.0.0.1:{control_plane.istiod_secure_port}"
    assert report["ca_dial_target"] == f"127.0.0.1:{control_plane.istiod_secure_port}"
    assert report["readiness_probe"]["httpGet"]["port"] == group.app_port
    assert report["readiness_probe"]["httpGet"]["path"] == "/ready"

    assert {p.name: p.read_bytes() for p in vm_files.iterdir()} == before, "check must not modify the VM files"
