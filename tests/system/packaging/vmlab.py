"""A VM on this machine for the package tests: a Debian root booted by systemd-nspawn with a real
systemd, wired by a veth to the local mesh (``vm-agent mesh serve``) in a second network namespace.

Both namespaces are the test's own: the VM's only link is the veth, its only address 192.0.2.2 and
the mesh's 192.0.2.1 (TEST-NET-1, routed nowhere), so the VM reaches nothing but the mesh and every
capture rule the agent applies lands in the VM's namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil

from tests.system.packaging.conftest import CLEAN_ENV, inside

MESH_IP = "192.0.2.1"
VM_IP = "192.0.2.2"
NAMESPACE = "vm-ns"
GROUP = "vm-app"
# The WorkloadGroup the VM joins. Nothing but the agent runs on this VM, so the probe asks Envoy's
# readiness listener (15021, on the VM's address like an app's port): Healthy=True proves the agent
# probes and reports. A short drain keeps restarts quick.
MANIFESTS = f"""\
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: vm-sa
  namespace: {NAMESPACE}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: {GROUP}
  namespace: {NAMESPACE}
  annotations:
    proxy.istio.io/config: |
      terminationDrainDuration: 1s
spec:
  metadata:
    labels:
      app: {GROUP}
  template:
    serviceAccount: vm-sa
    ports:
      http: 8080
  probe:
    periodSeconds: 2
    httpGet:
      path: /healthz/ready
      port: 15021
"""

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout: float, what: str, diagnose: Callable[[], str] = str) -> T:
    """Poll ``check`` until it returns something other than None/False; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(0.5)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


