"""`make demo` is the newcomer's first run: it must work end to end (issue 3), here in its --once form."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_end_to_end() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="vmdemo", dir="/tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "vm_agent.demo", "--once", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "identity spiffe://cluster.local/ns/demo/sa/hello-sa" in out
    assert "Envoy live" in out
    assert "hello.demo.svc.cluster.local →" in out
    assert "condition Healthy=True" in out
    assert "caller identity: spiffe://cluster.local/ns/demo/sa/client-sa" in out
    assert 'istio_requests_total{reporter="destination"' in out
    assert 'source_principal="spiffe://cluster.local/ns/demo/sa/client-sa"' in out
    assert 'destination_workload="hello"' in out
    assert "agents stopped (exit 0, 0)" in out
