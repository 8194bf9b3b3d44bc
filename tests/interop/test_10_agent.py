"""Steps 2-7 through `vm-agent run` with real Envoy against real istiod, on istioctl's files unchanged."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.interop.agentproc import AgentProc, agent_unavailable
from tests.interop.conftest import App, VmGroup
from tests.interop.lab import (
    GRACE_PERIOD_S,
    ISTIOD_POD_NAME,
    TRUST_DOMAIN,
    WLE,
    ControlPlane,
    healthy_condition,
    wait_until,
)

pytestmark = [pytest.mark.interop]


@pytest.fixture(scope="module", autouse=True)
def _agent_importable() -> None:
    # Until the composition root lands these cannot run; say exactly why instead of failing 3 times.
    why = agent_unavailable()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def agent(vm_files: Path) -> Iterator[AgentProc]:
    a = AgentProc(vm_files)
    try:
        yield a
    finally:
        a.cleanup()


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def while_alive(agent: AgentProc, check: Any) -> Any:
    """``check`` for wait_until that fails at once, with the agent's log, if the agent died."""

    def run() -> Any:
        agent.must_be_alive()
        return check()

    return run


def svid(agent: AgentProc) -> x509.Certificate | None:
    agent.must_be_alive()
    files = agent.cert_chain_files()
    return leaf(files[0]) if files else None


def dig(port: int, name: str, *, tcp: bool = False) -> list[str]:
    argv = ["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=2", "+tries=1", name, "A"]
    if tcp:
        argv.insert(1, "+tcp")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    return [line for line in res.stdout.split() if line and not line.startswith(";")]


def dynamic_clusters(dump: dict[str, Any]) -> list[str]:
    for cfg in dump.get("configs", []):
        if cfg.get("@type", "").endswith("ClustersConfigDump"):
            return [c["cluster"]["name"] for c in cfg.get("dynamic_active_clusters", [])]
    return []


def dynamic_listeners(dump: dict[str, Any]) -> list[str]:
    for cfg in dump.get("configs", []):
        if cfg.get("@type", "").endswith("ListenersConfigDump"):
            return [entry["name"] for entry in cfg.get("dynamic_listeners", []) if "active_state" in entry]
    return []


