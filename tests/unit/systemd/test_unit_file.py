"""The systemd unit is valid and hardened (systemd-analyze, when the machine has it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[3] / "systemd" / "vm-agent.service"


def test_unit_declares_notify_watchdog_and_capture_hooks() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ExecStartPre=+/usr/bin/vm-agent netfilter apply",
        "ExecStopPost=+/usr/bin/vm-agent netfilter cleanup",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "StateDirectoryMode=0700",
    ):
        assert line in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants the ExecStart binaries to exist: point them at a stand-in in a copy of the unit.
    fake = tmp_path / "vm-agent"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = tmp_path / "vm-agent.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/vm-agent", str(fake)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "vm-agent.service" in line]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [p for p in problems if "Unknown" in p or "Invalid" in p], problems


def test_unit_is_sandboxed_except_for_the_capture_hooks() -> None:
    text = UNIT.read_text()
    for line in (
        "SystemCallFilter=@system-service",
        "PrivateDevices=yes",
        "ProtectProc=invisible",
        "UMask=0077",
        "CapabilityBoundingSet=\n",
        "User=istio-proxy",
    ):
        assert line in text, f"the unit lost {line.strip()!r}"


def test_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    """`systemd-analyze security` scores the unit as shipped (docs/packaging.md records the number)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()}")
    match = re.search(r"Overall exposure level for vm-agent\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.5, proc.stdout
