"""Install, upgrade and erase the rpm with ``rpm --root`` in a copy of the Debian root.

Debian's rpm has no Fedora dependency database, so this uses ``--nodeps``; what it proves is the
rpm side of the scripts (``$1`` counts instead of deb's words) and the file layout. It runs inside
a test network namespace and a private /proc like the deb test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.packaging.conftest import Chroot, Packages

pytestmark = [pytest.mark.system, pytest.mark.slow]


def _rpm(box: Chroot, *args: str) -> subprocess.CompletedProcess[str]:
    """rpm on the host, acting on the root: scriptlets run chrooted into it."""
    private_proc = ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={box.root / 'proc'}"]
    cmd = ["ip", "netns", "exec", box.netns, *private_proc, "rpm", "--root", str(box.root), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"rpm {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_rpm_install_upgrade_erase(packages: Packages, debian_root: Path, netns: str) -> None:
    if shutil.which("rpm") is None:
        pytest.skip("needs rpm (apt-get install rpm)")
    box = Chroot(debian_root, netns)
    _rpm(box, "--initdb")
    _rpm(box, "-i", "--nodeps", str(packages.rpm))

    assert box.path("/usr/lib/systemd/system/vm-agent.service").is_file()
    user = box.run("getent", "passwd", "istio-proxy").stdout.strip().split(":")
    assert user[5] == "/var/lib/istio", user
    assert box.path("/etc/istio").is_symlink()
    assert box.run("vm-agent", "version").stdout.startswith(f"vm-agent {packages.version} ")

    # rpm -U of the same package: %post with $1=2 then the old %preun with $1=1, which must not
    # stop or clean up anything; the admin's file stays.
    box.path("/var/lib/istio/envoy/cluster.env").write_text("ISTIO_META_MARK=kept\n")
    upgraded = _rpm(box, "-U", "--replacepkgs", "--nodeps", str(packages.rpm))
    assert "failed" not in upgraded.stderr, upgraded.stderr
    assert box.path("/var/lib/istio/envoy/cluster.env").read_text() == "ISTIO_META_MARK=kept\n"
    assert box.path("/usr/bin/vm-agent").is_file()

    erased = _rpm(box, "-e", "vm-agent")
    assert "failed" not in erased.stderr, erased.stderr
    assert not box.path("/usr/bin/vm-agent").exists()
    assert not box.path("/usr/lib/vm-agent").exists()
    assert not box.path("/usr/lib/systemd/system/vm-agent.service").exists()
    assert box.path("/var/lib/istio/envoy/cluster.env").is_file()
