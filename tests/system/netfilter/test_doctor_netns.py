"""`vm-agent doctor` with real capture rules, inside a network namespace this test creates and deletes.

Everything runs in the namespace the way it runs on a VM: the local mesh on 127.0.0.1:15012, the rules
installed with `vm-agent netfilter apply`, a real `vm-agent run` (real Envoy) whose group is the proxy
group the rules exempt, an application and the resolv.conf nameserver (a test resolver that answers
every name with one address). Doctor runs as root in the namespace, so its DNS query is captured.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import sample_manifests
from tests.system.netfilter.conftest import PYTHON, REPO, NetNs, require_tools

pytestmark = [pytest.mark.system, pytest.mark.slow]

APP_PORT = 8080
RESOLVER = "127.0.0.53"
RESOLVER_ANSWER = "192.0.2.99"  # what the real resolver says for every name
PROXY = "1337"


class Vm:
    """The VM's files and processes inside ``ns``; every path under one short folder (Unix socket limits)."""

    def __init__(self, ns: NetNs, work: Path) -> None:
        self.ns, self.work = ns, work
        self.mesh_state = work / "mesh"
        self.manifests = work / "manifests"
        self.files = work / "files"
        self.resolv = work / "resolv.conf"
        self.resolv.write_text(f"nameserver {RESOLVER}\n")
        self.settings = {
            "VM_AGENT_SCAN_INTERFACES": "false",
            "PROXY_UID": PROXY,
            "PROXY_GID": PROXY,
            "PROXY_CONFIG": f"configPath: {work / 'proxy'}\n",
            "VM_AGENT_SDS_SOCKET": str(work / "sds.sock"),
        }
        self.agent: subprocess.Popen[str] | None = None

    def config_args(self) -> list[str]:
        args = ["--config-dir", str(self.files), "--state-dir", str(self.work / "state")]
        args += ["--resolv-conf", str(self.resolv)]
        for key, value in self.settings.items():
            args += ["--set", f"{key}={value}"]
        return args

    def vm_agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``vm-agent ARGS`` in the namespace, as root."""
        argv = ["ip", "netns", "exec", self.ns.name, PYTHON, "-m", "vm_agent", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"vm-agent {' '.join(args[:2])} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
            )
        return proc

    def background(self, argv: list[str], log: str) -> subprocess.Popen[str]:
        out = (self.work / log).open("w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, *argv], stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        self.ns.procs.append(proc)  # killed by the fixture, also on failure
        return proc

    def start_mesh(self, *, services: bool) -> None:
        self.manifests.mkdir()
        probe = f"    periodSeconds: 1\n    tcpSocket:\n      host: 127.0.0.1\n      port: {APP_PORT}\n"
        docs = sample_manifests(namespace="vmns", group="vmapp", app_port=APP_PORT, service_port=80, probe=probe)
        # Never the DNS-resolved ServiceEntry: Envoy would wait for the host's resolver, unreachable from here.
        # Without the Service the NameTable is empty.
        unwanted = ("kind: ServiceEntry",) if services else ("kind: ServiceEntry", "kind: Service\n")
        docs = "---\n".join(d for d in docs.split("---\n") if not any(u in d for u in unwanted))
        (self.manifests / "vm.yaml").write_text(docs)
        cmd = [PYTHON, "-m", "vm_agent", "mesh", "serve", "--state", str(self.mesh_state)]
        self.background([*cmd, "--manifests", str(self.manifests)], "mesh.log")
        wait(lambda: (self.mesh_state / "mesh.json").exists(), 30, "the mesh", self.work / "mesh.log")
        subprocess.run(
            [PYTHON, "-m", "vm_agent", "mesh", "vm-files", "--state", str(self.mesh_state), "--manifests",
             str(self.manifests), "--group", "vmapp", "-n", "vmns", "--out", str(self.files),
             "--ingress-ip", "127.0.0.1", "--internal-ip", NetNs.INSTANCE_IP, "--autoregister"],
            check=True, capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip

    def start_agent(self) -> None:
        # Root, but in the proxy group: the rules let the agent's and Envoy's own traffic (gid 1337) through.
        argv = ["setpriv", "--regid", PROXY, "--clear-groups", PYTHON, "-m", "vm_agent", "run", *self.config_args()]
        self.agent = self.background(argv, "agent.log")

        def ready() -> bool:
            return self.vm_agent("status", "--url", "http://127.0.0.1:15020", check=False).returncode == 0

        wait(ready, 60, "the agent to be ready", self.work / "agent.log")

    def doctor(self) -> tuple[int, dict[str, Any]]:
        proc = self.vm_agent("doctor", "--json", *self.config_args(), check=False)
        assert proc.stdout.startswith("{"), proc.stdout + proc.stderr
        return proc.returncode, json.loads(proc.stdout)


def wait(check: Any, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{text[-3000:]}")


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in doc["checks"]}


def explain(doc: dict[str, Any]) -> str:
    return "\n".join(f"{c['status']:5} {c['id']:16} {c['summary']} | {c['hint']}" for c in doc["checks"])


@pytest.fixture
def vm(netns: NetNs) -> Iterator[Vm]:
    require_tools("iptables-restore", "iptables-save", "setpriv")
    work = Path(tempfile.mkdtemp(prefix="vmd", dir="/tmp"))
    try:
        yield Vm(netns, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("services", [True, False], ids=["mesh-names", "empty-name-table"])
def test_doctor_sees_the_capture_and_dns_capture_break(vm: Vm, services: bool) -> None:
    vm.start_mesh(services=services)
    vm.ns.start("listen", "127.0.0.1", str(APP_PORT), "app")
    vm.ns.start("dns-upstream", RESOLVER, "53", RESOLVER_ANSWER)
    vm.vm_agent("netfilter", "apply", "--backend", "iptables", *vm.config_args())
    vm.start_agent()

    # Everything in place: every line ok (the capture lines included).
    code, doc = vm.doctor()
    statuses = {i: c["status"] for i, c in by_id(doc).items()}
    assert statuses == dict.fromkeys(statuses, "ok"), explain(doc)
    assert code == 0
    dns = by_id(doc)["dns-capture"]
    assert dns["details"]["resolver"] == f"{RESOLVER}:53"
    if services:
        # A name only the NameTable knows came back with the table's address, not the resolver's.
        assert dns["details"]["answer"] == dns["details"]["expected"] != [RESOLVER_ANSWER]
    else:
        assert dns["details"]["expected"] == []
        assert dns["summary"] == f"a query to {RESOLVER}:53 reached the agent's DNS proxy (NameTable empty)"
    assert "installed with iptables" in by_id(doc)["capture-rules"]["summary"]

    # The rules are gone (a firewall reload, an operator's flush): that line fails, DNS capture is not tried.
    vm.vm_agent("netfilter", "cleanup", *vm.config_args())
    code, doc = vm.doctor()
    statuses = {i: c["status"] for i, c in by_id(doc).items()}
    assert code == 1
    assert statuses == dict.fromkeys(statuses, "ok") | {"capture-rules": "fail", "dns-capture": "skip"}, explain(doc)
    rules = by_id(doc)["capture-rules"]
    assert "no vm-agent capture rules are installed" in rules["summary"]
    assert "sudo vm-agent netfilter apply" in rules["hint"]

    # The rules are back, but a rule of someone else's lets DNS bypass them: only the DNS line fails.
    vm.vm_agent("netfilter", "apply", "--backend", "iptables", *vm.config_args())
    vm.ns.run("iptables", "-t", "nat", "-I", "OUTPUT", "1", "-p", "udp", "--dport", "53", "-j", "RETURN")
    code, doc = vm.doctor()
    statuses = {i: c["status"] for i, c in by_id(doc).items()}
    assert code == 1
    assert statuses == dict.fromkeys(statuses, "ok") | {"dns-capture": "fail"}, explain(doc)
    dns = by_id(doc)["dns-capture"]
    if services:
        # The resolver answered by itself.
        assert f"{RESOLVER}:53 answered" in dns["summary"] and "the query did not reach the agent" in dns["summary"]
        assert RESOLVER_ANSWER in dns["summary"]
    else:
        assert dns["summary"] == f"a query to {RESOLVER}:53 did not reach the agent's DNS proxy"
    assert "vm-agent netfilter show" in dns["hint"]