class MeshLink:
    """The local mesh in its namespace, a veth to the VM's namespace, and vm-files from it."""

    def __init__(self, workdir: Path) -> None:
        token = secrets.token_hex(3)
        self.mesh_ns = f"vmpkg-mesh-{token}"
        self.vm_ns = f"vmpkg-vm-{token}"
        self.state = workdir / "mesh-state"
        self.manifests = workdir / "manifests"
        self.log = workdir / "mesh.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def vm_netns_path(self) -> str:
        return f"/run/netns/{self.vm_ns}"

    def up(self) -> None:
        for ns in (self.mesh_ns, self.vm_ns):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.mesh_ns, "link", "add", "mesh0", "type", "veth", "peer", "name", "host0", "netns", self.vm_ns)
        _ip("-n", self.mesh_ns, "addr", "add", f"{MESH_IP}/30", "dev", "mesh0")
        _ip("-n", self.vm_ns, "addr", "add", f"{VM_IP}/30", "dev", "host0")
        _ip("-n", self.mesh_ns, "link", "set", "mesh0", "up")
        _ip("-n", self.vm_ns, "link", "set", "host0", "up")
        self.manifests.mkdir(parents=True)
        (self.manifests / "vm.yaml").write_text(MANIFESTS)
        cmd = [
            "ip", "netns", "exec", self.mesh_ns,
            sys.executable, "-m", "vm_agent", "mesh", "serve",
            "--state", str(self.state),
            "--manifests", str(self.manifests),
            "--listen", f"{MESH_IP}:15012",
            "--server-ip", MESH_IP,
            "--admin-listen", "127.0.0.1:15014",
            "--grace-period", "5",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(
            lambda: (self.state / "mesh.json").is_file() and self.mesh("get", "proxies", expect=None).returncode == 0,
            30,
            "the local mesh to serve",
            self.tail,
        )

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for ns in (self.mesh_ns, self.vm_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def tail(self) -> str:
        try:
            return "mesh log:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no mesh log)"

    def mesh(self, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        """``vm-agent mesh ARGS --state STATE`` from the checkout, in the mesh's namespace."""
        cmd = ["ip", "netns", "exec", self.mesh_ns, sys.executable, "-m", "vm_agent", "mesh", *args]
        done = subprocess.run([*cmd, "--state", str(self.state)], capture_output=True, text=True, timeout=60)
        if expect is not None:
            assert done.returncode == expect, f"vm-agent mesh {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def vm_files(self, out: Path, *extra: str) -> Path:
        self.mesh(
            "vm-files", "--group", GROUP, "--namespace", NAMESPACE, "--out", str(out),
            "--autoregister", "--internal-ip", VM_IP, *extra,
        )  # fmt: skip
        return out

    def entry(self) -> dict[str, Any] | None:
        """The VM's auto-registered WorkloadEntry, when there is one."""
        done = self.mesh("get", "workloadentries", "-o", "json", "-n", NAMESPACE, expect=None)
        if done.returncode != 0:
            return None
        for item in json.loads(done.stdout):
            if item.get("metadata", {}).get("name") == f"{GROUP}-{VM_IP}":
                return dict(item)
        return None

    def healthy_entry(self) -> dict[str, Any] | None:
        entry = self.entry()
        conditions = ((entry or {}).get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Healthy" and c.get("status") == "True" for c in conditions):
            return entry
        return None


@contextmanager
def mesh_link(workdir: Path) -> Iterator[MeshLink]:
    link = MeshLink(workdir)
    try:
        link.up()
        yield link
    finally:
        link.down()


def place_vm_files(root: Path, files: Path) -> None:
    """istioctl's files where the Istio VM guide copies them (the token comes after boot: /run is a
    tmpfs), owned by the proxy user like the guide's ``chown``. Needs the package installed."""
    uid, gid = proxy_ids(root)
    targets = {
        "cluster.env": "/var/lib/istio/envoy/cluster.env",
        "mesh.yaml": "/etc/istio/config/mesh",
        "root-cert.pem": "/etc/certs/root-cert.pem",
        "istio-token": "/var/tmp/istio-token",
    }
    for name, path in targets.items():
        target = inside(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((files / name).read_bytes())
        os.chown(target, uid, gid)
    with inside(root, "/etc/hosts").open("a") as hosts:
        hosts.write((files / "hosts").read_text())


def proxy_ids(root: Path) -> tuple[int, int]:
    for line in inside(root, "/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "istio-proxy":
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no istio-proxy user in {root}/etc/passwd")


class Booted:
    """A root booted by systemd-nspawn; commands run inside it through nsenter."""

    def __init__(self, root: Path, leader: int) -> None:
        self.root = root
        self.leader = leader

    def run(self, *cmd: str, expect: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full = ["nsenter", "-t", str(self.leader), "-a", *CLEAN_ENV, *cmd]
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        if expect is not None:
            assert done.returncode == expect, (
                f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{self.journal()}"
            )
        return done

    def show(self, prop: str, unit: str = "vm-agent.service") -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def journal(self, unit: str = "vm-agent.service") -> str:
        full = ["nsenter", "-t", str(self.leader), "-a", *CLEAN_ENV, "journalctl", "-u", unit, "-n", "40", "--no-pager"]
        done = subprocess.run(full, capture_output=True, text=True, timeout=60, check=False)
        return f"journal of {unit}:\n{done.stdout}{done.stderr}"

    def rules(self) -> str:
        return self.run("iptables-save").stdout

    def status(self) -> dict[str, Any] | None:
        """``vm-agent status --json`` inside the VM, when the agent answers."""
        done = self.run("vm-agent", "status", "--json", expect=None, timeout=30)
        try:
            doc = json.loads(done.stdout)
        except json.JSONDecodeError:
            return None
        return doc if isinstance(doc, dict) else None

    def _processes(self, match: Callable[[psutil.Process], bool]) -> dict[int, psutil.Process]:
        """Processes of the container that ``match``, by their pid inside it (what systemd reports)."""
        found = {}
        for proc in psutil.Process(self.leader).children(recursive=True):
            try:
                if not match(proc):
                    continue
                with open(f"/proc/{proc.pid}/status") as status:
                    nspid = next(line for line in status if line.startswith("NSpid:"))
            except (psutil.Error, OSError, StopIteration):
                continue
            found[int(nspid.split()[-1])] = proc
        return found

    def agents(self) -> dict[int, psutil.Process]:
        """The agent processes (``main.py run`` under whichever interpreter), by pid inside the VM."""
        return self._processes(lambda p: "/usr/lib/vm-agent/main.py" in p.cmdline() and "run" in p.cmdline())

    def envoys(self) -> dict[int, psutil.Process]:
        return self._processes(lambda p: p.name() == "envoy")


@contextmanager
def booted(root: Path, netns_path: str) -> Iterator[Booted]:
    """Boot ``root`` with its network in the namespace at ``netns_path``; an orderly shutdown after."""
    name = f"vmpkg-{secrets.token_hex(3)}"
    nspawn = subprocess.Popen(
        [
            "systemd-nspawn",
            "-b",
            "-D",
            str(root),
            f"--network-namespace-path={netns_path}",
            # A VM's root may change its netfilter tables; nspawn grants this only with a network of
            # its own making (--private-network), not with a namespace handed to it.
            "--capability=CAP_NET_ADMIN",
            "--console=pipe",
            "-M",
            name,
            "--register=no",
            "--keep-unit",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        leader = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and nspawn.poll() is None:
            kids = psutil.Process(nspawn.pid).children()
            if kids:
                box = Booted(root, kids[0].pid)
                state = box.run("systemctl", "is-system-running", expect=None).stdout.strip()
                if state in ("running", "degraded"):
                    leader = kids[0].pid
                    break
            time.sleep(0.3)
        assert leader, f"the container's systemd did not come up (nspawn rc {nspawn.poll()})"
        yield Booted(root, leader)
    finally:
        nspawn.terminate()  # nspawn asks the container's systemd for an orderly shutdown
        try:
            nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(timeout=10)
