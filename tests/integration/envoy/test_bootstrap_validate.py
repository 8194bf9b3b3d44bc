"""The real Envoy accepts every rendered bootstrap variant (``--mode validate``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vm_agent.envoy import EnvoySettings, NodeInfo, envoy_command, write_bootstrap

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("ipv6_only", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sotw"])
@pytest.mark.parametrize(
    ("metrics_localhost_only", "log_as_json"), [(False, False), (True, True)], ids=["plain", "local-metrics-json-log"]
)
def test_envoy_validates_rendered_bootstrap(
    tmp_path: Path, ipv6_only: bool, delta: bool, metrics_localhost_only: bool, log_as_json: bool
) -> None:
    ip = "fd00::7" if ipv6_only else "10.0.0.7"
    settings = EnvoySettings(
        binary=None,
        config_dir=tmp_path / "proxy",
        node=NodeInfo(
            id=f"sidecar~{ip}~vm-1.ns1~ns1.svc.cluster.local",
            cluster="foo.ns1",
            metadata={"ISTIO_VERSION": "1.28.0", "INSTANCE_IPS": ip, "LABELS": {"app": "foo"}, "DNS_CAPTURE": "true"},
            locality={"region": "eu-west", "zone": "a"},
        ),
        xds_socket=tmp_path / "proxy" / "XDS",
        sds_socket=tmp_path / "sds" / "socket",
        ipv6_only=ipv6_only,
        delta_xds=delta,
        metrics_localhost_only=metrics_localhost_only,
        log_as_json=log_as_json,
        runtime_values={"overload.global_downstream_max_connections": "1000", "envoy.foo": "false"},
        concurrency=2,
        log_level="warning,misc:error",
    )
    path = write_bootstrap(settings)
    proc = subprocess.run(
        [*envoy_command(settings, path), "--mode", "validate"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "OK" in proc.stdout
