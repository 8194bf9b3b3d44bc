"""The deb's scripts against a real systemd: boot a Debian root with systemd-nspawn, install, start,
upgrade (try-restart), remove (stop + capture cleanup).

The agent itself would need a reachable istiod to get ready, so a drop-in replaces only its
ExecStart with a stand-in process; the unit's own capture hooks (``vm-agent netfilter apply`` before
start, ``cleanup`` after stop), user and hardening stay real. The container has a private network,
so every rule lands in its own namespace.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.system.packaging.conftest import CLEAN_ENV, Packages

pytestmark = [pytest.mark.system, pytest.mark.slow]

FIXTURE = Path("/work/shared/fixtures/istioctl/ipv4")
STAND_IN = """\
[Service]
Type=simple
WatchdogSec=0
ExecStart=
ExecStart=/usr/bin/sleep infinity
"""


class Booted:
    def __init__(self, root: Path, leader: int) -> None:
        self.root = root
        self.leader = leader

    def run(self, *cmd: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        full = ["nsenter", "-t", str(self.leader), "-a", *CLEAN_ENV, *cmd]
        done = subprocess.run(full, capture_output=True, text=True, timeout=120, check=False)
        if expect is not None:
            assert done.returncode == expect, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def show(self, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", "vm-agent.service").stdout.strip()

    def rules(self) -> str:
        return self.run("iptables-save").stdout

    def stand_ins(self) -> list[int]:
        return [
            p.pid
            for p in psutil.Process(self.leader).children(recursive=True)
            if p.cmdline() == ["/usr/bin/sleep", "infinity"]
        ]


@pytest.fixture
def booted(systemd_root: Path, packages: Packages) -> Iterator[Booted]:
    root = systemd_root
    shutil.copy(packages.deb, root / "var" / "tmp" / "vm-agent.deb")
    # /var/tmp: the booted container mounts a fresh tmpfs on /tmp.
    # Installed before boot, like an image build: the scripts must cope with no running systemd.
    done = subprocess.run(
        ["chroot", str(root), *CLEAN_ENV, "dpkg", "-i", "/var/tmp/vm-agent.deb"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shutil.copy(FIXTURE / "cluster.env", root / "var/lib/istio/envoy/cluster.env")
    shutil.copy(FIXTURE / "mesh.yaml", root / "var/lib/istio/config/mesh")
    shutil.copy(FIXTURE / "root-cert.pem", root / "etc/certs/root-cert.pem")
    dropin = root / "etc/systemd/system/vm-agent.service.d"
    dropin.mkdir(parents=True)
    (dropin / "stand-in.conf").write_text(STAND_IN)

    name = f"vmpkg-{secrets.token_hex(3)}"
    nspawn = subprocess.Popen(
        [
            "systemd-nspawn",
            "-b",
            "-D",
            str(root),
            "--private-network",
            "--console=pipe",
            "-M",
            name,
            "--register=no",
            "--keep-unit",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        leader = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and nspawn.poll() is None:
            kids = psutil.Process(nspawn.pid).children()
            if kids:
                box = Booted(root, kids[0].pid)
                state = box.run("systemctl", "is-system-running", expect=None).stdout.strip()
                if state in ("running", "degraded"):
                    leader = kids[0].pid
                    break
            time.sleep(0.3)
        assert leader, f"the container's systemd did not come up (nspawn rc {nspawn.poll()})"
        yield Booted(root, leader)
    finally:
        nspawn.terminate()  # nspawn asks the container's systemd for an orderly shutdown
        try:
            nspawn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(timeout=10)


def test_upgrade_restarts_a_running_agent_and_removal_stops_it(booted: Booted) -> None:
    assert booted.run("systemctl", "is-enabled", "vm-agent.service", expect=None).stdout.strip() == "disabled"
    assert booted.show("ActiveState") == "inactive", "installing must not start the agent"
    # /run is a fresh tmpfs after boot: the packaged tmpfiles.d entry recreated the secrets folder.
    assert booted.run("stat", "-c", "%U:%G", "/run/secrets").stdout.strip() == "istio-proxy:istio-proxy"

    booted.run("systemctl", "start", "vm-agent.service")
    first = int(booted.show("MainPID"))
    assert first > 0 and booted.show("ActiveState") == "active"
    assert "VMAGENT" in booted.rules(), "ExecStartPre did not apply the capture rules"

    booted.run("dpkg", "-i", "/var/tmp/vm-agent.deb")
    second = int(booted.show("MainPID"))
    assert booted.show("ActiveState") == "active"
    assert second > 0 and second != first, "the upgrade did not restart the running agent"
    assert "VMAGENT" in booted.rules(), "rules missing after the upgrade's restart"
    assert len(booted.stand_ins()) == 1, "the old process survived the restart"

    booted.run("dpkg", "-r", "vm-agent")
    assert booted.stand_ins() == [], "a process of the unit survived the removal"
    assert "VMAGENT" not in booted.rules(), "the removal left capture rules"
    assert booted.run("systemctl", "is-active", "vm-agent.service", expect=None).stdout.strip() in (
        "inactive",
        "unknown",
    )
