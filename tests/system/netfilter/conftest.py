"""Network namespaces for the capture tests: created per test, deleted after, never the host's.

These tests need root and ``ip netns``. They skip with an explicit reason only when those are
missing; the terminal summary lists what ran so CI output shows the capture was really exercised.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TOOL = Path(__file__).with_name("_netns_tool.py")
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[3]

_RAN: list[str] = []


@functools.cache
def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run as root, e.g. in CI's system job)"
    if shutil.which("ip") is None:
        return "needs `ip` from iproute2 (apt-get install iproute2)"
    probe = f"vmnf-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install iptables nftables dnsutils)")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class NetNs:
    """One namespace with lo up and a NIC holding the "instance IP" and a default route."""

    INSTANCE_IP = "10.200.0.2"

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[str]] = []

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *argv, check=check)

    def tool(self, *args: str, uid: int | None = None, gid: int | None = None, check: bool = False) -> str:
        """Run a short-lived actor (e.g. ``connect``) and return its output."""
        extra = ["--uid", str(uid)] if uid is not None else []
        extra += ["--gid", str(gid)] if gid is not None else []
        out = self.run(PYTHON, str(TOOL), *extra, *args, check=check)
        return (out.stdout + out.stderr).strip()

    def start(self, *args: str, uid: int | None = None, script: Path = TOOL) -> subprocess.Popen[str]:
        """Start a server actor and wait for its ``ready`` line."""
        extra = ["--uid", str(uid)] if uid is not None else []
        argv = ["ip", "netns", "exec", self.name, PYTHON, str(script), *extra, *args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"actor {args} did not start: {line!r} {err}")
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        self.procs.clear()


def _make(name: str) -> NetNs:
    sh("ip", "netns", "add", name)
    try:
        return _wire(NetNs(name))
    except BaseException:
        sh("ip", "netns", "del", name, check=False)
        raise


def _wire(ns: NetNs) -> NetNs:
    ns.run("ip", "link", "set", "lo", "up")
    # A veth pair with its far end unaddressed: a routable NIC where nothing ever answers (this
    # kernel has no dummy driver), so only a redirect can make a connection to 10.200.0.0/24 work.
    ns.run("ip", "link", "add", "inst0", "type", "veth", "peer", "name", "inst1")
    ns.run("ip", "addr", "add", f"{NetNs.INSTANCE_IP}/24", "dev", "inst0")
    ns.run("ip", "link", "set", "inst0", "up")
    ns.run("ip", "link", "set", "inst1", "up")
    ns.run("ip", "route", "add", "default", "via", "10.200.0.1")
    return ns


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[NetNs]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"vmnf-{os.getpid()}-{secrets.token_hex(3)}"
    ns = _make(name)
    started = time.monotonic()
    try:
        yield ns
    finally:
        ns.stop_all()
        sh("ip", "netns", "del", name, check=False)
        _RAN.append(f"{request.node.nodeid} in netns {name} ({time.monotonic() - started:.1f}s)")


@pytest.fixture
def peer(netns: NetNs) -> Iterator[NetNs]:
    """A second namespace wired to ``netns`` by a veth pair: the "remote client" of inbound tests."""
    name = netns.name + "-p"
    sh("ip", "netns", "add", name)
    other = NetNs(name)
    try:
        other.run("ip", "link", "set", "lo", "up")
        netns.run("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", name)
        netns.run("ip", "addr", "add", "10.201.0.2/24", "dev", "veth0")
        netns.run("ip", "link", "set", "veth0", "up")
        other.run("ip", "addr", "add", "10.201.0.1/24", "dev", "veth1")
        other.run("ip", "link", "set", "veth1", "up")
        yield other
    finally:
        other.stop_all()
        sh("ip", "netns", "del", name, check=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _RAN:
        terminalreporter.section("netfilter capture tests (real rules in network namespaces)")
        for line in _RAN:
            terminalreporter.write_line(line)
    elif netns_unavailable.cache_info().currsize and netns_unavailable():
        terminalreporter.section("netfilter capture tests")
        terminalreporter.write_line(f"SKIPPED: {netns_unavailable()}")
