"""Control and debug endpoints refuse non-loopback clients (403 before 405, §18 P16).

Needs root: the client uses a non-loopback address inside a network namespace this test creates and deletes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]


def run_in_namespace(*extra: str) -> dict[str, int]:
    ns = f"vma-status-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.213.0.1/32", "dev", "lo"], check=True)
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "tests.integration.status.remote_client",
                "10.213.0.1",
                "15020",
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert isinstance(results, dict)
    return results


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ip netns")
def test_non_loopback_client_gets_403_on_control_and_debug() -> None:
    results = run_in_namespace()
    assert results == {
        "GET /healthz/ready": 200,  # readiness and metrics are for anyone who can reach the port
        "GET /stats/prometheus": 200,
        "POST /quitquitquit": 403,
        "GET /quitquitquit": 403,  # locality is checked before the method
        "POST /drain": 403,
        "GET /debug/ndsz": 403,
        "GET /debug/status": 403,
        "callbacks": 0,
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ip netns")
def test_metrics_localhost_only_refuses_remote_scrapes() -> None:
    results = run_in_namespace("metrics-localhost-only")
    assert results["GET /stats/prometheus"] == 403
    assert results["GET /healthz/ready"] == 200
