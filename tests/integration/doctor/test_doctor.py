"""`vm-agent doctor` against a VM built from real parts (see conftest): the healthy baseline, then one broken
thing per test; that line fails with its hint and every other line stays as in the baseline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.net import free_port
from tests.integration.doctor.conftest import SA, Vm, baseline, explain, foreign_address, statuses
from vm_agent.doctor import CHECK_IDS
from vm_agent.mesh.ca import MeshCA

pytestmark = [pytest.mark.integration]


def expect(vm: Vm, **changed: str) -> dict[str, str]:
    want = baseline(vm)
    want.update({k.replace("_", "-"): v for k, v in changed.items()})
    return want


# --- through the real CLI ------------------------------------------------------------------------------------


async def test_baseline_through_the_cli(vm: Vm) -> None:
    proc = await vm.cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    by_id = {line.split()[1]: line.split()[0] for line in lines if line[:5].strip() in ("ok", "warn", "fail", "skip")}
    assert by_id == baseline(vm), proc.stdout
    text = proc.stdout
    assert "istiod.istio-system.svc" in text and "TLS ok (verified 'istiod.istio-system.svc'" in text
    assert "Envoy 1." in text
    assert "not running" in text and "fix: start it" in text
    assert f"{vm.app.port}/ready passes now" in text
    # Never the token, a key or a PEM.
    assert vm.token_path.read_text().strip() not in text
    assert "BEGIN" not in text


async def test_json_schema_is_stable(vm: Vm) -> None:
    code, doc = await vm.cli_json()
    assert code == 0
    assert list(doc) == ["schema", "ok", "counts", "checks"]
    assert doc["schema"] == 1 and doc["ok"] is True
    assert list(doc["counts"]) == ["ok", "warn", "fail", "skip"]
    assert [c["id"] for c in doc["checks"]] == list(CHECK_IDS)
    for check in doc["checks"]:
        assert list(check) == ["id", "status", "summary", "hint", "details"]
        assert check["status"] in ("ok", "warn", "fail", "skip")
        assert isinstance(check["summary"], str) and check["summary"]
        assert check["hint"] is None or isinstance(check["hint"], str)
        assert isinstance(check["details"], dict)
    assert {c["id"]: c["status"] for c in doc["checks"]} == baseline(vm)
    by_id = {c["id"]: c for c in doc["checks"]}
    assert by_id["ca"]["details"]["server_name"] == "istiod.istio-system.svc"
    assert by_id["ca"]["details"]["tls"] is True
    assert by_id["token"]["details"]["audiences"] == ["istio-ca"]
    assert by_id["certificate"]["details"]["spiffe_id"] == f"spiffe://cluster.local/ns/vmns/sa/{SA}"
    # The shipped Envoy counts HTTP requests with the native stats filter (make builds it).
    assert by_id["envoy"]["details"]["native_stats"].endswith("libvm_agent_istio_stats.so.1")
    assert vm.token_path.read_text().strip() not in str(doc)


async def test_wrong_audience_through_the_cli(vm: Vm) -> None:
    vm.remove_certificate()
    vm.set_token(audiences=("not-istio-ca",))
    code, doc = await vm.cli_json()
    by_id = {c["id"]: c for c in doc["checks"]}
    assert code == 1 and doc["ok"] is False
    # Without a certificate the token is what matters; the certificate line defers to it.
    assert {i: c["status"] for i, c in by_id.items()} == expect(vm, token="fail", certificate="skip")
    token = by_id["token"]
    assert "audience is not-istio-ca" in token["summary"] and "expects istio-ca" in token["summary"]
    assert "--audience istio-ca" in token["hint"]
    assert "see token" in by_id["certificate"]["summary"]


async def test_istiod_name_missing_from_hosts_through_the_cli(vm: Vm) -> None:
    (vm.files / "hosts").write_text("127.0.0.1 localhost\n")
    proc = await vm.cli()
    assert proc.returncode == 1
    line = next(line for line in proc.stdout.splitlines() if line.startswith("fail  istiod-name"))
    assert f"istiod.istio-system.svc is not in {vm.files / 'hosts'}" in line
    assert (
        f"fix: add istioctl's hosts line (`<east-west gateway or istiod IP> istiod.istio-system.svc`) to {vm.files / 'hosts'}"
        in proc.stdout
    )
    results = await vm.doctor()
    assert statuses(results) == expect(vm, istiod_name="fail", ca="skip", discovery="skip"), explain(results)
    assert "does not resolve (see istiod-name)" in results["ca"].summary


# --- one broken thing each, through the package --------------------------------------------------------------


async def test_baseline_has_no_failure(vm: Vm) -> None:
    results = await vm.doctor()
    assert statuses(results) == baseline(vm), explain(results)
    assert list(results) == list(CHECK_IDS)
    assert all(r.hint for r in results.values() if r.status.value == "fail")


async def test_expired_token(vm: Vm) -> None:
    vm.remove_certificate()
    vm.set_token(ttl_seconds=600, now=int(time.time()) - 7200)
    results = await vm.doctor()
    assert statuses(results) == expect(vm, token="fail", certificate="skip"), explain(results)
    assert "expired at" in results["token"].summary and "(110m ago)" in results["token"].summary
    assert results["token"].hint and "put a fresh token at" in results["token"].hint

    # A valid persisted certificate makes the token unnecessary (product.md: only until the first certificate).
    vm.issue_certificate()
    results = await vm.doctor()
    assert statuses(results) == baseline(vm), explain(results)
    assert "not needed: the persisted certificate renews itself" in results["token"].summary


async def test_chain_not_signed_by_the_root(vm: Vm, tmp_path: Path) -> None:
    other = MeshCA(tmp_path / "other-mesh-ca", "cluster.local")
    vm.issue_certificate(ca=other)
    results = await vm.doctor()
    assert statuses(results) == expect(vm, certificate="fail"), explain(results)
    cert = results["certificate"]
    assert f"{vm.state / 'cert-chain.pem'} is not signed by {vm.files / 'root-cert.pem'}" in cert.summary
    # Both local meshes name their root alike; the line says the key differs.
    assert "holds a root of that name but with another key (another mesh's root)" in cert.summary
    assert cert.hint and "different meshes" in cert.hint


async def test_certificate_not_yet_issued_is_a_warning(vm: Vm) -> None:
    vm.remove_certificate()
    results = await vm.doctor()
    assert statuses(results) == expect(vm, certificate="warn"), explain(results)
    assert "not issued yet" in results["certificate"].summary


async def test_closed_ca_port(vm: Vm) -> None:
    closed = free_port()
    vm.settings["CA_ADDR"] = f"istiod.istio-system.svc:{closed}"
    results = await vm.doctor()
    assert statuses(results) == expect(vm, ca="fail"), explain(results)
    ca = results["ca"]
    assert f"TCP to istiod.istio-system.svc:{closed} (127.0.0.1:{closed}) failed: connection refused" in ca.summary
    assert ca.hint and f"listens on port {closed}" in ca.hint and "CA_ADDR" in ca.hint
    assert ca.details["tcp"] is False


async def test_tls_name_mismatch(vm: Vm) -> None:
    vm.settings["ISTIOD_SAN"] = "istiod.elsewhere.example"
    results = await vm.doctor()
    assert statuses(results) == expect(vm, discovery="fail"), explain(results)
    line = results["discovery"]
    assert "TCP ok; TLS: istiod's certificate is not valid for 'istiod.elsewhere.example'" in line.summary
    assert line.hint and "ISTIOD_SAN" in line.hint
    assert line.details["server_name"] == "istiod.elsewhere.example"


async def test_missing_envoy(vm: Vm, tmp_path: Path) -> None:
    vm.settings["VM_AGENT_ENVOY_BINARY"] = str(tmp_path / "no-such-envoy")
    results = await vm.doctor()
    assert statuses(results) == expect(vm, envoy="fail"), explain(results)
    envoy = results["envoy"]
    assert "no-such-envoy" in envoy.summary and "VM_AGENT_ENVOY_BINARY" in envoy.summary
    assert envoy.hint and "VM_AGENT_ENVOY_BINARY" in envoy.hint


async def test_native_stats_turned_off_is_said(vm: Vm) -> None:
    vm.settings["VM_AGENT_NATIVE_STATS"] = "false"
    results = await vm.doctor()
    assert statuses(results) == baseline(vm), explain(results)
    envoy = results["envoy"]
    assert "stats access logs: VM_AGENT_NATIVE_STATS=false" in envoy.summary
    assert envoy.details["native_stats"] is None


async def test_probe_failing(vm: Vm) -> None:
    vm.app.healthy = False
    results = await vm.doctor()
    assert statuses(results) == expect(vm, readiness_probe="fail"), explain(results)
    probe = results["readiness-probe"]
    assert f"httpGet http://127.0.0.1:{vm.app.port}/ready fails now" in probe.summary and "503" in probe.summary
    assert probe.hint and "start the application" in probe.hint


async def test_advertised_address_not_on_this_host(vm: Vm) -> None:
    vm.settings["ISTIO_SVC_IP"] = foreign_address()
    results = await vm.doctor()
    assert statuses(results) == expect(vm, instance_ips="fail"), explain(results)
    line = results["instance-ips"]
    assert "not an address of this host" in line.summary and "ISTIO_SVC_IP" in line.summary
    assert line.hint and "set ISTIO_SVC_IP" in line.hint


async def test_config_problem_is_listed_with_file_line_and_key(vm: Vm) -> None:
    cluster_env = vm.files / "cluster.env"
    cluster_env.write_text(cluster_env.read_text() + "WORKLOAD_RSA_KEY_SIZE=512\n")
    line_no = len(cluster_env.read_text().splitlines())
    results = await vm.doctor()
    assert statuses(results) == expect(vm, config="fail"), explain(results)
    problems = results["config"].details["problems"]
    assert problems == [
        f"{cluster_env}:{line_no}: WORKLOAD_RSA_KEY_SIZE: expected an RSA key size of at least 2048, got '512'"
    ]
