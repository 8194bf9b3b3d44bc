"""Facts the interop suite proved against real istiod, pinned in the fast suite.

The VM files are real istioctl output from the interop lab (data/README.md). Each assertion is something
istiod acted on: the auto-registration keys, the probe that earns the health-checks-enabled annotation,
and the CA address rule that made the lab keep istiod's TLS port at 15012.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import pytest

from vm_agent.config import Config, Options, load

DATA = Path(__file__).parent / "data"
NS = "vm-65c102"


def _b64(doc: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    out = tmp_path / "vm"
    shutil.copytree(DATA, out, ignore=shutil.ignore_patterns("README.md"))
    claims = {"aud": ["istio-ca"], "exp": int(time.time()) + 3600, "sub": f"system:serviceaccount:{NS}:vm-sa"}
    (out / "istio-token").write_text(f"{_b64({'alg': 'RS256'})}.{_b64(claims)}.c2ln")
    return out


def load_files(files: Path, tmp_path: Path) -> Config:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    return load(
        Options(
            config_dir=files, state_dir=tmp_path / "state", resolv_conf=resolv, scan_interfaces=False, hostname="vm"
        )
    )


def test_real_istioctl_output_loads_without_problems(files: Path, tmp_path: Path) -> None:
    cfg = load_files(files, tmp_path)
    assert cfg.problems == ()
    # istiod logged this proxy as "vm.<ns>": the node id's pod-name.namespace part.
    assert cfg.node.id == f"sidecar~127.0.0.2~vm.{NS}~{NS}.svc.cluster.local"


def test_metadata_carries_what_istiod_auto_registration_needs(files: Path, tmp_path: Path) -> None:
    md = load_files(files, tmp_path).node.metadata
    # WorkloadEntry name <group>-<INSTANCE_IPS[0]>, namespace from NAMESPACE, identity check against
    # SERVICE_ACCOUNT, ClusterIPs looked up by CLUSTER_ID, auto-allocated addresses only with DNS_CAPTURE.
    assert md["AUTO_REGISTER_GROUP"] == "vm-app"
    assert md["INSTANCE_IPS"] == "127.0.0.2"
    assert md["NAMESPACE"] == NS
    assert md["SERVICE_ACCOUNT"] == "vm-sa"
    assert md["CLUSTER_ID"] == "Kubernetes"
    assert md["DNS_CAPTURE"] == "true"
    assert md["LABELS"]["app"] == "vm-app"
    # istiod adds proxy.istio.io/health-checks-enabled only when PROXY_CONFIG.readinessProbe is set.
    probe = md["PROXY_CONFIG"]["readinessProbe"]
    assert probe["httpGet"] == {"host": "127.0.0.1", "path": "/ready", "port": 44573}


def test_ca_address_does_not_follow_discovery_address(files: Path, tmp_path: Path) -> None:
    # istio-start.sh exports CA_ADDR (> PILOT_ADDRESS > ISTIO_PILOT_PORT > istiod.<ns>.svc:15012) and istioctl
    # writes no CA_ADDR for the default revision, so a mesh discoveryAddress on another port moves only xDS.
    mesh = files / "mesh.yaml"
    mesh.write_text(mesh.read_text().replace("istiod.istio-system.svc:15012", "istiod.istio-system.svc:15999"))
    cfg = load_files(files, tmp_path)
    assert cfg.discovery.dial_target == "127.0.0.1:15999"
    assert cfg.ca.dial_target == "127.0.0.1:15012"
    assert cfg.ca.server_name == cfg.discovery.server_name == "istiod.istio-system.svc"
