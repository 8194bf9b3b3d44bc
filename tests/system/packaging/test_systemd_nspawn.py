"""The deb on a real systemd, with the real agent: boot a Debian root with systemd-nspawn (bookworm's
python3 3.11, trixie's 3.13), install, start, upgrade (try-restart), remove (stop + capture cleanup),
purge.

The agent reaches the local mesh over a veth (tests/system/packaging/vmlab.py), so ``systemctl start``
returns only once the unit's hardened agent got its certificate and its Envoy is live (Type=notify):
the unit's sandbox, user, sockets and capture hooks are all exercised as they ship.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.packaging.conftest import CLEAN_ENV, RELEASES, Packages, RootFactory, missing_tool
from tests.system.packaging.vmlab import Booted, booted, mesh_link, place_vm_files, wait_until

pytestmark = [pytest.mark.system, pytest.mark.slow]


def _live(box: Booted) -> dict[str, object] | None:
    doc = box.status()
    if doc and (doc.get("ready") or {}).get("ready") and (doc.get("identity") or {}).get("spiffe_id"):
        return doc
    return None


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_install_start_upgrade_remove_purge(
    release: str, make_root: RootFactory, packages: Packages, tmp_path: Path
) -> None:
    reason = missing_tool("systemd-nspawn", "nsenter")
    if reason:
        pytest.skip(reason)
    root = make_root(release)
    # This root boots without a cloud: cloud-init (trixie's) stays out of the way.
    (root / "etc/cloud").mkdir(parents=True, exist_ok=True)
    (root / "etc/cloud/cloud-init.disabled").touch()
    # /var/tmp: the booted container mounts a fresh tmpfs on /tmp.
    shutil.copy(packages.deb, root / "var/tmp/vm-agent.deb")
    # Installed before boot, like an image build: the scripts must cope with no running systemd.
    done = subprocess.run(
        ["chroot", str(root), *CLEAN_ENV, "dpkg", "-i", "/var/tmp/vm-agent.deb"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    with mesh_link(tmp_path) as link:
        place_vm_files(root, link.vm_files(tmp_path / "vm-files"))
        with booted(root, link.vm_netns_path) as box:
            assert box.run("systemctl", "is-enabled", "vm-agent.service", expect=None).stdout.strip() == "disabled"
            assert box.show("ActiveState") == "inactive", "installing must not start the agent"
            # /run is a fresh tmpfs after boot: the packaged tmpfiles.d entry recreated the secrets folder.
            assert box.run("stat", "-c", "%U:%G", "/run/secrets").stdout.strip() == "istio-proxy:istio-proxy"
            box.run(
                "install", "-D", "-m", "0600", "-o", "istio-proxy", "-g", "istio-proxy",
                "/var/tmp/istio-token", "/var/run/secrets/tokens/istio-token",
            )  # fmt: skip

            # The release's own interpreter runs the agent, with the modules compiled for it at install.
            python = box.run("python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
            assert python == RELEASES[release].python
            version = box.run("vm-agent", "version").stdout
            assert f"vm-agent {packages.version} " in version and f"Python {python}." in version, version
            tag = python.replace(".", "")
            assert (root / f"usr/lib/vm-agent/site-packages/vm_agent/__pycache__/cli.cpython-{tag}.pyc").is_file()
            check = box.run("vm-agent", "check")
            assert "no problems" in check.stdout, check.stdout

            box.run("systemctl", "start", "vm-agent.service")  # Type=notify: returns once Envoy is live
            first = int(box.show("MainPID"))
            assert first > 0 and box.show("ActiveState") == "active"
            assert "VMAGENT" in box.rules(), "ExecStartPre did not apply the capture rules"
            doc = wait_until(lambda: _live(box), 30, "the agent's status to say ready", box.journal)
            assert doc["envoy"]["state"] == "running", doc["envoy"]  # type: ignore[index]
            assert list(box.agents()) == [first]
            assert box.agents()[first].uids().real != 0, "the agent runs as root"

            box.run("dpkg", "-i", "/var/tmp/vm-agent.deb", timeout=300)
            second = int(box.show("MainPID"))
            assert box.show("ActiveState") == "active"
            assert second > 0 and second != first, "the upgrade did not restart the running agent"
            # try-restart returned once the new agent was ready: the old one and its Envoy are gone.
            assert list(box.agents()) == [second], "the old agent survived the restart"
            assert len(box.envoys()) == 1, list(box.envoys())
            assert "VMAGENT" in box.rules(), "rules missing after the upgrade's restart"

            box.run("dpkg", "-r", "vm-agent", timeout=300)
            assert not box.agents() and not box.envoys(), "a process of the unit survived the removal"
            assert "VMAGENT" not in box.rules(), "the removal left capture rules"
            assert box.run("systemctl", "is-active", "vm-agent.service", expect=None).stdout.strip() in (
                "inactive",
                "unknown",
            )
            assert not (root / "usr/lib/vm-agent").exists(), "the removal left compiled modules behind"
            assert (root / "var/lib/vm-agent").is_dir(), "removal (not purge) must keep the agent's key"

            box.run("dpkg", "-P", "vm-agent")
            assert not (root / "var/lib/vm-agent").exists(), "purge keeps the agent's state folder"
            assert box.run("dpkg-query", "-W", "vm-agent", expect=None).returncode != 0
