"""Capture rules applied for real inside a namespace the test creates (and deletes).

Envoy's listeners are stood in for by tagged TCP listeners on 15001/15006, so every assertion
is "which socket did this connection reach": the app's, Envoy's outbound or Envoy's inbound.
"""

from __future__ import annotations

import re
import shutil

import pytest

from tests.system.netfilter.conftest import NetNs, require_tools
from vm_agent.netfilter import CaptureSettings, NetfilterError, apply, cleanup, run_command, show
from vm_agent.netfilter.backend import _run

pytestmark = [pytest.mark.system]

PROXY = 1337  # the proxy uid/gid in the rules; actors "are" Envoy/the agent when they run as it
APP_PORT = 8080
BACKENDS = ["iptables", "nft"]


def tools_for(backend: str) -> None:
    require_tools("iptables-restore", "iptables-save") if backend == "iptables" else require_tools("nft")


def installed(ns: NetNs) -> str:
    """Every trace of ours in the namespace, from both backends' own listing commands."""
    ipt = ns.run("iptables-save").stdout + ns.run("ip6tables-save").stdout
    nft = ns.run("nft", "list", "ruleset").stdout if shutil.which("nft") else ""
    return "\n".join(line for line in (ipt + nft).splitlines() if "VMAGENT" in line or "vm_agent" in line)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_twice_is_one_copy_and_cleanup_leaves_only_others_rules(netns: NetNs, backend: str) -> None:
    tools_for(backend)
    require_tools("iptables", "nft")
    # Rules that are not ours, in both worlds: they must survive apply and cleanup untouched.
    netns.run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "RETURN")
    netns.run("iptables", "-t", "nat", "-N", "OPERATOR_CHAIN")
    netns.run("nft", "add table inet operator; add chain inet operator keep; add rule inet operator keep counter")
    before_ipt = netns.run("iptables-save", "-t", "nat").stdout
    settings = CaptureSettings(dns_servers_v4=("127.0.0.53",))

    apply(settings, backend, netns=netns.name)
    first = show(backend, netns=netns.name)
    apply(settings, backend, netns=netns.name)
    second = show(backend, netns=netns.name)
    assert first == second
    assert first.count("VMAGENT_OUTPUT") > 3
    if backend == "iptables":
        assert second.count("-A OUTPUT -j VMAGENT_OUTPUT\n") == 1
        assert second.count("-A PREROUTING -p tcp -j VMAGENT_INBOUND\n") == 1
        assert "table inet vm_agent" not in netns.run("nft", "list", "tables").stdout
    else:
        assert netns.run("nft", "list", "tables").stdout.count("table inet vm_agent") == 1
        assert "VMAGENT" not in netns.run("iptables-save").stdout

    # Switching backends replaces the capture instead of stacking a second one.
    other = "nft" if backend == "iptables" else "iptables"
    apply(settings, other, netns=netns.name)
    assert show(backend, netns=netns.name) == ""
    assert show(other, netns=netns.name) != ""

    # A dry run changes nothing but says what it would do.
    would = cleanup(other, dry_run=True, netns=netns.name)
    assert ("delete table inet vm_agent" if other == "nft" else "-X VMAGENT_OUTPUT\n") in would
    assert show(other, netns=netns.name) != ""

    assert cleanup(netns=netns.name) != ""
    assert installed(netns) == ""
    assert show(netns=netns.name) == ""
    assert cleanup(netns=netns.name) == ""  # nothing left to remove: a no-op, not an error
    after_ipt = netns.run("iptables-save", "-t", "nat").stdout
    assert _rules(after_ipt) == _rules(before_ipt)
    assert "-A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN" in after_ipt
    assert ":OPERATOR_CHAIN" in after_ipt
    assert "table inet operator" in netns.run("nft", "list", "tables").stdout