def test_agent_joins_the_mesh(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, agent: AgentProc, app: App
) -> None:
    cp = control_plane
    ns = group.namespace
    name = f"{group.name}-127.0.0.2"
    agent.start()

    # (2) identity: istiod's CA signed the group's service account after a real TokenReview.
    cert = wait_until(lambda: svid(agent), 60, "the agent's SVID in its state folder")
    assert spiffe_ids(cert) == [f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{group.service_account}"]
    root = x509.load_pem_x509_certificate((vm_files / "root-cert.pem").read_bytes())
    assert cert.issuer == root.subject

    # (3) ADS through the agent: Envoy holds istiod's clusters and listeners.
    svc_host = f"{group.name}.{ns}.svc.cluster.local"

    def envoy_has_config() -> Any:
        agent.must_be_alive()
        dump = agent.config_dump()
        if dump is None:
            return None
        clusters, listeners = dynamic_clusters(dump), dynamic_listeners(dump)
        want = f"outbound|{group.service_port}||{svc_host}"
        return (want in clusters and listeners) and (clusters, listeners)

    clusters, listeners = wait_until(envoy_has_config, 90, "istiod's clusters and listeners in Envoy's config_dump")
    assert f"outbound|443||{group.external_host}" in clusters
    assert any(
        n.startswith("virtualInbound") or "inbound" in n or n.endswith(str(group.service_port)) for n in listeners
    )

    # (3) NameTable: the Service's ClusterIP and the ServiceEntry's auto-allocated address, answered by DNS.
    svc = cp.get("service", ns, group.name)
    assert svc is not None
    cluster_ip = svc["spec"]["clusterIP"]

    def auto_address() -> str | None:
        se = cp.get("serviceentries.networking.istio.io", ns, "ext-api")
        addrs = (se or {}).get("status", {}).get("addresses") or []
        return str(addrs[0]["value"]) if addrs else None

    se_ip = wait_until(auto_address, 30, "istiod's auto-allocated ServiceEntry address")
    assert se_ip.startswith("240.240."), se_ip
    wait_until(lambda: dig(agent.dns_port, svc_host) == [cluster_ip], 30, f"dig {svc_host} -> {cluster_ip}")
    assert dig(agent.dns_port, svc_host, tcp=True) == [cluster_ip]
    wait_until(lambda: dig(agent.dns_port, group.external_host) == [se_ip], 30, f"dig {group.external_host}")
    # Short names are synthesised from the Kubernetes entry's namespace, like pilot-agent's DNS proxy.
    assert dig(agent.dns_port, f"{group.name}.{ns}") == [cluster_ip]

    # (4) auto-registration.
    entry = wait_until(lambda: cp.get(WLE, ns, name), 30, f"WorkloadEntry {ns}/{name}")
    meta = entry["metadata"]
    assert entry["spec"]["address"] == "127.0.0.2"
    assert entry["spec"]["serviceAccount"] == group.service_account
    assert meta["labels"]["app"] == group.name
    assert meta["annotations"]["istio.io/autoRegistrationGroup"] == group.name
    assert meta["annotations"]["istio.io/workloadController"] == ISTIOD_POD_NAME
    assert meta["annotations"]["proxy.istio.io/health-checks-enabled"] == "true"
    assert "istio.io/connectedAt" in meta["annotations"]

    # (5) health from the agent's probe of the app.
    def healthy(status: str) -> Any:
        def check() -> Any:
            agent.must_be_alive()
            cond = healthy_condition(cp.get(WLE, ns, name))
            return cond is not None and cond["status"] == status and cond

        return check

    wait_until(healthy("True"), 60, "Healthy=True with the app up")
    app.healthy = False
    down = wait_until(healthy("False"), 60, "Healthy=False with the app down")
    assert "503" in down.get("message", ""), down
    app.healthy = True
    wait_until(healthy("True"), 60, "Healthy=True with the app up again")

    # (6) disconnect: stopping the agent marks the entry disconnected, then istiod deletes it.
    assert agent.stop() == 0, agent.tail()
    marked = wait_until(
        lambda: (
            (e := cp.get(WLE, ns, name)) is None or ("istio.io/disconnectedAt" in e["metadata"]["annotations"] and e)
        ),
        30,
        "disconnectedAt",
    )
    if marked is not True:  # may already be gone on a slow poll
        assert "istio.io/connectedAt" not in marked["metadata"]["annotations"]
    wait_until(lambda: cp.get(WLE, ns, name) is None, GRACE_PERIOD_S * 4, "WorkloadEntry deleted after the grace")


def test_agent_restart_within_grace_keeps_the_entry(
    control_plane: ControlPlane, group: VmGroup, agent: AgentProc, app: App
) -> None:
    cp = control_plane
    ns = group.namespace
    name = f"{group.name}-127.0.0.2"
    agent.start()
    first = wait_until(while_alive(agent, lambda: cp.get(WLE, ns, name)), 90, f"WorkloadEntry {ns}/{name}")
    uid = first["metadata"]["uid"]
    assert agent.stop() == 0, agent.tail()
    wait_until(
        lambda: "istio.io/disconnectedAt" in (cp.get(WLE, ns, name) or {}).get("metadata", {}).get("annotations", {}),
        30,
        "disconnectedAt",
    )
    agent.start()  # the persisted SVID lets it come back fast, inside the grace period
    back = wait_until(
        while_alive(
            agent,
            lambda: (
                (e := cp.get(WLE, ns, name)) is not None
                and "istio.io/connectedAt" in e["metadata"]["annotations"]
                and e
            ),
        ),
        GRACE_PERIOD_S * 2,
        "connectedAt again",
    )
    assert back["metadata"]["uid"] == uid, "istiod deleted and recreated the entry: the restart missed the grace"
    time.sleep(GRACE_PERIOD_S + 2)
    kept = cp.get(WLE, ns, name)
    assert kept is not None and kept["metadata"]["uid"] == uid


def test_renewal_after_the_bootstrap_token_is_gone(control_plane: ControlPlane, group: VmGroup, vm_files: Path) -> None:
    files = Path(shutil.copytree(vm_files, vm_files.with_name(vm_files.name + "-copy")))
    agent = AgentProc(files, secret_ttl="40s")
    try:
        agent.start()
        first = wait_until(lambda: svid(agent), 60, "first SVID")
        (files / "istio-token").unlink()
        second = wait_until(
            lambda: (c := svid(agent)) is not None and c.serial_number != first.serial_number and c,
            60,
            "a renewed SVID with the token gone",
        )
        assert spiffe_ids(second) == spiffe_ids(first)
        assert second.not_valid_after_utc > first.not_valid_after_utc
        agent.must_be_alive()
    finally:
        agent.cleanup()
        shutil.rmtree(files, ignore_errors=True)


def test_agent_reports_a_token_istiod_refuses(control_plane: ControlPlane, group: VmGroup, vm_files: Path) -> None:
    files = Path(shutil.copytree(vm_files, vm_files.with_name(vm_files.name + "-badaud")))
    (files / "istio-token").write_text(
        control_plane.create_token(group.namespace, group.service_account, audience="not-istio-ca")
    )
    agent = AgentProc(files)
    try:
        agent.start()
        # The agent keeps running and retrying, says why in its log, and never holds a certificate.
        wait_until(while_alive(agent, lambda: "not-istio-ca" in agent.log_text()), 60, "the audience named in the log")
        agent.must_be_alive()
        # vm-agent explains a refusal only after istiod's answer, so this also shows istiod said no.
        assert "UNAUTHENTICATED" in agent.log_text(), agent.tail()
        assert agent.cert_chain_files() == []
    finally:
        agent.cleanup()
        shutil.rmtree(files, ignore_errors=True)
