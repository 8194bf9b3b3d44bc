"""vm-files output compared byte for byte with istioctl's own golden files."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers.fixtures import ISTIOCTL_FIXTURES
from vm_agent.mesh.vmfiles import (
    VmFilesError,
    VmFilesOptions,
    _go_sorted,
    go_yaml,
    parse_duration,
    render_vm_files,
)

FIXTURES = ISTIOCTL_FIXTURES


@pytest.mark.parametrize(
    ("case", "internal_ip", "ingress_ip", "revision"),
    [
        ("ipv4", "10.10.10.10", "10.10.10.11", "rev-1"),
        ("ipv6", "fd00:10:96::1", "fd00:10:96::2", "rev-1"),
        ("nil-proxy-metadata", "10.10.10.10", None, ""),
    ],
)
def test_matches_istioctl_golden(case: str, internal_ip: str, ingress_ip: str | None, revision: str) -> None:
    folder = FIXTURES / case
    if not folder.is_dir():
        pytest.skip("istioctl fixtures not available")
    group = yaml.safe_load((folder / "workloadgroup.yaml").read_text())
    mesh_cfg = {}
    if (folder / "meshconfig.yaml").exists():
        mesh_cfg = yaml.safe_load((folder / "meshconfig.yaml").read_text())["defaultConfig"]
    files = render_vm_files(
        group,
        "",
        b"fake-CA-cert",
        VmFilesOptions(
            trust_domain="",  # the golden cluster's mesh config does not spell trustDomain
            internal_ip=internal_ip,
            ingress_ip=ingress_ip,
            mesh_default_config=mesh_cfg,
            revision=revision,
        ),
    )
    assert sorted(files) == ["cluster.env", "hosts", "istio-token", "mesh.yaml", "root-cert.pem"]
    for name in ("cluster.env", "mesh.yaml", "hosts"):
        assert files[name].decode() == (folder / name).read_text(), name


def test_ports_labels_autoregister_and_probe() -> None:
    group = {
        "metadata": {"name": "vm-app", "namespace": "vm-ns"},
        "spec": {
            "metadata": {"labels": {"app": "vm-app", "version": "v2"}},
            "template": {"serviceAccount": "vm-sa", "ports": {"http": 8080, "grpc": 9090}, "network": "n1"},
            "probe": {"periodSeconds": 2, "httpGet": {"path": "/ready", "port": 8080}},
        },
    }
    files = render_vm_files(group, "tok", b"root", VmFilesOptions(autoregister=True, xds_port=40000))
    env = files["cluster.env"].decode().splitlines()
    assert env == sorted(env)
    assert "ISTIO_INBOUND_PORTS='9090,8080'" in env
    assert "ISTIO_META_AUTO_REGISTER_GROUP='vm-app'" in env
    assert "CA_ADDR='istiod.istio-system.svc:40000'" in env
    assert "ISTIO_META_NETWORK='n1'" in env
    assert "TRUST_DOMAIN='cluster.local'" in env
    assert (
        'ISTIO_META_POD_PORTS=\'[{"containerPort":9090,"name":"grpc","protocol":""},'
        '{"containerPort":8080,"name":"http","protocol":""}]\''
    ) in env
    mesh = yaml.safe_load(files["mesh.yaml"])
    assert mesh["defaultConfig"]["discoveryAddress"] == "istiod.istio-system.svc:40000"
    assert mesh["defaultConfig"]["readinessProbe"] == {"periodSeconds": 2, "httpGet": {"path": "/ready", "port": 8080}}
    assert mesh["defaultConfig"]["proxyMetadata"]["CANONICAL_REVISION"] == "v2"
    assert files["hosts"] == b""
    assert files["istio-token"] == b"tok"


def test_go_yaml_key_order_and_quoting() -> None:
    assert _go_sorted(["ISTIO_METAJSON_LABELS", "ISTIO_META_WORKLOAD_NAME", "A10", "A9"]) == [
        "A9",
        "A10",
        "ISTIO_META_WORKLOAD_NAME",
        "ISTIO_METAJSON_LABELS",
    ]
    assert go_yaml({"a": "true", "b": "", "c": "plain", "d": "{x}"}) == 'a: "true"\nb: ""\nc: plain\nd: \'{x}\'\n'


def test_parse_duration() -> None:
    assert parse_duration("1h") == 3600
    assert parse_duration("90s") == 90
    assert parse_duration("3600") == 3600
    with pytest.raises(VmFilesError, match="--token-ttl"):
        parse_duration("soon")
