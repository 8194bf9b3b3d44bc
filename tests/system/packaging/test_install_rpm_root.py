"""Install, upgrade and erase the rpm with ``rpm --root`` in a copy of the Debian root.

Debian's rpm has no Fedora dependency database, so installing uses ``--nodeps``; what it proves is
the rpm side of the scripts (``$1`` counts instead of deb's words) and the file layout. It runs
inside a test network namespace and a private /proc like the deb test. The interpreter dependency
is checked on its own: rpm itself evaluates the rich dependency against what its database provides.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.packaging.conftest import Chroot, Packages, _nfpm

pytestmark = [pytest.mark.system, pytest.mark.slow]


def _rpm(box: Chroot, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    """rpm on the host, acting on the root: scriptlets run chrooted into it."""
    private_proc = ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={box.root / 'proc'}"]
    cmd = ["ip", "netns", "exec", box.netns, *private_proc, "rpm", "--root", str(box.root), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if expect is not None:
        assert done.returncode == expect, (
            f"rpm {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


def _provider(tmp_path: Path, name: str) -> Path:
    """A bare rpm named ``name`` (e.g. python3.12): what a distribution's interpreter package provides."""
    nfpm = _nfpm()
    assert nfpm is not None
    (tmp_path / "empty").write_text("")
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"name: {name}\narch: amd64\nversion: 3.12.1\nmaintainer: test\n"
        f"contents:\n  - src: {tmp_path / 'empty'}\n    dst: /usr/share/doc/{name}/empty\n"
    )
    out = tmp_path / f"{name}.rpm"
    done = subprocess.run([nfpm, "package", "-f", str(config), "-p", "rpm", "-t", str(out)], capture_output=True)
    assert done.returncode == 0, done.stderr
    return out


def test_rpm_interpreter_dependency_is_a_rich_dependency_rpm_resolves(
    packages: Packages, debian_root: Path, netns: str, tmp_path: Path
) -> None:
    if shutil.which("rpm") is None:
        pytest.skip("needs rpm (apt-get install rpm)")
    box = Chroot(debian_root, netns)
    _rpm(box, "--initdb")
    needed = _rpm(box, "-i", "--test", str(packages.rpm), expect=None)
    assert needed.returncode != 0
    assert "(python3 >= 3.11 or python3.11 or python3.12 or python3.13" in needed.stderr, needed.stderr
    # One of the alternatives installed (only into rpm's database): the interpreter is satisfied,
    # the rest still missing from this Debian root's empty rpm database.
    _rpm(box, "-i", "--justdb", "--nodeps", str(_provider(tmp_path, "python3.12")))
    needed = _rpm(box, "-i", "--test", str(packages.rpm), expect=None)
    assert "python3" not in needed.stderr and "iptables is needed" in needed.stderr, needed.stderr


def test_rpm_install_upgrade_erase(packages: Packages, debian_root: Path, netns: str) -> None:
    if shutil.which("rpm") is None:
        pytest.skip("needs rpm (apt-get install rpm)")
    box = Chroot(debian_root, netns)
    _rpm(box, "--initdb")
    _rpm(box, "-i", "--nodeps", str(packages.rpm))

    assert box.path("/usr/lib/systemd/system/vm-agent.service").is_file()
    user = box.run("getent", "passwd", "istio-proxy").stdout.strip().split(":")
    assert user[5] == "/var/lib/istio", user
    assert (box.root / "etc/istio").is_symlink()
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
