"""Install, upgrade and remove the deb in a throwaway Debian bookworm root (debootstrap, chroot), and
how the launcher picks an interpreter there.

Everything runs inside a network namespace this test creates, so the capture rules the agent
applies and the package's removal cleans up never touch the host's netfilter tables.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.fixtures import ISTIOCTL_FIXTURES
from tests.system.packaging.conftest import Chroot, Packages

pytestmark = [pytest.mark.system, pytest.mark.slow]

FIXTURE = ISTIOCTL_FIXTURES / "ipv4"


def test_install_upgrade_remove_in_debian_root(packages: Packages, debian_root: Path, netns: str) -> None:
    box = Chroot(debian_root, netns)
    shutil.copy(packages.deb, box.path("/tmp/vm-agent.deb"))
    assert box.run("getent", "passwd", "istio-proxy", expect=None).returncode == 2, (
        "the clean root already has istio-proxy"
    )

    box.run("dpkg", "-i", "/tmp/vm-agent.deb")

    # postinst: the proxy user, system account without a login, home /var/lib/istio.
    user = box.run("getent", "passwd", "istio-proxy").stdout.strip().split(":")
    assert user[5] == "/var/lib/istio" and user[6] == "/usr/sbin/nologin", user
    assert int(user[2]) < 1000, f"istio-proxy is not a system user: uid {user[2]}"
    uid, gid = int(user[2]), int(user[3])
    assert box.run("getent", "group", "istio-proxy").stdout.split(":")[2] == str(gid)
    etc_istio = box.root / "etc/istio"
    assert etc_istio.is_symlink() and Path(etc_istio.readlink()) == Path("/var/lib/istio")
    for folder in (
        "/var/lib/istio/envoy",
        "/var/lib/istio/config",
        "/var/lib/istio/proxy",
        "/etc/certs",
        "/run/secrets",
    ):
        st = box.path(folder).stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), f"{folder} is owned by {st.st_uid}:{st.st_gid}"
    # No systemd in a chroot: the package must not have tried to enable anything.
    assert not box.path("/etc/systemd/system/multi-user.target.wants/vm-agent.service").exists()

    out = box.run("vm-agent", "version").stdout
    assert out.startswith(f"vm-agent {packages.version} ") and "Python 3.11." in out, out
    # Compiled at install for bookworm's python3, nothing shipped compiled.
    assert box.path("/usr/lib/vm-agent/site-packages/vm_agent/__pycache__/cli.cpython-311.pyc").is_file()

    # The launcher prefers /usr/bin/python3, else the newest python3.X it has modules for, else it
    # says what to install (here: without /usr/bin/python3, then without python3.11 too).
    python3 = box.root / "usr/bin/python3"
    python3.rename(python3.with_name("python3.moved"))
    assert "Python 3.11." in box.run("vm-agent", "version").stdout
    python311 = box.root / "usr/bin/python3.11"
    python311.rename(python311.with_name("python3.11.moved"))
    missing = box.run("vm-agent", "version", expect=1)
    assert "needs CPython 3.11, 3.12" in missing.stderr and "there is no /usr/bin/python3" in missing.stderr
    assert "install one, for example: apt-get install python3.11" in missing.stderr, missing.stderr
    python311.with_name("python3.11.moved").rename(python311)
    python3.with_name("python3.moved").rename(python3)

    # istioctl's files where the VM guide puts them; the placeholder root cert is reported by path.
    shutil.copy(FIXTURE / "cluster.env", box.path("/var/lib/istio/envoy/cluster.env"))
    # /etc/istio links to /var/lib/istio inside the root: copy through the real path.
    shutil.copy(FIXTURE / "mesh.yaml", box.path("/var/lib/istio/config/mesh"))
    shutil.copy(FIXTURE / "root-cert.pem", box.path("/etc/certs/root-cert.pem"))
    box.path("/run/secrets/tokens").mkdir()
    shutil.copy(FIXTURE / "istio-token", box.path("/run/secrets/tokens/istio-token"))
    check = box.run("vm-agent", "check", expect=2)
    assert "/etc/certs/root-cert.pem: expected PEM certificates" in check.stdout

    box.run("vm-agent", "netfilter", "apply")
    assert "VMAGENT" in box.rules(), "netfilter apply left no VMAGENT rules in the test namespace"

    # Upgrade in place (same version again: prerm upgrade + postinst configure <old>): the rules and
    # the admin's files stay, the scripts run again without error.
    box.run("dpkg", "-i", "/tmp/vm-agent.deb")
    assert "VMAGENT" in box.rules(), "an upgrade must not drop the capture of a running agent"
    assert box.path("/var/lib/istio/envoy/cluster.env").read_bytes() == (FIXTURE / "cluster.env").read_bytes()

    removed = box.run("dpkg", "-r", "vm-agent")
    assert "failed" not in removed.stderr, removed.stderr
    assert "VMAGENT" not in box.rules(), "removal left capture rules behind"
    # The compiled modules the post-install made went with the package.
    for gone in (
        "/usr/bin/vm-agent",
        "/usr/lib/vm-agent",
        "/lib/systemd/system/vm-agent.service",
        "/usr/lib/tmpfiles.d/vm-agent.conf",
    ):
        assert not box.path(gone).exists(), f"{gone} survived dpkg -r"
    # Kept on purpose: the user and the admin's mesh files (they may serve istio-sidecar too).
    assert box.run("getent", "passwd", "istio-proxy").returncode == 0
    assert box.path("/var/lib/istio/envoy/cluster.env").is_file()

    box.path("/var/lib/vm-agent").mkdir()
    box.run("dpkg", "-P", "vm-agent")
    assert not box.path("/var/lib/vm-agent").exists(), "purge keeps the agent's state folder"
    assert box.run("dpkg-query", "-W", "vm-agent", expect=None).returncode != 0
