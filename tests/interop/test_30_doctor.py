"""`vm-agent doctor` on istioctl's files, unchanged, against real istiod: before the agent starts and after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.interop.agentproc import AgentProc
from tests.interop.conftest import App, VmGroup
from tests.interop.lab import TRUST_DOMAIN, ControlPlane, wait_until

pytestmark = [pytest.mark.interop]


def doctor(agent: AgentProc) -> tuple[int, dict[str, dict[str, Any]]]:
    """``vm-agent doctor --json`` with exactly the inputs of the agent (it need not be running)."""
    argv = [sys.executable, "-m", "vm_agent", "doctor", "--json", *agent.argv()[4:]]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.stdout.startswith("{"), res.stdout + res.stderr
    return res.returncode, {c["id"]: c for c in json.loads(res.stdout)["checks"]}


def explain(checks: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"{c['status']:5} {i:16} {c['summary']} | {c['hint']}" for i, c in checks.items())


def test_doctor_before_and_after_the_agent_starts(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, app: App
) -> None:
    agent = AgentProc(vm_files)
    try:
        code, checks = doctor(agent)
        statuses = {i: c["status"] for i, c in checks.items()}
        want = {
            "config": "ok",
            "token": "ok",  # a real TokenRequest token: audience istio-ca
            "certificate": "warn",  # not issued yet
            "istiod-name": "ok",  # istioctl's hosts line
            "ca": "ok",  # istiod's serving certificate verified under istiod.istio-system.svc with istioctl's root
            "discovery": "ok",
            "envoy": "ok",
            "capture-rules": "skip",
            "readiness-probe": "ok",
            "instance-ips": "warn",  # istioctl --internalIP=127.0.0.2, a loopback address
            "agent": "warn",  # not running
            "dns-capture": "skip",
        }
        assert statuses == want, explain(checks)
        assert code == 0
        assert checks["token"]["details"]["audiences"] == ["istio-ca"]
        assert checks["token"]["details"]["subject"] == (
            f"system:serviceaccount:{group.namespace}:{group.service_account}"
        )
        assert checks["ca"]["details"]["server_name"] == "istiod.istio-system.svc"

        agent.start()
        wait_until(lambda: agent.get(agent.status_port, "/healthz/ready")[0] == 200, 90, "the agent to be ready")
        code, checks = doctor(agent)
        statuses = {i: c["status"] for i, c in checks.items()}
        assert statuses == want | {"certificate": "ok", "agent": "ok"}, explain(checks)
        # The certificate istiod's CA issued, verified against istioctl's root-cert.pem.
        spiffe = f"spiffe://{TRUST_DOMAIN}/ns/{group.namespace}/sa/{group.service_account}"
        assert checks["certificate"]["details"]["spiffe_id"] == spiffe
        assert checks["certificate"]["details"]["root_checked"] is True
    finally:
        agent.cleanup()