def _rules(save: str) -> list[str]:
    return [line for line in save.splitlines() if not line.startswith("#")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_traffic_goes_where_the_rules_say(netns: NetNs, peer: NetNs, backend: str) -> None:
    tools_for(backend)
    ip = NetNs.INSTANCE_IP
    netns.start("listen", "0.0.0.0", str(APP_PORT), "app")
    netns.start("listen", "0.0.0.0", "22", "ssh")
    netns.start("listen", "0.0.0.0", "15021", "status")
    netns.start("listen", "0.0.0.0", "15001", "envoy-outbound")
    netns.start("listen", "0.0.0.0", "15006", "envoy-inbound")
    apply(CaptureSettings(dns_capture=False), backend, netns=netns.name)

    # Outbound: the app's connection anywhere goes to Envoy's outbound listener ...
    assert netns.tool("connect", "10.200.0.77", "80") == "envoy-outbound"
    # ... but Envoy's own (proxy uid) is not captured: nothing answers 10.200.0.77.
    assert netns.tool("connect", "10.200.0.77", "80", "--timeout", "1", uid=PROXY).startswith("error")
    # The proxy group alone exempts too: an agent run as root:istio-proxy is not captured.
    assert netns.tool("connect", "10.200.0.77", "80", "--timeout", "1", gid=PROXY).startswith("error")
    assert netns.tool("connect", "10.200.0.77", "80", gid=PROXY + 1) == "envoy-outbound"
    # The app calling its own instance IP stays on lo, uncaptured.
    assert netns.tool("connect", ip, str(APP_PORT)) == "app"

    # Health probes ("Further notes" 1): from 127.0.0.6 they reach the app, not Envoy's 15006.
    assert netns.tool("connect", ip, str(APP_PORT), "--source", "127.0.0.6", uid=PROXY) == "app"
    assert netns.tool("connect", ip, str(APP_PORT), "--source", "127.0.0.6") == "app"
    # Without that source the proxy uid's connection to the instance IP is Envoy's (the VIP
    # self-call rule): a probe not bound to 127.0.0.6 would test Envoy instead of the app.
    assert netns.tool("connect", ip, str(APP_PORT), uid=PROXY) == "envoy-inbound"

    # Inbound from another host: the app port is captured, SSH and the agent's ports are not.
    assert peer.tool("connect", "10.201.0.2", str(APP_PORT)) == "envoy-inbound"
    assert peer.tool("connect", "10.201.0.2", "22") == "ssh"
    assert peer.tool("connect", "10.201.0.2", "15021") == "status"

    cleanup(netns=netns.name)
    assert installed(netns) == ""
    assert peer.tool("connect", "10.201.0.2", str(APP_PORT)) == "app"
    assert netns.tool("connect", ip, str(APP_PORT), uid=PROXY) == "app"
    assert netns.tool("connect", "10.200.0.77", "80", "--timeout", "1").startswith("error")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inbound_port_list_and_exclusions(netns: NetNs, peer: NetNs, backend: str) -> None:
    tools_for(backend)
    for port, tag in ((APP_PORT, "app"), (9090, "metrics"), (22, "ssh"), (15006, "envoy-inbound")):
        netns.start("listen", "0.0.0.0", str(port), tag)
    # SSH listed on purpose: it must still not be captured.
    apply(CaptureSettings(inbound_ports=f"{APP_PORT},22", dns_capture=False), backend, netns=netns.name)
    assert peer.tool("connect", "10.201.0.2", str(APP_PORT)) == "envoy-inbound"
    assert peer.tool("connect", "10.201.0.2", "9090") == "metrics"
    assert peer.tool("connect", "10.201.0.2", "22") == "ssh"
    # Excluded interface: nothing arriving on veth0 is captured.
    apply(CaptureSettings(exclude_interfaces=("veth0",), dns_capture=False), backend, netns=netns.name)
    assert peer.tool("connect", "10.201.0.2", str(APP_PORT)) == "app"
    cleanup(netns=netns.name)


def test_run_command_prints_and_reports_errors(netns: NetNs, capsys: pytest.CaptureFixture[str]) -> None:
    require_tools("nft")
    settings = CaptureSettings()
    assert run_command("apply", settings, "nft", dry_run=True, netns=netns.name) == 0
    out = capsys.readouterr().out
    assert out.startswith("# would apply:\n")
    assert "table inet vm_agent {" in out
    assert show(netns=netns.name) == ""  # dry run: nothing installed

    assert run_command("apply", settings, "nft", netns=netns.name) == 0
    assert run_command("show", settings, netns=netns.name) == 0
    assert "chain VMAGENT_OUTPUT" in capsys.readouterr().out
    assert run_command("cleanup", settings, netns=netns.name) == 0
    capsys.readouterr()
    assert run_command("show", settings, netns=netns.name) == 0
    assert "no vm-agent capture rules installed" in capsys.readouterr().out

    assert run_command("reload", settings) == 2
    assert "unknown action 'reload'" in capsys.readouterr().err
    # A namespace that does not exist: the error names the command and carries its stderr.
    assert run_command("apply", settings, "nft", netns=netns.name + "-gone") == 1
    err = capsys.readouterr().err
    assert re.search(r"`ip netns exec \S+-gone nft -f -` failed with exit code \d+: .+", err), err


@pytest.mark.parametrize(
    ("argv", "script", "quoted"),
    [
        (["iptables-restore", "--noflush"], "*nat\n:VMAGENT_X - [0:0]\n-A VMAGENT_NOPE -j RETURN\nCOMMIT\n", 3),
        (["nft", "-f", "-"], "table inet vm_agent {\n\tchain c {\n\t\tnonsense here\n\t}\n}\n", 3),
    ],
    ids=["iptables-restore", "nft"],
)
def test_a_rejected_script_is_reported_with_command_and_line(
    netns: NetNs, argv: list[str], script: str, quoted: int
) -> None:
    require_tools(argv[0])
    with pytest.raises(NetfilterError) as err:
        _run(argv, netns.name, stdin=script)
    message = str(err.value)
    assert f"`ip netns exec {netns.name} {' '.join(argv)}` failed with exit code" in message
    assert f"input line {quoted}: {script.splitlines()[quoted - 1]}" in message
    assert installed(netns) == ""  # all or nothing: the failed transaction left no trace
