"""Network namespaces, bridges and veth pairs the lab creates, and only those.

A *network* is a namespace holding one Linux bridge (its gateway address on the bridge, forwarding off, so a
packet that escapes a VM's capture dies there instead of reaching the host). A *host* is a namespace with one leg
(veth) per network it joins. Everything is named ``vmlab-<id>-...`` so a run killed half-way is cleaned up by the
next one (``remove_stale``). Files under ``/etc/netns/<ns>/`` (hosts, resolv.conf) are what ``ip netns exec``
bind-mounts over ``/etc`` for the processes it starts: each VM gets its own resolver and hosts file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "vmlab-"
ETC_NETNS = Path("/etc/netns")
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def sh(
    *argv: str, check: bool = True, timeout: float = 60, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), input=input_text, capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def unavailable() -> str | None:
    """Why the lab cannot run here (exact reason), or None."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, capture rules, other users)"
    for tool in ("ip", "setpriv", "iptables-restore", "nft"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (scripts/install-system-deps.sh installs it)"
    probe = f"{PREFIX}probe-{secrets.token_hex(2)}"
    res = sh("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` does not work here: {res.stderr.strip()}"
    try:
        made = sh("ip", "-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if made.returncode != 0:
            return f"this kernel cannot create a bridge in a namespace: {made.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


def _kill_namespace_processes(ns: str) -> None:
    for _ in range(3):
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def remove_stale() -> list[str]:
    """Namespaces (and their processes) left by an earlier lab run that was killed before its cleanup."""
    names = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    stale = [n for n in names if n.startswith(PREFIX)]
    for ns in stale:
        delete_namespace(ns)
    if ETC_NETNS.is_dir():
        for leftover in ETC_NETNS.glob(f"{PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return stale


def _enter_netns(ns: str) -> None:
    """Thread initializer: move this thread (only this thread) into ``ns``; sockets it opens live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Network:
    name: str
    ns: str
    subnet: ipaddress.IPv4Network
    gateway: str

    def address(self, host_index: int) -> str:
        return str(self.subnet.network_address + host_index)


@dataclass
class Host:
    """One namespace: a VM, the control plane, a DNS server, a plain client or a gateway."""

    role: str
    ns: str
    addresses: dict[str, str] = field(default_factory=dict)
    """network name -> this host's address on it"""
    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def ip(self) -> str:
        return next(iter(self.addresses.values()))

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.exec_prefix(), *argv, check=check, timeout=timeout, input_text=input_text)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 120) -> T:
        """Run ``fn`` in a thread that lives in this namespace (for sockets the test process opens itself)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"ns-{self.role}", initializer=_enter_netns, initargs=(self.ns,)
            )
        return self._executor.submit(fn, *args).result(timeout)

    def write_etc(self, name: str, text: str) -> None:
        """A file ``ip netns exec`` shows as /etc/<name> to every process started in this namespace."""
        folder = ETC_NETNS / self.ns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        (folder / name).chmod(0o644)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class Topology:
    """Creates networks and hosts; ``destroy`` removes every namespace it made, processes first."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(2)
        self.networks: dict[str, Network] = {}
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []

    def _ns(self, suffix: str) -> str:
        name = f"{PREFIX}{self.id}-{suffix}"
        sh("ip", "netns", "add", name)
        self._namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def network(self, name: str, cidr: str) -> Network:
        subnet = ipaddress.IPv4Network(cidr)
        ns = self._ns(f"net-{name}")
        gateway = str(subnet.network_address + 1)
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns, "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", "br0")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        # Forwarding stays off in the bridge's namespace: nothing is routed beyond the lab's own networks.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        net = Network(name, ns, subnet, gateway)
        self.networks[name] = net
        return net

    def host(self, role: str, legs: dict[str, int], *, default_via: str | None = None) -> Host:
        """A namespace with one leg per network (``{network: host index}``); the default route goes through the
        first network's gateway (or ``default_via``), where unmatched packets die."""
        ns = self._ns(role)
        host = Host(role, ns)
        self.hosts[role] = host
        for net_name, index in legs.items():
            self.attach(host, net_name, index)
        first = self.networks[next(iter(legs))]
        sh("ip", "-n", ns, "route", "add", "default", "via", default_via or first.gateway)
        return host

    def attach(self, host: Host, network: str, index: int) -> str:
        """Plug ``host`` into ``network`` with one more leg (only that network's subnet is routed through it)."""
        net = self.networks[network]
        leg = len(host.addresses)
        port, dev = self._port_name(host, leg), f"eth{leg}"
        addr = net.address(index)
        sh("ip", "-n", net.ns, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", host.ns)
        sh("ip", "-n", net.ns, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", host.ns, "addr", "add", f"{addr}/{net.subnet.prefixlen}", "dev", dev)
        sh("ip", "-n", host.ns, "link", "set", dev, "up")
        host.addresses[network] = addr
        return addr

    def _port_name(self, host: Host, leg: int) -> str:
        return f"p{list(self.hosts).index(host.role)}-{leg}"

    def bridge_port(self, host: Host, network: str) -> tuple[str, str]:
        """(namespace, interface) of ``host``'s port on ``network``'s bridge."""
        return self.networks[network].ns, self._port_name(host, list(host.addresses).index(network))

    def set_link(self, host: Host, network: str, up: bool) -> None:
        """Cut (or restore) ``host``'s leg on ``network`` at the bridge: packets vanish silently, like a dead link."""
        ns, port = self.bridge_port(host, network)
        sh("ip", "-n", ns, "link", "set", port, "up" if up else "down")

    def destroy(self) -> None:
        for host in self.hosts.values():
            host.close()
        for ns in reversed(self._namespaces):
            delete_namespace(ns)
        self._namespaces.clear()
